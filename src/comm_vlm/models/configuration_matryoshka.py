"""Matryoshka-LLaVA (M3) configuration and the scale arithmetic of nested visual tokens.

M3 ("Matryoshka Multimodal Models", Cai et al. 2024, arXiv 2405.17430) trains one LLaVA-style model to answer from
nested sets of visual tokens: from the projector's g x g grid (24 x 24 = 576 for CLIP ViT-L/14-336) coarser sets are
average-pooled, 2x2 with stride 2 repeatedly (12x12, 6x6, 3x3) and then 3x3 to one token, so S in {1, 9, 36, 144,
576}. The official code pools the *projected* features with one `avg_pool2d(kernel=stride=sqrt(576 / S))`, which for
these scales equals the cascade (an average of equal-sized block averages is the block average).

Scales on any square grid (our rule, used for the tiny test models and documented here):

* a scale S is *valid* for a g x g grid when s = sqrt(S) is an integer dividing g; it is pooled with
  kernel = stride = g / s, giving an s x s grid in row-major order. For 24 x 24 that is
  S in {1, 4, 9, 16, 36, 64, 144, 576}.
* the *default* scales are the paper's cascade: halve the side while it is even, then pool the remaining odd side
  to one token: 24 -> 12 -> 6 -> 3 -> 1 gives [1, 9, 36, 144, 576]; a 4 x 4 grid gives [1, 4, 16]; a 14 x 14 grid
  gives [1, 49, 196].

This file is self-contained (transformers and the standard library only) so that it can ship as remote code.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

from transformers.utils import logging

from .configuration_comm import LlavaBranchConfig, patch_grid


logger = logging.get_logger(__name__)

TOKEN_SELECTIONS = ("avg_pool", "spatial", "sequential")
TRAINING_MODES = ("all_scales", "random_scale")
BUDGET_STRATEGIES = ("uniform", "greedy")
PACKINGS = ("auto", "split", "one_row")
# `matryoshka_scale="auto"`: a learned selector (`scale_selector_matryoshka`) picks every image's scale.
AUTO_SCALE = "auto"
SCALE_SELECTOR_DEFAULTS = {"width": 256, "margin": 0.05, "scales": None}


def valid_matryoshka_scales(grid: int) -> list[int]:
    """Every scale a `grid` x `grid` token grid can be pooled to: `(grid // k) ** 2` for each divisor k of `grid`."""
    return sorted((grid // k) ** 2 for k in range(1, grid + 1) if grid % k == 0)


def default_matryoshka_scales(grid: int) -> list[int]:
    """The paper's cascade on a `grid` x `grid` grid: halve while even, then pool the odd rest to one token."""
    sides = [grid]
    while sides[-1] % 2 == 0 and sides[-1] > 1:
        sides.append(sides[-1] // 2)
    if sides[-1] > 1:
        sides.append(1)
    return sorted(side * side for side in sides)


def check_matryoshka_scale(
    scale: int | str, grid: int, name: str = "matryoshka_scale", allow_auto: bool = False
) -> int | None:
    """Validates `scale` for a `grid` x `grid` grid and returns the pooling kernel (= stride) `grid // sqrt(scale)`.

    Args:
        allow_auto (`bool`): also accept `"auto"` (the learned scale selector picks per image), returning `None`.

    Raises:
        ValueError: `scale` is not a positive integer whose square root divides `grid` (nor `"auto"` where allowed);
            the message lists the valid scales.
    """
    if allow_auto and isinstance(scale, str) and scale == AUTO_SCALE:
        return None
    if isinstance(scale, bool) or not isinstance(scale, int):
        auto = ' or "auto" (the learned scale selector picks per image)' if allow_auto else ""
        raise ValueError(
            f"`{name}`={scale!r} is a {type(scale).__name__}, not an integer{auto}: a scale is a whole number of "
            f"visual tokens per image, a square s*s with s dividing {grid}. Valid scales: "
            f"{valid_matryoshka_scales(grid)}."
        )
    side = math.isqrt(scale) if scale > 0 else 0
    if side == 0 or side * side != scale or grid % side != 0:
        raise ValueError(
            f"`{name}`={scale!r} cannot be produced from the {grid}x{grid} visual token grid: a scale must be a "
            f"square s*s with s dividing {grid}. Valid scales: {valid_matryoshka_scales(grid)}."
        )
    return grid // side


def resolve_scales(grid: int, scales: Sequence[int] | None, default: int | None) -> tuple[list[int], int]:
    """A processor's scales and default scale for a `grid` x `grid` grid: `None` gives the paper's cascade and its
    largest scale; each is validated (`check_matryoshka_scale`). Returns `(sorted scales, default)`."""
    scales = default_matryoshka_scales(grid) if scales is None else list(scales)
    for scale in scales:
        check_matryoshka_scale(scale, grid, "matryoshka_scales")
    scales = sorted({int(s) for s in scales})
    default = scales[-1] if default is None else default
    check_matryoshka_scale(default, grid, "matryoshka_default_scale")
    return scales, int(default)


def as_integer(value: object, name: str, allow_auto: bool = False) -> int | str:
    """`value` as an `int`: Python and NumPy integers and one-element integer tensors pass (`operator.index`).

    Args:
        allow_auto (`bool`): also accept the string `"auto"` (returned as it is), where a learned scale selector
            may pick the scale.

    Raises:
        ValueError: `value` is a bool, a float (even a whole one: 9.0), a string (other than an allowed `"auto"`) or
            anything else.
    """
    if allow_auto and isinstance(value, str) and value == AUTO_SCALE:
        return AUTO_SCALE
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    auto = ' or "auto"' if allow_auto else ""
    raise ValueError(
        f"`{name}` must be an integer{auto}, got {value!r} ({type(value).__name__}); pass a whole number such as "
        f"9{auto}."
    )


def check_scale_selector(selector: object, scales: Sequence[int]) -> dict | None:
    """Validates `config.matryoshka_scale_selector` and fills its defaults; returns the completed dict (or `None`).

    Keys: `width` (`int` >= 1, hidden width of the selector's MLP, default 256), `margin` (`float` in [0, 1], the
    operating point: an image gets the smallest scale whose predicted P(correct) is within `margin` of the best
    scale's; 0 = the most likely scale, 1 = always the smallest), `scales` (the scales it predicts for, a subset of
    `matryoshka_scales` with at least two; default all of them).

    Raises:
        ValueError: not a dict, an unknown key, or a width, margin or scale list out of range.
    """
    if selector is None:
        return None
    if not isinstance(selector, dict):
        raise ValueError(
            f"`matryoshka_scale_selector` must be a dict such as {{'width': 256, 'margin': 0.05}} or None, got "
            f"{selector!r} ({type(selector).__name__})."
        )
    unknown = sorted(set(selector) - set(SCALE_SELECTOR_DEFAULTS))
    if unknown:
        raise ValueError(
            f"`matryoshka_scale_selector` has unknown keys {unknown}; allowed: {sorted(SCALE_SELECTOR_DEFAULTS)}."
        )
    out = {**SCALE_SELECTOR_DEFAULTS, **selector}
    out["width"] = as_integer(out["width"], "matryoshka_scale_selector['width']")
    if out["width"] < 1:
        raise ValueError(f"`matryoshka_scale_selector['width']` must be at least 1, got {out['width']}.")
    margin = out["margin"]
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 <= float(margin) <= 1.0:
        raise ValueError(
            f"`matryoshka_scale_selector['margin']` must be a number in [0, 1] (a difference of probabilities: 0 "
            f"picks the most likely scale, larger values trade accuracy for fewer tokens), got {margin!r}."
        )
    out["margin"] = float(margin)
    chosen = list(scales) if out["scales"] is None else out["scales"]
    if isinstance(chosen, (int, str)) or len(set(chosen)) < 2 or not set(chosen) <= set(scales):
        raise ValueError(
            f"`matryoshka_scale_selector['scales']`={out['scales']!r} must list at least two of the trained "
            f"`matryoshka_scales`={list(scales)} (or be None for all of them)."
        )
    out["scales"] = sorted(set(int(s) for s in chosen))
    return out


def choose_image_scales(num_images: int, budget: int, scales: Sequence[int], strategy: str = "uniform") -> list[int]:
    """Per-image scales for `num_images` images (or video frames) under a total visual-token `budget`.

    `uniform` (the paper's video setting, every frame at one scale): the largest scale S in `scales` with
    `num_images * S <= budget`. `greedy` starts from the uniform choice and spends the rest of the budget upgrading
    images one step, in order of appearance, while it fits (uses the budget better, images get unequal scales).

    Args:
        num_images (`int`): images in the prompt (0 gives `[]`).
        budget (`int`): maximum total visual tokens for the prompt.
        scales (`Sequence[int]`): the allowed scales (e.g. `config.matryoshka_scales`).
        strategy (`str`): `"uniform"` or `"greedy"`.

    Raises:
        ValueError: unknown strategy, a budget that is not an integer (bool, float, str), or a budget below
            `num_images * min(scales)`.
    """
    if strategy not in BUDGET_STRATEGIES:
        raise ValueError(f"Unknown budget strategy {strategy!r}; use one of {BUDGET_STRATEGIES}.")
    budget = as_integer(budget, "visual_token_budget")
    if num_images == 0:
        return []
    ordered = sorted(set(scales))
    fitting = [s for s in ordered if num_images * s <= budget]
    if not fitting:
        raise ValueError(
            f"A visual token budget of {budget} cannot hold {num_images} images: the smallest scale "
            f"{ordered[0]} needs {num_images * ordered[0]} tokens. Raise the budget or pass fewer images/frames."
        )
    chosen = [fitting[-1]] * num_images
    if strategy == "greedy":
        left = budget - sum(chosen)
        for i in range(num_images):
            larger = [s for s in ordered if s > chosen[i] and s - chosen[i] <= left]
            if larger:
                left -= larger[0] - chosen[i]
                chosen[i] = larger[0]
    return chosen


class MatryoshkaLlavaConfig(LlavaBranchConfig):
    r"""
    Configuration of [`MatryoshkaLlavaForConditionalGeneration`]: any COMM-family visual branch (see [`CommConfig`])
    with Matryoshka nested visual tokens. The defaults are LLaVA-1.5-M3: CLIP ViT-L/14-336 penultimate layer,
    identity aligner, 2-layer MLP projector, Llama LLM, scales [1, 9, 36, 144, 576]. COMM + M3 is e.g.
    `MatryoshkaLlavaConfig(secondary_vision_config={"model_type": "dinov2", ...}, vision_feature_layer=[...],
    vision_feature_merge="lln_layerscale", projector_depth=1)`.

    `image_seq_length` keeps meaning the full grid (g * g tokens, what the projector outputs); use
    [`~MatryoshkaLlavaConfig.num_image_tokens`] for the tokens at a scale.

    Args:
        matryoshka_scales (`list[int]`, *optional*): the scales trained (and averaged in the loss), each valid for the
            grid (a square s*s with s dividing the grid side). `None` gives the paper's cascade for the grid
            ([1, 9, 36, 144, 576] for 24 x 24).
        matryoshka_default_scale (`int`, *optional*): visual tokens per image when a request names no scale; one of
            `matryoshka_scales`. `None` gives the largest (the full grid with the default scales).
        matryoshka_token_selection (`str`): `avg_pool` (the paper's method: kernel = stride = g / sqrt(S) average
            pooling of the projected grid), or the paper's ablations `spatial` (one token per g/sqrt(S) block, at
            the block's centre `(k // 2, k // 2)`: our choice, the paper only draws it) and `sequential` (the first S
            tokens in row-major order).
        matryoshka_training_mode (`str`): `all_scales` (the paper: the loss is the mean over all scales) or
            `random_scale` (ablation: one random scale per sample and step, training only; evaluation with labels
            always averages all scales).
        train_vision_tower (`bool`): whether the vision encoder(s) train (the paper fine-tunes CLIP; `False`
            freezes them, and they then run without autograd).
        train_language_model (`bool`): whether the LLM trains (the paper's "CLIP only" ablation sets `False`).
        matryoshka_share_prefix (`bool`): packed rows compute the text before the first image once for all the
            scale variants they hold (exact; see `packing_matryoshka`). `False` repeats it per variant.
        matryoshka_packing (`str`): how a training batch's scale variants become rows: `split` (per sample, a plain
            full-grid row plus one packed row with the other scales, run as two trimmed LLM calls: best on CPU, where
            dense masked attention over a long row is costly), `one_row` (every scale of a sample in one packed row,
            one LLM call: best on GPU, where a second call costs more than masked attention blocks) or `auto` (`split`
            on CPU, `one_row` elsewhere).
        matryoshka_scale_selector (`dict`, *optional*): a learned per-image scale selector (`generate(...,
            matryoshka_scale="auto")`, see `scale_selector_matryoshka`): `{"width": 256, "margin": 0.05, "scales":
            None}`; `margin` is the accuracy/tokens operating point. `None` (default): no selector. Trained by
            `comm-vlm train-scale-selector`.
    """

    model_type = "matryoshka_llava"
    image_text_to_text_class_ref = "modeling_matryoshka.MatryoshkaLlavaForConditionalGeneration"

    matryoshka_scales: list[int] | None = None
    matryoshka_default_scale: int | None = None
    matryoshka_token_selection: str = "avg_pool"
    matryoshka_training_mode: str = "all_scales"
    train_vision_tower: bool = True
    train_language_model: bool = True
    matryoshka_share_prefix: bool = True
    matryoshka_packing: str = "auto"
    matryoshka_scale_selector: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate_matryoshka()

    def check_fields(self) -> None:
        """[`CommConfig.check_fields`] plus the Matryoshka fields (scales, selection, training mode, packing, scale
        selector)."""
        super().check_fields()
        self._validate_matryoshka()

    @property
    def matryoshka_grid(self) -> int:
        """Side g of the projected visual token grid (image_size // patch_size of the primary encoder)."""
        return patch_grid(self.vision_config)

    def valid_scales(self) -> list[int]:
        """Every scale this model's grid can produce (trained or not)."""
        return valid_matryoshka_scales(self.matryoshka_grid)

    def num_image_tokens(self, scale: int | None = None) -> int:
        """Visual tokens per image at `scale` (default: `matryoshka_default_scale`), validated against the grid."""
        scale = self.matryoshka_default_scale if scale is None else scale
        check_matryoshka_scale(scale, self.matryoshka_grid)
        return scale

    def _validate_matryoshka(self) -> None:
        if self.vision_feature_select_strategy != "default":
            raise ValueError(
                "Matryoshka pooling needs a square patch grid, but `vision_feature_select_strategy`="
                f"{self.vision_feature_select_strategy!r} keeps the CLS/register tokens; use 'default'."
            )
        grid = self.matryoshka_grid
        if self.matryoshka_scales is None:
            self.matryoshka_scales = default_matryoshka_scales(grid)
        if isinstance(self.matryoshka_scales, int) or not list(self.matryoshka_scales):
            raise ValueError(f"`matryoshka_scales` must be a non-empty list, got {self.matryoshka_scales!r}.")
        for scale in self.matryoshka_scales:
            check_matryoshka_scale(scale, grid, "matryoshka_scales")
        self.matryoshka_scales = sorted(set(int(s) for s in self.matryoshka_scales))
        if self.matryoshka_default_scale is None:
            self.matryoshka_default_scale = self.matryoshka_scales[-1]
        check_matryoshka_scale(self.matryoshka_default_scale, grid, "matryoshka_default_scale")
        if self.matryoshka_default_scale not in self.matryoshka_scales:
            raise ValueError(
                f"`matryoshka_default_scale`={self.matryoshka_default_scale} is not a trained scale; pick one of "
                f"`matryoshka_scales`={self.matryoshka_scales}."
            )
        if self.matryoshka_token_selection not in TOKEN_SELECTIONS:
            raise ValueError(
                f"`matryoshka_token_selection`={self.matryoshka_token_selection!r} is unknown; use one of "
                f"{TOKEN_SELECTIONS}."
            )
        if self.matryoshka_packing not in PACKINGS:
            raise ValueError(f"`matryoshka_packing`={self.matryoshka_packing!r} is unknown; use one of {PACKINGS}.")
        if self.matryoshka_training_mode not in TRAINING_MODES:
            raise ValueError(
                f"`matryoshka_training_mode`={self.matryoshka_training_mode!r} is unknown; use one of "
                f"{TRAINING_MODES}."
            )
        self.matryoshka_scale_selector = check_scale_selector(self.matryoshka_scale_selector, self.matryoshka_scales)


__all__ = [
    "AUTO_SCALE",
    "BUDGET_STRATEGIES",
    "MatryoshkaLlavaConfig",
    "PACKINGS",
    "TOKEN_SELECTIONS",
    "SCALE_SELECTOR_DEFAULTS",
    "TRAINING_MODES",
    "as_integer",
    "check_matryoshka_scale",
    "check_scale_selector",
    "resolve_scales",
    "choose_image_scales",
    "default_matryoshka_scales",
    "valid_matryoshka_scales",
]
