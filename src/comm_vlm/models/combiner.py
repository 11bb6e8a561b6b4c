"""The adaptive combiner of "Joint Adaptive Representations for Image-Language Learning" (Piergiovanni and Angelova
2023, arXiv 2305.19924), as a connector between a vision branch and an LLM.

With X_im the visual tokens (already projected, `P(X_im) = W1 X_im`, by the vision branch's projector) and X_text the
prompt's text embeddings, all of width D:

    f_N  = W2 Attn(X_N, P(X_im))                       # N learned latents attend to the image   (eq. 2)
    t_N  = W2' Attn(X'_N, X_text)                      # their own N latents attend to the text
    P_cr = LN(t) + tanh(alpha) * Attn(LN(t), LN(f))    # gated cross-attention                   (eq. 3)
    F(t, f) = P_cr + tanh(beta) * MLP(P_cr)            # gated MLP
    F_i  = TransformerLayer(F(t_{i-1}, f_N));  t_i = F_i + t_{i-1};  t_0 = t_N     (i = 1..T)
    out  = combine(F_1..F_T)                           # weighted / residual / none

f_N is computed once; only t is iterated (the paper: the initial token reduction is not repeated per iteration).
By default the resamplers follow Perceiver's and DETR's conventions, which eq. 2 leaves out: a LayerNorm on each
modality's input tokens, fixed sine-cosine position codes added to the visual tokens (latent attention is otherwise
blind to where a patch is), and latents kept residually (`X_N + W2 Attn(X_N, X)`). Each can be turned off.
Everything here is `(batch, tokens, D)`; "batch" is one entry per image (each image is fused with its own prompt).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


class CombinerAttention(nn.Module):
    """Standard multi-head attention Phi(query, keys) with a key padding mask (q/k/v/o projections with bias).

    Attention over an empty key set (a row whose mask is all False) returns zeros.
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self, query: torch.Tensor, key_value: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            query (`torch.Tensor` of shape `(B, Q, D)`): queries.
            key_value (`torch.Tensor` of shape `(B, S, D)`): keys and values.
            key_mask (`torch.BoolTensor` of shape `(B, S)`, *optional*): True where a key may be attended to.

        Returns:
            `torch.Tensor` of shape `(B, Q, D)`.
        """
        batch, num_queries, width = query.shape
        q = self.q_proj(query).view(batch, num_queries, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Q, d)
        k = self.k_proj(key_value).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, S, d)
        v = self.v_proj(key_value).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, S, d)
        attn_mask, has_keys = None, None
        if key_mask is not None:
            key_mask = key_mask.to(device=query.device, dtype=torch.bool)
            has_keys = key_mask.any(dim=-1)  # (B,)
            # Rows without keys attend to everything (no NaN from an all -inf softmax) and are zeroed below.
            attn_mask = (key_mask | ~has_keys[:, None])[:, None, None, :]  # (B, 1, 1, S)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, Q, d)
        out = self.o_proj(out.transpose(1, 2).reshape(batch, num_queries, width))  # (B, Q, D)
        if has_keys is not None:
            out = out * has_keys[:, None, None].to(out.dtype)
        return out


class CombinerMLP(nn.Module):
    """Linear(D, ratio * D) -> activation -> Linear(ratio * D, D)."""

    def __init__(self, hidden_size: int, ratio: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size * ratio)
        self.act = ACT2FN[hidden_act]
        self.fc2 = nn.Linear(hidden_size * ratio, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))  # (B, N, D) -> (B, N, ratio * D) -> (B, N, D)


class LatentResampler(nn.Module):
    """N learned latent queries X_N (DETR-style) attend to one modality's tokens: `W2 Attn(X_N, X)` (eq. 2).

    With `residual=True` the queries are kept: `X_N + W2 Attn(X_N, X)`, as DETR's and Perceiver's latents are. At init
    the attention is near-uniform, so eq. 2 alone gives N near-copies of the mean token; the residual keeps the N
    latents distinct from the first step.
    """

    def __init__(self, hidden_size: int, num_latents: int, num_heads: int, residual: bool = True):
        super().__init__()
        self.residual = residual
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_size))  # X_N, (N, D)
        self.attn = CombinerAttention(hidden_size, num_heads)
        self.out_proj = nn.Linear(hidden_size, hidden_size)  # W2

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            tokens (`torch.Tensor` of shape `(B, S, D)`): the modality's tokens.
            mask (`torch.BoolTensor` of shape `(B, S)`, *optional*): True for tokens to attend to.

        Returns:
            `torch.Tensor` of shape `(B, N, D)`.
        """
        # A copy, not an `expand` view: a no-grad view of a parameter trips autograd-based module hooks.
        queries = self.latents.to(tokens.dtype).repeat(tokens.shape[0], 1, 1)  # (B, N, D)
        resampled = self.out_proj(self.attn(queries, tokens, mask))  # (B, N, D)
        return queries + resampled if self.residual else resampled


class SpatialResampler(nn.Module):
    """The paper's "spatial" alternative to latents: adaptive average pooling of the token grid to N tokens, then W2.

    A square `g x g` grid is pooled to `h x w = N` (h the largest divisor of N with h <= sqrt(N), e.g. 8x8 for 64,
    4x8 for 32); tokens that do not form a square grid (CLS kept) are pooled as a sequence. No learned queries.
    """

    def __init__(self, hidden_size: int, num_latents: int):
        super().__init__()
        self.num_latents = num_latents
        self.grid = (pool_height(num_latents), num_latents // pool_height(num_latents))
        self.out_proj = nn.Linear(hidden_size, hidden_size)  # W2

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            tokens (`torch.Tensor` of shape `(B, S, D)`): visual tokens, row-major over the patch grid.
            mask: unused (every visual token is valid); accepted for the resampler interface.

        Returns:
            `torch.Tensor` of shape `(B, N, D)`.
        """
        batch, length, width = tokens.shape
        side = math.isqrt(length)
        channels_first = tokens.transpose(1, 2)  # (B, D, S)
        if side * side == length:
            grid = channels_first.reshape(batch, width, side, side)  # (B, D, g, g)
            pooled = F.adaptive_avg_pool2d(grid, self.grid).flatten(2)  # (B, D, h * w = N)
        else:
            pooled = F.adaptive_avg_pool1d(channels_first, self.num_latents)  # (B, D, N)
        return self.out_proj(pooled.transpose(1, 2))  # (B, N, D)


class TokenProjection(nn.Module):
    """No resampling of the image: every visual token goes to the fusion through W2 (`f = W2 X`, `(B, S_v, D)`).

    Not in the paper, whose eq. 2 reduces the image to N tokens before it meets the prompt: here the text latents'
    cross-attention (eq. 3) reads the whole patch grid, so what a prompt asks for is looked up where it lies. The LLM
    still gets N fused tokens; the cross-attention costs `N x S_v` instead of `N x N`.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.out_proj = nn.Linear(hidden_size, hidden_size)  # W2

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`(B, S_v, D)` visual tokens -> `(B, S_v, D)`; `mask` unused (every visual token is valid)."""
        return self.out_proj(tokens)


def sincos_positions(num_tokens: int, width: int) -> torch.Tensor:
    """Fixed sine-cosine position codes of the visual tokens, `(num_tokens, width)` (MAE's 2D form).

    A square token count is a row-major `g x g` patch grid: half the channels code the row, half the column, each as
    sines and cosines at `width / 4` geometric frequencies. Other counts (e.g. a CLS token kept) are coded as a 1D
    sequence with `width / 2` frequencies. `width` must be divisible by 4.
    """
    side = math.isqrt(num_tokens)
    if side * side == num_tokens:
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        return torch.cat([_sincos(rows.flatten(), width // 2), _sincos(cols.flatten(), width // 2)], dim=-1)
    return _sincos(torch.arange(num_tokens), width)


def _sincos(positions: torch.Tensor, width: int) -> torch.Tensor:
    """`(P,)` integer positions -> `(P, width)`: `[sin(p w_k), cos(p w_k)]` with `w_k = 10000^(-2k / width)`."""
    frequencies = 10000.0 ** (-torch.arange(width // 2, dtype=torch.float64) * 2 / width)  # (width / 2,)
    angles = positions.to(torch.float64)[:, None] * frequencies[None]  # (P, width / 2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()  # (P, width)


def pool_height(num_tokens: int) -> int:
    """Largest divisor h of `num_tokens` with h * h <= num_tokens (the pooled grid is h x num_tokens // h)."""
    return max(h for h in range(1, math.isqrt(num_tokens) + 1) if num_tokens % h == 0)


class CombinerTransformerLayer(nn.Module):
    """A standard pre-LN transformer layer on the N fused tokens: x + SelfAttn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: int, hidden_act: str, eps: float):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden_size, eps=eps)
        self.self_attn = CombinerAttention(hidden_size, num_heads)
        self.post_attention_layernorm = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = CombinerMLP(hidden_size, mlp_ratio, hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)  # (B, N, D)
        hidden_states = hidden_states + self.self_attn(normed, normed)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))  # (B, N, D)


class GatedCrossAttentionBlock(nn.Module):
    """Eq. 3: `P_cr = LN(t) + tanh(alpha) Attn(LN(t), LN(f))`, `F = P_cr + tanh(beta) MLP(P_cr)`.

    With `gating=False` both gates are the constant 1 (the paper's "no gating" ablation). At alpha = beta = 0 the
    block returns LN(t) exactly.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: int, hidden_act: str, eps: float, gating: bool):
        super().__init__()
        self.text_layernorm = nn.LayerNorm(hidden_size, eps=eps)
        self.image_layernorm = nn.LayerNorm(hidden_size, eps=eps)
        self.cross_attn = CombinerAttention(hidden_size, num_heads)
        self.mlp = CombinerMLP(hidden_size, mlp_ratio, hidden_act)
        self.gating = gating
        if gating:
            # (1,), not 0-d: FSDP2 (`fully_shard`) refuses scalar parameters.
            self.attn_gate = nn.Parameter(torch.zeros(1))  # alpha
            self.mlp_gate = nn.Parameter(torch.zeros(1))  # beta

    def gates(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """`(tanh(alpha), tanh(beta))`, or `(1.0, 1.0)` without gating."""
        if not self.gating:
            return 1.0, 1.0
        return torch.tanh(self.attn_gate), torch.tanh(self.mlp_gate)

    def forward(self, text_latents: torch.Tensor, image_latents: torch.Tensor) -> torch.Tensor:
        """
        Args:
            text_latents (`torch.Tensor` of shape `(B, N, D)`): t.
            image_latents (`torch.Tensor` of shape `(B, N_f, D)`): f (N_f = N for latent and spatial resampling,
                the visual token count without resampling).

        Returns:
            `torch.Tensor` of shape `(B, N, D)`: F(t, f).
        """
        attn_gate, mlp_gate = self.gates()
        normed_text = self.text_layernorm(text_latents)  # LN(t), (B, N, D)
        cross = normed_text + attn_gate * self.cross_attn(normed_text, self.image_layernorm(image_latents))  # P_cr
        return cross + mlp_gate * self.mlp(cross)  # (B, N, D)


class FusionStep(nn.Module):
    """One iteration's fusion: `TransformerLayer^L(F(t, f))` with L = `num_layers`."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_layers: int,
        mlp_ratio: int,
        hidden_act: str,
        eps: float,
        gating: bool,
    ):
        super().__init__()
        self.block = GatedCrossAttentionBlock(hidden_size, num_heads, mlp_ratio, hidden_act, eps, gating)
        self.layers = nn.ModuleList(
            CombinerTransformerLayer(hidden_size, num_heads, mlp_ratio, hidden_act, eps) for _ in range(num_layers)
        )

    def forward(self, text_latents: torch.Tensor, image_latents: torch.Tensor) -> torch.Tensor:
        hidden_states = self.block(text_latents, image_latents)  # (B, N, D)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states  # (B, N, D)


class AdaptiveCombiner(nn.Module):
    """Visual tokens + prompt embeddings -> N fused tokens at the LLM width.

    Args:
        input_size (`int`): width of the incoming visual tokens and text embeddings (the LLM width).
        hidden_size (`int`): combiner width D; inputs are projected to D and the output back when it differs.
        num_latents (`int`): N.
        iterations (`int`): T.
        num_layers (`int`): transformer layers per fusion step.
        num_heads (`int`): heads of every attention.
        mlp_ratio (`int`), hidden_act (`str`), eps (`float`): MLP width ratio, activation, LayerNorm epsilon.
        gating (`bool`): tanh gates on (True) or fixed to 1.
        resampling (`str`): `"latent"`, `"spatial"` or `"none"` (every visual token kept) for the image; the text
            always uses latents.
        combination (`str`): `"weighted"`, `"residual"` or `"none"`.
        share_weights (`bool`): one fusion step for all iterations (True) or one per iteration.
        input_norm (`bool`): LayerNorm on the image tokens and on the text tokens before resampling.
        image_positions (`bool`): add fixed sine-cosine position codes (`sincos_positions`) to the image tokens before
            resampling, so that the latents can tell where on the patch grid what they read lies.
        latent_residual (`bool`): latent resamplers return `X_N + W2 Attn(X_N, X)` instead of `W2 Attn(X_N, X)`.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_latents: int,
        iterations: int,
        num_layers: int,
        num_heads: int,
        mlp_ratio: int = 4,
        hidden_act: str = "gelu",
        eps: float = 1e-5,
        gating: bool = True,
        resampling: str = "latent",
        combination: str = "weighted",
        share_weights: bool = True,
        input_norm: bool = True,
        latent_residual: bool = True,
        image_positions: bool = True,
    ):
        super().__init__()
        if image_positions and hidden_size % 4 != 0:
            raise ValueError(f"Image position codes need a combiner width divisible by 4, got {hidden_size}.")
        self.image_positions = image_positions
        self.iterations = iterations
        self.combination = combination
        self.share_weights = share_weights
        same_width = input_size == hidden_size
        self.image_in_proj = nn.Identity() if same_width else nn.Linear(input_size, hidden_size)
        self.text_in_proj = nn.Identity() if same_width else nn.Linear(input_size, hidden_size)
        self.out_proj = nn.Identity() if same_width else nn.Linear(hidden_size, input_size)
        self.image_norm = nn.LayerNorm(hidden_size, eps=eps) if input_norm else nn.Identity()
        self.text_norm = nn.LayerNorm(hidden_size, eps=eps) if input_norm else nn.Identity()
        if resampling == "latent":
            self.image_resampler = LatentResampler(hidden_size, num_latents, num_heads, latent_residual)
        elif resampling == "spatial":
            self.image_resampler = SpatialResampler(hidden_size, num_latents)
        elif resampling == "none":
            self.image_resampler = TokenProjection(hidden_size)
        else:
            raise ValueError(f"Unknown resampling {resampling!r}; use 'latent', 'spatial' or 'none'.")
        self.text_resampler = LatentResampler(hidden_size, num_latents, num_heads, latent_residual)
        step_args = (hidden_size, num_heads, num_layers, mlp_ratio, hidden_act, eps, gating)
        self.steps = nn.ModuleList(FusionStep(*step_args) for _ in range(1 if share_weights else iterations))
        if combination == "weighted":
            self.iteration_logits = nn.Parameter(torch.zeros(iterations))  # softmax -> equal weights at init
        elif combination not in ("residual", "none"):
            raise ValueError(f"Unknown combination {combination!r}; use 'weighted', 'residual' or 'none'.")

    def step(self, index: int) -> FusionStep:
        """The fusion step used by iteration `index` (0-based)."""
        return self.steps[0 if self.share_weights else index]

    def resample(
        self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 2 for both modalities.

        Args:
            image_tokens (`torch.Tensor` of shape `(B, S_v, input_size)`): P(X_im), one row per image.
            text_tokens (`torch.Tensor` of shape `(B, L, input_size)`): X_text for each image.
            text_mask (`torch.BoolTensor` of shape `(B, L)`, *optional*): True for the prompt tokens to fuse.

        Returns:
            `(t_N, f_N)`: `(B, N, D)` each (f: `(B, S_v, D)` without resampling).
        """
        image_tokens = self.image_norm(self.image_in_proj(image_tokens))  # (B, S_v, D)
        if self.image_positions:
            positions = sincos_positions(image_tokens.shape[1], image_tokens.shape[2])  # (S_v, D)
            image_tokens = image_tokens + positions.to(device=image_tokens.device, dtype=image_tokens.dtype)
        image_latents = self.image_resampler(image_tokens)  # f_N, (B, N, D); (B, S_v, D) for "none"
        text_latents = self.text_resampler(self.text_norm(self.text_in_proj(text_tokens)), text_mask)  # t_N, (B, N, D)
        return text_latents, image_latents

    def iterate(self, text_latents: torch.Tensor, image_latents: torch.Tensor) -> list[torch.Tensor]:
        """Runs the T iterations (`F_i = step(t_{i-1}, f)`, `t_i = F_i + t_{i-1}`); returns `[F_1, ..., F_T]`."""
        outputs = []
        for index in range(self.iterations):
            fused = self.step(index)(text_latents, image_latents)  # F_i, (B, N, D)
            outputs.append(fused)
            text_latents = fused + text_latents  # t_N <- F + t_N
        return outputs

    def iteration_weights(self) -> torch.Tensor | None:
        """Softmax weights of the `"weighted"` combination, `(T,)`; `None` for the other modes."""
        return self.iteration_logits.softmax(-1) if self.combination == "weighted" else None

    def combine(self, outputs: list[torch.Tensor], text_latents: torch.Tensor) -> torch.Tensor:
        """Combines `[F_1, ..., F_T]` (each `(B, N, D)`) given the initial `t_N`; returns `(B, N, D)`."""
        if self.combination == "none":
            return outputs[-1]
        if self.combination == "residual":
            return text_latents + torch.stack(outputs).sum(0)  # t_N + F_1 + ... + F_T
        weights = self.iteration_weights().to(outputs[0].dtype)
        return torch.einsum("t,tbnd->bnd", weights, torch.stack(outputs))

    def forward(
        self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            image_tokens (`torch.Tensor` of shape `(B, S_v, input_size)`): one image's visual tokens per row.
            text_tokens (`torch.Tensor` of shape `(B, L, input_size)`): the text embeddings fused with that image.
            text_mask (`torch.BoolTensor` of shape `(B, L)`, *optional*): True for the prompt tokens to fuse (the
                rest, e.g. padding, answer or image positions, is ignored).

        Returns:
            `torch.Tensor` of shape `(B, N, input_size)`: the fused tokens.
        """
        text_latents, image_latents = self.resample(image_tokens, text_tokens, text_mask)
        combined = self.combine(self.iterate(text_latents, image_latents), text_latents)  # (B, N, D)
        return self.out_proj(combined)  # (B, N, input_size)


__all__ = [
    "AdaptiveCombiner",
    "CombinerAttention",
    "CombinerMLP",
    "CombinerTransformerLayer",
    "FusionStep",
    "GatedCrossAttentionBlock",
    "LatentResampler",
    "SpatialResampler",
    "TokenProjection",
    "pool_height",
    "sincos_positions",
]
