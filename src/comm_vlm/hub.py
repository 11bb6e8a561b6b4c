"""Hugging Face Hub helpers: remote code, model cards, `push_to_hub`, the Hub cache layout and grounding boxes.

    save_for_hub(model, "out/", processor, card=ModelCardInfo(...))   # weights + processor + remote code + README.md
    push_to_hub(model, "me/comm-7b", processor, card=...)             # the same files, in one commit
    parse_pipeline_boxes(pipe(text=messages))                          # adds "boxes" parsed from the answers
    add_to_hub_cache("out/", "me/comm-7b")                             # lay a checkpoint out as a Hub download

Remote code is written only by `save_for_hub` / `push_to_hub` (and `comm-vlm convert`), never by a plain
`save_pretrained`: see the README's "Hub" section for why. The model-card templates live in `comm_vlm/model_cards/`.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from transformers.utils import logging

from .configuration_comm import CommConfig, patch_grid
from .processing_comm import BoxParseResult, parse_boxes


logger = logging.get_logger(__name__)

# Modules remote code may import: the standard library plus what a bare `pip install transformers torch pillow` has.
REMOTE_CODE_ALLOWED_IMPORTS = frozenset(sys.stdlib_module_names) | {"torch", "transformers", "numpy", "PIL"}

# Per model type: the method's display name, its paper and the card tags. Prose lives in model_cards/method_*.md.
METHODS: dict[str, dict[str, Any]] = {
    "comm": dict(
        name="COMM",
        paper="From CLIP to DINO: Visual Encoders Shout in Multi-modal Large Language Models",
        arxiv="2310.08825",
        tags=["comm", "llava", "clip", "dinov2", "multi-level-feature-merging"],
    ),
    "matryoshka_llava": dict(
        name="Matryoshka-LLaVA (M3)",
        paper="Matryoshka Multimodal Models",
        arxiv="2405.17430",
        tags=["matryoshka", "m3", "llava", "visual-token-compression"],
    ),
    "adaptive_combiner": dict(
        name="Adaptive combiner",
        paper="Joint Adaptive Representations for Image-Language Learning",
        arxiv="2305.19924",
        tags=["adaptive-combiner", "llava", "token-fusion"],
    ),
}


def _method(model_type: str) -> dict[str, Any]:
    if model_type not in METHODS:
        raise ValueError(
            f"No model-card entry for model_type {model_type!r}: add it to `comm_vlm.hub.METHODS` and write "
            f"`comm_vlm/model_cards/method_{model_type}.md`. Known: {sorted(METHODS)}."
        )
    return METHODS[model_type]


# ----------------------------------------------------------------------------------------------------------------
# Remote code
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def remote_code_export(model: Any, processor: Any = None) -> Iterator[None]:
    """Within the block, `save_pretrained` of `model` (and `processor`) also writes the remote code.

    Registers the objects' classes with `register_for_auto_class` (so transformers copies their module files and
    relative imports next to the weights and writes `auto_map`), and adds an `AutoModel` entry for the base model.
    On exit every class attribute and `auto_map` it touched is restored, so later plain saves stay package-native.

    Args:
        model (`PreTrainedModel`): a model of this package (any family).
        processor (`ProcessorMixin`, *optional*): its processor.
    """
    touched: list[tuple[Any, str, bool, Any]] = []  # (object, attribute, existed in its __dict__, old value)

    def remember(obj: Any, attribute: str) -> None:
        touched.append((obj, attribute, attribute in vars(obj), vars(obj).get(attribute)))

    config = model.config
    model_auto_class = "AutoModelForImageTextToText" if hasattr(model, "lm_head") else "AutoModel"
    pairs = [(type(config), "AutoConfig"), (type(model), model_auto_class)]
    if processor is not None:
        pairs.append((type(processor), "AutoProcessor"))
        for name in processor.get_attributes():
            remember(getattr(processor, name), "auto_map")
        remember(processor, "auto_map")
    remember(config, "auto_map")
    for cls, auto_class in pairs:
        remember(cls, "_auto_class")
        cls.register_for_auto_class(auto_class)
    base = getattr(model, "base_model", None)
    if base is not None and base is not model:
        base_name = f"{type(base).__module__.rsplit('.', 1)[-1]}.{type(base).__name__}"
        config.auto_map = {**(getattr(config, "auto_map", None) or {}), "AutoModel": base_name}
    try:
        yield
    finally:
        for obj, attribute, existed, old in reversed(touched):
            if existed:
                setattr(obj, attribute, old)
            elif attribute in vars(obj):
                delattr(obj, attribute)


def check_remote_code(directory: str | os.PathLike) -> list[str]:
    """Checks that the `.py` files of a saved checkpoint can run without this package.

    Every import must be the standard library, torch, transformers, numpy or PIL, or a relative import of a file that
    is present in `directory`.

    Args:
        directory (`str` or `os.PathLike`): a directory written by `save_for_hub`.

    Returns the names of the `.py` files checked; raises `ValueError` listing every offending `file: import`.
    """
    directory = Path(directory)
    files = sorted(p.name for p in directory.glob("*.py"))
    problems = []
    for name in files:
        tree = ast.parse((directory / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                if node.level != 1 or f"{node.module}.py" not in files:
                    problems.append(f"{name}: relative import of {'.' * node.level}{node.module or ''} (not shipped)")
                continue
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            modules += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for module in modules:
                if module.split(".")[0] not in REMOTE_CODE_ALLOWED_IMPORTS | {"__future__"}:
                    problems.append(f"{name}: import {module}")
    if problems:
        raise ValueError(
            "The remote code would not load without comm_vlm: " + "; ".join(problems) + ". Remote-code modules "
            "(configuration_*, modeling_*, processing_* and what they import relatively) may import only the "
            "standard library, torch, transformers, numpy and PIL, and each other as `from .module import ...`."
        )
    return files


# ----------------------------------------------------------------------------------------------------------------
# Model cards
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ModelCardInfo:
    """What the model card says beyond the config: provenance, training, results, use.

    Args:
        model_name (`str`, *optional*): display name and `model-index` name (default: the repo name or model type).
        repo_id (`str`, *optional*): the Hub repo, used in the usage snippet.
        base_model (`list[str]`): Hub ids of the checkpoints this one derives from (encoders, LLM, converted source).
        datasets (`list[str]`): Hub dataset ids trained on (metadata); describe local data in `training`.
        license (`str`): SPDX-style license id of the weights.
        language (`list[str]`): languages of the training text.
        training (`list[dict]`): one dict per stage: `stage`, `data` (str or list), `trainable` (list),
            `hyperparameters` (dict). `training_from_recipe` builds it from a YAML recipe.
        eval_results (`list[EvalResult | dict]`): results of *this* checkpoint, written as `model-index`. Dicts take
            `EvalResult`'s fields (`task_type`, `dataset_type`, `dataset_name`, `metric_type`, `metric_value`, ...).
        notes (`list[str]`): extra provenance lines (e.g. "converted from the LLaVA training-code layout").
        intended_use (`str`, *optional*): replaces the default intended-use paragraph.
        limitations (`list[str]`): added to the default limitations.
        tags (`list[str]`): extra Hub tags.
    """

    model_name: str | None = None
    repo_id: str | None = None
    base_model: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    license: str = "apache-2.0"
    language: list[str] = field(default_factory=lambda: ["en"])
    training: list[dict[str, Any]] = field(default_factory=list)
    eval_results: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    intended_use: str | None = None
    limitations: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCardInfo:
        """Builds the info from a JSON-style dict (the CLI's `--card FILE.json`).

        Raises:
            ValueError: unknown keys (listed, with the known ones).
        """
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown model-card fields {unknown}; known: {sorted(known)}.")
        return cls(**data)


def _eval_results(items: list[Any]) -> list[EvalResult]:
    results = []
    for item in items:
        if isinstance(item, EvalResult):
            results.append(item)
            continue
        try:
            results.append(EvalResult(**item))
        except TypeError as err:
            raise ValueError(
                f"Invalid evaluation result {item!r} ({err}): give task_type, dataset_type, dataset_name, "
                "metric_type and metric_value (plus optional EvalResult fields)."
            ) from err
    return results


def _training_stages(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validates `ModelCardInfo.training` and fills the optional keys."""
    known = {"stage", "data", "trainable", "hyperparameters"}
    normalized = []
    for stage in stages:
        if not isinstance(stage, dict) or "stage" not in stage or set(stage) - known:
            raise ValueError(
                f"Invalid training stage {stage!r}: give a dict with 'stage' and optionally 'data' (str or list), "
                "'trainable' (list) and 'hyperparameters' (dict)."
            )
        normalized.append({"data": "", "trainable": [], "hyperparameters": {}, **stage})
    return normalized


def training_from_recipe(recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """Turns a loaded training recipe (`comm_vlm.training.load_recipe`) into `ModelCardInfo.training` stages.

    Args:
        recipe (`dict`): with `stages`, each having `stage`, `dataset` and `args` (SFTConfig fields).
    """
    from .training.stages import STAGES

    stages = []
    for stage in recipe.get("stages", []):
        dataset = stage.get("dataset", {})
        if "mixture" in dataset:
            data = [
                f"{d.get('path')} ({d.get('format', 'auto')}, weight {d.get('weight', 1)})" for d in dataset["mixture"]
            ]
        elif "tiny" in dataset:
            data = [f"synthetic tiny data ({dataset['tiny']} samples)"]
        else:
            data = [f"{dataset.get('path')} ({dataset.get('format', 'auto')})"]
        spec = STAGES.get(stage["stage"])
        trainable = list(spec.trains) if spec is not None else []
        if stage.get("peft"):
            trainable.append(f"LoRA {stage['peft']}")
        stages.append(
            {"stage": stage["stage"], "data": data, "trainable": trainable, "hyperparameters": stage.get("args", {})}
        )
    return stages


def _format_layers(layers: list[int]) -> str:
    """`[1, 2, 3, 5]` -> `"1-3, 5"`."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def describe_config(config: CommConfig) -> dict[str, Any]:
    """The architecture facts a model card shows, read from a COMM-family config.

    Returns:
        `dict`: `encoders` (per encoder: role, family, depth, width, resolution, layers, merge, aligner), `projector`,
        `llm`, `visual_tokens` (per image, from the encoder), `llm_tokens` (per image, in the LLM input) and
        `family_fields` (`(name, value)` of the fields the config's class adds to `CommConfig`).
    """
    encoders = []
    for prefix in config.encoder_prefixes:
        branch = config.branch(prefix)
        vision = branch["vision_config"]
        aligner = branch["aligner"]
        if aligner == "mlp":
            aligner = (
                f"mlp ({branch['aligner_depth']} layers, ratio {branch['aligner_ratio']}, {config.aligner_hidden_act})"
            )
        grid = patch_grid(vision)
        encoders.append(
            {
                "role": "primary" if prefix == "vision" else "secondary",
                "model_type": vision.model_type,
                "num_layers": vision.num_hidden_layers,
                "hidden_size": vision.hidden_size,
                "resolution": f"{vision.image_size} px, patch {vision.patch_size} ({grid}x{grid} patches)",
                "layers": _format_layers(branch["layers"]),
                "merge": branch["merge"],
                "aligner": aligner,
            }
        )
    text = config.text_config
    depth = config.projector_depth
    projector = "linear" if depth == 1 else f"MLP, {depth} linear layers, {config.projector_hidden_act}"
    base_fields = set(getattr(CommConfig, "__annotations__", {}))
    family_fields = []
    for klass in reversed(type(config).__mro__):
        if issubclass(klass, CommConfig) and klass is not CommConfig:
            for name in vars(klass).get("__annotations__", {}):
                if name not in base_fields and not name.startswith("_"):
                    family_fields.append((name, getattr(config, name)))
    llm_tokens = getattr(config, "num_image_tokens", None)  # a family's tokens per image in the LLM input
    llm_tokens = llm_tokens() if callable(llm_tokens) else llm_tokens
    return {
        "encoders": encoders,
        "projector": f"{projector}, to the LLM width {text.hidden_size}",
        "llm": f"{text.model_type}, {text.num_hidden_layers} layers, width {text.hidden_size}, "
        f"vocabulary {text.vocab_size}",
        "visual_tokens": config.image_seq_length,
        "llm_tokens": llm_tokens if llm_tokens is not None else config.image_seq_length,
        "family_fields": family_fields,
    }


def _load_template(name: str) -> str | None:
    """Jinja loader over `comm_vlm/model_cards/`, through importlib.resources (works from wheels and zips)."""
    resource = resources.files("comm_vlm").joinpath("model_cards", name)
    return resource.read_text(encoding="utf-8") if resource.is_file() else None


def render_model_card(config: CommConfig, info: ModelCardInfo | None = None) -> ModelCard:
    """Renders `model_cards/model_card.md` for a COMM-family config.

    Args:
        config (`CommConfig` or a subclass): the model's config (its `model_type` picks the method section).
        info (`ModelCardInfo`, *optional*): provenance, training, results and use; defaults to an empty info.

    Returns:
        `huggingface_hub.ModelCard` whose `.data` holds the YAML metadata (with `model-index` when results are given).
    """
    import jinja2

    info = info or ModelCardInfo()
    method = _method(config.model_type)
    model_name = info.model_name or (info.repo_id.split("/")[-1] if info.repo_id else f"{config.model_type}-model")
    eval_results = _eval_results(info.eval_results)
    tags = [
        "comm-vlm",
        config.model_type,
        *method["tags"],
        "image-text-to-text",
        "custom_code",
        f"arxiv:{method['arxiv']}",
    ]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=info.license,
        language=info.language or None,
        base_model=info.base_model or None,
        datasets=info.datasets or None,
        tags=list(dict.fromkeys(tags + info.tags)),
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_load_template),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    content = env.get_template("model_card.md").render(
        card_data=card_data.to_yaml(),
        model_name=model_name,
        repo_id=info.repo_id or f"<user>/{model_name}",
        model_type=config.model_type,
        method=method,
        method_template=f"method_{config.model_type}.md",
        arch=describe_config(config),
        info=info,
        training=_training_stages(info.training),
        eval_results=eval_results,
    )
    return ModelCard(content)


# ----------------------------------------------------------------------------------------------------------------
# Saving and pushing
# ----------------------------------------------------------------------------------------------------------------


def save_for_hub(
    model: Any,
    save_directory: str | os.PathLike,
    processor: Any = None,
    card: ModelCardInfo | None = None,
    max_shard_size: int | str = "5GB",
) -> list[str]:
    """Writes everything a Hub repo needs: safetensors (sharded above `max_shard_size`), config, generation config,
    processor, remote code and a model card (`README.md`).

    Args:
        model (`PreTrainedModel`): a COMM-family model.
        save_directory (`str` or `os.PathLike`): created if missing; existing files of the same names are replaced.
        processor (`ProcessorMixin`, *optional*): saved next to the model (needed by `AutoProcessor` / `pipeline`).
        card (`ModelCardInfo`, *optional*): the card's content beyond the config.
        max_shard_size (`int` or `str`): largest safetensors shard, e.g. `"5GB"`.

    Returns:
        `list[str]`: the written files, relative to `save_directory`, sorted.
    """
    save_directory = Path(save_directory)
    with remote_code_export(model, processor):
        model.save_pretrained(save_directory, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(save_directory)
    check_remote_code(save_directory)
    render_model_card(model.config, card).save(save_directory / "README.md")
    return sorted(p.relative_to(save_directory).as_posix() for p in save_directory.rglob("*") if p.is_file())


def push_to_hub(
    model: Any,
    repo_id: str,
    processor: Any = None,
    card: ModelCardInfo | None = None,
    *,
    max_shard_size: int | str = "5GB",
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
        model, processor, card, max_shard_size: as for `save_for_hub` (`card.repo_id` defaults to `repo_id`).
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
        files = save_for_hub(model, tmp, processor, card, max_shard_size=max_shard_size)
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


# ----------------------------------------------------------------------------------------------------------------
# The Hub cache layout
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Pipeline outputs
# ----------------------------------------------------------------------------------------------------------------


def _answer_text(record: dict[str, Any]) -> str:
    generated = record.get("generated_text")
    if isinstance(generated, list):  # chat mode: the conversation with the answer as last message
        last = generated[-1] if generated else {}
        content = last.get("content", "") if last.get("role") == "assistant" else ""
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
        return content
    text = generated or ""
    prompt = record.get("input_text")
    if isinstance(prompt, str) and prompt and text.startswith(prompt):  # return_full_text=True
        text = text[len(prompt) :]
    return text


def parse_pipeline_boxes(outputs: Any) -> Any:
    """Adds the Shikra-style boxes of each answer to `pipeline("image-text-to-text")` outputs.

    Every record (at any nesting: single input, batch, several sequences per input) gets `boxes` (normalised
    `(x1, y1, x2, y2)` tuples, in order) and `box_errors` (malformed boxes, see `parse_boxes`). Only the answer is
    parsed: the last assistant message in chat mode, the text after the prompt for plain prompts, so boxes quoted in
    the question are not returned. Records are updated in place and returned.

    Args:
        outputs (`dict` or `list`): what the pipeline returned.
    """
    if isinstance(outputs, dict):
        result: BoxParseResult = parse_boxes(_answer_text(outputs))
        outputs["boxes"] = result.boxes
        outputs["box_errors"] = result.errors
        return outputs
    if isinstance(outputs, list):
        for item in outputs:
            parse_pipeline_boxes(item)
        return outputs
    raise ValueError(
        f"Expected pipeline outputs (a dict or a list of dicts), got {type(outputs).__name__}; pass what "
        "`pipeline('image-text-to-text')(...)` returned."
    )


__all__ = [
    "METHODS",
    "ModelCardInfo",
    "add_to_hub_cache",
    "check_remote_code",
    "describe_config",
    "parse_pipeline_boxes",
    "push_to_hub",
    "remote_code_export",
    "render_model_card",
    "save_for_hub",
    "training_from_recipe",
]
