"""Processor for Matryoshka-LLaVA (M3): a per-call visual-token scale or a per-prompt token budget.

M3 ("Matryoshka Multimodal Models", Cai et al. 2024, arXiv 2405.17430) answers from S in {1, 9, 36, 144, 576}
visual tokens per image with one set of weights. The processor writes S image placeholders per image, so the scale
travels with the text (the model reads it from the runs) and `pipeline("image-text-to-text", ...)` needs nothing
else:

    processor(images=image, text="USER: <image>\\nWhat is it? ASSISTANT:", matryoshka_scale=9)
    processor(images=frames, text=video_prompt, visual_token_budget=64)   # 6 frames -> 9 tokens each

Several images (or video frames passed as images, one `<image>` per frame) share a per-prompt `visual_token_budget`:
every image of a prompt gets the largest scale that fits (`budget_strategy="uniform"`, the paper's video setting) or
images are upgraded in order while the budget allows (`"greedy"`). The chosen tokens of every image are returned as
`matryoshka_image_scales` (one entry per image, in order), which the model uses to split touching runs.

`matryoshka_scale="auto"` leaves the choice to the model's learned scale selector: the processor writes the default
scale's placeholders and returns `matryoshka_scale="auto"` with the inputs, so `model.generate(**inputs)` (and
`pipeline(..., processor_kwargs={"matryoshka_scale": "auto"})`) picks each image's scale and re-lays the prompt.

This file is self-contained (torch, transformers, numpy, PIL and the standard library only) so that it can be shipped
as remote code.
"""

import math
from typing import Any

import torch
from transformers.processing_utils import ImagesKwargs, MultiModalData, ProcessingKwargs
from transformers.utils import logging

from .configuration_matryoshka import (
    AUTO_SCALE,
    as_integer,
    check_matryoshka_scale,
    choose_image_scales,
    resolve_scales,
)
from .processing_comm import CommProcessor


logger = logging.get_logger(__name__)


class MatryoshkaImagesKwargs(ImagesKwargs, total=False):
    matryoshka_image_token_counts: list[int]


class MatryoshkaProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: MatryoshkaImagesKwargs


class MatryoshkaLlavaProcessor(CommProcessor):
    """[`CommProcessor`] whose image placeholders follow a Matryoshka scale chosen per call.

    Args:
        image_processor, tokenizer, image_token, chat_template: as for [`CommProcessor`].
        num_image_tokens (`int`, *optional*): tokens of the full grid (g * g, e.g. 576); derived as in
            [`CommProcessor`] from `patch_size` when `None`.
        matryoshka_scales (`list[int]`, *optional*): scales a budget may choose (the model's
            `config.matryoshka_scales`); `None` gives the paper's cascade for the grid.
        matryoshka_default_scale (`int`, *optional*): tokens per image when a call names no scale; `None` gives the
            largest of `matryoshka_scales`.

    Call arguments (besides [`CommProcessor`]'s): `matryoshka_scale` (`int`): tokens for every image of the call (any
    scale the grid can produce), or `"auto"` (the default scale's placeholders, and `matryoshka_scale="auto"` in the
    output for `generate`, whose learned selector picks each image's scale); `visual_token_budget` (`int`): total
    visual tokens per prompt; `budget_strategy` (`str`): `"uniform"` or `"greedy"`.
    """

    valid_processor_kwargs = MatryoshkaProcessorKwargs

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int | None = None,
        image_token: str = "<image>",
        chat_template: str | dict[str, str] | None = None,
        matryoshka_scales: list[int] | None = None,
        matryoshka_default_scale: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_processor, tokenizer, num_image_tokens, image_token, chat_template, **kwargs)
        grid = math.isqrt(self.num_image_tokens)
        if grid * grid != self.num_image_tokens:
            raise ValueError(
                f"num_image_tokens={self.num_image_tokens} is not a square grid; Matryoshka scales need g*g tokens "
                "(drop CLS tokens: vision_feature_select_strategy='default')."
            )
        self.grid = grid
        self.matryoshka_scales, self.matryoshka_default_scale = resolve_scales(
            grid, matryoshka_scales, matryoshka_default_scale
        )

    def image_token_counts(
        self,
        text: str | list[str],
        matryoshka_scale: int | str | None = None,
        visual_token_budget: int | None = None,
        budget_strategy: str = "uniform",
    ) -> list[int]:
        """Visual tokens of every image placeholder in `text`, in order (what the call will write).

        Args:
            text (`str` or `list[str]`): prompts with one `image_token` per image.
            matryoshka_scale (`int` or `"auto"`, *optional*): one scale for every image (default and `"auto"`:
                `matryoshka_default_scale`).
            visual_token_budget (`int`, *optional*): total tokens per prompt, split by `choose_image_scales`.
            budget_strategy (`str`): `"uniform"` or `"greedy"`.

        Raises:
            ValueError: both a scale and a budget, a scale the grid cannot produce (the valid ones are listed), or a
                budget too small for a prompt's images.
        """
        texts = [text] if isinstance(text, str) else list(text)
        per_prompt = [t.count(self.image_token) for t in texts]
        if matryoshka_scale is not None and visual_token_budget is not None:
            raise ValueError("Pass either matryoshka_scale or visual_token_budget, not both.")
        if visual_token_budget is not None:
            counts = []
            for n in per_prompt:
                counts += choose_image_scales(n, visual_token_budget, self.matryoshka_scales, budget_strategy)
            return counts
        auto = matryoshka_scale is None or as_integer(matryoshka_scale, "matryoshka_scale", True) == AUTO_SCALE
        scale = self.matryoshka_default_scale if auto else matryoshka_scale
        check_matryoshka_scale(as_integer(scale, "matryoshka_scale"), self.grid)
        return [scale] * sum(per_prompt)

    def __call__(self, images: Any = None, text: Any = None, videos: Any = None, audio: Any = None, **kwargs: Any):
        """[`CommProcessor.__call__`] plus `matryoshka_scale` / `visual_token_budget` / `budget_strategy`; adds
        `matryoshka_image_scales` (tokens of each image, `(num_images,)`) when images are given, and
        `matryoshka_scale="auto"` when asked for (read by `generate`)."""
        scale = kwargs.pop("matryoshka_scale", None)
        budget = kwargs.pop("visual_token_budget", None)
        strategy = kwargs.pop("budget_strategy", "uniform")
        counts = None
        if images is not None and text is not None:
            counts = self.image_token_counts(text, scale, budget, strategy)
            kwargs["images_kwargs"] = {**kwargs.get("images_kwargs", {}), "matryoshka_image_token_counts": counts}
        outputs = super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)
        if counts is not None and "pixel_values" in outputs:
            as_tensor = isinstance(outputs["pixel_values"], torch.Tensor)
            outputs["matryoshka_image_scales"] = torch.tensor(counts, dtype=torch.long) if as_tensor else counts
            if isinstance(scale, str) and scale == AUTO_SCALE:
                outputs["matryoshka_scale"] = AUTO_SCALE
        return outputs

    def _process_images(self, images: Any, **kwargs: Any):
        counts = kwargs.pop("matryoshka_image_token_counts", None)
        processed = self.image_processor(images, **kwargs)
        if counts is None:
            counts = [self.matryoshka_default_scale] * len(processed["pixel_values"])
        return processed, [self.image_token * n for n in counts]

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        counts = kwargs.get("matryoshka_image_token_counts")
        return self.image_token * (self.matryoshka_default_scale if counts is None else counts[image_idx])

    def _get_num_multimodal_tokens(self, image_sizes: list[list[int]] | None = None, **kwargs: Any) -> MultiModalData:
        """Placeholder tokens per image at the default scale (or `matryoshka_scale` in kwargs)."""
        scale = kwargs.get("matryoshka_scale")
        scale = self.matryoshka_default_scale if scale is None or isinstance(scale, str) else scale
        vision_data = {}
        if image_sizes is not None:
            vision_data["num_image_tokens"] = [scale] * len(image_sizes)
            vision_data["num_image_patches"] = [1] * len(image_sizes)
        return MultiModalData(**vision_data)


__all__ = ["MatryoshkaLlavaProcessor"]
