"""Adaptive combiner (Piergiovanni and Angelova 2023): each equation on random tensors, and the config."""

import math

import pytest
import torch
import torch.nn.functional as F

from comm_vlm import AdaptiveCombinerConfig, CommConfig
from comm_vlm.models.combiner import (
    AdaptiveCombiner,
    CombinerAttention,
    GatedCrossAttentionBlock,
    LatentResampler,
    SpatialResampler,
    TokenProjection,
    pool_height,
    sincos_positions,
)
from comm_vlm.testing import tiny_comm_config


D, HEADS, N = 16, 4, 5


def randomize(module, gate=None):
    """Random values everywhere (LayerNorm affine included); gates set to `gate` when given."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(torch.randn_like(param) * (0.3 if param.dim() > 0 else 1.0))
            if gate is not None and name.endswith("_gate"):
                param.fill_(gate)
    return module.eval()


def reference_attention(attn, query, keys, mask=None):
    """Phi(q, K) written out: per-head softmax(q k^T / sqrt(d)) v, then the output projection."""
    b, nq, _ = query.shape
    h, d = attn.num_heads, attn.head_dim
    q = attn.q_proj(query).view(b, nq, h, d).transpose(1, 2)
    k = attn.k_proj(keys).view(b, -1, h, d).transpose(1, 2)
    v = attn.v_proj(keys).view(b, -1, h, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, nq, -1))


def manual_block(block, t, f):
    """Eq. 3 from the block's parts: P_cr = LN(t) + tanh(a) Phi(LN(t), LN(f)); F = P_cr + tanh(b) MLP(P_cr)."""
    a, b = (torch.tanh(block.attn_gate), torch.tanh(block.mlp_gate)) if block.gating else (1.0, 1.0)
    ln_t = F.layer_norm(t, (D,), block.text_layernorm.weight, block.text_layernorm.bias, 1e-5)
    ln_f = F.layer_norm(f, (D,), block.image_layernorm.weight, block.image_layernorm.bias, 1e-5)
    p_cr = ln_t + a * reference_attention(block.cross_attn, ln_t, ln_f)
    return p_cr + b * block.mlp.fc2(F.gelu(block.mlp.fc1(p_cr)))


# --- attention and resampling (eq. 2) ---------------------------------------------------------------------------


def test_attention_matches_the_formula_and_respects_the_key_mask():
    attn = randomize(CombinerAttention(D, HEADS))
    query, keys = torch.randn(3, 4, D), torch.randn(3, 9, D)
    mask = torch.rand(3, 9) > 0.4
    mask[:, 0] = True
    torch.testing.assert_close(attn(query, keys, mask), reference_attention(attn, query, keys, mask))
    torch.testing.assert_close(attn(query, keys), reference_attention(attn, query, keys))
    edited = keys.clone()
    edited[~mask] = torch.randn_like(edited[~mask]) * 100  # masked keys can be anything
    torch.testing.assert_close(attn(query, edited, mask), attn(query, keys, mask))


def test_attention_over_no_keys_is_zero():
    attn = randomize(CombinerAttention(D, HEADS))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False
    out = attn(torch.randn(2, 3, D), torch.randn(2, 6, D), mask)
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros(3, D)) and out[0].abs().sum() > 0


@pytest.mark.parametrize("residual", [False, True])
def test_latent_resampler_is_w2_attn_of_learned_latents(residual):
    """Eq. 2, `W2 Phi(X_N, X)`; with `residual=True`, `X_N + W2 Phi(X_N, X)` (DETR's and Perceiver's latents)."""
    resampler = randomize(LatentResampler(D, N, HEADS, residual=residual))
    tokens, mask = torch.randn(2, 11, D), torch.rand(2, 11) > 0.3
    mask[:, 0] = True
    latents = resampler.latents.expand(2, -1, -1)
    expected = resampler.out_proj(reference_attention(resampler.attn, latents, tokens, mask))
    if residual:
        expected = latents + expected
    torch.testing.assert_close(resampler(tokens, mask), expected)


def test_residual_latents_are_distinct_where_eq2_latents_are_copies_of_the_mean():
    """With uniform attention (zero query/key projections), eq. 2 gives N copies of W2 V(mean token); the residual
    form keeps each latent's own query."""
    tokens = torch.randn(1, 11, D)
    for residual in (False, True):
        resampler = randomize(LatentResampler(D, N, HEADS, residual=residual))
        with torch.no_grad():
            resampler.attn.q_proj.weight.zero_()
            resampler.attn.q_proj.bias.zero_()
        out = resampler(tokens)[0]  # (N, D)
        mean = resampler.out_proj(resampler.attn.o_proj(resampler.attn.v_proj(tokens.mean(1))))[0]  # (D,)
        if residual:
            torch.testing.assert_close(out, resampler.latents + mean)
        else:
            torch.testing.assert_close(out, mean.expand(N, -1))


@pytest.mark.parametrize("num_tokens,grid", [(64, (8, 8)), (32, (4, 8)), (16, (4, 4)), (6, (2, 3)), (7, (1, 7))])
def test_pool_height(num_tokens, grid):
    assert (pool_height(num_tokens), num_tokens // pool_height(num_tokens)) == grid


def test_spatial_resampling_averages_the_patch_grid():
    resampler = randomize(SpatialResampler(D, 8))  # 4x4 grid -> 2x4
    tokens = torch.randn(2, 16, D)
    grid = tokens.view(2, 4, 4, D)
    # bins: rows {0,1},{2,3} x columns {0},{1},{2},{3}
    pooled = grid.view(2, 2, 2, 4, D).mean(2).reshape(2, 8, D)
    torch.testing.assert_close(resampler(tokens), resampler.out_proj(pooled))
    # 17 tokens (CLS kept) do not form a grid: pooled as a sequence
    seq = torch.randn(2, 17, D)
    expected = F.adaptive_avg_pool1d(seq.transpose(1, 2), 8).transpose(1, 2)
    torch.testing.assert_close(resampler(seq), resampler.out_proj(expected))


def test_no_resampling_keeps_every_visual_token_for_the_cross_attention():
    """`resampling="none"`: f = W2 (LN(P(X_im)) + positions) over the whole grid; the output is still N tokens, and
    the text latents' cross-attention (eq. 3) reads every visual token."""
    combiner = build(resampling="none", iterations=1, num_layers=0)
    assert isinstance(combiner.image_resampler, TokenProjection)
    image, text = torch.randn(2, 16, D), torch.randn(2, 3, D)
    t0, f = combiner.resample(image, text)  # (2, N, D), (2, 16, D)
    normed = F.layer_norm(image, (D,), combiner.image_norm.weight, combiner.image_norm.bias, 1e-5)
    torch.testing.assert_close(f, combiner.image_resampler.out_proj(normed + sincos_positions(16, D)))
    assert combiner(image, text).shape == (2, N, D)
    torch.testing.assert_close(combiner.iterate(t0, f)[0], manual_block(combiner.steps[0].block, t0, f))  # F_1


# --- the gated block (eq. 3) -------------------------------------------------------------------------------------


def test_closed_gates_reduce_the_block_to_layernorm_exactly():
    block = randomize(GatedCrossAttentionBlock(D, HEADS, 4, "gelu", 1e-5, gating=True), gate=0.0)
    t, f = torch.randn(3, N, D), torch.randn(3, N, D)
    assert torch.equal(block(t, f), block.text_layernorm(t))


def test_gated_block_matches_eq3():
    block = randomize(GatedCrossAttentionBlock(D, HEADS, 4, "gelu", 1e-5, gating=True))
    t, f = torch.randn(3, N, D), torch.randn(3, N, D)
    assert block.attn_gate.item() != 0 and block.mlp_gate.item() != 0
    torch.testing.assert_close(block(t, f), manual_block(block, t, f))


@pytest.mark.parametrize("gate", ["attn_gate", "mlp_gate"])
def test_each_branch_scales_with_tanh_of_its_gate(gate):
    """With the other gate closed, the block minus LN(t) is tanh(gate) times a gate-independent branch."""
    block = randomize(GatedCrossAttentionBlock(D, HEADS, 4, "gelu", 1e-5, gating=True), gate=0.0)
    t, f = torch.randn(2, N, D), torch.randn(2, N, D)
    ln_t = block.text_layernorm(t)
    branches = []
    for value in (0.3, -1.2, 2.0):
        with torch.no_grad():
            getattr(block, gate).fill_(value)
        branches.append((block(t, f) - ln_t) / math.tanh(value))
    ln_f = block.image_layernorm(f)
    expected = block.cross_attn(ln_t, ln_f) if gate == "attn_gate" else block.mlp(ln_t)
    for branch in branches:
        torch.testing.assert_close(branch, expected, atol=1e-5, rtol=1e-4)


def test_no_gating_means_gates_of_one():
    block = randomize(GatedCrossAttentionBlock(D, HEADS, 4, "gelu", 1e-5, gating=False))
    assert block.gates() == (1.0, 1.0) and not any("gate" in name for name, _ in block.named_parameters())
    t, f = torch.randn(2, N, D), torch.randn(2, N, D)
    torch.testing.assert_close(block(t, f), manual_block(block, t, f))


# --- iterations and combination ----------------------------------------------------------------------------------


def build(**overrides):
    kwargs = dict(input_size=D, hidden_size=D, num_latents=N, iterations=3, num_layers=2, num_heads=HEADS)
    kwargs.update(overrides)
    return randomize(AdaptiveCombiner(**kwargs))


def unrolled(combiner, image, text, mask):
    """The iteration written out: f, t0 once; F_i = T(F(t_{i-1}, f)); t_i = F_i + t_{i-1}."""
    image, text = combiner.image_in_proj(image), combiner.text_in_proj(text)
    if isinstance(combiner.image_norm, torch.nn.LayerNorm):  # LN(P(X_im)), LN(X_text) before resampling
        image = F.layer_norm(image, (D,), combiner.image_norm.weight, combiner.image_norm.bias, 1e-5)
        text = F.layer_norm(text, (D,), combiner.text_norm.weight, combiner.text_norm.bias, 1e-5)
    if combiner.image_positions:
        image = image + sincos_positions(image.shape[1], D)
    f = combiner.image_resampler(image)
    t0 = combiner.text_resampler(text, mask)
    t, outputs = t0, []
    for i in range(combiner.iterations):
        step = combiner.steps[0 if combiner.share_weights else i]
        hidden = manual_block(step.block, t, f)
        for layer in step.layers:
            hidden = layer(hidden)
        outputs.append(hidden)
        t = hidden + t
    return t0, outputs, t


@pytest.mark.parametrize("input_norm,image_positions", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("share_weights", [True, False])
@pytest.mark.parametrize("combination", ["weighted", "residual", "none"])
def test_forward_is_the_unrolled_iteration_and_its_combination(
    combination, share_weights, input_norm, image_positions
):
    combiner = build(
        combination=combination, share_weights=share_weights, input_norm=input_norm, image_positions=image_positions
    )
    assert isinstance(combiner.image_norm, torch.nn.LayerNorm) == input_norm
    assert len(combiner.steps) == (1 if share_weights else 3)
    image, text = torch.randn(2, 16, D), torch.randn(2, 7, D)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :3] = False
    t0, outputs, t_last = unrolled(combiner, image, text, mask)
    if combination == "weighted":
        weights = combiner.iteration_logits.softmax(-1)
        assert not torch.allclose(weights, torch.full_like(weights, 1 / 3))  # randomized, not the init
        expected = sum(w * out for w, out in zip(weights, outputs))
    elif combination == "residual":
        expected = t0 + sum(outputs)
        torch.testing.assert_close(expected, t_last)  # the residual stream after the last iteration
    else:
        expected = outputs[-1]
    torch.testing.assert_close(combiner(image, text, mask), expected, atol=1e-5, rtol=1e-4)


def test_sincos_positions_follow_the_2d_formula():
    """Square counts: row codes then column codes, each [sin(p w_k), cos(p w_k)], w_k = 10000^(-4k / D)."""
    codes = sincos_positions(16, 8)  # a 4 x 4 grid, D = 8: 2 frequencies per axis
    for index in range(16):
        row, col = divmod(index, 4)
        expected = []
        for p in (row, col):
            angles = [p * 10000.0 ** (-2 * k / 4) for k in range(2)]
            expected += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
        torch.testing.assert_close(codes[index], torch.tensor(expected))
    assert len({tuple(c.tolist()) for c in codes}) == 16  # every patch has its own code
    sequence = sincos_positions(5, 8)  # not a square: 1D positions, 4 frequencies
    torch.testing.assert_close(
        sequence[3, :4], torch.tensor([math.sin(3 * 10000.0 ** (-2 * k / 8)) for k in range(4)])
    )


def test_image_positions_make_the_fusion_see_where_tokens_are():
    """Latent attention is blind to the order of the visual tokens; with position codes it is not."""
    image, text = torch.randn(2, 16, D), torch.randn(2, 5, D)
    shuffled = image[:, torch.randperm(16)]
    blind = build(image_positions=False)
    torch.testing.assert_close(blind(shuffled, text), blind(image, text), atol=1e-5, rtol=1e-4)
    seeing = build(image_positions=True)
    assert not torch.allclose(seeing(shuffled, text), seeing(image, text), atol=1e-3)


def test_image_positions_need_a_width_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        AdaptiveCombiner(input_size=6, hidden_size=6, num_latents=2, iterations=1, num_layers=1, num_heads=2)


def test_iterations_reuse_f_and_feed_f_plus_t_forward():
    """Step i receives t_{i-1} = t_0 + F_1 + ... + F_{i-1} and the same f every time."""
    combiner = build(iterations=4)
    seen = []
    combiner.steps[0].register_forward_hook(lambda module, args, out: seen.append((args[0], args[1], out)))
    image, text = torch.randn(1, 9, D), torch.randn(1, 5, D)
    with torch.no_grad():
        t0, f = combiner.resample(image, text)
        combiner(image, text)
    assert len(seen) == 4
    running = t0
    for t_in, f_in, out in seen:
        torch.testing.assert_close(t_in, running)
        assert torch.equal(f_in, f)
        running = running + out


def test_one_iteration_weighted_equals_none():
    image, text = torch.randn(2, 9, D), torch.randn(2, 5, D)
    weighted = build(iterations=1, combination="weighted")
    none = build(iterations=1, combination="none")
    none.load_state_dict({k: v for k, v in weighted.state_dict().items() if k != "iteration_logits"})
    torch.testing.assert_close(weighted(image, text), none(image, text))


@pytest.mark.parametrize("resampling", ["latent", "spatial", "none"])
@pytest.mark.parametrize("visual,text_len", [(1, 1), (16, 3), (25, 40), (50, 2)])
def test_n_tokens_out_for_any_input_length(resampling, visual, text_len):
    combiner = build(resampling=resampling, input_size=24, hidden_size=D)  # with in/out projections
    out = combiner(torch.randn(3, visual, 24), torch.randn(3, text_len, 24), torch.ones(3, text_len).bool())
    assert out.shape == (3, N, 24) and torch.isfinite(out).all()


def test_text_mask_hides_tokens_from_the_combiner():
    combiner = build()
    image, text = torch.randn(1, 9, D), torch.randn(1, 6, D)
    mask = torch.tensor([[True, True, True, False, False, True]])
    edited = text.clone()
    edited[0, 3:5] = torch.randn(2, D)
    torch.testing.assert_close(combiner(image, text, mask), combiner(image, edited, mask))
    assert not torch.allclose(combiner(image, text), combiner(image, edited))


# --- config ------------------------------------------------------------------------------------------------------


def test_defaults():
    config = AdaptiveCombinerConfig()
    assert config.model_type == "adaptive_combiner"
    assert config.secondary_vision_config is None and config.vision_config.model_type == "clip_vision_model"
    assert config.branch("vision")["layers"] == [23] and config.projector_depth == 2  # LLaVA-1.5 branch
    assert (config.combiner_num_latents, config.combiner_iterations, config.combiner_num_layers) == (64, 4, 1)
    assert (config.combiner_resampling, config.combiner_combination, config.combiner_gating) == (
        "latent",
        "weighted",
        True,
    )
    assert config.combiner_width == config.text_config.hidden_size and config.num_image_tokens == 64
    assert config.image_seq_length == 576
    assert config.combiner_input_norm and config.combiner_latent_residual  # Perceiver/DETR conventions on
    assert config.combiner_image_positions


def test_from_comm_config_keeps_the_comm_branch(tmp_path):
    config = AdaptiveCombinerConfig.from_comm_config(CommConfig(), combiner_num_latents=32)
    assert config.secondary_vision_config.model_type == "dinov2"
    assert config.vision_feature_merge == "lln_layerscale" and config.combiner_num_latents == 32
    config.save_pretrained(tmp_path)
    assert AdaptiveCombinerConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


INVALID = [
    (dict(combiner_num_latents=0), "combiner_num_latents"),
    (dict(combiner_iterations=-1), "combiner_iterations"),
    (dict(combiner_num_layers=0), "combiner_num_layers"),
    (dict(combiner_hidden_size=0), "combiner_hidden_size"),
    (dict(combiner_resampling="grid"), "combiner_resampling"),
    (dict(combiner_combination="mean"), "combiner_combination"),
    (dict(combiner_num_heads=3), "not divisible by its 3 attention heads"),
    (dict(combiner_hidden_size=42), "D=42 is not divisible by its 4 attention heads"),
    (dict(combiner_resampling="spatial", combiner_num_latents=17), "spatial"),
    (dict(combiner_layer_norm_eps=0.0), "combiner_layer_norm_eps"),
    (dict(combiner_input_norm="yes"), "combiner_input_norm"),
    (dict(combiner_latent_residual=1), "combiner_latent_residual"),
    (dict(combiner_image_positions=None), "combiner_image_positions"),
]


@pytest.mark.parametrize("overrides,message", INVALID)
def test_invalid_config_is_a_clear_error(overrides, message):
    base = tiny_comm_config("llava").to_dict()
    base.pop("model_type")
    with pytest.raises(ValueError, match=message):
        AdaptiveCombinerConfig(**{**base, **overrides})
