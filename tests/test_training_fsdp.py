"""FSDP2 on two CPU processes (gloo) trains every family as one process does: equal losses and equal gathered weights,
saved with `save_pretrained` and reloaded with `from_pretrained`; encoder and decoder layers are their own units.

Accelerate 1.15 cannot run FSDP on a machine without an accelerator: `AcceleratorState` only builds the FSDP plugin
for MULTI_GPU-like types, and a CPU launch is MULTI_CPU (plain DDP), so `tests/fsdp_worker.py` shards with torch's
FSDP2 (`fully_shard` per `_no_split_modules` class, as Accelerate's TRANSFORMER_BASED_WRAP does) under
`torch.distributed.run`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText


ROOT = Path(__file__).parents[1]
ENV = {
    **os.environ,
    "PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'tests'}",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
}


def _run(output_dir: Path, family: str, processes: int) -> None:
    worker = [str(ROOT / "tests/fsdp_worker.py"), str(output_dir), family, "3"]
    if processes == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), *worker]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("family", ["comm", "matryoshka_llava", "adaptive_combiner"])
def test_fsdp_two_cpu_ranks_equal_one_process(family, tmp_path):
    _run(tmp_path / "one", family, 1)
    _run(tmp_path / "two", family, 2)
    losses = [json.loads((tmp_path / run / "losses.json").read_text()) for run in ("one", "two")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert losses[0][-1] < losses[0][0]  # it trained
    one, two = (AutoModelForImageTextToText.from_pretrained(tmp_path / run / "final") for run in ("one", "two"))
    reference = one.state_dict()
    for name, tensor in two.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-6, msg=name)
    units = set(json.loads((tmp_path / "two" / "sharded_units.json").read_text()))
    assert {"FSDPCLIPEncoderLayer", "FSDPLlamaDecoderLayer"} <= units  # layers, not the whole model, are units
    if family == "comm":
        assert "FSDPDinov2Layer" in units


def test_an_fsdp_launch_that_accelerate_runs_as_ddp_says_so(tmp_path):
    config = ROOT / "tests/fixtures/accelerate/fsdp_cpu.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += [str(ROOT / "tests/ddp_worker.py"), str(tmp_path), "max_steps=1"]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Launched with an FSDP config, but Accelerate runs MULTI_CPU" in result.stderr


@pytest.mark.parametrize("build", ["comm-7b", "m3-llava-1.5-7b", "combiner-llava-1.5-7b"])
def test_at_7b_every_encoder_and_decoder_layer_is_its_own_unit(build):
    from published_configs import PUBLISHED_BUILDS, published_build

    from comm_vlm.families import get_family

    with torch.device("meta"):
        model = get_family(PUBLISHED_BUILDS[build][0]).model_class(published_build(build))
    units = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    layers = {name: sum(type(m).__name__ == name for m in units) for name in ("CLIPEncoderLayer", "LlamaDecoderLayer")}
    assert layers == {"CLIPEncoderLayer": 24, "LlamaDecoderLayer": 32}
    if build == "comm-7b":
        assert sum(type(m).__name__ == "Dinov2Layer" for m in units) == 24
    if build == "combiner-llava-1.5-7b":
        assert {"LatentResampler", "FusionStep"} <= {type(m).__name__ for m in units}
    inside = {id(p) for m in units for p in m.parameters()}
    outside = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    total = sum(p.numel() for p in model.parameters())
    # The root unit keeps the embeddings, LM head, connector and projector: under 5% of the model.
    assert outside / total < 0.05, f"{outside / 1e6:.0f}M of {total / 1e6:.0f}M parameters are outside the layers"
