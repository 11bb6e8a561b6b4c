"""The published parts' geometry through the user's path: `comm-vlm assemble` -> generate -> save/reload -> train.

Stand-ins with the published layer counts, image and patch sizes (read from `tests/fixtures/published_configs/`) and
tiny widths: a two-tower CLIP at 336 px with patch 14 and 24 layers (openai/clip-vit-large-patch14-336's layout),
DINOv2 at its published 518 px with patch 14 and 24 layers (facebook/dinov2-large's), and a Llama whose tokenizer has
no `<image>` token (lmsys/vicuna-7b-v1.5's case).
"""

from pathlib import Path

import pytest
import torch
from PIL import Image
from published_configs import CLIP_L_336, DINOV2_L, load_published_dict
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
)

from comm_vlm.cli import main
from comm_vlm.families import clip_image_processor
from comm_vlm.models.processing_matryoshka import MatryoshkaLlavaProcessor
from comm_vlm.resolution import at_resolution
from comm_vlm.testing import build_tiny_tokenizer, tiny_text_config
from comm_vlm.training import run_recipe


TINY_WIDTHS = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}


def _published_geometry(repo: str) -> dict:
    """A published vision config's layer count, image and patch sizes (tests/fixtures/published_configs/)."""
    published = load_published_dict(repo)
    vision = published.get("vision_config", published)
    return {k: vision[k] for k in ("num_hidden_layers", "image_size", "patch_size")}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    clip_geometry, dino_geometry = _published_geometry(CLIP_L_336), _published_geometry(DINOV2_L)
    assert (clip_geometry["image_size"], dino_geometry["image_size"]) == (336, 518)  # 24x24 against 37x37 patches
    clip_config = CLIPConfig(
        text_config={**TINY_WIDTHS, "num_hidden_layers": 1},
        vision_config={**TINY_WIDTHS, **clip_geometry},
        projection_dim=16,
    )
    CLIPModel(clip_config).save_pretrained(root / "clip")
    clip_image_processor(336).save_pretrained(root / "clip")
    dino = Dinov2Model(Dinov2Config(**TINY_WIDTHS, **dino_geometry, mlp_ratio=2)).eval()
    dino.save_pretrained(root / "dino")
    tokenizer = build_tiny_tokenizer(with_image_token=False)
    text = tiny_text_config(len(tokenizer), max_position_embeddings=1024)  # 576 visual tokens and the text
    text = {k: v for k, v in text.items() if k != "model_type"}
    LlamaForCausalLM(LlamaConfig(**text)).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    return {"root": root, "dino": dino}


def _assemble(parts, out: Path, *args: str) -> None:
    root = parts["root"]
    argv = ["assemble", str(out), "--vision", str(root / "clip"), "--text", str(root / "llm"), *args]
    assert main(argv) == 0


def _messages(image: Image.Image) -> list[dict]:
    content = [{"type": "image", "image": image}, {"type": "text", "text": "Where is the red square?"}]
    return [{"role": "user", "content": content}]


def test_comm_from_published_geometry_assembles_generates_reloads_and_trains(parts, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "comm-init"
    _assemble(parts, out, "--secondary-vision", str(parts["root"] / "dino"))
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    config = model.config
    assert (config.vision_config.image_size, config.secondary_vision_config.image_size) == (336, 336)
    assert config.image_seq_length == 576 and processor.num_image_tokens == 576
    assert config.branch("secondary_vision")["layers"] == list(range(19, 25))  # COMM's DINOv2 layers

    # DINOv2 runs at 336 px: the saved tower equals the published 518 px one interpolating at that size.
    pixels = torch.randn(2, 3, 336, 336)
    with torch.no_grad():
        published = parts["dino"](pixels).last_hidden_state
        ours = model.model.secondary_vision_tower(pixels).last_hidden_state
    assert torch.equal(ours, published)
    resampled, _ = at_resolution(parts["dino"], parts["dino"].config, 336)
    assert torch.equal(
        model.model.secondary_vision_tower.embeddings.position_embeddings, resampled.embeddings.position_embeddings
    )

    image = Image.new("RGB", (400, 300), "navy")
    inputs = processor.apply_chat_template(
        _messages(image), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert inputs["pixel_values"].shape[-2:] == (336, 336)
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4

    model.save_pretrained(tmp_path / "resaved")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "resaved").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, logits)

    stage = {
        "stage": "comm_pretrain",
        "dataset": {"tiny": 4},
        "args": {"max_steps": 1, "per_device_train_batch_size": 2, "logging_steps": 1, "save_strategy": "no"},
    }
    results = run_recipe({"model": {"pretrained": str(out)}, "stages": [stage]}, tmp_path / "run")
    trained = AutoModelForImageTextToText.from_pretrained(results[0].output_dir)
    before, after = model.state_dict(), trained.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if "vision_tower" in k)  # encoders frozen
    assert not torch.equal(
        after["model.connector.merges.1.layer_logits"], before["model.connector.merges.1.layer_logits"]
    )


def test_every_family_assembles_with_its_own_processor(parts, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    image = Image.new("RGB", (64, 64), "red")
    _assemble(parts, tmp_path / "m3", "--family", "matryoshka_llava")
    m3 = AutoModelForImageTextToText.from_pretrained(tmp_path / "m3").eval()
    m3_processor = AutoProcessor.from_pretrained(tmp_path / "m3")
    assert isinstance(m3_processor, MatryoshkaLlavaProcessor)
    assert m3.config.matryoshka_scales == [1, 9, 36, 144, 576]  # LLaVA-1.5's cascade on the 24x24 grid
    inputs = m3_processor(images=image, text="USER: <image>\nWhat is it? ASSISTANT:", return_tensors="pt")
    for scale in (9, 576):
        with torch.no_grad():
            out = m3.generate(**inputs, matryoshka_scale=scale, max_new_tokens=2, do_sample=False)
        assert out.shape[1] >= inputs["input_ids"].shape[1] + 1

    _assemble(parts, tmp_path / "combiner", "--family", "adaptive_combiner", "--set", "combiner_num_latents=16")
    combiner = AutoModelForImageTextToText.from_pretrained(tmp_path / "combiner").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "combiner")
    inputs = processor(images=image, text="USER: <image>\nWhat is it? ASSISTANT:", return_tensors="pt")
    assert int((inputs["input_ids"] == combiner.config.image_token_id).sum()) == 16  # its N tokens, not 576
    with torch.no_grad():
        combiner.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_assemble_without_a_secondary_checkpoint_builds_one_encoder(parts, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = parts["root"]
    argv = ["assemble", str(tmp_path / "one"), "--vision", str(root / "clip"), "--text", str(root / "llm")]
    assert main(argv) == 0
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "one")
    assert model.config.secondary_vision_config is None and model.model.secondary_vision_tower is None
    # A second encoder's config without its weights is refused, and nothing is written.
    dino = "secondary_vision_config={model_type: dinov2, image_size: 336, patch_size: 14}"
    assert main(["assemble", str(tmp_path / "two"), *argv[2:], "--set", dino]) == 2
    assert not (tmp_path / "two").exists()
