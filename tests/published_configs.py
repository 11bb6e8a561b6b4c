"""The published `config.json` of the checkpoints the families are built from, and the paper-scale builds on them.

`tests/fixtures/published_configs/<owner>--<name>.json` holds each repo's `config.json` as published (provenance in
that folder's README). `load_published_config` reads one into its transformers config class, the way
`AutoConfig.from_pretrained` would; `load_vision_config` keeps a two-tower repo's (CLIP, SigLIP) vision tower, as
`comm_vlm.assemble` does. `published_build` gives the config of each family at the papers' scale, built from those
fixtures, and `component_counts` splits a model's parameters by component. Used by `tests/test_published_configs.py`
and `benchmarks/param_counts.py` (which loads this file by path).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoConfig, PretrainedConfig

from comm_vlm.families import get_family


FIXTURES = Path(__file__).resolve().parent / "fixtures" / "published_configs"

CLIP_L_336 = "openai/clip-vit-large-patch14-336"
DINOV2_L = "facebook/dinov2-large"
DINOV2_B = "facebook/dinov2-base"
VICUNA_7B = "lmsys/vicuna-7b-v1.5"
LLAVA_15_7B = "llava-hf/llava-1.5-7b-hf"
LLAVA_NEXT_MISTRAL_7B = "llava-hf/llava-v1.6-mistral-7b-hf"
SIGLIP_SO400M = "google/siglip-so400m-patch14-384"
PUBLISHED_REPOS = (CLIP_L_336, DINOV2_L, DINOV2_B, VICUNA_7B, LLAVA_15_7B, LLAVA_NEXT_MISTRAL_7B, SIGLIP_SO400M)

# The resolution every COMM encoder runs at: CLIP ViT-L/14-336's, 24x24 patches.
COMM_IMAGE_SIZE = 336

# Name -> (family, description) of the paper-scale builds of `published_build`.
PUBLISHED_BUILDS: dict[str, tuple[str, str]] = {
    "llava-1.5-7b": ("comm", "LLaVA-1.5-7B layout: CLIP-L/14-336 penultimate layer, 2-layer MLP, Vicuna-7B (32064)"),
    "comm-7b": ("comm", "COMM-7B: CLIP-L/14-336 + DINOv2-L at 336 px, COMM defaults, Vicuna-7B"),
    "m3-llava-1.5-7b": ("matryoshka_llava", "M3 on LLaVA-1.5-7B (matryoshka_llava defaults)"),
    "combiner-llava-1.5-7b": ("adaptive_combiner", "adaptive combiner on LLaVA-1.5-7B's branch (its defaults)"),
    "comm-siglip-so400m": ("comm", "not a paper model: SigLIP-so400m/14-384 + DINOv2-L at 378 px, COMM defaults"),
}


def fixture_path(repo: str) -> Path:
    """The fixture of `repo` ("owner/name" -> `owner--name.json`)."""
    return FIXTURES / f"{repo.replace('/', '--')}.json"


def load_published_dict(repo: str) -> dict[str, Any]:
    """The published `config.json` of `repo` as a dict."""
    return json.loads(fixture_path(repo).read_text())


def load_published_config(repo: str) -> PretrainedConfig:
    """The published config of `repo` in its transformers config class (`AutoConfig.for_model` on the file)."""
    return AutoConfig.for_model(**load_published_dict(repo))


def load_vision_config(repo: str, **overrides: Any) -> PretrainedConfig:
    """The vision encoder config of `repo`: a two-tower (CLIP, SigLIP) or VLM config's `vision_config`, else the
    config itself; `overrides` are set on it (e.g. `image_size=336` for DINOv2 at CLIP's resolution)."""
    config = load_published_config(repo)
    config = getattr(config, "vision_config", None) or config
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def llava_15_text_config() -> PretrainedConfig:
    """Vicuna-7B v1.5 with the vocabulary llava-hf ships (32064: `<image>`, `<pad>` and padding to a multiple of
    64 added to Vicuna's 32000)."""
    config = load_published_config(VICUNA_7B)
    config.vocab_size = load_published_dict(LLAVA_15_7B)["text_config"]["vocab_size"]
    return config


def llava_15_branch() -> dict[str, Any]:
    """The LLaVA-1.5-7B vision branch and LLM, as fields of a COMM-family config (the LLaVA-1.5 layout)."""
    llava = load_published_dict(LLAVA_15_7B)
    return {
        "vision_config": load_vision_config(CLIP_L_336),
        "secondary_vision_config": None,
        "text_config": llava_15_text_config(),
        "image_token_index": llava["image_token_index"],
        "vision_feature_layer": llava["vision_feature_layer"],
        "vision_feature_select_strategy": llava["vision_feature_select_strategy"],
        "vision_feature_merge": "single",
        "vision_aligner": "identity",
        "projector_depth": 2,
        "projector_hidden_act": llava["projector_hidden_act"],
    }


def comm_7b_fields() -> dict[str, Any]:
    """COMM-7B's encoders and LLM; every other field is `CommConfig`'s default (COMM's architecture).

    DINOv2's published `image_size` is 518 (a 37x37 position table); COMM runs it at CLIP's 336 px (24x24 patches),
    so its config is set to 336, which gives the 1 + 576 position table that resampling the published one once (as
    `comm_vlm.resolution.at_resolution` does when assembling) leaves.
    """
    return {
        "vision_config": load_vision_config(CLIP_L_336),
        "secondary_vision_config": load_vision_config(DINOV2_L, image_size=COMM_IMAGE_SIZE),
        "text_config": load_published_config(VICUNA_7B),
    }


def published_build(name: str) -> PretrainedConfig:
    """The config of the paper-scale build `name` (a key of `PUBLISHED_BUILDS`), from the published fixtures."""
    family = get_family(PUBLISHED_BUILDS[name][0])
    if name == "llava-1.5-7b":
        return family.config_class(**llava_15_branch())
    if name == "comm-7b":
        return family.config_class(**comm_7b_fields())
    if name in ("m3-llava-1.5-7b", "combiner-llava-1.5-7b"):
        # The family's defaults are LLaVA-1.5's branch; only the published encoder and LLM are given.
        branch = llava_15_branch()
        return family.config_class(
            vision_config=branch["vision_config"],
            text_config=branch["text_config"],
            image_token_index=branch["image_token_index"],
        )
    if name == "comm-siglip-so400m":
        siglip, dinov2 = load_vision_config(SIGLIP_SO400M), load_vision_config(DINOV2_L)
        dinov2.image_size = siglip.image_size // siglip.patch_size * dinov2.patch_size  # 27 x 14 = 378 px, 27x27
        return family.config_class(
            vision_config=siglip,
            secondary_vision_config=dinov2,
            text_config=load_published_config(VICUNA_7B),
        )
    raise ValueError(f"Unknown build {name!r}; use one of {sorted(PUBLISHED_BUILDS)}.")


def _numel(modules: list[nn.Module | None]) -> int:
    return sum(p.numel() for module in modules if module is not None for p in module.parameters())


def component_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per component of a COMM-family model or of transformers' `LlavaForConditionalGeneration`.

    Returns:
        `dict` with `vision_tower`, `secondary_vision_tower`, `merges`, `aligners`, `projector`, `combiner`, `llm`
        (the decoder and `lm_head`) and `total` (every parameter once, `model.parameters()`); a component the model
        lacks counts 0. The components sum to `total` for these models (no parameter is shared between them).
    """
    inner = model.model
    connector = getattr(inner, "connector", None)
    counts = {
        "vision_tower": _numel([inner.vision_tower]),
        "secondary_vision_tower": _numel([getattr(inner, "secondary_vision_tower", None)]),
        "merges": _numel([getattr(connector, "merges", None)]),
        "aligners": _numel([getattr(connector, "aligners", None)]),
        "projector": _numel([inner.multi_modal_projector]),
        "combiner": _numel([getattr(inner, "combiner", None)]),
        "llm": _numel([inner.language_model, model.lm_head]),
    }
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def format_counts(counts: dict[str, int]) -> str:
    """`counts` of `component_counts` as one line, in millions of parameters."""
    return ", ".join(f"{key} {value / 1e6:,.3f}M" for key, value in counts.items())
