"""Training data: TRL's conversational format (`messages` + `images`) from LLaVA, Shikra and TRL records, and mixtures.

A recipe's `dataset:` is one *source* or `mixture: [source, ...]` (each with a `weight`). A source names where its
records are with one key (`comm_vlm.training.sources`: `path` JSON / JSONL, `parquet`, `imagefolder` with a metadata
file, `hub` id with `name` / `split`) and how to read them with `format`:

* `llava`: `conversations` (`from: human/gpt`, `<image>` placeholders) and `image` (one path, a list, or an image);
* `shikra`: grounding records, boxes written as the processor writes them (`shikra_to_messages`): conversations with
  `<boxes>` + `boxes` + `boxes_seq`, or Shikra's own files: REC/REG (`img_path`, `expression`, `bbox`; `task: rec`
  or `reg`), Flickr30k captions (`image_id`, `sentence`, `boxes`, `boxes_seq`) and GPT4Gen / Shikra-RD questions
  (`img_path`, `question`, `boxes`, `question_boxes_seq`, `cot_with_ans`, `answer_boxes_seq`);
* `messages`: TRL's conversational rows (`messages` with string or part-list contents, `images` or `image`).

`image_folder` roots relative image paths; `columns: {theirs: ours}` renames columns first; list columns stored as
JSON strings (a `metadata.csv`) are parsed. Every source becomes rows
of `{"messages": [...], "images": [...]}` whose user turns hold `{"type": "image"}` parts in placeholder order: the
format `trl.SFTTrainer` and its vision collator consume. `images` holds paths, or `datasets.Image` values (decoded to
`PIL.Image`s) where the source stores images (an image folder, parquet / Hub image columns).

Records that cannot be converted are dropped while reading and counted (`"malformed <format> record"`, or the image
problem that stopped a Shikra record); `validate_samples` then drops rows with a missing or corrupt image, no assistant
turn, or a placeholder/image count mismatch. `SkipReport` counts both, per source record; a dataset with no usable row
fails fast. Text-only rows (no image, no placeholder: LLaVA-1.5's ShareGPT conversations) train as they are. COMM's
stage 2 mixes 50% LLaVA-Instruct and 50% Shikra-RD: `mix_datasets` interleaves sources of any kind with given ratios.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from datasets import Dataset, Features, Image, List, Value, interleave_datasets
from PIL import Image as PILImage
from transformers.utils import logging

from ..models.image_utils import format_box, load_image, normalize_box
from ..prompts import REC_PROMPT, REG_PROMPT
from .sources import describe_source, read_records, source_kind, undecoded_image_feature


logger = logging.get_logger(__name__)

IMAGE_PLACEHOLDER = "<image>"
BOXES_PLACEHOLDER = "<boxes>"
PHRASE_START, PHRASE_END = "<ph_st>", "<ph_ed>"  # Shikra's marks around a grounded phrase
# Questions of Shikra's template records; REC and REG ask as the evaluation does (`comm_vlm.prompts`).
GROUNDED_CAPTION_PROMPT = "Briefly describe the image, with the box of each object you mention."
GROUNDED_REASONING_PROMPT = "Explain your answer step by step, with the box of each object you mention."
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_PART = {"type": Value("string"), "text": Value("string")}
MESSAGES_FEATURE = List({"role": Value("string"), "content": List(_PART)})


class _Unusable(Exception):
    """A record whose image cannot be read while converting it; `reason` is the `SkipReport` reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def _content(text: str) -> list[dict]:
    """Splits text at `<image>` placeholders into TRL content parts (newlines around a placeholder dropped)."""
    chunks = text.split(IMAGE_PLACEHOLDER)
    parts: list[dict] = []
    for i, chunk in enumerate(chunks):
        if i > 0:
            parts.append({"type": "image", "text": None})
        chunk = chunk.strip("\n") if len(chunks) > 1 else chunk
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def _resolve(image: Any, image_folder: str | os.PathLike | None) -> Any:
    """A relative path (or an undecoded `datasets.Image` value's path) joined to `image_folder`; images unchanged."""
    if isinstance(image, dict) and image.get("bytes") is None and image.get("path"):
        return {"bytes": None, "path": _resolve(image["path"], image_folder)}
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        return os.path.join(image_folder, path) if image_folder and not os.path.isabs(path) else path
    if image is None or not isinstance(image, (dict, PILImage.Image)):
        raise TypeError(f"an image entry must be a path or an image, got {type(image).__name__}")
    return image


def _images(value: Any, image_folder: str | os.PathLike | None) -> list:
    if value is None:
        return []
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return [_resolve(v, image_folder) for v in values]


def llava_to_messages(record: dict, image_folder: str | os.PathLike | None = None, task: str | None = None) -> dict:
    """One LLaVA-style record (`conversations` with `from: human/gpt`, `image` path(s), `<image>` placeholders).

    Args:
        record (`dict`): `conversations` and, unless text-only, `image` (or `images`): a path, a list of paths, or
            images (`PIL.Image` or undecoded `datasets.Image` values).
        image_folder (`str`, *optional*): the root of relative image paths.
        task (`str`, *optional*): unused (the converters share one signature).
    """
    images = record.get("image") if record.get("image") is not None else record.get("images")
    messages = [
        {"role": _ROLES.get(turn["from"], turn["from"]), "content": _content(turn["value"])}
        for turn in record["conversations"]
    ]
    return {"messages": messages, "images": _images(images, image_folder)}


def messages_to_messages(record: dict, image_folder: str | os.PathLike | None = None, task: str | None = None) -> dict:
    """One TRL conversational record, normalized: content as `{"type", "text"}` parts, image paths resolved.

    String contents are split at `<image>` placeholders; when the row has images but no image part and the first user
    turn is a string, the image parts go before its text (as TRL's `prepare_multimodal_messages` does). Image parts
    that carry their image (`{"type": "image", "image": ...}`) supply `images` when the row has none.

    Args:
        record (`dict`): `messages` (`role`, `content`) and `images` (a list) or `image` (one).
        image_folder (`str`, *optional*): the root of relative image paths.
        task (`str`, *optional*): unused (the converters share one signature).
    """
    images = _images(record.get("images") if record.get("images") is not None else record.get("image"), image_folder)
    messages, payloads, first_user_text = [], [], None
    for message in record["messages"]:
        content = message.get("content")
        if isinstance(content, str):
            parts = _content(content)
            if first_user_text is None and message["role"] in ("user", "human"):
                first_user_text = len(messages)
        else:
            parts = []
            for part in content or []:
                if part["type"] == "image" and part.get("image") is not None:
                    payloads.append(part["image"])
                parts.append({"type": part["type"], "text": part.get("text")})
            if first_user_text is None and message["role"] in ("user", "human"):
                first_user_text = -1
        messages.append({"role": _ROLES.get(message["role"], message["role"]), "content": parts})
    images = images or _images(payloads, image_folder)
    has_parts = any(p["type"] == "image" for m in messages for p in m["content"])
    if images and not has_parts and first_user_text is not None and first_user_text >= 0:
        messages[first_user_text]["content"][:0] = [{"type": "image", "text": None} for _ in images]
    return {"messages": messages, "images": images}


def _image_size(image: Any) -> tuple[int, int]:
    """`(width, height)` from the image header; raises `_Unusable` for a missing or unreadable image."""
    if isinstance(image, PILImage.Image):
        return image.size
    if isinstance(image, dict):
        image = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image.get("path")
    try:
        with PILImage.open(image) as opened:
            return opened.size
    except FileNotFoundError as err:
        raise _Unusable("missing image", str(err)) from err
    except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as err:
        raise _Unusable("corrupt image", str(err)) from err


def _write_boxes(text: str, boxes: list, boxes_seq: list) -> str:
    """`text` with its `<boxes>` replaced, in order, by the boxes `boxes_seq` indexes (`[x1,y1,x2,y2;...]`)."""
    if text.count(BOXES_PLACEHOLDER) != len(boxes_seq):
        raise ValueError(
            f"{text.count(BOXES_PLACEHOLDER)} {BOXES_PLACEHOLDER} in {text!r}, {len(boxes_seq)} boxes_seq"
        )
    indices = iter(boxes_seq)
    return re.sub(
        re.escape(BOXES_PLACEHOLDER),
        lambda _: ";".join(format_box(boxes[i])[1:-1] for i in next(indices)).join("[]"),
        text,
    )


def _phrases_to_boxes(text: str) -> str:
    """Shikra's `<ph_st>phrase<ph_ed>` marks to `phrase<boxes>`."""
    return text.replace(PHRASE_START, "").replace(PHRASE_END, BOXES_PLACEHOLDER)


def _shikra_dialogue(record: dict, task: str) -> tuple[list[tuple], list]:
    turns = record["conversations"]
    if any(turn.get("boxes_seq") is not None for turn in turns):  # Shikra's own layout: per turn
        seqs = [list(turn.get("boxes_seq") or []) for turn in turns]
    else:  # one `boxes_seq` over the conversation's `<boxes>`, in order
        flat, seqs = list(record.get("boxes_seq") or []), []
        for turn in turns:
            count = turn["value"].count(BOXES_PLACEHOLDER)
            seqs.append(flat[:count])
            flat = flat[count:]
        if flat:
            raise ValueError(f"{len(flat)} boxes_seq entries beyond the {BOXES_PLACEHOLDER} placeholders")
    return [(t["from"], t["value"], s) for t, s in zip(turns, seqs)], list(record.get("boxes") or [])


def _shikra_expression(record: dict, task: str) -> tuple[list[tuple], list]:
    question = f"{IMAGE_PLACEHOLDER}\n"
    if task == "reg":
        turns = [("human", question + REG_PROMPT.format(box=BOXES_PLACEHOLDER), [[0]])]
        turns.append(("gpt", record["expression"], []))
    else:
        turns = [("human", question + REC_PROMPT.format(expression=record["expression"]), [])]
        turns.append(("gpt", BOXES_PLACEHOLDER, [[0]]))
    return turns, [record["bbox"]]


def _shikra_caption(record: dict, task: str) -> tuple[list[tuple], list]:
    turns = [("human", f"{IMAGE_PLACEHOLDER}\n{GROUNDED_CAPTION_PROMPT}", [])]
    turns.append(("gpt", _phrases_to_boxes(record["sentence"]), record["boxes_seq"]))
    return turns, record["boxes"]


def _shikra_question(record: dict, task: str) -> tuple[list[tuple], list]:
    question = f"{IMAGE_PLACEHOLDER}\n{_phrases_to_boxes(record['question'])}"
    if record.get("cot_with_ans") is not None:  # Shikra-RD's Box-CoT answer: reasoning with boxes, then the answer
        answer, answer_seq = _phrases_to_boxes(record["cot_with_ans"]), record.get("answer_boxes_seq") or []
        question = f"{question} {GROUNDED_REASONING_PROMPT}"
    else:
        answer, answer_seq = record["answer"], []
    turns = [("human", question, record.get("question_boxes_seq") or []), ("gpt", answer, answer_seq)]
    return turns, record["boxes"]


# Shikra record layouts, tried in order: the key that identifies one, its required columns, and its reader (which
# returns the turns, as `(from, text with <boxes>, boxes_seq)`, and the pixel boxes).
SHIKRA_SCHEMAS = {
    "conversations": (("conversations", "boxes"), _shikra_dialogue),
    "expression": (("expression", "bbox"), _shikra_expression),  # REC / REG (`REC_ref3_train.jsonl`)
    "sentence": (("sentence", "boxes", "boxes_seq"), _shikra_caption),  # Flickr30k (`CWB_flickr30k_train.jsonl`)
    "question": (("question", "boxes"), _shikra_question),  # GPT4Gen / Shikra-RD
}
# Where a Shikra record's image is: `image` (a path or an image), `img_path`, or `image_id` (`<image_id>.jpg`).
SHIKRA_IMAGE_COLUMNS = ("image", "img_path", "image_id")


def shikra_to_messages(record: dict, image_folder: str | os.PathLike | None = None, task: str | None = "rec") -> dict:
    """One Shikra-style grounding record: `<boxes>` in the turns replaced by boxes written as the processor does.

    Boxes are pixel `[x1, y1, x2, y2]`, normalized by `width`/`height` (read from the image header when absent) and
    clamped to the image, as Shikra does. The image is `image` (a path or an image), `img_path`, or `image_id` (the
    file `<image_id>.jpg`). Layouts (`SHIKRA_SCHEMAS`): `conversations` with `boxes`, and `boxes_seq` per turn as
    Shikra writes it or one `boxes_seq` over all `<boxes>` in order; REC/REG expressions (`expression`, `bbox`: REC
    asks `REC_PROMPT` and answers the box, REG asks `REG_PROMPT` about the box and answers the expression); Flickr30k
    captions (`sentence` with `<ph_st>phrase<ph_ed>` marks, `boxes`, `boxes_seq`), answered with the boxes after
    their phrases; GPT4Gen / Shikra-RD (`question`, `question_boxes_seq`, `cot_with_ans`, `answer_boxes_seq`;
    `answer` when there is no reasoning), answered with the reasoning and its boxes.

    Args:
        record (`dict`): one record of a layout above.
        image_folder (`str`, *optional*): the root of relative image paths.
        task (`str`, *optional*): `"rec"` (default) or `"reg"`, for expression records.
    """
    layout = next((key for key in SHIKRA_SCHEMAS if record.get(key) is not None), None)
    where = next((key for key in SHIKRA_IMAGE_COLUMNS if record.get(key) is not None), None)
    if layout is None or where is None:
        raise KeyError(f"one of {list(SHIKRA_SCHEMAS)} and one of {list(SHIKRA_IMAGE_COLUMNS)}")
    turns, boxes = SHIKRA_SCHEMAS[layout][1](record, task or "rec")
    image = _resolve(f"{record[where]}.jpg" if where == "image_id" else record[where], image_folder)
    if record.get("width") and record.get("height"):
        size = (record["width"], record["height"])
    else:
        size = _image_size(image)
    normalized = [normalize_box(box, size, clip=True) for box in boxes]
    conversations = [{"from": who, "value": _write_boxes(text, normalized, seq)} for who, text, seq in turns]
    return llava_to_messages({"image": image, "conversations": conversations})


CONVERTERS = {"llava": llava_to_messages, "shikra": shikra_to_messages, "messages": messages_to_messages}
# The columns a format needs (any one of the alternatives).
FORMAT_COLUMNS = {
    "llava": [("conversations",)],
    "shikra": [columns for columns, _ in SHIKRA_SCHEMAS.values()],
    "messages": [("messages",)],
}


def _check_columns(columns: set[str], format: str, origin: str) -> None:
    options = FORMAT_COLUMNS[format]
    if format == "shikra" and not columns & set(SHIKRA_IMAGE_COLUMNS):
        raise ValueError(
            f"{origin}: Shikra records need their image in one of the columns {list(SHIKRA_IMAGE_COLUMNS)}, and the "
            f"source has {sorted(columns)}. Fix: rename the image column with `columns: {{their_name: image}}`."
        )
    if any(set(option) <= columns for option in options):
        return
    nearest = min(options, key=lambda option: len(set(option) - columns))
    fits = [name for name, opts in FORMAT_COLUMNS.items() if any(set(o) <= columns for o in opts)]
    hint = f"use `format: {fits[0]}` (its columns fit it), or " if fits else ""
    raise ValueError(
        f"{origin}: the {format!r} format needs the column(s) {sorted(set(nearest) - columns)}, and the source has "
        f"{sorted(columns)}. Fix: {hint}rename columns with `columns: {{their_name: {nearest[0]}}}`."
    )


def row_features(images_in_dataset: bool) -> Features:
    """Features of training rows: `messages` as `{"type", "text"}` parts, `images` as paths or as images.

    Args:
        images_in_dataset (`bool`): `images` holds `datasets.Image` values (decoded to `PIL.Image`s) rather than paths.
    """
    return Features({"messages": MESSAGES_FEATURE, "images": List(Image() if images_in_dataset else Value("string"))})


# Columns holding lists; a string there is read as JSON (a `metadata.csv` stores them so).
NESTED_COLUMNS = ("conversations", "messages", "boxes", "boxes_seq", "bbox", "question_boxes_seq", "answer_boxes_seq")


def _convert(record: dict, format: str, image_folder: Any, task: str | None, origin: str) -> tuple[dict | None, str]:
    try:
        if isinstance(record, dict) and any(isinstance(record.get(k), str) for k in NESTED_COLUMNS):
            record = {k: json.loads(v) if k in NESTED_COLUMNS and isinstance(v, str) else v for k, v in record.items()}
        return CONVERTERS[format](record, image_folder, task), ""
    except _Unusable as err:
        return None, err.reason
    except (AttributeError, KeyError, IndexError, StopIteration, ValueError, TypeError, OSError) as err:
        name = record.get("id", "?") if isinstance(record, dict) else "?"
        logger.warning(f"{origin}: skipping malformed {format} record {name}: {type(err).__name__}: {err}")
        return None, f"malformed {format} record"


def _convert_row(record: dict, **kwargs: Any) -> dict:
    row, problem = _convert(dict(record), **kwargs)  # `Dataset.map` passes a lazy mapping
    return {**(row or {"messages": [], "images": []}), "_problem": problem}


def read_source(spec: dict[str, Any]) -> tuple[Dataset, Counter]:
    """One dataset source as training rows, and the records dropped while reading them, by reason.

    Args:
        spec (`dict`): a source (`path` / `parquet` / `imagefolder` / `hub` and its keys, `format`, `image_folder`,
            `columns`, `task`); see the module docstring.

    Raises:
        ValueError: a bad key or value, columns missing for the format, an image column of another type, or no
            record that converts.
    """
    check_dataset_spec(spec, in_mixture=True)
    format, origin = spec.get("format", "llava"), describe_source(spec)
    options = {"format": format, "image_folder": spec.get("image_folder"), "task": spec.get("task"), "origin": origin}
    records, stored_images = read_records(spec)
    if isinstance(records, Dataset):
        _check_columns(set(records.column_names), format, origin)
        features = Features({**row_features(stored_images), "_problem": Value("string")})
        converted = records.map(
            partial(_convert_row, **options), remove_columns=records.column_names, features=features, desc=origin
        )
        problems = Counter(p for p in converted["_problem"] if p)
        if problems:
            converted = converted.filter(lambda p: not p, input_columns="_problem")
        dataset, total = converted.remove_columns("_problem"), len(records)
    else:
        _check_columns(set().union(*(r for r in records if isinstance(r, dict))), format, origin)
        rows, problems = [], Counter()
        for record in records:
            row, problem = _convert(record, **options)
            if row is None:
                problems[problem] += 1
            else:
                rows.append(row)
        dataset, total = (Dataset.from_list(rows, features=row_features(False)) if rows else None), len(records)
    if not dataset:
        detail = ", ".join(f"{reason}: {n}" for reason, n in sorted(problems.items()))
        raise ValueError(
            f"{origin}: none of its {total} records is a valid {format!r} sample ({detail}). Check `format`, "
            "`image_folder` and the records against the format (see comm_vlm.training.data)."
        )
    return dataset, problems


def load_source(
    source: str | os.PathLike | dict[str, Any], format: str = "llava", image_folder: str | os.PathLike | None = None
) -> Dataset:
    """One source as training rows (records that do not convert are dropped and logged; `read_source` counts them).

    Args:
        source (`str`, `os.PathLike` or `dict`): a JSON / JSONL / parquet file, or a source mapping (see
            `read_source`; `format` and `image_folder` then come from it).
        format (`str`): `llava`, `shikra` or `messages`, for a file.
        image_folder (`str`, *optional*): the root of relative image paths, for a file.
    """
    if not isinstance(source, dict):
        kind = "parquet" if os.fspath(source).endswith(".parquet") else "path"
        source = {kind: os.fspath(source), "format": format, "image_folder": image_folder}
    return read_source({k: v for k, v in source.items() if v is not None})[0]


@dataclass
class SkipReport:
    """Source records dropped while reading or by `validate_samples`, by reason (printed at the end of a run)."""

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
        image: a path, URL or in-memory image, as a row's `images` entry holds it, or an undecoded `datasets.Image`
            value (`{"bytes": ..., "path": ...}`).
        checked (`dict`, *optional*): outcomes by path, filled and read here, so that a path shared by many rows (one
            image, many questions) is decoded once. In-memory images are always checked.
    """
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            image = io.BytesIO(image["bytes"])
        elif image.get("path"):
            image = image["path"]
        else:
            return "missing image"
    key = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
    if checked is not None and key is not None and key in checked:
        return checked[key]
    try:
        load_image(PILImage.open(image) if isinstance(image, io.BytesIO) else image)
        problem = None
    except FileNotFoundError:
        problem = "missing image"
    except (ValueError, OSError, SyntaxError):
        problem = "corrupt image"
    if checked is not None and key is not None:
        checked[key] = problem
    return problem


def sample_problem(row: dict, checked: dict[str, str | None] | None = None) -> str | None:
    """Why a row cannot be trained on, or None: image missing/corrupt, no assistant turn, placeholder mismatch.

    A text-only row (no image part, no image) is fine. `checked` is `image_problem`'s cache of outcomes by path.
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
    dataset: Dataset,
    num_proc: int | None = None,
    checked: dict[str, str | None] | None = None,
    dropped: Counter | None = None,
) -> tuple[Dataset, SkipReport]:
    """Drops unusable rows (see `sample_problem`), counting them. Raises if no row is usable.

    Every image is decoded once here (rows that share an image path share the outcome), so a long run never meets a
    bad file mid-way; images stored in the dataset are checked undecoded, so a corrupt one is counted, not raised.

    Args:
        dataset (`Dataset`): training rows (`messages`, `images`).
        num_proc (`int`, *optional*): processes for the check.
        checked (`dict`, *optional*): outcomes by path, to share them between datasets over the same images.
        dropped (`Counter`, *optional*): records already dropped while reading the source, by reason (as
            `read_source` returns them): counted in the report.
    """
    checked = {} if checked is None else checked
    view = dataset
    if "images" in dataset.features and (undecoded := undecoded_image_feature(dataset.features["images"])):
        view = dataset.cast_column("images", undecoded)
    view = view.select_columns([c for c in ("messages", "images") if c in view.column_names])
    problems = view.map(
        lambda row: {"_problem": sample_problem(row, checked) or ""},
        remove_columns=view.column_names,
        num_proc=num_proc,
        load_from_cache_file=False,  # images may have changed since a cached check
        desc="Checking samples",
    )["_problem"]
    dropped = dropped or Counter()
    report = SkipReport(total=len(problems) + sum(dropped.values()), kept=sum(1 for p in problems if not p))
    report.reasons.update(dropped)
    report.reasons.update(p for p in problems if p)
    if report.kept == 0:
        raise ValueError(
            f"No usable sample in the dataset: {report}. Check image paths (`image_folder`) and the conversation "
            "format."
        )
    if report.skipped:
        logger.warning(f"Skipping bad samples: {report}")
    keep = [i for i, p in enumerate(problems) if not p]
    return (dataset.select(keep) if len(keep) < len(problems) else dataset), report


def mix_datasets(datasets: list[Dataset], weights: list[float], seed: int = 0) -> Dataset:
    """Interleaves sources with sampling probabilities proportional to `weights` (until every source is used up).

    Sources whose `images` differ in type (paths and stored images) are mixed as `datasets.Image` values.
    """
    if len(datasets) != len(weights) or any(w <= 0 for w in weights):
        raise ValueError(f"Need one positive weight per dataset, got {len(datasets)} datasets and weights {weights}.")
    total = sum(weights)
    datasets = [d.select_columns(["messages", "images"]) for d in datasets]
    if len({repr(d.features["images"]) for d in datasets}) > 1:
        datasets = [d.cast_column("images", List(Image())) for d in datasets]
    return interleave_datasets(
        datasets, probabilities=[w / total for w in weights], seed=seed, stopping_strategy="all_exhausted"
    )


def check_dataset_spec(spec: dict[str, Any], in_mixture: bool = False) -> None:
    """Checks a recipe's `dataset:` (one source or a `mixture`) without reading it; raises `ValueError` saying the fix.

    Args:
        spec (`dict`): the `dataset:` mapping.
        in_mixture (`bool`): whether `spec` is one entry of a mixture (then it may have a `weight`).
    """
    if isinstance(spec, dict) and "mixture" in spec:
        entries = spec["mixture"]
        if set(spec) != {"mixture"} or not isinstance(entries, list) or not entries:
            raise ValueError(
                f"`mixture:` takes a non-empty list of sources (each with a `weight`, default 1) and no other key; "
                f"got {spec!r}."
            )
        for entry in entries:
            check_dataset_spec(entry, in_mixture=True)
        return
    kind = source_kind(spec)
    format = spec.get("format", "llava")
    if format not in CONVERTERS:
        raise ValueError(f"`{kind}: {spec[kind]}`: unknown `format: {format}`; use one of {sorted(CONVERTERS)}.")
    if "task" in spec and (format != "shikra" or spec["task"] not in ("rec", "reg")):
        raise ValueError(f"`{kind}: {spec[kind]}`: `task: rec` or `task: reg` goes with `format: shikra`.")
    if not isinstance(spec.get("columns") or {}, dict):
        raise ValueError(f"`{kind}: {spec[kind]}`: `columns` maps source column names to the format's names.")
    weight = spec.get("weight", 1.0)
    if "weight" in spec and not in_mixture:
        raise ValueError(f"`{kind}: {spec[kind]}`: `weight` applies to `mixture:` entries; remove it.")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
        raise ValueError(f"`{kind}: {spec[kind]}`: `weight` must be a number > 0, got {weight!r}.")


def build_dataset(spec: dict[str, Any], seed: int = 0) -> tuple[Dataset, SkipReport]:
    """A recipe's `dataset:` entry: one source (see `read_source`) or `mixture: [{..., weight}]` of any kinds.

    A mixture's sources are validated before they are interleaved: the report counts each source record once (the
    mixture repeats rows), and a bad row is dropped before it can be drawn.

    Args:
        spec (`dict`): the `dataset:` mapping.
        seed (`int`): the seed of the mixture's draws.
    """
    check_dataset_spec(spec)
    if "mixture" not in spec:
        dataset, dropped = read_source(spec)
        return validate_samples(dataset, dropped=dropped)
    sources, report, checked = [], SkipReport(), {}
    for source in spec["mixture"]:
        dataset, dropped = read_source(source)
        rows, source_report = validate_samples(dataset, checked=checked, dropped=dropped)
        sources.append(rows)
        report.total += source_report.total
        report.kept += source_report.kept
        report.reasons.update(source_report.reasons)
    return mix_datasets(sources, [s.get("weight", 1.0) for s in spec["mixture"]], seed=seed), report


__all__ = [
    "CONVERTERS",
    "FORMAT_COLUMNS",
    "GROUNDED_CAPTION_PROMPT",
    "GROUNDED_REASONING_PROMPT",
    "REC_PROMPT",
    "REG_PROMPT",
    "SHIKRA_SCHEMAS",
    "SkipReport",
    "build_dataset",
    "check_dataset_spec",
    "image_problem",
    "llava_to_messages",
    "load_source",
    "messages_to_messages",
    "mix_datasets",
    "read_source",
    "row_features",
    "sample_problem",
    "shikra_to_messages",
    "validate_samples",
]
