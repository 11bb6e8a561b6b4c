"""One image-loading path for every entry point: the processor, `generate` on its outputs, and both forms of
`pipeline("image-text-to-text")` (chat messages and plain prompts) give the same `pixel_values` for the same input.

Covers EXIF orientation, alpha / palette / CMYK / 1-bit / 16-bit modes, float and 2-D arrays, NaN/inf, URL timeouts
(a local server that accepts and never answers) and the pixel limit; a property-based test draws modes, sizes,
dtypes and orientations.
"""

import base64
import io
import re
import socket
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from transformers import pipeline

from comm_vlm.models import image_utils
from comm_vlm.models.image_utils import (
    IMAGE_TIMEOUT_ENV,
    MAX_IMAGE_PIXELS_ENV,
    install_pipeline_image_loading,
    load_image,
    load_images,
)
from comm_vlm.testing import build_tiny_checkpoint


PROMPT = "USER: <image>\nWhat is this? ASSISTANT:"
ENTRY_POINTS = ("processor", "generate", "chat", "plain")


class EntryPoints:
    """The four ways a user hands an image to a model; each returns the `pixel_values` the model receives."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.pipe = pipeline("image-text-to-text", model=model, processor=processor)
        self.seen: list[torch.Tensor] = []
        original = model.generate

        def generate(*args, **kwargs):  # records what reaches the model, then generates for real
            self.seen.append(kwargs["pixel_values"])
            return original(*args, **kwargs)

        model.generate = generate

    def pixels(self, entry: str, image, **kwargs) -> torch.Tensor:
        if entry == "processor":
            return self.processor(images=image, text=PROMPT, return_tensors="pt", **kwargs)["pixel_values"]
        self.seen.clear()
        if entry == "generate":
            inputs = self.processor(images=image, text=PROMPT, return_tensors="pt", **kwargs)
            self.model.generate(**inputs, max_new_tokens=1, do_sample=False)
        elif entry == "chat":
            key = "url" if isinstance(image, str) and image.startswith("http") else "image"
            content = [{"type": "image", key: image}, {"type": "text", "text": "What is this?"}]
            self.pipe(text=[{"role": "user", "content": content}], max_new_tokens=1, **kwargs)
        else:
            self.pipe(images=image, text=PROMPT, max_new_tokens=1, **kwargs)
        assert len(self.seen) == 1
        return self.seen[0]

    def all_pixels(self, image) -> dict[str, torch.Tensor]:
        return {entry: self.pixels(entry, image) for entry in ENTRY_POINTS}

    def reference(self, rgb: Image.Image) -> torch.Tensor:
        """What the processor gives for an image that is already upright 8-bit RGB."""
        assert rgb.mode == "RGB"
        return self.processor(images=rgb, text=PROMPT, return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="module")
def entries(tmp_path_factory) -> EntryPoints:
    model, processor = build_tiny_checkpoint(tmp_path_factory.mktemp("comm"), family="comm")
    return EntryPoints(model, processor)


def assert_all_equal(pixels: dict[str, torch.Tensor], expected: torch.Tensor, context: str = "") -> None:
    for entry, values in pixels.items():
        assert values.shape == expected.shape, f"{context}: {entry}"
        difference = (values.float() - expected.float()).abs().max()
        assert torch.equal(values.float(), expected.float()), f"{context}: {entry} differs by {difference}"


# --------------------------------------------------------------------------------------------------------------
# URLs: a server that accepts the connection and never answers
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def stalled_url():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []

    def accept_and_hold():
        while True:
            try:
                connection, _ = server.accept()
            except OSError:  # the listening socket was closed
                return
            held.append(connection)

    threading.Thread(target=accept_and_hold, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/photo.jpg"
    server.close()
    for connection in held:
        connection.close()


def run_bounded(call, limit_s: float = 20.0) -> tuple[BaseException | None, float]:
    """Runs `call` in a thread; fails the test (instead of hanging it) when it takes longer than `limit_s`."""
    outcome: dict = {}

    def target():
        start = time.monotonic()
        try:
            call()
        except BaseException as err:  # handed back to the test
            outcome["error"] = err
        outcome["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"still blocked after {limit_s} s"
    return outcome.get("error"), outcome["seconds"]


@pytest.mark.parametrize("entry", ["processor", "chat", "plain"])
@pytest.mark.parametrize("set_by", ["call", "environment", "module default"])
def test_stalled_url_times_out_naming_the_url(entries, stalled_url, entry, set_by, monkeypatch):
    kwargs = {}
    if set_by == "call":
        kwargs = {"image_timeout": 0.5} if entry == "processor" else {"timeout": 0.5}
    elif set_by == "environment":
        monkeypatch.setenv(IMAGE_TIMEOUT_ENV, "0.5")
    else:
        monkeypatch.delenv(IMAGE_TIMEOUT_ENV, raising=False)
        monkeypatch.setattr(image_utils, "DEFAULT_IMAGE_TIMEOUT", 0.5)
    error, seconds = run_bounded(lambda: entries.pixels(entry, stalled_url, **kwargs))
    assert isinstance(error, TimeoutError), error
    assert stalled_url in str(error) and IMAGE_TIMEOUT_ENV in str(error)
    assert 0.4 < seconds < 5


def test_chat_pipeline_takes_the_timeout_as_a_processor_kwarg(entries, stalled_url):
    content = [{"type": "image", "url": stalled_url}, {"type": "text", "text": "Hi"}]
    call = lambda: entries.pipe(  # noqa: E731
        text=[{"role": "user", "content": content}], max_new_tokens=1, processor_kwargs={"image_timeout": 0.5}
    )
    error, seconds = run_bounded(call)
    assert isinstance(error, TimeoutError) and stalled_url in str(error) and seconds < 5


def test_default_url_timeout_is_bounded_and_configurable(monkeypatch):
    monkeypatch.delenv(IMAGE_TIMEOUT_ENV, raising=False)
    assert image_utils.resolve_image_timeout() == image_utils.DEFAULT_IMAGE_TIMEOUT == 10.0
    monkeypatch.setenv(IMAGE_TIMEOUT_ENV, "3")
    assert image_utils.resolve_image_timeout() == 3.0
    assert image_utils.resolve_image_timeout(1.5) == 1.5
    for bad in (0, -1, float("inf"), "10"):
        with pytest.raises(ValueError, match="positive number of seconds"):
            image_utils.resolve_image_timeout(bad)
    monkeypatch.setenv(IMAGE_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=IMAGE_TIMEOUT_ENV):
        image_utils.resolve_image_timeout()


def test_unreachable_url_names_the_url():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{server.getsockname()[1]}/gone.png"
    server.close()  # nothing listens: connection refused
    with pytest.raises(ConnectionError, match=re.escape(url)):
        load_image(url, timeout=2)


# --------------------------------------------------------------------------------------------------------------
# EXIF orientation
# --------------------------------------------------------------------------------------------------------------


def asymmetric_rgb(width: int = 40, height: int = 24, seed: int = 0) -> Image.Image:
    """An image no flip or rotation maps onto itself (random pixels, a bright corner)."""
    pixels = np.random.default_rng(seed).integers(0, 200, (height, width, 3), dtype=np.uint8)
    pixels[: height // 3, : width // 3] = 255
    return Image.fromarray(pixels)


def save_with_orientation(image: Image.Image, path: Path, orientation: int, **save_kwargs) -> Path:
    if orientation == 1:
        image.save(path, **save_kwargs)
        return path
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes(), **save_kwargs)
    return path


@pytest.mark.parametrize("family", ["comm", "matryoshka_llava", "adaptive_combiner"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpeg_is_upright_through_every_entry_point(family, orientation, tmp_path):
    model, processor = build_tiny_checkpoint(tmp_path / "ckpt", family=family)
    entries = EntryPoints(model, processor)
    path = save_with_orientation(asymmetric_rgb(), tmp_path / "phone.jpg", orientation, quality=95)
    with Image.open(path) as stored:
        upright = ImageOps.exif_transpose(stored).convert("RGB")
        sideways = Image.fromarray(np.asarray(stored.convert("RGB")))  # the stored pixels, without the tag
    expected = entries.reference(upright)
    assert not torch.equal(expected, entries.reference(sideways))  # the orientation matters for these pixels
    assert_all_equal(entries.all_pixels(str(path)), expected)
    with Image.open(path) as lazily_opened:
        assert_all_equal({"processor, opened": entries.pixels("processor", lazily_opened)}, expected)


def test_exif_transpose_applies_to_in_memory_images_and_is_idempotent():
    source = asymmetric_rgb(30, 20)
    with io.BytesIO() as buffer:
        save_with_orientation(source, buffer, 6, format="PNG")
        buffer.seek(0)
        with Image.open(buffer) as opened:
            opened.load()
            first = load_image(opened)
    assert first.size == (20, 30)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(source.transpose(Image.Transpose.ROTATE_270)))
    assert np.array_equal(np.asarray(load_image(first)), np.asarray(first))  # the tag is gone: no second turn


# --------------------------------------------------------------------------------------------------------------
# Floats and integer arrays: the uint8 image's pixels, no second rescale
# --------------------------------------------------------------------------------------------------------------


def uint8_pixels(seed: int = 1, height: int = 30, width: int = 38) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


ARRAY_FORMS = {
    "numpy float32 [0,1] HWC": lambda u8: u8.astype(np.float32) / 255,
    "numpy float64 [0,1] CHW": lambda u8: (u8.astype(np.float64) / 255).transpose(2, 0, 1),
    "numpy float32 [0,255] HWC": lambda u8: u8.astype(np.float32),
    "numpy uint16 HWC": lambda u8: u8.astype(np.uint16) * 257,
    "numpy uint8 CHW": lambda u8: u8.transpose(2, 0, 1).copy(),
    "torch float32 [0,1] CHW": lambda u8: torch.from_numpy(u8).permute(2, 0, 1).float() / 255,
    "torch float16 [0,1] CHW": lambda u8: (torch.from_numpy(u8).permute(2, 0, 1).float() / 255).half(),
    "torch float32 [0,1] HWC": lambda u8: torch.from_numpy(u8).float() / 255,
    "torch uint8 CHW": lambda u8: torch.from_numpy(u8).permute(2, 0, 1).contiguous(),
}


@pytest.mark.parametrize("form", list(ARRAY_FORMS))
def test_float_and_integer_arrays_give_the_uint8_images_pixels(entries, form):
    u8 = uint8_pixels()
    expected = entries.reference(Image.fromarray(u8))
    assert_all_equal(entries.all_pixels(ARRAY_FORMS[form](u8)), expected)


def test_float_rule_is_documented_behaviour():
    assert load_image(np.full((6, 6), 0.5, np.float32)).getpixel((0, 0)) == (128, 128, 128)  # [0, 1]: times 255
    assert load_image(np.full((6, 6), 200.0, np.float32)).getpixel((0, 0)) == (200, 200, 200)  # [0, 255]: kept
    ramp = load_image(np.array([[-1.0, 0.0, 3.0]] * 6, np.float32))  # other ranges: min-max
    assert [ramp.getpixel((x, 0))[0] for x in range(3)] == [0, 64, 255]


def test_four_d_batch_becomes_a_list_of_images(entries):
    batch = np.stack([uint8_pixels(2), uint8_pixels(3)])
    loaded = load_images(batch)
    assert [image.size for image in loaded] == [(38, 30), (38, 30)]
    pixels = entries.processor(images=batch, text=[PROMPT, PROMPT], return_tensors="pt")["pixel_values"]
    expected = entries.processor(images=loaded, text=[PROMPT, PROMPT], return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, expected)


# --------------------------------------------------------------------------------------------------------------
# Modes, from files and in memory: every entry point gives the pixels of the expected RGB image
# --------------------------------------------------------------------------------------------------------------


def palette_image(transparent: bool, size=(20, 16)) -> Image.Image:
    image = Image.new("P", size, 0)
    image.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    if transparent:
        image.info["transparency"] = 0
    return image


# (name, file name or None for in-memory, factory, expected RGB color of every pixel)
MODE_CASES = [
    ("RGBA transparent", "rgba.png", lambda: Image.new("RGBA", (20, 16), (255, 0, 0, 0)), (255, 255, 255)),
    ("RGBA opaque", "rgba_opaque.png", lambda: Image.new("RGBA", (20, 16), (0, 90, 0, 255)), (0, 90, 0)),
    ("LA transparent", "la.png", lambda: Image.new("LA", (20, 16), (0, 0)), (255, 255, 255)),
    ("16-bit PNG mid", "sixteen.png", lambda: Image.fromarray(np.full((16, 20), 4369, np.uint16)), (17, 17, 17)),
    ("16-bit PNG max", "sixteen_max.png", lambda: Image.fromarray(np.full((16, 20), 65535, np.uint16)), (255,) * 3),
    ("I 32-bit", "int32.tiff", lambda: Image.fromarray(np.full((16, 20), 100, np.int32)), (100, 100, 100)),
    ("palette", "palette.png", lambda: palette_image(False), (10, 20, 30)),
    ("palette transparent", "palette_t.png", lambda: palette_image(True), (255, 255, 255)),
    ("palette GIF", "palette.gif", lambda: palette_image(False), (10, 20, 30)),
    ("CMYK", "cmyk.tiff", lambda: Image.new("CMYK", (20, 16), (0, 255, 255, 0)), (255, 0, 0)),
    ("1-bit", "one_bit.png", lambda: Image.new("1", (20, 16), 1), (255, 255, 255)),
    ("L", "gray.png", lambda: Image.new("L", (20, 16), 77), (77, 77, 77)),
    ("2-D uint8 array", None, lambda: np.full((16, 20), 77, np.uint8), (77, 77, 77)),
    ("2-D uint16 array", None, lambda: np.full((16, 20), 4369, np.uint16), (17, 17, 17)),
    ("2-D float array", None, lambda: np.full((16, 20), 0.5, np.float32), (128, 128, 128)),
    ("2-D bool array", None, lambda: np.ones((16, 20), bool), (255, 255, 255)),
    ("2-D torch tensor", None, lambda: torch.full((16, 20), 77, dtype=torch.uint8), (77, 77, 77)),
    ("HW1 array", None, lambda: np.full((16, 20, 1), 77, np.uint8), (77, 77, 77)),
    ("HW4 RGBA array", None, lambda: np.zeros((16, 20, 4), np.uint8), (255, 255, 255)),
]


@pytest.mark.parametrize("name, filename, factory, color", MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_modes_give_the_same_pixels_through_every_entry_point(entries, tmp_path, name, filename, factory, color):
    source = factory()
    if filename is not None:
        path = tmp_path / filename
        source.save(path)
        source = str(path)
    expected = entries.reference(Image.new("RGB", (20, 16), color))
    assert_all_equal(entries.all_pixels(source), expected)


def test_sixteen_bit_png_is_not_clipped_white(entries, tmp_path):
    path = tmp_path / "gradient16.png"
    Image.fromarray(np.tile(np.linspace(0, 65535, 20).astype(np.uint16), (16, 1))).save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")
    converted = np.asarray(load_image(path))[0, :, 0]
    np.testing.assert_array_equal(converted, np.rint(np.linspace(0, 255, 20)).astype(np.uint8))


# --------------------------------------------------------------------------------------------------------------
# Refused inputs: NaN / inf, corrupt files, too large
# --------------------------------------------------------------------------------------------------------------


NON_FINITE = {
    "numpy NaN": lambda tmp: np.full((16, 20, 3), np.nan, np.float32),
    "numpy +inf": lambda tmp: np.full((16, 20), np.inf, np.float32),
    "numpy -inf in one pixel": lambda tmp: np.where(np.eye(16, 20, dtype=bool), -np.inf, 0.5)[..., None],
    "torch NaN": lambda tmp: torch.full((3, 16, 20), float("nan")),
    "PIL F NaN": lambda tmp: Image.fromarray(np.full((16, 20), np.nan, np.float32)),
    "TIFF F NaN": lambda tmp: save_and_name(Image.fromarray(np.full((16, 20), np.nan, np.float32)), tmp / "nan.tiff"),
}


def save_and_name(image: Image.Image, path: Path) -> str:
    image.save(path)
    return str(path)


@pytest.mark.parametrize("entry", ["processor", "chat", "plain"])
@pytest.mark.parametrize("name", list(NON_FINITE))
def test_nan_and_inf_are_refused(entries, tmp_path, name, entry):
    with pytest.raises(ValueError, match="NaN or infinite pixel values; replace them"):
        entries.pixels(entry, NON_FINITE[name](tmp_path))


@pytest.mark.parametrize("entry", ["processor", "chat", "plain"])
def test_corrupt_file_is_named_through_every_entry_point(entries, tmp_path, entry):
    path = tmp_path / "truncated.png"
    buffer = io.BytesIO()
    asymmetric_rgb().save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[:100])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        entries.pixels(entry, str(path))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares `width` x `height` RGB pixels but holds none: decoding it would need the memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("entry", ["processor", "chat", "plain"])
@pytest.mark.parametrize("side", [10_000, 100_000])  # above our limit; above PIL's decompression-bomb error
def test_huge_image_is_refused_before_decoding(entries, tmp_path, entry, side):
    path = png_header_only(tmp_path / "huge.png", side, side)
    start = time.monotonic()
    with pytest.raises(ValueError, match=re.escape(str(path))) as excinfo:
        entries.pixels(entry, str(path))
    assert time.monotonic() - start < 5
    assert MAX_IMAGE_PIXELS_ENV in str(excinfo.value)


def test_pixel_limit_is_configurable(entries, tmp_path, monkeypatch):
    image = asymmetric_rgb(40, 24)
    path = tmp_path / "small.png"
    image.save(path)
    monkeypatch.delenv(MAX_IMAGE_PIXELS_ENV, raising=False)
    assert image_utils.resolve_max_image_pixels() == image_utils.DEFAULT_MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS
    for source in (str(path), image, np.asarray(image), torch.from_numpy(np.asarray(image).copy())):
        with pytest.raises(ValueError, match=r"40x24 = 960 pixels, above the limit of 900"):
            load_image(source, max_image_pixels=900)
    with pytest.raises(ValueError, match="above the limit"):
        entries.processor(images=image, text=PROMPT, max_image_pixels=900)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "900")
    with pytest.raises(ValueError, match="above the limit"):
        entries.pixels("plain", str(path))
    assert load_image(path, max_image_pixels=960).size == (40, 24)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "0")  # no limit
    assert image_utils.resolve_max_image_pixels() is None
    assert load_image(path).size == (40, 24)


def test_pipeline_takes_the_image_options_as_call_or_processor_kwargs(entries, tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    asymmetric_rgb(40, 24).save(path)
    content = [{"type": "image", "image": str(path)}, {"type": "text", "text": "Hi"}]
    chat = [{"role": "user", "content": content}]
    with pytest.raises(ValueError, match="above the limit of 900"):
        entries.pipe(images=str(path), text=PROMPT, max_new_tokens=1, max_image_pixels=900)
    with pytest.raises(ValueError, match="above the limit of 900"):
        entries.pipe(text=chat, max_new_tokens=1, processor_kwargs={"max_image_pixels": 900})
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "900")  # a call that raises the limit wins over the environment
    entries.pipe(images=str(path), text=PROMPT, max_new_tokens=1, max_image_pixels=960)
    entries.pipe(images=str(path), text=PROMPT, max_new_tokens=1, processor_kwargs={"max_image_pixels": 960})
    entries.pipe(text=chat, max_new_tokens=1, processor_kwargs={"max_image_pixels": 960})


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((2, 3, 8, 8, 3), np.uint8), "is 5-D"),
        (np.zeros((8, 8, 7), np.uint8), "Cannot find the channel axis"),
        (np.zeros((0, 8), np.uint8), "is empty"),
        (np.zeros((8, 8), np.complex64), "unsupported dtype"),
    ],
)
def test_unusable_arrays_say_how_to_fix(array, message):
    with pytest.raises(ValueError, match=message):
        load_image(array)


def test_data_uri_and_base64_strings(entries):
    buffer = io.BytesIO()
    asymmetric_rgb().save(buffer, "PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    expected = entries.reference(asymmetric_rgb())
    for source in (f"data:image/png;base64,{encoded}", encoded):
        assert_all_equal({"processor": entries.pixels("processor", source)}, expected)


def test_pipeline_routing_is_installed_once():
    from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline

    before = ImageTextToTextPipeline.preprocess
    install_pipeline_image_loading()
    assert ImageTextToTextPipeline.preprocess is before
    assert getattr(before, "_routes_images_to_processor", False)
    assert not getattr(before.__wrapped__, "_routes_images_to_processor", False)


# --------------------------------------------------------------------------------------------------------------
# Property: every entry point gives the same pixel_values, whatever the mode, size, dtype or orientation
# --------------------------------------------------------------------------------------------------------------

PIL_MODES = ["RGB", "RGBA", "L", "LA", "P", "P+transparency", "1", "CMYK", "I;16", "I", "F"]
FILE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tiff"}
SAVABLE = {  # modes each format writes back unchanged enough to reopen
    "PNG": {"RGB", "RGBA", "L", "LA", "P", "P+transparency", "1", "I;16"},
    "JPEG": {"RGB", "L", "CMYK"},
    "TIFF": {"RGB", "RGBA", "L", "1", "CMYK", "I;16", "I", "F"},
}
ARRAY_DTYPES = ["uint8", "uint16", "float32 [0,1]", "float64 [0,255]", "bool", "int32"]


def pil_image(u8: np.ndarray, mode: str) -> Image.Image:
    """A PIL image of `mode` made from `(H, W, 4)` uint8 values."""
    rgb, alpha, gray = u8[..., :3], u8[..., 3], u8[..., 0]
    if mode == "RGB":
        return Image.fromarray(rgb)
    if mode == "RGBA":
        return Image.fromarray(u8)
    if mode == "L":
        return Image.fromarray(gray)
    if mode == "LA":
        return Image.fromarray(np.stack([gray, alpha], -1))
    if mode in ("P", "P+transparency"):
        image = Image.fromarray(rgb).quantize(16)
        if mode == "P+transparency":
            image.info["transparency"] = 0
        return image
    if mode == "1":
        return Image.fromarray(gray > 127)
    if mode == "CMYK":
        return Image.fromarray(rgb).convert("CMYK")
    if mode == "I;16":
        return Image.fromarray(gray.astype(np.uint16) * 257)
    if mode == "I":
        return Image.fromarray(gray.astype(np.int32) * 100 - 5000)
    return Image.fromarray(gray.astype(np.float32) / 255)


def array_image(u8: np.ndarray, dtype: str, channels: int, layout: str, as_tensor: bool):
    values = u8[..., :channels] if channels > 1 else u8[..., 0]
    converted = {
        "uint8": lambda v: v,
        "uint16": lambda v: v.astype(np.uint16) * 257,
        "float32 [0,1]": lambda v: v.astype(np.float32) / 255,
        "float64 [0,255]": lambda v: v.astype(np.float64),
        "bool": lambda v: v > 127,
        "int32": lambda v: v.astype(np.int32),
    }[dtype](values)
    if converted.ndim == 3 and layout == "CHW":
        converted = np.ascontiguousarray(converted.transpose(2, 0, 1))
    return torch.from_numpy(converted) if as_tensor else converted


@st.composite
def image_inputs(draw):
    """An image input (PIL, file path or array / tensor) with its kind, drawn over modes, sizes, dtypes and EXIF."""
    width, height = draw(st.integers(5, 40)), draw(st.integers(5, 40))
    u8 = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, (height, width, 4), dtype=np.uint8)
    kind = draw(st.sampled_from(["pil", "file", "array"]))
    if kind == "array":
        dtype = draw(st.sampled_from(ARRAY_DTYPES))
        channels = draw(st.sampled_from([1, 2, 3, 4]))
        layout = draw(st.sampled_from(["HWC", "CHW"]))
        as_tensor = draw(st.booleans())
        return f"array {dtype} C={channels} {layout} tensor={as_tensor}", array_image(
            u8, dtype, channels, layout, as_tensor
        )
    mode = draw(st.sampled_from(PIL_MODES))
    if kind == "pil":
        return f"PIL {mode}", pil_image(u8, mode)
    file_format = draw(st.sampled_from(sorted(f for f in FILE_FORMATS if mode in SAVABLE[f])))
    orientation = draw(st.integers(1, 8)) if file_format in ("JPEG", "PNG") else 1
    return f"{file_format} {mode} orientation={orientation}", (pil_image(u8, mode), file_format, orientation)


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=image_inputs())
def test_every_entry_point_gives_the_same_pixel_values(entries, drawn):
    description, image = drawn
    with tempfile.TemporaryDirectory() as directory:
        if isinstance(image, tuple):  # a file: written once, read by every entry point
            source, file_format, orientation = image
            path = Path(directory) / f"image{FILE_FORMATS[file_format]}"
            save_with_orientation(source, path, orientation, format=file_format)
            image = str(path)
        expected = entries.reference(load_image(image))
        pixels = entries.all_pixels(image)
    assert_all_equal(pixels, expected, description)


@settings(max_examples=40, deadline=None, database=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.tuples(st.integers(5, 40), st.integers(5, 40)),
    channels=st.sampled_from([1, 3]),
    layout=st.sampled_from(["HWC", "CHW"]),
    as_tensor=st.booleans(),
)
def test_array_dtypes_of_the_same_picture_load_to_the_same_pixels(seed, size, channels, layout, as_tensor):
    """uint8 `x`, uint16 `257 x`, float `x / 255` and float `x` (in [0, 255]) are one picture: the same RGB pixels."""
    u8 = np.random.default_rng(seed).integers(0, 256, (*size, 4), dtype=np.uint8)
    u8[0, 0, :3], u8[0, 1, :3] = 255, 0  # the [0, 255] float form must exceed 1 somewhere to read as [0, 255]
    loaded = {
        dtype: np.asarray(load_image(array_image(u8, dtype, channels, layout, as_tensor)))
        for dtype in ("uint8", "uint16", "float32 [0,1]", "float64 [0,255]", "int32")
    }
    for dtype, pixels in loaded.items():
        np.testing.assert_array_equal(pixels, loaded["uint8"], err_msg=dtype)
