"""Tests for `comm_vlm.models.processing_comm`: token expansion, save/load, chat template, image conversion, boxes."""

import io
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from transformers import BatchFeature, CLIPImageProcessorPil

from comm_vlm.chat_templates import VICUNA_SYSTEM_PROMPT, vicuna_chat_template
from comm_vlm.models.image_utils import (
    BoxParseResult,
    denormalize_box,
    format_box,
    load_image,
    normalize_box,
    parse_boxes,
)
from comm_vlm.models.processing_comm import CommProcessor
from comm_vlm.testing import build_tiny_tokenizer


IMAGE_TOKEN_ID = 4
PAD_ID = 3
N_TOKENS = 9


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def make_image_processor(**overrides):
    kwargs = {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}}
    kwargs.update(overrides)
    return CLIPImageProcessorPil(**kwargs)


@pytest.fixture
def processor(tokenizer):
    return CommProcessor(image_processor=make_image_processor(), tokenizer=tokenizer, num_image_tokens=N_TOKENS)


def rgb(color=(255, 0, 0), size=(40, 30)):
    return Image.new("RGB", size, color)


def count_image_tokens(input_ids):
    return (input_ids == IMAGE_TOKEN_ID).sum(dim=-1).tolist()


# --------------------------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_size, expected", [(7, 16), (14, 4), (4, 49)])
def test_num_image_tokens_derived_from_patch_size(tokenizer, patch_size, expected):
    processor = CommProcessor(make_image_processor(), tokenizer, patch_size=patch_size)
    assert processor.num_image_tokens == expected


def test_num_image_tokens_derived_from_size_without_crop(tokenizer):
    image_processor = make_image_processor(do_center_crop=False, size={"height": 28, "width": 14})
    assert CommProcessor(image_processor, tokenizer, patch_size=7).num_image_tokens == 8


def test_missing_num_image_tokens_and_patch_size_raises(tokenizer):
    with pytest.raises(ValueError, match="num_image_tokens is None and no patch_size"):
        CommProcessor(make_image_processor(), tokenizer)


def test_num_image_tokens_underivable_from_shortest_edge_raises(tokenizer):
    image_processor = make_image_processor(do_center_crop=False)
    with pytest.raises(ValueError, match="Pass num_image_tokens explicitly"):
        CommProcessor(image_processor, tokenizer, patch_size=7)


@pytest.mark.parametrize("value", [0, -3, 2.5, "576", True])
def test_invalid_num_image_tokens_raises(tokenizer, value):
    with pytest.raises(ValueError, match="num_image_tokens must be a positive integer"):
        CommProcessor(make_image_processor(), tokenizer, num_image_tokens=value)


def test_unknown_image_token_raises(tokenizer):
    with pytest.raises(ValueError, match="is not a single token"):
        CommProcessor(make_image_processor(), tokenizer, num_image_tokens=4, image_token="<img_patch>")


def test_chat_template_defaults_to_tokenizer(processor, tokenizer):
    assert processor.chat_template == tokenizer.chat_template


TURNS = [
    {"role": "user", "content": [{"type": "text", "text": "Is there a cat?"}, {"type": "image"}]},
    {"role": "assistant", "content": "yes"},
]


@pytest.mark.parametrize(
    "system_prompt, messages, expected",
    [
        (VICUNA_SYSTEM_PROMPT, TURNS, f"<s>{VICUNA_SYSTEM_PROMPT} USER: Is there a cat?<image>\n ASSISTANT: yes</s>"),
        ("", TURNS, "<s>USER: Is there a cat?<image>\n ASSISTANT: yes</s>"),
        # Quotes and apostrophes (LLaVA-1.5's full prompt has "human's") are escaped, not the end of the string.
        ('The human\'s "questions".', TURNS[:1], '<s>The human\'s "questions". USER: Is there a cat?<image>\n '),
        # A system message replaces the template's own prompt.
        ("", [{"role": "system", "content": "Be brief."}] + TURNS[:1], "<s>Be brief. USER: Is there a cat?<image>\n "),
    ],
)
def test_vicuna_chat_template_system_prompt(tokenizer, system_prompt, messages, expected):
    template = vicuna_chat_template(system_prompt)
    assert tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False) == expected
    generation = tokenizer.apply_chat_template(
        messages[:-1] if messages[-1]["role"] == "assistant" else messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert generation.endswith(" ASSISTANT:")


# --------------------------------------------------------------------------------------------------------------
# Token expansion
# --------------------------------------------------------------------------------------------------------------


def test_single_image_expands_to_num_image_tokens(processor, tokenizer):
    out = processor(images=rgb(), text="<image>\nWhat is in the image?", return_tensors="pt")
    assert isinstance(out, BatchFeature)
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values"}
    assert count_image_tokens(out["input_ids"]) == [N_TOKENS]
    assert out["pixel_values"].shape == (1, 3, 28, 28)
    ids = out["input_ids"][0].tolist()
    first = ids.index(IMAGE_TOKEN_ID)
    assert ids[first : first + N_TOKENS] == [IMAGE_TOKEN_ID] * N_TOKENS
    text_ids = tokenizer("\nWhat is in the image?", add_special_tokens=False)["input_ids"]
    assert ids[first + N_TOKENS :] == text_ids


def test_two_images_in_one_prompt(processor):
    out = processor(images=[rgb(), rgb((0, 0, 255))], text="<image> and <image>: same?", return_tensors="pt")
    assert count_image_tokens(out["input_ids"]) == [2 * N_TOKENS]
    assert out["pixel_values"].shape == (2, 3, 28, 28)
    assert not torch.equal(out["pixel_values"][0], out["pixel_values"][1])


def test_batch_of_two_prompts_with_padding(processor):
    texts = ["<image> short", "<image> then <image> and a much longer question about the image?"]
    out = processor(images=[[rgb()], [rgb(), rgb()]], text=texts, padding=True, return_tensors="pt")
    assert count_image_tokens(out["input_ids"]) == [N_TOKENS, 2 * N_TOKENS]
    assert out["pixel_values"].shape == (3, 3, 28, 28)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[1].all() and not mask[0].all()
    assert (ids[mask == 0] == PAD_ID).all()
    assert mask[0, 0] == 0  # the tiny tokenizer pads on the left, as generation needs


@pytest.mark.parametrize(
    "text, n_images, message",
    [
        ("<image> <image> two placeholders", 1, "Found total 2 <image> tokens and 1 images"),
        ("<image> one placeholder", 2, "Found total 1 <image> tokens and 2 images"),
        ("no placeholder", 1, "Found total 0 <image> tokens and 1 images"),
        ("<image> but no image", 0, "Found 1 <image> tokens in the text but no images"),
    ],
)
def test_placeholder_image_count_mismatch_raises(processor, text, n_images, message):
    images = [rgb() for _ in range(n_images)] or None
    with pytest.raises(ValueError, match=re.escape(message)):
        processor(images=images, text=text)


def test_num_multimodal_tokens(processor):
    data = processor._get_num_multimodal_tokens(image_sizes=[[336, 336], [100, 480]])
    assert data.num_image_tokens == [N_TOKENS, N_TOKENS]
    assert data.num_image_patches == [1, 1]
    assert processor._get_num_multimodal_tokens().num_image_tokens is None


# --------------------------------------------------------------------------------------------------------------
# Save / load and chat template
# --------------------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["num_image_tokens"] == N_TOKENS
    assert config["image_token"] == "<image>"

    loaded = CommProcessor.from_pretrained(tmp_path)
    assert loaded.num_image_tokens == N_TOKENS
    assert loaded.image_token_id == IMAGE_TOKEN_ID
    assert loaded.chat_template == processor.chat_template
    assert loaded.image_processor.crop_size == processor.image_processor.crop_size

    kwargs = {"images": [rgb(), rgb((0, 255, 0))], "text": ["<image> a", "b <image> c"], "padding": True}
    expected, actual = processor(**kwargs, return_tensors="pt"), loaded(**kwargs, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(expected[key], actual[key]), key


def test_from_pretrained_override(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert CommProcessor.from_pretrained(tmp_path, num_image_tokens=5).num_image_tokens == 5


def test_apply_chat_template_then_call(processor):
    image = rgb((10, 200, 30))
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt.count("<image>") == 1 and prompt.endswith("ASSISTANT:")
    out = processor(images=image, text=prompt, return_tensors="pt")
    assert count_image_tokens(out["input_ids"]) == [N_TOKENS]

    conversation[0]["content"][0] = {"type": "image", "image": image}
    direct = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert torch.equal(direct["input_ids"], out["input_ids"])
    assert torch.equal(direct["pixel_values"], out["pixel_values"])


def test_processor_accepts_paths_and_converts_modes(processor, tmp_path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (30, 30), (255, 0, 0, 0)).save(path)
    from_path = processor(images=str(path), text="<image>", return_tensors="pt")
    from_pathlib = processor(images=path, text="<image>", return_tensors="pt")
    reference = processor(images=rgb((255, 255, 255), (30, 30)), text="<image>", return_tensors="pt")
    assert torch.allclose(from_path["pixel_values"], reference["pixel_values"])
    assert torch.allclose(from_pathlib["pixel_values"], reference["pixel_values"])


def test_box_helpers_exposed_on_processor(processor):
    assert processor.format_box((0.1, 0.2, 0.3, 0.4)) == "[0.100,0.200,0.300,0.400]"
    assert processor.parse_boxes("[0.1,0.2,0.3,0.4]").boxes == [(0.1, 0.2, 0.3, 0.4)]


# --------------------------------------------------------------------------------------------------------------
# Image conversion
# --------------------------------------------------------------------------------------------------------------


def _palette_image(transparent: bool, size=(4, 4)) -> Image.Image:
    image = Image.new("P", size, 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    if transparent:
        image.info["transparency"] = 1
    return image


def _array_image(values, mode=None):
    return Image.fromarray(np.asarray(values), mode=mode) if mode else Image.fromarray(np.asarray(values))


# (name, factory, expected RGB of pixel (0, 0), tolerance)
IMAGE_CASES = [
    ("RGB", lambda: Image.new("RGB", (4, 4), (1, 2, 3)), (1, 2, 3), 0),
    ("1", lambda: Image.new("1", (4, 4), 1), (255, 255, 255), 0),
    ("L", lambda: Image.new("L", (4, 4), 128), (128, 128, 128), 0),
    ("LA-transparent", lambda: Image.new("LA", (4, 4), (0, 0)), (255, 255, 255), 0),
    ("LA-opaque", lambda: Image.new("LA", (4, 4), (40, 255)), (40, 40, 40), 0),
    ("RGBA-transparent", lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255), 0),
    ("RGBA-opaque", lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 255)), (255, 0, 0), 0),
    ("RGBA-half", lambda: Image.new("RGBA", (4, 4), (0, 0, 0, 128)), (127, 127, 127), 1),
    ("PA-transparent", lambda: Image.new("PA", (4, 4), (0, 0)), (255, 255, 255), 0),
    ("P", lambda: _palette_image(False), (10, 20, 30), 0),
    ("P-transparency", lambda: _palette_image(True), (255, 255, 255), 0),
    ("I;16-max", lambda: _array_image(np.full((4, 4), 65535, np.uint16)), (255, 255, 255), 0),
    ("I;16-mid", lambda: _array_image(np.full((4, 4), 32768, np.uint16)), (128, 128, 128), 0),
    ("I;16-zero", lambda: _array_image(np.zeros((4, 4), np.uint16)), (0, 0, 0), 0),
    ("I;16B", lambda: Image.new("I;16B", (4, 4), 65535), (255, 255, 255), 0),
    ("I-16bit-range", lambda: _array_image(np.full((4, 4), 65535, np.int32)), (255, 255, 255), 0),
    ("I-8bit-range", lambda: _array_image(np.full((4, 4), 100, np.int32)), (100, 100, 100), 0),
    ("I-wide-range", lambda: _array_image(np.array([[-1000, 1000]] * 2, np.int32)), (0, 0, 0), 0),
    ("F-unit", lambda: _array_image(np.full((4, 4), 0.5, np.float32)), (128, 128, 128), 0),
    ("F-255", lambda: _array_image(np.full((4, 4), 200.0, np.float32)), (200, 200, 200), 0),
    ("CMYK", lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0), 0),
]


def _assert_rgb(image, expected, tolerance):
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    pixel = image.getpixel((0, 0))
    assert all(abs(a - b) <= tolerance for a, b in zip(pixel, expected)), (pixel, expected)


@pytest.mark.parametrize("name, factory, expected, tolerance", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_load_image_in_memory_modes(name, factory, expected, tolerance):
    source = factory()
    converted = load_image(source)
    assert converted.size == source.size
    _assert_rgb(converted, expected, tolerance)


def test_load_image_wide_range_is_min_max_scaled():
    converted = load_image(_array_image(np.array([[-1000, 1000]] * 2, np.int32)))
    assert converted.getpixel((0, 0)) == (0, 0, 0) and converted.getpixel((1, 0)) == (255, 255, 255)


# (file name, factory, expected RGB, tolerance); the format follows the extension.
FILE_CASES = [
    ("gray.png", lambda: Image.new("L", (8, 8), 77), (77, 77, 77), 0),
    ("gray_alpha.png", lambda: Image.new("LA", (8, 8), (0, 0)), (255, 255, 255), 0),
    ("rgba.png", lambda: Image.new("RGBA", (8, 8), (0, 0, 255, 0)), (255, 255, 255), 0),
    ("palette.png", lambda: _palette_image(False, (8, 8)), (10, 20, 30), 0),
    ("palette_transparent.png", lambda: _palette_image(True, (8, 8)), (255, 255, 255), 0),
    ("palette.gif", lambda: _palette_image(False, (8, 8)), (10, 20, 30), 0),
    ("sixteen_bit.png", lambda: _array_image(np.full((8, 8), 65535, np.uint16)), (255, 255, 255), 0),
    ("sixteen_bit_mid.png", lambda: _array_image(np.full((8, 8), 4369, np.uint16)), (17, 17, 17), 0),
    ("float.tiff", lambda: _array_image(np.full((8, 8), 0.25, np.float32)), (64, 64, 64), 0),
    ("cmyk.tiff", lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0), 0),
    ("cmyk.jpg", lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0), 6),
    ("rgb.jpg", lambda: Image.new("RGB", (8, 8), (0, 128, 0)), (0, 128, 0), 6),
]


@pytest.mark.parametrize("filename, factory, expected, tolerance", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_load_image_from_file(tmp_path, filename, factory, expected, tolerance):
    path = tmp_path / filename
    factory().save(path)
    with Image.open(path) as lazily_opened:
        for source in (path, str(path), lazily_opened):
            converted = load_image(source)
            assert converted.size == (8, 8)
            _assert_rgb(converted, expected, tolerance)


def test_sixteen_bit_png_keeps_16_bit_on_disk(tmp_path):
    path = tmp_path / "sixteen.png"
    _array_image(np.full((4, 4), 65535, np.uint16)).save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")  # really 16-bit, not already reduced to 8-bit
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "filename, payload",
    [
        ("truncated.png", lambda: _png_bytes()[: len(_png_bytes()) // 2]),
        ("header_only.png", lambda: _png_bytes()[:40]),
        ("garbage.jpg", lambda: b"this is not an image at all"),
        ("empty.png", lambda: b""),
    ],
)
def test_corrupt_file_raises_value_error_naming_path(tmp_path, filename, payload):
    path = tmp_path / filename
    path.write_bytes(payload())
    with pytest.raises(ValueError) as excinfo:
        load_image(path)
    assert str(path) in str(excinfo.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_file_through_processor_names_path(processor, tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(_png_bytes()[:200])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        processor(images=str(path), text="<image>")


def test_missing_file_raises_file_not_found(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_image(path)


@pytest.mark.parametrize(
    "array", [np.zeros((8, 8, 3), np.uint8), np.zeros((3, 8, 8), np.float32), torch.zeros(3, 8, 8)]
)
def test_arrays_become_rgb_images(array):
    converted = load_image(array)
    assert converted.mode == "RGB" and converted.size == (8, 8) and converted.getpixel((0, 0)) == (0, 0, 0)


def test_unsupported_type_raises():
    with pytest.raises(TypeError, match="Unsupported image type"):
        load_image(42)


# --------------------------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "box, expected",
    [
        ((0.12, 0.305, 0.451, 0.622), "[0.120,0.305,0.451,0.622]"),
        ((0, 0, 1, 1), "[0.000,0.000,1.000,1.000]"),
        ([0.12345, 0.5, 0.99949, 0.99951], "[0.123,0.500,0.999,1.000]"),
        (np.array([0.25, 0.25, 0.75, 0.75]), "[0.250,0.250,0.750,0.750]"),
        ((0.3, 0.3, 0.3, 0.3), "[0.300,0.300,0.300,0.300]"),
    ],
)
def test_format_box(box, expected):
    assert format_box(box) == expected


@pytest.mark.parametrize(
    "box, message",
    [
        ((0.1, 0.2, 0.3), "exactly 4 numbers"),
        ((0.1, 0.2, 0.3, 0.4, 0.5), "exactly 4 numbers"),
        (("0.1", 0.2, 0.3, 0.4), "exactly 4 numbers"),
        ((True, 0.2, 0.3, 0.4), "exactly 4 numbers"),
        ("0.1,0.2,0.3,0.4", "sequence of 4 numbers"),
        (None, "sequence of 4 numbers"),
        ((math.nan, 0.2, 0.3, 0.4), "finite"),
        ((0.1, 0.2, math.inf, 0.4), "finite"),
        ((-0.1, 0.2, 0.3, 0.4), r"in \[0, 1\]"),
        ((0.1, 0.2, 1.2, 0.4), r"in \[0, 1\]"),
        ((12, 30, 45, 60), r"in \[0, 1\]"),
        ((0.5, 0.2, 0.3, 0.4), "x2 must be >= x1"),
        ((0.1, 0.5, 0.3, 0.4), "y2 must be >= y1"),
    ],
)
def test_format_box_rejects_invalid(box, message):
    with pytest.raises(ValueError, match="Invalid box") as excinfo:
        format_box(box)
    assert re.search(message, str(excinfo.value))


def test_normalize_and_denormalize():
    assert normalize_box((10, 20, 30, 40), (100, 200)) == pytest.approx((0.1, 0.1, 0.3, 0.2))
    assert denormalize_box((0.1, 0.1, 0.3, 0.2), (100, 200)) == pytest.approx((10, 20, 30, 40))
    assert normalize_box((-5, 0, 105, 50), (100, 100), clip=True) == pytest.approx((0, 0, 1, 0.5))


@pytest.mark.parametrize("image_size", [(0, 100), (100,), (100, -1), (math.nan, 10)])
def test_normalize_box_rejects_bad_image_size(image_size):
    with pytest.raises(ValueError, match="Invalid image_size"):
        normalize_box((1, 2, 3, 4), image_size)


def test_pixel_box_round_trip_through_text():
    size = (640, 480)
    pixel_boxes = [(64, 48, 320, 240), (0, 0, 640, 480), (100.5, 33.3, 101.7, 479)]
    text = "The cat " + " and ".join(format_box(normalize_box(b, size)) for b in pixel_boxes) + "."
    parsed = parse_boxes(text)
    assert parsed.errors == []
    assert len(parsed.boxes) == 3
    for pixel, box, (start, end) in zip(pixel_boxes, parsed.boxes, parsed.spans):
        assert text[start:end] == format_box(box)
        assert denormalize_box(box, size) == pytest.approx(pixel, abs=0.5e-3 * max(size))


def test_parse_multiple_boxes_in_one_bracket():
    text = "Two dogs [0.100,0.200,0.300,0.400;0.500,0.500,0.900,0.950] here."
    parsed = parse_boxes(text)
    assert parsed.errors == []
    assert parsed.boxes == [(0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.9, 0.95)]
    assert [text[s:e] for s, e in parsed.spans] == ["0.100,0.200,0.300,0.400", "0.500,0.500,0.900,0.950"]


@pytest.mark.parametrize(
    "text, bad, reason",
    [
        ("at [0.1,0.2,0.3] ok", "[0.1,0.2,0.3]", "expected 4 comma-separated numbers, got 3"),
        ("at [0.1,0.2,0.3,0.4,0.5]", "[0.1,0.2,0.3,0.4,0.5]", "got 5"),
        ("at [0.1,abc,0.3,0.4]", "[0.1,abc,0.3,0.4]", "must be numbers"),
        ("at [0.1,,0.3,0.4]", "[0.1,,0.3,0.4]", "must be numbers"),
        ("at [0.1,0.2,1.3,0.4]", "[0.1,0.2,1.3,0.4]", r"in \[0, 1\]"),
        ("at [-0.1,0.2,0.3,0.4]", "[-0.1,0.2,0.3,0.4]", r"in \[0, 1\]"),
        ("at [0.5,0.2,0.1,0.4]", "[0.5,0.2,0.1,0.4]", "x2 must be >= x1"),
        ("at [nan,0.2,0.3,0.4]", "[nan,0.2,0.3,0.4]", "finite"),
        ("at [0.1,0.1,0.2,0.2;0.3,0.3] x", "0.3,0.3", "got 2"),
    ],
)
def test_parse_reports_malformed_boxes(text, bad, reason):
    parsed = parse_boxes(text)
    assert isinstance(parsed, BoxParseResult)
    assert len(parsed.errors) == 1
    assert repr(bad) in parsed.errors[0]
    assert re.search(reason, parsed.errors[0])
    start = text.index(bad)
    assert f"{start}:{start + len(bad)}" in parsed.errors[0]
    expected_boxes = [(0.1, 0.1, 0.2, 0.2)] if ";" in text else []
    assert parsed.boxes == expected_boxes


def test_parse_mixes_good_and_bad_boxes_in_order():
    parsed = parse_boxes("a [0.1,0.1,0.2,0.2] b [0.9,0.1] c [0.3,0.3,0.4,0.4]")
    assert parsed.boxes == [(0.1, 0.1, 0.2, 0.2), (0.3, 0.3, 0.4, 0.4)]
    assert len(parsed.spans) == 2 and len(parsed.errors) == 1


@pytest.mark.parametrize("text", ["no boxes here", "see [1] and [23]", "[cat, dog]", "[]", "[ ]", "unclosed [0.1,0.2"])
def test_parse_ignores_non_box_brackets(text):
    assert parse_boxes(text) == BoxParseResult()


def _conversation(image, question, answer, image_first=True, turns=1):
    user = [{"type": "image", "image": image}, {"type": "text", "text": question}]
    messages = [{"role": "user", "content": user if image_first else user[::-1]}]
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    for k in range(1, turns):
        messages.append({"role": "user", "content": [{"type": "text", "text": f"And {k}?"}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": f"{answer} {k}"}]})
    return messages


def test_assistant_masks_equal_transformers_and_cover_only_answers(tokenizer, monkeypatch):
    """TRL's collator call: the vectorised masks equal `ProcessorMixin`'s, for either image position (image tokens
    expanded before or after the question), multi-turn conversations and right padding."""
    from transformers.processing_utils import ProcessorMixin

    processor = CommProcessor(make_image_processor(), tokenizer, num_image_tokens=N_TOKENS)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    conversations = [
        _conversation(image, "Where is it?", "[0.100,0.200,0.300,0.400]"),
        _conversation(image, "What colour is the square? Answer briefly.", "red", image_first=False),
        _conversation(image, "Describe it.", "A small blue circle at the top.", turns=3),
        _conversation(image, "Is there a cat?", "no", image_first=False, turns=2),
    ]
    kwargs = {"padding": True, "padding_side": "right", "add_special_tokens": False}

    def collate():
        return processor.apply_chat_template(
            conversations,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            return_assistant_tokens_mask=True,
            processor_kwargs=kwargs,
        )

    ours = collate()
    base = ProcessorMixin._adjust_assistant_masks_indices
    monkeypatch.setattr(CommProcessor, "_adjust_assistant_masks_indices", base)
    reference = collate()
    assert ours["assistant_masks"].dtype == reference["assistant_masks"].dtype == torch.long
    assert torch.equal(ours["assistant_masks"], reference["assistant_masks"])
    assert torch.equal(ours["input_ids"], reference["input_ids"])
    first = tokenizer.decode(ours["input_ids"][0][ours["assistant_masks"][0].bool()])
    assert first == f" [0.100,0.200,0.300,0.400]{tokenizer.eos_token}"
    third = tokenizer.decode(ours["input_ids"][2][ours["assistant_masks"][2].bool()])
    assert third.count(tokenizer.eos_token) == 3 and "And 1?" not in third
    assert not ours["assistant_masks"][ours["input_ids"] == processor.image_token_id].any()


# --- the Vicuna-v1 chat template on the tiny tokenizer ---------------------------------------------------------


def test_tiny_tokenizer_splits_every_digit():
    tokenizer = build_tiny_tokenizer(512)
    box = "[0.123,0.456,0.789,0.912]"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(box, add_special_tokens=False).input_ids)
    assert tokens == list(box)  # each digit, dot, comma and bracket is its own token
    assert tokenizer.decode(tokenizer(box, add_special_tokens=False).input_ids) == box
    assert len(tokenizer(" 2024 circles", add_special_tokens=False).input_ids) >= 4


@pytest.mark.parametrize("answer", ["2", "purple", "yes", "[0.123,0.456,0.5,0.75]", "Two circles."])
def test_assistant_mask_covers_everything_the_model_generates(answer):
    """Prompt (with the generation prompt) + assistant-masked tokens = the whole conversation: every token generated
    after "ASSISTANT:" is supervised, including the bare " " that a digit answer starts with (" 2" -> " ", "2")."""
    tokenizer = build_tiny_tokenizer(512)
    user = {"role": "user", "content": [{"type": "text", "text": "How many circles are there?"}]}
    full = tokenizer.apply_chat_template(
        [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    prompt = tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=True, return_dict=True)
    supervised = [i for i, keep in zip(full["input_ids"], full["assistant_masks"]) if keep]
    assert prompt["input_ids"] + supervised == full["input_ids"]
    assert tokenizer.decode(supervised) == f" {answer}{tokenizer.eos_token}"
