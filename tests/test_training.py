"""Training: each stage trains exactly its components; loss falls; LoRA merge; bad data; atomic saves; resume."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import AutoModelForImageTextToText, TrainerCallback

from comm_vlm.testing import build_tiny_checkpoint
from comm_vlm.training import (
    STAGES,
    build_dataset,
    build_trainer,
    component_of,
    default_sft_config,
    load_recipe,
    make_tiny_dataset,
    mix_datasets,
    run_recipe,
    save_atomically,
    shikra_to_messages,
    validate_samples,
)
from comm_vlm.training.data import load_source, sample_problem
from comm_vlm.training.recipes import stage_with_learning_rates


TINY_COMM = str(Path(__file__).parent / "recipes" / "tiny_comm.yaml")  # a random tiny COMM, both stages


def tiny_model(tmp_path, layout):
    model, processor = build_tiny_checkpoint(tmp_path / f"init-{layout}", layout=layout)
    return model, processor


def train(model, processor, dataset, stage, tmp_path, steps=2, **overrides):
    args = default_sft_config(
        tmp_path / "out",
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        **overrides,
    )
    trainer = build_trainer(model, processor, dataset, stage, args)
    trainer.train()
    return trainer


STAGE_CASES = [
    ("llava_pretrain", "llava"),
    ("llava_instruct", "llava"),
    ("comm_pretrain", "comm"),
    ("comm_instruct", "comm"),
    ("m3_finetune", "comm"),
]


@pytest.mark.parametrize("stage_name,layout", STAGE_CASES)
def test_stage_changes_exactly_its_parameters(stage_name, layout, tiny_data, tmp_path):
    model, processor = tiny_model(tmp_path, layout)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, processor, tiny_data, stage_name, tmp_path)
    stage = STAGES[stage_name]
    changed_components = set()
    for name, param in model.named_parameters():
        component = component_of(name)
        changed = not torch.equal(before[name], param.detach())
        if component not in stage.trains:
            assert not changed, f"{name} ({component}) is frozen in {stage_name} but changed"
            assert not param.requires_grad
        elif changed:
            changed_components.add(component)
    present = {component_of(n) for n in before}
    assert changed_components == {c for c in stage.trains if c in present}


def test_vision_tower_gets_its_own_learning_rate(tiny_data, tmp_path):
    model, processor = tiny_model(tmp_path, "comm")
    args = default_sft_config(tmp_path / "out", max_steps=1, learning_rate=1e-3, save_strategy="no")
    trainer = build_trainer(model, processor, tiny_data, "m3_finetune", args)
    optimizer = trainer.create_optimizer()
    vision = {id(p) for p in model.model.vision_tower.parameters()}
    lrs = {g["lr"] for g in optimizer.param_groups if any(id(p) in vision for p in g["params"])}
    others = {g["lr"] for g in optimizer.param_groups if not any(id(p) in vision for p in g["params"])}
    assert lrs == {2e-5} and others == {1e-3}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in model.parameters())


def test_recipe_learning_rates_override_the_stage_per_component(tmp_path):
    """Recipe `learning_rates` reach the optimiser: the named component at its rate, the rest at the run's."""
    model_dir = tmp_path / "init"
    build_tiny_checkpoint(model_dir, layout="llava", family="adaptive_combiner", combiner_num_latents=4)
    spec = {
        "stage": "combiner",
        "dataset": {"tiny": 4},
        "args": {"max_steps": 1, "learning_rate": 1e-3, "save_strategy": "no", "per_device_train_batch_size": 2},
        "learning_rates": {"combiner": 2e-4},
    }
    seen = {}

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            combiner = {id(p) for p in model.model.combiner.parameters()}
            for group in optimizer.param_groups:
                for param in group["params"]:
                    seen.setdefault("combiner" if id(param) in combiner else "rest", set()).add(group["initial_lr"])

    run_recipe({"model": {"pretrained": str(model_dir)}, "stages": [spec]}, tmp_path / "run", callbacks=[Record()])
    assert seen == {"combiner": {2e-4}, "rest": {1e-3}}
    assert stage_with_learning_rates(spec).learning_rates == {"combiner": 2e-4}
    assert STAGES["combiner"].learning_rates == {}  # the registry is untouched
    m3 = stage_with_learning_rates({"stage": "m3_finetune", "learning_rates": {"projector": 1e-4}})
    assert m3.learning_rates == {"vision_towers": 2e-5, "projector": 1e-4}  # merged over the stage's own


@pytest.mark.parametrize(
    "rates,message",
    [
        ({"vision_towers": 1e-4}, r"names \['vision_towers'\], which the stage does not train"),
        ({"combiner": 0.0}, "must be > 0"),
        ({"combiner": "fast"}, "must be > 0"),
        ([1e-4], "must map components to rates"),
    ],
)
def test_bad_recipe_learning_rates_are_a_clear_error(rates, message, tmp_path):
    path = tmp_path / "recipe.yaml"
    stage = {"stage": "combiner", "dataset": {"tiny": 2}, "learning_rates": rates}
    path.write_text(json.dumps({"model": {"tiny": "llava"}, "stages": [stage]}))
    with pytest.raises(ValueError, match=message):
        load_recipe(str(path))


def test_activation_checkpointing_with_frozen_encoders(tiny_data, tmp_path):
    model, processor = tiny_model(tmp_path, "comm")
    before = model.lm_head.weight.detach().clone()
    train(model, processor, tiny_data, "comm_pretrain", tmp_path, activation_checkpointing=True)
    assert not torch.equal(before, model.lm_head.weight)


def test_recipe_loss_decreases_and_output_generates(tmp_path):
    recipe = load_recipe(TINY_COMM, {"max_steps": 6, "learning_rate": 2e-3})
    results = run_recipe(recipe, tmp_path)
    assert [r.stage for r in results] == ["comm_pretrain", "comm_instruct"]
    losses = [h["loss"] for h in results[0].log_history if "loss" in h]
    assert losses[-1] < losses[0]
    model = AutoModelForImageTextToText.from_pretrained(results[-1].output_dir)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(results[-1].output_dir)
    inputs = processor(
        images=Image.new("RGB", (32, 32), "red"), text="USER: <image>\nColour? ASSISTANT:", return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 4


def test_lora_merged_equals_unmerged(tiny_data, tmp_path):
    from peft import LoraConfig

    model, processor = tiny_model(tmp_path, "comm")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = default_sft_config(tmp_path / "out", max_steps=2, learning_rate=1e-2, save_strategy="no")
    trainer = build_trainer(model, processor, tiny_data, "comm_pretrain", args, peft_config=lora)
    assert {"connector", "multi_modal_projector"} <= set(trainer.model.peft_config["default"].modules_to_save)
    trainer.train()
    peft_model = trainer.model.eval()
    batch = trainer.data_collator([tiny_data[0], tiny_data[1]])
    batch.pop("labels")
    with torch.no_grad():
        unmerged = peft_model(**batch).logits
    from comm_vlm.training import merge_lora_and_save

    merge_lora_and_save(peft_model, processor, tmp_path / "merged")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    with torch.no_grad():
        merged = reloaded(**batch).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


# --- data -------------------------------------------------------------------------------------------------------


@pytest.fixture
def messy_llava(tmp_path):
    Image.new("RGB", (20, 20), "red").save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(Image.new("RGB", (20, 20)).tobytes()[:50])
    good = {"from": "human", "value": "<image>\nWhat colour?"}
    answer = {"from": "gpt", "value": "Red."}
    records = [
        {"id": "ok", "image": "good.png", "conversations": [good, answer]},
        {"id": "missing", "image": "nope.png", "conversations": [good, answer]},
        {"id": "corrupt", "image": "corrupt.png", "conversations": [good, answer]},
        {"id": "no-answer", "image": "good.png", "conversations": [good]},
        {
            "id": "mismatch",
            "image": "good.png",
            "conversations": [{"from": "human", "value": "<image><image>?"}, answer],
        },
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_bad_samples_are_skipped_and_counted(messy_llava):
    dataset = load_source(messy_llava, "llava", image_folder=messy_llava.parent)
    kept, report = validate_samples(dataset)
    assert len(kept) == 1 and report.total == 5 and report.skipped == 4
    assert report.reasons == {
        "missing image": 1,
        "corrupt image": 1,
        "no assistant turn": 1,
        "image placeholder count mismatch": 1,
    }
    assert "4 of 5 samples skipped" in str(report)


def test_each_image_path_is_decoded_once_and_its_outcome_shared(messy_llava, monkeypatch):
    from comm_vlm.training import data

    dataset = load_source(messy_llava, "llava", image_folder=messy_llava.parent)
    # Twice the rows over the same three image paths (good, missing, corrupt).
    rows = [dict(row) for row in dataset] * 2
    decoded = Counter()
    real = data.load_image

    def counting(image):
        decoded[image] += 1
        return real(image)

    monkeypatch.setattr(data, "load_image", counting)
    kept, report = validate_samples(Dataset.from_list(rows))
    assert (report.total, report.kept) == (10, 2)
    assert report.reasons == {
        "missing image": 2,
        "corrupt image": 2,
        "no assistant turn": 2,
        "image placeholder count mismatch": 2,
    }
    assert sorted(decoded.values()) == [1, 1, 1] and len(decoded) == 3
    # A cache passed in is filled and reused: a second dataset over the same files decodes nothing.
    checked: dict = {}
    validate_samples(Dataset.from_list(rows), checked=checked)
    decoded.clear()
    validate_samples(Dataset.from_list(rows), checked=checked)
    assert not decoded and set(checked.values()) == {None, "missing image", "corrupt image"}


def test_mixture_validates_each_source_once_and_never_draws_a_bad_row(messy_llava, tmp_path):
    directory = tmp_path / "tiny"
    clean = make_tiny_dataset(directory, 6)
    spec = {
        "mixture": [
            {"path": str(messy_llava), "format": "llava", "image_folder": str(messy_llava.parent), "weight": 3.0},
            {"path": str(clean), "format": "llava", "image_folder": str(directory), "weight": 1.0},
        ]
    }
    mixed, report = build_dataset(spec, seed=0)
    # Counted per source row (5 messy + 6 clean), not per drawn row; the messy source's 4 bad rows are all dropped.
    assert (report.total, report.kept, report.skipped) == (11, 7, 4)
    assert report.reasons["missing image"] == 1 and report.reasons["corrupt image"] == 1
    good = str(messy_llava.parent / "good.png")
    drawn = [row["images"][0] for row in mixed]
    assert len(mixed) > 11 and drawn.count(good) > 1  # the one good messy row is oversampled at weight 3
    assert all(sample_problem(row) is None for row in mixed)


def test_all_bad_dataset_fails_fast(messy_llava):
    dataset = load_source(messy_llava, "llava", image_folder=messy_llava.parent).select([1, 2])
    with pytest.raises(ValueError, match="No usable sample in the dataset: 2 of 2 samples skipped"):
        validate_samples(dataset)


def test_llava_record_becomes_trl_messages(messy_llava):
    row = load_source(messy_llava, "llava", image_folder=messy_llava.parent)[0]
    assert row["messages"][0] == {
        "role": "user",
        "content": [{"type": "image", "text": None}, {"type": "text", "text": "What colour?"}],
    }
    assert row["images"] == [str(messy_llava.parent / "good.png")]


def test_shikra_boxes_written_like_the_processor(tmp_path):
    record = {
        "image": "x.png",
        "width": 200,
        "height": 100,
        "boxes": [[20, 10, 100, 50], [0, 0, 200, 100]],
        "boxes_seq": [[0], [0, 1]],
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is at <boxes>?"},
            {"from": "gpt", "value": "A cat <boxes>."},
        ],
    }
    row = shikra_to_messages(record, tmp_path)
    assert row["messages"][0]["content"][1]["text"] == "What is at [0.100,0.100,0.500,0.500]?"
    assert row["messages"][1]["content"][0]["text"] == "A cat [0.100,0.100,0.500,0.500;0.000,0.000,1.000,1.000]."


def test_mixture_follows_ratios(tiny_data):
    other = tiny_data.map(lambda r: {"images": r["images"], "messages": r["messages"][:1] + r["messages"][1:]})
    a = tiny_data.add_column("src", ["a"] * len(tiny_data)).select_columns(["messages", "images"])
    mixed = mix_datasets([a, other], [0.5, 0.5], seed=0)
    assert len(mixed) >= len(tiny_data) * 2
    with pytest.raises(ValueError, match="one positive weight per dataset"):
        mix_datasets([a, other], [1.0])


# --- checkpoints ------------------------------------------------------------------------------------------------


def test_save_atomically_keeps_old_checkpoint_on_failure(tmp_path):
    model, processor = build_tiny_checkpoint(tmp_path / "init", layout="llava")
    target = tmp_path / "final"
    save_atomically(model, processor, target)
    before = sorted(p.name for p in target.iterdir())

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_atomically(model, Broken(), target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".final")] == []


KILL_SCRIPT = """
import os, sys
from transformers import TrainerCallback
from comm_vlm.testing import register_tiny_model_source
from comm_vlm.training import load_recipe, run_recipe

register_tiny_model_source()

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(sys.argv[2]):
            os._exit(17)  # a hard kill: no cleanup, no final save

recipe = load_recipe(sys.argv[3], {"max_steps": 6, "save_steps": 2, "resume": True, "logging_steps": 1})
recipe["stages"] = recipe["stages"][:1]
run_recipe(recipe, sys.argv[1], callbacks=[Kill()] if int(sys.argv[2]) else None)
"""


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    env = {"PYTHONPATH": str(Path(__file__).parents[1] / "src"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}

    def run(out, kill_at):
        return subprocess.run(
            [sys.executable, str(script), str(out), str(kill_at), TINY_COMM],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    killed = run(tmp_path / "a", 3)
    assert killed.returncode == 17, killed.stderr[-2000:]
    assert (tmp_path / "a/0-comm_pretrain/checkpoints/checkpoint-2").is_dir()
    assert not (tmp_path / "a/0-comm_pretrain/final").exists()
    resumed = run(tmp_path / "a", 0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = run(tmp_path / "b", 0)
    assert straight.returncode == 0, straight.stderr[-2000:]
    a = AutoModelForImageTextToText.from_pretrained(tmp_path / "a/0-comm_pretrain/final").state_dict()
    b = AutoModelForImageTextToText.from_pretrained(tmp_path / "b/0-comm_pretrain/final").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)

    def losses(out):
        return json.loads((out / "0-comm_pretrain/checkpoints/checkpoint-6/trainer_state.json").read_text())

    la = [h["loss"] for h in losses(tmp_path / "a")["log_history"] if "loss" in h]
    lb = [h["loss"] for h in losses(tmp_path / "b")["log_history"] if "loss" in h]
    assert la == pytest.approx(lb, abs=1e-5)


SHIPPED = sorted(p.stem for p in (Path(__file__).parents[1] / "src/comm_vlm/recipes").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_is_valid(name, tmp_path):
    recipe = load_recipe(name)
    for stage in recipe["stages"]:
        args = {k: v for k, v in stage["args"].items() if k != "resume"}
        config = default_sft_config(tmp_path, **args)  # every key must be a real SFTConfig field
        assert {k for k in args} <= set(type(config).__dataclass_fields__)
    assert set(recipe["model"]) & {"pretrained", "assemble", "convert"}


@pytest.mark.parametrize("name", ["tiny_comm", "tiny_llava", "tiny_m3", "tiny_combiner", "tiny_m3_next"])
def test_tiny_recipe_runs(name, tmp_path):
    results = run_recipe(
        load_recipe(str(Path(__file__).parent / "recipes" / f"{name}.yaml"), {"max_steps": 1}), tmp_path
    )
    assert all(Path(r.output_dir, "model.safetensors").exists() for r in results)


def test_a_recipe_model_needs_exactly_one_known_source(tmp_path):
    from comm_vlm.training.recipes import MODEL_SOURCES, _load_model

    assert {"pretrained", "assemble", "tiny"} <= set(MODEL_SOURCES)  # `tiny`: registered by the tests' conftest
    for source in ({"from_scratch": "comm"}, {"pretrained": "a", "tiny": "comm"}):
        with pytest.raises(ValueError, match="exactly one source among"):
            _load_model(source, tmp_path)
