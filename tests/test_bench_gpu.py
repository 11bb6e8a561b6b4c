"""`benchmarks/bench_gpu.py` at tiny size on CPU: every row of the GPU table runs and is printed and written."""

import re
import time


def test_tiny_cpu_run_prints_and_writes_every_row(load_benchmark, tmp_path, capsys):
    bench = load_benchmark("bench_gpu")
    output = tmp_path / "bench_gpu.md"
    start = time.perf_counter()
    table = bench.main(["--device", "cpu", "--size", "tiny", "--reps", "1", "--output", str(output)])
    elapsed = time.perf_counter() - start
    printed, written = capsys.readouterr().out, output.read_text()
    rows = bench.row_names(["sdpa"])
    assert len(rows) == 4 + 5 + 3  # train x 4 builds, prefill x 5 M3 scales, generate x 3 models
    for row in rows:
        assert f"| {row} |" in printed and f"| {row} |" in written, row
    assert "failed" not in table
    assert table.count("ids equal to llava-hf: True") == 1  # fp32: our LLaVA layout generates llava-hf's ids
    ratios = [float(r) for r in re.findall(r"fwd formula / counted ([0-9.]+)", table)]
    assert len(ratios) == 4 and all(0.95 <= r <= 1.05 for r in ratios), ratios  # MFU's FLOPs formula vs counted
    assert elapsed < 60, f"tiny run took {elapsed:.0f} s"
