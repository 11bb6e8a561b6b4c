"""The main job's seed study (`research/main_job_seeds.py`): the bar checks and an end-to-end smoke run."""

import json
import sys

import pytest


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("main_job_seeds")


def fake_results(rec: float, pope: float, colour: float, shape: float, attribute: float | None = None) -> dict:
    """A results.json with one model whose baselines are REC chance 0.05 and majority answers 0.25 / 0.4 (colour /
    shape; 0.3 for the attribute questions together). `attribute=None`: the model's attribute score is left out, as
    in a results.json written before it existed."""
    vqa_baseline = {"per_question_type_prior": {"colour": 0.25, "shape": 0.4}, "per_question_group_prior": {}}
    vqa_metrics = {"per_question_type": {"colour": colour, "shape": shape}}
    if attribute is not None:
        vqa_baseline["per_question_group_prior"]["attribute"] = 0.3
        vqa_metrics["per_question_group"] = {"attribute": attribute}
    evaluation = {
        "rec": {"metrics": {"accuracy": rec}, "baseline": {"accuracy": 0.05}},
        "pope": {"metrics": {"accuracy": pope}},
        "vqa": {"metrics": vqa_metrics, "baseline": vqa_baseline},
    }
    return {"models": {"comm": {"eval": evaluation}}, "seconds": 1.0}


def test_checks_meet_a_bar_at_or_above_it_only(bench):
    # Seed 0 sits exactly on every bar; seed 1 is just under each.
    results = {0: fake_results(0.15, 0.75, 0.5, 0.8, 0.6), 1: fake_results(0.149, 0.749, 0.499, 0.799, 0.599)}
    rows = bench.check_rows(results)
    assert [row["check"] for row in rows] == ["REC acc@0.5", "POPE acc", "VQA attribute", "VQA colour", "VQA shape"]
    assert all(row["met"] == [0] for row in rows)
    assert [round(row["bars"][0], 6) for row in rows] == [15.0, 75.0, 60.0, 50.0, 80.0]
    table = bench.markdown(rows, results)
    assert "| comm | REC acc@0.5 (3x chance) | 15.0 (1.00) | 14.9 (0.99) | 1 of 2 |" in table
    assert "| comm | VQA attribute (2x per-type majority) | 60.0 (1.00) | 59.9 (1.00) | 1 of 2 |" in table


def test_a_results_file_without_the_attribute_score_is_refused_with_what_to_do(bench):
    with pytest.raises(ValueError, match="predates that metric: delete that seed's directory"):
        bench.check_rows({0: fake_results(0.2, 0.9, 0.6, 0.9)})


def test_quick_run_reuses_finished_seeds_and_writes_the_table_and_plot(bench, tmp_path, monkeypatch):
    (tmp_path / "seed5").mkdir()
    (tmp_path / "seed5" / "results.json").write_text(json.dumps(fake_results(0.2, 0.9, 0.6, 0.9, 0.7)))
    argv = ["main_job_seeds.py", "--quick", "--families", "comm", "--seeds", "5", "1", "--runs-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)  # --quick: the table and plot go beside the runs
    bench.main()
    assert json.loads((tmp_path / "seed1" / "results.json").read_text())["config"]["seed"] == 1
    table = (tmp_path / "main_job_seeds.md").read_text()
    assert "| model | check (bar) | seed 5 | seed 1 | seeds meeting the bar |" in table
    assert "| comm | REC acc@0.5 (3x chance) | 20.0 (1.33) |" in table  # seed 5 read back, not run
    assert (tmp_path / "main_job_seeds.png").stat().st_size > 0


def test_against_lists_the_other_runs_check_after_each_check(bench, tmp_path):
    results = {0: fake_results(0.2, 0.9, 0.6, 0.9, 0.7), 1: fake_results(0.1, 0.7, 0.5, 0.8, 0.6)}
    for seed, pope in ((0, 0.8), (1, 0.76)):
        (tmp_path / f"seed{seed}").mkdir()
        other = fake_results(0.05, pope, 0.4, 0.7, 0.5)
        other["models"]["extra_family"] = other["models"]["comm"]  # models the runs do not have are left out
        (tmp_path / f"seed{seed}" / "results.json").write_text(json.dumps(other))
    rows = bench.against_rows(bench.check_rows(results), results, tmp_path, "default")
    assert [(row["model"], row["check"]) for row in rows[:4]] == [
        ("comm", "REC acc@0.5"),
        ("comm (default)", "REC acc@0.5"),
        ("comm", "POPE acc"),
        ("comm (default)", "POPE acc"),
    ]
    assert len(rows) == 2 * len(bench.CHECKS)
    table = bench.markdown(rows, results)
    assert "| comm | POPE acc (>= 75) | 90.0 (1.20) | 70.0 (0.93) | 1 of 2 |" in table
    assert "| comm (default) | POPE acc (>= 75) | 80.0 (1.07) | 76.0 (1.01) | 2 of 2 |" in table


def test_against_refuses_runs_it_cannot_pair(bench, tmp_path):
    results = {0: fake_results(0.2, 0.9, 0.6, 0.9, 0.7)}
    with pytest.raises(ValueError, match="seed0/results.json does not exist: `--against` needs finished runs"):
        bench.against_rows(bench.check_rows(results), results, tmp_path, "default")
    (tmp_path / "seed0").mkdir()
    other = fake_results(0.2, 0.9, 0.6, 0.9, 0.7)
    other["models"] = {"adaptive_combiner": other["models"]["comm"]}
    (tmp_path / "seed0" / "results.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"have no \['comm'\] model"):
        bench.against_rows(bench.check_rows(results), results, tmp_path, "default")
