"""The combiner's REC learning curve (`benchmarks/combiner_rec.py`): the curve callback and an end-to-end smoke run."""

import sys

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("combiner_rec")


def test_quick_run_scores_rec_during_stage_2_and_writes_the_table_and_plot(bench, tmp_path, monkeypatch):
    argv = ["combiner_rec.py", "--quick", "--output-dir", str(tmp_path), "--name", "curve"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    table = (tmp_path / "curve.md").read_text()
    assert all(f"| {name} |" in table for name in bench.VARIANTS)
    assert "| 2 | " in table  # the curve's one point: stage-2 step 2 of 3 (`--quick` scores every 2 steps)
    assert "3x" in table and (tmp_path / "curve.png").stat().st_size > 0
    assert sorted(path.name for path in tmp_path.glob("*.*")) == ["curve.md", "curve.png"]
