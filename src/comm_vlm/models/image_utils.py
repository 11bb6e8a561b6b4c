"""Image loading and Shikra-style grounding boxes, shared by the processors, data, evaluation and serving.

Grounded answers use the box format of Shikra (Chen et al., 2023): normalized `[x1,y1,x2,y2]` coordinates with three
decimals, several boxes in one bracket separated by `;`.

`load_image` turns a path, URL, data URI, PIL image, array or tensor into an upright 8-bit RGB PIL image. Every entry
point loads images through it (the processors, hence `generate` inputs and chat templates, and both forms of
`pipeline("image-text-to-text")`, see `install_pipeline_image_loading`), so the same input gives the same pixels.
The rules are in `load_image`'s docstring and in `docs/models.md` ("Images").

This file is self-contained (torch, transformers, numpy, PIL and the standard library only) so that it can be shipped
as remote code.
"""

from __future__ import annotations

import base64
import binascii
import functools
import http.client
import io
import math
import os
import re
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.utils import logging


logger = logging.get_logger(__name__)

Box = tuple[float, float, float, float]
BOX_DECIMALS = 3

IMAGE_TIMEOUT_ENV = "COMM_VLM_IMAGE_TIMEOUT"
MAX_IMAGE_PIXELS_ENV = "COMM_VLM_MAX_IMAGE_PIXELS"
# Seconds to wait for an image URL's server when no timeout is given (per wait, and for the whole download).
DEFAULT_IMAGE_TIMEOUT = 10.0
# Largest image (width * height) loaded when no limit is given: PIL's default `Image.MAX_IMAGE_PIXELS`, about
# 0.25 GiB as 8-bit RGB.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
_TRANSPARENCY_MODES = {"P", "L", "RGB"}  # modes whose `info["transparency"]` PIL turns into an alpha channel
_ORIENTATION_TAG = 0x0112
_BASE64_RE = re.compile(r"[A-Za-z0-9+/\s]+={0,2}")


# ----------------------------------------------------------------------------------------------------------------
# Limits
# ----------------------------------------------------------------------------------------------------------------


def _env_number(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError as err:
        raise ValueError(f"Environment variable {name}={raw!r} is not a number; set a number or unset it.") from err


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def resolve_image_timeout(timeout: float | None = None) -> float:
    """Seconds to wait for an image URL: `timeout` if given, else `$COMM_VLM_IMAGE_TIMEOUT`, else
    `DEFAULT_IMAGE_TIMEOUT` (10).

    Args:
        timeout (`float`, *optional*): a positive number of seconds.
    """
    if timeout is None:
        timeout = _env_number(IMAGE_TIMEOUT_ENV)
    if timeout is None:
        timeout = DEFAULT_IMAGE_TIMEOUT
    if not _is_real(timeout) or timeout <= 0:
        raise ValueError(
            f"The image URL timeout must be a positive number of seconds, got {timeout!r}; pass e.g. "
            f"image_timeout=30 or set {IMAGE_TIMEOUT_ENV}=30."
        )
    return float(timeout)


def resolve_max_image_pixels(max_image_pixels: int | None = None) -> int | None:
    """Largest `width * height` loaded: `max_image_pixels` if given, else `$COMM_VLM_MAX_IMAGE_PIXELS`, else
    `DEFAULT_MAX_IMAGE_PIXELS`. `0` removes the limit (returns `None`).

    Args:
        max_image_pixels (`int`, *optional*): a non-negative number of pixels.
    """
    limit = max_image_pixels
    if limit is None:
        limit = _env_number(MAX_IMAGE_PIXELS_ENV)
    if limit is None:
        limit = DEFAULT_MAX_IMAGE_PIXELS
    if not _is_real(limit) or limit < 0:
        raise ValueError(
            f"max_image_pixels must be a non-negative number of pixels (0 = no limit), got {limit!r}; pass e.g. "
            f"max_image_pixels=200_000_000 or set {MAX_IMAGE_PIXELS_ENV}=200000000."
        )
    return None if limit == 0 else int(limit)


def _check_pixels(size: tuple[int, int], source: str, limit: int | None) -> None:
    width, height = size
    if limit is not None and width * height > limit:
        memory = f" (about {limit * 3 / 2**30:.2f} GiB as 8-bit RGB)" if limit * 3 >= 2**27 else ""
        raise ValueError(
            f"Image {source} is {width}x{height} = {width * height:,} pixels, above the limit of {limit:,} "
            f"pixels{memory}. Downscale it before loading, or raise the limit: max_image_pixels=... in the processor "
            f"or pipeline call, or {MAX_IMAGE_PIXELS_ENV} in the environment (0 = no limit)."
        )


def _bomb_error(source: str, err: Exception) -> ValueError:
    return ValueError(
        f"Image {source} is too large to decode safely ({err}). Downscale it, or, if you trust it, raise both "
        f"PIL.Image.MAX_IMAGE_PIXELS and max_image_pixels / {MAX_IMAGE_PIXELS_ENV}."
    )


def _decode_error(source: str, err: Exception) -> ValueError:
    return ValueError(
        f"Could not decode image {source} ({err}); it is corrupt, truncated or not an image. Re-download or re-encode "
        "it."
    )


# ----------------------------------------------------------------------------------------------------------------
# Pixel conversion
# ----------------------------------------------------------------------------------------------------------------


def _check_finite(array: np.ndarray, source: str) -> None:
    if not np.isfinite(array).all():
        raise ValueError(
            f"Image {source} has NaN or infinite pixel values; replace them first (e.g. np.nan_to_num(x, nan=0.0, "
            "posinf=1.0, neginf=0.0) for an image in [0, 1])."
        )


def _scale_to_uint8(array: np.ndarray, rule: str, source: str) -> np.ndarray:
    """Maps pixel values to uint8 by `rule` (`"bool"`, `"8bit"`, `"16bit"`, `"int"` or `"float"`; see `load_image`).

    Args:
        array (`np.ndarray` of shape `(height, width)` or `(height, width, channels)`): the values; one range is
            taken over all channels.
        rule (`str`): how the values are scaled.
        source (`str`): the image's name for error messages.
    """
    if rule == "8bit":
        return array.astype(np.uint8, copy=False)
    if rule == "bool":
        return array.astype(np.uint8) * 255
    if rule == "float":
        _check_finite(array, source)
    lo, hi = float(array.min()), float(array.max())
    values = array.astype(np.float64 if array.dtype.itemsize > 4 else np.float32)
    if rule == "16bit":
        scaled = values * (255.0 / 65535.0)
    elif rule == "float" and lo >= 0.0 and hi <= 1.0:
        scaled = values * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = values
    elif rule == "int" and lo >= 0.0 and hi <= 65535.0:
        scaled = values * (255.0 / 65535.0)
    elif hi > lo:
        if rule == "float":
            logger.warning_once(
                f"Image {source} has float values in [{lo:g}, {hi:g}], neither [0, 1] nor [0, 255]: min-max scaled "
                "to 0-255. Pass images in [0, 1] or [0, 255] (not mean/std-normalized) to avoid the guess."
            )
        scaled = (values - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _dtype_rule(dtype: np.dtype, source: str) -> str:
    if dtype == np.bool_:
        return "bool"
    if dtype == np.uint8:
        return "8bit"
    if dtype == np.uint16:
        return "16bit"
    if np.issubdtype(dtype, np.integer):
        return "int"
    if np.issubdtype(dtype, np.floating):
        return "float"
    raise ValueError(f"Image {source} has unsupported dtype {dtype}; pass uint8, uint16, another integer or a float.")


def _upright(image: Image.Image) -> Image.Image:
    """Applies the EXIF orientation tag (phone photos), like `PIL.ImageOps.exif_transpose`; no copy when upright."""
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(image)
    except Exception as err:  # malformed EXIF must not make a readable image unusable
        logger.warning_once(f"Ignoring an unreadable EXIF orientation ({err}); the image is used as stored.")
    return image


def _to_rgb(image: Image.Image, source: str = "in-memory PIL image") -> Image.Image:
    """Upright 8-bit RGB: EXIF orientation applied, alpha composited onto white, high-depth modes scaled."""
    image = _upright(image)
    mode = image.mode
    if mode in _TRANSPARENCY_MODES and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode == "RGB":
        return image
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        rule = "16bit" if mode in _SIXTEEN_BIT_MODES else "float" if mode == "F" else "int"
        return Image.fromarray(_scale_to_uint8(np.asarray(image), rule, source)).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(
            f"Cannot convert image {source} of PIL mode {mode!r} to RGB; convert it to RGB first."
        ) from err


def _channels_last(array: np.ndarray, source: str) -> np.ndarray:
    """`(H, W, C)` from a 3-D array; `(C, H, W)` is assumed when the first axis could be channels (as transformers
    does), 1 or 3 channels before 2 or 4."""
    for channels in ((1, 3), (2, 4)):
        if array.shape[0] in channels:
            return np.moveaxis(array, 0, -1)
        if array.shape[-1] in channels:
            return array
    raise ValueError(
        f"Cannot find the channel axis of image {source} with shape {tuple(array.shape)}; pass (H, W), (H, W, C) or "
        "(C, H, W) with 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA) channels."
    )


def _array_to_rgb(array: np.ndarray | torch.Tensor, limit: int | None) -> Image.Image:
    source = f"{type(array).__name__} of shape {tuple(array.shape)}"
    if isinstance(array, torch.Tensor):
        tensor = array.detach().cpu()
        array = (tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor).numpy()
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        array = _channels_last(array, source)
    else:
        raise ValueError(
            f"Image {source} is {array.ndim}-D; pass one image as (H, W), (H, W, C) or (C, H, W), or several as a "
            "list (the processor also splits a 4-D batch)."
        )
    height, width, channels = array.shape
    if height == 0 or width == 0:
        raise ValueError(f"Image {source} is empty; pass an image with at least one pixel.")
    _check_pixels((width, height), source, limit)
    pixels = np.ascontiguousarray(_scale_to_uint8(array, _dtype_rule(array.dtype, source), source))
    return _to_rgb(Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels), source)


def _open_and_convert(file: str | io.BytesIO, source: str, limit: int | None) -> Image.Image:
    """Opens a file or buffer, checks its size from the header before decoding, decodes and converts it."""
    try:
        with warnings.catch_warnings():  # the pixel limit below replaces PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(file)
    except Image.DecompressionBombError as err:
        raise _bomb_error(source, err) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise _decode_error(source, err) from err
    with opened:
        _check_pixels(opened.size, source, limit)
        try:
            opened.load()
        except Image.DecompressionBombError as err:
            raise _bomb_error(source, err) from err
        except (OSError, SyntaxError, ValueError) as err:
            raise _decode_error(source, err) from err
        converted = _to_rgb(opened, source)
        return converted.copy() if converted is opened else converted


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------


def _fetch_url(url: str, timeout: float) -> bytes:
    """The body of `url`, or an error naming it. `timeout` bounds each wait on the server, and a download still
    running after `timeout` seconds stops at its next chunk."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": "comm-vlm", "Accept": "image/*,*/*;q=0.8"})
    hint = f"Raise the limit with image_timeout=... (processor), timeout=... (pipeline) or {IMAGE_TIMEOUT_ENV}."
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            chunks = []
            while chunk := response.read(1 << 16):
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError("download too slow")
            return b"".join(chunks)
    except urllib.error.HTTPError as err:
        raise ValueError(f"Could not fetch image URL {url!r}: HTTP {err.code} {err.reason}. Check the URL.") from err
    except (TimeoutError, urllib.error.URLError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, TimeoutError):
            raise TimeoutError(f"Image URL {url!r} did not answer within {timeout:g} s ({reason}). {hint}") from err
        raise ConnectionError(f"Could not reach image URL {url!r} ({reason}); check the URL and network.") from err
    except (http.client.HTTPException, OSError) as err:
        raise ConnectionError(f"Could not fetch image URL {url!r} ({err!r}); check the URL and network.") from err


def _decode_base64(text: str, source: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"Image {source} is not valid base64 ({err}); pass base64-encoded image bytes.") from err


def load_image(
    image: str | os.PathLike | Image.Image | np.ndarray | torch.Tensor,
    timeout: float | None = None,
    max_image_pixels: int | None = None,
) -> Image.Image:
    """Opens and converts an image to upright 8-bit RGB, the input every COMM image processor expects.

    Rules (the same for every entry point: processors, chat templates and `pipeline("image-text-to-text")`):

    - Orientation: the EXIF orientation tag is applied (`PIL.ImageOps.exif_transpose`), so phone photos are upright.
    - Modes: `"1"`, `"L"`, `"P"`, `"CMYK"`, `"YCbCr"` are converted with PIL; images with alpha (`"RGBA"`, `"LA"`,
      `"PA"`, or a `transparency` entry) are composited onto white. `"I;16*"` divides by 65535; `"I"` keeps values
      in [0, 255], divides by 65535 when they lie in [0, 65535] and min-max scales otherwise; `"F"` follows the float
      rule.
    - Arrays and tensors: `(H, W)` is grayscale; `(H, W, C)` or `(C, H, W)` with C in 1-4 (gray, gray + alpha, RGB,
      RGBA; `(C, H, W)` when the first axis could be channels). One range is taken over all channels: bool is
      0/255; uint8 is kept; uint16 divides by 65535; other integers follow `"I"`. Floats in [0, 1] are taken as
      already scaled and multiplied by 255, floats in [0, 255] are kept, other ranges are min-max scaled (with a
      warning); all are rounded to uint8, so `x / 255` of a uint8 image gives exactly that image's pixels.
      NaN or infinite values are refused.
    - URLs (`http(s)://`) are fetched with a timeout (`timeout`, else `$COMM_VLM_IMAGE_TIMEOUT`, else 10 s);
      `data:image/...;base64,` URIs and base64 strings (when no such file exists) are decoded.
    - Size: images above `max_image_pixels` (else `$COMM_VLM_MAX_IMAGE_PIXELS`, else 89,478,485, PIL's default
      decompression-bomb limit; 0 = no limit) are refused, files and downloads from their header before decoding.

    Args:
        image (`str`, `os.PathLike`, `PIL.Image.Image`, `np.ndarray` or `torch.Tensor`):
            A local file path, an `http(s)://` URL, a data URI or base64 string, a PIL image, or an array / tensor
            of shape `(H, W)`, `(H, W, C)` or `(C, H, W)`.
        timeout (`float`, *optional*): seconds to wait for a URL's server (each wait, and the whole download).
        max_image_pixels (`int`, *optional*): largest `width * height` accepted; `0` for no limit.

    Returns:
        `PIL.Image.Image` in mode `"RGB"` (an RGB PIL image without EXIF rotation is returned as is).

    Raises:
        FileNotFoundError: the path does not exist.
        TimeoutError: a URL did not answer in time (the URL is named).
        ConnectionError: a URL could not be reached.
        ValueError: a corrupt or truncated file (named), an HTTP error, NaN/inf pixels, an image above the pixel
            limit, an unsupported mode, dtype or shape.
    """
    limit = resolve_max_image_pixels(max_image_pixels)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return _array_to_rgb(image, limit)
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        data = _fetch_url(image, resolve_image_timeout(timeout))
        return _open_and_convert(io.BytesIO(data), f"from URL {image!r}", limit)
    if isinstance(image, str) and image.startswith("data:image/"):
        payload = _decode_base64(image.partition(",")[2], "data URI")
        return _open_and_convert(io.BytesIO(payload), f"data URI {image[:40]!r}...", limit)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            if isinstance(path, str) and len(path) >= 64 and _BASE64_RE.fullmatch(path):
                payload = _decode_base64(path, "base64 string (no file of that name exists)")
                return _open_and_convert(io.BytesIO(payload), "base64 string (no file of that name exists)", limit)
            raise FileNotFoundError(f"Image file not found: {path!r}. Check the path.")
        return _open_and_convert(path, f"file {path!r}", limit)
    if isinstance(image, Image.Image):
        filename = getattr(image, "filename", "")
        source = f"file {filename!r}" if filename else "in-memory PIL image"
        _check_pixels(image.size, source, limit)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as err:
            raise _decode_error(source, err) from err
        return _to_rgb(image, source)
    raise TypeError(
        f"Unsupported image type {type(image).__name__}; pass a file path, URL, PIL image, numpy array or tensor."
    )


def load_images(images: Any, timeout: float | None = None, max_image_pixels: int | None = None) -> Any:
    """Applies `load_image` through (nested) lists of images, keeping the nesting; a 4-D array or tensor (a batch,
    `(N, ...)`) becomes a list of N images.

    Args:
        images: an image, or (nested) lists of images, as `load_image` takes them.
        timeout (`float`, *optional*): see `load_image`.
        max_image_pixels (`int`, *optional*): see `load_image`.
    """
    if isinstance(images, (list, tuple)):
        return [load_images(item, timeout, max_image_pixels) for item in images]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return [load_image(item, timeout, max_image_pixels) for item in images]
    return load_image(images, timeout, max_image_pixels)


# ----------------------------------------------------------------------------------------------------------------
# pipeline("image-text-to-text")
# ----------------------------------------------------------------------------------------------------------------


def install_pipeline_image_loading() -> None:
    """Makes `pipeline("image-text-to-text")` load images with the processor's own `load_images`.

    The pipeline's plain-prompt form (`pipe(images=..., text="...")`) opens images with `transformers.image_utils
    .load_image` before the processor sees them: no timeout unless `timeout=` is passed, and alpha, 16-bit and
    array inputs converted differently. This wraps `ImageTextToTextPipeline.preprocess` once per interpreter so that,
    for processors with `handles_image_loading = True` only, images are loaded by `processor.load_images` (with the
    pipeline's `timeout`) before the pipeline's own loading, which then leaves the RGB images unchanged. In chat mode,
    which the processor already loads, the pipeline's `timeout` is handed to the processor as `image_timeout`.
    `image_timeout` and `max_image_pixels` may also be passed to the pipeline call or in its `processor_kwargs`.
    Other processors keep the pipeline's behaviour.
    """
    try:
        from transformers.pipelines import image_text_to_text
    except ImportError:  # vision extras missing: there is no pipeline to route
        return
    pipeline_class = image_text_to_text.ImageTextToTextPipeline
    original = pipeline_class.preprocess
    if getattr(original, "_routes_images_to_processor", False):
        return

    @functools.wraps(original)
    def preprocess(self, inputs=None, timeout=None, continue_final_message=None, **processing_kwargs):
        processor = getattr(self, "processor", None)
        if getattr(processor, "handles_image_loading", False):
            if isinstance(inputs, dict) and inputs.get("images") is not None:
                options = {**processing_kwargs, **(processing_kwargs.get("processor_kwargs") or {})}
                images = processor.load_images(
                    inputs["images"],
                    image_timeout=timeout if timeout is not None else options.get("image_timeout"),
                    max_image_pixels=options.get("max_image_pixels"),
                )
                inputs = {**inputs, "images": images}
            elif isinstance(inputs, image_text_to_text.Chat) and timeout is not None:
                extra = processing_kwargs.get("processor_kwargs") or {}
                processing_kwargs["processor_kwargs"] = {"image_timeout": timeout, **extra}
        return original(
            self, inputs, timeout=timeout, continue_final_message=continue_final_message, **processing_kwargs
        )

    preprocess._routes_images_to_processor = True
    pipeline_class.preprocess = preprocess


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


__all__ = [
    "DEFAULT_IMAGE_TIMEOUT",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "BoxParseResult",
    "denormalize_box",
    "format_box",
    "install_pipeline_image_loading",
    "load_image",
    "load_images",
    "normalize_box",
    "parse_boxes",
    "resolve_image_timeout",
    "resolve_max_image_pixels",
]
