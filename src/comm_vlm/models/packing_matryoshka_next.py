"""Matryoshka-LLaVA-NeXT prompts re-laid at other scales: one scale per call (`relay_prompt`, used by `generate` and
the all-scale loss), or every trained scale for a loss computed outside the model (TRL's `SFTTrainer`).

The model computes the all-scale objective itself when it gets `labels` (one LLM pass per scale, the official loop).
A trainer that scores the logits outside the model (TRL's fused LM head, `CommSFTTrainer.answer_token_loss`) calls it
without `labels`, so the batch must already hold every scale: `relay_next_training_batch` writes each sample once per
trained scale (padded rows, R = B x M), each image run at that scale's token count, and names the image and scale of
every run (`matryoshka_image_index`, `matryoshka_image_scales`) so that the vision tower still runs once per image.
Image placeholders are never targets, so every variant of a sample has the same labelled tokens and the token mean
over the R rows equals the mean over scales of each scale's token mean (the paper's objective).

torch only (and the M3 helpers), so that it can ship as remote code.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from .packing_matryoshka import _as_list, build_scale_batch, split_image_occurrences


def image_runs(
    config: Any,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    image_sizes: Sequence[Sequence[int]],
    scales: Sequence[int],
) -> tuple[list[int], list[int]]:
    """The placeholder tokens of every image at its scale, and how many images each row holds.

    Args:
        config ([`MatryoshkaLlavaNextConfig`]), input_ids (`(B, T)`), attention_mask (`(B, T)`, optional): the batch.
        image_sizes: original (H, W) of every image, in order; scales: tokens per tile of every image.

    Raises:
        ValueError: the placeholder runs cannot be split into those images (see `split_image_occurrences`).
    """
    counts = [config.num_image_tokens(size, s) for size, s in zip(image_sizes, scales)]
    mask = input_ids == config.image_token_id
    if attention_mask is not None:
        mask &= attention_mask.bool()
    return counts, [len(row) for row in split_image_occurrences(mask, len(counts), counts)]


def relay_prompt(
    config: Any,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    labels: torch.LongTensor | None,
    image_sizes: torch.Tensor,
    current: Sequence[int],
    target: Sequence[int],
    padding_side: str = "right",
):
    """Rewrites every image's placeholder run from its tokens at the `current` scales (tokens per tile, one per image)
    to the `target` scales, e.g. for `generate(..., matryoshka_scale=S)` or one scale of the all-scale loss.

    Returns:
        `(input_ids, attention_mask, labels)` of the re-laid batch (`labels` `None` when not given; image
        positions -100).
    """
    sizes = [[int(v) for v in size] for size in image_sizes]
    before, per_row = image_runs(config, input_ids, attention_mask, sizes, current)
    after = [config.num_image_tokens(size, s) for size, s in zip(sizes, target)]
    variants, k = [], 0
    for n in per_row:
        variants.append([after[k : k + n]])
        k += n
    pad_id = config.text_config.pad_token_id
    batch = build_scale_batch(
        input_ids,
        attention_mask,
        labels,
        config.image_token_id,
        variants,
        token_counts=before,
        pad_token_id=0 if pad_id is None else pad_id,
        row_format="padded",
        padding_side=padding_side,
    )
    return batch.input_ids, batch.attention_mask, batch.labels


def relay_next_training_batch(config: Any, batch: dict, training: bool = True) -> dict:
    """Rewrites a collated batch (placeholders at any one scale per image) into rows for every trained scale.

    Args:
        config ([`MatryoshkaLlavaNextConfig`]): the model's config.
        batch (`dict`): `input_ids`, `attention_mask`, `labels` `(B, T)`, `pixel_values`, `image_sizes`
            `(num_images, 2)` and optionally the processor's `matryoshka_image_scales` `(num_images,)`.
        training (`bool`): with `matryoshka_training_mode="random_scale"`, one random scale per sample.

    Returns:
        `dict`: the batch with `input_ids`, `attention_mask`, `labels` `(B * M, L)` (image positions -100),
        `matryoshka_image_scales` and `matryoshka_image_index` `(num_runs,)`; pixels unchanged. A batch without
        images, or already re-laid (`matryoshka_image_index` present), is returned as it is.
    """
    if batch.get("pixel_values") is None or batch.get("matryoshka_image_index") is not None:
        return batch
    sizes = [[int(v) for v in size] for size in batch["image_sizes"]]
    current = _as_list(batch.get("matryoshka_image_scales"))
    input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
    if current is None:  # the one scale whose token count matches the placeholders
        current = [config.placeholder_scale(int((input_ids == config.image_token_id).sum()), sizes)] * len(sizes)
    counts, per_row = image_runs(config, input_ids, attention_mask, sizes, current)
    scales = list(config.matryoshka_scales)
    variants, run_scales, k = [], [], 0
    for n in per_row:
        images = list(range(k, k + n))
        k += n
        sample_scales = (
            [random.choice(scales)] if training and config.matryoshka_training_mode == "random_scale" else scales
        )
        variants.append([[config.num_image_tokens(sizes[i], s) for i in images] for s in sample_scales])
        run_scales += [s for s in sample_scales for _ in images]  # runs in row order: variant by variant
    pad_id = config.text_config.pad_token_id
    relaid = build_scale_batch(
        input_ids,
        attention_mask,
        batch.get("labels"),
        config.image_token_id,
        variants,
        token_counts=counts,
        pad_token_id=0 if pad_id is None else pad_id,
        row_format="padded",
    )
    out = {key: value for key, value in batch.items() if key not in ("input_ids", "attention_mask", "labels")}
    out.update(input_ids=relaid.input_ids, attention_mask=relaid.attention_mask)
    if relaid.labels is not None:
        out["labels"] = relaid.labels
    out["matryoshka_image_index"] = relaid.image_index
    out["matryoshka_image_scales"] = torch.tensor(run_scales, dtype=torch.long)
    expected = [config.num_image_tokens(sizes[i], s) for i, s in zip(relaid.image_index.tolist(), run_scales)]
    if expected != relaid.image_scales.tolist():
        raise ValueError("Internal error: the re-laid runs do not follow the variants' order.")
    return out


__all__ = ["image_runs", "relay_next_training_batch", "relay_prompt"]
