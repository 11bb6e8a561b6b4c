"""Image loading and Shikra-style grounding boxes, shared by the processors, data, evaluation and serving.

Grounded answers use the box format of Shikra (Chen et al., 2023): normalized `[x1,y1,x2,y2]` coordinates with three
decimals, several boxes in one bracket separated by `;`. `load_image` turns a path, URL, PIL image, array or tensor
into an RGB PIL image (alpha composited on white, 16-bit and float images rescaled).

This file is self-contained (torch, transformers, numpy, PIL and the standard library only) so that it can be shipped
as remote code.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_utils import load_image as _fetch_image
from transformers.utils import logging


logger = logging.get_logger(__name__)

Box = tuple[float, float, float, float]
BOX_DECIMALS = 3

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


# ----------------------------------------------------------------------------------------------------------------
# Image conversion
# ----------------------------------------------------------------------------------------------------------------


def _scale_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Maps a single-channel 16-bit / 32-bit / float array to uint8 (see `load_image` for the rules)."""
    array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if mode in _SIXTEEN_BIT_MODES:
        scaled = array / 65535.0 * 255.0
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = array * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = array
    elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
        scaled = array / 65535.0 * 255.0
    elif hi > lo:
        scaled = (array - lo) / (hi - lo) * 255.0
    else:
        scaled = np.zeros_like(array)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image), mode), mode="L").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"Cannot convert an image of PIL mode {mode!r} to RGB; convert it to RGB first.") from err


def load_image(image: str | os.PathLike | Image.Image | np.ndarray | torch.Tensor) -> Image.Image:
    """Opens and converts an image to 8-bit RGB, the input every COMM image processor expects.

    Conversions: `"1"`, `"L"`, `"P"` and `"CMYK"` are converted with PIL; images with alpha (`"RGBA"`, `"LA"`, `"PA"`,
    `"P"` with a transparency entry) are composited onto white. Single-channel high-depth images are scaled to
    0-255 by their value range: 16-bit modes (`"I;16"`, `"I;16B"`, ...) divide by 65535; `"I"` keeps values already
    in [0, 255], divides by 65535 when they lie in [0, 65535] and min-max scales otherwise; `"F"` multiplies values
    in [0, 1] by 255, keeps values in [0, 255] and min-max scales otherwise (NaN/inf count as 0).
    Numpy arrays and torch tensors are returned unchanged: the image processor handles HWC/CHW arrays itself.

    Args:
        image (`str`, `os.PathLike`, `PIL.Image.Image`, `np.ndarray` or `torch.Tensor`):
            A local file path, an `http(s)://` URL, a PIL image or an array.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file (or a lazily opened PIL image) is corrupt or truncated, or the mode is unsupported.
    """
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return image
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        return _to_rgb(_fetch_image(image))
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Image file not found: {path!r}. Check the path.")
        try:
            with Image.open(path) as opened:
                opened.load()
                return _to_rgb(opened).copy()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(
                f"Could not decode image file {path!r} ({err}); the file is corrupt, truncated or not an image. "
                "Re-download or re-encode it."
            ) from err
    if isinstance(image, Image.Image):
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as err:
            source = getattr(image, "filename", "") or "<in-memory image>"
            raise ValueError(f"Could not decode image {source!r} ({err}); it is corrupt or truncated.") from err
        return _to_rgb(image)
    raise TypeError(
        f"Unsupported image type {type(image).__name__}; pass a file path, URL, PIL image, numpy array or tensor."
    )


def _load_images(images: Any) -> Any:
    """Applies `load_image` through (nested) lists of images, keeping the nesting."""
    if isinstance(images, (list, tuple)):
        return [_load_images(item) for item in images]
    return load_image(images)


# ----------------------------------------------------------------------------------------------------------------
# Shikra-style boxes
# ----------------------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _as_four_numbers(box: Any) -> tuple[float, float, float, float]:
    if isinstance(box, (str, bytes)) or not isinstance(box, (Sequence, np.ndarray, torch.Tensor)):
        raise ValueError(f"Invalid box {box!r}: a box must be a sequence of 4 numbers (x1, y1, x2, y2).")
    values = box.tolist() if isinstance(box, (np.ndarray, torch.Tensor)) else list(box)
    if len(values) != 4 or not all(_is_number(v) for v in values):
        raise ValueError(f"Invalid box {box!r}: a box must be exactly 4 numbers (x1, y1, x2, y2).")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _check_image_size(image_size: Sequence[float]) -> tuple[float, float]:
    if len(image_size) != 2 or not all(_is_number(v) and math.isfinite(v) and v > 0 for v in image_size):
        raise ValueError(f"Invalid image_size {image_size!r}: expected (width, height) with positive values.")
    return float(image_size[0]), float(image_size[1])


def _box_problem(box: Box) -> str | None:
    """Returns why a normalized box is invalid, or None when it is valid."""
    if not all(math.isfinite(v) for v in box):
        return "coordinates must be finite (no NaN or inf)"
    if not all(0.0 <= v <= 1.0 for v in box):
        return "normalized coordinates must lie in [0, 1]"
    if box[2] < box[0] or box[3] < box[1]:
        return "x2 must be >= x1 and y2 must be >= y1"
    return None


def normalize_box(box: Sequence[float], image_size: Sequence[float], clip: bool = False) -> Box:
    """Converts a pixel box `(x1, y1, x2, y2)` to coordinates relative to the image, in [0, 1].

    Args:
        box (`Sequence[float]`): pixel coordinates, top-left then bottom-right corner.
        image_size (`Sequence[float]`): `(width, height)` of the image, as `PIL.Image.Image.size` gives it.
        clip (`bool`, defaults to `False`): clamp the result to [0, 1] (for boxes spilling slightly outside).
    """
    x1, y1, x2, y2 = _as_four_numbers(box)
    width, height = _check_image_size(image_size)
    out = (x1 / width, y1 / height, x2 / width, y2 / height)
    if clip:
        out = tuple(min(max(v, 0.0), 1.0) for v in out)
    return out  # type: ignore[return-value]


def denormalize_box(box: Sequence[float], image_size: Sequence[float]) -> Box:
    """Converts a normalized box back to pixel coordinates (floats; round them if you need integers).

    Args:
        box (`Sequence[float]`): normalized `(x1, y1, x2, y2)` in [0, 1].
        image_size (`Sequence[float]`): `(width, height)` of the image.
    """
    x1, y1, x2, y2 = _as_four_numbers(box)
    width, height = _check_image_size(image_size)
    return (x1 * width, y1 * height, x2 * width, y2 * height)


def format_box(box: Sequence[float]) -> str:
    """Formats a normalized box the Shikra way: `"[0.120,0.305,0.451,0.622]"` (3 decimals, no spaces).

    Args:
        box (`Sequence[float]`): normalized `(x1, y1, x2, y2)`; use `normalize_box` on pixel boxes first.

    Raises:
        ValueError: the box is not 4 numbers, has NaN/inf, a coordinate outside [0, 1], or x2 < x1 / y2 < y1.
    """
    values = _as_four_numbers(box)
    problem = _box_problem(values)
    if problem is not None:
        raise ValueError(f"Invalid box {box!r}: {problem}. Pixel boxes must go through normalize_box first.")
    return "[" + ",".join(f"{v:.{BOX_DECIMALS}f}" for v in values) + "]"


@dataclass
class BoxParseResult:
    """Boxes found in generated text by `parse_boxes`.

    Args:
        boxes (`list[tuple[float, float, float, float]]`): the well-formed boxes, in order of appearance.
        spans (`list[tuple[int, int]]`): character offsets `(start, end)` of each box in the text: the whole
            bracket `[...]` for a bracket holding one box, the box's own segment for `;`-separated boxes.
        errors (`list[str]`): one message per malformed box, quoting the offending substring and its offsets.
    """

    boxes: list[Box] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


_BRACKET_RE = re.compile(r"\[([^\[\]]*)\]")
_CITATION_RE = re.compile(r"\s*\d+\s*")


def _parse_segment(segment: str) -> tuple[Box | None, str | None]:
    parts = [p.strip() for p in segment.split(",")]
    if len(parts) != 4:
        return None, f"expected 4 comma-separated numbers, got {len(parts)}"
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        return None, "coordinates must be numbers"
    problem = _box_problem(values)  # type: ignore[arg-type]
    return (None, problem) if problem else (values, None)  # type: ignore[return-value]


def parse_boxes(text: str) -> BoxParseResult:
    """Finds Shikra-style boxes `[x1,y1,x2,y2]` (or `[box;box;...]`) in generated text. Never raises on bad boxes.

    A bracket group is treated as a box candidate when it contains a digit and is not a bare integer such as the
    citation `[1]`. Well-formed boxes go to `boxes`/`spans`; malformed ones (wrong arity, non-numbers, out of
    [0, 1], inverted corners) are reported in `errors`.

    Args:
        text (`str`): model output.
    """
    result = BoxParseResult()
    for match in _BRACKET_RE.finditer(text):
        content = match.group(1)
        if not any(ch.isdigit() for ch in content) or _CITATION_RE.fullmatch(content):
            continue
        segments = content.split(";")
        offset = match.start(1)
        for segment in segments:
            start = offset + len(segment) - len(segment.lstrip())
            end = offset + len(segment.rstrip())
            offset += len(segment) + 1
            if len(segments) == 1:
                start, end = match.span()
            box, problem = _parse_segment(segment)
            if box is None:
                result.errors.append(f"Malformed box {text[start:end]!r} at {start}:{end}: {problem}.")
            else:
                result.boxes.append(box)
                result.spans.append((start, end))
    return result


__all__ = ["BoxParseResult", "denormalize_box", "format_box", "load_image", "normalize_box", "parse_boxes"]
