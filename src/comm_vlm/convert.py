"""Converts LLaVA-1.5 checkpoints to `comm` or `matryoshka_llava`, and LLaVA-NeXT (v1.6) checkpoints to
`matryoshka_llava_next` (weights unchanged, safetensors only).

    comm-vlm convert --from llava-hf SRC DST [--to comm|matryoshka_llava|matryoshka_llava_next]
    comm-vlm convert --from llava-original SRC DST [--to matryoshka_llava|matryoshka_llava_next] [--vision-tower ...]
    comm-vlm convert --from comm-vlm SRC DST --to matryoshka_llava|adaptive_combiner|comm   (`comm_vlm.derive`)

Source layouts:

* `llava-hf`: transformers' `LlavaForConditionalGeneration` (`llava-hf/llava-1.5-7b-hf`): the Hub's v4 key layout
  (`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`)
  or the v5 in-memory one (`model.language_model.*`, `model.vision_tower.*`, `model.multi_modal_projector.*`,
  `lm_head.*`), with its processor.
* `llava-original`: the training code of haotian-liu/LLaVA and of M3 (mu-cai/matryoshka-mm): a Llama checkpoint
  (`model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head`) plus `model.mm_projector.{0,2}.*` and, when the
  vision tower was trained (M3), `model.vision_tower.vision_tower.vision_model.*`; `config.json` has
  `mm_vision_tower`, `mm_vision_select_layer`, `mm_projector_type` (`linear` / `mlp{N}x_gelu`), `mm_hidden_size`.
  Without tower weights they are read from `mm_vision_tower` (a local directory, or a Hub id in the cache).
  The tokenizer has no image token: `<image>` is added (its embedding row is the mean of the others).

LLaVA-NeXT: `llava-hf/llava-v1.6-*` (`model_type: llava_next`, plus `image_newline`) and the original training code's
v1.6 checkpoints (`image_aspect_ratio: anyres`, `mm_patch_merge_type: spatial_unpad`, `image_grid_pinpoints` as
(width, height) pairs, swapped to transformers' (height, width), `model.image_newline`) convert with
`--to matryoshka_llava_next` only; LLaVA-1.5 targets refuse them (and the reverse).

No COMM checkpoint was ever published, so nothing converts from another COMM layout; `--from comm-vlm` derives one
family from a checkpoint of this package (M3 from a trained COMM or LLaVA-layout model, the combiner on a COMM branch:
`comm_vlm.derive`). Weights are read with safetensors only
(never pickle). A malformed source (missing keys, unexpected keys, wrong shapes) raises a `ValueError` listing them
before anything is written; the output is assembled in a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
from transformers.utils import logging

from .chat_templates import VICUNA_SYSTEM_PROMPT, vicuna_chat_template
from .families import clip_image_processor
from .hub import ModelCardInfo, save_for_hub_into
from .models.processing_comm import CommProcessor


logger = logging.get_logger(__name__)

SOURCE_LAYOUTS = ("llava-hf", "llava-original", "comm-vlm")
TARGETS = ("comm", "matryoshka_llava", "matryoshka_llava_next")
ANYRES_TARGETS = ("matryoshka_llava_next",)  # LLaVA-NeXT's tiles: from llava_next / anyres sources
IMAGE_TOKEN = "<image>"
# Buffers older checkpoints saved that current models recompute (LLaVA-1.5 was trained with transformers 4.31).
IGNORED_SOURCE_KEYS = re.compile(r"(\.position_ids|rotary_emb\.inv_freq)$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# LLaVA-1.5's conversation (conv_vicuna_v1): the tiny chat template with LLaVA's full system prompt.
VICUNA_V1_TEMPLATE = vicuna_chat_template(
    VICUNA_SYSTEM_PROMPT + " The assistant gives helpful, detailed, and polite answers to the human's questions."
)
ORIGINAL_TEXT_MODEL_TYPES = {"llava_llama": "llama", "llava": "llama", "llava_mistral": "mistral"}
# LLaVA / M3 training-code fields that are not text-model settings.
ORIGINAL_ONLY_FIELDS = {
    "architectures",
    "_name_or_path",
    "transformers_version",
    "model_type",
    "torch_dtype",
    "dtype",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "use_mm_proj",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "unfreeze_mm_vision_tower",
}


def read_safetensors(directory: str | os.PathLike, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Reads every tensor of a (possibly sharded) safetensors checkpoint directory.

    Raises:
        ValueError: the directory has no safetensors file (saying to convert pickle weights first).
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in directory.glob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"The {what} {directory} has only PyTorch pickle weights ({', '.join(pickles)}). This converter reads "
                "safetensors only, because loading a pickle can run arbitrary code: convert it first in an "
                "environment you trust, e.g. `model.save_pretrained(dst, safe_serialization=True)` after loading it "
                "with its own code, then convert `dst`."
            )
        raise ValueError(
            f"The {what} {directory} has no weights (*.safetensors); check the path (a Hub repo with only "
            "pytorch_model.bin is not read: convert it to safetensors first)."
        )
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path} is missing: a checkpoint directory needs its config.json.")
    return json.loads(path.read_text())


def _resolve_dir(name: str, what: str, weights: bool) -> Path:
    """A local directory, or a Hub repo id fetched (or found in the cache when offline); safetensors only."""
    if os.path.isdir(name):
        return Path(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"] if weights else ["*.json"]))
    except Exception as err:  # offline and not cached, unknown repo, no network
        raise ValueError(
            f"Could not find the {what} {name!r} ({type(err).__name__}: {err}). Pass a local directory (e.g. "
            "`--vision-tower path/to/clip-vit-large-patch14-336`) or download it first."
        ) from err


def _vision_config_of(directory: Path) -> dict[str, Any]:
    config = _read_json(directory / "config.json")
    if "vision_config" in config:  # a full CLIP / SigLIP checkpoint
        vision = dict(config["vision_config"])
        vision.setdefault("model_type", f"{config['model_type']}_vision_model")
        return vision
    return config


def _vision_weights_of(directory: Path) -> dict[str, torch.Tensor]:
    """A vision tower's weights as `model.vision_tower.*` (text tower and projections of a full CLIP dropped)."""
    tensors = read_safetensors(directory, "vision tower")
    out = {}
    for key, value in tensors.items():
        if key.startswith("text_model.") or key in (
            "logit_scale",
            "text_projection.weight",
            "visual_projection.weight",
        ):
            continue
        out["model.vision_tower." + key] = value
    return out


def _rename_llava_hf(key: str) -> str:
    for old, new in (
        ("language_model.lm_head.", "lm_head."),
        ("language_model.model.", "model.language_model."),
        ("language_model.", "model.language_model."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("image_newline", "model.image_newline"),
    ):
        if key.startswith(old):
            return new + key[len(old) :]
    return key  # already the v5 layout (model.*, lm_head.*)


def _rename_llava_original(key: str) -> str:
    if key.startswith("model.mm_projector."):
        index, _, param = key[len("model.mm_projector.") :].partition(".")
        if not param:  # mm_projector_type "linear": a bare nn.Linear
            return f"model.multi_modal_projector.linear_1.{index}"
        return f"model.multi_modal_projector.linear_{int(index) // 2 + 1}.{param}" if index.isdigit() else key
    if key.startswith("model.vision_tower.vision_tower."):
        return "model.vision_tower." + key[len("model.vision_tower.vision_tower.") :]
    if key.startswith("model.") and not key.startswith(("model.image_newline", "model.vision_resampler")):
        return "model.language_model." + key[len("model.") :]
    return key


def _fit_vision_prefix(key: str, expected: dict[str, torch.Size]) -> str:
    """Matches `vision_tower.vision_model.X` and `vision_tower.X` to whichever the installed transformers uses."""
    if key in expected or not key.startswith("model.vision_tower."):
        return key
    rest = key[len("model.vision_tower.") :]
    other = rest[len("vision_model.") :] if rest.startswith("vision_model.") else "vision_model." + rest
    return "model.vision_tower." + other if "model.vision_tower." + other in expected else key


def _append_mean_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([tensor, tensor.mean(dim=0, keepdim=True).expand(rows, -1).to(tensor.dtype)], dim=0)


def _plan_llava_hf(source: Path, problems: list[str], anyres: bool = False) -> dict[str, Any]:
    config = _read_json(source / "config.json")
    expected = "llava_next" if anyres else "llava"
    if config.get("model_type") != expected:
        hint = (
            " (LLaVA-NeXT: convert with --to matryoshka_llava_next)"
            if config.get("model_type") == "llava_next"
            else ""
        )
        problems.append(
            f"config.json has model_type {config.get('model_type')!r}, not {expected!r} "
            f"({'LLaVA-NeXT' if anyres else 'LLaVA-1.5'}){hint}"
        )
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        problems.append(f"vision_feature_layer {layer!r} concatenates several layers; only one layer converts")
    if problems:
        return {}
    strategy = config.get("vision_feature_select_strategy", "default")
    text = dict(config.get("text_config") or {"model_type": "llama"})
    fields = {
        "vision_config": dict(config.get("vision_config") or {"model_type": "clip_vision_model"}),
        "text_config": text,
        "image_token_index": config.get("image_token_index", config.get("image_token_id", 32000)),
        "vision_feature_layer": layer,
        "vision_feature_select_strategy": strategy,
        "projector_depth": 2,
        "projector_hidden_act": config.get("projector_hidden_act", "gelu"),
        "multimodal_projector_bias": config.get("multimodal_projector_bias", True),
        "tie_word_embeddings": config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)),
    }
    if anyres:
        fields["image_grid_pinpoints"] = config.get("image_grid_pinpoints")
    state_dict = {_rename_llava_hf(k): v for k, v in read_safetensors(source).items()}
    processor = None
    if (source / "processor_config.json").is_file() or (source / "preprocessor_config.json").is_file():
        llava_processor = AutoProcessor.from_pretrained(source)
        processor = {
            "image_processor": llava_processor.image_processor,
            "tokenizer": llava_processor.tokenizer,
            "image_token": getattr(llava_processor, "image_token", IMAGE_TOKEN),
            "chat_template": llava_processor.chat_template,
        }
    return {"fields": fields, "state_dict": state_dict, "processor": processor, "notes": [], "limitations": []}


def _plan_llava_original(
    source: Path, vision_tower: str | None, problems: list[str], anyres: bool = False
) -> dict[str, Any]:
    config = _read_json(source / "config.json")
    text_type = ORIGINAL_TEXT_MODEL_TYPES.get(config.get("model_type"))
    if text_type is None:
        problems.append(
            f"config.json model_type {config.get('model_type')!r} is not a LLaVA training-code LLM "
            f"({sorted(ORIGINAL_TEXT_MODEL_TYPES)})"
        )
    projector = config.get("mm_projector_type", "linear")
    depth_match = re.fullmatch(r"mlp(\d+)x_gelu", projector)
    if projector != "linear" and depth_match is None:
        problems.append(f"mm_projector_type {projector!r} is not 'linear' or 'mlp<N>x_gelu'")
    select = config.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        problems.append(f"mm_vision_select_feature {select!r} is not 'patch' or 'cls_patch'")
    is_anyres = config.get("image_aspect_ratio") == "anyres"
    if anyres and (not is_anyres or config.get("mm_patch_merge_type") != "spatial_unpad"):
        problems.append(
            f"image_aspect_ratio {config.get('image_aspect_ratio')!r} / mm_patch_merge_type "
            f"{config.get('mm_patch_merge_type')!r} is not LLaVA-NeXT's 'anyres' with 'spatial_unpad'"
        )
    if not anyres and (config.get("mm_patch_merge_type", "flat") != "flat" or is_anyres):
        problems.append(
            "the checkpoint is LLaVA-NeXT ('anyres' / spatial patch merging): convert it with "
            "--to matryoshka_llava_next (LLaVA-1.5 targets take the flat layout only)"
        )
    if config.get("mm_use_im_start_end"):
        problems.append("mm_use_im_start_end=True (image start/end tokens) is not supported")
    tower_name = vision_tower or config.get("mm_vision_tower")
    if not tower_name:
        problems.append("config.json has no mm_vision_tower; pass vision_tower (--vision-tower)")
    if problems:
        return {}
    tensors = read_safetensors(source)
    if not anyres and any(k.startswith("model.image_newline") for k in tensors):
        problems.append("the checkpoint has model.image_newline (LLaVA-NeXT), which LLaVA-1.5 models do not use")
    state_dict = {_rename_llava_original(k): v for k, v in tensors.items()}
    has_tower = any(k.startswith("model.vision_tower.") for k in state_dict)
    tower_dir = _resolve_dir(tower_name, "vision tower", weights=not has_tower)
    notes, limitations = [], []
    if not has_tower:
        state_dict.update(_vision_weights_of(tower_dir))
        notes.append(f"The vision tower's weights come from `{tower_name}` (the checkpoint has none: it was frozen).")
    text = {k: v for k, v in config.items() if k not in ORIGINAL_ONLY_FIELDS and not k.startswith("mm_")}
    text = {k: v for k, v in text.items() if "matryoshka" not in k}
    text["model_type"] = text_type
    tokenizer_dir = source
    tokenizer = None
    if (tokenizer_dir / "tokenizer_config.json").is_file() or (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = int(text["vocab_size"])
    if tokenizer is not None and tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) not in (None, tokenizer.unk_token_id):
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    else:
        if tokenizer is not None:
            tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
        image_token_id = len(tokenizer) - 1 if tokenizer is not None else vocab
        notes.append(f"`{IMAGE_TOKEN}` was added as token {image_token_id} (LLaVA's code uses the id -200 instead).")
    if image_token_id >= vocab:
        rows = image_token_id + 1 - vocab
        for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            if key in state_dict and state_dict[key].shape[0] == vocab:
                state_dict[key] = _append_mean_rows(state_dict[key], rows)
        text["vocab_size"] = image_token_id + 1
        notes.append(f"The vocabulary grew from {vocab} to {image_token_id + 1}; the new rows are the mean rows.")
    vision = _vision_config_of(tower_dir)
    if (tower_dir / "preprocessor_config.json").is_file():
        image_processor = AutoImageProcessor.from_pretrained(tower_dir)
    else:
        image_processor = clip_image_processor(vision.get("image_size", 336))  # CLIP's: resize, center crop
    if config.get("image_aspect_ratio") == "pad":
        limitations.append(
            "LLaVA-1.5 pads images to a square with the mean colour before CLIP's preprocessing; this processor "
            "resizes and centre-crops (as llava-hf's does), so answers on non-square images can differ slightly."
        )
    fields = {
        "vision_config": vision,
        "text_config": text,
        "image_token_index": image_token_id,
        "vision_feature_layer": config.get("mm_vision_select_layer", -2),
        "vision_feature_select_strategy": "default" if select == "patch" else "full",
        "projector_depth": int(depth_match.group(1)) if depth_match else 1,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": "model.multi_modal_projector.linear_1.bias" in state_dict,
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
    }
    if anyres:  # the official code lists (width, height) pairs; LLaVA-NeXT's set is symmetric, transformers' is (H, W)
        fields["image_grid_pinpoints"] = [[int(p[1]), int(p[0])] for p in config["image_grid_pinpoints"]]
        limitations.append(
            "LLaVA-NeXT's training code resizes and pads each tile canvas with its own PIL routine; this processor "
            "uses transformers' LLaVA-NeXT image processor (as llava-hf's checkpoints do), so pixels can differ "
            "slightly."
        )
    processor = None
    if tokenizer is not None:
        template = tokenizer.chat_template or VICUNA_V1_TEMPLATE
        processor = {
            "image_processor": image_processor,
            "tokenizer": tokenizer,
            "image_token": IMAGE_TOKEN,
            "chat_template": template,
        }
    return {
        "fields": fields,
        "state_dict": state_dict,
        "processor": processor,
        "notes": notes,
        "limitations": limitations,
    }


def _check_state_dict(state_dict: dict[str, torch.Tensor], model_class: type, config: Any) -> list[str]:
    """Compares the converted weights with the target model's parameters (built on the meta device)."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in model_class(config).state_dict().items()}
    for key in list(state_dict):
        if IGNORED_SOURCE_KEYS.search(key) and key not in expected:
            del state_dict[key]
        else:
            fitted = _fit_vision_prefix(key, expected)
            if fitted != key:
                state_dict[fitted] = state_dict.pop(key)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(state_dict) - optional)
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{k}: {tuple(state_dict[k].shape)} in the checkpoint, {tuple(expected[k])} in the model"
        for k in sorted(set(expected) & set(state_dict))
        if state_dict[k].shape != expected[k]
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
        if items:
            shown = items[:40] + ([f"... and {len(items) - 40} more"] if len(items) > 40 else [])
            problems.append(f"{len(items)} {label}: {shown}")
    return problems


def convert_checkpoint(
    source_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    source_layout: str,
    target: str = "comm",
    *,
    vision_tower: str | None = None,
    matryoshka_scales: list[int] | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    config_fields: dict[str, Any] | None = None,
) -> list[str]:
    """Converts a LLaVA-1.5 checkpoint to a `target` checkpoint with processor, remote code and model card; with
    `source_layout="comm-vlm"`, derives `target` from a checkpoint of this package (`comm_vlm.derive`).

    Args:
        source_dir (`str` or `os.PathLike`): the source checkpoint directory (safetensors).
        output_dir (`str` or `os.PathLike`): where to write; must not exist or be empty unless `overwrite`.
        source_layout (`str`): `"llava-hf"` or `"llava-original"` (see the module docstring).
        target (`str`): `"comm"` (LLaVA-layout COMM) or `"matryoshka_llava"`.
        vision_tower (`str`, *optional*): `llava-original` only: overrides `mm_vision_tower` (directory or Hub id).
        matryoshka_scales (`list[int]`, *optional*): `matryoshka_llava` only: the trained scales (default: the
            paper's cascade for the grid).
        base_model (`str`, *optional*): Hub id of the source, recorded in the model card.
        overwrite (`bool`): replace a non-empty `output_dir` (only once the conversion succeeded).
        max_shard_size (`int` or `str`): largest safetensors shard.
        config_fields (`dict`, *optional*): `comm-vlm` only: fields of the target config (e.g. `combiner_num_latents`).

    Returns:
        `list[str]`: the files written, relative to `output_dir`.

    Raises:
        ValueError: unknown layout/target, unsupported source settings, pickle-only weights, missing / unexpected
            keys or wrong shapes (all listed); nothing is written then.
    """
    source, output = Path(source_dir), Path(output_dir)
    if source_layout not in SOURCE_LAYOUTS:
        raise ValueError(f"Unknown source layout {source_layout!r}; use one of {SOURCE_LAYOUTS}.")
    if source_layout == "comm-vlm":
        from .derive import derive_checkpoint

        fields = dict(config_fields or {})
        if matryoshka_scales is not None:
            fields["matryoshka_scales"] = list(matryoshka_scales)
        return derive_checkpoint(
            source, output, target, base_model=base_model, overwrite=overwrite, max_shard_size=max_shard_size, **fields
        )
    if config_fields:
        raise ValueError("config_fields (--set) applies only to --from comm-vlm; LLaVA conversions keep LLaVA's.")
    if target not in TARGETS:
        raise ValueError(
            f"Unknown target {target!r} for a {source_layout} source; use one of {TARGETS}. For the adaptive "
            "combiner, convert to comm first, then derive: `comm-vlm convert --from comm-vlm SRC DST --to "
            "adaptive_combiner`."
        )
    if matryoshka_scales is not None and not target.startswith("matryoshka_llava"):
        raise ValueError("matryoshka_scales (--matryoshka-scales) applies only to the Matryoshka targets.")
    anyres = target in ANYRES_TARGETS
    if not source.is_dir():
        raise ValueError(f"Source checkpoint {source} is not a directory.")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"{output} exists and is not empty; pass overwrite=True (--overwrite) or another directory.")
    problems: list[str] = []
    if source_layout == "llava-hf":
        plan = _plan_llava_hf(source, problems, anyres)
    else:
        plan = _plan_llava_original(source, vision_tower, problems, anyres)
    if problems:
        raise ValueError(
            f"Cannot convert {source} ({source_layout}): " + "; ".join(problems) + ". Nothing was written."
        )
    fields = {**plan["fields"]}
    if anyres:  # transformers' LLaVA-NeXT config: a fixed 2-layer MLP projector, no COMM branch fields
        if fields.pop("projector_depth") != 2:
            raise ValueError(
                f"Cannot convert {source}: LLaVA-NeXT models have a 2-layer MLP projector. Nothing was written."
            )
    else:
        fields.update(secondary_vision_config=None, vision_feature_merge="single", vision_aligner="identity")
    if matryoshka_scales is not None:
        fields["matryoshka_scales"] = list(matryoshka_scales)
    config_class = CONFIG_MAPPING[target]
    config = config_class(**fields)
    model_class = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[config_class]
    state_dict = plan["state_dict"]
    problems = _check_state_dict(state_dict, model_class, config)
    if problems:
        raise ValueError(
            f"{source} is not a complete {source_layout} {'LLaVA-NeXT' if anyres else 'LLaVA-1.5'} checkpoint for "
            f"{target}: "
            + "; ".join(problems)
            + ". Nothing was written. Check that the layout (--from) matches the checkpoint and that it is whole."
        )
    processor = None
    if plan["processor"] is not None and anyres:
        from .families import family_processor

        parts = plan["processor"]
        processor = family_processor(
            target, config, parts["image_processor"], parts["tokenizer"], parts["chat_template"]
        )
    elif plan["processor"] is not None:
        processor_class = PROCESSOR_MAPPING.get(config_class, CommProcessor)
        extra = {}
        if hasattr(config, "matryoshka_scales"):
            extra = {
                "matryoshka_scales": config.matryoshka_scales,
                "matryoshka_default_scale": config.matryoshka_default_scale,
            }
        grid_tokens = (
            config.image_seq_length or (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1
        )
        processor = processor_class(num_image_tokens=grid_tokens, **plan["processor"], **extra)
    else:
        logger.warning(f"{source} has no tokenizer/processor files: the output has no processor (add one before use).")
    layout_name = {"llava-hf": "transformers' LLaVA (llava-hf)", "llava-original": "LLaVA / M3 training-code"}
    notes = [
        f"Converted from the {layout_name[source_layout]} layout with `comm-vlm convert`"
        + (f" (source: `{base_model}`)" if base_model else "")
        + "; the weights are unchanged."
    ]
    card = ModelCardInfo(
        base_model=[base_model] if base_model else [], notes=notes + plan["notes"], limitations=plan["limitations"]
    )

    output.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{output.name}.converting-", dir=output.parent))
    try:
        from safetensors.torch import save_file

        staging = workdir / "staging"
        staging.mkdir()
        config.save_pretrained(staging)
        if (source / "generation_config.json").is_file():
            shutil.copyfile(source / "generation_config.json", staging / "generation_config.json")
        save_file({k: v.contiguous() for k, v in state_dict.items()}, staging / "model.safetensors", {"format": "pt"})
        dtypes = {v.dtype for v in state_dict.values() if v.is_floating_point()}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32  # mixed precisions: upcast, lose nothing
        if dtypes:
            logger.warning(f"{source} mixes {sorted(map(str, dtypes | {dtype}))} weights; the output is float32.")
        model = model_class.from_pretrained(staging, dtype=dtype).eval()
        files = save_for_hub_into(model, output, processor, card=card, max_shard_size=max_shard_size, workdir=workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return files


__all__ = ["SOURCE_LAYOUTS", "TARGETS", "convert_checkpoint", "read_safetensors"]
