"""Processor for COMM: each image placeholder becomes the fixed number of visual tokens the model feeds the LLM.

COMM is described in "From CLIP to DINO: Visual Encoders Shout in Multi-modal Large Language Models" (Jiang et al.,
2023). Like LLaVA-1.5, it feeds a fixed number of visual tokens per image to the language model (576 for a 336 px
input with patch size 14), so each image placeholder in the prompt is expanded to that many image tokens. Images go
through `load_image`, grounding boxes through the Shikra format (`image_utils`).

This file is self-contained (torch, transformers, numpy, PIL and the standard library only) so that it can be shipped
as remote code.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch
from transformers.processing_utils import MultiModalData, ProcessorMixin
from transformers.utils import logging

from .image_utils import (
    denormalize_box,
    format_box,
    install_pipeline_image_loading,
    load_image,
    load_images,
    normalize_box,
    parse_boxes,
)


logger = logging.get_logger(__name__)

# pipeline("image-text-to-text") loads images with the processor's `load_images` too (see image_utils).
install_pipeline_image_loading()

# `tokenizer.model_max_length` of a tokenizer that records no limit (transformers' `VERY_LARGE_INTEGER`, about 1e30).
_NO_LENGTH_LIMIT = int(1e20)

# ----------------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------------


def _num_tokens_from_image_processor(image_processor: Any, patch_size: int) -> int:
    """Visual tokens for a square patch grid over the image processor's output size (crop size when cropping)."""
    size = None
    if getattr(image_processor, "do_center_crop", False):
        size = getattr(image_processor, "crop_size", None)
    if not size or "height" not in size:
        size = getattr(image_processor, "size", None)
    if not size or "height" not in size or "width" not in size:
        raise ValueError(
            f"Cannot derive num_image_tokens from the image processor (crop_size/size: {size!r}): it has no fixed "
            "output height/width. Pass num_image_tokens explicitly."
        )
    return (int(size["height"]) // patch_size) * (int(size["width"]) // patch_size)


class CommProcessor(ProcessorMixin):
    """Wraps an image processor and a tokenizer; each image placeholder becomes `num_image_tokens` image tokens.

    Every image is converted with `load_image` (upright 8-bit RGB: EXIF orientation applied, alpha on white,
    16-bit/float scaled, NaN and corrupt files rejected, URLs fetched with a timeout) before the image processor sees
    it, in direct calls, chat templates and `pipeline("image-text-to-text")` alike.

    Args:
        image_processor (`BaseImageProcessor`): resizes/crops/normalizes images (a CLIP image processor for COMM).
        tokenizer (`PreTrainedTokenizerBase`): the LLM tokenizer; `image_token` must be a single token in it.
        num_image_tokens (`int`, *optional*): visual tokens the model consumes per image (576 for COMM at 336 px,
            patch 14). When `None`, computed from the image processor's crop size/size and the `patch_size` kwarg.
        image_token (`str`, defaults to `"<image>"`): the placeholder to write in prompts, once per image.
        chat_template (`str`, *optional*): Jinja chat template; defaults to the tokenizer's.
        patch_size (`int`, *optional*, keyword only): vision patch size, used only to derive `num_image_tokens`.

    Call arguments for image loading: `image_timeout` (`float`): seconds to wait for an image URL (default
    `$COMM_VLM_IMAGE_TIMEOUT`, else 10); `max_image_pixels` (`int`): largest `width * height` accepted (default
    `$COMM_VLM_MAX_IMAGE_PIXELS`, else 89,478,485; 0 = no limit).
    """

    # pipeline("image-text-to-text") hands its images to `load_images` (see `install_pipeline_image_loading`).
    handles_image_loading = True

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int | None = None,
        image_token: str = "<image>",
        chat_template: str | dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        patch_size = kwargs.pop("patch_size", None)
        if kwargs:
            logger.warning(f"CommProcessor ignores unexpected arguments: {sorted(kwargs)}.")
        if chat_template is None and tokenizer is not None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

        if num_image_tokens is None:
            if patch_size is None:
                raise ValueError(
                    "num_image_tokens is None and no patch_size was given: pass num_image_tokens (visual tokens per "
                    "image, e.g. 576 for COMM at 336 px) or patch_size to derive it from the image processor."
                )
            if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size <= 0:
                raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}.")
            num_image_tokens = _num_tokens_from_image_processor(image_processor, patch_size)
        if not isinstance(num_image_tokens, int) or isinstance(num_image_tokens, bool) or num_image_tokens <= 0:
            raise ValueError(f"num_image_tokens must be a positive integer, got {num_image_tokens!r}.")
        self.num_image_tokens = num_image_tokens

        token_id = tokenizer.convert_tokens_to_ids(image_token)
        if token_id is None or tokenizer.encode(image_token, add_special_tokens=False) != [token_id]:
            raise ValueError(
                f"image_token {image_token!r} is not a single token of the tokenizer; add it as a special token "
                "(and resize the model's embeddings) or pass the tokenizer's image token."
            )
        self.image_token = image_token
        self.image_token_id = token_id

    def load_images(self, images: Any, image_timeout: float | None = None, max_image_pixels: int | None = None) -> Any:
        """Upright 8-bit RGB PIL images from paths, URLs, PIL images, arrays or tensors, nesting kept (`load_images`).

        Args:
            images: an image or (nested) lists of images; a 4-D array `(N, ...)` is N images.
            image_timeout (`float`, *optional*): seconds to wait for an image URL.
            max_image_pixels (`int`, *optional*): largest `width * height` accepted; 0 for no limit.
        """
        return load_images(images, timeout=image_timeout, max_image_pixels=max_image_pixels)

    def __call__(self, images: Any = None, text: Any = None, videos: Any = None, audio: Any = None, **kwargs: Any):
        """`ProcessorMixin.__call__`, refusing prompts the model cannot answer as written (see `check_text_rows`).
        Images go through `load_images` first (call arguments `image_timeout`, `max_image_pixels`)."""
        image_timeout, max_image_pixels = kwargs.pop("image_timeout", None), kwargs.pop("max_image_pixels", None)
        if images is not None:
            images = self.load_images(images, image_timeout, max_image_pixels)
        outputs = super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)
        if text is not None:
            truncation = kwargs.get("truncation", kwargs.get("text_kwargs", {}).get("truncation"))
            self.check_text_rows(outputs, truncated=truncation not in (None, False, "do_not_truncate"))
        return outputs

    def check_text_rows(self, outputs: Any, truncated: bool = False) -> None:
        """Refuses an empty prompt and, unless the call asked for truncation, a prompt longer than the tokenizer's
        `model_max_length` (the language model's positions when the tokenizer records them).

        Image placeholders and images that do not match are refused by `ProcessorMixin`, as are truncations that cut
        placeholders. With `truncation=True` a long prompt is cut to `max_length` (or `model_max_length`) by the
        tokenizer, from the side `tokenizer.truncation_side` names.

        Args:
            outputs (`BatchFeature`): the processor's output, with `input_ids` `(B, T)` (a tensor or lists) and
                optionally `attention_mask` `(B, T)`.
            truncated (`bool`): whether the call asked the tokenizer to truncate.

        Raises:
            ValueError: a row with no token, or a row longer than `tokenizer.model_max_length`.
        """
        input_ids = outputs.get("input_ids")
        if input_ids is None:
            return
        masks = outputs.get("attention_mask")
        rows = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids
        rows = [rows] if rows and not isinstance(rows[0], (list, tuple)) else rows
        if masks is not None:
            masks = masks.tolist() if isinstance(masks, torch.Tensor) else masks
            masks = [masks] if masks and not isinstance(masks[0], (list, tuple)) else masks
            lengths = [int(sum(mask)) for mask in masks]
        else:
            lengths = [len(row) for row in rows]
        empty = [i for i, length in enumerate(lengths) if length == 0]
        if empty:
            raise ValueError(
                f"Prompt(s) {empty} are empty after tokenization: the language model needs at least one token to "
                "predict from. Write the prompt (or apply the chat template, which adds the roles) before calling "
                "the processor."
            )
        limit = getattr(self.tokenizer, "model_max_length", None)
        if truncated or not isinstance(limit, int) or limit >= _NO_LENGTH_LIMIT:
            return
        too_long = {i: length for i, length in enumerate(lengths) if length > limit}
        if too_long:
            raise ValueError(
                f"Prompt(s) {sorted(too_long)} have {sorted(set(too_long.values()))} tokens, more than the "
                f"{limit} positions of the language model (`tokenizer.model_max_length`), which would read them past "
                "its position table. Shorten the prompt or use fewer images (M3: a lower `matryoshka_scale` or "
                "`visual_token_budget`); `truncation=True` cuts the text to `max_length` instead."
            )

    def _adjust_assistant_masks_indices(self, processed_dict: dict[str, Any], generation_indices: list[list[int]]):
        """`ProcessorMixin`'s assistant-token masks, computed on the offset tensor instead of element by element.

        With `return_tensors="pt"` (TRL's vision collator) the base class iterates the `(batch, seq, 2)` offset tensor
        one element at a time: about 20 ms of a 50 ms collation for 16 rows here. Same masks (tested against it), as a
        `(batch, seq)` long tensor: a token is an assistant token if its characters overlap a `{% generation %}` span,
        the span shifted past the image placeholders expanded before it.
        """
        offsets = processed_dict.get("offset_mapping")
        if not isinstance(offsets, torch.Tensor):
            return super()._adjust_assistant_masks_indices(processed_dict, generation_indices)
        processed_dict.pop("offset_mapping")
        replacements = processed_dict.pop("text_replacement_offsets", None) or [[]] * len(offsets)
        token_starts, token_ends = offsets[..., 0], offsets[..., 1]  # (batch, seq)
        masks = torch.zeros(token_starts.shape, dtype=torch.bool)
        for i, spans in enumerate(generation_indices):
            placeholder_ends = [r["span"][1] for r in replacements[i]]
            chars_gained = [0] + [r["new_span"][1] - r["span"][1] for r in replacements[i]]
            for span in spans:
                start, end = (char + chars_gained[bisect.bisect_right(placeholder_ends, char)] for char in span)
                masks[i] |= (token_starts[i] < end) & (token_ends[i] > start)
        processed_dict["assistant_masks"] = masks.long()
        return processed_dict

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """Every image expands to the same number of image tokens (the image processor outputs a fixed size)."""
        return self.image_token * self.num_image_tokens

    def _get_num_multimodal_tokens(self, image_sizes: list[list[int]] | None = None, **kwargs: Any) -> MultiModalData:
        """Placeholder tokens per image for images of the given `(height, width)` sizes (one patch per image).

        Args:
            image_sizes (`list[list[int]]`, *optional*): input sizes `(height, width)`, one per image.
        """
        vision_data = {}
        if image_sizes is not None:
            vision_data["num_image_tokens"] = [self.num_image_tokens] * len(image_sizes)
            vision_data["num_image_patches"] = [1] * len(image_sizes)
        return MultiModalData(**vision_data)

    normalize_box = staticmethod(normalize_box)
    denormalize_box = staticmethod(denormalize_box)
    format_box = staticmethod(format_box)
    parse_boxes = staticmethod(parse_boxes)
    load_image = staticmethod(load_image)


__all__ = ["CommProcessor"]
