"""`benchmarks/bench_eval.py` end to end (small): batched answers asserted equal to the per-sample loop's, timed."""

import sys


def test_small_run_prints_the_throughput_table(load_benchmark, monkeypatch, capsys):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # set here so that the script's default does not outlive the test
    bench = load_benchmark("bench_eval")
    argv = ["bench_eval.py", "--quick", "--rows", "8", "--new-tokens", "4", "--batch-sizes", "1", "4"]
    monkeypatch.setattr(sys, "argv", [*argv, "--threads", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert "| per-sample loop (`model.generate`, 1 row) |" in out
    assert "| `generate_answers`, batch 4 |" in out and "| 8/8 |" in out
