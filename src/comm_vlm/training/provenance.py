"""The record of what a training run did: `training_provenance.json`, in the run directory and each stage's `final/`.

`run_recipe` fills a `RunProvenance` stage by stage and, on the main process, writes:

- `<run>/training_provenance.json`: the whole run so far, rewritten after every stage;
- `<run>/<k>-<stage>/final/training_provenance.json`: the run up to stage k (the stages that made that model), plus
  the lines that load it (`load`), next to a model card (`README.md`) rendered from it. Both are written inside the
  same atomic save as the weights (`save_atomically`), so `final/` never exists without them.

The record holds:

- `recipe`: the resolved recipe (overrides applied), `recipe_path`, and `overrides` as given (`null` when the recipe
  did not come from `load_recipe`);
- `stages`: per stage, the SFT arguments that differ from `SFTConfig`'s defaults (`sft_args`), the batch sizes
  (`batch`, with the effective `global_batch_size`), the steps that ran (`steps.global_step`, `steps.epochs`,
  `steps.resumed_from`), `train_loss` and the trainer's `metrics`, the data (`data.spec` as written in the recipe,
  `data.samples`: total, kept, skipped by reason), the trainable parameters per component (`trainable`), `peft` and
  the per-component `learning_rates`;
- `versions`: comm_vlm, transformers, trl, peft, accelerate, torch, datasets and python.

`read_provenance(directory)` reads it back (`None` for a directory without one); `comm-vlm push` uses it for the card.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import os
import platform
import re
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..hub.cards import (
    PROVENANCE_FILE,
    ModelCardInfo,
    card_info_from_provenance,
    load_instructions,
    read_provenance,
    render_model_card,
)
from .data import SkipReport
from .stages import COMPONENTS, Stage, component_of


logger = logging.get_logger(__name__)

FORMAT_VERSION = 1
LIBRARIES = ("comm-vlm", "transformers", "trl", "peft", "accelerate", "torch", "datasets")


def library_versions() -> dict[str, str | None]:
    """The installed versions of the libraries a run depends on (`None` for one that is not installed)."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name.replace("-", "_")] = None
    if versions["comm_vlm"] is None:  # run from a source tree (PYTHONPATH=src)
        from .. import __version__

        versions["comm_vlm"] = __version__
    versions["python"] = platform.python_version()
    return versions


def _plain(value: Any) -> Any:
    """`value` as JSON-ready data (enums by value, tuples as lists, anything else unknown as its `str`)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def sft_arguments(args: Any) -> dict[str, Any]:
    """The fields of a `TrainingArguments` / `SFTConfig` whose values differ from the dataclass defaults.

    Values are taken after `__post_init__` (what the trainer used); `hub_token` is masked.

    Args:
        args (`SFTConfig`): the trainer's arguments (`trainer.args`).
    """
    values = args.to_dict()  # masks every `*_token` field
    changed = {}
    for spec in dataclasses.fields(args):
        if not spec.init or spec.name not in values:
            continue
        if spec.default is not dataclasses.MISSING:
            default = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            default = spec.default_factory()
        else:
            default = dataclasses.MISSING
        value = values[spec.name]
        if spec.name.endswith("_token"):
            raw = getattr(args, spec.name)
            value = raw if raw is None or spec.name != "hub_token" else value
        if _plain(value) != _plain(default):
            changed[spec.name] = _plain(value)
    return changed


def batch_summary(args: Any) -> dict[str, int]:
    """Per-device batch, gradient accumulation, processes and the effective global batch size of `args`."""
    per_device = args.per_device_train_batch_size
    return {
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": args.world_size,
        "global_batch_size": per_device * args.gradient_accumulation_steps * args.world_size,
    }


def trainable_parameters(model: Any) -> dict[str, Any]:
    """Trainable parameter counts per component (`COMPONENTS`; `other` for the rest), and the totals.

    Counts what the trainer's model trains: with LoRA, the adapters (under the component of the module they adapt)
    and the `modules_to_save` copies. Parameters partitioned by DeepSpeed ZeRO-3 count by their full size
    (`ds_numel`).
    """
    per_component = dict.fromkeys(COMPONENTS, 0)
    trainable = total = 0
    for name, param in model.named_parameters():
        count = getattr(param, "ds_numel", param.numel())
        total += count
        if param.requires_grad:
            trainable += count
            component = component_of(_WRAPPER_PARTS.sub(_unwrapped, name)) or "other"
            per_component[component] = per_component.get(component, 0) + count
    return {
        "per_component": {k: v for k, v in per_component.items() if v},
        "trainable": trainable,
        "total": total,
    }


# Name parts that wrappers add: PEFT's trained copy of a `modules_to_save` module (`.modules_to_save.<adapter>.`),
# and FSDP's and activation checkpointing's wrapped modules.
_WRAPPER_PARTS = re.compile(r"\.modules_to_save\.[^.]+\.|(?<![^.])_(fsdp|checkpoint)_wrapped_module\.")


def _unwrapped(match: re.Match) -> str:
    return "." if match.group(0).startswith(".") else ""


def skip_summary(report: SkipReport) -> dict[str, Any]:
    """A `SkipReport` as JSON: samples `total`, `kept`, `skipped` and `skipped_by_reason`."""
    return {
        "total": report.total,
        "kept": report.kept,
        "skipped": report.skipped,
        "skipped_by_reason": dict(sorted(report.reasons.items())),
    }


def write_json_atomically(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Writes `data` as indented JSON to a temporary sibling file, then renames it over `path`."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=2)
            file.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def ships_remote_code(directory: str | os.PathLike) -> bool:
    """Whether a checkpoint directory carries its modeling code: an `AutoConfig` `auto_map` and `*.py` files."""
    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return "AutoConfig" in (config.get("auto_map") or {}) and any(directory.glob("*.py"))


class RunProvenance:
    """The record of a recipe run, filled stage by stage (`add_stage`) on every process; the main process writes it.

    Args:
        recipe (`dict`): the recipe as `run_recipe` received it (from `load_recipe`, whose `loaded_from` entry gives
            the recipe path and the overrides as given).
        run_dir (`str` or `os.PathLike`): the run's output directory.
    """

    def __init__(self, recipe: dict[str, Any], run_dir: str | os.PathLike):
        resolved = copy.deepcopy(recipe)
        loaded_from = resolved.pop("loaded_from", None) or {}
        self.run_dir = Path(run_dir)
        self.record: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "written": None,
            "recipe_path": loaded_from.get("path"),
            "overrides": _plain(loaded_from["overrides"]) if "overrides" in loaded_from else None,
            "recipe": _plain(resolved),
            "output_dir": str(self.run_dir),
            "stages": [],
            "versions": library_versions(),
        }

    def add_stage(
        self,
        index: int,
        spec: dict[str, Any],
        stage: Stage,
        trainer: Any,
        output: Any,
        *,
        dataset_spec: dict[str, Any],
        report: SkipReport,
        train_rows: int,
        resumed_from: str | None,
        final_dir: str | os.PathLike,
    ) -> dict[str, Any]:
        """Records a stage that has trained (call before merging LoRA weights, so the adapters are counted).

        Args:
            index (`int`): the stage's position in the recipe.
            spec (`dict`): the recipe's entry for the stage.
            stage (`Stage`): the stage, with the entry's learning rates.
            trainer (`CommSFTTrainer`): the stage's trainer, after `train()`.
            output (`TrainOutput`): what `train()` returned.
            dataset_spec (`dict`): the dataset as loaded (a `tiny:` entry resolved to its files).
            report (`SkipReport`): the samples kept and skipped.
            train_rows (`int`): rows of the training dataset (a mixture repeats rows).
            resumed_from (`str`, *optional*): the checkpoint the stage resumed from.
            final_dir (`str` or `os.PathLike`): where the stage's final model is saved.
        """
        state = trainer.state
        metrics = {k: v for k, v in (getattr(output, "metrics", None) or {}).items() if isinstance(v, (int, float))}
        entry = {
            "index": index,
            "stage": stage.name,
            "description": stage.description,
            "final_dir": str(final_dir),
            "sft_args": sft_arguments(trainer.args),
            "batch": batch_summary(trainer.args),
            "steps": {
                "global_step": state.global_step,
                "max_steps": state.max_steps,
                "epochs": state.epoch,
                "resumed_from": str(resumed_from) if resumed_from else None,
            },
            "train_loss": getattr(output, "training_loss", None),
            "metrics": metrics,
            "data": {
                "spec": _plain(spec.get("dataset")),
                "resolved": _plain(dataset_spec) if dataset_spec != spec.get("dataset") else None,
                "samples": skip_summary(report),
                "train_rows": train_rows,
            },
            "trainable": trainable_parameters(trainer.model),
            "learning_rates": dict(stage.learning_rates),
            "peft": _plain(spec.get("peft")) or None,
            "finished": _now(),
        }
        self.record["stages"].append(entry)
        return entry

    def write(self) -> Path:
        """Writes the run's record to `<run_dir>/training_provenance.json` (atomically)."""
        self.record["written"] = _now()
        return write_json_atomically(self.run_dir / PROVENANCE_FILE, self.record)

    def final_files(self, config: Any, final_dir: str | os.PathLike) -> Callable[[Path], None]:
        """The `write_extra` of `save_atomically` for a stage's `final/`: the record so far, and a model card.

        Args:
            config (`PretrainedConfig`): the saved model's config (for the card).
            final_dir (`str` or `os.PathLike`): where the directory will be, named in the load lines.
        """
        record = copy.deepcopy(self.record)
        final_dir = Path(final_dir)

        def write(directory: Path) -> None:
            remote_code = ships_remote_code(directory)
            load = load_instructions(str(final_dir), remote_code)
            final = {
                **record,
                "written": _now(),
                "directory": str(final_dir),
                "model_type": config.model_type,
                "load": {"remote_code": remote_code, **load},
            }
            write_json_atomically(directory / PROVENANCE_FILE, final)
            info = ModelCardInfo(
                model_name=f"{self.run_dir.name}-{final_dir.parent.name}",
                repo_id=str(final_dir),
                remote_code=remote_code,
            )
            try:
                card = render_model_card(config, card_info_from_provenance(final, info))
            except ValueError as err:  # a family without a card template: the record still says how to load it
                logger.warning(f"No model card for {final_dir}: {err}")
                return
            card.save(directory / "README.md")

        return write


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


__all__ = [
    "FORMAT_VERSION",
    "PROVENANCE_FILE",
    "RunProvenance",
    "batch_summary",
    "library_versions",
    "read_provenance",
    "ships_remote_code",
    "sft_arguments",
    "skip_summary",
    "trainable_parameters",
    "write_json_atomically",
]
