"""`benchmarks/bench_train_step.py` end to end (quick): collations, steps and losses asserted equal before timing."""

import sys


def test_quick_run_prints_both_ratios(load_benchmark, monkeypatch, capsys):
    bench = load_benchmark("bench_train_step")
    monkeypatch.setattr(sys, "argv", ["bench_train_step.py", "--quick", "--batch-size", "4"])
    bench.main()
    out = capsys.readouterr().out
    assert "| collation, assistant masks on the tensor vs `ProcessorMixin`'s loop |" in out
    assert "| forward + backward + AdamW, checkpointing off vs on |" in out
    assert "| loss + backward + AdamW, answer tokens (`CommSFTTrainer`) vs TRL's fused LM head |" in out
