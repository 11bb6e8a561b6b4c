"""The combiner's REC learning curve (`research/combiner_rec.py`): the curve callback and an end-to-end smoke run."""

import sys

import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("combiner_rec")


def test_quick_run_scores_rec_during_stage_2_and_writes_the_table_and_plot(bench, tmp_path, monkeypatch):
    argv = ["combiner_rec.py", "--quick", "--output-dir", str(tmp_path), "--name", "curve"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    table = (tmp_path / "curve.md").read_text()
    assert all(f"| {name} |" in table for name in bench.VARIANTS)
    assert "| 2 | " in table  # the curve's one point: stage-2 step 2 of 3 (`--quick` scores every 2 steps)
    assert "3x" in table and (tmp_path / "curve.png").stat().st_size > 0
    assert sorted(path.name for path in tmp_path.glob("*.*")) == ["curve.md", "curve.png"]


def test_saved_encoders_replace_the_warm_up(bench, tmp_path, monkeypatch):
    """`--encoders DIR` loads a main job's saved encoders (no warm-up) and trains the variants on them."""
    from comm_vlm.demo.main_job import MainJobConfig, build_family_model

    saved, _ = build_family_model("comm", MainJobConfig.quick(), tmp_path / "encoders")

    def no_warm_up(*args, **kwargs):
        raise AssertionError("--encoders must replace the warm-up")

    loaded = []
    original = bench.run_variant

    def spy(name, config, data_paths, encoders, *args):
        loaded.append(encoders)
        return original(name, config, data_paths, encoders, *args)

    monkeypatch.setattr(bench, "pretrain_encoders", no_warm_up)
    monkeypatch.setattr(bench, "run_variant", spy)
    variant = "no resampling (every visual token)"
    argv = ["combiner_rec.py", "--quick", "--output-dir", str(tmp_path), "--encoders", str(tmp_path / "encoders")]
    monkeypatch.setattr(sys, "argv", [*argv, "--variants", variant])
    bench.main()
    assert f"| {variant} |" in (tmp_path / "combiner_rec.md").read_text()
    towers = dict(zip(saved.config.encoder_prefixes, saved.model.vision_towers))
    assert loaded and set(loaded[0]) == set(towers)
    for prefix, tower in towers.items():
        assert all(torch.equal(loaded[0][prefix][k], v) for k, v in tower.state_dict().items())
