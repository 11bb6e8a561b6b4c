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


def check_matryoshka_scale(scale: int, grid: int, name: str = "matryoshka_scale") -> int:
    """Validates `scale` for a `grid` x `grid` grid and returns the pooling kernel (= stride) `grid // sqrt(scale)`.

    Raises:
        ValueError: `scale` is not a positive integer whose square root divides `grid`; the message lists the valid
            scales.
    """
    if isinstance(scale, bool) or not isinstance(scale, int):
        raise ValueError(
            f"`{name}`={scale!r} is a {type(scale).__name__}, not an integer: a scale is a whole number of visual "
            f"tokens per image, a square s*s with s dividing {grid}. Valid scales: {valid_matryoshka_scales(grid)}."
        )
    side = math.isqrt(scale) if scale > 0 else 0
    if side == 0 or side * side != scale or grid % side != 0:
        raise ValueError(
            f"`{name}`={scale!r} cannot be produced from the {grid}x{grid} visual token grid: a scale must be a "
            f"square s*s with s dividing {grid}. Valid scales: {valid_matryoshka_scales(grid)}."
        )
    return grid // side


def as_integer(value: object, name: str) -> int:
    """`value` as an `int`: Python and NumPy integers and one-element integer tensors pass (`operator.index`).

    Raises:
        ValueError: `value` is a bool, a float (even a whole one: 9.0), a string or anything else.
    """
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise ValueError(
        f"`{name}` must be an integer, got {value!r} ({type(value).__name__}); pass a whole number such as 9."
    )


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

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate_matryoshka()

    def check_fields(self) -> None:
        """[`CommConfig.check_fields`] plus the Matryoshka fields (scales, selection, training mode, packing)."""
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


__all__ = [
    "BUDGET_STRATEGIES",
    "MatryoshkaLlavaConfig",
    "PACKINGS",
    "TOKEN_SELECTIONS",
    "TRAINING_MODES",
    "as_integer",
    "check_matryoshka_scale",
    "choose_image_scales",
    "default_matryoshka_scales",
    "valid_matryoshka_scales",
]
