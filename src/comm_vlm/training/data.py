"""Training data: TRL's conversational format (`messages` + `images`) from LLaVA JSON, Shikra grounding and mixtures.

Every source becomes rows of `{"messages": [...], "images": [path, ...]}` where user turns hold `{"type": "image"}`
parts in placeholder order: the format `trl.SFTTrainer` and its vision collator consume (loss on assistant tokens only
through the chat template's `{% generation %}` markers). `validate_samples` drops rows with a missing or corrupt image,
no assistant turn, or a placeholder/image count mismatch, and counts them by reason; a dataset with no usable row fails
fast. COMM's stage 2 mixes 50% LLaVA-Instruct and 50% Shikra-RD: `mix_datasets` interleaves with given ratios.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, interleave_datasets, load_dataset
from transformers.utils import logging

from ..models.image_utils import format_box, load_image, normalize_box


logger = logging.get_logger(__name__)

IMAGE_PLACEHOLDER = "<image>"
BOXES_PLACEHOLDER = "<boxes>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _content(text: str) -> list[dict]:
    """Splits text at `<image>` placeholders into TRL content parts (newlines around a placeholder dropped)."""
    chunks = text.split(IMAGE_PLACEHOLDER)
    parts: list[dict] = []
    for i, chunk in enumerate(chunks):
        if i > 0:
            parts.append({"type": "image"})
        chunk = chunk.strip("\n") if len(chunks) > 1 else chunk
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def _resolve(path: str, image_folder: str | os.PathLike | None) -> str:
    return str(Path(image_folder) / path) if image_folder and not os.path.isabs(path) else path


def llava_to_messages(record: dict, image_folder: str | os.PathLike | None = None) -> dict:
    """One LLaVA-style record (`conversations` with `from: human/gpt`, `image` path(s), `<image>` placeholders)."""
    images = record.get("image") or record.get("images") or []
    images = [images] if isinstance(images, str) else list(images)
    messages = [
        {"role": _ROLES.get(turn["from"], turn["from"]), "content": _content(turn["value"])}
        for turn in record["conversations"]
    ]
    return {"messages": messages, "images": [_resolve(p, image_folder) for p in images]}


def shikra_to_messages(record: dict, image_folder: str | os.PathLike | None = None) -> dict:
    """One Shikra-style grounding record: `<boxes>` in the turns are replaced by boxes written as the processor does.

    Expected keys: `image`, `conversations` (as LLaVA), `boxes` (pixel `[x1, y1, x2, y2]`), `boxes_seq` (per
    `<boxes>` occurrence, in order, the indices into `boxes`), and `width`/`height` (read from the image if absent).
    """
    image_path = _resolve(record["image"], image_folder)
    if "width" in record and "height" in record:
        size = (record["width"], record["height"])
    else:
        size = load_image(image_path).size
    boxes_seq = iter(record.get("boxes_seq") or [])

    def write(match: re.Match) -> str:
        indices = next(boxes_seq)
        return ";".join(format_box(normalize_box(record["boxes"][i], size))[1:-1] for i in indices).join("[]")

    conversations = [
        {"from": t["from"], "value": re.sub(re.escape(BOXES_PLACEHOLDER), write, t["value"])}
        for t in record["conversations"]
    ]
    return llava_to_messages({"image": image_path, "conversations": conversations})


CONVERTERS = {"llava": llava_to_messages, "shikra": shikra_to_messages}


def load_source(
    path: str | os.PathLike, format: str = "llava", image_folder: str | os.PathLike | None = None
) -> Dataset:
    """Loads a JSON / JSONL file of one format (`llava`, `shikra`, or `messages` = already TRL-shaped)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Dataset file {path} does not exist.")
    if format == "messages":
        return load_dataset("json", data_files=str(path), split="train")
    if format not in CONVERTERS:
        raise ValueError(f"Unknown dataset format {format!r}; use one of {['messages', *CONVERTERS]}.")
    text = path.read_text()
    records = (
        json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line]
    )
    rows, bad = [], 0
    for record in records:
        try:
            rows.append(CONVERTERS[format](record, image_folder))
        except (KeyError, StopIteration, ValueError, TypeError, OSError) as err:
            bad += 1
            logger.warning(f"{path}: skipping malformed {format} record {record.get('id', '?')}: {err}")
    if not rows:
        raise ValueError(f"{path}: none of its {len(records)} records is a valid {format!r} sample.")
    dataset = Dataset.from_list(rows)
    dataset.info.description = f"{format}:{path} ({bad} malformed records skipped)"
    return dataset


@dataclass
class SkipReport:
    """Rows dropped by `validate_samples`, by reason (printed at the end of a run)."""

    total: int = 0
    kept: int = 0
    reasons: Counter = field(default_factory=Counter)

    @property
    def skipped(self) -> int:
        return self.total - self.kept

    def __str__(self) -> str:
        detail = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.reasons.items())) or "none"
        return f"{self.skipped} of {self.total} samples skipped ({detail})"


def image_problem(image: Any, checked: dict[str, str | None] | None = None) -> str | None:
    """Why an image cannot be loaded (`"missing image"`, `"corrupt image"`), or None.

    Args:
        image: a path, URL or in-memory image, as a row's `images` entry holds it.
        checked (`dict`, *optional*): outcomes by path, filled and read here, so that a path shared by many rows (one
            image, many questions) is decoded once. In-memory images are always checked.
    """
    key = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
    if checked is not None and key is not None and key in checked:
        return checked[key]
    try:
        load_image(image)
        problem = None
    except FileNotFoundError:
        problem = "missing image"
    except (ValueError, OSError):
        problem = "corrupt image"
    if checked is not None and key is not None:
        checked[key] = problem
    return problem


def sample_problem(row: dict, checked: dict[str, str | None] | None = None) -> str | None:
    """Why a row cannot be trained on, or None: image missing/corrupt, no assistant turn, placeholder mismatch.

    `checked` is `image_problem`'s cache of outcomes by image path.
    """
    messages = row.get("messages") or []
    if not any(m.get("role") == "assistant" and m.get("content") for m in messages):
        return "no assistant turn"
    placeholders = sum(
        1 for m in messages if isinstance(m["content"], list) for part in m["content"] if part.get("type") == "image"
    )
    images = row.get("images") or []
    if placeholders != len(images):
        return "image placeholder count mismatch"
    return next((problem for image in images if (problem := image_problem(image, checked))), None)


def validate_samples(
    dataset: Dataset, num_proc: int | None = None, checked: dict[str, str | None] | None = None
) -> tuple[Dataset, SkipReport]:
    """Drops unusable rows (see `sample_problem`), counting them. Raises if no row is usable.

    Every image path is decoded once here (rows that share an image share the outcome), so a long run never meets a
    bad file mid-way. `checked` (outcomes by path) can be passed to share them between datasets over the same images.
    """
    checked = {} if checked is None else checked
    problems = dataset.map(
        lambda row: {"_problem": sample_problem(row, checked) or ""}, num_proc=num_proc, desc="Checking samples"
    )["_problem"]
    report = SkipReport(total=len(problems), kept=sum(1 for p in problems if not p))
    report.reasons.update(p for p in problems if p)
    if report.kept == 0:
        raise ValueError(
            f"No usable sample in the dataset: {report}. Check image paths (`image_folder`) and the conversation "
            "format."
        )
    if report.skipped:
        logger.warning(f"Skipping bad samples: {report}")
    keep = [i for i, p in enumerate(problems) if not p]
    return (dataset.select(keep) if report.skipped else dataset), report


def mix_datasets(datasets: list[Dataset], weights: list[float], seed: int = 0) -> Dataset:
    """Interleaves sources with sampling probabilities proportional to `weights` (until every source is used up)."""
    if len(datasets) != len(weights) or any(w <= 0 for w in weights):
        raise ValueError(f"Need one positive weight per dataset, got {len(datasets)} datasets and weights {weights}.")
    total = sum(weights)
    columns = ["messages", "images"]
    datasets = [d.select_columns(columns) for d in datasets]
    return interleave_datasets(
        datasets, probabilities=[w / total for w in weights], seed=seed, stopping_strategy="all_exhausted"
    )


def build_dataset(spec: dict[str, Any], seed: int = 0) -> tuple[Dataset, SkipReport]:
    """A recipe's `dataset:` entry: one source (`path`, `format`, `image_folder`) or `mixture: [{..., weight}]`.

    A mixture's sources are validated before they are interleaved: the report counts each source row once (the mixture
    repeats rows), and a bad row is dropped before it can be drawn.
    """
    if "mixture" not in spec:
        return validate_samples(load_source(spec["path"], spec.get("format", "llava"), spec.get("image_folder")))
    sources, report, checked = [], SkipReport(), {}
    for source in spec["mixture"]:
        rows, source_report = validate_samples(
            load_source(source["path"], source.get("format", "llava"), source.get("image_folder")), checked=checked
        )
        sources.append(rows)
        report.total += source_report.total
        report.kept += source_report.kept
        report.reasons.update(source_report.reasons)
    return mix_datasets(sources, [s.get("weight", 1.0) for s in spec["mixture"]], seed=seed), report


__all__ = [
    "SkipReport",
    "build_dataset",
    "image_problem",
    "llava_to_messages",
    "load_source",
    "mix_datasets",
    "sample_problem",
    "shikra_to_messages",
    "validate_samples",
]
