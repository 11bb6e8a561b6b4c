"""The families against transformers' model contract, where transformers' common tests (`tests/transformers_contract/`)
do not look: call-time vision options, pre-shifted labels in M3's loss, init of weights missing from a checkpoint,
sharding plans and full-graph compilation."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import StaticCache

from comm_vlm.families import get_family
from comm_vlm.testing import IMAGE_TOKEN_ID, tiny_comm_config


FAMILIES = ["comm", "matryoshka_llava", "adaptive_combiner"]
OVERRIDES = {"adaptive_combiner": {"combiner_num_latents": 4}}


def build(family: str, layout: str = "llava", **fields):
    config = tiny_comm_config(layout, family=family, **{**OVERRIDES.get(family, {}), **fields})
    return get_family(family).model_class(config).eval()


def with_config(model, **fields):
    """A model of the same class and weights whose config differs in `fields`."""
    config = copy.deepcopy(model.config)
    for key, value in fields.items():
        setattr(config, key, value)
    other = type(model)(config).eval()
    other.load_state_dict(model.state_dict())
    return other


def prompt(model, num_images: int = 1, tokens_per_image: int | None = None) -> torch.Tensor:
    per_image = tokens_per_image or getattr(model.config, "num_image_tokens", None) or model.config.image_seq_length
    per_image = per_image() if callable(per_image) else per_image
    ids = [1, 9]
    for _ in range(num_images):
        ids += [IMAGE_TOKEN_ID] * per_image + [10]
    return torch.tensor([ids + [11, 12]])


@pytest.mark.parametrize("family", FAMILIES)
def test_call_time_vision_feature_layer_is_honoured(family):
    """`vision_feature_layer` at call time equals a config that says it (forward, `get_image_features`, generate)."""
    model = build(family)  # config: layer -2 (LLaVA-1.5)
    reference = with_config(model, vision_feature_layer=-1)
    pixels, ids = torch.randn(1, 3, 28, 28), prompt(model)
    with torch.no_grad():
        features = model.get_image_features(pixels, vision_feature_layer=-1).pooler_output
        torch.testing.assert_close(features, reference.get_image_features(pixels).pooler_output)
        logits = model(input_ids=ids, pixel_values=pixels, vision_feature_layer=-1).logits
        torch.testing.assert_close(logits, reference(input_ids=ids, pixel_values=pixels).logits)
        assert not torch.allclose(features[0], model.get_image_features(pixels).pooler_output[0])
        if family != "adaptive_combiner":  # its backbone refuses them (see the test below)
            base = model.model(input_ids=ids, pixel_values=pixels, vision_feature_layer=-1).last_hidden_state
            torch.testing.assert_close(base, reference.model(input_ids=ids, pixel_values=pixels).last_hidden_state)
        call = dict(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
        if family == "adaptive_combiner":  # its forward does not take them: generate refuses them
            with pytest.raises(ValueError, match="vision_feature_layer"):
                model.generate(**call, vision_feature_layer=-1)
            return
        assert torch.equal(model.generate(**call, vision_feature_layer=-1), reference.generate(**call))


def test_call_time_vision_feature_select_strategy_is_honoured():
    """`vision_feature_select_strategy="full"` keeps the CLS token: 17 visual tokens per image instead of 16."""
    model = build("comm")
    reference = with_config(model, vision_feature_select_strategy="full")
    pixels, ids = torch.randn(1, 3, 28, 28), prompt(model, tokens_per_image=17)
    with torch.no_grad():
        features = model.get_image_features(pixels, vision_feature_select_strategy="full").pooler_output
        assert features[0].shape[0] == 17
        logits = model(input_ids=ids, pixel_values=pixels, vision_feature_select_strategy="full").logits
    torch.testing.assert_close(logits, reference(input_ids=ids, pixel_values=pixels).logits)


def test_call_time_vision_options_are_refused_where_they_cannot_apply():
    model = build("comm", layout="comm")  # CLIP merges 4 layers
    pixels, ids = torch.randn(1, 3, 28, 28), prompt(model)
    with pytest.raises(ValueError, match=r"selects 1 layer\(s\), but the model's merge .* built for 4"):
        model(input_ids=ids, pixel_values=pixels, vision_feature_layer=-1)
    with pytest.raises(ValueError, match="vision_feature_select_strategy='cls'"):
        model.get_image_features(pixels, vision_feature_select_strategy="cls")
    encoded = {"image": model.get_image_features(pixels)}
    with pytest.raises(ValueError, match="with precomputed `mm_encoder_outputs`"):
        model(input_ids=ids, mm_encoder_outputs=encoded, vision_feature_select_strategy="full")
    with torch.no_grad():  # four other layers are fine
        model(input_ids=ids, pixel_values=pixels, vision_feature_layer=[0, 1, 2, 3])


def test_combiner_backbone_refuses_vision_options_it_cannot_apply():
    """The combiner's backbone encodes its images without the options: they are refused, not ignored."""
    model = build("adaptive_combiner")
    with pytest.raises(ValueError, match="cannot apply here"):
        model.model(input_ids=prompt(model), pixel_values=torch.randn(1, 3, 28, 28), vision_feature_layer=-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_return_dict_false_gives_tuples(family):
    model = build(family)
    pixels, ids = torch.randn(1, 3, 28, 28), prompt(model)
    with torch.no_grad():
        outputs = model(input_ids=ids, pixel_values=pixels, return_dict=False)
        backbone = model.model(input_ids=ids, pixel_values=pixels, return_dict=False)
        features = model.get_image_features(pixels, return_dict=False)
    assert isinstance(outputs, tuple) and outputs[0].shape[:2] == ids.shape
    assert isinstance(backbone, tuple) and backbone[0].shape[:2] == ids.shape
    assert isinstance(features, tuple) and features[0].shape[-1] == model.config.vision_config.hidden_size
    model.config.return_dict = False  # the config's default, as transformers' models read it
    with torch.no_grad():
        assert isinstance(model(input_ids=ids, pixel_values=pixels), tuple)
        if family != "adaptive_combiner":  # its backbone's forward is not wrapped (`can_return_tuple`)
            assert isinstance(model.model(input_ids=ids, pixel_values=pixels), tuple)


def test_get_image_features_follows_llava():
    """Encoder outputs are the primary encoder's (`last_hidden_state`, ...); `pooler_output`: the visual tokens."""
    model = build("comm", layout="comm")
    model.set_attn_implementation("eager")
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = model.get_image_features(pixels, output_hidden_states=True, output_attentions=True)
    vision = model.config.vision_config
    assert out.last_hidden_state.shape == (2, 17, vision.hidden_size)  # CLS + 4x4 patches
    assert len(out.hidden_states) == vision.num_hidden_layers + 1 and len(out.attentions) == vision.num_hidden_layers
    assert len(out.pooler_output) == 2 and out.pooler_output[0].shape == (16, model.config.text_config.hidden_size)


def m3_losses(model, ids, pixels, labels, shift_labels):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels, labels=labels, shift_labels=shift_labels).loss


def test_m3_loss_honours_shift_labels():
    """Pre-shifted targets replace `labels` in M3's all-scales loss (and in a batch without images)."""
    model = build("matryoshka_llava", matryoshka_scales=[1, 4, 16])
    pixels, ids = torch.randn(1, 3, 28, 28), prompt(model, tokens_per_image=16)
    labels = torch.where(ids == IMAGE_TOKEN_ID, -100, ids)
    shift_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    expected = m3_losses(model, ids, pixels, labels, None)
    torch.testing.assert_close(m3_losses(model, ids, pixels, labels, shift_labels), expected)
    other_labels = torch.randint(5, 50, labels.shape)
    torch.testing.assert_close(m3_losses(model, ids, pixels, other_labels, shift_labels), expected)
    moved = shift_labels.clone()
    moved[0, 0] = 13
    assert not torch.allclose(m3_losses(model, ids, pixels, labels, moved), expected)
    text = torch.tensor([[1, 9, 10, 11, 12]])
    text_labels = text.clone()
    text_shift = torch.cat([text[:, 1:], torch.full_like(text[:, :1], 7)], dim=1)  # the last target lies past it
    with torch.no_grad():
        logits = model(input_ids=text).logits
        loss = model(input_ids=text, labels=text_labels, shift_labels=text_shift).loss
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[0], text_shift[0]))


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_weights_missing_from_a_checkpoint_get_the_encoders_init(family, tmp_path):
    """A checkpoint without the vision weights (an LLM-only start) inits them as CLIP's `_init_weights` does, not
    with the generic normal(0.02)."""
    model = build(family)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "vision_tower" not in k}, tmp_path / "model.safetensors")
    loaded = type(model).from_pretrained(tmp_path)
    vision = model.config.vision_config
    clip_std = vision.hidden_size**-0.5 * (2 * vision.num_hidden_layers) ** -0.5 * vision.initializer_factor
    q_proj = loaded.model.vision_tower.encoder.layers[0].self_attn.q_proj.weight
    assert abs(q_proj.std().item() - clip_std) < 0.25 * clip_std
    language = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(loaded.state_dict()[language], model.state_dict()[language])  # loaded weights stay


def test_sharding_plans():
    model = build("comm", layout="comm")
    assert type(model)._tp_plan == {"lm_head": "colwise_gather_output"}
    assert model.tp_plan["lm_head"] == "colwise_gather_output"
    assert {"CLIPEncoderLayer", "Dinov2Layer", "LlamaDecoderLayer"} <= set(model._no_split_modules)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_step_compiles_fullgraph(family):
    """`_can_compile_fullgraph`: a decode step with a static cache (what `generate` compiles) is captured as one graph
    and matches eager. Dynamo's capture is what `fullgraph` is about; the `eager` backend skips inductor's code
    generation, which takes minutes on CPU (`COMM_VLM_COMPILE_BACKEND=inductor` runs it)."""
    model = build(family)
    assert model._can_compile_fullgraph
    text_config = model.config.get_text_config()
    step, position = torch.tensor([[7]]), torch.tensor([3])
    outputs = []
    backend = os.environ.get("COMM_VLM_COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    for forward in (model, torch.compile(model, fullgraph=True, backend=backend)):
        cache = StaticCache(config=text_config, max_cache_len=16)
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 5, 6]]), past_key_values=cache, use_cache=True)
            outputs.append(forward(input_ids=step, past_key_values=cache, cache_position=position).logits)
    torch.testing.assert_close(outputs[1], outputs[0])
