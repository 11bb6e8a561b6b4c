"""A learned per-image scale selector for Matryoshka-LLaVA (M3): `generate(..., matryoshka_scale="auto")`.

M3 (Cai et al. 2024, arXiv 2405.17430, Sec. 4.2) shows that an oracle choosing, per sample, the fewest visual tokens
that still answer correctly beats the full-token model with a fraction of the tokens, and names a learned scale
predictor as future work. This module is such a predictor:

    features per image:  image = [mean ; std] over the tokens of the image's full projected grid, `(N, 2D)` (the
                                 mean is the 1-token scale; the per-channel std says how much the grid varies
                                 across space, i.e. how much a coarse scale averages away)
                         text  = mean of the LLM input embeddings of its prompt's text tokens (image placeholders
                                 and padding excluded), `(N, D)`
    selector:            [LN(mean) ; LN(std) ; LN(text)] -> Linear(3D, width) -> GELU -> Linear(width, K)
                         -> sigmoid: P(correct at scale k) for each of the K trained scales

It is trained with per-scale binary cross-entropy against the per-sample, per-scale correctness of an evaluation
(`comm-vlm train-scale-selector`, `comm_vlm.evaluation.scale_selection`).

**Decision rule** (our choice): an image gets the *smallest* scale whose predicted P(correct) is within `margin` of
the best scale's predicted P(correct), `min{k : p_k >= max_j p_j - margin}`. `margin` (`config.
matryoshka_scale_selector["margin"]`, in [0, 1]) is the operating point: 0 picks the most likely scale (ties to the
smaller), larger values spend fewer tokens for a bounded predicted loss of accuracy, 1 always picks the smallest.

**Cost** at LLaVA-1.5-7B size (D = 4096, K = 5, width 256): the MLP is 2 * (3D * 256 + 256 * K) ~ 6.3 MFLOPs; the
grid's mean and std (576 tokens of width D, ~ 4 FLOPs per element) ~ 9.4 MFLOPs, the text mean (~ 60 tokens) ~ 0.25
MFLOPs and the three LayerNorms ~ 0.1 MFLOPs, so ~ 1.6e7 FLOPs per image. A prefill of T tokens costs ~ 2 * 6.7e9 *
T FLOPs: ~ 1.3e10 for a single token, ~ 9.4e11 for a scale-9 prompt of ~ 70 tokens; the selector is ~ 1.2e-3 of one
token's prefill and ~ 1.7e-5 of that prompt's. The vision tower runs once: the selector reads the full grid that the
chosen scale is then pooled from. Parameters: 3D * 256 + 256 + 256 * K + K + 6D (norms) ~ 3.17M (0.05 % of 7B).

This file is self-contained (torch, transformers and the standard library only) so that it can ship as remote code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .configuration_matryoshka import AUTO_SCALE


class MatryoshkaScaleSelector(nn.Module):
    """Predicts, per image, the probability that the model answers correctly at each trained scale.

    Args:
        hidden_size (`int`): width D of the LLM's input embeddings (= the projected visual tokens).
        scales (`Sequence[int]`): the K scales it predicts for, ascending.
        width (`int`): hidden width of the 2-layer MLP.
    """

    def __init__(self, hidden_size: int, scales: Sequence[int], width: int = 256):
        super().__init__()
        self.scales = sorted(int(s) for s in scales)
        self.mean_norm = nn.LayerNorm(hidden_size)
        self.std_norm = nn.LayerNorm(hidden_size)
        self.text_norm = nn.LayerNorm(hidden_size)
        self.fc1 = nn.Linear(3 * hidden_size, width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(width, len(self.scales))

    def forward(self, image_summary: torch.Tensor, text_summary: torch.Tensor) -> torch.Tensor:
        """Per-scale logits of P(correct).

        Args:
            image_summary (`torch.Tensor` of shape `(N, 2D)`): per image, the mean and the std over the tokens of its
                projected grid, concatenated.
            text_summary (`torch.Tensor` of shape `(N, D)`): mean text embedding of each image's prompt.

        Returns:
            `torch.Tensor` of shape `(N, K)`: logits, one per scale of `self.scales`.
        """
        dtype = self.fc1.weight.dtype
        mean, std = image_summary.to(dtype).chunk(2, dim=-1)
        features = torch.cat([self.mean_norm(mean), self.std_norm(std), self.text_norm(text_summary.to(dtype))], -1)
        return self.fc2(self.act(self.fc1(features)))

    def choose(self, probabilities: torch.Tensor, margin: float) -> list[int]:
        """The decision rule: per image, the smallest scale with P(correct) >= max P(correct) - `margin`.

        Args:
            probabilities (`torch.Tensor` of shape `(N, K)`): predicted P(correct) per scale.
            margin (`float`): the operating point, in [0, 1].

        Returns:
            `list[int]`: N scales (visual tokens per image).
        """
        return choose_scales(probabilities, self.scales, margin)


def choose_scales(probabilities: torch.Tensor, scales: Sequence[int], margin: float) -> list[int]:
    """`min{k : p_k >= max_j p_j - margin}` per row, as scales.

    Args:
        probabilities (`torch.Tensor` of shape `(N, K)`): P(correct) per scale, columns in ascending `scales` order.
        scales (`Sequence[int]`): the K scales, ascending.
        margin (`float`): the operating point, in [0, 1].
    """
    if probabilities.numel() == 0:
        return []
    best = probabilities.max(dim=-1, keepdim=True).values
    good = probabilities >= best - margin
    first = good.float().argmax(dim=-1)  # first True column: the smallest scale within the margin
    return [int(scales[i]) for i in first.tolist()]


def is_auto_scale(scale: object) -> bool:
    """Whether a `matryoshka_scale` request asks for the selector: `"auto"`, or a list of `"auto"` (what a batching
    `pipeline` collates from the processor's per-prompt `matryoshka_scale="auto"`)."""
    if isinstance(scale, (list, tuple)) and scale:
        return all(s == AUTO_SCALE for s in scale)
    return isinstance(scale, str) and scale == AUTO_SCALE


def refuse_auto_in_forward(scale: object) -> None:
    """Raises a `ValueError` when a forward pass (not `generate`) is asked for `matryoshka_scale="auto"`."""
    if is_auto_scale(scale):
        raise ValueError(
            'matryoshka_scale="auto" is chosen per image by `generate`, which re-lays the prompt for the chosen '
            "scales; a forward pass takes the placeholders as they are. Call `model.generate(**inputs)`, or build "
            "the inputs with an integer scale (the processor's `matryoshka_scale=S`) for "
            "a forward pass."
        )


def text_summaries(
    embeddings: torch.Tensor,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    image_token_id: int,
) -> torch.Tensor:
    """Mean input embedding of every row's text tokens (image placeholders and padding excluded).

    Args:
        embeddings (`torch.Tensor` of shape `(B, T, D)`): the LLM's input embeddings of `input_ids`.
        input_ids (`torch.LongTensor` of shape `(B, T)`).
        attention_mask (`torch.Tensor` of shape `(B, T)`, *optional*): 0 marks padding.
        image_token_id (`int`): the image placeholder id.

    Returns:
        `torch.Tensor` of shape `(B, D)` (float32).
    """
    keep = input_ids != image_token_id
    if attention_mask is not None:
        keep &= attention_mask.bool()
    weights = keep.to(torch.float32).unsqueeze(-1)
    return (embeddings.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def selector_features(
    model: nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    full_grid: torch.Tensor,
    images_per_row: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selector's inputs for every image of a batch.

    Args:
        model (`MatryoshkaLlavaForConditionalGeneration`): gives the input embeddings and the image token id.
        input_ids (`torch.LongTensor` of shape `(B, T)`): the prompts (placeholders at any scale).
        attention_mask (`torch.Tensor` of shape `(B, T)`, *optional*).
        full_grid (`torch.Tensor` of shape `(N, g * g, D)`): every image's projected grid, in order.
        images_per_row (`Sequence[int]`): images of each row (summing to N).

    Returns:
        `(image_summary, text_summary)`: `torch.Tensor`s of shape `(N, 2D)` (each grid's per-channel mean and std over
        its tokens) and `(N, D)`, float32.
    """
    if sum(images_per_row) != full_grid.shape[0]:
        raise ValueError(
            f"The prompts hold {sum(images_per_row)} images but {full_grid.shape[0]} were encoded; pass one image per "
            "image placeholder run."
        )
    embeddings = model.get_input_embeddings()(input_ids)
    text = text_summaries(embeddings, input_ids, attention_mask, model.config.image_token_id)
    rows = torch.repeat_interleave(
        torch.arange(len(images_per_row), device=text.device),
        torch.tensor(list(images_per_row), device=text.device),
    )
    grid = full_grid.float()
    return torch.cat([grid.mean(dim=1), grid.std(dim=1, unbiased=False)], dim=-1), text[rows]


def selector_grids(
    model: nn.Module, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
) -> torch.Tensor:
    """The projected grid the selector reads for every image, `(N, g * g, D)`: the full grid of an M3 model, or for
    Matryoshka-LLaVA-NeXT the base view (the whole image at one tile's resolution; our choice: one grid per image
    whatever its tiling, the same input as on LLaVA-1.5)."""
    encode_tiles = getattr(model.model, "encode_tiles", None)
    if encode_tiles is not None:
        tiles, _ = encode_tiles(pixel_values, image_sizes)
        return torch.stack([image_tiles[0] for image_tiles in tiles])
    return torch.stack(list(model.model.get_image_features(pixel_values, return_dict=True).pooler_output))


def build_scale_selector(config) -> MatryoshkaScaleSelector | None:
    """The selector `config.matryoshka_scale_selector` describes (`None` when unset)."""
    spec = getattr(config, "matryoshka_scale_selector", None)
    if spec is None:
        return None
    return MatryoshkaScaleSelector(config.text_config.hidden_size, spec["scales"], spec["width"])


@torch.no_grad()
def auto_image_scales(
    model: nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    full_grid: torch.Tensor,
    images_per_row: Sequence[int],
    margin: float | None = None,
) -> list[int]:
    """Every image's scale chosen by `model.scale_selector` (`generate(..., matryoshka_scale="auto")`).

    Args:
        model (`MatryoshkaLlavaForConditionalGeneration`): with a trained `scale_selector`.
        input_ids, attention_mask, full_grid, images_per_row: as for [`selector_features`].
        margin (`float`, *optional*): the operating point (default: `config.matryoshka_scale_selector["margin"]`).

    Returns:
        `list[int]`: one scale per image, in order.

    Raises:
        ValueError: the model has no selector (the message says how to train one).
    """
    selector = getattr(model, "scale_selector", None)
    if selector is None:
        raise ValueError(
            'matryoshka_scale="auto" needs a learned scale selector, and this model has none '
            "(`config.matryoshka_scale_selector` is None). Train one on an evaluation split with "
            "`comm-vlm train-scale-selector --model DIR --data EVAL.jsonl --task vqa --output-dir OUT` (or "
            "`comm_vlm.evaluation.scale_selection.train_scale_selector`) and load OUT; or pass an integer scale."
        )
    if margin is None:
        margin = model.config.matryoshka_scale_selector["margin"]
    image_summary, text_summary = selector_features(model, input_ids, attention_mask, full_grid, images_per_row)
    probabilities = torch.sigmoid(selector(image_summary, text_summary).float())
    return selector.choose(probabilities, margin)


__all__ = [
    "MatryoshkaScaleSelector",
    "auto_image_scales",
    "build_scale_selector",
    "choose_scales",
    "is_auto_scale",
    "refuse_auto_in_forward",
    "selector_features",
    "selector_grids",
    "text_summaries",
]
