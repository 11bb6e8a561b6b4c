"""Where a recipe's dataset source is read from: local JSON / JSONL, local parquet, an image folder, or the Hub.

A source is a mapping with exactly one *kind* key (a key of `SOURCE_KINDS`) naming where its records are, plus the
keys of that kind and the keys every source shares (`SHARED_KEYS`, interpreted by `comm_vlm.training.data`):

* `path`: a JSON file (a list of records) or a JSONL file, read with Python's `json` (records may differ in keys and
  value types, as LLaVA's files do);
* `parquet`: a parquet file, a glob, or a list of them; `split` (default `train`; slices such as `train[:1000]`);
* `imagefolder`: a folder of images with a `metadata.jsonl` / `metadata.csv` (datasets' ImageFolder: one row per
  image, `file_name` plus the format's columns; the `image` column holds the images); `split` (default `train`);
* `hub`: a `datasets` repository id, read with `load_dataset(hub, name, split=split, ...)`; `name` (the config),
  `split` (required), `revision`, `data_dir`, `data_files`, `cache_dir`.

`read_records` returns a list of dicts for JSON and a `datasets.Dataset` for the others, with `columns:` renames
applied and image columns (`IMAGE_COLUMNS`: paths, `datasets.Image`, `{bytes, path}` structs, or lists of them) left
undecoded; another type of image column is an error that says how to cast it. A Hub source works offline
(`HF_DATASETS_OFFLINE=1` / `HF_HUB_OFFLINE=1`) from the datasets cache an earlier online `load_dataset` of the same id
and config prepared (`HF_DATASETS_CACHE`, or `cache_dir`).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, Image, List, Value, load_dataset


# Keys every source may carry: `format` (llava / shikra / messages), `image_folder` (the root of relative image paths),
# `columns` (renames: {column in the source: column the format reads}), `task` (Shikra expression records: rec / reg)
# and `weight` (a mixture entry's sampling weight).
SHARED_KEYS = frozenset({"format", "image_folder", "columns", "task", "weight"})
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
IMAGE_COLUMNS = ("image", "images", "img_path")  # columns that hold images or their paths


@dataclass(frozen=True)
class SourceKind:
    """One way of reading a dataset source.

    Args:
        read (`Callable[[dict], Dataset | list[dict]]`): reads the records of a source mapping.
        keys (`frozenset[str]`): the keys of this kind besides its own name and `SHARED_KEYS`.
        description (`str`): what the kind key's value is (for error messages).
    """

    read: Callable[[dict], Dataset | list[dict]]
    keys: frozenset[str]
    description: str


def _read_json(spec: dict) -> list[dict]:
    path = Path(spec["path"])
    if path.suffix == ".parquet":
        raise ValueError(f"`path: {path}` reads JSON / JSONL; for a parquet file write `parquet: {path}`.")
    if path.is_dir():
        raise ValueError(
            f"`path: {path}` is a folder; `path` reads one JSON / JSONL file (for images with a metadata file, write "
            f"`imagefolder: {path}`)."
        )
    if not path.exists():
        raise FileNotFoundError(
            f"Dataset file {path} does not exist; fix `path:` (relative paths start at {Path.cwd()})."
        )
    text = path.read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _local_files(value: str | list[str], key: str) -> list[str]:
    files = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    for pattern in files:
        if not glob.glob(os.fspath(pattern)):
            raise FileNotFoundError(f"`{key}: {pattern}` matches no file; fix the path or glob.")
    return [os.fspath(f) for f in files]


def _read_parquet(spec: dict) -> Dataset:
    files = _local_files(spec["parquet"], "parquet")
    return load_dataset("parquet", data_files={"train": files}, split=spec.get("split", "train"))


def _read_imagefolder(spec: dict) -> Dataset:
    folder = Path(spec["imagefolder"])
    if not folder.is_dir():
        raise FileNotFoundError(f"`imagefolder: {folder}` is not a folder; fix the path.")
    if not any(next(folder.rglob(name), None) for name in METADATA_FILES):
        raise ValueError(
            f"`imagefolder: {folder}` has no {' or '.join(METADATA_FILES)}: add one next to the images, one row per "
            "sample with `file_name` (the image, relative to the metadata file) and the columns of the format."
        )
    return load_dataset("imagefolder", data_dir=str(folder), split=spec.get("split", "train"))


def _read_hub(spec: dict) -> Dataset:
    repo = spec["hub"]
    if not spec.get("split"):
        raise ValueError(
            f"`hub: {repo}` needs `split:` (e.g. `split: train`), as `load_dataset({repo!r}, name, split=...)` does; "
            "a slice such as `train[:1000]` works too."
        )
    kwargs = {k: spec[k] for k in ("revision", "data_dir", "data_files", "cache_dir") if spec.get(k) is not None}
    try:
        return load_dataset(repo, spec.get("name"), split=spec["split"], **kwargs)
    except ConnectionError as err:
        from datasets import config

        raise ConnectionError(
            f"Could not read `hub: {repo}` (config {spec.get('name')!r}): the Hub is unreachable or offline and the "
            f"datasets cache ({spec.get('cache_dir') or config.HF_DATASETS_CACHE}) holds no prepared copy. Load it "
            "once online with the same id and `name` (or copy that machine's datasets cache and point "
            "`HF_DATASETS_CACHE` or `cache_dir:` at it), or download its files and read them with `parquet:` or "
            "`path:`."
        ) from err


# A source mapping has exactly one of these keys; its value says where the records are.
SOURCE_KINDS: dict[str, SourceKind] = {
    "path": SourceKind(_read_json, frozenset(), "a local JSON (list of records) or JSONL file"),
    "parquet": SourceKind(_read_parquet, frozenset({"split"}), "local parquet file(s): a path, a glob or a list"),
    "imagefolder": SourceKind(
        _read_imagefolder, frozenset({"split"}), "a folder of images with a metadata.jsonl / metadata.csv"
    ),
    "hub": SourceKind(
        _read_hub,
        frozenset({"name", "split", "revision", "data_dir", "data_files", "cache_dir"}),
        "a `datasets` Hub id, read with load_dataset(hub, name, split=split)",
    ),
}


def source_kind(spec: dict[str, Any]) -> str:
    """The kind of a source mapping (a key of `SOURCE_KINDS`), after checking that every key belongs to it.

    Args:
        spec (`dict`): one dataset source of a recipe (a single source, or one entry of a `mixture`).

    Raises:
        ValueError: no or several kind keys, or keys that belong to no kind or to another kind.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"A dataset source is a mapping such as `{{path: data.json, format: llava}}`, got {spec!r}.")
    kinds = [key for key in SOURCE_KINDS if key in spec]
    if len(kinds) != 1:
        choices = "; ".join(f"`{k}`: {kind.description}" for k, kind in SOURCE_KINDS.items())
        raise ValueError(f"A dataset source needs exactly one of these keys, got {sorted(spec)}. {choices}.")
    kind = kinds[0]
    allowed = {kind} | SOURCE_KINDS[kind].keys | SHARED_KEYS
    unknown = sorted(set(spec) - allowed)
    if unknown:
        elsewhere = {k: [name for name, other in SOURCE_KINDS.items() if k in other.keys] for k in unknown}
        hints = "; ".join(
            f"`{k}` belongs to {', '.join(f'`{n}:`' for n in names)} sources"
            for k, names in elsewhere.items()
            if names
        )
        raise ValueError(
            f"Unknown key(s) {unknown} in a `{kind}:` dataset source; it takes {sorted(allowed)}."
            + (f" ({hints}.)" if hints else " Remove or rename them.")
        )
    return kind


def undecoded_image_feature(feature: Any, origin: str = "", column: str = "") -> Image | List | None:
    """`feature` (an image column's) with its `datasets.Image` parts set not to decode, or None for paths.

    Args:
        feature: the column's `datasets` feature: strings, `Image`, a `{bytes, path}` struct, or lists of them.
        origin (`str`): the source, for the error message.
        column (`str`): the column's name, for the error message.

    Raises:
        ValueError: the column holds something else.
    """
    if isinstance(feature, List):
        inner = undecoded_image_feature(feature.feature, origin, column)
        return None if inner is None else List(inner)
    if isinstance(feature, Image) or (isinstance(feature, dict) and feature and set(feature) <= {"bytes", "path"}):
        return Image(decode=False)
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string", "null"):
        return None
    raise ValueError(
        f"{origin}: the image column `{column}` holds {feature}; it must hold paths (strings), images "
        "(`datasets.Image`), or lists of one of them. Cast it (`dataset.cast_column(name, datasets.Image())`) or map "
        "another column onto it with `columns:`."
    )


def read_records(spec: dict[str, Any]) -> tuple[Dataset | list[dict], bool]:
    """The raw records of a source, with `columns:` renames applied, and whether they store images.

    JSON / JSONL gives a list of dicts; parquet, image folders and Hub ids a `datasets.Dataset` whose image columns
    (`IMAGE_COLUMNS`) are left undecoded (`{"bytes", "path"}`), so that a corrupt image is counted, not raised.

    Args:
        spec (`dict`): one dataset source (see the module docstring for its keys).
    """
    kind = source_kind(spec)
    records, renames, origin = SOURCE_KINDS[kind].read(spec), dict(spec.get("columns") or {}), describe_source(spec)
    if not isinstance(records, Dataset):
        if not isinstance(records, list):
            raise ValueError(f"{origin}: expected a JSON list of records (or JSONL), got a {type(records).__name__}.")
        return [{renames.get(k, k): v for k, v in r.items()} if isinstance(r, dict) else r for r in records], False
    missing = sorted(set(renames) - set(records.column_names))
    if missing:
        raise ValueError(f"{origin}: `columns:` renames {missing}, absent from its columns {records.column_names}.")
    records, stored = records.rename_columns(renames), False
    for column in [c for c in IMAGE_COLUMNS if c in records.column_names]:
        if (undecoded := undecoded_image_feature(records.features[column], origin, column)) is not None:
            records, stored = records.cast_column(column, undecoded), True
    return records, stored


def describe_source(spec: dict[str, Any]) -> str:
    """`kind:value` of a source, for messages (e.g. `hub:liuhaotian/LLaVA-Instruct-150K[train]`)."""
    kind = source_kind(spec)
    split = f"[{spec['split']}]" if spec.get("split") else ""
    return f"{kind}:{spec[kind]}{split}"


__all__ = [
    "IMAGE_COLUMNS",
    "METADATA_FILES",
    "SHARED_KEYS",
    "SOURCE_KINDS",
    "SourceKind",
    "describe_source",
    "read_records",
    "source_kind",
    "undecoded_image_feature",
]
