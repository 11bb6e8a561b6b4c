"""Contract tests against the published configs of the checkpoints the families are built from.

Every family is built at the papers' scale from the published `config.json` files
(`tests/fixtures/published_configs/`) on the meta device (no weights), and its parameter count is checked against an
independent reference: transformers' own `LlavaForConditionalGeneration` for the LLaVA-1.5 layout, counts computed by
hand from config fields for the connectors and the combiner, and the papers' model sizes.
"""

from __future__ import annotations

import pytest
import torch
from published_configs import (
    CLIP_L_336,
    COMM_IMAGE_SIZE,
    DINOV2_B,
    DINOV2_L,
    LLAVA_15_7B,
    LLAVA_NEXT_MISTRAL_7B,
    PUBLISHED_BUILDS,
    PUBLISHED_REPOS,
    SIGLIP_SO400M,
    VICUNA_7B,
    comm_7b_fields,
    component_counts,
    fixture_path,
    format_counts,
    load_published_config,
    load_published_dict,
    load_vision_config,
    published_build,
)
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

from comm_vlm import AdaptiveCombinerConfig, CommConfig
from comm_vlm.families import get_family
from comm_vlm.models.configuration_comm import patch_grid


# The published fields each fixture must hold (`vision.` / `text.`: in the resolved sub-config).
PUBLISHED_FIELDS = {
    CLIP_L_336: {
        "model_type": "clip",
        "projection_dim": 768,
        "vision.model_type": "clip_vision_model",
        "vision.hidden_size": 1024,
        "vision.num_hidden_layers": 24,
        "vision.num_attention_heads": 16,
        "vision.intermediate_size": 4096,
        "vision.patch_size": 14,
        "vision.image_size": 336,
        "vision.projection_dim": 768,
        "vision.hidden_act": "quick_gelu",
        "vision.layer_norm_eps": 1e-5,
        "text.hidden_size": 768,
        "text.num_hidden_layers": 12,
        "text.vocab_size": 49408,
        "text.max_position_embeddings": 77,
    },
    DINOV2_L: {
        "model_type": "dinov2",
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "mlp_ratio": 4,
        "patch_size": 14,
        "image_size": 518,
        "layerscale_value": 1.0,
        "layer_norm_eps": 1e-6,
        "use_swiglu_ffn": False,
    },
    DINOV2_B: {
        "model_type": "dinov2",
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "mlp_ratio": 4,
        "patch_size": 14,
        "image_size": 518,
        "layerscale_value": 1.0,
    },
    VICUNA_7B: {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    LLAVA_15_7B: {
        "model_type": "llava",
        "image_token_index": 32000,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "text.model_type": "llama",
        "text.vocab_size": 32064,
        "text.max_position_embeddings": 4096,
        "vision.model_type": "clip_vision_model",
        "vision.image_size": 336,
        "vision.patch_size": 14,
        "vision.hidden_size": 1024,
        "vision.num_hidden_layers": 24,
    },
    LLAVA_NEXT_MISTRAL_7B: {
        "model_type": "llava_next",
        "image_token_index": 32000,
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "text.model_type": "mistral",
        "text.vocab_size": 32064,
        "text.intermediate_size": 14336,
        "text.num_key_value_heads": 8,
        "vision.model_type": "clip_vision_model",
        "vision.image_size": 336,
        "vision.num_hidden_layers": 24,
    },
    SIGLIP_SO400M: {
        "model_type": "siglip",
        "vision.model_type": "siglip_vision_model",
        "vision.hidden_size": 1152,
        "vision.num_hidden_layers": 27,
        "vision.num_attention_heads": 16,
        "vision.intermediate_size": 4304,
        "vision.patch_size": 14,
        "vision.image_size": 384,
    },
}
# The architecture fields llava-hf leaves out of its `text_config` (LlamaConfig's defaults fill them in).
LLAMA_ARCHITECTURE = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
)

LLAVA_15_7B_BILLIONS, LLAVA_TOLERANCE = 7.06, 0.005  # LLaVA-1.5-7B's quoted size (llava-hf on the Hub)
COMM_7B_BILLIONS, COMM_TOLERANCE = 7.4, 0.05  # ViT-L (0.3B) x 2 + Vicuna-7B (6.74B) + the connector


def _build(config, family: str) -> torch.nn.Module:
    with torch.device("meta"):
        return get_family(family).model_class(config)


@pytest.fixture(scope="module")
def counts() -> dict[str, dict[str, int]]:
    """`component_counts` of every paper-scale build, built once on the meta device."""
    return {
        name: component_counts(_build(published_build(name), family)) for name, (family, _) in PUBLISHED_BUILDS.items()
    }


def _breakdown(counts: dict[str, int]) -> str:
    return f"total {counts['total'] / 1e9:.4f}B ({format_counts(counts)})"


# ---- the fixtures


@pytest.mark.parametrize("repo", PUBLISHED_REPOS)
def test_fixture_is_the_published_config(repo):
    raw = load_published_dict(repo)
    assert not any(key.startswith("_source") for key in raw), f"{fixture_path(repo).name} must be a plain config.json"
    config = load_published_config(repo)
    assert config.model_type == raw["model_type"]
    for field, expected in PUBLISHED_FIELDS[repo].items():
        scope, _, name = field.rpartition(".")
        holder = getattr(config, f"{scope}_config") if scope else config
        assert getattr(holder, name) == expected, f"{repo}: {field} is {getattr(holder, name)!r}, not {expected!r}"


def test_two_tower_repos_give_their_vision_tower():
    assert load_vision_config(CLIP_L_336).model_type == "clip_vision_model"
    assert load_vision_config(SIGLIP_SO400M).model_type == "siglip_vision_model"
    dinov2 = load_vision_config(DINOV2_L, image_size=COMM_IMAGE_SIZE)
    assert (dinov2.model_type, dinov2.image_size) == ("dinov2", COMM_IMAGE_SIZE)
    assert load_published_config(DINOV2_L).image_size == 518  # the override does not leak into the next load


def test_llava_hf_text_config_is_vicuna_7b():
    """llava-hf ships a partial `text_config`; with LlamaConfig's defaults it is Vicuna-7B's architecture."""
    llava_text = load_published_config(LLAVA_15_7B).text_config
    vicuna = load_published_config(VICUNA_7B)
    for field in LLAMA_ARCHITECTURE:
        assert getattr(llava_text, field) == getattr(vicuna, field), field
    assert (llava_text.vocab_size, vicuna.vocab_size) == (32064, 32000)


# ---- the configs users build from them


@pytest.mark.parametrize("as_dict", [False, True], ids=["configs", "dicts"])
def test_comm_config_from_published_configs(as_dict):
    """The public path: `CommConfig(vision_config=..., secondary_vision_config=..., text_config=...)`."""
    fields = comm_7b_fields()
    if as_dict:
        fields = {key: value.to_dict() for key, value in fields.items()}
    config = CommConfig(**fields)
    assert type(config.vision_config).__name__ == "CLIPVisionConfig"
    assert type(config.secondary_vision_config).__name__ == "Dinov2Config"
    assert type(config.text_config).__name__ == "LlamaConfig"
    assert patch_grid(config.vision_config) == patch_grid(config.secondary_vision_config) == 24
    assert config.image_seq_length == 576
    assert (config.vision_config.hidden_act, config.vision_config.projection_dim) == ("quick_gelu", 768)
    assert (config.secondary_vision_config.layerscale_value, config.text_config.vocab_size) == (1.0, 32000)
    assert config.branch("vision")["layers"] == list(range(1, 25))
    assert config.branch("secondary_vision")["layers"] == list(range(19, 25))

    reloaded = CommConfig.from_dict(config.to_dict())
    for prefix in ("vision", "secondary_vision", "text"):
        assert getattr(reloaded, f"{prefix}_config").to_dict() == getattr(config, f"{prefix}_config").to_dict()


def test_comm_refuses_dinov2_at_its_published_resolution():
    """DINOv2 as published (518 px, 37x37) next to CLIP at 336 px (24x24): the grids cannot be concatenated."""
    with pytest.raises(ValueError, match=r"patch grids must match.*24x24.*37x37"):
        CommConfig(
            vision_config=load_vision_config(CLIP_L_336),
            secondary_vision_config=load_vision_config(DINOV2_L),
            text_config=load_published_config(VICUNA_7B),
        )


def test_dinov2_base_needs_its_own_layers():
    """DINOv2-B has 12 layers: COMM's default DINOv2 layers (19-24) are refused; its last half builds."""
    fields = {**comm_7b_fields(), "secondary_vision_config": load_vision_config(DINOV2_B, image_size=COMM_IMAGE_SIZE)}
    with pytest.raises(ValueError, match=r"layer 19, outside the encoder: it has 12 layers"):
        CommConfig(**fields)
    model = _build(CommConfig(**fields, secondary_vision_feature_layer=list(range(7, 13))), "comm")
    counts = component_counts(model)
    width, layers = 768, 6
    assert counts["aligners"] == (width * 8 * width + 8 * width) + (8 * width * width + width)
    clip_merge = 24 * (2 * 1024 + 1024 * 1024 + 1024) + 24
    assert counts["merges"] == clip_merge + layers * (2 * width + width * width + width) + layers
    assert counts["projector"] == (1024 + width) * 4096 + 4096


def test_siglip_primary_runs_dinov2_at_its_grid():
    """SigLIP-so400m/14-384 (27x27) as COMM's primary, DINOv2-L at 378 px to match: 729 visual tokens."""
    config = published_build("comm-siglip-so400m")
    assert patch_grid(config.vision_config) == patch_grid(config.secondary_vision_config) == 27
    assert config.secondary_vision_config.image_size == 378
    assert config.image_seq_length == 729
    assert config.vision_image_mean == [0.5, 0.5, 0.5]


# ---- parameter counts


def test_llava_15_7b_matches_transformers_llava(counts):
    ours = counts["llava-1.5-7b"]
    with torch.device("meta"):
        reference = component_counts(LlavaForConditionalGeneration(load_published_config(LLAVA_15_7B)))
    assert ours == reference, f"ours: {_breakdown(ours)}\ntransformers' Llava: {_breakdown(reference)}"
    assert abs(ours["total"] / 1e9 - LLAVA_15_7B_BILLIONS) < LLAVA_TOLERANCE, (
        f"LLaVA-1.5-7B should have {LLAVA_15_7B_BILLIONS}B +- {LLAVA_TOLERANCE}B parameters: {_breakdown(ours)}"
    )


def test_comm_7b_count(counts):
    comm = counts["comm-7b"]
    assert abs(comm["total"] / 1e9 - COMM_7B_BILLIONS) < COMM_TOLERANCE, (
        f"COMM-7B should have about {COMM_7B_BILLIONS}B (+- {COMM_TOLERANCE}B) parameters: {_breakdown(comm)}"
    )
    # By hand from the COMM defaults: LLN-Layerscale over CLIP's 24 layers and DINOv2's 19-24 (width C = 1024:
    # LayerNorm 2C + Linear C*C + C per layer, plus one weight logit per layer), DINOv2's 2-layer MLP with ratio 8,
    # and the linear projector from the concatenated 2C channels to Vicuna's 4096.
    width, llm_width = 1024, 4096
    per_layer = 2 * width + width * width + width + 1
    assert comm["merges"] == (24 + 6) * per_layer, _breakdown(comm)
    assert comm["aligners"] == (width * 8 * width + 8 * width) + (8 * width * width + width), _breakdown(comm)
    assert comm["projector"] == 2 * width * llm_width + llm_width, _breakdown(comm)
    assert comm["vision_tower"] == counts["llava-1.5-7b"]["vision_tower"], _breakdown(comm)
    with torch.device("meta"):
        vicuna = LlamaForCausalLM(load_published_config(VICUNA_7B)).num_parameters()
    assert comm["llm"] == vicuna, _breakdown(comm)


def test_comm_7b_runs_dinov2_with_a_336_px_position_table():
    model = _build(published_build("comm-7b"), "comm")
    table = model.model.secondary_vision_tower.embeddings.position_embeddings
    assert tuple(table.shape) == (1, 1 + 24 * 24, 1024)


def test_m3_adds_no_parameters(counts):
    assert counts["m3-llava-1.5-7b"] == counts["llava-1.5-7b"], (
        f"M3: {_breakdown(counts['m3-llava-1.5-7b'])}\nLLaVA-1.5-7B: {_breakdown(counts['llava-1.5-7b'])}"
    )


def combiner_parameters_by_hand(config: AdaptiveCombinerConfig) -> int:
    """The combiner's parameters from its config fields and the paper's equations (not from its modules).

    Width D (the LLM's, or `combiner_hidden_size` with projections in and out), N latents, MLP ratio r:
    attention = 4 biased D x D projections; MLP = D -> rD -> D; a latent resampler = N x D latents + attention + W2;
    eq. 3's block = LN(t), LN(f), cross-attention, MLP and the gates alpha, beta; a pre-LN transformer layer = 2 LN +
    self-attention + MLP; one fusion step per iteration unless shared; softmax logits per iteration for "weighted".
    """
    llm_width = config.text_config.hidden_size
    width = config.combiner_hidden_size or llm_width
    latents, ratio, iterations = config.combiner_num_latents, config.combiner_mlp_ratio, config.combiner_iterations

    def linear(fan_in: int, fan_out: int) -> int:
        return fan_in * fan_out + fan_out

    layer_norm = 2 * width
    attention = 4 * linear(width, width)
    mlp = linear(width, ratio * width) + linear(ratio * width, width)
    latent_resampler = latents * width + attention + linear(width, width)
    image_resampler = latent_resampler if config.combiner_resampling == "latent" else linear(width, width)
    block = 2 * layer_norm + attention + mlp + (2 if config.combiner_gating else 0)
    transformer_layer = 2 * layer_norm + attention + mlp
    step = block + config.combiner_num_layers * transformer_layer
    steps = 1 if config.combiner_share_weights else iterations
    projections = 0 if width == llm_width else 2 * linear(llm_width, width) + linear(width, llm_width)
    input_norms = 2 * layer_norm if config.combiner_input_norm else 0
    weights = iterations if config.combiner_combination == "weighted" else 0
    return projections + input_norms + image_resampler + latent_resampler + steps * step + weights


def test_combiner_count_by_hand(counts):
    combiner = counts["combiner-llava-1.5-7b"]
    expected = combiner_parameters_by_hand(published_build("combiner-llava-1.5-7b"))
    assert combiner["combiner"] == expected, f"by hand {expected:,}: {_breakdown(combiner)}"
    # D = 4096, N = 64, 4 iterations with shared weights: about 0.57B on top of LLaVA-1.5-7B.
    assert abs(combiner["combiner"] / 1e9 - 0.571) < 0.001, _breakdown(combiner)
    without = {key: value for key, value in combiner.items() if key not in ("combiner", "total")}
    llava = {key: value for key, value in counts["llava-1.5-7b"].items() if key not in ("combiner", "total")}
    assert without == llava, f"combiner: {_breakdown(combiner)}\nLLaVA-1.5-7B: {_breakdown(counts['llava-1.5-7b'])}"
    assert combiner["total"] == counts["llava-1.5-7b"]["total"] + expected


@pytest.mark.parametrize(
    "overrides",
    [
        {"combiner_hidden_size": 1024, "combiner_num_heads": 16},
        {"combiner_share_weights": False, "combiner_num_layers": 2, "combiner_combination": "residual"},
        {"combiner_resampling": "spatial", "combiner_gating": False, "combiner_input_norm": False},
    ],
    ids=["narrow", "unshared", "spatial"],
)
def test_combiner_variants_by_hand(overrides):
    config = AdaptiveCombinerConfig.from_comm_config(published_build("combiner-llava-1.5-7b"), **overrides)
    counts = component_counts(_build(config, "adaptive_combiner"))
    assert counts["combiner"] == combiner_parameters_by_hand(config), _breakdown(counts)


def test_every_component_is_counted(counts):
    for name, build in counts.items():
        parts = sum(value for key, value in build.items() if key != "total")
        assert parts == build["total"], f"{name}: components sum to {parts:,}: {_breakdown(build)}"
