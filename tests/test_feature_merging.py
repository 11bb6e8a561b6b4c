"""Each multi-level merge strategy and aligner against its SPEC.md / paper equation, on random tensors."""

import pytest
import torch
from torch import nn

from comm_vlm.models.configuration_comm import ALIGNERS, MERGE_STRATEGIES
from comm_vlm.models.feature_merging import (
    ALIGNER_REGISTRY,
    MERGE_REGISTRY,
    ConvLayerscaleMerge,
    LayerscaleMerge,
    LLNLayerscaleMerge,
    MLPAligner,
    build_aligner,
    build_merge,
)


L, B, N, C = 5, 2, 16, 8  # layers, images, tokens (4x4 grid), width


@pytest.fixture
def feats():
    return torch.randn(L, B, N, C)


def test_registries_cover_config_names():
    assert set(MERGE_REGISTRY) == set(MERGE_STRATEGIES)
    assert set(ALIGNER_REGISTRY) == set(ALIGNERS)


@pytest.mark.parametrize("strategy", MERGE_STRATEGIES)
def test_every_merge_maps_layers_to_tokens(strategy, feats):
    num_layers = 1 if strategy == "single" else L
    merge = build_merge(strategy, num_layers, C, output_size=6 if "_" in strategy else None, kernel_size=3)
    out = merge(feats[:num_layers])
    assert out.shape == (B, N, merge.output_size)


def test_single_is_the_layer(feats):
    assert torch.equal(build_merge("single", 1, C, None, 3)(feats[2:3]), feats[2])


def test_mean_is_the_average(feats):
    expected = sum(feats[i] for i in range(L)) / L
    torch.testing.assert_close(build_merge("mean", L, C, None, 3)(feats), expected)


def test_layerscale_weights_sum_to_one_and_weight_layers(feats):
    merge = LayerscaleMerge(L, C)
    with torch.no_grad():
        merge.layer_logits.copy_(torch.randn(L))
    w = merge.layer_weights
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    assert (w > 0).all()
    expected = sum(w[i] * feats[i] for i in range(L))
    torch.testing.assert_close(merge(feats), expected)


def test_layerscale_starts_equal(feats):
    merge = LayerscaleMerge(L, C)
    torch.testing.assert_close(merge.layer_weights, torch.full((L,), 1 / L))
    torch.testing.assert_close(merge(feats), feats.mean(0))


def test_lln_layerscale_matches_per_layer_modules(feats):
    merge = LLNLayerscaleMerge(L, C, output_size=6)
    with torch.no_grad():
        for p in merge.parameters():
            p.copy_(torch.randn_like(p))
    # One independent LayerNorm + Linear per layer (slice i of the stacked parameters), as the paper's LLN_i.
    expected = torch.zeros(B, N, 6)
    for i in range(L):
        ln, lin = nn.LayerNorm(C), nn.Linear(C, 6)
        with torch.no_grad():
            ln.weight.copy_(merge.norm_weight[i])
            ln.bias.copy_(merge.norm_bias[i])
            lin.weight.copy_(merge.linear_weight[i])
            lin.bias.copy_(merge.linear_bias[i])
        expected += merge.layer_weights[i] * lin(ln(feats[i]))
    torch.testing.assert_close(merge(feats), expected, atol=1e-5, rtol=1e-5)
    assert merge.linear_weight.shape == (L, 6, C) and merge.norm_weight.shape == (L, C)


def test_lln_layers_are_independent(feats):
    merge = LLNLayerscaleMerge(L, C)
    feats2 = feats.clone()
    feats2[3] += 1.0  # only layer 3's input changes
    with torch.no_grad():
        delta = merge.transform(feats2) - merge.transform(feats)
    assert delta[3].abs().max() > 0
    assert torch.equal(delta[[0, 1, 2, 4]], torch.zeros_like(delta[[0, 1, 2, 4]]))


@pytest.mark.parametrize("training", [False, True])
def test_conv_layerscale_matches_per_layer_conv_bn(feats, training):
    merge = ConvLayerscaleMerge(L, C, output_size=6, kernel_size=3)
    with torch.no_grad():
        merge.layer_logits.copy_(torch.randn(L))
        merge.norm.running_mean.copy_(torch.randn(L * 6))
        merge.norm.running_var.copy_(torch.rand(L * 6) + 0.5)
    merge.train(training)
    side = 4
    expected = torch.zeros(B, N, 6)
    for i in range(L):
        conv, bn = nn.Conv2d(C, 6, 3, padding=1), nn.BatchNorm2d(6)
        bn.train(training)
        with torch.no_grad():
            conv.weight.copy_(merge.conv.weight[i * 6 : (i + 1) * 6])
            conv.bias.copy_(merge.conv.bias[i * 6 : (i + 1) * 6])
            bn.running_mean.copy_(merge.norm.running_mean[i * 6 : (i + 1) * 6])
            bn.running_var.copy_(merge.norm.running_var[i * 6 : (i + 1) * 6])
        grid = feats[i].transpose(1, 2).reshape(B, C, side, side)  # row-major tokens -> (B, C, H, W)
        out = bn(conv(grid)).reshape(B, 6, N).transpose(1, 2)
        expected += merge.layer_weights[i].detach() * out
    torch.testing.assert_close(merge(feats), expected, atol=1e-5, rtol=1e-5)


def test_conv_layerscale_rejects_non_square_grid():
    merge = ConvLayerscaleMerge(2, C)
    with pytest.raises(ValueError, match="square patch grid"):
        merge(torch.randn(2, 1, 15, C))


@pytest.mark.parametrize("depth,ratio", [(1, 8), (2, 8), (3, 2), (2, 16)])
def test_mlp_aligner_shape_and_widths(depth, ratio):
    mlp = MLPAligner(C, depth=depth, ratio=ratio)
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    assert len(linears) == depth
    assert linears[0].in_features == C and linears[-1].out_features == C
    if depth > 1:
        assert linears[0].out_features == C * ratio
    x = torch.randn(B, N, C)
    expected = x
    for i, lin in enumerate(linears):
        expected = lin(nn.functional.gelu(expected) if i > 0 else expected)
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize("kind", ALIGNERS)
def test_aligners_keep_width(kind):
    aligner = build_aligner(kind, C, depth=2, ratio=4, hidden_act="gelu")
    x = torch.randn(B, N, C)
    out = aligner(x)
    assert out.shape == x.shape and aligner.output_size == C
    if kind == "identity":
        assert out is x
