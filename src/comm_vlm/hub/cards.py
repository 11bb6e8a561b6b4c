"""Model cards: the method, its configuration, the training stages and evaluation results, rendered from the
templates in `model_cards/`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.utils import logging

from ..models.configuration_comm import CommConfig, patch_grid


logger = logging.get_logger(__name__)


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
    "matryoshka_llava_next": dict(
        name="Matryoshka-LLaVA-NeXT (M3)",
        paper="Matryoshka Multimodal Models",
        arxiv="2405.17430",
        tags=["matryoshka", "m3", "llava-next", "anyres", "visual-token-compression"],
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
            f"`comm_vlm/hub/model_cards/method_{model_type}.md`. Known: {sorted(METHODS)}."
        )
    return METHODS[model_type]


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
            `hyperparameters` (dict), and for a run that happened `steps`, `epochs`, `global_batch_size` and
            `train_loss`. `training_from_provenance` builds it from the record a training run writes,
            `training_from_recipe` from a YAML recipe (what was planned, not what ran).
        eval_results (`list[EvalResult | dict]`): results of *this* checkpoint, written as `model-index`. Dicts take
            `EvalResult`'s fields (`task_type`, `dataset_type`, `dataset_name`, `metric_type`, `metric_value`, ...).
        notes (`list[str]`): extra provenance lines (e.g. "converted from the LLaVA training-code layout").
        intended_use (`str`, *optional*): replaces the default intended-use paragraph.
        limitations (`list[str]`): added to the default limitations.
        tags (`list[str]`): extra Hub tags.
        remote_code (`bool`): whether the modeling code ships with the weights (`auto_map` and `*.py` files, so
            `trust_remote_code=True` loads it without comm-vlm); when `False` the card says to `import comm_vlm`.
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
    remote_code: bool = True

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


_STAGE_DEFAULTS: dict[str, Any] = {
    "data": "",
    "trainable": [],
    "hyperparameters": {},
    "steps": None,
    "epochs": None,
    "global_batch_size": None,
    "train_loss": None,
}


def _training_stages(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validates `ModelCardInfo.training` and fills the optional keys."""
    normalized = []
    for stage in stages:
        if not isinstance(stage, dict) or "stage" not in stage or set(stage) - {"stage", *_STAGE_DEFAULTS}:
            raise ValueError(
                f"Invalid training stage {stage!r}: give a dict with 'stage' and optionally 'data' (str or list), "
                "'trainable' (list), 'hyperparameters' (dict), 'steps' (int), 'epochs', 'global_batch_size' and "
                "'train_loss'."
            )
        normalized.append({**_STAGE_DEFAULTS, **stage})
    return normalized


def describe_dataset(spec: dict[str, Any]) -> list[str]:
    """A recipe's `dataset:` entry as card lines: one per source (`path (format)`, with weights for a mixture)."""
    if "mixture" in spec:
        return [f"{d.get('path')} ({d.get('format', 'auto')}, weight {d.get('weight', 1)})" for d in spec["mixture"]]
    if "tiny" in spec:
        return [f"synthetic tiny data ({spec['tiny']} samples)"]
    return [f"{spec.get('path')} ({spec.get('format', 'auto')})"]


def base_models_from_recipe(recipe: dict[str, Any]) -> list[str]:
    """The Hub ids a recipe's model source names (`pretrained:` or the parts of `assemble:`), local paths left out."""
    source = recipe.get("model") or {}
    parts = [*(source.get("assemble") or {}).values(), source.get("pretrained")]
    return [p for p in parts if isinstance(p, str) and not Path(p).exists()]


def training_from_recipe(recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """Turns a loaded training recipe (`comm_vlm.training.load_recipe`) into `ModelCardInfo.training` stages.

    Args:
        recipe (`dict`): with `stages`, each having `stage`, `dataset` and `args` (SFTConfig fields).
    """
    from ..training.stages import STAGES

    stages = []
    for stage in recipe.get("stages", []):
        data = describe_dataset(stage.get("dataset", {}))
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
    if not hasattr(config, "encoder_prefixes"):
        return _describe_anyres_config(config)
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


def _describe_anyres_config(config: Any) -> dict[str, Any]:
    """`describe_config` for a family built on transformers' LLaVA-NeXT config (one encoder, anyres tiles)."""
    vision, text = config.vision_config, config.text_config
    grid = patch_grid(vision)
    layer = config.vision_feature_layer
    encoder = {
        "role": "primary",
        "model_type": vision.model_type,
        "num_layers": vision.num_hidden_layers,
        "hidden_size": vision.hidden_size,
        "resolution": f"{vision.image_size} px tiles, patch {vision.patch_size} ({grid}x{grid} patches per tile); "
        f"canvases {config.image_grid_pinpoints}",
        "layers": _format_layers([layer] if isinstance(layer, int) else list(layer)),
        "merge": "single",
        "aligner": "identity",
    }
    base = next(k for k in type(config).__mro__ if k.__module__.startswith("transformers."))
    base_fields = set(getattr(base, "__dataclass_fields__", {}))
    family_fields = [
        (name, getattr(config, name))
        for klass in reversed(type(config).__mro__)
        if issubclass(klass, base) and klass is not base
        for name in vars(klass).get("__annotations__", {})
        if name not in base_fields and not name.startswith("_")
    ]
    return {
        "encoders": [encoder],
        "projector": f"MLP, 2 linear layers, {config.projector_hidden_act}, to the LLM width {text.hidden_size}",
        "llm": f"{text.model_type}, {text.num_hidden_layers} layers, width {text.hidden_size}, "
        f"vocabulary {text.vocab_size}",
        "visual_tokens": f"{grid * grid} per tile",
        "llm_tokens": "per tile at the chosen scale, over the base view and the unpadded tiles, plus one newline per "
        "row (depends on the image size)",
        "family_fields": family_fields,
    }


def _load_template(name: str) -> str | None:
    """Jinja loader over `comm_vlm/hub/model_cards/`, through importlib.resources (works from wheels and zips)."""
    resource = resources.files("comm_vlm.hub").joinpath("model_cards", name)
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


PROVENANCE_FILE = "training_provenance.json"
"""The record a training run writes into its directory and each stage's `final/` (`comm_vlm.training.provenance`)."""

# SFTConfig fields a card leaves out of a stage's hyper-parameters (paths, logging, saving, placeholders); the
# provenance file keeps them all.
_HIDDEN_CARD_ARGS = frozenset(
    {
        "output_dir",
        "logging_dir",
        "run_name",
        "report_to",
        "disable_tqdm",
        "push_to_hub",
        "overwrite_output_dir",
        "remove_unused_columns",
        "accelerator_config",
        "debug",
        "dataloader_pin_memory",
        "ddp_find_unused_parameters",
    }
)


def _shown_in_card(name: str, value: Any) -> bool:
    return value is not None and name not in _HIDDEN_CARD_ARGS and not name.startswith(("hub_", "logging_", "save_"))


def read_provenance(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The training record of a checkpoint directory (`training_provenance.json`), or `None` when it has none.

    Args:
        directory (`str` or `os.PathLike`): a run directory or a stage's `final/` written by `comm-vlm train`.

    Raises:
        ValueError: the file exists but is not a training record.
    """
    path = Path(directory) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}): restore it from the run directory, or remove it to publish the "
            "checkpoint without its training record."
        ) from err
    if not isinstance(record, dict) or not isinstance(record.get("stages"), list):
        raise ValueError(
            f"{path} is not a comm-vlm training record (no `stages` list): restore it from the run directory, or "
            "remove it to publish the checkpoint without its training record."
        )
    return record


def load_instructions(path_or_repo_id: str, remote_code: bool) -> dict[str, str | None]:
    """The Python lines that load a checkpoint, with the package and (when its code ships) without it.

    Args:
        path_or_repo_id (`str`): a directory or a Hub repo id.
        remote_code (`bool`): whether the checkpoint ships its modeling code (`auto_map` and `*.py` files).

    Returns:
        `dict`: `with_comm_vlm` (always), `without_comm_vlm` (`trust_remote_code=True`; `None` without remote code).
    """
    source = json.dumps(str(path_or_repo_id))
    imports = "from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
    with_package = (
        "import comm_vlm  # registers the comm-vlm model types with the Auto classes\n"
        + imports
        + f"model = AutoModelForImageTextToText.from_pretrained({source})\n"
        + f"processor = AutoProcessor.from_pretrained({source})"
    )
    without_package = (
        imports
        + f"model = AutoModelForImageTextToText.from_pretrained({source}, trust_remote_code=True)\n"
        + f"processor = AutoProcessor.from_pretrained({source}, trust_remote_code=True)"
    )
    return {"with_comm_vlm": with_package, "without_comm_vlm": without_package if remote_code else None}


def training_from_provenance(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Turns a training record (`read_provenance`) into `ModelCardInfo.training` stages: what actually ran.

    Args:
        record (`dict`): with `stages`, each having `stage`, `data`, `trainable`, `sft_args`, `batch`, `steps` and
            `train_loss`, as `comm_vlm.training.provenance` writes them.
    """
    stages = []
    for stage in record.get("stages", []):
        data = stage.get("data") or {}
        lines = describe_dataset(data.get("spec") or {})
        samples = data.get("samples")
        if samples:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(samples.get("skipped_by_reason", {}).items()))
            lines.append(
                f"{samples['kept']} of {samples['total']} samples used"
                + (f", skipped {reasons}" if reasons else ", none skipped")
            )
        counts = (stage.get("trainable") or {}).get("per_component") or {}
        trainable = [f"{component} ({n:,} parameters)" for component, n in counts.items() if n]
        if stage.get("peft"):
            trainable.append(f"LoRA {stage['peft']}")
        hyperparameters = {k: v for k, v in (stage.get("sft_args") or {}).items() if _shown_in_card(k, v)}
        if stage.get("learning_rates"):
            hyperparameters["learning_rates"] = stage["learning_rates"]
        steps = stage.get("steps") or {}
        stages.append(
            {
                "stage": stage["stage"],
                "data": lines,
                "trainable": trainable,
                "hyperparameters": hyperparameters,
                "steps": steps.get("global_step"),
                "epochs": steps.get("epochs"),
                "global_batch_size": (stage.get("batch") or {}).get("global_batch_size"),
                "train_loss": stage.get("train_loss"),
            }
        )
    return stages


def provenance_note(record: dict[str, Any]) -> str:
    """One card paragraph: how the checkpoint was trained (recipe, overrides, steps, library versions)."""
    stages = record.get("stages", [])
    steps = sum((s.get("steps") or {}).get("global_step") or 0 for s in stages)
    recipe = f" from the recipe `{record['recipe_path']}`" if record.get("recipe_path") else ""
    overrides = record.get("overrides") or {}
    given = " with the overrides " + ", ".join(f"`{k}={v}`" for k, v in overrides.items()) if overrides else ""
    versions = ", ".join(f"{name} {version}" for name, version in (record.get("versions") or {}).items() if version)
    return (
        f"Trained by `comm-vlm train`{recipe}{given}: {len(stages)} stage{'s' if len(stages) != 1 else ''}, "
        f"{steps} optimizer step{'s' if steps != 1 else ''} in all"
        + (f", with {versions}" if versions else "")
        + f". `{PROVENANCE_FILE}` holds the full record: the resolved recipe, the SFT arguments used, the steps run, "
        "the data used and skipped, the trainable parameters and the library versions."
    )


def card_info_from_provenance(record: dict[str, Any], info: ModelCardInfo | None = None) -> ModelCardInfo:
    """`info` completed from a training record: the stages that ran, the base models and a provenance note.

    Fields set in `info` win: its `training` (when given) replaces the recorded stages, its `base_model` the recipe's.

    Args:
        record (`dict`): a training record (`read_provenance`).
        info (`ModelCardInfo`, *optional*): the card's other content; not modified.
    """
    info = replace(info) if info is not None else ModelCardInfo()
    if not info.training:
        info.training = training_from_provenance(record)
        info.notes = [provenance_note(record), *info.notes]
    info.base_model = info.base_model or base_models_from_recipe(record.get("recipe") or {})
    return info
