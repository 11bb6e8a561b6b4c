"""Deriving one family from another's checkpoint (`comm-vlm convert --from comm-vlm`), and the recipes' `convert:`
model source: M3 from a trained COMM or LLaVA-layout model gives the source's logits at the full scale; the combiner
keeps the branch, projector and LLM bit for bit; what cannot carry over is refused before anything is written."""

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from comm_vlm.cli import main
from comm_vlm.derive import derive_checkpoint
from comm_vlm.models.processing_matryoshka import MatryoshkaLlavaProcessor
from comm_vlm.testing import build_tiny_checkpoint, build_tiny_tokenizer, tiny_image_processor, tiny_llava_config
from comm_vlm.training import run_recipe


PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


def _inputs(processor):
    image = Image.fromarray((torch.rand(40, 50, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    return processor(images=image, text=PROMPT, return_tensors="pt")


@pytest.mark.parametrize("layout", ["comm", "llava"])
def test_m3_from_a_trained_model_gives_its_logits_at_the_full_scale(layout, tmp_path):
    source, source_processor = build_tiny_checkpoint(tmp_path / "src", layout=layout)
    argv = ["convert", "--from", "comm-vlm", str(tmp_path / "src"), str(tmp_path / "m3"), "--to", "matryoshka_llava"]
    assert main(argv) == 0
    m3 = AutoModelForImageTextToText.from_pretrained(tmp_path / "m3").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "m3")
    assert isinstance(processor, MatryoshkaLlavaProcessor) and m3.config.matryoshka_scales == [1, 4, 16]
    settings = [
        {k: v for k, v in c.branch("vision").items() if k != "vision_config"} for c in (m3.config, source.config)
    ]
    assert settings[0] == settings[1]  # layers, merge, aligner, pixel statistics
    inputs = _inputs(processor)
    with torch.no_grad():
        expected = source(**_inputs(source_processor)).logits
        assert torch.equal(m3(**inputs, matryoshka_scale=16).logits, expected)
    assert "Derived from a `comm` checkpoint" in (tmp_path / "m3" / "README.md").read_text()


def test_combiner_on_a_comm_branch_keeps_every_source_weight(tmp_path):
    source, _ = build_tiny_checkpoint(tmp_path / "src", layout="comm")
    derive_checkpoint(tmp_path / "src", tmp_path / "combiner", "adaptive_combiner", combiner_num_latents=8)
    combiner = AutoModelForImageTextToText.from_pretrained(tmp_path / "combiner").eval()
    ours, theirs = combiner.state_dict(), source.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())
    assert {k for k in ours if k not in theirs} and all(
        k.startswith("model.combiner.") for k in ours if k not in theirs
    )
    processor = AutoProcessor.from_pretrained(tmp_path / "combiner")
    inputs = _inputs(processor)
    assert int((inputs["input_ids"] == combiner.config.image_token_id).sum()) == 8  # its latents, not the grid
    with torch.no_grad():
        combiner.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_weights_that_cannot_carry_over_are_refused_and_nothing_is_written(tmp_path, capsys):
    build_tiny_checkpoint(tmp_path / "combiner", layout="llava", family="adaptive_combiner", combiner_num_latents=8)
    argv = ["convert", "--from", "comm-vlm", str(tmp_path / "combiner"), str(tmp_path / "m3"), "--to"]
    assert main([*argv, "matryoshka_llava"]) == 2
    assert "have no place in matryoshka_llava" in capsys.readouterr().err
    assert not (tmp_path / "m3").exists()
    assert main([*argv, "adaptive_combiner", "--set", "combiner_num_latnts=4"]) == 2  # a typo is not stored
    assert "did you mean combiner_num_latents" in capsys.readouterr().err
    assert not (tmp_path / "m3").exists()


def test_a_llava_hf_checkpoint_is_not_derived_but_converted(tmp_path):
    LlavaForConditionalGeneration(tiny_llava_config()).save_pretrained(tmp_path / "llava")
    with pytest.raises(ValueError, match="--from llava-hf"):
        derive_checkpoint(tmp_path / "llava", tmp_path / "out", "matryoshka_llava")


def test_recipe_converts_llava_hf_into_m3_once_and_trains(tmp_path):
    torch.manual_seed(0)
    LlavaForConditionalGeneration(tiny_llava_config()).save_pretrained(tmp_path / "llava")
    LlavaProcessor(
        image_processor=tiny_image_processor(),
        tokenizer=build_tiny_tokenizer(),
        patch_size=7,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(tmp_path / "llava")
    recipe = {
        "model": {"convert": {"from": "llava-hf", "source": str(tmp_path / "llava"), "to": "matryoshka_llava"}},
        "stages": [
            {
                "stage": "m3_finetune",
                "dataset": {"tiny": 4},
                "args": {"max_steps": 1, "per_device_train_batch_size": 2, "save_strategy": "no"},
            }
        ],
    }
    results = run_recipe(recipe, tmp_path / "run")
    assert (tmp_path / "run" / "init" / "config.json").is_file()
    trained = AutoModelForImageTextToText.from_pretrained(results[0].output_dir)
    assert trained.config.model_type == "matryoshka_llava"
    init_mtime = (tmp_path / "run" / "init" / "model.safetensors").stat().st_mtime
    run_recipe(recipe, tmp_path / "run")  # a rerun reuses the converted checkpoint
    assert (tmp_path / "run" / "init" / "model.safetensors").stat().st_mtime == init_mtime
