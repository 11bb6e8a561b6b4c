"""Names the damaged weight file of a local checkpoint, for `from_pretrained` errors.

safetensors reports a damaged file with a bare header message ("Error while deserializing header: header too small")
that names neither the file nor what is wrong with it. `damaged_checkpoint_files` reads the headers of a checkpoint
directory's safetensors files (and its shard index) without loading a tensor, and says which file is damaged and how:
truncated, empty, not a safetensors file, or missing from a sharded checkpoint.

This file is self-contained (the standard library only) so that it can ship as remote code.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path


SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# A safetensors file starts with the byte length of its JSON header, an unsigned little-endian 64-bit integer.
_LENGTH_FIELD = 8


def safetensors_damage(path: str | os.PathLike) -> str | None:
    """Why `path` is not a complete safetensors file, or `None` when its header and size agree.

    Reads the 8-byte header length, the JSON header and the file size; the tensors are not read.

    Args:
        path (`str` or `os.PathLike`): a `.safetensors` file.

    Returns:
        `str` or `None`: the cause in words (e.g. "it is truncated: its tensors need 4,096 bytes of data but it holds
        1,024"), or `None`.
    """
    size = os.path.getsize(path)
    if size < _LENGTH_FIELD:
        what = "empty" if size == 0 else f"{size} bytes long"
        return f"it is {what}, shorter than the {_LENGTH_FIELD}-byte length field every safetensors file starts with"
    with open(path, "rb") as file:
        (header_length,) = struct.unpack("<Q", file.read(_LENGTH_FIELD))
        if header_length > size - _LENGTH_FIELD:
            return (
                f"its first bytes announce a {header_length:,}-byte header but the file holds only "
                f"{size - _LENGTH_FIELD:,} bytes after them: it is truncated, or it is not a safetensors file"
            )
        header = file.read(header_length)
    try:
        metadata = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"its header is not valid JSON ({error}): the file is corrupt or not a safetensors file"
    if not isinstance(metadata, dict):
        return "its header is not a JSON object: the file is corrupt or not a safetensors file"
    data_end = 0
    for name, entry in metadata.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"its header entry {name!r} has no valid `data_offsets`: the file is corrupt"
        data_end = max(data_end, offsets[1])
    data_size = size - _LENGTH_FIELD - header_length
    if data_size < data_end:
        return (
            f"it is truncated: its tensors need {data_end:,} bytes of data but it holds {data_size:,} (an interrupted "
            "download or copy)"
        )
    return None


def damaged_checkpoint_files(directory: str | os.PathLike) -> list[str]:
    """`"<file>: <cause>"` for every damaged or missing safetensors file of a local checkpoint directory.

    A sharded checkpoint (`model.safetensors.index.json`) is checked shard by shard, and a shard the index lists but
    the directory lacks is reported; otherwise `model.safetensors` is checked.

    Args:
        directory (`str` or `os.PathLike`): the checkpoint directory (with its `subfolder` joined).

    Returns:
        `list[str]`: one entry per problem; empty when every file looks complete.
    """
    directory = Path(directory)
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    problems, files = [], []
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            return [f"{index}: not a valid shard index ({type(error).__name__}: {error})"]
        for shard in shards:
            path = directory / shard
            if path.is_file():
                files.append(path)
            else:
                problems.append(f"{path}: missing, but {index.name} lists it (the checkpoint is incomplete)")
    elif (directory / SAFE_WEIGHTS_NAME).is_file():
        files.append(directory / SAFE_WEIGHTS_NAME)
    for path in files:
        cause = safetensors_damage(path)
        if cause is not None:
            problems.append(f"{path}: {cause}")
    return problems


__all__ = ["damaged_checkpoint_files", "safetensors_damage"]
