"""Requests that cannot silently do the wrong thing: image placeholders without images (and images without
placeholders), empty prompts, prompts past the LLM's positions, scales of the wrong type, configs edited after
construction, damaged checkpoint files. Every family, in the processor and in the model (`forward` and `generate`)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from comm_vlm import CommProcessor, MatryoshkaLlavaProcessor
from comm_vlm.families import get_family
from comm_vlm.models.checkpoint_files import damaged_checkpoint_files, safetensors_damage
from comm_vlm.testing import (
    IMAGE_TOKEN_ID,
    build_tiny_checkpoint,
    build_tiny_tokenizer,
    tiny_comm_config,
    tiny_image_processor,
    tiny_text_config,
    tiny_vision_config,
)


FAMILIES = {  # family: (config overrides, image placeholders per image)
    "comm": ({}, 16),
    "matryoshka_llava": ({}, 16),
    "adaptive_combiner": ({"combiner_num_latents": 4, "combiner_iterations": 1}, 4),
}
MAX_POSITIONS = 64


def tiny_config(family: str, **overrides):
    fields, _ = FAMILIES[family]
    text_config = tiny_text_config(320, max_position_embeddings=MAX_POSITIONS)
    return tiny_comm_config("llava", family=family, text_config=text_config, **{**fields, **overrides})


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request):
    torch.manual_seed(0)
    family = request.param
    return family, get_family(family).model_class(tiny_config(family)).eval()


def prompt(family: str, images: int = 1, text: int = 3) -> torch.Tensor:
    per_image = FAMILIES[family][1]
    return torch.tensor([[1, 5] + [IMAGE_TOKEN_ID] * (per_image * images) + [7] * text])


# --- the model: forward and generate ----------------------------------------------------------------------------


def test_image_tokens_without_images_are_refused(family_model):
    family, model = family_model
    ids = prompt(family)
    with pytest.raises(ValueError, match="image tokens .* but no images were given"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="but no images were given"):
        model.generate(input_ids=ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="but no images were given"):  # placeholders found by their embedding
        model(inputs_embeds=model.get_input_embeddings()(ids))


def test_images_without_image_tokens_are_refused(family_model):
    family, model = family_model
    ids, pixels = prompt(family, images=0), torch.randn(1, 3, 28, 28)
    with pytest.raises(ValueError, match="image tokens|image placeholders"):
        model(input_ids=ids, pixel_values=pixels)
    with pytest.raises(ValueError, match="image tokens|image placeholders"):
        model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=2)


def test_text_only_prompts_still_work(family_model):
    family, model = family_model
    out = model.generate(input_ids=prompt(family, images=0), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 7)


def test_an_empty_prompt_is_refused(family_model):
    _, model = family_model
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="The prompt is empty"):
        model(input_ids=empty)
    with pytest.raises(ValueError, match="The prompt is empty"):
        model.generate(input_ids=empty, max_new_tokens=2)


def test_a_prompt_past_the_llms_positions_is_refused(family_model):
    family, model = family_model
    too_long = prompt(family, text=MAX_POSITIONS)
    with pytest.raises(ValueError, match=rf"reaches position {too_long.shape[1]}, past the {MAX_POSITIONS} positions"):
        model(input_ids=too_long, pixel_values=torch.randn(1, 3, 28, 28))


def test_explicit_positions_are_what_is_checked(family_model):
    """Packed rows restart their positions per segment: a row longer than the position table is fine when its
    positions are not."""
    _, model = family_model
    ids = torch.tensor([[1] + [7] * (MAX_POSITIONS - 1)] * 2).view(1, -1)  # 2 segments of MAX_POSITIONS tokens
    positions = torch.arange(MAX_POSITIONS).repeat(2)[None]
    assert model(input_ids=ids, position_ids=positions).logits.shape[1] == 2 * MAX_POSITIONS
    with pytest.raises(ValueError, match=rf"reaches position {MAX_POSITIONS + 1}"):
        model(input_ids=ids, position_ids=positions + 1)


def test_a_generation_past_the_llms_positions_is_refused_or_stops_at_the_last_position(family_model):
    family, model = family_model
    ids, pixels = prompt(family, text=MAX_POSITIONS - 2 - FAMILIES[family][1] - 2), torch.randn(1, 3, 28, 28)
    assert ids.shape[1] == MAX_POSITIONS - 2
    with pytest.raises(ValueError, match="Lower `max_new_tokens` to at most 2"):
        model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=5)
    # the default length (no max_new_tokens) stops at the last position, as transformers does for LLMs
    with pytest.warns(UserWarning, match="max_length"):
        out = model.generate(input_ids=ids, pixel_values=pixels, do_sample=False)
    assert out.shape[1] == MAX_POSITIONS


# --- M3 scales --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def m3():
    torch.manual_seed(0)
    return get_family("matryoshka_llava").model_class(tiny_config("matryoshka_llava")).eval()


WRONG_TYPES = [True, 2.5, 4.0, "4"]


@pytest.mark.parametrize("value", WRONG_TYPES, ids=repr)
@pytest.mark.parametrize("name", ["matryoshka_scale", "visual_token_budget"])
def test_m3_generate_refuses_scales_of_the_wrong_type(m3, name, value):
    allowed = ' or "auto"' if name == "matryoshka_scale" else ""  # the learned selector's `matryoshka_scale="auto"`
    message = rf"`{name}` must be an integer{allowed}, got {value!r} \({type(value).__name__}\)"
    with pytest.raises(ValueError, match=message):
        m3.generate(input_ids=prompt("matryoshka_llava"), pixel_values=torch.randn(1, 3, 28, 28), **{name: value})


def test_m3_forward_and_training_refuse_a_scale_of_the_wrong_type(m3):
    ids, pixels = prompt("matryoshka_llava"), torch.randn(1, 3, 28, 28)
    with pytest.raises(ValueError, match="`matryoshka_scale` must be an integer, got True"):
        m3(input_ids=ids, pixel_values=pixels, matryoshka_scale=True)
    with pytest.raises(ValueError, match="`matryoshka_scale` must be an integer, got True"):
        m3(input_ids=ids, pixel_values=pixels, labels=ids.clone(), matryoshka_scale=True)
    with pytest.raises(ValueError, match="`matryoshka_scale` must be an integer, got 4.0"):
        m3.get_image_features(pixels, matryoshka_scale=4.0)


def test_m3_integer_scales_of_any_integer_type_are_accepted(m3):
    ids, pixels = prompt("matryoshka_llava"), torch.randn(1, 3, 28, 28)
    kwargs = dict(input_ids=ids, pixel_values=pixels, max_new_tokens=2, do_sample=False)
    reference = m3.generate(**kwargs, matryoshka_scale=4)
    assert torch.equal(m3.generate(**kwargs, matryoshka_scale=np.int64(4)), reference)
    assert torch.equal(m3.generate(**kwargs, matryoshka_scale=torch.tensor(4)), reference)


# --- the processors ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["comm", "matryoshka_llava"])
def processor(request):
    cls = CommProcessor if request.param == "comm" else MatryoshkaLlavaProcessor
    tokenizer = build_tiny_tokenizer()
    tokenizer.model_max_length = MAX_POSITIONS
    return cls(image_processor=tiny_image_processor(28), tokenizer=tokenizer, num_image_tokens=16)


IMAGE = Image.new("RGB", (30, 30), "red")


def test_processor_refuses_mismatched_images_and_placeholders(processor):
    with pytest.raises(ValueError, match="no images were passed"):
        processor(text="USER: <image> What is it?")
    with pytest.raises(ValueError, match="Found total 0 <image> tokens and 1 images"):
        processor(text="USER: What is it?", images=IMAGE)
    with pytest.raises(ValueError, match="Found total 2 <image> tokens and 1 images"):
        processor(text="USER: <image><image> What is it?", images=IMAGE)


def test_processor_refuses_an_empty_prompt(processor):
    with pytest.raises(ValueError, match=r"Prompt\(s\) \[1\] are empty after tokenization"):
        processor(text=["USER: hi", ""], padding=True, return_tensors="pt")


def test_processor_refuses_a_prompt_longer_than_the_llm_unless_asked_to_truncate(processor):
    long_text = "<image> " + "the red circle " * 30
    with pytest.raises(ValueError, match=rf"more than the {MAX_POSITIONS} positions .*`truncation=True`"):
        processor(text=long_text, images=IMAGE, return_tensors="pt")
    out = processor(text=long_text, images=IMAGE, truncation=True, max_length=MAX_POSITIONS, return_tensors="pt")
    assert out["input_ids"].shape[1] == MAX_POSITIONS and int((out["input_ids"] == IMAGE_TOKEN_ID).sum()) == 16
    # a truncation that would cut the image placeholders is refused (transformers' check)
    with pytest.raises(ValueError, match="Mismatch in `image` token count"):
        processor(text="the red circle " * 30 + "<image>", images=IMAGE, truncation=True, max_length=MAX_POSITIONS)


@pytest.mark.parametrize("value", WRONG_TYPES, ids=repr)
@pytest.mark.parametrize("name", ["matryoshka_scale", "visual_token_budget"])
def test_m3_processor_refuses_scales_of_the_wrong_type(name, value):
    processor = MatryoshkaLlavaProcessor(
        image_processor=tiny_image_processor(28), tokenizer=build_tiny_tokenizer(), num_image_tokens=16
    )
    allowed = ' or "auto"' if name == "matryoshka_scale" else ""
    with pytest.raises(ValueError, match=rf"`{name}` must be an integer{allowed}, got {value!r}"):
        processor(text="USER: <image> hi", images=IMAGE, **{name: value})


# --- configs ----------------------------------------------------------------------------------------------------


def test_a_float_layer_index_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"`vision_feature_layer` must be a layer index .* got 2.0 \(float\)"):
        tiny_comm_config("llava", vision_feature_layer=2.0)


EDITS = [  # family, field, value assigned after construction, message
    ("comm", "vision_feature_layer", 2.0, "must be a layer index or a list of layer indices"),
    ("comm", "vision_feature_merge", "bogus", "`vision_feature_merge`='bogus' is unknown"),
    ("comm", "vision_feature_merge", 3, "`vision_feature_merge` must be a string, got 3"),
    ("comm", "projector_depth", 2.0, r"`projector_depth` must be an integer, got 2.0 \(float\)"),
    ("comm", "projector_depth", 0, "`projector_depth` must be a positive integer"),
    ("comm", "image_token_index", True, "`image_token_index` must be an integer, got True"),
    ("comm", "image_token_index", -1, "`image_token_index` must be a token id"),
    ("comm", "image_seq_length", "16", "`image_seq_length` must be an integer or None"),
    ("comm", "multimodal_projector_bias", "yes", "`multimodal_projector_bias` must be a bool"),
    ("comm", "vision_image_mean", [0.5, 0.5], "`vision_image_mean` must be 3 per-channel values"),
    ("comm", "vision_config", tiny_vision_config(), "`vision_config` is a dict, not a config object"),
    ("matryoshka_llava", "matryoshka_default_scale", 4.0, "`matryoshka_default_scale` must be an integer or None"),
    ("matryoshka_llava", "matryoshka_scales", [1, 3], r"Valid scales: \[1, 4, 16\]"),
    ("matryoshka_llava", "matryoshka_token_selection", "random", "`matryoshka_token_selection`='random' is unknown"),
    ("adaptive_combiner", "combiner_num_latents", 0, "`combiner_num_latents` must be a positive integer, got 0"),
    ("adaptive_combiner", "combiner_num_latents", 4.0, "`combiner_num_latents` must be an integer, got 4.0"),
    ("adaptive_combiner", "combiner_gating", 1, r"`combiner_gating` must be a bool \(True or False\), got 1"),
    ("adaptive_combiner", "combiner_num_heads", 3, "not divisible by its 3 attention heads"),
    ("adaptive_combiner", "combiner_resampling", "grid", "`combiner_resampling`='grid' is unknown"),
    ("adaptive_combiner", "combiner_layer_norm_eps", 0.0, "`combiner_layer_norm_eps` must be > 0"),
]


@pytest.mark.parametrize("family,name,value,message", EDITS, ids=[f"{e[1]}={e[2]!r}" for e in EDITS])
def test_a_config_edited_after_construction_is_refused_when_the_model_is_built(family, name, value, message):
    config = tiny_config(family)
    setattr(config, name, value)
    with pytest.raises(ValueError, match=message):
        get_family(family).model_class(config)
    with pytest.raises(ValueError, match=message):
        config.check_fields()


def test_validate_runs_the_field_checks_and_save_pretrained_refuses_an_edited_config(tmp_path):
    config = tiny_config("adaptive_combiner")
    config.validate()
    config.combiner_num_latents = 0
    with pytest.raises(ValueError, match="`combiner_num_latents` must be a positive integer"):
        config.validate()
    with pytest.raises(ValueError, match="`combiner_num_latents` must be a positive integer"):
        config.save_pretrained(tmp_path)


# --- damaged checkpoint files -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("intact")
    model, _ = build_tiny_checkpoint(path, layout="llava", family="adaptive_combiner", combiner_num_latents=4)
    sharded = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(sharded, max_shard_size="200KB")
    return path, sharded


def damage(source, destination, how: str):
    shutil.copytree(source, destination)
    weights = destination / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "cut_in_header": data[:100],
            "five_bytes": data[:5],
            "empty": b"",
            "garbage": bytes(range(256)) * 16,
            "bad_json": data[:8] + b"{" * (len(data) - 8),
        }[how]
    )
    return weights


CAUSES = {
    "truncated": r"it is truncated: its tensors need [\d,]+ bytes of data but it holds [\d,]+",
    "cut_in_header": r"announce a [\d,]+-byte header but the file holds only 92 bytes",
    "five_bytes": "it is 5 bytes long, shorter than the 8-byte length field",
    "empty": "it is empty",
    "garbage": "it is truncated, or it is not a safetensors file",
    "bad_json": "its header is not valid JSON",
}


@pytest.mark.parametrize("how", list(CAUSES))
def test_a_damaged_weight_file_is_named_with_its_cause(checkpoint, tmp_path, how):
    weights = damage(checkpoint[0], tmp_path / how, how)
    with pytest.raises(OSError, match=rf"{weights}: .*{CAUSES[how]}") as error:
        AutoModelForImageTextToText.from_pretrained(tmp_path / how)
    assert "Download or copy the file(s) again" in str(error.value)
    assert error.value.__cause__ is not None  # safetensors' own error stays attached


def test_a_missing_shard_is_named(checkpoint, tmp_path):
    shutil.copytree(checkpoint[1], tmp_path / "ckpt")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "ckpt" / shard).unlink()
    with pytest.raises(OSError, match=rf"{tmp_path / 'ckpt' / shard}: missing, but model.safetensors.index.json"):
        AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt")


def test_intact_checkpoints_load_and_report_no_damage(checkpoint):
    for path in checkpoint:
        assert damaged_checkpoint_files(path) == []
        AutoModelForImageTextToText.from_pretrained(path)
    assert safetensors_damage(checkpoint[0] / "model.safetensors") is None


def test_a_load_error_without_damaged_files_is_left_as_it_is(checkpoint, tmp_path):
    shutil.copytree(checkpoint[0], tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["combiner_num_latents"] = 0
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="`combiner_num_latents` must be a positive integer"):
        AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt")


def test_a_damaged_file_of_a_downloaded_hub_snapshot_is_named(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo, revision = tmp_path / "models--org--tiny", "a" * 40
    shutil.copytree(checkpoint[0], repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    weights = repo / "snapshots" / revision / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(OSError, match=rf"{weights}: its first bytes announce"):
        AutoModelForImageTextToText.from_pretrained("org/tiny", cache_dir=tmp_path, local_files_only=True)
