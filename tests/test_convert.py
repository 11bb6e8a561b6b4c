"""`comm-vlm convert`: tiny LLaVA-1.5 checkpoints in the llava-hf (v4 Hub and v5) and the LLaVA / M3 training-code
layouts convert to `comm` and `matryoshka_llava` with equal logits; malformed sources fail, listing the problem, and
write nothing."""

import json

import pytest
import torch
from huggingface_hub import constants
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from comm_vlm.cli import main
from comm_vlm.convert import convert_checkpoint
from comm_vlm.hub import add_to_hub_cache
from comm_vlm.testing import build_tiny_tokenizer, tiny_image_processor, tiny_llava_config


PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
TARGETS = ["comm", "matryoshka_llava"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one intra-op thread (several thrash when the CPU is shared); restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def reference():
    """The tiny LLaVA-1.5 every source checkpoint is made from (vocabulary = the tokenizer without `<image>`)."""
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(tiny_llava_config(vocab_size=320)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name and "weight" in name else 0.0))
    return model


def picture():
    return Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy())


def save_llava_hf(reference, directory, variant):
    reference.save_pretrained(directory)  # config + transformers 5's saved layout (language_model.model.*, ...)
    processor = LlavaProcessor(
        image_processor=tiny_image_processor(),
        tokenizer=build_tiny_tokenizer(),
        patch_size=7,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(directory)
    saved = load_file(directory / "model.safetensors")
    if variant == "v4-hub":  # what llava-hf/llava-1.5-7b-hf holds: the CLIP tower under vision_model.
        saved = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in saved.items()}
    elif variant == "v5-memory":
        saved = reference.state_dict()
    save_file({k: v.contiguous() for k, v in saved.items()}, directory / "model.safetensors")
    return directory


def save_llava_original(reference, directory, with_tower):
    """haotian-liu/LLaVA's layout (with_tower=False: the tower was frozen and is read from mm_vision_tower) or M3's
    (with_tower=True: the trained tower is in the checkpoint)."""
    directory.mkdir()
    tower_dir = directory.parent / f"{directory.name}-clip"
    tower = CLIPVisionModel(reference.config.vision_config)
    tower.load_state_dict(reference.model.vision_tower.state_dict())
    if with_tower:  # the directory's tower must not be used: make it different
        torch.nn.init.zeros_(tower.embeddings.patch_embedding.weight)
    tower.save_pretrained(tower_dir)
    tiny_image_processor().save_pretrained(tower_dir)
    weights = {}
    for key, value in reference.state_dict().items():
        if key.startswith("model.language_model."):
            weights["model." + key[len("model.language_model.") :]] = value
        elif key.startswith("model.multi_modal_projector.linear_"):
            index, param = key[len("model.multi_modal_projector.linear_") :].split(".")
            weights[f"model.mm_projector.{2 * (int(index) - 1)}.{param}"] = value
        elif key.startswith("model.vision_tower.") and with_tower:
            weights["model.vision_tower.vision_tower.vision_model." + key[len("model.vision_tower.") :]] = value
        elif key == "lm_head.weight":
            weights[key] = value
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # saved by transformers 4.31
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
        "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "tune_mm_mlp_adapter": False,
    }
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer = build_tiny_tokenizer(with_image_token=False)
    tokenizer.chat_template = None  # LLaVA saves the LLM's tokenizer: no image token, no chat template
    tokenizer.save_pretrained(directory)
    return directory


def llava_logits(reference, input_ids, pixel_values, image_token_id):
    """LLaVA-1.5's forward as its training code runs it: CLIP layer -2 patch tokens -> projector, spliced into the
    text embeddings in place of the image placeholders."""
    with torch.no_grad():
        hidden = reference.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        features = reference.model.multi_modal_projector(hidden).reshape(-1, reference.config.text_config.hidden_size)
        is_image = input_ids == image_token_id
        embeds = reference.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        embeds[is_image] = features
        return reference.lm_head(reference.model.language_model(inputs_embeds=embeds).last_hidden_state)


def load_converted(directory):
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    return model, processor, processor(images=picture(), text=PROMPT, return_tensors="pt")


@pytest.mark.parametrize(
    "variant,target",
    [("v4-hub", "comm"), ("v4-hub", "matryoshka_llava"), ("v5-saved", "comm"), ("v5-memory", "matryoshka_llava")],
)
def test_llava_hf_converts_with_equal_logits(reference, tmp_path, variant, target):
    source = save_llava_hf(reference, tmp_path / "src", variant)
    files = convert_checkpoint(source, tmp_path / "dst", "llava-hf", target, base_model="llava-hf/tiny")
    assert {"model.safetensors", "config.json", "processor_config.json", "README.md", "modeling_comm.py"} <= set(files)
    model, processor, inputs = load_converted(tmp_path / "dst")
    assert model.config.model_type == target and type(processor).__name__.startswith(("Comm", "Matryoshka"))
    assert processor.image_token_id == 4 and int((inputs["input_ids"] == 4).sum()) == 16
    with torch.no_grad():
        expected = reference(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
        assert torch.equal(model(**inputs).logits, expected)
    assert "llava-hf/tiny" in (tmp_path / "dst" / "README.md").read_text()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("with_tower", [False, True], ids=["llava-1.5", "m3"])
def test_llava_original_converts_with_equal_logits(reference, tmp_path, monkeypatch, with_tower, target):
    source = save_llava_original(reference, tmp_path / "src", with_tower)
    if not with_tower:  # as in LLaVA-1.5's config, the tower is a Hub id: found in the (offline) Hub cache
        add_to_hub_cache(tmp_path / "src-clip", "openai/clip-vit-large-patch14-336", cache_dir=tmp_path / "hub")
        config = json.loads((source / "config.json").read_text())
        config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
        (source / "config.json").write_text(json.dumps(config))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    convert_checkpoint(source, tmp_path / "dst", "llava-original", target)
    model, processor, inputs = load_converted(tmp_path / "dst")
    assert processor.image_token_id == 320 and model.config.text_config.vocab_size == 321  # <image> appended
    assert processor.chat_template.count("polite answers") == 1  # LLaVA-1.5's Vicuna-v1 system prompt
    rendered = processor.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert rendered.endswith("polite answers to the human's questions. USER: Hi ASSISTANT:")
    with torch.no_grad():
        logits = model(**inputs).logits
    expected = llava_logits(reference, inputs["input_ids"], inputs["pixel_values"], image_token_id=320)
    assert torch.equal(logits[..., :320], expected)
    card = (tmp_path / "dst" / "README.md").read_text()
    assert "added as token 320" in card and "pads images to a square" in card
    assert ("come from" in card) is not with_tower


def test_cli_convert(reference, tmp_path, capsys):
    source = save_llava_hf(reference, tmp_path / "src", "v4-hub")
    argv = ["convert", "--from", "llava-hf", str(source), str(tmp_path / "dst"), "--to", "matryoshka_llava"]
    assert main([*argv, "--matryoshka-scales", "1,4,16"]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["matryoshka_scales"] == [1, 4, 16]
    assert main(argv) == 2  # the destination is not empty now
    assert "--overwrite" in capsys.readouterr().err


def corrupt(directory, drop=(), reshape=()):
    weights = load_file(directory / "model.safetensors")
    for key in drop:
        del weights[key]
    for key in reshape:
        weights[key] = weights[key][:-1]
    save_file(weights, directory / "model.safetensors")


@pytest.mark.parametrize(
    "layout,damage,message",
    [
        (
            "llava-hf",
            {"drop": ["multi_modal_projector.linear_2.weight"]},
            r"1 missing keys: \['model.multi_modal_projector.linear_2.weight'\]",
        ),
        (
            "llava-hf",
            {"reshape": ["multi_modal_projector.linear_1.weight"]},
            r"1 wrong shapes: \['model.multi_modal_projector.linear_1.weight: \(63, 32\) in the checkpoint, \(64",
        ),
        (
            "llava-original",
            {"drop": ["model.norm.weight", "lm_head.weight"]},
            r"2 missing keys: \['lm_head.weight', 'model.language_model.norm.weight'\]",
        ),
        ("llava-original", {"pickle": True}, r"only PyTorch pickle weights \(pytorch_model.bin\)"),
        (
            "llava-original",
            {"config": {"mm_patch_merge_type": "spatial_unpad", "mm_projector_type": "resampler"}},
            r"mm_projector_type 'resampler' is not .*; the checkpoint is LLaVA-NeXT .*--to matryoshka_llava_next",
        ),
    ],
)
def test_malformed_source_lists_the_problem_and_writes_nothing(reference, tmp_path, layout, damage, message):
    source = tmp_path / "src"
    if layout == "llava-hf":
        save_llava_hf(reference, source, "v4-hub")
    else:
        save_llava_original(reference, source, with_tower=False)
    corrupt(source, damage.get("drop", ()), damage.get("reshape", ()))
    if damage.get("pickle"):
        (source / "model.safetensors").rename(source / "pytorch_model.bin")  # never opened: pickle is not read
    if "config" in damage:
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**config, **damage["config"]}))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(source, tmp_path / "dst", layout, "comm")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary directory left
