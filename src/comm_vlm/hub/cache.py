"""The Hub cache layout: a local checkpoint laid out as a download, so `from_pretrained(repo_id)` finds it offline."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from transformers.utils import logging


logger = logging.get_logger(__name__)


def add_to_hub_cache(
    checkpoint_dir: str | os.PathLike,
    repo_id: str,
    cache_dir: str | os.PathLike | None = None,
    revision: str = "main",
    commit_hash: str | None = None,
) -> Path:
    """Lays a local checkpoint out in the Hub cache as if `repo_id` had been downloaded (for air-gapped machines).

    Writes `models--{org}--{name}/blobs/<sha256>`, `snapshots/<commit>/<file>` (relative symlinks to the blobs,
    copies where symlinks are unavailable) and `refs/<revision>`, so `from_pretrained(repo_id)` with
    `HF_HUB_OFFLINE=1` finds it.

    Args:
        checkpoint_dir (`str` or `os.PathLike`): a saved checkpoint (e.g. from `save_for_hub`).
        repo_id (`str`): the id to load it by, `"org/name"`.
        cache_dir (`str` or `os.PathLike`, *optional*): the hub cache (default: `HF_HUB_CACHE`).
        revision (`str`): the ref to point at the snapshot.
        commit_hash (`str`, *optional*): 40 hex digits; default: derived from the files' contents.

    Returns:
        `Path` of the snapshot directory.
    """
    from huggingface_hub import constants

    checkpoint_dir = Path(checkpoint_dir)
    if "/" not in repo_id:
        raise ValueError(f"repo_id {repo_id!r} must be 'org/name'.")
    files = sorted(p for p in checkpoint_dir.rglob("*") if p.is_file())
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    if commit_hash is None:
        listing = "".join(f"{p.relative_to(checkpoint_dir).as_posix()}:{d}\n" for p, d in digests.items())
        commit_hash = hashlib.sha1(listing.encode()).hexdigest()
    repo_dir = Path(cache_dir or constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit_hash
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for path, digest in digests.items():
        blob = repo_dir / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(path, blob)
        target = snapshot / path.relative_to(checkpoint_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        try:
            target.symlink_to(os.path.relpath(blob, target.parent))
        except OSError:
            shutil.copyfile(blob, target)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit_hash)
    return snapshot
