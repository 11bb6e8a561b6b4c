"""The model families: a registry of their config, model and processor classes, and their processors.

A family is named by its `model_type` (`comm`, `matryoshka_llava`, `adaptive_combiner`, `matryoshka_llava_next`).
Code that builds, converts, assembles or trains a model looks its classes up here instead of branching on the name.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from .chat_templates import CHAT_TEMPLATE
from .models.configuration_combiner import AdaptiveCombinerConfig
from .models.configuration_comm import CommConfig
from .models.configuration_matryoshka import MatryoshkaLlavaConfig
from .models.configuration_matryoshka_next import MatryoshkaLlavaNextConfig
from .models.modeling_combiner import AdaptiveCombinerForConditionalGeneration, AdaptiveCombinerModel
from .models.modeling_comm import CommForConditionalGeneration, CommModel
from .models.modeling_matryoshka import MatryoshkaLlavaForConditionalGeneration, MatryoshkaLlavaModel
from .models.modeling_matryoshka_next import MatryoshkaLlavaNextForConditionalGeneration, MatryoshkaLlavaNextModel
from .models.processing_comm import CommProcessor
from .models.processing_matryoshka import MatryoshkaLlavaProcessor
from .models.processing_matryoshka_next import MatryoshkaLlavaNextProcessor


@dataclass(frozen=True)
class Family:
    """The classes of one model family."""

    config_class: type
    base_model_class: type
    model_class: type
    processor_class: type


FAMILIES: dict[str, Family] = {
    "comm": Family(CommConfig, CommModel, CommForConditionalGeneration, CommProcessor),
    "matryoshka_llava": Family(
        MatryoshkaLlavaConfig, MatryoshkaLlavaModel, MatryoshkaLlavaForConditionalGeneration, MatryoshkaLlavaProcessor
    ),
    "adaptive_combiner": Family(
        AdaptiveCombinerConfig, AdaptiveCombinerModel, AdaptiveCombinerForConditionalGeneration, CommProcessor
    ),
    "matryoshka_llava_next": Family(
        MatryoshkaLlavaNextConfig,
        MatryoshkaLlavaNextModel,
        MatryoshkaLlavaNextForConditionalGeneration,
        MatryoshkaLlavaNextProcessor,
    ),
}


def get_family(name: str) -> Family:
    """The classes of family `name`; raises `ValueError` naming the known families for any other name."""
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; use one of {sorted(FAMILIES)}.")
    return FAMILIES[name]


def check_config_fields(family: str, fields: dict[str, Any]) -> None:
    """Raises `ValueError` for keys of `fields` that are not fields of the family's config (a typo would otherwise be
    stored as an unused attribute), naming the closest known fields."""
    import difflib

    known = set(get_family(family).config_class.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        hints = {k: difflib.get_close_matches(k, known, n=2) for k in unknown}
        detail = "; ".join(f"{k!r}" + (f" (did you mean {' or '.join(v)}?)" if v else "") for k, v in hints.items())
        raise ValueError(f"Not a field of the {family} config: {detail}. See its config class's docstring.")


def clip_image_processor(image_size: int = 336):
    """CLIP's image processor (resize the shortest edge, center crop, CLIP normalisation) at `image_size`, as
    LLaVA-1.5 and COMM preprocess; the PIL backend when torchvision is not installed (torchvision stays optional)."""
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import CLIPImageProcessor as processor_class
    else:
        from transformers import CLIPImageProcessorPil as processor_class
    return processor_class(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def anyres_image_processor(config: Any, image_processor: Any = None):
    """LLaVA-NeXT's image processor (anyres tiles of `config.vision_config.image_size` on `config.image_grid_pinpoints`
    plus a base view) with the normalisation of `image_processor` (e.g. a CLIP one; CLIP's when `None`); the PIL
    backend when torchvision is not installed. An anyres processor passes through unchanged."""
    if hasattr(image_processor, "image_grid_pinpoints"):
        return image_processor
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import LlavaNextImageProcessor as processor_class
    else:
        from transformers import LlavaNextImageProcessorPil as processor_class
    tile = config.vision_config.image_size
    base = image_processor or clip_image_processor(tile)
    return processor_class(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        image_mean=list(base.image_mean),
        image_std=list(base.image_std),
    )


def family_processor(family: str, config: Any, image_processor: Any, tokenizer: Any, chat_template: str | None = None):
    """The processor of `family` for a model `config`: its visual tokens per image (the combiner's latents, else the
    grid) and, for M3, its scales. `chat_template` defaults to Vicuna-v1's (`chat_templates.CHAT_TEMPLATE`). For
    `matryoshka_llava_next`, `image_processor` is made an anyres one (`anyres_image_processor`)."""
    if family == "matryoshka_llava_next":
        return get_family(family).processor_class(
            image_processor=anyres_image_processor(config, image_processor),
            tokenizer=tokenizer,
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            chat_template=chat_template or CHAT_TEMPLATE,
            matryoshka_scales=config.matryoshka_scales,
            matryoshka_default_scale=config.matryoshka_default_scale,
        )
    kwargs = {}
    if family == "matryoshka_llava":
        kwargs = {
            "matryoshka_scales": config.matryoshka_scales,
            "matryoshka_default_scale": config.matryoshka_default_scale,
        }
    return get_family(family).processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=getattr(config, "combiner_num_latents", config.image_seq_length),
        chat_template=chat_template or CHAT_TEMPLATE,
        **kwargs,
    )


__all__ = [
    "FAMILIES",
    "Family",
    "anyres_image_processor",
    "check_config_fields",
    "clip_image_processor",
    "family_processor",
    "get_family",
]
