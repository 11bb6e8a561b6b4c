"""YAML recipes: a model source and a list of stages, run in order (stage k+1 starts from stage k's output).

```yaml
model: {pretrained: path-or-repo-id}   # or {assemble: {vision, text, family, ...}}, {convert: {from, source, to}},
                                      # or a source of `register_model_source`
stages:
  - stage: comm_pretrain            # a key of comm_vlm.training.stages.STAGES
    dataset: {path: data/stage1.json, format: llava, image_folder: data/images}  # or parquet:, imagefolder:,
                                    # hub: (with name, split), or mixture: [{..., weight}]; see training.data
    args: {learning_rate: 2.0e-5, lr_scheduler_type: cosine, per_device_train_batch_size: 8}  # any SFTConfig field
    learning_rates: {projector: 1.0e-4}  # optional: per-component learning rates, over the stage's own
    peft: {r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj]}                        # optional LoRA
```

`dataset: {tiny: N}` writes N synthetic image/answer samples under the run directory (for CPU smoke runs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .data import SkipReport, build_dataset
from .provenance import RunProvenance
from .stages import Stage, get_stage
from .trainer import build_trainer, default_sft_config, save_atomically


logger = logging.get_logger(__name__)


def recipe_path(name_or_path: str) -> Path:
    """A shipped recipe by name (`comm`, `llava`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    shipped = resources.files("comm_vlm") / "recipes" / f"{name_or_path}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    available = sorted(p.name.removesuffix(".yaml") for p in (resources.files("comm_vlm") / "recipes").iterdir())
    raise FileNotFoundError(f"No recipe {name_or_path!r}: give a YAML path or one of {available}.")


def load_recipe(name_or_path: str, overrides: dict[str, Any] | None = None) -> dict:
    """Reads a recipe and applies `overrides` (SFTConfig fields) to every stage's `args`.

    The result's `loaded_from` (`path`, `overrides` as given) goes into the run's `training_provenance.json`.
    """
    path = recipe_path(name_or_path)
    recipe = yaml.safe_load(path.read_text())
    if not isinstance(recipe, dict) or not recipe.get("stages"):
        raise ValueError(f"Recipe {name_or_path!r} needs a `model` and a non-empty `stages` list.")
    for i, stage in enumerate(recipe["stages"]):
        stage_with_learning_rates(stage)  # validates the stage name and its learning rates early
        if "dataset" not in stage:
            raise ValueError(f"Recipe {name_or_path!r}, stage {i}: missing `dataset`.")
        stage["args"] = {**stage.get("args", {}), **(overrides or {})}
    recipe["loaded_from"] = {"path": str(path), "overrides": dict(overrides or {})}
    return recipe


def stage_with_learning_rates(spec: dict) -> Stage:
    """The registered stage of a recipe entry, with the entry's `learning_rates` (component -> lr) over its own."""
    stage = get_stage(spec.get("stage", ""))
    rates = spec.get("learning_rates") or {}
    if not isinstance(rates, dict):
        raise ValueError(f"Stage {stage.name!r}: `learning_rates` must map components to rates, got {rates!r}.")
    unknown = sorted(set(rates) - set(stage.trains))
    if unknown:
        raise ValueError(
            f"Stage {stage.name!r}: `learning_rates` names {unknown}, which the stage does not train; it trains "
            f"{list(stage.trains)}."
        )
    for component, rate in rates.items():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
            raise ValueError(f"Stage {stage.name!r}: the learning rate of {component!r} must be > 0, got {rate!r}.")
    return replace(stage, learning_rates={**stage.learning_rates, **{k: float(v) for k, v in rates.items()}})


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs (values parsed as YAML: `max_steps=3`, `learning_rate=1e-4`, `bf16=false`)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"Override {item!r} is not key=value (e.g. max_steps=3).")
        overrides[key.lstrip("-").replace("-", "_")] = yaml.safe_load(value)
    return overrides


def make_tiny_dataset(directory: str | os.PathLike, num_samples: int, seed: int = 0) -> Path:
    """Writes `num_samples` synthetic samples (a coloured square; Q: its colour) as LLaVA JSON + PNGs."""
    import random

    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220)}
    rng = random.Random(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(num_samples):
        name = rng.choice(sorted(colours))
        Image.new("RGB", (32, 32), colours[name]).save(directory / f"{i}.png")
        records.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the image?"},
                    {"from": "gpt", "value": f"It is {name}."},
                ],
            }
        )
    path = directory / "data.json"
    path.write_text(json.dumps(records))
    return path


@dataclass
class StageResult:
    stage: str
    output_dir: str
    train_loss: float | None
    skip_report: SkipReport
    log_history: list[dict] = field(default_factory=list)


def _pretrained(path: str, source: dict, run_dir: Path):
    dtype = source.get("dtype", "float32")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    vars(model.config).pop("auto_map", None)  # a source's remote code is not in this run's checkpoints
    return model, AutoProcessor.from_pretrained(path)


def _assembled(parts: dict, source: dict, run_dir: Path):
    from ..assemble import assemble_comm

    return assemble_comm(dtype=source.get("dtype", "float32"), **parts)


def _converted(spec: dict, source: dict, run_dir: Path):
    """`{convert: {from: llava-hf, source: llava-hf/llava-1.5-7b-hf, to: matryoshka_llava, <fields>}}`: the source
    converted (or, `from: comm-vlm`, derived) once into `<run_dir>/init`, then loaded; a later run reuses it."""
    from ..convert import convert_checkpoint

    spec = dict(spec)
    missing = {"from", "source"} - set(spec)
    if missing:
        raise ValueError(f"`model: {{convert: ...}}` needs {sorted(missing)}, e.g. {{from: llava-hf, source: ID}}.")
    init = run_dir / "init"
    if not (init / "config.json").is_file():
        scales = spec.pop("matryoshka_scales", None)
        convert_checkpoint(
            spec.pop("source"),
            init,
            spec.pop("from"),
            spec.pop("to", "comm"),
            vision_tower=spec.pop("vision_tower", None),
            matryoshka_scales=scales,
            overwrite=True,
            config_fields=spec,
        )
    return _pretrained(str(init), source, run_dir)


# A recipe's `model:` has one key naming its source; its loader takes (that key's value, the whole `model:` mapping,
# the run directory) and returns `(model, processor)`.
MODEL_SOURCES: dict[str, Callable[[Any, dict, Path], tuple[Any, Any]]] = {
    "pretrained": _pretrained,  # {pretrained: path-or-repo-id, dtype: ...}
    "assemble": _assembled,  # {assemble: {vision: ..., secondary_vision: ..., text: ..., family: ..., <fields>}}
    "convert": _converted,  # {convert: {from: llava-hf|llava-original|comm-vlm, source: ..., to: <family>, ...}}
}


def register_model_source(name: str, loader: Callable[[Any, dict, Path], tuple[Any, Any]]) -> None:
    """Adds a `model:` source to recipes (`comm_vlm.testing` adds `tiny`, a random tiny checkpoint)."""
    MODEL_SOURCES[name] = loader


def _load_model(source: dict, run_dir: Path):
    names = [name for name in source if name in MODEL_SOURCES]
    if len(names) != 1:
        raise ValueError(
            f"A recipe's `model:` needs exactly one source among {sorted(MODEL_SOURCES)}, got keys {sorted(source)}."
        )
    return MODEL_SOURCES[names[0]](source[names[0]], source, run_dir)


def run_recipe(recipe: dict, output_dir: str | os.PathLike, callbacks=None) -> list[StageResult]:
    """Runs every stage; returns per-stage results. Each stage's final model is `<output_dir>/<k>-<stage>/final`."""
    run_dir = Path(output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Under `accelerate launch` the main process writes shared files (init checkpoint, tiny data) first, the others
    # read them after. On a machine without CUDA the processes talk over gloo (`cpu=True`), as the Trainer does.
    state = PartialState(cpu=not torch.cuda.is_available())
    with state.main_process_first():
        model, processor = _load_model(recipe["model"], run_dir)
    results = []
    provenance = RunProvenance(recipe, run_dir)  # written to the run directory and each final/ (main process)
    for k, spec in enumerate(recipe["stages"]):
        stage = stage_with_learning_rates(spec)
        stage_dir = run_dir / f"{k}-{stage.name}"
        dataset_spec = dict(spec["dataset"])
        if "tiny" in dataset_spec:
            dataset_spec = {
                "path": str(make_tiny_dataset(run_dir / "tiny_data", dataset_spec["tiny"])),
                "format": "llava",
                "image_folder": str(run_dir / "tiny_data"),
            }
        dataset, report = build_dataset(dataset_spec, seed=spec["args"].get("seed", 42))
        args = dict(spec["args"])
        resume = args.pop("resume", False)
        sft_args = default_sft_config(stage_dir / "checkpoints", **args)
        peft_config = spec.get("peft") or None  # a mapping: `lora_config_from_spec` resolves it inside `build_trainer`
        trainer = build_trainer(
            model, processor, dataset, stage, sft_args, peft_config=peft_config, callbacks=callbacks
        )
        plugin = trainer.accelerator.state.deepspeed_plugin
        sharded = trainer.is_fsdp_enabled or (plugin is not None and plugin.zero_stage == 3)
        if sharded and peft_config is not None:
            raise ValueError(
                f"Stage {stage.name!r}: a LoRA stage merges its adapters into `final/`, which needs the whole model "
                "in one process; with FSDP or ZeRO-3 the weights are sharded. Run LoRA stages with DDP or ZeRO-2."
            )
        checkpoint = (
            get_last_checkpoint(sft_args.output_dir) if resume and Path(sft_args.output_dir).exists() else None
        )
        output = trainer.train(resume_from_checkpoint=checkpoint)
        final_dir = stage_dir / "final"
        provenance.add_stage(
            k,
            spec,
            stage,
            trainer,
            output,
            dataset_spec=dataset_spec,
            report=report,
            train_rows=len(dataset),
            resumed_from=checkpoint,
            final_dir=final_dir,
        )
        model = trainer.accelerator.unwrap_model(trainer.model)
        state_dict = None
        if sharded:  # every rank takes part in gathering the shards; the main process writes them
            state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if peft_config is not None:
            model = model.merge_and_unload()
        if trainer.args.should_save:
            extra = provenance.final_files(model.config, final_dir)
            save_atomically(model, processor, final_dir, remote_code=True, write_extra=extra, state_dict=state_dict)
            provenance.write()
        state.wait_for_everyone()
        logger.warning(f"Stage {stage.name} done: {final_dir}; {report}")
        results.append(
            StageResult(stage.name, str(final_dir), output.training_loss, report, trainer.state.log_history)
        )
        if k + 1 < len(recipe["stages"]):
            model = AutoModelForImageTextToText.from_pretrained(final_dir, dtype="float32")
            vars(model.config).pop("auto_map", None)  # final/'s remote code is not in the next stage's checkpoints
    return results
