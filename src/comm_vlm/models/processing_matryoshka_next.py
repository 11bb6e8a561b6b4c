"""Processor of Matryoshka-LLaVA-NeXT: LLaVA-NeXT's processor whose placeholders follow a scale chosen per call, and
videos as one tiled picture.

The placeholder count of an image at S = s * s tokens per tile is LLaVA-NeXT's count at the pooled side s: the base
view's S tokens, plus the unpadded (rows * s) x (cols * s) map with one newline per row, computed with transformers'
own `LlavaNextProcessor` arithmetic (the model packs with transformers' `unpad_image`; the tests check that both agree
at every scale).

Video (the M3 paper's setting, from the official code's IG-VLM pipeline): `frames_to_grid_image` takes 6 frames at
evenly spaced indices (every floor(T / 6)-th frame), resizes them to the smallest frame's size and pastes them into
one picture of 3 rows x 2 columns (round(sqrt(6)) = 2 frames per row, row-major, white cells fill an incomplete last
row). The picture then goes through the single-image anyres path: `processor(videos=[frames], text=...)` with one
`<image>` in the text per video. A grid per frame is also possible: pass the frames as separate images (each is tiled
on its own) and bound the total with `visual_token_budget`.

torch, transformers, numpy and PIL only, so that it can ship as remote code.
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import LlavaNextProcessor
from transformers.image_processing_utils import select_best_resolution
from transformers.processing_utils import ImagesKwargs, MultiModalData, ProcessingKwargs

from .configuration_matryoshka import AUTO_SCALE, as_integer, check_matryoshka_scale, resolve_scales
from .configuration_matryoshka_next import largest_fitting_scale
from .image_utils import load_images


class MatryoshkaNextImagesKwargs(ImagesKwargs, total=False):
    matryoshka_image_scales: list[int]


class MatryoshkaNextProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: MatryoshkaNextImagesKwargs
    _defaults = {"images_kwargs": {"do_pad": True}}


def frames_to_grid_image(frames: Any, num_frames: int = 6, frames_per_row: int | None = None) -> Image.Image:
    """One picture of `num_frames` evenly spaced frames of a video, row-major (IG-VLM's grid, as M3 evaluates video).

    Args:
        frames: the video: a sequence of PIL images / `(H, W, 3)` arrays, or one `(T, H, W, 3)` uint8 array/tensor.
        num_frames (`int`): frames kept, at indices `k * floor(T / num_frames)` (all of them when T <= num_frames).
        frames_per_row (`int`, *optional*): default `round(sqrt(num_frames))` (2 for 6 frames: 3 rows x 2).

    Raises:
        ValueError: an empty video or a frame that is not an RGB image.
    """
    if isinstance(frames, torch.Tensor):
        frames = frames.cpu().numpy()
    frames = list(frames)
    if not frames:
        raise ValueError("The video has no frames; pass a list of frames or a (T, H, W, 3) array.")
    num_frames = as_integer(num_frames, "num_frames")
    step = max(len(frames) // num_frames, 1)
    chosen = frames[::step][:num_frames]
    images = [load_images(frame) for frame in chosen]
    width, height = min(im.width for im in images), min(im.height for im in images)
    per_row = frames_per_row or max(round(math.sqrt(len(images))), 1)
    rows = math.ceil(len(images) / per_row)
    canvas = Image.new("RGB", (per_row * width, rows * height), (255, 255, 255))
    for k, image in enumerate(images):
        cell = image if image.size == (width, height) else image.resize((width, height), Image.Resampling.BILINEAR)
        canvas.paste(cell, ((k % per_row) * width, (k // per_row) * height))
    return canvas


class MatryoshkaLlavaNextProcessor(LlavaNextProcessor):
    """[`LlavaNextProcessor`] with Matryoshka scales per tile.

    Args:
        image_processor, tokenizer, patch_size, vision_feature_select_strategy, chat_template, image_token,
            num_additional_image_tokens: as for [`LlavaNextProcessor`].
        matryoshka_scales (`list[int]`, *optional*): the model's `config.matryoshka_scales` (a budget picks among
            them); `None` gives the paper's cascade for the tile grid.
        matryoshka_default_scale (`int`, *optional*): tokens per tile when a call names none; `None` gives the
            largest of `matryoshka_scales` (plain LLaVA-NeXT).

    Call arguments (besides [`LlavaNextProcessor`]'s): `matryoshka_scale` (`int`): tokens per tile of every image, or
    `"auto"` (the default scale's placeholders, and `matryoshka_scale="auto"` in the output: `generate`'s learned
    selector then picks each image's scale);
    `visual_token_budget` (`int`): total visual tokens per prompt (each prompt gets the largest scale that fits);
    `videos`: one video (frames) per `<image>` in the text, pasted into one picture by `frames_to_grid_image`.
    The output adds `matryoshka_image_scales` `(num_images,)`.
    """

    valid_processor_kwargs = MatryoshkaNextProcessorKwargs

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        patch_size: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        num_additional_image_tokens: int = 0,
        matryoshka_scales: list[int] | None = None,
        matryoshka_default_scale: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            image_processor,
            tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )
        if patch_size is None:
            raise ValueError("MatryoshkaLlavaNextProcessor needs the vision encoder's `patch_size` (14 for CLIP-L).")
        self.matryoshka_scales, self.matryoshka_default_scale = resolve_scales(
            self.tile_size // patch_size, matryoshka_scales, matryoshka_default_scale
        )

    @property
    def tile_size(self) -> int:
        """A tile's side in pixels (the image processor's crop size)."""
        crop = self.image_processor.crop_size
        crop = crop if isinstance(crop, dict) else vars(crop)
        return int(crop.get("height") or crop.get("shortest_edge"))

    def num_image_tokens(self, image_size: Sequence[int], scale: int | None = None) -> int:
        """Placeholders of an original (height, width) image at `scale` tokens per tile (default: the default)."""
        scale = self.matryoshka_default_scale if scale is None else as_integer(scale, "matryoshka_scale")
        grid = self.tile_size // self.patch_size
        side = grid // check_matryoshka_scale(scale, grid)
        height, width = int(image_size[0]), int(image_size[1])
        best_height, best_width = select_best_resolution([height, width], self.image_processor.image_grid_pinpoints)
        unpadded, newlines = self._get_unpadded_features(
            height, width, side, side, best_height // self.tile_size, best_width // self.tile_size
        )
        return side * side + unpadded + newlines

    def image_scales(
        self,
        text: str | list[str],
        image_sizes: Sequence[Sequence[int]],
        matryoshka_scale: int | None = None,
        visual_token_budget: int | None = None,
    ) -> list[int]:
        """Tokens per tile of every image of a call (images in the order of their `<image>` in `text`).

        Raises:
            ValueError: both a scale and a budget, an invalid scale, or a budget too small for a prompt's images.
        """
        if matryoshka_scale is not None and visual_token_budget is not None:
            raise ValueError("Pass either matryoshka_scale or visual_token_budget, not both.")
        if visual_token_budget is None:
            auto = matryoshka_scale is None or as_integer(matryoshka_scale, "matryoshka_scale", True) == AUTO_SCALE
            scale = self.matryoshka_default_scale if auto else matryoshka_scale
            self.num_image_tokens((1, 1), scale)  # validates
            return [int(scale)] * len(image_sizes)
        budget = as_integer(visual_token_budget, "visual_token_budget")
        texts = [text] if isinstance(text, str) else list(text)
        scales, k = [], 0
        for prompt in texts:
            sizes = image_sizes[k : k + prompt.count(self.image_token)]
            k += len(sizes)
            need = {s: sum(self.num_image_tokens(size, s) for size in sizes) for s in self.matryoshka_scales}
            scales += [largest_fitting_scale(need, budget, len(sizes))] * len(sizes)
        return scales

    def __call__(self, images: Any = None, text: Any = None, videos: Any = None, audio: Any = None, **kwargs: Any):
        """[`LlavaNextProcessor`]'s call plus `matryoshka_scale`, `visual_token_budget`, `videos` (see the class)."""
        scale = kwargs.pop("matryoshka_scale", None)
        budget = kwargs.pop("visual_token_budget", None)
        if videos is not None:
            if images is not None:
                raise ValueError("Pass either images or videos in one call (a video takes an `<image>` placeholder).")
            videos = [videos] if isinstance(videos, np.ndarray) and videos.ndim == 4 else videos
            images, videos = [frames_to_grid_image(video) for video in videos], None
        scales = None
        if images is not None:
            timeout = kwargs.pop("image_timeout", None)
            images = load_images(images, timeout=timeout)
            flat = images if isinstance(images, list) else [images]
            flat = [im for item in flat for im in (item if isinstance(item, list) else [item])]
            sizes = [(im.height, im.width) for im in flat]
            scales = self.image_scales(text if text is not None else "", sizes, scale, budget)
            kwargs["images_kwargs"] = {**kwargs.get("images_kwargs", {}), "matryoshka_image_scales": scales}
        outputs = super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)
        if scales is not None and "pixel_values" in outputs:
            as_tensor = isinstance(outputs["pixel_values"], torch.Tensor)
            outputs["matryoshka_image_scales"] = torch.tensor(scales, dtype=torch.long) if as_tensor else scales
            if isinstance(scale, str) and scale == AUTO_SCALE:
                outputs["matryoshka_scale"] = AUTO_SCALE  # read by generate
        return outputs

    def _process_images(self, images: Any, **kwargs: Any):
        scales = kwargs.pop("matryoshka_image_scales", None)
        processed = self.image_processor(images, **kwargs)
        sizes = processed["image_sizes"]
        scales = scales or [self.matryoshka_default_scale] * len(sizes)
        replacements = [self.image_token * self.num_image_tokens(size, s) for size, s in zip(sizes, scales)]
        return processed, replacements

    def _get_num_multimodal_tokens(self, image_sizes: list[list[int]] | None = None, **kwargs: Any) -> MultiModalData:
        """Placeholders per image at the default scale (or `matryoshka_scale` in kwargs)."""
        scale = kwargs.get("matryoshka_scale")
        scale = self.matryoshka_default_scale if scale is None or isinstance(scale, str) else scale
        vision_data = {}
        if image_sizes is not None:
            vision_data["num_image_tokens"] = [self.num_image_tokens(size, scale) for size in image_sizes]
            vision_data["num_image_patches"] = [1] * len(image_sizes)
        return MultiModalData(**vision_data)


__all__ = ["MatryoshkaLlavaNextProcessor", "frames_to_grid_image"]
