"""`benchmarks/bench_train_step.py` end to end (quick): its collations and steps are asserted equal before timing."""

import importlib.util
import sys
from pathlib import Path


def test_quick_run_prints_both_ratios(monkeypatch, capsys):
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))  # the script imports its sibling `bench_utils`
    spec = importlib.util.spec_from_file_location("bench_train_step", folder / "bench_train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["bench_train_step.py", "--quick", "--batch-size", "4"])
    bench.main()
    out = capsys.readouterr().out
    assert "| collation, assistant masks on the tensor vs `ProcessorMixin`'s loop |" in out
    assert "| forward + backward + AdamW, checkpointing off vs on |" in out
