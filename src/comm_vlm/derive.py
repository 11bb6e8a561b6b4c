"""Derive one family from a trained checkpoint of another: M3 from a trained COMM or LLaVA-layout model, the adaptive
combiner on a COMM vision branch.

    comm-vlm convert --from comm-vlm trained/final m3-init --to matryoshka_llava [--matryoshka-scales 1,9,36,144,576]
    comm-vlm convert --from comm-vlm trained/final combiner-init --to adaptive_combiner

The paper's recipe for M3 fine-tunes a trained LLaVA-1.5: M3 adds no parameter, so every weight carries over and the
derived model gives the source's logits at the full scale. The combiner keeps the vision branch, projector and LLM;
only its fusion module (`model.combiner.*`) is new, initialised as the family initialises it, and trained next
(`combiner` stage). A checkpoint of transformers' Llava or of the LLaVA training code converts first
(`--from llava-hf` / `--from llava-original`, `comm_vlm.convert`).

Weights are read with safetensors only. Source keys the target has no place for (e.g. the combiner's, when deriving
M3 from a combiner) and target weights the source lacks, other than the target family's own new modules, are refused
before anything is written; the output is built in a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoProcessor
from transformers.utils import logging

from .families import FAMILIES, check_config_fields, family_processor, get_family
from .hub import ModelCardInfo, save_for_hub_into


logger = logging.get_logger(__name__)

# Per target family: state-dict prefixes that are the family's own new modules (initialised, not carried over).
NEW_MODULES: dict[str, tuple[str, ...]] = {
    "comm": (),
    "matryoshka_llava": (),
    "adaptive_combiner": ("model.combiner.",),
}


def _weight_files(source: Path) -> list[Path]:
    index = source / "model.safetensors.index.json"
    if index.is_file():
        return sorted({source / f for f in json.loads(index.read_text())["weight_map"].values()} | {index})
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{source} has no safetensors weights; save it with `save_pretrained(..., safe_serialization=True)`."
        )
    return files


def _refuse_mismatch(
    source: Path, source_type: str, target: str, unexpected: set[str], missing: set[str], new: tuple[str, ...]
) -> None:
    """Raises, listing them, for source weights the target has no place for and target weights the source lacks
    (other than the target family's `new` modules)."""
    unexpected, missing = sorted(unexpected), sorted(k for k in missing if not k.startswith(new))
    if not unexpected and not missing:
        return
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} source weights have no place in {target} (e.g. {unexpected[:3]})")
    if missing:
        problems.append(f"{len(missing)} {target} weights are not in the source (e.g. {missing[:3]})")
    raise ValueError(
        f"Cannot derive {target} from {source} ({source_type}): " + "; ".join(problems) + ". Nothing was written. "
        "Derive from a complete checkpoint with the same vision branch and LLM."
    )


def derive_checkpoint(
    source_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    target: str,
    *,
    base_model: str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    **config_fields: Any,
) -> list[str]:
    """Writes a `target`-family checkpoint (weights, processor, remote code, card) from a checkpoint of this package.

    Args:
        source_dir (`str` or `os.PathLike`): a `comm`, `matryoshka_llava` or `adaptive_combiner` checkpoint directory
            (safetensors), e.g. a training stage's `final/`.
        output_dir (`str` or `os.PathLike`): where to write; must not exist or be empty unless `overwrite`.
        target (`str`): the family of the output (`comm_vlm.families.FAMILIES`).
        base_model (`str`, *optional*): Hub id of the source, recorded in the model card.
        overwrite (`bool`): replace a non-empty `output_dir` (only once the derivation succeeded).
        max_shard_size (`int` or `str`): largest safetensors shard.
        config_fields: fields of the target config (e.g. `matryoshka_scales`, `combiner_num_latents`).

    Returns:
        `list[str]`: the files written, relative to `output_dir`.

    Raises:
        ValueError: the source is not a checkpoint of this package, unknown target or fields, weights that do not
            carry over (listed); nothing is written then.
    """
    source, output = Path(source_dir), Path(output_dir)
    classes = get_family(target)
    if not (source / "config.json").is_file():
        raise ValueError(f"{source} has no config.json: give a checkpoint directory saved by this package.")
    source_config = AutoConfig.from_pretrained(source)
    if source_config.model_type not in FAMILIES:
        raise ValueError(
            f"{source} is a {source_config.model_type!r} checkpoint, not one of {sorted(FAMILIES)}: convert it first "
            "(`comm-vlm convert --from llava-hf` or `--from llava-original`)."
        )
    anyres = [
        name
        for name in (source_config.model_type, target)
        if not hasattr(FAMILIES[name].config_class, "from_comm_config")
    ]
    if anyres:
        raise ValueError(
            f"{source} ({source_config.model_type}) cannot be derived into {target}: derivation works between the "
            f"families on a COMM visual branch, and {anyres[0]} is built on LLaVA-NeXT's anyres tiles. Convert a "
            "LLaVA-NeXT checkpoint with `comm-vlm convert --from llava-hf|llava-original SRC DST --to "
            "matryoshka_llava_next`."
        )
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"{output} exists and is not empty; pass overwrite=True (--overwrite) or another directory.")
    check_config_fields(target, config_fields)
    config = classes.config_class.from_comm_config(source_config, **config_fields)
    config.architectures = [classes.model_class.__name__]

    files = _weight_files(source)
    with torch.device("meta"):  # the weights each model has, in model-space names (no checkpoint key renames)
        present = set(get_family(source_config.model_type).model_class(source_config).state_dict())
        expected = set(classes.model_class(config).state_dict())
    new = NEW_MODULES.get(target, ())
    _refuse_mismatch(source, source_config.model_type, target, present - expected, expected - present, new)
    processor = None
    if any((source / f).is_file() for f in ("processor_config.json", "tokenizer_config.json")):
        source_processor = AutoProcessor.from_pretrained(source)
        processor = family_processor(
            target,
            config,
            source_processor.image_processor,
            source_processor.tokenizer,
            chat_template=getattr(source_processor, "chat_template", None),
        )
    else:
        logger.warning(f"{source} has no processor files: the output has no processor (add one before use).")
    initialised = f"; new and initialised: {', '.join(p.rstrip('.') for p in new)}" if new else ""
    card = ModelCardInfo(
        base_model=[base_model] if base_model else [],
        notes=[
            f"Derived from a `{source_config.model_type}` checkpoint with `comm-vlm convert --from comm-vlm --to "
            f"{target}`: vision branch, projector and LLM carried over unchanged{initialised}."
        ],
    )

    output.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{output.name}.deriving-", dir=output.parent))
    try:
        staging = workdir / "staging"
        staging.mkdir()
        config.save_pretrained(staging)
        for file in files:  # the source's weight files, linked (no copy of a 7B checkpoint)
            os.symlink(file.resolve(), staging / file.name)
        if (source / "generation_config.json").is_file():
            shutil.copyfile(source / "generation_config.json", staging / "generation_config.json")
        model, info = classes.model_class.from_pretrained(staging, dtype="auto", output_loading_info=True)
        _refuse_mismatch(
            source, source_config.model_type, target, set(info["unexpected_keys"]), set(info["missing_keys"]), new
        )
        written = save_for_hub_into(
            model.eval(), output, processor, card=card, max_shard_size=max_shard_size, workdir=workdir
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return written


__all__ = ["NEW_MODULES", "derive_checkpoint"]
