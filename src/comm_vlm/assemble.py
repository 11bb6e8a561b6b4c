"""Assemble a COMM-family model from pretrained parts (encoders + causal LM) by repo id or local directory.

    model, processor = assemble_comm(
        vision="openai/clip-vit-large-patch14-336",
        secondary_vision="facebook/dinov2-large",
        text="lmsys/vicuna-7b-v1.5",
    )

The encoders' and the LLM's weights are loaded as published; the merge, aligner and projector modules are freshly
initialised (stage 1 trains them). The tokenizer gains the `<image>` token (embeddings resized) and, when it has no
chat template, the Vicuna-v1 template LLaVA-1.5 and COMM use. Works offline (`HF_HUB_OFFLINE=1`) from local directories
or a populated hub cache.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.utils import logging

from .chat_templates import CHAT_TEMPLATE as VICUNA_CHAT_TEMPLATE
from .models.configuration_comm import CommConfig
from .models.modeling_comm import CommForConditionalGeneration
from .models.processing_comm import CommProcessor


logger = logging.get_logger(__name__)


def _vision_config(name_or_path: str | os.PathLike) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(name_or_path)
    # CLIP / SigLIP repos hold a two-tower config: keep the vision tower's.
    return getattr(config, "vision_config", None) or config


def _load_vision(name_or_path: str | os.PathLike, config: PretrainedConfig, dtype: torch.dtype) -> dict:
    model_class = MODEL_MAPPING[type(config)]
    return model_class.from_pretrained(name_or_path, config=config, dtype=dtype).state_dict()


def assemble_comm(
    vision: str | os.PathLike,
    text: str | os.PathLike,
    secondary_vision: str | os.PathLike | None = None,
    config_class: type[CommConfig] = CommConfig,
    model_class: type[CommForConditionalGeneration] = CommForConditionalGeneration,
    image_token: str = "<image>",
    dtype: str | torch.dtype = "float32",
    **config_overrides: Any,
) -> tuple[CommForConditionalGeneration, CommProcessor]:
    """Builds `model_class` from pretrained encoders and LLM.

    Args:
        vision: primary encoder (repo id or directory; a CLIP/SigLIP two-tower repo gives its vision tower).
        text: causal LM repo id or directory (its tokenizer is used).
        secondary_vision: optional second encoder (DINOv2 for COMM).
        config_overrides: `CommConfig` fields (layers, merge strategies, aligners, ...).

    Returns:
        `(model, processor)`; the image processor is the primary encoder's.
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tokenizer = AutoTokenizer.from_pretrained(text)
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = VICUNA_CHAT_TEMPLATE

    vision_config = _vision_config(vision)
    secondary_config = _vision_config(secondary_vision) if secondary_vision is not None else None
    text_config = AutoConfig.from_pretrained(text)
    config = config_class(
        vision_config=vision_config,
        secondary_vision_config=secondary_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(image_token),
        **config_overrides,
    )
    model = model_class(config).to(dtype)
    model.model.vision_tower.load_state_dict(_load_vision(vision, vision_config, dtype))
    if secondary_vision is not None:
        model.model.secondary_vision_tower.load_state_dict(_load_vision(secondary_vision, secondary_config, dtype))
    causal_lm = AutoModelForCausalLM.from_pretrained(text, config=text_config, dtype=dtype)
    model.model.language_model.load_state_dict(causal_lm.get_decoder().state_dict())
    model.lm_head.load_state_dict(causal_lm.get_output_embeddings().state_dict())
    del causal_lm
    if len(tokenizer) > config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
        logger.info(f"Resized the LLM's embeddings to {len(tokenizer)} tokens for {image_token!r}.")

    processor = CommProcessor(
        image_processor=AutoImageProcessor.from_pretrained(vision),
        tokenizer=tokenizer,
        num_image_tokens=config.image_seq_length,
        image_token=image_token,
        chat_template=tokenizer.chat_template,
    )
    return model.eval(), processor
