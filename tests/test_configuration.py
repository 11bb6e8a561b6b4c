"""CommConfig: defaults reproduce COMM; every invalid value fails at config time with a message naming it."""

import pytest

from comm_vlm import CommConfig
from comm_vlm.testing import tiny_comm_config, tiny_text_config, tiny_vision_config


def test_defaults_reproduce_comm():
    config = CommConfig()
    assert config.vision_config.model_type == "clip_vision_model"
    assert config.secondary_vision_config.model_type == "dinov2"
    for vision in (config.vision_config, config.secondary_vision_config):
        assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.image_size) == (
            1024,
            24,
            14,
            336,
        )
    assert config.vision_feature_layer == list(range(1, 25))
    assert config.vision_feature_merge == "lln_layerscale" and config.vision_aligner == "identity"
    assert config.secondary_vision_feature_layer == list(range(19, 25))
    assert config.secondary_vision_feature_merge == "lln_layerscale"
    assert (config.secondary_vision_aligner, config.secondary_vision_aligner_depth) == ("mlp", 2)
    assert config.secondary_vision_aligner_ratio == 8
    assert config.projector_depth == 1  # linear to the LLM width
    assert config.image_seq_length == 576
    # Each encoder is normalised with its own statistics: CLIP's and ImageNet's.
    assert config.vision_image_mean[0] == pytest.approx(0.48145466)
    assert config.secondary_vision_image_mean == pytest.approx([0.485, 0.456, 0.406])


def test_single_encoder_survives_round_trip(tmp_path):
    config = tiny_comm_config("llava")
    assert config.secondary_vision_config is None
    config.save_pretrained(tmp_path)
    reloaded = CommConfig.from_pretrained(tmp_path)
    assert reloaded.secondary_vision_config is None
    assert reloaded.to_dict() == config.to_dict()


def test_two_encoder_round_trip(tmp_path):
    config = tiny_comm_config("comm", vision_feature_merge="conv_layerscale")
    config.save_pretrained(tmp_path)
    reloaded = CommConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.secondary_vision_config.model_type == "dinov2"


@pytest.mark.parametrize("family", ["matryoshka_llava", "adaptive_combiner"])
def test_comm_layout_gives_every_family_comm_s_branch(family):
    # These families' config classes default to LLaVA-1.5's branch (one layer, 2-layer MLP projector); the "comm"
    # layout must still mean COMM's: the main job puts the combiner on it.
    comm, other = tiny_comm_config("comm"), tiny_comm_config("comm", family=family)
    assert type(other).__name__ != "CommConfig"
    for prefix in comm.encoder_prefixes:
        branch = {k: v for k, v in other.branch(prefix).items() if k != "vision_config"}
        assert branch == {k: v for k, v in comm.branch(prefix).items() if k != "vision_config"}
    assert branch["merge"] == "lln_layerscale" and branch["aligner"] == "mlp"  # DINOv2's
    assert other.projector_depth == comm.projector_depth == 1


def test_negative_layers_resolve_to_hidden_state_indices():
    config = tiny_comm_config("llava")
    assert config.branch("vision")["layers"] == [3]  # 4 layers: -2 is hidden_states[3]


def test_mae_masking_is_disabled():
    config = tiny_comm_config("llava", vision_config=tiny_vision_config("vit_mae", mask_ratio=0.75))
    assert config.vision_config.mask_ratio == 0.0


INVALID = [
    ({"vision_feature_layer": [1, 9]}, "`vision_feature_layer` has layer 9, outside the encoder"),
    ({"vision_feature_layer": [-6]}, "valid indices are 0..4"),
    ({"secondary_vision_feature_layer": [5]}, "`secondary_vision_feature_layer` has layer 5"),
    ({"vision_feature_layer": []}, "`vision_feature_layer` is empty"),
    ({"vision_feature_layer": [2, 2]}, "lists a layer twice"),
    ({"vision_feature_layer": ["2"]}, "must hold integers"),
    ({"vision_feature_merge": "max"}, r"`vision_feature_merge`='max' is unknown; allowed: \('single', 'mean'"),
    ({"secondary_vision_feature_merge": "sum"}, "`secondary_vision_feature_merge`='sum' is unknown"),
    ({"vision_feature_merge": "single"}, "'single' takes exactly one layer"),
    ({"vision_aligner": "conv"}, r"`vision_aligner`='conv' is unknown; allowed: \('identity', 'linear', 'mlp'\)"),
    ({"secondary_vision_aligner_depth": 0}, "`secondary_vision_aligner_depth` must be a positive integer, got 0"),
    ({"secondary_vision_aligner_ratio": -1}, "`secondary_vision_aligner_ratio` must be a positive integer"),
    ({"projector_depth": 0}, "`projector_depth` must be a positive integer"),
    ({"merge_conv_kernel_size": 2}, "`merge_conv_kernel_size` must be odd"),
    ({"vision_feature_select_strategy": "cls"}, "`vision_feature_select_strategy`='cls' is unknown"),
    ({"image_seq_length": 10}, r"`image_seq_length`=10 does not match the encoder's 4x4 patch grid \(16 tokens\)"),
    ({"secondary_vision_image_std": [0.5, 0.0, 0.5]}, "`secondary_vision_image_std` must be 3 per-channel values"),
    (
        {"secondary_vision_config": tiny_vision_config("dinov2", image_size=42)},
        "patch grids must match.*vision_config: 4x4, secondary_vision_config: 6x6",
    ),
]


@pytest.mark.parametrize(
    "overrides,message", INVALID, ids=[str(list(o)[0]) + "-" + str(i) for i, (o, _) in enumerate(INVALID)]
)
def test_invalid_config_raises_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_comm_config("comm", **overrides)


def test_encoder_without_patch_grid_is_rejected():
    with pytest.raises(ValueError, match="has no `image_size`"):
        CommConfig(
            vision_config={"model_type": "clip_vision_model", "image_size": None},
            secondary_vision_config=None,
            text_config=tiny_text_config(320),
            vision_feature_layer=-2,
            vision_feature_merge="single",
        )
