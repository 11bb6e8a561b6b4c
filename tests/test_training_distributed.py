"""`accelerate launch --num_processes 2` on the CPU (gloo): a few DDP steps; both ranks end with identical weights."""

import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).parents[1]


def test_ddp_two_cpu_ranks_end_identical(tmp_path):
    launcher = str(Path(sys.executable).parent / "accelerate")
    config = ROOT / "src/comm_vlm/accelerate_configs/ddp_cpu.yaml"
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'tests'}",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        launcher,
        "launch",
        "--config_file",
        str(config),
        str(ROOT / "tests/ddp_worker.py"),
        str(tmp_path),
        "max_steps=3",
        "logging_steps=1",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = [(tmp_path / f"rank{r}.sha256").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    # Both ranks trained: a global batch of 2 x 4 samples per step, so 3 steps cover 1.5 epochs of 16 samples.
    assert "'epoch': '1.5'" in result.stdout + result.stderr
