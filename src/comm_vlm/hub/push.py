"""Saving and pushing a checkpoint as it goes to the Hub: weights, processor, remote code and model card.

save_for_hub(model, "out/", processor, card=ModelCardInfo(...))   # the files, in a local folder
push_to_hub(model, "me/comm-7b", processor, card=...)             # the same files, in one commit

A model loaded from a directory `comm-vlm train` wrote carries that run's record (`training_provenance.json`) into the
card and the repo.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi
from transformers.utils import logging

from .cards import (
    PROVENANCE_FILE,
    ModelCardInfo,
    card_info_from_provenance,
    load_instructions,
    read_provenance,
    render_model_card,
)
from .remote_code import check_remote_code, remote_code_export


logger = logging.get_logger(__name__)


def save_for_hub(
    model: Any,
    save_directory: str | os.PathLike,
    processor: Any = None,
    card: ModelCardInfo | None = None,
    max_shard_size: int | str = "5GB",
    provenance: dict[str, Any] | str | os.PathLike | bool = True,
) -> list[str]:
    """Writes everything a Hub repo needs: safetensors (sharded above `max_shard_size`), config, generation config,
    processor, remote code, a model card (`README.md`) and, for a trained checkpoint, its training record.

    Args:
        model (`PreTrainedModel`): a COMM-family model.
        save_directory (`str` or `os.PathLike`): created if missing; existing files of the same names are replaced.
        processor (`ProcessorMixin`, *optional*): saved next to the model (needed by `AutoProcessor` / `pipeline`).
        card (`ModelCardInfo`, *optional*): the card's content beyond the config.
        max_shard_size (`int` or `str`): largest safetensors shard, e.g. `"5GB"`.
        provenance (`dict`, `str`, `os.PathLike` or `bool`): the training record (`training_provenance.json`) that
            the card describes and the repo ships: `True` reads it from the directory the model was loaded from
            (`model.name_or_path`) when that directory has one; a directory reads it from there; a `dict` is the
            record; `False` leaves it out. Fields set in `card` win over the record (`card_info_from_provenance`).

    Returns:
        `list[str]`: the written files, relative to `save_directory`, sorted.
    """
    save_directory = Path(save_directory)
    record = _training_record(model, provenance)
    card = dataclasses.replace(card or ModelCardInfo(), remote_code=True)
    with remote_code_export(model, processor):
        model.save_pretrained(save_directory, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(save_directory)
    check_remote_code(save_directory)
    if record is not None:
        card = card_info_from_provenance(record, card)
        load = load_instructions(card.repo_id or str(save_directory), remote_code=True)
        record = {**record, "load": {"remote_code": True, **load}}
        (save_directory / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    render_model_card(model.config, card).save(save_directory / "README.md")
    return sorted(p.relative_to(save_directory).as_posix() for p in save_directory.rglob("*") if p.is_file())


def _training_record(model: Any, provenance: dict[str, Any] | str | os.PathLike | bool) -> dict[str, Any] | None:
    if provenance is False or provenance is None:
        return None
    if isinstance(provenance, dict):
        return provenance
    if provenance is True:
        source = getattr(model, "name_or_path", None) or ""
        return read_provenance(source) if source and os.path.isdir(source) else None
    record = read_provenance(provenance)
    if record is None:
        raise ValueError(
            f"No {PROVENANCE_FILE} in {provenance}: give the directory `comm-vlm train` wrote (a stage's `final/` or "
            "the run directory), or `provenance=False`."
        )
    return record


def save_for_hub_into(
    model: Any,
    output_dir: str | os.PathLike,
    processor: Any = None,
    card: ModelCardInfo | None = None,
    max_shard_size: int | str = "5GB",
    workdir: str | os.PathLike | None = None,
) -> list[str]:
    """`save_for_hub` into `output_dir` as a whole: written in a temporary directory (under `workdir`, default a
    sibling of `output_dir`), then renamed into place, replacing what was there. A failure leaves `output_dir` as it
    was. Returns the written files, as `save_for_hub`."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output_dir.name}.writing-", dir=workdir or output_dir.parent) as tmp:
        built = Path(tmp) / "out"
        files = save_for_hub(model, built, processor, card, max_shard_size=max_shard_size)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(built, output_dir)
    return files


def push_to_hub(
    model: Any,
    repo_id: str,
    processor: Any = None,
    card: ModelCardInfo | None = None,
    *,
    max_shard_size: int | str = "5GB",
    provenance: dict[str, Any] | str | os.PathLike | bool = True,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    api: HfApi | None = None,
) -> Any:
    """Pushes a model, its processor, remote code and model card to the Hub in one commit.

    The files are those of `save_for_hub`, written to a temporary directory and committed with
    `HfApi.create_commit` (one `CommitOperationAdd` per file).

    Args:
        model, processor, card, max_shard_size, provenance: as for `save_for_hub` (`card.repo_id` defaults to
            `repo_id`).
        repo_id (`str`): `"user/name"` or `"org/name"`; created if missing.
        private (`bool`, *optional*): visibility of a new repo.
        token (`str` or `bool`, *optional*): Hub token (default: the logged-in one).
        revision (`str`, *optional*): branch to commit to (created if missing).
        create_pr (`bool`): open a pull request instead of committing to the branch.
        commit_message (`str`, *optional*): defaults to "Upload <model class> with comm-vlm".
        api (`HfApi`, *optional*): the client to use (default `HfApi(token=token)`).

    Returns:
        `huggingface_hub.CommitInfo` of the commit.
    """
    api = api or HfApi(token=token)
    card = card or ModelCardInfo()
    if card.repo_id is None:
        card = ModelCardInfo(**{**vars(card), "repo_id": repo_id})
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = save_for_hub(model, tmp, processor, card, max_shard_size=max_shard_size, provenance=provenance)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(tmp, name)) for name in files]
        logger.info(f"Pushing {len(files)} files to {repo_id}: {files}")
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {type(model).__name__} with comm-vlm",
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
