"""CommForConditionalGeneration: LLaVA parity, encoder table, save/load, generation, frozen encoders, errors."""

import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
)

from comm_vlm import CommConfig, CommForConditionalGeneration, CommModel, CommProcessor
from comm_vlm.testing import (
    IMAGE_TOKEN_ID,
    build_tiny_checkpoint,
    tiny_comm_config,
    tiny_image_processor,
    tiny_llava_config,
    tiny_vision_config,
)


def prompt_ids(num_images=1, tokens_per_image=16, batch=1):
    row = [1, 5, 6]
    for _ in range(num_images):
        row += [IMAGE_TOKEN_ID] * tokens_per_image + [7]
    return torch.tensor([row + [8, 9]] * batch)


def randomize(model):
    """Random values everywhere (layerscale logits, norms, BN statistics) so no test passes on an init identity."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name and "weight" in name else 0.0))
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.copy_(torch.rand_like(buffer) + 0.5)
            elif name.endswith("running_mean"):
                buffer.copy_(torch.randn_like(buffer))
    return model.eval()


# --- parity with transformers' LLaVA ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava_pair():
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(tiny_llava_config()).eval()
    comm = CommForConditionalGeneration(tiny_comm_config("llava")).eval()
    comm.load_state_dict(llava.state_dict(), strict=True)
    return llava, comm


def test_llava_layout_has_llava_state_dict(llava_pair):
    llava, comm = llava_pair
    assert comm.state_dict().keys() == llava.state_dict().keys()


def test_llava_layout_logits_equal_llava(llava_pair):
    llava, comm = llava_pair
    ids, pixels = prompt_ids(batch=2), torch.randn(2, 3, 28, 28)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on the second row
    with torch.no_grad():
        expected = llava(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        actual = comm(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    assert (expected - actual).abs().max() <= 1e-5


def test_llava_layout_greedy_generation_equals_llava(llava_pair):
    llava, comm = llava_pair
    ids, pixels = prompt_ids(), torch.randn(1, 3, 28, 28)
    kwargs = {"max_new_tokens": 12, "do_sample": False}
    assert torch.equal(
        llava.generate(input_ids=ids, pixel_values=pixels, **kwargs),
        comm.generate(input_ids=ids, pixel_values=pixels, **kwargs),
    )


# --- the encoder / strategy table -------------------------------------------------------------------------------

# name -> CommConfig overrides on top of the tiny "comm" layout
CASES = {
    "clip-single": dict(secondary_vision_config=None, vision_feature_layer=2, vision_feature_merge="single"),
    "clip-mean-all": dict(secondary_vision_config=None, vision_feature_merge="mean"),
    "clip-layerscale": dict(secondary_vision_config=None, vision_feature_merge="layerscale"),
    "clip-lln": dict(secondary_vision_config=None, vision_aligner="linear"),
    "clip-conv": dict(secondary_vision_config=None, vision_feature_merge="conv_layerscale", merge_hidden_size=24),
    "dinov2-mlp": dict(
        vision_config=tiny_vision_config("dinov2"),
        secondary_vision_config=None,
        vision_feature_layer=[3, 4],
        vision_aligner="mlp",
    ),
    "dinov2-registers": dict(
        vision_config=tiny_vision_config("dinov2_with_registers", num_register_tokens=3),
        secondary_vision_config=None,
        vision_feature_merge="mean",
    ),
    "mae": dict(vision_config=tiny_vision_config("vit_mae"), secondary_vision_config=None),
    "deit": dict(
        vision_config=tiny_vision_config("deit"),
        secondary_vision_config=None,
        vision_feature_layer=-1,
        vision_feature_merge="single",
    ),
    "siglip": dict(vision_config=tiny_vision_config("siglip_vision_model"), secondary_vision_config=None),
    "comm": dict(),
    "comm-conv-linear": dict(secondary_vision_feature_merge="conv_layerscale", secondary_vision_aligner="linear"),
    "siglip+dinov2-mean": dict(
        vision_config=tiny_vision_config("siglip_vision_model"),
        secondary_vision_feature_merge="mean",
        projector_depth=2,
    ),
}
# Prefix tokens each family puts before its patch tokens (CLS, distillation, registers).
PREFIX_TOKENS = {
    "clip_vision_model": 1,
    "dinov2": 1,
    "dinov2_with_registers": 4,
    "vit_mae": 1,
    "deit": 2,
    "siglip_vision_model": 0,
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    torch.manual_seed(0)
    config = tiny_comm_config("comm", **CASES[request.param])
    return request.param, randomize(CommForConditionalGeneration(config))


def test_forward_shapes(case):
    _, model = case
    ids, pixels = prompt_ids(num_images=2, batch=2), torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    assert out.logits.shape == (*ids.shape, 320)
    assert out.image_hidden_states.shape == (4 * 16, model.config.text_config.hidden_size)


def test_save_load_round_trip_identical_logits(case, tmp_path):
    _, model = case
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, CommForConditionalGeneration)
    ids, pixels = prompt_ids(), torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, pixel_values=pixels).logits, reloaded(input_ids=ids, pixel_values=pixels).logits
        )


def test_patch_tokens_only(case):
    """Each encoder's selected layers arrive without its prefix tokens, in patch order."""
    _, model = case
    pixels = torch.randn(2, 3, 28, 28)
    for tower, prefix in zip(model.model.vision_towers, model.config.encoder_prefixes):
        vision_config = getattr(model.config, f"{prefix}_config")
        layers = model.config.branch(prefix)["layers"]
        feats = model.model._encode(tower, model.model._encoder_pixels(pixels, prefix), prefix)
        kwargs = {}
        if vision_config.model_type == "vit_mae":
            kwargs["noise"] = torch.arange(16).expand(2, -1).float()
        with torch.no_grad():
            hidden = tower(model.model._encoder_pixels(pixels, prefix), output_hidden_states=True, **kwargs)
        skip = PREFIX_TOKENS[vision_config.model_type]
        expected = torch.stack([hidden.hidden_states[i][:, skip:] for i in layers])
        assert feats.shape == (len(layers), 2, 16, vision_config.hidden_size)
        torch.testing.assert_close(feats, expected)


def test_greedy_generation_cache_equals_no_cache(case):
    _, model = case
    ids, pixels = prompt_ids(), torch.randn(1, 3, 28, 28)
    kwargs = {"max_new_tokens": 8, "do_sample": False}
    assert torch.equal(
        model.generate(input_ids=ids, pixel_values=pixels, use_cache=True, **kwargs),
        model.generate(input_ids=ids, pixel_values=pixels, use_cache=False, **kwargs),
    )


# --- single-model behaviours ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comm_model():
    torch.manual_seed(0)
    return randomize(CommForConditionalGeneration(tiny_comm_config("comm")))


def test_mae_is_deterministic_without_masking():
    model = CommForConditionalGeneration(tiny_comm_config("comm", **CASES["mae"])).eval()
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        a = torch.stack(model.model.get_image_features(pixels).pooler_output)
        b = torch.stack(model.model.get_image_features(pixels).pooler_output)
    assert torch.equal(a, b) and a.shape[1] == 16


@pytest.mark.parametrize("num_tokens,num_images", [(15, 1), (17, 1), (16, 2)])
def test_placeholder_image_mismatch_is_a_clear_error(comm_model, num_tokens, num_images):
    ids = torch.tensor([[1] + [IMAGE_TOKEN_ID] * num_tokens + [7]])
    with pytest.raises(ValueError, match=rf"the text has {num_tokens} image tokens .* give {16 * num_images} visual"):
        comm_model(input_ids=ids, pixel_values=torch.randn(num_images, 3, 28, 28))


def test_frozen_encoders_run_without_autograd_and_keep_only_used_layers(comm_model):
    model = CommForConditionalGeneration(comm_model.config)
    model.load_state_dict(comm_model.state_dict())
    model.train()
    for tower in model.model.vision_towers:
        tower.requires_grad_(False)
    seen = {}

    def spy(name):
        def hook(module, args, kwargs, output):
            seen[name] = (
                output.last_hidden_state.requires_grad,
                kwargs.get("output_hidden_states"),
                sum(h is not None for h in output.hidden_states),
            )

        return hook

    model.model.vision_tower.register_forward_hook(spy("vision"), with_kwargs=True)
    model.model.secondary_vision_tower.register_forward_hook(spy("secondary"), with_kwargs=True)
    out = model(input_ids=prompt_ids(), pixel_values=torch.randn(1, 3, 28, 28), labels=prompt_ids())
    out.loss.backward()
    assert seen["vision"] == (False, [1, 2, 3, 4], 4)
    assert seen["secondary"] == (False, [3, 4], 2)
    for name, param in model.named_parameters():
        if "vision_tower" in name:
            assert param.grad is None, name
        elif name.startswith("model.connector") or name.startswith("model.multi_modal_projector"):
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_trainable_encoder_gets_gradients(comm_model):
    model = CommForConditionalGeneration(comm_model.config).train()
    out = model(input_ids=prompt_ids(), pixel_values=torch.randn(1, 3, 28, 28), labels=prompt_ids())
    out.loss.backward()
    grads = [p.grad for p in model.model.vision_tower.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_secondary_encoder_gets_its_own_normalisation(comm_model):
    """DINOv2 sees the pixels an ImageNet-normalising processor would give, not CLIP-normalised ones."""
    image = Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy())
    clip_pixels = tiny_image_processor(28)(image, return_tensors="pt").pixel_values
    imagenet = tiny_image_processor(28)
    imagenet.image_mean, imagenet.image_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    imagenet_pixels = imagenet(image, return_tensors="pt").pixel_values
    assert not torch.allclose(clip_pixels, imagenet_pixels, atol=1e-2)
    torch.testing.assert_close(
        comm_model.model._encoder_pixels(clip_pixels, "secondary_vision"), imagenet_pixels, atol=1e-5, rtol=1e-5
    )
    assert comm_model.model._encoder_pixels(clip_pixels, "vision") is clip_pixels


def test_auto_classes_resolve(tmp_path):
    fields = tiny_comm_config("llava").to_dict()
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    assert isinstance(config, CommConfig)
    assert isinstance(AutoModel.from_config(config), CommModel)
    build_tiny_checkpoint(tmp_path, layout="comm")
    assert isinstance(AutoProcessor.from_pretrained(tmp_path), CommProcessor)
    assert isinstance(AutoModelForImageTextToText.from_pretrained(tmp_path), CommForConditionalGeneration)


def test_inputs_embeds_path_equals_input_ids_path(comm_model):
    ids, pixels = prompt_ids(), torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        a = comm_model(input_ids=ids, pixel_values=pixels).logits
        b = comm_model(inputs_embeds=comm_model.get_input_embeddings()(ids), pixel_values=pixels).logits
    torch.testing.assert_close(a, b)
