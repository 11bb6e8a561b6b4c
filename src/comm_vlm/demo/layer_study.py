"""Layer study of COMM (Jiang et al. 2023, "From CLIP to DINO: Visual Encoders Shout in Multi-modal Large Language
Models", arXiv 2310.08825, Fig. 2/3), at toy size on the synthetic scenes.

The paper asks how well each single layer of a frozen CLIP serves a multimodal LLM, and whether merging several
layers (multi-level feature merging, MFM) beats any one of them. Here:

1. one tiny CLIP encoder of the main job's width (`comm_vlm.demo.main_job.build_family_model`, CLIP only: no DINOv2) is
   built, warmed up once on the synthetic scenes while reading every layer (`warm_up_encoders`, the offline stand-in
   for pretraining) and saved to `<output_dir>/encoder`;
2. every variant gets those same frozen encoder weights, and the same initial projector and LLM, so variants differ
   only in which layers they read and how they merge them: `single@k` reads layer k alone (k = 1..L), `mean`,
   `layerscale`, `lln_layerscale` and `conv_layerscale` merge all L layers (`comm_vlm.models.feature_merging`);
3. each variant trains with the main job's two-stage COMM recipe (`family_recipe("comm", ...)` + `run_recipe`, so it
   follows the main job's schedule and data mixture), is reloaded with `from_pretrained` and evaluated on the held-out
   split: REC Acc@0.5 and POPE accuracy/F1, against the chance/majority baselines;
4. `<output_dir>/layer_study.json`, `layer_study.md` (table) and `layer_study.png` (metric vs layer, MFM strategies and
   baseline as horizontal lines) are written.

Run it with `comm-vlm layer-study [--quick]`; `--quick` is the CI-sized run (numbers are not meaningful).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging

from ..evaluation.runners import evaluate
from ..training.recipes import run_recipe
from .encoder_warmup import warm_up_encoders
from .main_job import MainJobConfig, build_family_model, family_recipe, prepare_training_data
from .synthetic import generate_scenes


logger = logging.get_logger(__name__)

# Merges over all layers, compared against the single-layer curve (COMM's MFM strategies).
MFM_STRATEGIES = ("mean", "layerscale", "lln_layerscale", "conv_layerscale")
QUICK_VARIANTS = ("single@1", "lln_layerscale")
TASKS = ("rec", "pope")
# JSON metric name -> (task, key of the task's metrics in `comm_vlm.evaluation.tasks`).
METRICS = {
    "rec_acc@0.5": ("rec", "accuracy"),
    "rec_mean_iou": ("rec", "mean_iou"),
    "pope_accuracy": ("pope", "accuracy"),
    "pope_f1": ("pope", "f1"),
    "pope_yes_ratio": ("pope", "yes_ratio"),
}
# (metric, label) of the table columns and of the plot's panels (the first two).
COLUMNS = (("rec_acc@0.5", "REC Acc@0.5"), ("pope_accuracy", "POPE Acc"), ("pope_f1", "POPE F1"))


class VariantError(ValueError):
    """An unknown, repeated or empty variant list (raised before the study writes anything)."""


@dataclass
class LayerStudyConfig:
    """Settings of the layer study.

    Args:
        job (`MainJobConfig`): sizes, data and training schedule, the main job's unless overridden.
        variants (`tuple[str, ...]`, *optional*): variants to train (see `study_variants`); default: all of them.
        encoder_layers (`int`, *optional*): depth L of the tiny CLIP encoder; default: the main job's encoder depth.
    """

    job: MainJobConfig = field(default_factory=MainJobConfig)
    variants: tuple[str, ...] | None = None
    encoder_layers: int | None = None

    @classmethod
    def quick(cls, variants: tuple[str, ...] | None = None) -> LayerStudyConfig:
        """The CI-sized study: `MainJobConfig.quick()` sizes, `QUICK_VARIANTS` unless `variants` is given."""
        return cls(job=MainJobConfig.quick(), variants=tuple(variants or QUICK_VARIANTS))


def study_variants(num_layers: int) -> dict[str, tuple[list[int], str]]:
    """Every variant of an `num_layers`-layer encoder: name -> (`hidden_states` layers read, merge strategy).

    Args:
        num_layers (`int`): transformer layers of the encoder (L).
    """
    variants = {f"single@{k}": ([k], "single") for k in range(1, num_layers + 1)}
    variants.update({merge: (list(range(1, num_layers + 1)), merge) for merge in MFM_STRATEGIES})
    return variants


def resolve_variants(names: tuple[str, ...] | list[str] | None, num_layers: int) -> dict[str, tuple[list[int], str]]:
    """The requested variants (all when `names` is `None`), in the given order.

    Args:
        names (`tuple[str, ...]`, *optional*): variant names such as `single@3` or `lln_layerscale`.
        num_layers (`int`): transformer layers of the encoder (L).

    Raises:
        VariantError (a `ValueError`): an unknown or repeated name, or none (the message lists the allowed ones).
    """
    allowed = study_variants(num_layers)
    if names is None:
        return allowed
    names = list(names)
    unknown = [n for n in names if n not in allowed]
    if unknown or not names or len(set(names)) != len(names):
        problem = f"unknown variants {unknown}" if unknown else f"variants must be non-empty and distinct: {names}"
        raise VariantError(f"Layer study: {problem}; allowed (encoder of {num_layers} layers): {list(allowed)}.")
    return {n: allowed[n] for n in names}


def _variant_config(base_config: Any, num_layers: int, layers: list[int], merge: str) -> Any:
    """A CLIP-only COMM config from the main job's COMM config: same widths, `num_layers` layers, one readout."""
    fields = base_config.to_dict()
    fields["vision_config"]["num_hidden_layers"] = num_layers
    fields.update(secondary_vision_config=None, vision_feature_layer=list(layers), vision_feature_merge=merge)
    return type(base_config).from_dict(fields)


def _variant_model(reference: Any, num_layers: int, layers: list[int], merge: str, seed: int) -> Any:
    """A variant built from `reference`: its encoder, projector and LLM weights; its own merge (fresh, seeded)."""
    torch.manual_seed(seed)
    model = type(reference)(_variant_config(reference.config, num_layers, layers, merge))
    own = model.state_dict()
    shared = {
        name: tensor
        for name, tensor in reference.state_dict().items()
        if name in own and own[name].shape == tensor.shape and not name.startswith("model.connector.")
    }
    missing = [name for name in own if name not in shared and not name.startswith("model.connector.")]
    if missing:
        raise RuntimeError(f"Variant {merge}@{layers} does not share these weights with the reference: {missing}")
    model.load_state_dict(shared, strict=False)
    return model.eval()


def _metrics(task_results: dict[str, Any], field_name: str) -> dict[str, float]:
    return {name: float(getattr(task_results[task], field_name)[key]) for name, (task, key) in METRICS.items()}


def run_layer_study(output_dir: str | os.PathLike, config: LayerStudyConfig | None = None) -> dict:
    """Runs the study; returns (and writes to `<output_dir>/layer_study.json`) everything it measured.

    Args:
        output_dir (`str` or `os.PathLike`): where data, the shared encoder, every variant's run and the reports go.
        config (`LayerStudyConfig`, *optional*): the study's settings (default: the full study).

    Returns:
        `dict` with `config`, `encoder` (directory, depth, warm-up patch accuracy), `baseline` and `baseline_names`
        (chance / majority levels), `variants` (per name: `layers`, `merge`, `metrics`, `layer_weights`,
        `encoder_unchanged`, `stages`, `final_dir`, `seconds`), `seconds`, `table` and `plot`.

    Raises:
        VariantError (a `ValueError`): an unknown variant name, before anything is written.
        ValueError: `encoder_layers` below 1.
    """
    config = config or LayerStudyConfig()
    job = config.job
    if config.encoder_layers is not None and config.encoder_layers < 1:
        raise ValueError(f"`encoder_layers` must be a positive number of layers, got {config.encoder_layers}.")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # the main job's COMM, for its widths, LLM and processor
        base, processor = build_family_model("comm", job, tmp)
    num_layers = config.encoder_layers or base.config.vision_config.num_hidden_layers
    variants = resolve_variants(config.variants, num_layers)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    splits, data_paths = prepare_training_data(job, output_dir)

    # One CLIP, warmed up once while reading every layer, shared (frozen) by all variants.
    all_layers = list(range(1, num_layers + 1))
    torch.manual_seed(job.seed)
    reference = type(base)(_variant_config(base.config, num_layers, all_layers, "lln_layerscale")).eval()
    del base
    scenes = generate_scenes(job.train_scenes, job.seed, "train")
    warmup = warm_up_encoders(reference, processor.image_processor, scenes, steps=job.warmup_steps, seed=job.seed)
    reference.eval()
    encoder_dir = output_dir / "encoder"
    reference.save_pretrained(encoder_dir)
    processor.save_pretrained(encoder_dir)
    encoder_state = {k: v.detach().clone() for k, v in reference.model.vision_tower.state_dict().items()}
    logger.info(f"Shared {num_layers}-layer CLIP encoder warmed up (patch accuracy {warmup}): {encoder_dir}")

    results: dict[str, Any] = {
        "config": asdict(config),
        "encoder": {"dir": str(encoder_dir), "num_layers": num_layers, "warmup_patch_accuracy": warmup},
        "tasks": list(TASKS),
        "variants": {},
    }
    progress = tqdm(variants.items(), desc="layer study", unit="variant")
    for name, (layers, merge) in progress:
        variant_start = time.perf_counter()
        progress.set_postfix_str(name)
        variant_dir = output_dir / "variants" / name.replace("@", "_")
        model = _variant_model(reference, num_layers, layers, merge, job.seed)
        model.save_pretrained(variant_dir / "init")
        processor.save_pretrained(variant_dir / "init")
        del model
        stages = run_recipe(family_recipe("comm", job, variant_dir / "init", data_paths), variant_dir)
        final_dir = stages[-1].output_dir
        model = AutoModelForImageTextToText.from_pretrained(final_dir).eval()
        evaluation = evaluate(
            model,
            AutoProcessor.from_pretrained(final_dir),
            splits["test"],
            tasks=TASKS,
            batch_size=job.eval_batch_size,
        )
        evaluation.save(variant_dir / "eval")
        merge_module = model.model.connector.merges[0]
        weights = getattr(merge_module, "layer_weights", None)
        tower = model.model.vision_tower.state_dict()
        results["variants"][name] = {
            "layers": layers,
            "merge": merge,
            "metrics": _metrics(evaluation.tasks, "metrics"),
            "layer_weights": None if weights is None else [round(w, 4) for w in weights.tolist()],
            "encoder_unchanged": all(torch.equal(tower[k], v) for k, v in encoder_state.items()),
            "stages": [
                {"stage": s.stage, "train_loss": s.train_loss, "steps": max(h.get("step", 0) for h in s.log_history)}
                for s in stages
            ],
            "final_dir": final_dir,
            "seconds": round(time.perf_counter() - variant_start, 1),
        }
        if "baseline" not in results:
            results["baseline"] = _metrics(evaluation.tasks, "baseline")
            results["baseline_names"] = {task: evaluation.tasks[task].baseline["name"] for task in TASKS}
        logger.info(f"Layer study {name}: {results['variants'][name]['metrics']}")
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["table"] = layer_study_table(results)
    results["plot"] = plot_layer_study(results, output_dir / "layer_study.png")
    (output_dir / "layer_study.json").write_text(json.dumps(results, indent=2, default=str))
    (output_dir / "layer_study.md").write_text(results["table"] + "\n")
    return results


def layer_study_table(results: dict) -> str:
    """One Markdown table: per variant its layers, merge, REC/POPE scores (x100) and time; the baseline last."""
    labels = " | ".join(label for _, label in COLUMNS)
    lines = [f"| variant | layers | merge | {labels} | seconds |", "|---|---|---|" + "---:|" * (len(COLUMNS) + 1)]
    for name, variant in results["variants"].items():
        layers = variant["layers"]
        span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
        scores = " | ".join(f"{100 * variant['metrics'][key]:.1f}" for key, _ in COLUMNS)
        lines.append(f"| {name} | {span} | {variant['merge']} | {scores} | {variant['seconds']:.0f} |")
    if "baseline" in results:
        scores = " | ".join(f"{100 * results['baseline'][key]:.1f}" for key, _ in COLUMNS)
        lines.append(f"| chance / majority baseline | - | - | {scores} | - |")
    return "\n".join(lines)


def plot_layer_study(results: dict, path: str | os.PathLike) -> str:
    """Two panels (REC Acc@0.5, POPE Acc, x100) against the CLIP layer: single-layer variants as a line, the MFM
    strategies (all layers) as dashed lines, the chance/majority baseline dotted. Returns the PNG path.

    Drawn on the Agg canvas directly, as `comm_vlm.evaluation.plots`: no pyplot state or global backend.

    Args:
        results (`dict`): what `run_layer_study` returns (or its JSON).
        path (`str` or `os.PathLike`): where to write the PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    variants = results["variants"]
    num_layers = results["encoder"]["num_layers"]
    single = sorted((v["layers"][0], v["metrics"]) for v in variants.values() if v["merge"] == "single")
    merged = [(name, v["metrics"]) for name, v in variants.items() if v["merge"] != "single"]
    figure = Figure(figsize=(11, 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    for ax, (key, label) in zip(figure.subplots(1, 2, squeeze=False)[0], COLUMNS[:2]):
        if single:
            ax.plot([k for k, _ in single], [100 * m[key] for _, m in single], marker="o", label="single layer")
        for i, (name, metrics) in enumerate(merged):
            ax.axhline(100 * metrics[key], linestyle="--", color=f"C{i + 1}", label=f"{name} (layers 1-{num_layers})")
        if "baseline" in results:
            ax.axhline(100 * results["baseline"][key], linestyle=":", color="0.4", label="chance / majority")
        ax.set_xlim(0.5, num_layers + 0.5)
        ax.set_xticks(range(1, num_layers + 1))
        ax.set_xlabel("CLIP layer read")
        ax.set_ylabel(f"{label} (x100)")
        ax.set_title(label)
    figure.legend(*ax.get_legend_handles_labels(), loc="outside right center", fontsize="small")
    figure.suptitle("Layer study: one frozen CLIP, single layers vs multi-level merging")
    figure.savefig(os.fspath(path), dpi=100)
    return os.fspath(path)


__all__ = [
    "COLUMNS",
    "LayerStudyConfig",
    "METRICS",
    "MFM_STRATEGIES",
    "QUICK_VARIANTS",
    "VariantError",
    "layer_study_table",
    "plot_layer_study",
    "resolve_variants",
    "run_layer_study",
    "study_variants",
]
