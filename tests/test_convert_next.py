"""`comm-vlm convert ... --to matryoshka_llava_next`: tiny LLaVA-NeXT checkpoints in the llava-hf layout
(`llava-hf/llava-v1.6-*`: v4 Hub keys and transformers 5's saved ones) and in the original LLaVA-NeXT training-code
layout (`liuhaotian/llava-v1.6-*`: `llava_llama` config with `image_aspect_ratio: anyres`, `mm_patch_merge_type:
spatial_unpad`, (width, height) pinpoints, `model.image_newline`, the trained tower inside) convert with identical
logits to transformers' `LlavaNextForConditionalGeneration` on the same weights."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)

from comm_vlm.convert import _rename_llava_hf, convert_checkpoint
from comm_vlm.families import anyres_image_processor
from comm_vlm.models.configuration_matryoshka_next import MatryoshkaLlavaNextConfig
from comm_vlm.models.modeling_matryoshka_next import MatryoshkaLlavaNextForConditionalGeneration
from comm_vlm.testing import IMAGE_TOKEN_ID, build_tiny_tokenizer, tiny_image_processor, tiny_next_config


PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
# (height, width) canvases that are all wide: a converter that forgets to swap the original code's (width, height)
# pairs picks tall canvases and cuts other tiles
PINPOINTS = [[28, 56], [56, 56], [28, 84]]
SIZES = [(40, 70), (30, 100), (60, 60)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(tiny_next_config(320, next_class=True, image_grid_pinpoints=PINPOINTS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name and "weight" in name else 0.0))
    return model.eval()


def picture(size):
    generator = torch.Generator().manual_seed(size[0] * 1000 + size[1])
    return Image.fromarray((torch.rand(*size, 3, generator=generator) * 255).byte().numpy())


def reference_processor(reference):
    return LlavaNextProcessor(
        image_processor=anyres_image_processor(reference.config, tiny_image_processor()),
        tokenizer=build_tiny_tokenizer(),
        patch_size=7,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def save_llava_hf(reference, directory, variant):
    reference.save_pretrained(directory)
    reference_processor(reference).save_pretrained(directory)
    saved = load_file(directory / "model.safetensors")
    if (
        variant == "v4-hub"
    ):  # llava-hf/llava-v1.6-*: language_model.model.*, vision_tower.vision_model.*, image_newline
        saved = {}
        for key, value in reference.state_dict().items():
            key = key.replace("model.language_model.", "language_model.model.").replace(
                "lm_head.", "language_model.lm_head."
            )
            key = key.replace("model.vision_tower.", "vision_tower.vision_model.")
            saved[
                key.replace("model.multi_modal_projector.", "multi_modal_projector.").replace(
                    "model.image_newline", "image_newline"
                )
            ] = value
    save_file({k: v.contiguous() for k, v in saved.items()}, directory / "model.safetensors")
    return directory


def save_llava_next_original(reference, directory):
    """liuhaotian/llava-v1.6-vicuna-7b's layout, made from the reference's weights."""
    directory.mkdir()
    tower_dir = directory.parent / "clip"
    from transformers import CLIPVisionModel

    CLIPVisionModel(reference.config.vision_config).save_pretrained(tower_dir)  # config only is read: tower inside
    tiny_image_processor().save_pretrained(tower_dir)
    weights = {}
    for key, value in reference.state_dict().items():
        if key.startswith("model.language_model."):
            weights["model." + key[len("model.language_model.") :]] = value
        elif key.startswith("model.multi_modal_projector.linear_"):
            index, param = key[len("model.multi_modal_projector.linear_") :].split(".")
            weights[f"model.mm_projector.{2 * (int(index) - 1)}.{param}"] = value
        elif key.startswith("model.vision_tower."):
            weights["model.vision_tower.vision_tower.vision_model." + key[len("model.vision_tower.") :]] = value
        else:  # model.image_newline, lm_head.weight
            weights[key] = value
    save_file({k: v.contiguous() for k, v in weights.items()}, directory / "model.safetensors")
    config = {
        **reference.config.text_config.to_dict(),
        "model_type": "llava_llama",
        "architectures": ["LlavaLlamaForCausalLM"],
        "mm_vision_tower": str(tower_dir),
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": 32,
        "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": "anyres",
        "image_grid_pinpoints": [[w, h] for h, w in PINPOINTS],  # the training code's (width, height)
        "mm_use_im_start_end": False,
        "unfreeze_mm_vision_tower": True,
    }
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer = build_tiny_tokenizer(with_image_token=False)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("variant", ["v4-hub", "v5-saved"])
def test_llava_hf_next_converts_with_identical_logits(reference, tmp_path, variant):
    source = save_llava_hf(reference, tmp_path / "src", variant)
    convert_checkpoint(source, tmp_path / "dst", "llava-hf", "matryoshka_llava_next", base_model="llava-hf/tiny-next")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "dst").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "dst")
    assert model.config.model_type == "matryoshka_llava_next" and model.config.image_grid_pinpoints == PINPOINTS
    assert type(processor).__name__ == "MatryoshkaLlavaNextProcessor"
    for size in SIZES:
        inputs = processor(images=picture(size), text=PROMPT, return_tensors="pt")
        expected_inputs = reference_processor(reference)(images=picture(size), text=PROMPT, return_tensors="pt")
        assert torch.equal(inputs["input_ids"], expected_inputs["input_ids"])
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, reference(**expected_inputs).logits)
    assert "llava-hf/tiny-next" in (tmp_path / "dst" / "README.md").read_text()


def test_original_llava_next_converts_with_identical_logits(reference, tmp_path):
    source = save_llava_next_original(reference, tmp_path / "src")
    convert_checkpoint(source, tmp_path / "dst", "llava-original", "matryoshka_llava_next")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "dst").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "dst")
    assert model.config.image_grid_pinpoints == PINPOINTS  # swapped to transformers' (height, width)
    assert processor.image_token_id == 320 and model.config.text_config.vocab_size == 321  # <image> appended
    for size in SIZES:
        inputs = processor(images=picture(size), text=PROMPT, return_tensors="pt")
        reference_ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == 320, IMAGE_TOKEN_ID)
        with torch.no_grad():
            logits = model(**inputs).logits
            expected = reference(
                input_ids=reference_ids, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
            ).logits
        assert torch.equal(logits[..., :320], expected)
    card = (tmp_path / "dst" / "README.md").read_text()
    assert "added as token 320" in card and "LLaVA-NeXT's training code resizes" in card


def test_layouts_and_targets_that_do_not_match_are_refused(reference, tmp_path):
    next_hf = save_llava_hf(reference, tmp_path / "hf", "v5-saved")
    with pytest.raises(ValueError, match="convert with --to matryoshka_llava_next"):
        convert_checkpoint(next_hf, tmp_path / "a", "llava-hf", "matryoshka_llava")
    original = save_llava_next_original(reference, tmp_path / "orig")
    with pytest.raises(ValueError, match="--to matryoshka_llava_next"):
        convert_checkpoint(original, tmp_path / "b", "llava-original", "comm")
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps({**config, "image_aspect_ratio": "pad"}))
    with pytest.raises(ValueError, match="not LLaVA-NeXT's 'anyres'"):
        convert_checkpoint(original, tmp_path / "c", "llava-original", "matryoshka_llava_next")
    weights = load_file(next_hf / "model.safetensors")
    weights = {k: v for k, v in weights.items() if not k.endswith("image_newline")}
    save_file(weights, next_hf / "model.safetensors")
    with pytest.raises(ValueError, match="1 missing keys: \\['model.image_newline'\\]"):
        convert_checkpoint(next_hf, tmp_path / "d", "llava-hf", "matryoshka_llava_next")
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_derivation_between_branch_families_refuses_anyres_checkpoints(tmp_path):
    from comm_vlm.testing import build_tiny_checkpoint

    build_tiny_checkpoint(tmp_path / "next", family="matryoshka_llava_next")
    build_tiny_checkpoint(tmp_path / "comm", family="comm")
    with pytest.raises(ValueError, match="built on LLaVA-NeXT's anyres tiles"):
        convert_checkpoint(tmp_path / "next", tmp_path / "a", "comm-vlm", "matryoshka_llava")
    with pytest.raises(ValueError, match="--to matryoshka_llava_next"):
        convert_checkpoint(tmp_path / "comm", tmp_path / "b", "comm-vlm", "matryoshka_llava_next")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def published_next_fields() -> dict:
    """llava-hf/llava-v1.6-mistral-7b-hf's config.json (tests/fixtures/published_configs)."""
    from pathlib import Path

    path = Path(__file__).parent / "fixtures" / "published_configs" / "llava-hf--llava-v1.6-mistral-7b-hf.json"
    return json.loads(path.read_text())


def test_published_llava_next_config_converts_with_identical_logits(tmp_path):
    """The published config's fields (Mistral LLM, 336 px tiles on the five pinpoints, image token 32000, vocabulary
    32064), widths and depths shrunk so that random weights fit a test; the real 24x24 grid per tile."""
    from transformers import LlavaNextConfig

    fields = published_next_fields()
    fields["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    fields["text_config"].update(num_key_value_heads=2)
    fields["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    # as published, the text config says bfloat16: transformers builds that LLM in bfloat16 next to a float32 tower;
    # the conversion keeps every value (upcast to float32)
    torch.manual_seed(0)
    mixed = LlavaNextForConditionalGeneration(LlavaNextConfig(**fields))
    mixed.save_pretrained(tmp_path / "mixed")
    convert_checkpoint(tmp_path / "mixed", tmp_path / "mixed-out", "llava-hf", "matryoshka_llava_next")
    source, converted = (
        load_file(tmp_path / "mixed" / "model.safetensors"),
        load_file(tmp_path / "mixed-out" / "model.safetensors"),
    )
    assert {t.dtype for t in source.values()} == {torch.float32, torch.bfloat16}
    assert {t.dtype for t in converted.values()} == {torch.float32}
    llm = {_rename_llava_hf(k): t for k, t in source.items() if t.dtype == torch.bfloat16}
    assert llm and all(torch.equal(converted[k], t.float()) for k, t in llm.items())

    fields["text_config"].pop("torch_dtype")  # one precision, so that the logits can be compared bit for bit
    reference = LlavaNextForConditionalGeneration(LlavaNextConfig(**fields)).eval()
    reference.save_pretrained(tmp_path / "src")
    saved = json.loads((tmp_path / "src" / "config.json").read_text())
    assert saved["model_type"] == "llava_next" and saved["image_grid_pinpoints"] == fields["image_grid_pinpoints"]
    convert_checkpoint(tmp_path / "src", tmp_path / "dst", "llava-hf", "matryoshka_llava_next")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "dst").eval()
    assert model.config.text_config.model_type == "mistral" and model.config.matryoshka_scales == [1, 9, 36, 144, 576]
    image_processor = anyres_image_processor(model.config)
    for size in [(480, 640), (1000, 300)]:
        pixels = image_processor(picture(size), return_tensors="pt")
        tokens = model.config.num_image_tokens(size)  # 2,340 and 2,232 at 576 per tile
        ids = torch.tensor([[1, 733, 16289, 28793] + [32000] * tokens + [13, 28705, 733]])
        with torch.no_grad():
            expected = reference(input_ids=ids, **pixels).logits
            assert torch.equal(model(input_ids=ids, **pixels).logits, expected)


def test_published_llava_next_parameter_count_is_llava_next():
    from transformers import LlavaNextConfig

    fields = published_next_fields()
    with torch.device("meta"):
        ours = MatryoshkaLlavaNextForConditionalGeneration(MatryoshkaLlavaNextConfig(**fields))
        theirs = LlavaNextForConditionalGeneration(LlavaNextConfig(**fields))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    assert 7.5e9 < count < 7.6e9  # Mistral-7B (32064 tokens) + CLIP-L/14-336 + projector + image_newline
