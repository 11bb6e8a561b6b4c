"""The published benchmarks of COMM (Jiang et al. 2023) and M3 (Cai et al. 2024), read from their own files.

    dataset = load_benchmark("pope", "coco_pope_random.json", images="coco/val2014")
    dataset = load_benchmark("refcoco", "lmms-lab/RefCOCO", split="testA")     # a dataset id: local cache only
    result = evaluate(model, processor, dataset)                                  # comm_vlm.evaluation.runners

`BENCHMARKS` maps a name to a [`Benchmark`]: the task that scores it (`TASK_SPECS`), the reader of its file schema
(`comm_vlm.evaluation.benchmark_readers`), its prompt and its splits. `load_benchmark` resolves `data` (files, a
folder, or a Hugging Face dataset id read from the local Hub cache only: nothing is downloaded), reads the split and
returns a `datasets.Dataset` of rows in the format `evaluate` consumes. Images stay undecoded: paths for the JSON
benchmarks (joined to `images`), `{"bytes", "path"}` for the parquet ones.

Prompts (LLaVA-1.5's evaluation files for the short-answer benchmarks, Shikra's phrasing for grounding, the
project's `comm_vlm.prompts`, which training and the demo share): POPE, MME, VQAv2, OK-VQA, GQA and TextVQA ask
"<question>\\nAnswer the question using a single word or phrase." (MME's own "Please answer yes or no." is replaced,
as LLaVA-1.5's MME file does); REC "Please provide the bounding box coordinate of the region this sentence describes:
<expression>."; REG "Please provide a short description for this region: <box>."; captions "Describe the image
briefly.". `prompt=` replaces a benchmark's template (fields `{question}`, `{expression}`, `{box}`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers.utils import logging

from . import benchmark_readers as readers
from .tasks import TASK_SPECS


if TYPE_CHECKING:
    from datasets import Dataset, Features

logger = logging.get_logger(__name__)


def row_features() -> Features:
    """The `datasets` features of benchmark rows (images undecoded: paths or `{"bytes", "path"}`)."""
    from datasets import Features, Image, List, Value

    part = {"type": Value("string"), "text": Value("string")}
    strings = ("task", "split", "question_id", "question", "answer", "question_type", "pope_setting", "category")
    return Features(
        {
            "messages": List({"role": Value("string"), "content": List(part)}),
            "images": List(Image(decode=False)),
            **{name: Value("string") for name in strings},
            "references": List(Value("string")),
            "box": List(Value("float64")),
            "image_id": Value("string"),
        }
    )


ALL_SPLITS = "all"  # POPE: every setting
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DATA_SUFFIXES = (".parquet", ".json", ".jsonl")


@dataclass(frozen=True)
class Benchmark:
    """One published benchmark: how its files are read and which task scores it.

    Args:
        name (`str`): the registry key (`comm-vlm evaluate --task NAME`).
        title (`str`): display name (model card, tables).
        task (`str`): the `TASK_SPECS` task that scores it.
        reader (`Callable`): `reader(files, images, split, prompt)` yields rows (`benchmark_readers`).
        prompt (`str`): the question template (`{question}`, `{expression}` or `{box}`).
        data (`str`): what `data` takes, for help and messages.
        images (`str`, *optional*): what `images` is; `None` when the files hold the images.
        splits (`tuple[str, ...]`): the selectable splits, the default first; empty when each file is one split
            (the split is then a label, read from the file).
        hub_split (`str`, *optional*): the split of the parquet files to read from a folder or dataset id when
            `split` selects something else (POPE's setting, MME).
        dataset_id (`str`, *optional*): the dataset named in the model card's `model-index`.
        papers (`str`): which papers report it.
    """

    name: str
    title: str
    task: str
    reader: Callable[[Sequence[Path], Path | None, Any, str], Iterable[dict]]
    prompt: str
    data: str
    images: str | None
    splits: tuple[str, ...] = ()
    hub_split: str | None = None
    dataset_id: str | None = None
    papers: str = "COMM"

    @property
    def default_split(self) -> str | None:
        return self.splits[0] if self.splits else None


_REFCOCO_DATA = "the lmms-lab parquet (files, folder or dataset id) or Shikra's REC jsonl (`REC_<name>_<split>.jsonl`)"
_REFCOCO_IMAGES = "the COCO train2014 folder, for Shikra's jsonl (the parquet holds its images)"
_COCO_VAL = "the COCO val2014 folder"


def _refcoco(name: str, title: str, dataset_id: str, splits: tuple[str, ...]) -> Benchmark:
    return Benchmark(
        name=name,
        title=title,
        task="rec",
        reader=readers.read_rec,
        prompt=readers.REC_PROMPT,
        data=_REFCOCO_DATA,
        images=_REFCOCO_IMAGES,
        splits=splits,
        dataset_id=dataset_id,
    )


BENCHMARKS: dict[str, Benchmark] = {
    "pope": Benchmark(
        name="pope",
        title="POPE",
        task="pope",
        reader=readers.read_pope,
        prompt=readers.SHORT_ANSWER_PROMPT,
        data="the official coco_pope_{random,popular,adversarial}.json, or the lmms-lab/POPE parquet",
        images=f"{_COCO_VAL}, for the official files",
        splits=(ALL_SPLITS, *readers.POPE_SETTINGS),
        hub_split="test",
        dataset_id="lmms-lab/POPE",
        papers="COMM, M3",
    ),
    "refcoco": _refcoco("refcoco", "RefCOCO", "lmms-lab/RefCOCO", ("val", "testA", "testB", "test")),
    "refcoco+": _refcoco("refcoco+", "RefCOCO+", "lmms-lab/RefCOCOPlus", ("val", "testA", "testB")),
    "refcocog": _refcoco("refcocog", "RefCOCOg", "lmms-lab/RefCOCOg", ("val", "test")),
    "refcocog_reg": Benchmark(
        name="refcocog_reg",
        title="RefCOCOg (REG)",
        task="reg",
        reader=readers.read_reg,
        prompt=readers.REG_PROMPT,
        data=_REFCOCO_DATA,
        images=_REFCOCO_IMAGES,
        splits=("val", "test"),
        dataset_id="lmms-lab/RefCOCOg",
    ),
    "vqav2": Benchmark(
        name="vqav2",
        title="VQAv2",
        task="vqa",
        reader=readers.read_vqa,
        prompt=readers.SHORT_ANSWER_PROMPT,
        data="v2_OpenEnded_mscoco_val2014_questions.json and v2_mscoco_val2014_annotations.json",
        images=_COCO_VAL,
        dataset_id="lmms-lab/VQAv2",
    ),
    "okvqa": Benchmark(
        name="okvqa",
        title="OK-VQA",
        task="vqa",
        reader=readers.read_vqa,
        prompt=readers.SHORT_ANSWER_PROMPT,
        data="OpenEnded_mscoco_val2014_questions.json and mscoco_val2014_annotations.json",
        images=_COCO_VAL,
        dataset_id="lmms-lab/OK-VQA",
    ),
    "coco_caption": Benchmark(
        name="coco_caption",
        title="COCO Captions (Karpathy)",
        task="caption",
        reader=readers.read_karpathy,
        prompt=readers.CAPTION_PROMPT,
        data="Karpathy's dataset_coco.json",
        images="the COCO folder holding train2014/ and val2014/",
        splits=("test", "val", "train", "restval"),
        dataset_id="lmms-lab/COCO-Caption",
    ),
    "flickr30k": Benchmark(
        name="flickr30k",
        title="Flickr30k (Karpathy)",
        task="caption",
        reader=readers.read_karpathy,
        prompt=readers.CAPTION_PROMPT,
        data="Karpathy's dataset_flickr30k.json",
        images="the Flickr30k image folder",
        splits=("test", "val", "train"),
        dataset_id="lmms-lab/flickr30k",
    ),
    "mme": Benchmark(
        name="mme",
        title="MME",
        task="mme",
        reader=readers.read_mme,
        prompt=readers.SHORT_ANSWER_PROMPT,
        data="the lmms-lab/MME parquet (files, folder or dataset id)",
        images=None,
        hub_split="test",
        dataset_id="lmms-lab/MME",
        papers="COMM, M3",
    ),
    "gqa": Benchmark(
        name="gqa",
        title="GQA",
        task="exact_match",
        reader=readers.read_gqa,
        prompt=readers.SHORT_ANSWER_PROMPT,
        data="testdev_balanced_questions.json",
        images="the GQA images folder",
        dataset_id="lmms-lab/GQA",
        papers="M3",
    ),
    "textvqa": Benchmark(
        name="textvqa",
        title="TextVQA",
        task="vqa",
        reader=readers.read_textvqa,
        prompt=readers.SHORT_ANSWER_PROMPT,
        data="TextVQA_0.5.1_val.json",
        images="the TextVQA train_images folder",
        dataset_id="lmms-lab/textvqa",
        papers="M3",
    ),
}


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark `name` (`ValueError` listing the names otherwise)."""
    if name not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}.")
    return BENCHMARKS[name]


def cached_dataset_files(repo_id: str) -> Path:
    """The local snapshot folder of a Hugging Face dataset repo, from the Hub cache only (nothing is downloaded).

    Args:
        repo_id (`str`): e.g. `"lmms-lab/POPE"`.

    Raises:
        FileNotFoundError: no snapshot of it in the cache.
    """
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except (OSError, ValueError):  # not cached under `main`: any other snapshot of it (e.g. fetched by commit)
        snapshots = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}" / "snapshots"
        found = sorted(snapshots.glob("*"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
        if found:
            return found[-1]
    raise FileNotFoundError(
        f"--data {repo_id}: no such file or folder, and the dataset {repo_id!r} is not in the local Hugging Face "
        f"cache ({constants.HF_HUB_CACHE}); nothing is downloaded here. Fetch it first (`hf download {repo_id} "
        "--repo-type dataset`) or pass its files."
    )


def _folder_files(folder: Path, wanted: str | None, splits: Sequence[str]) -> list[Path]:
    """The data files of a folder (parquet preferred), restricted to split `wanted` when their names state one."""
    files = sorted(p for p in folder.rglob("*.parquet") if p.is_file())
    if not files:
        files = sorted(p for p in folder.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder} holds no .parquet, .json or .jsonl file; point --data at the data files.")
    names = {p: readers.split_in_name(p, splits) for p in files}
    if wanted is not None and any(names.values()):
        chosen = [p for p in files if names[p] == wanted]
        if not chosen:
            found = sorted({s for s in names.values() if s})
            raise ValueError(f"{folder} has no files of split {wanted!r} (its files hold {found}); pick one of them.")
        return chosen
    return files


def resolve_data(
    benchmark: Benchmark, data: str | os.PathLike | Sequence[str | os.PathLike], split: str | None
) -> tuple[list[Path], str | None]:
    """The data files of `data` and the split to read.

    A folder or a cached dataset id gives its files of the split, by file name (`data/val-00000-of-00001.parquet`;
    `hub_split` for POPE and MME, whose `split` selects rows). Given files whose names state a split
    (`REC_refcoco_unc_testA.jsonl`, `coco_pope_random.json`) choose it when `split` is not given, and are skipped
    when they state another one; otherwise the benchmark's default split applies.

    Raises:
        ValueError: an unknown split, or no given file of the split asked for.
        FileNotFoundError: a path that is neither a file, a folder nor a cached dataset id.
    """
    if split is not None and benchmark.splits and split not in benchmark.splits:
        raise ValueError(f"{benchmark.name} has the splits {list(benchmark.splits)}; got --split {split!r}.")
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not items:
        raise ValueError(f"Give --data: {benchmark.data}.")
    stated = {Path(i): readers.split_in_name(Path(i), benchmark.splits) for i in items if Path(i).is_file()}
    if split is None and benchmark.splits:
        named = set(stated.values())
        split = named.pop() if len(named) == 1 and None not in named and len(stated) == len(items) else None
        split = split or benchmark.default_split
    if split is None and not benchmark.splits:
        split = benchmark.hub_split  # MME: its one split; others: the reader reads the label from the file
    vocabulary = (benchmark.hub_split,) if benchmark.hub_split else benchmark.splits
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_file():
            if path.suffix not in _DATA_SUFFIXES:
                raise ValueError(f"{path} is not a .parquet, .json or .jsonl file; give the benchmark's data files.")
            if stated[path] in (None, split) or split == ALL_SPLITS:
                files.append(path)
            else:
                logger.warning(f"Skipping {path}: its name states split {stated[path]!r}, not {split!r}.")
            continue
        if not path.is_dir():
            if not _REPO_ID.match(str(item)):
                raise FileNotFoundError(f"--data {item}: no such file or folder.")
            path = cached_dataset_files(str(item))
        files.extend(_folder_files(path, benchmark.hub_split or split, vocabulary))
    if not files:
        raise ValueError(
            f"None of --data {[str(i) for i in items]} is of split {split!r} (their names state "
            f"{sorted({s for s in stated.values() if s})}); pass the files of that split, or that --split."
        )
    return files, split


def load_benchmark(
    name: str,
    data: str | os.PathLike | Sequence[str | os.PathLike],
    images: str | os.PathLike | None = None,
    split: str | None = None,
    limit: int | None = None,
    prompt: str | None = None,
) -> Dataset:
    """Reads a published benchmark's own files into evaluation rows (`evaluate` / `comm-vlm evaluate`).

    Args:
        name (`str`): a key of `BENCHMARKS` (pope, refcoco, refcoco+, refcocog, refcocog_reg, vqav2, okvqa,
            coco_caption, flickr30k, mme, gqa, textvqa).
        data (`str`, `os.PathLike` or a list of them): the file(s), a folder of them, or a dataset id already in the
            local Hugging Face cache (never downloaded).
        images (`str` or `os.PathLike`, *optional*): the folder of the images the files name (JSON benchmarks).
        split (`str`, *optional*): one of the benchmark's splits (default: the one the files state, else the
            first); a label for benchmarks whose file is the split.
        limit (`int`, *optional*): keep the first `limit` rows (after the split is selected).
        prompt (`str`, *optional*): replaces the benchmark's prompt template.

    Returns:
        `datasets.Dataset`: one row per question (`messages`, `images`, `task`, `split` and the scoring columns).

    Raises:
        ValueError: unknown benchmark or split, a file not of the benchmark's schema, or no rows.
        FileNotFoundError: missing files, image folder or cached dataset.
    """
    benchmark = get_benchmark(name)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows, got {limit}.")
    folder = Path(images) if images is not None else None
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"--images {folder} is not a folder; give {benchmark.images or 'the image folder'}.")
    files, split = resolve_data(benchmark, data, split)
    rows = list(islice(benchmark.reader(files, folder, split, prompt or benchmark.prompt), limit))
    if not rows:
        where = f" of split {split!r}" if split else ""
        raise ValueError(f"{name}: no rows{where} in {[str(f) for f in files]}; check --data and --split.")
    logger.info(f"{name}: {len(rows)} rows from {len(files)} file(s), split {rows[0]['split']!r}")
    from datasets import Dataset

    return Dataset.from_list(rows, features=row_features())


# Metric keys of the task tables -> model-index metric types.
_METRIC_TYPES = {"perception": "mme_perception", "cognition": "mme_cognition", "yes_ratio": "yes_ratio"}


def model_index_entries(
    name: str, split: str, metrics: dict[str, Any], scale: int | None = None, tokens: float | None = None
) -> list[dict[str, Any]]:
    """`ModelCardInfo.eval_results` entries (model-index) of one benchmark run: the task table's metrics, x100 as the
    papers print them (MME: its 0-2000 / 0-800 scores; CIDEr: x100).

    Args:
        name (`str`): the benchmark. split (`str`): its split.
        metrics (`dict`): the run's metrics (`EvalResult.tasks[task].metrics`).
        scale (`int`, *optional*): the Matryoshka scale it ran at. tokens (`float`, *optional*): visual tokens per
            sample at that scale.
    """
    benchmark = get_benchmark(name)
    entries = []
    for key, label in TASK_SPECS[benchmark.task].table:
        entry = {
            "task_type": "image-text-to-text",
            "task_name": benchmark.task,
            "dataset_type": benchmark.dataset_id or name,
            "dataset_name": benchmark.title,
            "dataset_split": split,
            "metric_type": _METRIC_TYPES.get(key, key),
            "metric_name": label if scale is None else f"{label} ({tokens or scale:g} visual tokens)",
            "metric_value": round(100 * float(metrics[key]), 2),
        }
        if scale is not None:
            entry["metric_config"] = f"matryoshka_scale={scale}"
        entries.append(entry)
    return entries


__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "cached_dataset_files",
    "get_benchmark",
    "load_benchmark",
    "model_index_entries",
    "resolve_data",
    "row_features",
]
