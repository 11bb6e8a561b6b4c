"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes (DeepSpeed's CPU accelerator over gloo) through `accelerate
launch`: the losses and the saved `final/` weights equal a DDP run's. ZeRO-3 partitions every parameter
(`stage3_param_persistence_threshold: 0`; by default a tiny model's parameters would all stay whole), so the test sees
`final/` written from the gathered shards.

DeepSpeed is not a dependency of comm-vlm (it is installed on the training machines): these tests run where it is
installed (`pip install "deepspeed==0.19.*"`: about 1.5 minutes here, and its first launch builds a CPU
communication op, about 2 minutes) and are skipped elsewhere, the default test environment included.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file


pytest.importorskip("deepspeed", reason="DeepSpeed is optional: pip install 'deepspeed==0.19.*' to run these")

ROOT = Path(__file__).parents[1]
ENV = {
    **os.environ,
    "PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'tests'}",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
}
LAUNCH = """compute_environment: LOCAL_MACHINE
distributed_type: {kind}
{plugin}
machine_rank: 0
num_machines: 1
num_processes: 2
rdzv_backend: static
same_network: true
use_cpu: false
"""


def _launch(tmp_path: Path, name: str, kind: str, plugin: str = "") -> tuple[list[float], dict]:
    config = tmp_path / f"{name}.yaml"
    config.write_text(LAUNCH.format(kind=kind, plugin=plugin))
    out = tmp_path / name
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += [str(ROOT / "tests/ddp_worker.py"), str(out), "max_steps=2", "logging_steps=1"]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Launched with" not in result.stderr  # Accelerate ran the requested kind
    record = json.loads((out / "training_provenance.json").read_text())
    losses = [stage["train_loss"] for stage in record["stages"]]  # the stage's mean training loss
    return losses, load_file(out / "0-comm_pretrain" / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("ddp"), "ddp", "MULTI_GPU")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_and_saves_as_ddp_does(stage, ddp, tmp_path):
    zero = {
        "stage": stage,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    settings = {"zero_optimization": zero, "gradient_clipping": "auto"}
    settings.update({k: "auto" for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")})
    (tmp_path / "zero.json").write_text(json.dumps({**settings, "train_batch_size": "auto"}))
    plugin = f"deepspeed_config:\n  deepspeed_config_file: {tmp_path / 'zero.json'}\n  zero3_init_flag: {stage == 3}"
    losses, weights = _launch(tmp_path, f"zero{stage}", "DEEPSPEED", plugin)
    ddp_losses, ddp_weights = ddp
    assert losses and losses == pytest.approx(ddp_losses, rel=1e-5)
    assert weights.keys() == ddp_weights.keys()
    for name, tensor in ddp_weights.items():
        assert weights[name].shape == tensor.shape, name  # gathered, not the rank's empty shard
        assert (weights[name] - tensor).abs().max() <= 1e-5, name
