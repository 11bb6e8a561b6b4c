"""The held-out split's size (`research/held_out_size.py`): the table, and saved models scored on both splits."""

import json
import sys
from dataclasses import asdict

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor

from comm_vlm.demo.main_job import MainJobConfig, build_family_model, derive_family_model
from comm_vlm.demo.synthetic import SyntheticConfig, make_synthetic_splits
from comm_vlm.evaluation.runners import evaluate


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("held_out_size")


def checks(rec: float, attribute: float, attribute_bar: float) -> dict:
    """One model's `(value, bar)` per reported check; REC's bar 0.1, POPE 0.8 against 0.75, colour and shape 0."""
    return {
        "REC acc@0.5": (rec, 0.1),
        "POPE acc": (0.8, 0.75),
        "VQA attribute": (attribute, attribute_bar),
        "VQA colour": (0.0, 0.0),
        "VQA shape": (0.0, 0.0),
    }


def split(families: dict, shape_share: float) -> dict:
    return {
        "majority": {"colour": 0.3, "colour questions": 10, "shape": shape_share, "shape questions": 20},
        "families": families,
    }


def test_table_puts_each_seed_on_both_splits_and_counts_the_seeds_meeting_each_bar(bench):
    scores = {
        0: {100: split({"comm": checks(0.2, 0.66, 0.70)}, 0.45), 500: split({"comm": checks(0.2, 0.66, 0.64)}, 0.42)},
        1: {100: split({"comm": checks(0.05, 0.80, 0.72)}, 0.47), 500: split({"comm": checks(0.12, 0.70, 0.66)}, 0.4)},
    }
    table = bench.markdown(scores, (100, 500))
    assert "| comm | VQA attribute (2x per-type majority) | 0 | 66.0 / 70.0 | 0.94 | 66.0 / 64.0 | 1.03 |" in table
    assert "| comm | REC acc@0.5 (3x chance) | 1 | 5.0 / 10.0 | 0.50 | 12.0 / 10.0 | 1.20 |" in table
    assert "| comm | VQA colour (2x colour majority) | 0 | 0.0 / 0.0 | - | 0.0 / 0.0 | - |" in table  # no bar
    assert "- comm, VQA attribute: 1 -> 2" in table and "- comm, REC acc@0.5: 1 -> 2" in table
    assert "- seed 1: 100 scenes: colour 30.0% (10), shape 47.0% (20); 500 scenes: colour 30.0% (10)" in table


def test_saved_models_are_scored_on_the_jobs_split_and_a_larger_one(bench, tmp_path, monkeypatch):
    config = MainJobConfig.quick()
    comm_dir = tmp_path / "runs" / "seed0" / "comm"
    build_family_model("comm", config, comm_dir)
    derive_family_model("matryoshka_llava", config, comm_dir, tmp_path / "runs" / "seed0" / "m3")
    models = {"comm": {"final_dir": str(comm_dir)}, "matryoshka_llava": {"final_dir": str(tmp_path / "runs/seed0/m3")}}
    # A results.json without `vqa_test_scenes`: every task, VQA included, scored on `test_scenes` scenes.
    results = {"config": {k: v for k, v in asdict(config).items() if k != "vqa_test_scenes"}, "models": models}
    (tmp_path / "runs" / "seed0" / "results.json").write_text(json.dumps(results))
    argv = ["held_out_size.py", "--runs-dir", str(tmp_path / "runs"), "--seeds", "0", "--test-scenes", "12"]
    monkeypatch.setattr(sys, "argv", [*argv, "--output-dir", str(tmp_path / "out")])
    bench.main()

    scores = json.loads((tmp_path / "out" / "held_out_size.json").read_text())["0"]
    assert set(scores) == {str(config.test_scenes), "12"}
    assert (tmp_path / "out" / "held_out_size.png").stat().st_size > 0
    # The job's own split gives what the job itself scored: the same scenes, drawn again, through `evaluate`.
    synthetic = SyntheticConfig(image_after_question=config.image_after_question)
    test = make_synthetic_splits(
        config.train_scenes, config.test_scenes, seed=0, config=synthetic, image_dir=tmp_path / "again"
    )["test"]
    model = AutoModelForImageTextToText.from_pretrained(comm_dir).eval()
    job = evaluate(model, AutoProcessor.from_pretrained(comm_dir), test, batch_size=config.eval_batch_size)
    job = job.to_dict(with_predictions=False)["tasks"]
    assert scores[str(config.test_scenes)]["families"]["comm"]["POPE acc"] == [
        job["pope"]["metrics"]["accuracy"],
        0.75,
    ]
    assert (
        scores[str(config.test_scenes)]["families"]["comm"]["REC acc@0.5"][1] == 3 * job["rec"]["baseline"]["accuracy"]
    )
    # M3 starts as an exact copy of COMM's weights, so at its full scale it answers as COMM does.
    assert scores["12"]["families"]["matryoshka_llava"] == scores["12"]["families"]["comm"]
    larger = scores["12"]["majority"]
    assert larger["shape questions"] > scores[str(config.test_scenes)]["majority"]["shape questions"]
