"""Tiny, random-weight, fully offline checkpoints for tests, demos and benchmarks.

Nothing here touches the network: the tokenizer is a byte-level BPE trained in memory on a few sentences and the
models are built from configs. `build_tiny_checkpoint(path, family=...)` saves a model and processor of any family
(COMM: CLIP + DINOv2, multi-level merging; `layout="llava"`: the LLaVA-equivalent configuration), and
`tiny_llava_config()` gives transformers' own `LlavaConfig` with the same sizes, for parity checks. No product module
imports this one; `register_tiny_model_source()` lets recipes name `model: {tiny: comm}` (`tests/recipes/`).
"""

from __future__ import annotations

import os
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .chat_templates import CHAT_TEMPLATE, VICUNA_SYSTEM_PROMPT
from .families import clip_image_processor, family_processor, get_family


IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
IMAGE_TOKEN_ID = SPECIAL_TOKENS.index(IMAGE_TOKEN)


_CORPUS = [
    VICUNA_SYSTEM_PROMPT,
    "USER: What is in the image? ASSISTANT: A red square on a blue background.",
    "USER: Where is the cat? ASSISTANT: The cat is at [0.120,0.305,0.451,0.622].",
    "Describe the image briefly. There is a dog, a person and a car in the picture.",
    "Is there a bottle in the image? Answer yes or no. yes no",
    "0123456789 [ ] , . ? ! : ; ( ) - the a an of in on at to is are",
    # The vocabulary of the synthetic scenes (comm_vlm.demo.synthetic), so their prompts tokenise compactly.
    "Please provide the bounding box coordinate of the region this sentence describes: the large red circle.",
    "Please provide a short description for this region: the small blue square at the top left.",
    "What colour is the triangle? What shape is the green object? How many circles are there? "
    "Answer the question using a single word or phrase.",
    "red blue green yellow purple orange circle square triangle circles squares triangles small large "
    "top bottom left right middle center There are two three four objects and an image of a",
]


def build_tiny_tokenizer(vocab_size: int = 320, with_image_token: bool = True) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer in memory (no download) and attaches the chat template.

    Args:
        vocab_size (`int`): target vocabulary size, special tokens included (ids 0-4 are `SPECIAL_TOKENS`).
        with_image_token (`bool`): `False` gives a plain LLM tokenizer without `<image>` (as published LLMs come).
    """
    special_tokens = SPECIAL_TOKENS if with_image_token else SPECIAL_TOKENS[:-1]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    # Digits split one by one (as Llama's tokenizer does), so every box coordinate "0.123" is the same 5 tokens.
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN} if with_image_token else {},
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    return tokenizer


def tiny_text_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, **overrides: Any) -> dict:
    """A tiny Llama text config (dict form), the LLM family of LLaVA-1.5/COMM/M3 (Vicuna)."""
    cfg = {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": 3,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    cfg.update(overrides)
    return cfg


def tiny_vision_config(model_type: str = "clip_vision_model", **overrides: Any) -> dict:
    """A tiny ViT config of any supported encoder family: 4 layers, width 32, 28 px with patch 7 (a 4x4 grid)."""
    cfg = {
        "model_type": model_type,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "image_size": 28,
        "patch_size": 7,
    }
    if model_type == "vit_mae":
        cfg["mask_ratio"] = 0.0
    cfg.update(overrides)
    if model_type.startswith("dinov2"):
        cfg["mlp_ratio"] = cfg["intermediate_size"] // cfg["hidden_size"]  # DINOv2 sizes its MLP by ratio
    return cfg


def save_tiny_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(path)
    return tokenizer


def tiny_comm_config(layout: str = "comm", vocab_size: int = 320, family: str = "comm", **overrides: Any):
    """A tiny config of a COMM-family model.

    Args:
        layout (`str`): `"comm"` (CLIP all layers LLN-Layerscale + DINOv2 last half LLN-Layerscale + MLP, linear
            projector: COMM's architecture at toy size, whatever the family's own defaults) or `"llava"` (one CLIP
            encoder, penultimate layer, identity aligner, 2-layer MLP projector: LLaVA-1.5's architecture).
        family (`str`): `"comm"`, `"matryoshka_llava"` or `"adaptive_combiner"` (the config class; its own fields
            such as `matryoshka_scales` or `combiner_num_latents` go in `overrides`).
        overrides: any field of the family's config.
    """
    config_class = get_family(family).config_class
    if layout == "comm":
        fields: dict[str, Any] = {
            "vision_config": tiny_vision_config("clip_vision_model"),
            "secondary_vision_config": tiny_vision_config("dinov2"),
            "vision_feature_layer": [1, 2, 3, 4],
            "vision_feature_merge": "lln_layerscale",
            "vision_aligner": "identity",
            "secondary_vision_feature_layer": [3, 4],
            "secondary_vision_feature_merge": "lln_layerscale",
            "secondary_vision_aligner": "mlp",
            "projector_depth": 1,
        }
    elif layout == "llava":
        fields = {
            "vision_config": tiny_vision_config("clip_vision_model"),
            "secondary_vision_config": None,
            "vision_feature_layer": -2,
            "vision_feature_merge": "single",
            "vision_aligner": "identity",
            "projector_depth": 2,
        }
    else:
        raise ValueError(f"Unknown layout {layout!r}; use 'comm' or 'llava'.")
    fields.update(text_config=tiny_text_config(vocab_size), image_token_index=IMAGE_TOKEN_ID)
    fields.update(overrides)
    return config_class(**fields)


# LLaVA-NeXT's five canvases (336 px tiles, up to 2x2) at the tiny tile size of 28 px.
TINY_GRID_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]


def tiny_next_config(vocab_size: int = 320, next_class: bool = False, **overrides: Any):
    """A tiny Matryoshka-LLaVA-NeXT config (4x4 tokens per 28 px tile, LLaVA-NeXT's pinpoints scaled to 28 px tiles);
    with `next_class=True` transformers' `LlavaNextConfig` of the same sizes instead (the parity reference)."""
    from transformers import LlavaNextConfig

    from .models.configuration_matryoshka_next import MatryoshkaLlavaNextConfig

    fields: dict[str, Any] = {
        "vision_config": tiny_vision_config("clip_vision_model"),
        "text_config": tiny_text_config(vocab_size),
        "image_token_index": IMAGE_TOKEN_ID,
        "image_grid_pinpoints": TINY_GRID_PINPOINTS,
    }
    fields.update(overrides)
    return (LlavaNextConfig if next_class else MatryoshkaLlavaNextConfig)(**fields)


def tiny_llava_config(vocab_size: int = 320, **overrides: Any):
    """transformers' `LlavaConfig` with the sizes of `tiny_comm_config("llava")`."""
    from transformers import LlavaConfig

    fields: dict[str, Any] = {
        "vision_config": tiny_vision_config("clip_vision_model"),
        "text_config": tiny_text_config(vocab_size),
        "image_token_index": IMAGE_TOKEN_ID,
        "vision_feature_layer": -2,
    }
    fields.update(overrides)
    vision = fields["vision_config"]
    vision = vision if isinstance(vision, dict) else vision.to_dict()
    fields.setdefault("image_seq_length", (vision["image_size"] // vision["patch_size"]) ** 2)
    return LlavaConfig(**fields)


def tiny_image_processor(image_size: int = 28):
    """CLIP's image processor at the tiny models' size."""
    return clip_image_processor(image_size)


def build_tiny_checkpoint(
    path: str | os.PathLike,
    layout: str = "comm",
    seed: int = 0,
    vocab_size: int = 320,
    family: str = "comm",
    chat_template: str | None = None,
    **overrides: Any,
):
    """Builds a random tiny model + processor and saves both to `path` (safetensors). Returns `(model, processor)`.

    Args:
        layout (`str`): `"comm"` or `"llava"` vision branch (see `tiny_comm_config`).
        vocab_size (`int`): size of the in-memory BPE tokenizer and of the LLM's vocabulary.
        family (`str`): `"comm"`, `"matryoshka_llava"`, `"adaptive_combiner"` or `"matryoshka_llava_next"` (on
            `tiny_next_config`, `layout` unused).
        chat_template (`str`, *optional*): the processor's chat template; defaults to `CHAT_TEMPLATE`.
        overrides: fields of the family's config.
    """
    import torch

    torch.manual_seed(seed)
    if family == "matryoshka_llava_next":
        config = tiny_next_config(vocab_size=vocab_size, **overrides)
    else:
        config = tiny_comm_config(layout, vocab_size=vocab_size, family=family, **overrides)
    model_class = get_family(family).model_class
    model = model_class(config).eval()
    processor = family_processor(
        family,
        config,
        tiny_image_processor(config.vision_config.image_size),
        build_tiny_tokenizer(vocab_size),
        chat_template=chat_template,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor


# The vision branch each family's tiny recipe starts from: COMM's own, else LLaVA-1.5's (M3 and the combiner start
# from a LLaVA-1.5 checkpoint).
TINY_FAMILY_LAYOUTS = {
    "comm": "comm",
    "matryoshka_llava": "llava",
    "adaptive_combiner": "llava",
    "matryoshka_llava_next": "llava",  # unused: LLaVA-NeXT has one layout
}


def _tiny_model_source(name: str, source: dict, run_dir):
    """The recipes' `model: {tiny: NAME}`: a random tiny checkpoint built under the run directory. `NAME` is a layout
    (`comm`, `llava`: a `comm`-family model) or a family (`matryoshka_llava`, `adaptive_combiner`, on its layout);
    `family:` and `layout:` keys next to it choose both explicitly, other keys are config fields."""
    from pathlib import Path

    from .training.recipes import MODEL_SOURCES

    fields = {k: v for k, v in source.items() if k not in ("tiny", "family", "layout", "seed", "dtype")}
    family = source.get("family") or (name if name in TINY_FAMILY_LAYOUTS else "comm")
    layout = source.get("layout") or (TINY_FAMILY_LAYOUTS[name] if name in TINY_FAMILY_LAYOUTS else name)
    path = Path(run_dir) / "init"
    build_tiny_checkpoint(path, layout=layout, seed=source.get("seed", 0), family=family, **fields)
    return MODEL_SOURCES["pretrained"](str(path), source, run_dir)


def register_tiny_model_source() -> None:
    """Lets recipes name `model: {tiny: comm}` or `{tiny: matryoshka_llava}` (the test recipes in `tests/recipes/`)."""
    from .training.recipes import register_model_source

    register_model_source("tiny", _tiny_model_source)
