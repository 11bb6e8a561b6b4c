"""Multi-level feature merging (MFM) and aligners of COMM (Jiang et al. 2023, arXiv 2310.08825, section 3).

Every merge takes the selected layers of one encoder stacked as `(L, B, N, C)` (L layers, B images, N patch tokens,
width C) and returns `(B, N, C_out)`. Per-layer modules (LLN, Conv) keep their parameters stacked along a leading
layer axis, one slice per layer, so the whole merge runs as a few batched ops instead of a Python loop over layers:

    single            z_k
    mean              (1/L) sum_i z_i                                   (Mean(all), Mean(half), Mean(19-24))
    layerscale        sum_i w_i z_i,            w = softmax(logits)     (weights sum to 1)
    lln_layerscale    sum_i w_i Linear_i(LN_i(z_i))
    conv_layerscale   sum_i w_i BN_i(Conv_i(z_i)), Conv_i over the patch grid

The paper says the layer weights "are updated dynamically and sum to 1"; we parametrise them as a softmax over
learnable logits initialised equal (w_i = 1/L at start).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


class SingleLayerMerge(nn.Module):
    """z_k: the one selected layer (LLaVA uses the penultimate)."""

    def __init__(self, num_layers: int, hidden_size: int, **kwargs):
        super().__init__()
        self.output_size = hidden_size

    def forward(self, layer_features: torch.Tensor) -> torch.Tensor:
        return layer_features[0]  # (L=1, B, N, C) -> (B, N, C)


class MeanMerge(nn.Module):
    """(1/L) sum_i z_i over the selected layers."""

    def __init__(self, num_layers: int, hidden_size: int, **kwargs):
        super().__init__()
        self.output_size = hidden_size

    def forward(self, layer_features: torch.Tensor) -> torch.Tensor:
        return layer_features.mean(dim=0)  # (L, B, N, C) -> (B, N, C)


class LayerscaleMerge(nn.Module):
    """sum_i w_i z_i with w = softmax(layer_logits), so the weights are positive and sum to 1."""

    def __init__(self, num_layers: int, hidden_size: int, **kwargs):
        super().__init__()
        self.output_size = hidden_size
        self.layer_logits = nn.Parameter(torch.zeros(num_layers))

    @property
    def layer_weights(self) -> torch.Tensor:
        return self.layer_logits.softmax(dim=0)  # (L,)

    def transform(self, layer_features: torch.Tensor) -> torch.Tensor:
        return layer_features

    def forward(self, layer_features: torch.Tensor) -> torch.Tensor:
        aligned = self.transform(layer_features)  # (L, B, N, C_out)
        weights = self.layer_weights.to(aligned.dtype)
        return torch.tensordot(weights, aligned, dims=1)  # (B, N, C_out)


class LLNLayerscaleMerge(LayerscaleMerge):
    """sum_i w_i Linear_i(LayerNorm_i(z_i)): one LayerNorm and one Linear per layer, stored stacked.

    Parameters: `norm_weight`/`norm_bias` (L, C) and `linear_weight` (L, C_out, C) / `linear_bias` (L, C_out);
    slice `i` is layer i's LayerNorm / Linear (same layout as `nn.LayerNorm` / `nn.Linear`).
    """

    def __init__(self, num_layers: int, hidden_size: int, output_size: int | None = None, eps: float = 1e-5, **kwargs):
        super().__init__(num_layers, hidden_size)
        self.output_size = output_size or hidden_size
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.ones(num_layers, hidden_size))
        self.norm_bias = nn.Parameter(torch.zeros(num_layers, hidden_size))
        self.linear_weight = nn.Parameter(torch.empty(num_layers, self.output_size, hidden_size))
        self.linear_bias = nn.Parameter(torch.empty(num_layers, self.output_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init, applied to each layer's slice.
        bound = 1 / math.sqrt(self.linear_weight.shape[-1])
        nn.init.uniform_(self.linear_weight, -bound, bound)
        nn.init.uniform_(self.linear_bias, -bound, bound)

    def transform(self, layer_features: torch.Tensor) -> torch.Tensor:
        num_layers, batch, tokens, width = layer_features.shape
        normed = F.layer_norm(layer_features, (width,), eps=self.eps)
        normed = torch.addcmul(self.norm_bias[:, None, None], normed, self.norm_weight[:, None, None])  # (L, B, N, C)
        projected = torch.baddbmm(
            self.linear_bias[:, None],  # (L, 1, C_out)
            normed.reshape(num_layers, batch * tokens, width),  # (L, B*N, C)
            self.linear_weight.transpose(1, 2),  # (L, C, C_out)
        )
        return projected.view(num_layers, batch, tokens, self.output_size)


class ConvLayerscaleMerge(LayerscaleMerge):
    """sum_i w_i BN_i(Conv_i(z_i)): a per-layer 2D convolution over the patch grid and batch norm.

    The L convolutions run as one grouped convolution (groups = L) and the L batch norms as one `BatchNorm2d` over
    L * C_out channels, which is exactly per-layer since batch norm is per channel. The kernel size is our choice
    (the paper does not give it): `merge_conv_kernel_size`, default 3, "same" padding.
    """

    def __init__(
        self, num_layers: int, hidden_size: int, output_size: int | None = None, kernel_size: int = 3, **kwargs
    ):
        super().__init__(num_layers, hidden_size)
        self.num_layers = num_layers
        self.output_size = output_size or hidden_size
        self.conv = nn.Conv2d(
            num_layers * hidden_size,
            num_layers * self.output_size,
            kernel_size,
            padding=kernel_size // 2,
            groups=num_layers,
        )
        self.norm = nn.BatchNorm2d(num_layers * self.output_size)

    def transform(self, layer_features: torch.Tensor) -> torch.Tensor:
        num_layers, batch, tokens, width = layer_features.shape
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"conv_layerscale needs a square patch grid, got {tokens} tokens.")
        grid = layer_features.permute(1, 0, 3, 2).reshape(batch, num_layers * width, side, side)  # (B, L*C, H, W)
        grid = self.norm(self.conv(grid))  # (B, L*C_out, H, W)
        grid = grid.view(batch, num_layers, self.output_size, tokens)
        return grid.permute(1, 0, 3, 2)  # (L, B, N, C_out)


MERGE_REGISTRY: dict[str, type[nn.Module]] = {
    "single": SingleLayerMerge,
    "mean": MeanMerge,
    "layerscale": LayerscaleMerge,
    "lln_layerscale": LLNLayerscaleMerge,
    "conv_layerscale": ConvLayerscaleMerge,
}


class IdentityAligner(nn.Identity):
    def __init__(self, hidden_size: int, **kwargs):
        super().__init__()
        self.output_size = hidden_size


class LinearAligner(nn.Linear):
    def __init__(self, hidden_size: int, **kwargs):
        super().__init__(hidden_size, hidden_size)
        self.output_size = hidden_size


class MLPAligner(nn.Sequential):
    """`depth` linear layers C -> r*C -> ... -> r*C -> C with activations between (COMM's DINOv2 aligner: 2, 8)."""

    def __init__(self, hidden_size: int, depth: int = 2, ratio: int = 8, hidden_act: str = "gelu", **kwargs):
        widths = [hidden_size] + [hidden_size * ratio] * (depth - 1) + [hidden_size]
        layers: list[nn.Module] = []
        for i in range(depth):
            if i > 0:
                layers.append(ACT2FN[hidden_act])
            layers.append(nn.Linear(widths[i], widths[i + 1]))
        super().__init__(*layers)
        self.output_size = hidden_size


ALIGNER_REGISTRY: dict[str, type[nn.Module]] = {
    "identity": IdentityAligner,
    "linear": LinearAligner,
    "mlp": MLPAligner,
}


def build_merge(strategy: str, num_layers: int, hidden_size: int, output_size: int | None, kernel_size: int):
    return MERGE_REGISTRY[strategy](num_layers, hidden_size, output_size=output_size, kernel_size=kernel_size)


def build_aligner(kind: str, hidden_size: int, depth: int, ratio: int, hidden_act: str):
    return ALIGNER_REGISTRY[kind](hidden_size, depth=depth, ratio=ratio, hidden_act=hidden_act)
