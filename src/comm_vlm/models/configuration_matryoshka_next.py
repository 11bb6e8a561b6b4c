"""Matryoshka-LLaVA-NeXT (M3 on LLaVA-NeXT's anyres tiles): configuration and the token arithmetic of a tiled image.

LLaVA-NeXT (transformers' `LlavaNext*`) splits an image into the tiles of the best grid pinpoint (e.g. 2x2 tiles of
336 px for a 672x672 canvas) plus a base view of the whole image; every tile gives a g x g grid of projected features
(24 x 24 for CLIP ViT-L/14-336). M3 (Cai et al. 2024, arXiv 2405.17430; official code `mu-cai/matryoshka-mm`,
`llava/model/llava_arch.py`) average-pools every tile, the base view included, to s x s after the projector
(kernel = stride = g / s, S = s * s tokens per tile), then lays the pooled tiles out exactly as LLaVA-NeXT lays the
full ones: the tiles' grids joined into one (rows * s) x (cols * s) map, the padding rows/columns of the letterboxed
canvas removed ("unpadding"), one `image_newline` after every row, the base view's S tokens first. Tokens per image:

    S + h_S * (w_S + 1),   (h_S, w_S) = unpad(rows * s, cols * s, original image size)

At the full scale (S = g * g) nothing is pooled and the model equals `LlavaNextForConditionalGeneration`.

Unpadding rule (our choice, stated): transformers' (`unpad_image` / `LlavaNextProcessor._get_unpadded_features`): the
kept height (or width) is `int(round(size * scale, 7))`, from an (H, W) image size. The official code truncates with
`int()` (and reads the size as (W, H), from PIL, consistently); for a few image sizes and scales the kept map differs
(a 618 x 1339 (H x W) image at 36 tokens per tile keeps 6 x 14 tokens by rounding, 6 x 12 by truncation; a 107 x 107
image at 1 token per tile keeps 1 x 2, truncation 1 x 0; see `official_unpadded_grid` and the tests). We follow
transformers so that the full scale is bit-exact with `LlavaNext*`, and the processor and the model use the same rule
at every scale (`anyres_token_count`).

This file is self-contained (transformers and the standard library) so that it can ship as remote code.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import LlavaNextConfig
from transformers.image_processing_utils import select_best_resolution

from .configuration_matryoshka import (
    TRAINING_MODES,
    as_integer,
    check_matryoshka_scale,
    check_scale_selector,
    default_matryoshka_scales,
    valid_matryoshka_scales,
)


def unpadded_grid(image_height: int, image_width: int, height: int, width: int) -> tuple[int, int]:
    """The (rows, columns) of a `height` x `width` token map of a letterboxed canvas left after removing the padding
    of an `image_height` x `image_width` image (transformers' rule: rounding, (H, W) order)."""
    if image_width / image_height > width / height:
        new_height = int(round(image_height * (width / image_width), 7))
        return height - 2 * ((height - new_height) // 2), width
    new_width = int(round(image_width * (height / image_height), 7))
    return height, width - 2 * ((width - new_width) // 2)


def official_unpadded_grid(image_height: int, image_width: int, height: int, width: int) -> tuple[int, int]:
    """The same for the official LLaVA-NeXT / M3 code (`int()` truncation); only for comparisons, never used."""
    if image_width / image_height > width / height:
        new_height = int(image_height * (width / image_width))
        return height - 2 * ((height - new_height) // 2), width
    new_width = int(image_width * (height / image_height))
    return height, width - 2 * ((width - new_width) // 2)


def anyres_tile_grid(image_size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]], tile_size: int):
    """(rows, cols) of tiles LLaVA-NeXT cuts an (H, W) image into: the best pinpoint divided by the tile size."""
    height, width = select_best_resolution([int(image_size[0]), int(image_size[1])], [list(p) for p in grid_pinpoints])
    return height // tile_size, width // tile_size


def anyres_token_count(
    image_size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]], tile_size: int, side: int
) -> int:
    """Visual tokens (image_newline included) of one (H, W) image whose tiles are pooled to `side` x `side`.

    Args:
        image_size (`Sequence[int]`): the original (height, width) in pixels.
        grid_pinpoints (`Sequence[Sequence[int]]`): the canvases (height, width) the image may be resized onto.
        tile_size (`int`): a tile's side in pixels (the vision encoder's `image_size`, 336).
        side (`int`): tokens per tile side after pooling (24 for the full 24 x 24 grid, 3 at scale 9).
    """
    rows, cols = anyres_tile_grid(image_size, grid_pinpoints, tile_size)
    height, width = unpadded_grid(int(image_size[0]), int(image_size[1]), rows * side, cols * side)
    return side * side + height * (width + 1)


def largest_fitting_scale(need: dict[int, int], budget: int, num_images: int) -> int:
    """The largest scale whose tokens fit `budget`, given `need` (scale -> tokens of a prompt's `num_images` images).

    Raises:
        ValueError: even the smallest scale needs more than `budget` (the need is given).
    """
    fitting = [s for s, n in need.items() if n <= budget]
    if not fitting:
        smallest = min(need)
        raise ValueError(
            f"A visual token budget of {budget} cannot hold these {num_images} image(s): the smallest scale "
            f"({smallest} per tile) needs {need[smallest]} tokens. Raise the budget or pass fewer images/frames."
        )
    return max(fitting)


class MatryoshkaLlavaNextConfig(LlavaNextConfig):
    r"""
    Configuration of [`MatryoshkaLlavaNextForConditionalGeneration`]: transformers' [`LlavaNextConfig`] (every field
    and default the same: CLIP ViT-L/14-336 penultimate layer, 2-layer MLP projector, the five LLaVA-NeXT pinpoints up
    to 2x2 tiles of 336 px) with Matryoshka scales per tile.

    Args:
        matryoshka_scales (`list[int]`, *optional*): the tokens per tile trained (and averaged in the loss), each a
            square s*s with s dividing the tile's grid side. `None` gives the paper's cascade ([1, 9, 36, 144, 576] for
            24 x 24).
        matryoshka_default_scale (`int`, *optional*): tokens per tile when a request names none; one of
            `matryoshka_scales`. `None` gives the largest (the full grid: plain LLaVA-NeXT).
        matryoshka_training_mode (`str`): `all_scales` (the paper: the loss is the mean over all scales) or
            `random_scale` (one random scale per training step).
        matryoshka_scale_selector (`dict`, *optional*): the learned per-image scale selector of
            `generate(..., matryoshka_scale="auto")` (`{"width": 256, "margin": 0.05, "scales": None}`, see
            [`MatryoshkaLlavaConfig`]); it reads each image's base view. `None` (default): no selector.
        kwargs: [`LlavaNextConfig`]'s fields.
    """

    model_type = "matryoshka_llava_next"

    matryoshka_scales: list[int] | None = None
    matryoshka_default_scale: int | None = None
    matryoshka_training_mode: str = "all_scales"
    matryoshka_scale_selector: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_fields()

    def to_dict(self) -> dict:
        """`LlavaNextConfig.to_dict` with an `auto_map` entry for `AutoModelForImageTextToText` (see `CommConfig`)."""
        output = super().to_dict()
        auto_map = output.get("auto_map") or {}
        entry = "modeling_matryoshka_next.MatryoshkaLlavaNextForConditionalGeneration"
        output["auto_map"] = {"AutoModelForImageTextToText": entry, **auto_map}
        return output

    @property
    def matryoshka_grid(self) -> int:
        """Side g of one tile's projected token grid (the vision encoder's image_size // patch_size)."""
        return self.vision_config.image_size // self.vision_config.patch_size

    def valid_scales(self) -> list[int]:
        """Every scale a tile's grid can produce (trained or not)."""
        return valid_matryoshka_scales(self.matryoshka_grid)

    def check_scale(self, scale: object, name: str = "matryoshka_scale") -> int:
        """`scale` as an int, validated for the tile grid; returns the pooled side s (S = s * s)."""
        scale = as_integer(scale, name)
        return self.matryoshka_grid // check_matryoshka_scale(scale, self.matryoshka_grid, name)

    def num_image_tokens(self, image_size: Sequence[int], scale: int | None = None) -> int:
        """Visual tokens of an (H, W) image at `scale` tokens per tile (default: `matryoshka_default_scale`)."""
        scale = self.matryoshka_default_scale if scale is None else scale
        side = self.check_scale(scale)
        return anyres_token_count(image_size, self.image_grid_pinpoints, self.vision_config.image_size, side)

    def budget_scales(self, image_sizes: Sequence[Sequence[int]], budget: int) -> list[int]:
        """One trained scale for all images of a prompt: the largest whose tokens (newlines included) fit `budget`.

        Raises:
            ValueError: the budget is not an integer, or is too small for the smallest scale (the need is given).
        """
        budget = as_integer(budget, "visual_token_budget")
        if not image_sizes:
            return []
        need = {s: sum(self.num_image_tokens(size, s) for size in image_sizes) for s in self.matryoshka_scales}
        return [largest_fitting_scale(need, budget, len(image_sizes))] * len(image_sizes)

    def placeholder_scale(self, num_placeholders: int, image_sizes: Sequence[Sequence[int]]) -> int:
        """The one scale (tokens per tile) at which images of these (H, W) sizes take `num_placeholders` tokens in
        all (a scale's count grows with the scale, so at most one matches; trained scales are tried first).

        Raises:
            ValueError: no single scale gives that many tokens (the count of every scale is listed).
        """
        sizes = [[int(v) for v in size] for size in image_sizes]
        candidates = self.matryoshka_scales + [s for s in self.valid_scales() if s not in self.matryoshka_scales]
        expected = {s: sum(self.num_image_tokens(size, s) for size in sizes) for s in candidates}
        matching = [s for s, n in expected.items() if n == num_placeholders]
        if not matching:
            raise ValueError(
                f"The text has {num_placeholders} image tokens for {len(sizes)} image(s) of sizes {sizes}, which no "
                f"single scale gives (tokens per scale: {expected}). Build the inputs with "
                "MatryoshkaLlavaNextProcessor (it returns `matryoshka_image_scales`), or call "
                "generate(..., matryoshka_scale=S)."
            )
        return matching[0]

    def check_fields(self) -> None:
        """Validates the Matryoshka fields against the tile grid; raises `ValueError` saying what to change."""
        if self.vision_feature_select_strategy != "default":
            raise ValueError(
                "Matryoshka pooling needs a square patch grid per tile, but `vision_feature_select_strategy`="
                f"{self.vision_feature_select_strategy!r} keeps the CLS token; use 'default'."
            )
        grid = self.matryoshka_grid
        if self.matryoshka_scales is None:
            self.matryoshka_scales = default_matryoshka_scales(grid)
        if isinstance(self.matryoshka_scales, (int, str)) or not list(self.matryoshka_scales):
            raise ValueError(f"`matryoshka_scales` must be a non-empty list, got {self.matryoshka_scales!r}.")
        for scale in self.matryoshka_scales:
            self.check_scale(scale, "matryoshka_scales")
        self.matryoshka_scales = sorted({int(s) for s in self.matryoshka_scales})
        if self.matryoshka_default_scale is None:
            self.matryoshka_default_scale = self.matryoshka_scales[-1]
        self.check_scale(self.matryoshka_default_scale, "matryoshka_default_scale")
        if self.matryoshka_default_scale not in self.matryoshka_scales:
            raise ValueError(
                f"`matryoshka_default_scale`={self.matryoshka_default_scale} is not a trained scale; pick one of "
                f"`matryoshka_scales`={self.matryoshka_scales}."
            )
        if self.matryoshka_training_mode not in TRAINING_MODES:
            raise ValueError(
                f"`matryoshka_training_mode`={self.matryoshka_training_mode!r} is unknown; use one of "
                f"{TRAINING_MODES}."
            )
        self.matryoshka_scale_selector = check_scale_selector(self.matryoshka_scale_selector, self.matryoshka_scales)
        tile = self.vision_config.image_size
        bad = [p for p in self.image_grid_pinpoints if len(p) != 2 or p[0] % tile or p[1] % tile]
        if bad:
            raise ValueError(
                f"`image_grid_pinpoints` {bad} are not multiples of the tile size {tile}: every canvas must cut into "
                "whole tiles."
            )


__all__ = [
    "MatryoshkaLlavaNextConfig",
    "anyres_tile_grid",
    "anyres_token_count",
    "largest_fitting_scale",
    "official_unpadded_grid",
    "unpadded_grid",
]
