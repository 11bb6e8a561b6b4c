"""Assemble a model of any family from pretrained parts (encoders + causal LM) by repo id or local directory.

    model, processor = assemble_comm(
        vision="openai/clip-vit-large-patch14-336",
        secondary_vision="facebook/dinov2-large",
        text="lmsys/vicuna-7b-v1.5",
    )                                                                  # COMM-7B before stage 1
    model, processor = assemble_comm(vision=..., text=..., family="matryoshka_llava")  # M3 on LLaVA-1.5's branch

or from the shell, saved with its processor, remote code and card:

    comm-vlm assemble OUT --vision openai/clip-vit-large-patch14-336 --secondary-vision facebook/dinov2-large \
        --text lmsys/vicuna-7b-v1.5 [--family comm] [--set projector_depth=2 ...]

The encoders' and the LLM's weights are loaded as published; the merge, aligner, projector (and combiner) modules are
freshly initialised (stage 1 trains them). The model is built on the meta device and the loaded parts are put in place,
so a 7B model never exists twice in memory. Every encoder runs on the primary encoder's image: one with another patch
grid (DINOv2 is published at 518 px, 37x37 patches; CLIP-L-336 gives 24x24) runs at the resolution that gives the
primary's grid (336 px for DINOv2-L), its position table resampled once by its own interpolation
(`comm_vlm.resolution`), so outputs equal the published encoder's at that size and a reload needs no interpolation.
The tokenizer gains the `<image>` token (embeddings resized) and, when it has no chat template, the Vicuna-v1 template
LLaVA-1.5 and COMM use. Works offline (`HF_HUB_OFFLINE=1`) from local directories or a populated hub cache.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.utils import logging

from .chat_templates import CHAT_TEMPLATE as VICUNA_CHAT_TEMPLATE
from .families import check_config_fields, family_processor, get_family
from .models.configuration_comm import patch_grid
from .resolution import at_resolution, resolution_for_grid


logger = logging.get_logger(__name__)


def _vision_config(name_or_path: str | os.PathLike) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(name_or_path)
    # CLIP / SigLIP repos hold a two-tower config: keep the vision tower's.
    return getattr(config, "vision_config", None) or config


def _load_vision(
    name_or_path: str | os.PathLike, config: PretrainedConfig, dtype: torch.dtype, grid: int | None
) -> tuple[nn.Module, PretrainedConfig]:
    """The pretrained encoder (its vision tower for a two-tower repo), run at the size giving a `grid` patch grid."""
    if type(config) not in MODEL_MAPPING:
        raise ValueError(f"{name_or_path}: {config.model_type} has no transformers vision model (AutoModel).")
    encoder = MODEL_MAPPING[type(config)].from_pretrained(name_or_path, config=config, dtype=dtype)
    if grid is None or patch_grid(config) == grid:
        return encoder, config
    return at_resolution(encoder, config, resolution_for_grid(config, grid))


def _initialise_new_modules(model: nn.Module) -> list[str]:
    """Materialises and initialises, with the model's `_init_weights`, every module still on the meta device (the
    connector, projector and combiner). Returns their names."""
    new = []
    for name, module in model.named_modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if own and any(t.is_meta for t in own):
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)
            new.append(name)
    return new


def assemble_comm(
    vision: str | os.PathLike,
    text: str | os.PathLike,
    secondary_vision: str | os.PathLike | None = None,
    family: str = "comm",
    image_token: str = "<image>",
    dtype: str | torch.dtype = "float32",
    **config_overrides: Any,
) -> tuple[nn.Module, Any]:
    """Builds a model of `family` from pretrained encoders and LLM, with the family's own processor.

    Args:
        vision: primary encoder (repo id or directory; a CLIP/SigLIP two-tower repo gives its vision tower). Its image
            processor is the model's.
        text: causal LM repo id or directory (its tokenizer is used).
        secondary_vision: optional second encoder (DINOv2 for COMM), run at the primary's patch grid; without it the
            model has one encoder, whatever the family's default (the encoder study's single-branch models).
        family: `comm`, `matryoshka_llava`, `adaptive_combiner` or `matryoshka_llava_next` (one encoder, LLaVA-NeXT's
            tiles; `image_grid_pinpoints` in `config_overrides`) (`comm_vlm.families.FAMILIES`); each family's
            config defaults apply (M3 and the combiner default to LLaVA-1.5's branch).
        image_token: the image placeholder, added to the tokenizer when missing.
        dtype: of every weight (`"bfloat16"` for a 7B model).
        config_overrides: fields of the family's config (layers, merge strategies, aligners, `matryoshka_*`,
            `combiner_*`, ...).

    Returns:
        `(model, processor)`: the model in eval mode and the family's processor (M3's knows its scales; the
        combiner's writes `combiner_num_latents` placeholders per image).
    """
    classes = get_family(family)
    check_config_fields(family, config_overrides)
    anyres = "secondary_vision_config" not in classes.config_class.__dataclass_fields__  # LLaVA-NeXT's tiles
    if anyres and secondary_vision is not None:
        raise ValueError(f"{family} has one vision encoder (LLaVA-NeXT's); drop `secondary_vision`.")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tokenizer = AutoTokenizer.from_pretrained(text)
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = VICUNA_CHAT_TEMPLATE

    vision_config = _vision_config(vision)
    vision_tower, vision_config = _load_vision(vision, vision_config, dtype, grid=None)
    secondary_tower, secondary_config = None, None
    if secondary_vision is not None:
        secondary_tower, secondary_config = _load_vision(
            secondary_vision, _vision_config(secondary_vision), dtype, grid=patch_grid(vision_config)
        )
    if config_overrides.pop("secondary_vision_config", None) is not None and secondary_vision is None:
        raise ValueError(
            "`secondary_vision_config` names a second encoder but no `secondary_vision` checkpoint was given: pass "
            "`secondary_vision=...` (e.g. facebook/dinov2-large), whose config is read from the checkpoint."
        )
    text_config = AutoConfig.from_pretrained(text)
    fields = dict(vision_config=vision_config, text_config=text_config, **config_overrides)
    if not anyres:
        fields["secondary_vision_config"] = secondary_config
    config = classes.config_class(image_token_index=tokenizer.convert_tokens_to_ids(image_token), **fields)
    with torch.device("meta"):
        model = classes.model_class(config)
    model.model.vision_tower = vision_tower
    if secondary_tower is not None:
        model.model.secondary_vision_tower = secondary_tower
    causal_lm = AutoModelForCausalLM.from_pretrained(text, config=text_config, dtype=dtype)
    model.model.language_model = causal_lm.get_decoder()
    model.lm_head = causal_lm.get_output_embeddings()
    new = _initialise_new_modules(model)
    model.to(dtype)
    logger.info(f"Assembled {classes.model_class.__name__}; freshly initialised: {new}.")
    if len(tokenizer) > config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
        logger.info(f"Resized the LLM's embeddings to {len(tokenizer)} tokens for {image_token!r}.")

    processor = family_processor(
        family, config, AutoImageProcessor.from_pretrained(vision), tokenizer, chat_template=tokenizer.chat_template
    )
    return model.eval(), processor


__all__ = ["assemble_comm"]
