"""COMM's layer study (`comm_vlm.demo.layer_study`) at CI size: one frozen CLIP shared by every readout variant."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from comm_vlm.cli import main
from comm_vlm.demo.layer_study import (
    METRICS,
    MFM_STRATEGIES,
    QUICK_VARIANTS,
    LayerStudyConfig,
    resolve_variants,
    run_layer_study,
    study_variants,
)


pytestmark = pytest.mark.demo  # the demo (`comm_vlm.demo`): run with `python -m pytest -m demo`


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """The CI-sized study, run once through the CLI: (output dir, results JSON, printed text)."""
    torch.manual_seed(0)
    output_dir = tmp_path_factory.mktemp("layer_study")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["layer-study", "--quick", "--output-dir", str(output_dir), "--stage-steps", "2", "2"]) == 0
    return output_dir, json.loads((output_dir / "layer_study.json").read_text()), stdout.getvalue()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_quick_study_writes_json_table_and_plot(quick_study):
    output_dir, results, printed = quick_study
    assert results["config"]["variants"] == list(QUICK_VARIANTS)
    assert results["config"]["job"]["stage_steps"] == [2, 2]  # --stage-steps reached the training schedule
    assert all([s["steps"] for s in v["stages"]] == [2, 2] for v in results["variants"].values())
    assert results["encoder"]["num_layers"] == 4 and set(results["encoder"]["warmup_patch_accuracy"]) == {"vision"}
    assert list(results["variants"]) == list(QUICK_VARIANTS)
    single, merged = results["variants"]["single@1"], results["variants"]["lln_layerscale"]
    assert (single["layers"], single["merge"], single["layer_weights"]) == ([1], "single", None)
    assert (merged["layers"], merged["merge"]) == ([1, 2, 3, 4], "lln_layerscale")
    assert len(merged["layer_weights"]) == 4 and sum(merged["layer_weights"]) == pytest.approx(1.0, abs=1e-3)
    for variant in results["variants"].values():
        assert set(variant["metrics"]) == set(METRICS)
        assert all(0.0 <= value <= 1.0 for value in variant["metrics"].values())
        assert [s["stage"] for s in variant["stages"]] == ["comm_pretrain", "comm_instruct"]
        assert variant["seconds"] > 0 and variant["encoder_unchanged"] is True
        assert (Path(variant["final_dir"]) / "model.safetensors").exists()
    assert set(results["baseline"]) == set(METRICS)
    assert results["baseline"]["pope_accuracy"] == pytest.approx(0.5)  # balanced POPE: majority = 50%

    table = (output_dir / "layer_study.md").read_text()
    assert table.startswith("| variant | layers | merge | REC Acc@0.5 | POPE Acc | POPE F1 | seconds |")
    assert "| single@1 | 1 | single |" in table and "| lln_layerscale | 1-4 | lln_layerscale |" in table
    assert "| chance / majority baseline |" in table
    assert results["table"] in printed  # the CLI prints the table

    plot = output_dir / "layer_study.png"
    assert results["plot"] == str(plot) and plot.read_bytes().startswith(b"\x89PNG")
    with Image.open(plot) as image:
        darkest, lightest = image.convert("L").getextrema()
    assert image.width > 2 * image.height and darkest < lightest  # two panels and a legend, not blank


def test_variants_share_the_frozen_encoder_and_train_their_own_readout(quick_study):
    output_dir, results, _ = quick_study
    encoder = AutoModelForImageTextToText.from_pretrained(output_dir / "encoder")
    encoder_state = _state(encoder.model.vision_tower)
    finals, inits = {}, {}
    for name, variant in results["variants"].items():
        final = AutoModelForImageTextToText.from_pretrained(variant["final_dir"])
        init = AutoModelForImageTextToText.from_pretrained(output_dir / "variants" / name.replace("@", "_") / "init")
        assert final.config.secondary_vision_config is None and final.model.secondary_vision_tower is None
        assert final.config.branch("vision")["layers"] == variant["layers"]
        assert final.config.vision_feature_merge == variant["merge"]
        tower = _state(final.model.vision_tower)
        assert tower.keys() == encoder_state.keys()
        assert all(torch.equal(tower[k], encoder_state[k]) for k in encoder_state), name
        finals[name], inits[name] = final, init
        trained, start = _state(final.model.multi_modal_projector), _state(init.model.multi_modal_projector)
        assert any(not torch.equal(trained[k], start[k]) for k in trained), f"{name}: projector did not train"
    # Same starting projector and LLM for every variant; different projectors after training.
    (a, b) = QUICK_VARIANTS
    for part in ("multi_modal_projector", "language_model"):
        start_a, start_b = _state(getattr(inits[a].model, part)), _state(getattr(inits[b].model, part))
        assert all(torch.equal(start_a[k], start_b[k]) for k in start_a), part
    trained_a, trained_b = _state(finals[a].model.multi_modal_projector), _state(finals[b].model.multi_modal_projector)
    assert any(not torch.equal(trained_a[k], trained_b[k]) for k in trained_a)


def test_variant_names_and_encoder_depth():
    names = list(study_variants(6))
    assert names == [f"single@{k}" for k in range(1, 7)] + list(MFM_STRATEGIES)
    assert resolve_variants(("conv_layerscale", "single@6"), 6) == {
        "conv_layerscale": ([1, 2, 3, 4, 5, 6], "conv_layerscale"),
        "single@6": ([6], "single"),
    }
    with pytest.raises(ValueError, match="distinct"):
        resolve_variants(("mean", "mean"), 4)


def test_encoder_layers_sets_the_clip_depth(tmp_path):
    config = LayerStudyConfig.quick(("single@6",))
    config.encoder_layers = 6
    results = run_layer_study(tmp_path, config)
    assert results["encoder"]["num_layers"] == 6
    final = AutoModelForImageTextToText.from_pretrained(results["variants"]["single@6"]["final_dir"])
    assert final.config.vision_config.num_hidden_layers == 6 and final.config.branch("vision")["layers"] == [6]
    assert len(final.model.vision_tower.encoder.layers) == 6


def test_bad_variant_raises_before_writing_anything(tmp_path, capsys):
    output_dir = tmp_path / "study"
    with pytest.raises(ValueError, match=r"single@5.*allowed.*'single@1'.*'single@4'.*'lln_layerscale'"):
        run_layer_study(output_dir, LayerStudyConfig.quick(("single@5", "lln_layerscale")))
    assert not output_dir.exists()
    assert main(["layer-study", "--quick", "--output-dir", str(output_dir), "--variants", "max_pool"]) == 2
    err = capsys.readouterr().err
    assert "unknown variants ['max_pool']" in err and "conv_layerscale" in err
    assert main(["layer-study", "--quick", "--output-dir", str(output_dir), "--stage-steps", "0", "3"]) == 2
    assert "--stage-steps must be positive" in capsys.readouterr().err
    assert not output_dir.exists()


def test_stage_steps_override_the_main_jobs_comm_schedule():
    """The full study trains the main job's COMM recipe, whose own per-family steps must yield to --stage-steps."""
    from comm_vlm.cli import build_parser, layer_study_config
    from comm_vlm.demo.main_job import family_recipe

    default = layer_study_config(build_parser().parse_args(["layer-study"]))
    assert "comm" in default.job.family_stage_steps  # the precedence this test is about
    config = layer_study_config(build_parser().parse_args(["layer-study", "--stage-steps", "3", "4"]))
    paths = {group: Path("rows.jsonl") for group in ("all", "short", "rec")}
    recipe = family_recipe("comm", config.job, "init", paths)
    assert [stage["args"]["max_steps"] for stage in recipe["stages"]] == [3, 4]
