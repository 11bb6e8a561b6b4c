"""The combiner ablation (`research/combiner_study.py`): its similarity diagnostic and an end-to-end smoke run."""

import sys

import pytest
import torch

from comm_vlm.demo.main_job import MainJobConfig, build_family_model
from comm_vlm.demo.synthetic import make_synthetic_splits


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("combiner_study")


def test_fused_similarity_is_one_exactly_when_the_image_makes_no_difference(bench, tmp_path):
    model, processor = build_family_model("adaptive_combiner", MainJobConfig.quick(), tmp_path)
    rows = bench.one_prompt_per_image(make_synthetic_splits(2, 4, seed=0)["test"])
    assert len({row["scene_id"] for row in rows}) == len(rows) == 4  # four images
    assert all(row["messages"] == rows[0]["messages"] for row in rows)  # one prompt
    assert bench.fused_similarity(model.eval(), processor, rows) < 1 - 1e-4
    with torch.no_grad():  # closed gates: the fused tokens depend on the text latents only
        model.model.combiner.steps[0].block.attn_gate.fill_(0.0)
        model.model.combiner.steps[0].block.mlp_gate.fill_(0.0)
    assert bench.fused_similarity(model, processor, rows) == pytest.approx(1.0, abs=1e-5)


def test_quick_run_writes_the_table_and_the_plot(bench, tmp_path, monkeypatch):
    variants = ["eq. 2 as printed", "input norm + residual latents, combiner lr 0.2x"]
    monkeypatch.setattr(sys, "argv", ["combiner_study.py", "--quick", "--output-dir", str(tmp_path), "--variants"])
    sys.argv.extend(variants)
    bench.main()
    table = (tmp_path / "combiner_study.md").read_text()
    assert all(f"| {name} |" in table for name in variants) and "text-only prior" in table
    assert (tmp_path / "combiner_study.png").stat().st_size > 0
