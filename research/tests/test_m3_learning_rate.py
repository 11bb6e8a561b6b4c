"""M3's fine-tuning learning rate (`research/m3_learning_rate.py`): the table and an end-to-end smoke run."""

import json
import sys

import pytest
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("m3_learning_rate")


def scores(rec: float, pope: float, attribute: float) -> dict:
    """One scale's checks, `(value, bar)`: bars 0.1 (REC), 0.75 (POPE) and 0.6 (attribute)."""
    return {"REC acc@0.5": (rec, 0.1), "POPE acc": (pope, 0.75), "VQA attribute": (attribute, 0.6)}


def test_table_reads_the_full_scale_against_the_bars_and_counts_the_seeds(bench):
    results = {
        0: {1.0: {64.0: scores(0.2, 0.8, 0.59), 16.0: scores(0.1, 0.7, 0.5)}, 0.3: {64.0: scores(0.3, 0.8, 0.6)}},
        1: {1.0: {64.0: scores(0.05, 0.7, 0.7), 16.0: scores(0.0, 0.6, 0.4)}, 0.3: {64.0: scores(0.1, 0.9, 0.7)}},
    }
    table = bench.markdown(results)
    assert "| 0 | 1 | 20.0 (2.00) | 80.0 (1.07) | 59.0 (0.98) | 10.0 | 70.0 | 50.0 |" in table
    assert "| 1 | 0.3 | 10.0 (1.00) | 90.0 (1.20) | 70.0 (1.17) | - | - | - |" in table  # no 16-token scale run
    assert "- lr scale 1, VQA attribute: 1" in table and "- lr scale 0.3, VQA attribute: 2" in table
    assert "- lr scale 1, REC acc@0.5: 1" in table and "- lr scale 0.3, REC acc@0.5: 2" in table


def test_quick_run_trains_comm_once_then_m3_at_each_rate(bench, tmp_path, monkeypatch):
    argv = ["m3_learning_rate.py", "--quick", "--lr-scales", "1", "0.1", "--runs-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    comm = json.loads((tmp_path / "seed0" / "results.json").read_text())
    assert list(comm["models"]) == ["comm"]  # the seed had no run: COMM alone was trained for it
    table = (tmp_path / "m3_learning_rate.md").read_text()
    assert "| 0 | 1 |" in table and "| 0 | 0.1 |" in table
    assert (tmp_path / "m3_learning_rate.png").stat().st_size > 0

    def llm_change(rate: str) -> float:
        work = tmp_path / "m3_seed0" / f"lr{rate}"
        before = load_file(str(work / "init" / "model.safetensors"))
        after = load_file(str(next(work.glob("*-m3_finetune/final")) / "model.safetensors"))
        names = [n for n in before if n.startswith("model.language_model.")]
        return sum(float((after[n] - before[n]).abs().sum()) for n in names)

    # The rate reaches the LLM's optimizer group: same seed, data and steps, a tenth of the rate, a smaller change.
    assert 0 < llm_change("0.1") < 0.5 * llm_change("1")


def test_a_seed_run_without_comm_is_refused_with_what_to_do(bench, tmp_path):
    (tmp_path / "seed0").mkdir()
    (tmp_path / "seed0" / "results.json").write_text(json.dumps({"models": {"adaptive_combiner": {}}}))
    with pytest.raises(
        ValueError, match=r"seed0/results.json has no trained COMM \(models: \['adaptive_combiner'\]\): point"
    ):
        bench.trained_comm(bench.MainJobConfig.quick(), tmp_path)
