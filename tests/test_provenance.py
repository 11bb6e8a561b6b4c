"""Provenance of what ran: `comm-vlm train` records the resolved recipe, the SFT arguments, the steps, the data and the
library versions in `training_provenance.json` (run directory and each stage's `final/`), `final/` gets a model card
and remote code, `comm-vlm push` describes the recorded run, and a save killed mid-way leaves no half-written `final/`.

One module-scoped run (a tiny COMM, two stages, `max_steps=2` over the YAML's 4, a first-stage dataset with two bad
rows) feeds every test.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
import yaml
from huggingface_hub import ModelCard

import comm_vlm
from comm_vlm.cli import main
from comm_vlm.hub import PROVENANCE_FILE, ModelCardInfo, read_provenance, render_model_card
from comm_vlm.training import COMPONENTS, RunProvenance, make_tiny_dataset, save_atomically
from comm_vlm.training.provenance import LIBRARIES, ships_remote_code


ARGS = {"learning_rate": 1.0e-3, "per_device_train_batch_size": 4, "max_steps": 4, "logging_steps": 1, "seed": 0}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Trains the recipe through the CLI; returns the run directory."""
    tmp = tmp_path_factory.mktemp("provenance")
    data = tmp / "data"
    path = make_tiny_dataset(data, 10)
    (data / "3.png").unlink()  # a missing image
    records = json.loads(path.read_text())
    records.append({"id": "q", "image": "0.png", "conversations": [{"from": "human", "value": "<image>\nHi?"}]})
    path.write_text(json.dumps(records))
    recipe = {
        "model": {"tiny": "comm"},
        "stages": [
            {
                "stage": "comm_pretrain",
                "dataset": {"path": str(path), "format": "llava", "image_folder": str(data)},
                "args": {**ARGS, "save_steps": 2},
            },
            {"stage": "comm_instruct", "dataset": {"tiny": 8}, "args": {**ARGS, "save_steps": 2}},
        ],
    }
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp / "run"
    assert main(["train", "--recipe", str(tmp / "recipe.yaml"), "--output-dir", str(out), "max_steps=2"]) == 0
    return out


def test_the_run_records_the_resolved_recipe_the_steps_the_data_and_the_versions(run):
    record = read_provenance(run)
    assert record["overrides"] == {"max_steps": 2} and record["recipe_path"].endswith("recipe.yaml")
    assert [s["args"]["max_steps"] for s in record["recipe"]["stages"]] == [2, 2]  # resolved: overrides applied
    assert "loaded_from" not in record["recipe"]
    first, second = record["stages"]
    for stage in (first, second):
        assert stage["steps"]["global_step"] == 2 and stage["steps"]["resumed_from"] is None
        assert stage["sft_args"]["max_steps"] == 2 and stage["sft_args"]["lr_scheduler_type"] == "cosine"
        assert stage["batch"] == {
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "world_size": 1,
            "global_batch_size": 4,
        }
        assert stage["train_loss"] > 0 and stage["metrics"]["train_loss"] == stage["train_loss"]
        trained = stage["trainable"]["per_component"]
        assert set(trained) == {"merges", "aligners", "projector", "llm"} <= set(COMPONENTS)
        assert sum(trained.values()) == stage["trainable"]["trainable"] < stage["trainable"]["total"]
        assert "hub_token" not in stage["sft_args"]
    assert first["data"]["samples"] == {
        "total": 11,
        "kept": 9,
        "skipped": 2,
        "skipped_by_reason": {"missing image": 1, "no assistant turn": 1},
    }
    assert first["data"]["train_rows"] == 9 and first["data"]["resolved"] is None
    assert second["data"]["spec"] == {"tiny": 8} and second["data"]["resolved"]["format"] == "llava"
    versions = record["versions"]
    assert set(versions) == {name.replace("-", "_") for name in LIBRARIES} | {"python"}
    assert versions["transformers"] == transformers.__version__ and versions["comm_vlm"] == comm_vlm.__version__
    # each final/ records the stages that made its model, and how to load it
    finals = [read_provenance(Path(s["final_dir"])) for s in record["stages"]]
    assert [len(f["stages"]) for f in finals] == [1, 2]
    assert finals[1]["stages"] == record["stages"] and finals[1]["model_type"] == "comm"
    load = finals[1]["load"]
    assert load["remote_code"] is True
    assert f'from_pretrained("{second["final_dir"]}", trust_remote_code=True)' in load["without_comm_vlm"]
    assert load["with_comm_vlm"].startswith("import comm_vlm")


def test_final_has_a_card_of_what_ran_and_its_remote_code(run):
    final = run / "1-comm_instruct" / "final"
    card = ModelCard.load(final / "README.md")
    text = card.content
    assert "- ran: 2 optimizer steps (0.667 epochs), global batch size 4, mean training loss " in text
    assert "- ran: 2 optimizer steps (1 epochs), global batch size 4, mean training loss " in text
    assert "`max_steps=2`" in text and "max_steps=4" not in text
    assert "9 of 11 samples used, skipped missing image: 1, no assistant turn: 1" in text
    assert "with the overrides `max_steps=2`: 2 stages, 4 optimizer steps in all" in text
    assert f"transformers {transformers.__version__}" in text and PROVENANCE_FILE in text
    assert f'from_pretrained("{final}", trust_remote_code=True)' in text and "`import comm_vlm`" in text
    assert card.data.pipeline_tag == "image-text-to-text"
    assert ships_remote_code(final) and {"modeling_comm.py", "configuration_comm.py"} <= {
        p.name for p in final.glob("*.py")
    }
    # the next stage trained from final/ without its remote-code `auto_map`: its checkpoints stay plain directories
    checkpoint = run / "1-comm_instruct" / "checkpoints" / "checkpoint-2"
    assert "AutoConfig" not in json.loads((checkpoint / "config.json").read_text()).get("auto_map", {})
    assert not any(checkpoint.glob("*.py")) and not ships_remote_code(checkpoint)


def test_push_describes_the_run_that_happened(run, tmp_path, capsys):
    final = run / "1-comm_instruct" / "final"
    recipe = str(run.parent / "recipe.yaml")  # its YAML says max_steps: 4
    out = tmp_path / "repo"
    assert main(["push", str(final), "me/tiny", "--local-dir", str(out), "--recipe", recipe]) == 0
    assert "the card describes that run, not --recipe" in capsys.readouterr().err
    text = (out / "README.md").read_text()
    assert "- ran: 2 optimizer steps" in text and "max_steps=4" not in text and "`max_steps=2`" in text
    assert 'from_pretrained("me/tiny", trust_remote_code=True)' in text
    shipped = json.loads((out / PROVENANCE_FILE).read_text())
    assert [s["steps"]["global_step"] for s in shipped["stages"]] == [2, 2]
    assert 'from_pretrained("me/tiny", trust_remote_code=True)' in shipped["load"]["without_comm_vlm"]
    # --card fields win over the record
    (tmp_path / "card.json").write_text(json.dumps({"training": [{"stage": "described by hand"}]}))
    card = str(tmp_path / "card.json")
    assert main(["push", str(final), "me/tiny", "--local-dir", str(tmp_path / "b"), "--card", card]) == 0
    text = (tmp_path / "b" / "README.md").read_text()
    assert "### Stage 1: described by hand" in text and "optimizer steps" not in text


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_save_killed_midway_leaves_the_previous_final(run, tmp_path):
    """The process dies after the weights and the record are written, before the card: `final/` is the old one."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    source = run / "0-comm_pretrain" / "final"
    target = tmp_path / "stage" / "final"
    shutil.copytree(source, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    model = AutoModelForImageTextToText.from_pretrained(source)
    processor = AutoProcessor.from_pretrained(source)
    provenance = RunProvenance({"model": {"tiny": "comm"}, "stages": []}, tmp_path)
    write = provenance.final_files(model.config, target)

    def dies_before_the_card(directory: Path) -> None:
        from comm_vlm.training import provenance as module

        module.render_model_card = lambda *args, **kwargs: os._exit(17)
        write(directory)

    pid = os.fork()
    if pid == 0:  # the child saves and is killed mid-way; it never returns to pytest
        try:
            save_atomically(model, processor, target, remote_code=True, write_extra=dies_before_the_card)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 17
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    leftovers = [p for p in target.parent.iterdir() if p.name.startswith(".final.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / PROVENANCE_FILE).is_file()  # a hidden temp dir, never final/
    assert not (leftovers[0] / "README.md").exists()
    # without a previous final/, an interrupted save leaves nothing at all
    fresh = tmp_path / "fresh" / "final"

    def interrupted(directory: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_atomically(model, processor, fresh, remote_code=True, write_extra=interrupted)
    assert list(fresh.parent.iterdir()) == []


def test_without_remote_code_the_card_and_record_say_import_comm_vlm(run, tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from comm_vlm.hub import remote_code

    source = run / "0-comm_pretrain" / "final"
    model = AutoModelForImageTextToText.from_pretrained(source)
    processor = AutoProcessor.from_pretrained(source)
    vars(model.config).pop("auto_map", None)

    def refuse(directory):
        raise ValueError("modeling_comm.py: import yaml")

    monkeypatch.setattr(remote_code, "check_remote_code", refuse)
    provenance = RunProvenance({"model": {"tiny": "comm"}, "stages": []}, tmp_path)
    target = tmp_path / "final"
    save_atomically(
        model, processor, target, remote_code=True, write_extra=provenance.final_files(model.config, target)
    )
    assert not ships_remote_code(target) and not any(target.glob("*.py"))
    load = read_provenance(target)["load"]
    assert load["remote_code"] is False and load["without_comm_vlm"] is None
    assert load["with_comm_vlm"].startswith("import comm_vlm")
    text = (target / "README.md").read_text()
    assert "import comm_vlm  # registers `comm`" in text and "trust_remote_code" not in text
    assert "It loads after `import comm_vlm`" in text
    assert "trust_remote_code" not in render_model_card(model.config, ModelCardInfo(remote_code=False)).content


def test_a_broken_record_is_a_clear_error(tmp_path):
    assert read_provenance(tmp_path) is None
    (tmp_path / PROVENANCE_FILE).write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON .*remove it to publish"):
        read_provenance(tmp_path)
    (tmp_path / PROVENANCE_FILE).write_text("[]")
    with pytest.raises(ValueError, match="not a comm-vlm training record"):
        read_provenance(tmp_path)


FRESH = r"""
import importlib.abc, json, os, sys

package = os.path.realpath(sys.argv[1])
sys.path[:] = [p for p in sys.path if not os.path.realpath(p or os.getcwd()).startswith(package)]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "comm_vlm":
            raise ModuleNotFoundError(name)


sys.meta_path.insert(0, Refuse())
from transformers import AutoModelForImageTextToText

results = []
for directory in sys.argv[2:]:
    for trust in (None, True):  # without `trust_remote_code`, transformers asks on stdin (here: no answer)
        try:
            model = AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=trust)
            results.append(f"loaded {type(model).__name__}")
        except ValueError as err:
            results.append(f"error {' '.join(str(err).split())}")
print("\n" + json.dumps(results))
"""


def test_final_loads_without_the_package_and_says_how(run, tmp_path):
    """Without comm_vlm: final/ (remote code) loads with `trust_remote_code=True` and otherwise asks for it; a plain
    checkpoint fails with transformers' fixed "upgrade transformers" message, which no config field changes."""
    (tmp_path / "fresh.py").write_text(FRESH)
    final = run / "1-comm_instruct" / "final"
    checkpoint = run / "1-comm_instruct" / "checkpoints" / "checkpoint-2"
    package = Path(comm_vlm.__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "modules"))
    done = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "fresh.py"), str(package), str(final), str(checkpoint)],
        stdin=subprocess.DEVNULL,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = json.loads(done.stdout.splitlines()[-1])
    assert lines[0].startswith("error") and "Please pass the argument `trust_remote_code=True`" in lines[0]
    assert lines[1] == "loaded CommForConditionalGeneration"
    assert all("pip install --upgrade transformers" in line for line in lines[2:])


def test_lora_counts_adapters_and_full_copies_under_their_components(run, tmp_path):
    from comm_vlm.training import run_recipe

    lora = {"r": 4, "lora_alpha": 8, "target_modules": r".*language_model.*\.(q_proj|v_proj)"}
    stage = {
        "stage": "comm_pretrain",
        "dataset": {"tiny": 4},
        "args": {"max_steps": 1, "per_device_train_batch_size": 2, "save_strategy": "no"},
        "peft": lora,
    }
    run_recipe({"model": {"tiny": "comm"}, "stages": [stage]}, tmp_path)
    record = read_provenance(tmp_path / "0-comm_pretrain" / "final")
    assert record["overrides"] is None and record["recipe_path"] is None  # not from `load_recipe`
    (entry,) = record["stages"]
    assert entry["peft"] == lora and entry["steps"]["global_step"] == 1
    counts = entry["trainable"]["per_component"]
    assert set(counts) == {"merges", "aligners", "projector", "llm"}  # `modules_to_save` copies, LoRA adapters
    full = read_provenance(run)["stages"][0]["trainable"]["per_component"]["llm"]  # the same tiny COMM, no LoRA
    assert 0 < counts["llm"] < full / 10  # the adapters only
    assert "LoRA {'r': 4" in (tmp_path / "0-comm_pretrain" / "final" / "README.md").read_text()
