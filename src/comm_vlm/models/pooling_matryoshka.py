"""Matryoshka visual token selection: nested token sets from the projected g x g grid (M3, Cai et al. 2024).

"Matryoshka Multimodal Models" (arXiv 2405.17430) derives coarse visual tokens from fine ones: on LLaVA-1.5's 24 x 24
grid, 2x2 average pooling with stride 2 repeatedly (12x12, 6x6, 3x3), then 3x3 pooling to one token. As in the
official code this runs on the projected features (after the MLP projector), as one `avg_pool2d` with
kernel = stride = g / sqrt(S); for the paper's scales that equals the cascade, and every coarse token is the mean of
the fine tokens it covers (the sets are nested). Row-major order of each pooled grid is kept.

The paper's token-selection ablations are here too: `spatial` keeps one token per g/sqrt(S) block (its centre
`(k // 2, k // 2)`), `sequential` keeps the first S tokens in row-major order.

torch only, so that it can ship as remote code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .configuration_matryoshka import TOKEN_SELECTIONS, check_matryoshka_scale


def select_visual_tokens(features: torch.Tensor, scale: int, method: str = "avg_pool") -> torch.Tensor:
    """Reduces a row-major square grid of visual tokens to `scale` tokens.

    Args:
        features (`torch.Tensor` of shape `(num_images, g * g, hidden_size)`): projected visual tokens, row-major.
        scale (`int`): tokens to keep; a square s*s with s dividing g (see `check_matryoshka_scale`).
        method (`str`): `avg_pool` (M3), `spatial` or `sequential` (the paper's ablations).

    Returns:
        `torch.Tensor` of shape `(num_images, scale, hidden_size)`, row-major over the s x s grid. At `scale = g * g`
        the input is returned unchanged (no pooling op runs).

    Raises:
        ValueError: the token count is not a square grid, `scale` is invalid for it (the message lists the valid
            scales), or `method` is unknown.
    """
    if method not in TOKEN_SELECTIONS:
        raise ValueError(f"Unknown token selection {method!r}; use one of {TOKEN_SELECTIONS}.")
    num_images, num_tokens, hidden_size = features.shape
    grid = math.isqrt(num_tokens)
    if grid * grid != num_tokens:
        raise ValueError(
            f"Matryoshka token selection needs a square grid of visual tokens, got {num_tokens}; use "
            "vision_feature_select_strategy='default' so CLS/register tokens are dropped."
        )
    kernel = check_matryoshka_scale(scale, grid)
    if kernel == 1:
        return features
    if method == "sequential":
        return features[:, :scale]
    side = grid // kernel
    if method == "spatial":
        offset = kernel // 2
        grid_tokens = features.view(num_images, grid, grid, hidden_size)
        return grid_tokens[:, offset::kernel, offset::kernel].reshape(num_images, scale, hidden_size)
    # (N, g*g, D) -> (N, D, g, g) -> avg_pool2d -> (N, D, s, s) -> (N, s*s, D)
    grid_tokens = features.transpose(1, 2).reshape(num_images, hidden_size, grid, grid)
    pooled = F.avg_pool2d(grid_tokens, kernel_size=kernel, stride=kernel)
    return pooled.reshape(num_images, hidden_size, side * side).transpose(1, 2)


def nested_visual_tokens(
    features: torch.Tensor, scales: list[int], method: str = "avg_pool"
) -> dict[int, torch.Tensor]:
    """All requested token sets from one projected grid: `{scale: (num_images, scale, hidden_size)}`.

    Args:
        features (`torch.Tensor` of shape `(num_images, g * g, hidden_size)`): projected visual tokens.
        scales (`list[int]`): scales to produce (each valid for the grid).
        method (`str`): token selection (see `select_visual_tokens`).
    """
    return {scale: select_visual_tokens(features, scale, method) for scale in sorted(set(scales))}


__all__ = ["nested_visual_tokens", "select_visual_tokens"]
