"""PEFT LoRA adapts the components it is meant to: the LLM unless a recipe names others, so a stage that freezes the
encoders leaves them bit-identical after `merge_and_unload`, though their layers share the LLM's names (`q_proj`)."""

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForImageTextToText

from comm_vlm.testing import build_tiny_checkpoint
from comm_vlm.training import (
    build_trainer,
    component_of,
    default_sft_config,
    get_stage,
    lora_config_from_spec,
    lora_target_modules,
    run_recipe,
)


ENCODERS = ("vision_towers",)


@pytest.fixture
def comm_model(tmp_path):
    model, processor = build_tiny_checkpoint(tmp_path / "init", layout="comm")  # CLIP + DINOv2
    return model, processor


def components_of(names):
    return {component_of(name) for name in names}


def encoder_tensors(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items() if component_of(n) in ENCODERS}


def test_names_resolve_inside_the_language_model_only(comm_model):
    model, _ = comm_model
    encoder_qv = {
        name
        for name, _ in model.named_modules()
        if component_of(name) == "vision_towers" and name.endswith((".q_proj", ".v_proj"))
    }
    assert {n.split(".")[1] for n in encoder_qv} == {"vision_tower", "secondary_vision_tower"}  # CLIP's and DINOv2's:
    # PEFT's own suffix match would adapt them too

    targets = lora_target_modules(model, ["q_proj", "v_proj"])
    assert targets and components_of(targets) == {"llm"}
    assert {t.rsplit(".", 1)[-1] for t in targets} == {"q_proj", "v_proj"}
    assert all(t.startswith("model.language_model.") for t in targets)

    with_encoders = lora_target_modules(model, ["q_proj", "v_proj"], ["llm", "vision_towers"])
    assert set(with_encoders) == set(targets) | encoder_qv

    all_linear = lora_target_modules(model, "all-linear")
    assert components_of(all_linear) == {"llm"} and "lm_head" not in all_linear and set(targets) < set(all_linear)
    encoders_too = lora_target_modules(model, "all-linear", ["llm", "vision_towers"])
    assert encoder_qv < set(encoders_too) and any(n.endswith(".fc1") for n in encoders_too)  # their MLPs too


def test_explicit_targets_and_refusals(comm_model):
    model, _ = comm_model
    regex = r".*vision_tower.*\.q_proj"
    assert lora_target_modules(model, regex) == regex  # a regular expression is the user's own choice
    full = "model.vision_tower.encoder.layers.0.self_attn.q_proj"
    explicit = lora_target_modules(model, [full, "q_proj"])  # so is a full module name
    assert full in explicit and components_of(explicit) == {"llm", "vision_towers"}
    assert components_of(lora_target_modules(model, None)) == {"llm"}  # PEFT's default names for Llama

    with pytest.raises(ValueError, match=r"\['query'\] name no linear layer of the components \['llm'\]"):
        lora_target_modules(model, ["q_proj", "query"])  # DINOv2's name: not in the LLM
    with pytest.raises(ValueError, match="LM head is never adapted"):
        lora_target_modules(model, ["lm_head"])
    with pytest.raises(ValueError, match="must be one of"):
        lora_target_modules(model, ["q_proj"], ["encoders"])
    with pytest.raises(ValueError, match="unknown key"):
        lora_config_from_spec({"r": 4, "rank": 4}, model, "comm_pretrain")
    with pytest.raises(ValueError, match=r"freezes \['llm'\], which LoRA adapts by default"):
        lora_config_from_spec({"r": 4, "target_modules": ["q_proj"]}, model, "llava_pretrain")


def test_spec_components_and_modules_to_save(comm_model):
    model, _ = comm_model
    config = lora_config_from_spec({"r": 4, "target_modules": ["q_proj", "v_proj"]}, model, "comm_pretrain")
    assert config.task_type == "CAUSAL_LM" and components_of(config.target_modules) == {"llm"}
    assert config.modules_to_save == ["connector", "multi_modal_projector"]  # trained in full, as the stage says

    spec = {"r": 4, "target_modules": ["q_proj", "v_proj"], "components": ["llm", "vision_towers"]}
    config = lora_config_from_spec(spec, model, "m3_finetune")
    assert components_of(config.target_modules) == {"llm", "vision_towers"}
    assert "vision_tower" not in config.modules_to_save  # adapted, so not also copied in full
    config = lora_config_from_spec({"r": 4, "target_modules": ["q_proj"]}, model, get_stage("m3_finetune"))
    assert {"vision_tower", "secondary_vision_tower"} <= set(config.modules_to_save)


def test_frozen_encoders_stay_bit_identical_after_merge(comm_model, tiny_data, tmp_path):
    model, processor = comm_model
    before = encoder_tensors(model)
    llm_before = model.model.language_model.layers[0].self_attn.q_proj.weight.detach().clone()
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    args = default_sft_config(
        tmp_path / "out", max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no"
    )
    trainer = build_trainer(model, processor, tiny_data, "comm_pretrain", args, peft_config=lora)
    assert lora.modules_to_save is None  # the caller's config is left as it was
    trainer.train()
    merged = trainer.model.merge_and_unload()
    after = encoder_tensors(merged)
    assert after.keys() == before.keys() and before
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == []
    assert not torch.equal(llm_before, merged.model.language_model.layers[0].self_attn.q_proj.weight)


def test_recipe_peft_keeps_frozen_encoders(tmp_path):
    stage = {
        "stage": "comm_pretrain",
        "dataset": {"tiny": 4},
        "args": {"max_steps": 2, "learning_rate": 1e-2, "per_device_train_batch_size": 2, "save_strategy": "no"},
        "peft": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    }
    (result,) = run_recipe({"model": {"tiny": "comm"}, "stages": [stage]}, tmp_path / "run")
    init = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "init")
    final = AutoModelForImageTextToText.from_pretrained(result.output_dir)
    before, after = encoder_tensors(init), encoder_tensors(final)
    assert before and all(torch.equal(before[name], after[name]) for name in before)
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(init.state_dict()[name], final.state_dict()[name])


def test_learning_rates_reach_peft_copies_of_trained_components():
    from comm_vlm.training.stages import component_of

    saved = "base_model.model.model.connector.modules_to_save.default.merges.0.layer_logits"
    assert component_of(saved) == "merges"  # so `learning_rates: {merges: ...}` applies under LoRA
    assert component_of("base_model.model.model.multi_modal_projector.original_module.linear_1.weight") == "projector"
    lora = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert component_of(lora) == "llm"
