"""Readers of the published benchmark files: each turns one file schema into evaluation rows.

A reader takes the data files (already resolved and filtered by split, see `comm_vlm.evaluation.benchmarks`), the
image folder, the split and the prompt template, and yields rows in the format `comm_vlm.evaluation.runners.evaluate`
consumes (`make_row`): one user turn (the image, then the prompt), the image (a path, or the `{"bytes", "path"}` value
a parquet file stores), `task`, `split` and the scoring columns (`answer`, `references`, `box`, `pope_setting`,
`question_type`, `category`, `image_id`, `question_id`).

Schemas read (see `tests/fixtures/benchmarks/README.md` for the facts each relies on):

* POPE: the official `coco_pope_<setting>.json` (JSON lines: `question_id`, `image`, `text`, `label`; the setting is
  the file's) and the lmms-lab/POPE parquet (`question_id`, `question`, `answer`, `image` bytes, `category` = the
  setting).
* RefCOCO / RefCOCO+ / RefCOCOg: the lmms-lab parquet (one row per annotation: `question_id`, `image`, `answer` = its
  referring expressions, `bbox` = x, y, w, h in pixels) and Shikra's REC jsonl (one row per expression: `img_path`,
  `expression`, `bbox` = x1, y1, x2, y2 in pixels, `width` / `height` when known).
* VQAv2 / OK-VQA: the official questions JSON (`questions`: `question_id`, `image_id`, `question`) and annotations
  JSON (`annotations`: `question_id`, `answers` (10), `answer_type`, `multiple_choice_answer`), COCO image names.
* COCO / Flickr30k captions: Karpathy's `dataset_<name>.json` (`images`: `filepath`, `filename`, `split`,
  `sentences[].raw`).
* MME: the lmms-lab/MME parquet (`question_id` = the image, `question`, `answer` Yes/No, `category`, `image`).
* GQA: `testdev_balanced_questions.json` (question id -> `imageId`, `question`, `answer`, `types`); TextVQA:
  `TextVQA_0.5.1_val.json` (`data`: `question_id`, `image_id`, `question`, `answers` (10)).
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from transformers.utils import logging

from ..models.image_utils import format_box, normalize_box
from ..prompts import CAPTION_PROMPT, REC_PROMPT, REG_PROMPT, SHORT_ANSWER
from .metrics import normalize_vqa_answer


logger = logging.get_logger(__name__)

SHORT_ANSWER_PROMPT = "{question}\n" + SHORT_ANSWER  # LLaVA-1.5's evaluation files
POPE_SETTINGS = ("random", "popular", "adversarial")
_MME_SUFFIX = re.compile(r"\s*Please answer yes or no\.?\s*$", re.IGNORECASE)

Row = dict[str, Any]


# ----------------------------------------------------------------------------------------------------------------
# Files, images, rows
# ----------------------------------------------------------------------------------------------------------------


def load_json(path: str | os.PathLike) -> Any:
    """A JSON document, or the list of records of a JSON-lines file (one record per line).

    Args:
        path (`str` or `os.PathLike`): the file.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is neither JSON nor JSON lines ({err}); give the published file.") from err


def iter_records(files: Sequence[Path]) -> Iterator[tuple[Path, dict]]:
    """`(file, record)` for every record of JSON / JSON-lines lists and parquet files, in file order.

    Parquet files are streamed (a row limit stops reading early); their image columns stay `{"bytes", "path"}`.

    Args:
        files (`Sequence[Path]`): `.json`, `.jsonl` or `.parquet` files.
    """
    for path in files:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
                for record in batch.to_pylist():
                    yield path, record
            continue
        data = load_json(path)
        records = data if isinstance(data, list) else [data]
        for record in records:
            if not isinstance(record, dict):
                raise ValueError(f"{path} holds a {type(record).__name__} where a record (an object) was expected.")
            yield path, record


def require(record: dict, keys: Sequence[str], path: Path, schema: str) -> None:
    """Raises a `ValueError` naming the missing keys, the record's keys and the expected schema.

    Args:
        record (`dict`): one record.
        keys (`Sequence[str]`): the keys the schema needs.
        path (`Path`): its file, for the message.
        schema (`str`): the schema's name (e.g. "lmms-lab/POPE parquet").
    """
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(
            f"{path}: a record lacks {missing} of the {schema} schema (its keys: {sorted(record)}). Give the "
            "benchmark's published file (see docs/evaluation.md for the schemas read)."
        )


def image_value(value: Any, images: Path | None, path: Path) -> str | dict:
    """A row's image: stored bytes as `{"bytes", "path"}`, or the file path (relative paths joined to `images`).

    Args:
        value: a path, or a parquet image struct (`{"bytes", "path"}`).
        images (`Path`, *optional*): the folder of relative image paths.
        path (`Path`): the data file, for the message.
    """
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return {"bytes": value["bytes"], "path": value.get("path")}
        value = value.get("path")
    if not value:
        raise ValueError(f"{path}: a record has no image (neither bytes nor a path).")
    file = Path(value)
    if not file.is_absolute():
        if images is None:
            raise ValueError(
                f"{path} names its images by file name ({value!r}); pass the folder that holds them with --images "
                "(`images=` in Python)."
            )
        file = images / file
    return str(file)


def image_size(image: str | dict) -> tuple[int, int]:
    """`(width, height)` from the image header (no full decode).

    Args:
        image (`str` or `dict`): a path or a `{"bytes", "path"}` value.
    """
    source = io.BytesIO(image["bytes"]) if isinstance(image, dict) else image
    try:
        with Image.open(source) as opened:
            return opened.size
    except FileNotFoundError:
        raise FileNotFoundError(f"Image {image} does not exist; check --images (the folder of the images).") from None


def fill(template: str, **fields: str) -> str:
    """The prompt: `template` with its `{question}`, `{expression}` or `{box}` fields filled.

    Args:
        template (`str`): the prompt template.
        fields: the values this benchmark gives.
    """
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"The prompt {template!r} cannot be filled ({type(err).__name__}: {err}); this benchmark fills "
            f"{sorted('{' + k + '}' for k in fields)} (write literal braces as {{{{ and }}}})."
        ) from err


def make_row(
    task: str,
    split: str,
    prompt: str,
    image: str | dict,
    question_id: Any,
    question: str = "",
    answer: str = "",
    references: Sequence[str] = (),
    box: Sequence[float] = (),
    question_type: str = "",
    pope_setting: str = "",
    category: str = "",
    image_id: Any = "",
) -> Row:
    """One evaluation row: a user turn holding the image then `prompt`, plus the scoring columns.

    Args:
        task (`str`): the `TASK_SPECS` task that scores it.
        split (`str`): the benchmark split it belongs to.
        prompt (`str`): the full question text.
        image (`str` or `dict`): a path or a `{"bytes", "path"}` value.
        question_id: the published id. question (`str`): the question / expression as published.
        answer (`str`): the ground truth (a formatted box for REC). references (`Sequence[str]`): all reference
            answers (default: `[answer]`). box (`Sequence[float]`): the normalised `(x1, y1, x2, y2)` target.
        question_type, pope_setting, category (`str`): breakdown keys. image_id: the image's id.
    """
    return {
        "messages": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": prompt}]}],
        "images": [image],
        "task": task,
        "split": split,
        "question_id": str(question_id),
        "question": question,
        "answer": answer,
        "references": list(references) or ([answer] if answer else []),
        "box": [float(v) for v in box],
        "question_type": question_type,
        "pope_setting": pope_setting,
        "category": category,
        "image_id": str(image_id),
    }


def split_in_name(path: Path, splits: Sequence[str]) -> str | None:
    """The split a file name states (`val-00000-of-00001.parquet`, `REC_refcoco_unc_testA.jsonl`), or None.

    Args:
        path (`Path`): the file.
        splits (`Sequence[str]`): the benchmark's split names.
    """
    tokens = re.split(r"[-_.]", path.name)
    found = [s for s in splits if s in tokens]
    return found[0] if len(found) == 1 else None


# ----------------------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------------------


def read_pope(files: Sequence[Path], images: Path | None, split: str, prompt: str) -> Iterator[Row]:
    """POPE rows from the official `coco_pope_<setting>.json` files or the lmms-lab/POPE parquet; `split` is a
    setting (`random`, `popular`, `adversarial`) or `all`."""
    for path, record in iter_records(files):
        if "label" in record:  # the official files
            require(record, ("question_id", "image", "text", "label"), path, "official POPE")
            setting = record.get("category") or split_in_name(path, POPE_SETTINGS) or ""
            question, answer = record["text"], record["label"]
        else:
            require(record, ("question_id", "question", "answer", "image", "category"), path, "lmms-lab/POPE")
            setting, question, answer = record["category"], record["question"], record["answer"]
        if split != "all" and setting != split:
            if not setting:
                raise ValueError(
                    f"{path} does not say its POPE setting: name it coco_pope_<setting>.json (as published) or "
                    "leave --split at `all`."
                )
            continue
        yield make_row(
            "pope",
            split,
            fill(prompt, question=question.strip()),
            image_value(record["image"], images, path),
            record["question_id"],
            question=question,
            answer=str(answer).strip().lower(),
            pope_setting=setting,
            image_id=record.get("image_source") or (record["image"] if isinstance(record["image"], str) else ""),
        )


def _regions(files: Sequence[Path], images: Path | None) -> Iterator[tuple[Any, str, str | dict, list, list[str]]]:
    """`(region key, region id, image, normalised box, expressions)` per record of the lmms-lab RefCOCO parquet (one
    annotation: its id, all its expressions) or Shikra's REC jsonl (one expression; the region: its image and box)."""
    for number, (path, record) in enumerate(iter_records(files)):
        if "expression" in record:  # Shikra: pixel x1, y1, x2, y2
            require(record, ("img_path", "expression", "bbox"), path, "Shikra REC")
            image = image_value(record["img_path"], images, path)
            size = (record["width"], record["height"]) if record.get("width") and record.get("height") else None
            pixel_box = list(record["bbox"])
            expressions = [record["expression"]]
            key, region_id = (record["img_path"], tuple(pixel_box)), str(record.get("id", number))
        else:  # lmms-lab: pixel x, y, w, h and all the annotation's expressions
            require(record, ("question_id", "image", "answer", "bbox"), path, "lmms-lab RefCOCO")
            image, size = image_value(record["image"], images, path), None
            x, y, w, h = record["bbox"]
            pixel_box = [x, y, x + w, y + h]
            answer = record["answer"]
            expressions = [answer] if isinstance(answer, str) else list(answer)
            key = region_id = str(record["question_id"])
        box = list(normalize_box(pixel_box, size or image_size(image), clip=True))
        yield key, region_id, image, box, [e.strip() for e in expressions]


def read_rec(files: Sequence[Path], images: Path | None, split: str, prompt: str) -> Iterator[Row]:
    """REC rows (one per referring expression): Shikra's question, the pixel box normalised by the image size."""
    for _, region_id, image, box, expressions in _regions(files, images):
        for number, expression in enumerate(expressions):
            yield make_row(
                "rec",
                split,
                fill(prompt, expression=expression),
                image,
                f"{region_id}/{number}" if len(expressions) > 1 else region_id,
                question=expression,
                answer=format_box(box),
                box=box,
            )


def read_reg(files: Sequence[Path], images: Path | None, split: str, prompt: str) -> Iterator[Row]:
    """REG rows (one per region): the box asked about, every referring expression of the region as references."""
    regions: dict[Any, tuple[str, str | dict, list, list[str]]] = {}
    for key, region_id, image, box, expressions in _regions(files, images):
        regions.setdefault(key, (region_id, image, box, []))[3].extend(expressions)
    for region_id, image, box, expressions in regions.values():
        yield make_row(
            "reg",
            split,
            fill(prompt, box=format_box(box)),
            image,
            region_id,
            answer=expressions[0],
            references=expressions,
            box=box,
        )


def _vqa_image(images: Path | None, subtype: str, image_id: Any, path: Path) -> str:
    name = f"COCO_{subtype}_{int(image_id):012d}.jpg"
    if images is not None and not (images / name).exists() and (images / subtype / name).exists():
        name = f"{subtype}/{name}"
    return image_value(name, images, path)


def read_vqa(files: Sequence[Path], images: Path | None, split: str | None, prompt: str) -> Iterator[Row]:
    """VQAv2 / OK-VQA rows from the official questions + annotations JSON pair; `question_type` is the answer type
    (yes/no, number, other), as the official report breaks accuracy down."""
    documents = {path: load_json(path) for path in files}
    questions = [(p, d) for p, d in documents.items() if isinstance(d, dict) and "questions" in d]
    annotations = [(p, d) for p, d in documents.items() if isinstance(d, dict) and "annotations" in d]
    if len(questions) != 1 or len(annotations) != 1:
        raise ValueError(
            f"VQAv2 / OK-VQA read two files, the questions JSON (with `questions`) and the annotations JSON (with "
            f"`annotations`); got {[str(p) for p in files]}. Pass both to --data."
        )
    (question_path, question_doc), (_, annotation_doc) = questions[0], annotations[0]
    by_id = {a["question_id"]: a for a in annotation_doc["annotations"]}
    subtype = question_doc.get("data_subtype") or annotation_doc.get("data_subtype") or "val2014"
    missing = 0
    for question in question_doc["questions"]:
        require(question, ("question_id", "image_id", "question"), question_path, "VQA questions")
        annotation = by_id.get(question["question_id"])
        if annotation is None:
            missing += 1
            continue
        references = [a["answer"] for a in annotation["answers"]]
        yield make_row(
            "vqa",
            split or subtype,
            fill(prompt, question=question["question"]),
            _vqa_image(images, subtype, question["image_id"], question_path),
            question["question_id"],
            question=question["question"],
            answer=annotation.get("multiple_choice_answer") or Counter(references).most_common(1)[0][0],
            references=references,
            question_type=annotation.get("answer_type", ""),
            image_id=question["image_id"],
        )
    if missing:
        logger.warning(f"{missing} questions have no annotation in the annotations file and were left out.")


def read_karpathy(files: Sequence[Path], images: Path | None, split: str, prompt: str) -> Iterator[Row]:
    """Caption rows of one Karpathy split (`dataset_coco.json`, `dataset_flickr30k.json`): every raw sentence of the
    image is a reference."""
    for path in files:
        document = load_json(path)
        if not isinstance(document, dict) or "images" not in document:
            raise ValueError(f"{path} is not a Karpathy split file (a JSON object with `images`).")
        for entry in document["images"]:
            require(entry, ("filename", "split", "sentences"), path, "Karpathy split")
            if entry["split"] != split:
                continue
            name = Path(entry.get("filepath") or "", entry["filename"])
            if images is not None and not (images / name).exists() and (images / entry["filename"]).exists():
                name = Path(entry["filename"])
            references = [s["raw"].strip() for s in entry["sentences"]]
            yield make_row(
                "caption",
                split,
                fill(prompt),
                image_value(str(name), images, path),
                entry.get("cocoid", entry.get("imgid", entry["filename"])),
                answer=references[0],
                references=references,
                image_id=entry.get("cocoid", entry["filename"]),
            )


def read_mme(files: Sequence[Path], images: Path | None, split: str, prompt: str) -> Iterator[Row]:
    """MME rows from the lmms-lab/MME parquet; the question's own "Please answer yes or no." is replaced by the
    prompt's instruction, as LLaVA-1.5 asks it."""
    for path, record in iter_records(files):
        require(record, ("question_id", "question", "answer", "category", "image"), path, "lmms-lab/MME")
        question = _MME_SUFFIX.sub("", record["question"].strip())
        yield make_row(
            "mme",
            split,
            fill(prompt, question=question),
            image_value(record["image"], images, path),
            record["question_id"],
            question=record["question"],
            answer=str(record["answer"]).strip().lower(),
            category=record["category"],
            image_id=record["question_id"],
        )


def read_gqa(files: Sequence[Path], images: Path | None, split: str | None, prompt: str) -> Iterator[Row]:
    """GQA rows from `<split>_questions.json` (question id -> question); `question_type` is the structural type."""
    for path in files:
        document = load_json(path)
        if not isinstance(document, dict):
            raise ValueError(f"{path} is not a GQA questions file (a JSON object of question id -> question).")
        label = split or path.stem.removesuffix("_questions")
        for question_id, question in document.items():
            require(question, ("imageId", "question", "answer"), path, "GQA questions")
            yield make_row(
                "exact_match",
                label,
                fill(prompt, question=question["question"]),
                image_value(f"{question['imageId']}.jpg", images, path),
                question_id,
                question=question["question"],
                answer=question["answer"],
                question_type=(question.get("types") or {}).get("structural", ""),
                image_id=question["imageId"],
            )


def read_textvqa(files: Sequence[Path], images: Path | None, split: str | None, prompt: str) -> Iterator[Row]:
    """TextVQA rows from `TextVQA_0.5.1_<split>.json`; the 10 answers are normalised as the prediction is (the
    TextVQA evaluator, unlike VQAv2's, processes the references fully)."""
    for path in files:
        document = load_json(path)
        if not isinstance(document, dict) or "data" not in document:
            raise ValueError(f"{path} is not a TextVQA annotation file (a JSON object with `data`).")
        for entry in document["data"]:
            require(entry, ("question_id", "image_id", "question", "answers"), path, "TextVQA")
            references = [normalize_vqa_answer(a) for a in entry["answers"]]
            yield make_row(
                "vqa",
                split or document.get("dataset_type") or "val",
                fill(prompt, question=entry["question"]),
                image_value(f"{entry['image_id']}.jpg", images, path),
                entry["question_id"],
                question=entry["question"],
                answer=Counter(references).most_common(1)[0][0],
                references=references,
                image_id=entry["image_id"],
            )


__all__ = [
    "CAPTION_PROMPT",
    "POPE_SETTINGS",
    "REC_PROMPT",
    "REG_PROMPT",
    "SHORT_ANSWER_PROMPT",
    "fill",
    "image_size",
    "image_value",
    "iter_records",
    "load_json",
    "make_row",
    "read_gqa",
    "read_karpathy",
    "read_mme",
    "read_pope",
    "read_rec",
    "read_reg",
    "read_textvqa",
    "read_vqa",
    "require",
    "split_in_name",
]
