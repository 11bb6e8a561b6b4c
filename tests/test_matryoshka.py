"""Matryoshka-LLaVA (M3): pooling, nesting, scales, LLaVA equivalence, all-scale loss, generation, processor, budget,
pipeline, save/load and the oracle analysis."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

from comm_vlm import (
    CommForConditionalGeneration,
    MatryoshkaLlavaConfig,
    MatryoshkaLlavaForConditionalGeneration,
    MatryoshkaLlavaModel,
    MatryoshkaLlavaProcessor,
    choose_image_scales,
    nested_visual_tokens,
    oracle_analysis,
    select_visual_tokens,
    valid_matryoshka_scales,
)
from comm_vlm.models.configuration_matryoshka import default_matryoshka_scales
from comm_vlm.models.packing_matryoshka import build_scale_batch, relay_training_inputs
from comm_vlm.testing import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN_ID,
    build_tiny_tokenizer,
    tiny_comm_config,
    tiny_image_processor,
    tiny_text_config,
    tiny_vision_config,
)


PROMPT = "USER: <image>\nWhat is this? ASSISTANT:"


def m3_config(**overrides) -> MatryoshkaLlavaConfig:
    fields = dict(
        vision_config=tiny_vision_config(), text_config=tiny_text_config(320), image_token_index=IMAGE_TOKEN_ID
    )
    fields.update(overrides)
    return MatryoshkaLlavaConfig(**fields)


def randomize(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name and "weight" in name else 0.0))
    return model.eval()


def image(seed=0, size=(40, 50)):
    return Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize(MatryoshkaLlavaForConditionalGeneration(m3_config()))


@pytest.fixture(scope="module")
def processor():
    return MatryoshkaLlavaProcessor(
        tiny_image_processor(28), build_tiny_tokenizer(), num_image_tokens=16, chat_template=CHAT_TEMPLATE
    )


# --- pooling ----------------------------------------------------------------------------------------------------


def reference_pool(features, scale):
    """avg_pool2d on the (N, D, g, g) image of a row-major (N, g*g, D) grid, written independently."""
    n, tokens, dim = features.shape
    grid = int(round(tokens**0.5))
    kernel = grid // int(round(scale**0.5))
    image_like = features.reshape(n, grid, grid, dim).permute(0, 3, 1, 2)
    return F.avg_pool2d(image_like, kernel, kernel).permute(0, 2, 3, 1).reshape(n, scale, dim)


@pytest.mark.parametrize("grid", [24, 4, 6, 12])
def test_pooling_equals_avg_pool2d_reference(grid):
    features = torch.randn(3, grid * grid, 8)
    for scale in valid_matryoshka_scales(grid):
        torch.testing.assert_close(select_visual_tokens(features, scale), reference_pool(features, scale))


def test_one_pool_equals_the_papers_cascade_on_24x24():
    features = torch.randn(2, 576, 8)
    grid = features.reshape(2, 24, 24, 8).permute(0, 3, 1, 2)
    cascade = {576: grid}
    for scale, kernel in [(144, 2), (36, 2), (9, 2), (1, 3)]:  # 2x2 stride 2 three times, then 3x3
        grid = F.avg_pool2d(grid, kernel, kernel)
        cascade[scale] = grid
    assert default_matryoshka_scales(24) == [1, 9, 36, 144, 576]
    for scale, pooled in nested_visual_tokens(features, [1, 9, 36, 144, 576]).items():
        expected = cascade[scale].permute(0, 2, 3, 1).reshape(2, scale, 8)
        torch.testing.assert_close(pooled, expected)


def test_token_sets_are_nested_means_in_row_major_order():
    features = torch.randn(2, 576, 4)
    sets = nested_visual_tokens(features, [1, 9, 36, 144, 576])
    scales = [1, 9, 36, 144, 576]
    for coarse, fine in zip(scales, scales[1:]):
        side_c, side_f = int(coarse**0.5), int(fine**0.5)
        k = side_f // side_c
        fine_grid = sets[fine].reshape(2, side_f, side_f, 4)
        for r in range(side_c):
            for c in range(side_c):
                block = fine_grid[:, r * k : (r + 1) * k, c * k : (c + 1) * k].reshape(2, -1, 4).mean(1)
                torch.testing.assert_close(sets[coarse][:, r * side_c + c], block)


def test_spatial_and_sequential_sampling():
    features = torch.arange(16.0).view(1, 16, 1)
    assert select_visual_tokens(features, 4, "sequential").flatten().tolist() == [0, 1, 2, 3]
    # one token per 2x2 block, at offset (k // 2, k // 2) = (1, 1): rows 1, 3 x cols 1, 3
    assert select_visual_tokens(features, 4, "spatial").flatten().tolist() == [5, 7, 13, 15]
    assert select_visual_tokens(features, 16, "spatial") is features


def test_scale_rules_and_invalid_scales_list_the_valid_ones(model, processor):
    assert valid_matryoshka_scales(24) == [1, 4, 9, 16, 36, 64, 144, 576]
    assert default_matryoshka_scales(4) == [1, 4, 16] and default_matryoshka_scales(14) == [1, 49, 196]
    with pytest.raises(ValueError, match=r"Valid scales: \[1, 4, 16\]"):
        m3_config(matryoshka_scales=[1, 9])
    with pytest.raises(ValueError, match=r"Valid scales: \[1, 4, 16\]"):
        select_visual_tokens(torch.randn(1, 16, 2), 9)
    with pytest.raises(ValueError, match=r"Valid scales: \[1, 4, 16\]"):
        processor(images=image(), text=PROMPT, matryoshka_scale=8)
    inputs = processor(images=image(), text=PROMPT, return_tensors="pt")
    with pytest.raises(ValueError, match=r"Valid scales: \[1, 4, 16\]"):
        model.generate(**inputs, matryoshka_scale=2, max_new_tokens=1)
    with pytest.raises(ValueError, match="not a trained scale"):
        m3_config(matryoshka_scales=[1, 16], matryoshka_default_scale=4)


def test_config_defaults_are_llava_1_5_m3_and_comm_fields_work():
    config = MatryoshkaLlavaConfig()
    assert config.model_type == "matryoshka_llava" and config.secondary_vision_config is None
    assert (config.vision_feature_layer, config.vision_feature_merge, config.projector_depth) == (-2, "single", 2)
    assert config.matryoshka_scales == [1, 9, 36, 144, 576] and config.matryoshka_default_scale == 576
    assert config.image_seq_length == 576 and config.num_image_tokens(9) == 9 and config.num_image_tokens() == 576
    assert (config.matryoshka_token_selection, config.matryoshka_training_mode) == ("avg_pool", "all_scales")
    with pytest.raises(ValueError, match="matryoshka_training_mode"):
        m3_config(matryoshka_training_mode="sometimes")
    with pytest.raises(ValueError, match="matryoshka_packing"):
        m3_config(matryoshka_packing="dense")
    with pytest.raises(ValueError, match="square patch grid"):
        m3_config(vision_feature_select_strategy="full")


# --- model ------------------------------------------------------------------------------------------------------


def batch_at(processor, scale=None, texts=None, images=None, labels="answer", **kwargs):
    """Right-padded training-style batch at `scale` (answer-only or all-token labels, images never labelled)."""
    texts = texts or [PROMPT + " A red square.</s>", "USER: <image>\nand <image>\nsame? ASSISTANT: no</s>"]
    images = images or [image(0), image(1), image(2)]
    batch = processor(
        images=images,
        text=texts,
        return_tensors="pt",
        padding=True,
        padding_side="right",
        matryoshka_scale=scale,
        **kwargs,
    )
    target = batch["input_ids"].clone()
    target[(batch["attention_mask"] == 0) | (target == IMAGE_TOKEN_ID)] = -100
    if labels == "answer":
        for row, ids in enumerate(batch["input_ids"].tolist()):
            answer_start = max(i for i, t in enumerate(ids) if t == processor.tokenizer.convert_tokens_to_ids(":"))
            target[row, : answer_start + 1] = -100
    batch["labels"] = target
    return batch


def manual_loss(model, batch):
    """Token-mean next-token CE from the logits of a plain inference forward (no loss code of the model)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


@pytest.mark.parametrize("labels", ["answer", "all"])
@pytest.mark.parametrize("share_prefix,packing", [(True, "split"), (False, "split"), (True, "one_row")])
def test_all_scale_loss_is_the_mean_of_single_scale_losses(model, processor, labels, share_prefix, packing):
    model.config.matryoshka_share_prefix, model.config.matryoshka_packing = share_prefix, packing
    try:
        singles = [manual_loss(model, batch_at(processor, s, labels=labels)) for s in model.config.matryoshka_scales]
        with torch.no_grad():
            full = batch_at(processor, None, labels=labels)  # full-grid placeholders, as a collator emits them
            out = model(**full)
            small = model(**batch_at(processor, 1, labels=labels))  # the input's run length does not matter
    finally:
        model.config.matryoshka_share_prefix, model.config.matryoshka_packing = True, "auto"
    expected = torch.stack(singles).mean()
    assert abs(out.loss.item() - expected.item()) <= 1e-5
    assert abs(small.loss.item() - expected.item()) <= 1e-5
    if packing == "split":  # per sample: a plain row at the full grid, then one packed row with the other scales
        assert out.logits.shape[0] == 4 and out.matryoshka_row_source.tolist() == [0, 0, 1, 1]
        assert out.matryoshka_image_scales.tolist() == [16, 1, 4, 16, 16, 1, 1, 4, 4]
    else:  # one packed row per sample, scales in config order
        assert out.logits.shape[0] == 2 and out.matryoshka_row_source.tolist() == [0, 1]
        assert out.matryoshka_image_scales.tolist() == [1, 4, 16, 1, 1, 4, 4, 16, 16]


def test_eager_attention_and_padded_fallback_give_the_same_loss(model, processor):
    batch = batch_at(processor)
    with torch.no_grad():
        expected = model(**batch).loss
        eager = MatryoshkaLlavaForConditionalGeneration(copy.deepcopy(model.config))
        eager.load_state_dict(model.state_dict())
        eager.eval().set_attn_implementation("eager")
        variants = [[[s] * n for s in (1, 4, 16)] for n in (1, 2)]  # per sample, per scale, per image
        rows = build_scale_batch(
            batch["input_ids"], batch["attention_mask"], batch["labels"], IMAGE_TOKEN_ID, variants, row_format="padded"
        )
        padded = model(
            input_ids=rows.input_ids,
            attention_mask=rows.attention_mask,
            labels=rows.labels,
            pixel_values=batch["pixel_values"],
            matryoshka_image_scales=rows.image_scales,
            matryoshka_image_index=rows.image_index,
        )
        assert abs(eager(**batch).loss.item() - expected.item()) <= 1e-5
    assert rows.input_ids.shape[0] == 6 and abs(padded.loss.item() - expected.item()) <= 1e-5


def test_random_scale_mode_trains_one_scale_per_sample(processor):
    torch.manual_seed(0)
    model = randomize(MatryoshkaLlavaForConditionalGeneration(m3_config(matryoshka_training_mode="random_scale")))
    batch = batch_at(processor)
    model.train()
    with torch.no_grad():
        out = model(**batch)
    model.eval()
    runs = out.matryoshka_image_scales.tolist()
    assert len(runs) == 3 and runs[1] == runs[2]  # one scale per sample, for every image of that sample
    texts = [PROMPT + " A red square.</s>", "USER: <image>\nand <image>\nsame? ASSISTANT: no</s>"]
    samples = [([texts[0]], [image(0)], runs[0]), ([texts[1]], [image(1), image(2)], runs[1])]
    losses, counts = [], []
    for text, images, scale in samples:
        single = batch_at(processor, scale, texts=text, images=images)
        losses.append(manual_loss(model, single))
        counts.append(int((single["labels"][:, 1:] != -100).sum()))
    weights = torch.tensor(counts, dtype=torch.float)
    expected = (torch.stack(losses) * weights).sum() / weights.sum()
    assert abs(out.loss.item() - expected.item()) <= 1e-5
    with torch.no_grad():  # evaluation with labels averages all scales
        eval_loss = model(**batch).loss
    singles = [manual_loss(model, batch_at(processor, s)) for s in model.config.matryoshka_scales]
    assert abs(eval_loss.item() - torch.stack(singles).mean().item()) <= 1e-5


def test_a_training_forward_without_the_objective_is_a_clear_error(model, processor):
    """Training on images that were neither re-laid for the scales nor given labels (a loss computed outside the
    model) would train only the scale the placeholders hold: it raises, unless one scale is asked for explicitly."""
    batch = batch_at(processor)
    relaid, _ = relay_training_inputs(model.config, dict(batch), weighted=False)
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    model.train()
    try:
        for forward in (model, model.model):
            with pytest.raises(ValueError, match=r"not re-laid.*TrainingBatchCollator.*build_trainer"):
                forward(**no_labels)
        model.model(**{k: v for k, v in relaid.items() if k != "labels"})  # re-laid by the training collator
        model(**batch)  # labels: the model re-lays the batch itself
        single = {k: v for k, v in batch_at(processor, 4).items() if k != "labels"}
        model.model(**single, matryoshka_scale=4)  # single-scale training
        with torch.no_grad():
            model(**no_labels)  # no gradients: inference in training mode
    finally:
        model.eval()


def test_full_scale_equals_the_foundations_llava_layout(model):
    llava = CommForConditionalGeneration(tiny_comm_config("llava")).eval()
    assert llava.state_dict().keys() == model.state_dict().keys()
    llava.load_state_dict(model.state_dict())
    ids = torch.tensor(
        [[3, 3, 1, 5, 6] + [IMAGE_TOKEN_ID] * 16 + [7, 8, 9], [1, 5, 6, 7, 8] + [IMAGE_TOKEN_ID] * 16 + [7, 8, 9]]
    )
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = llava(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        assert torch.equal(model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits, expected)
    kwargs = {"max_new_tokens": 8, "do_sample": False}
    assert torch.equal(
        model.generate(input_ids=ids[1:], pixel_values=pixels[1:], **kwargs),
        llava.generate(input_ids=ids[1:], pixel_values=pixels[1:], **kwargs),
    )


@pytest.mark.parametrize("scale", [1, 4, 16])
def test_generate_scale_per_call_equals_processor_scale(model, processor, scale):
    full = processor(images=image(), text=PROMPT, return_tensors="pt")
    at_scale = processor(images=image(), text=PROMPT, return_tensors="pt", matryoshka_scale=scale)
    assert int((at_scale["input_ids"] == IMAGE_TOKEN_ID).sum()) == scale
    assert at_scale["matryoshka_image_scales"].tolist() == [scale]
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    relaid = model.generate(**full, matryoshka_scale=scale, **kwargs)
    direct = model.generate(**at_scale, **kwargs)
    assert torch.equal(relaid[:, : full["input_ids"].shape[1]], full["input_ids"])  # the caller's prompt comes back
    assert torch.equal(relaid[:, full["input_ids"].shape[1] :], direct[:, at_scale["input_ids"].shape[1] :])
    beams = model.generate(**full, matryoshka_scale=scale, num_beams=2, num_return_sequences=2, **kwargs)
    assert beams.shape[0] == 2 and torch.equal(beams[:, : full["input_ids"].shape[1]], full["input_ids"].repeat(2, 1))


def test_forward_reads_the_scale_from_the_placeholders_and_checks_an_explicit_one(model, processor):
    inputs = processor(images=image(), text=PROMPT, return_tensors="pt", matryoshka_scale=4)
    no_counts = {k: v for k, v in inputs.items() if k != "matryoshka_image_scales"}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, model(**no_counts).logits)
        torch.testing.assert_close(model(**inputs).logits, model(**no_counts, matryoshka_scale=4).logits)
        with pytest.raises(ValueError, match="matryoshka_scale=16 needs 16 image tokens"):
            model(**no_counts, matryoshka_scale=16)


def test_budget_picks_per_image_scales_the_model_recovers(model, processor):
    assert choose_image_scales(6, 64, [1, 9, 36, 144, 576]) == [9] * 6  # the paper's video setting: 6 frames x 9
    assert choose_image_scales(3, 200, [1, 9, 36, 144, 576], "greedy") == [36] * 3
    assert choose_image_scales(2, 20, [1, 4, 16], "greedy") == [16, 4]
    with pytest.raises(ValueError, match="smallest scale 1 needs 6 tokens"):
        choose_image_scales(6, 5, [1, 4, 16])
    frames = [image(i) for i in range(6)]
    texts = ["USER: " + "<image>" * 6 + "\nWhat happens? ASSISTANT:", "USER: <image><image> Same? ASSISTANT:"]
    images = frames + [image(7), image(8)]
    batch = processor(
        images=images, text=texts, return_tensors="pt", padding=True, visual_token_budget=20, budget_strategy="greedy"
    )
    assert batch["matryoshka_image_scales"].tolist() == [4, 4, 4, 4, 1, 1, 16, 4]
    assert (batch["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist() == [18, 20]
    with torch.no_grad():
        logits = model(**batch).logits  # touching runs of 16 + 4 split by matryoshka_image_scales
        with pytest.raises(ValueError, match="Cannot match the image placeholders"):
            model(**{k: v for k, v in batch.items() if k != "matryoshka_image_scales"})
    assert logits.shape[:2] == batch["input_ids"].shape
    uniform = processor(images=frames, text=texts[0], return_tensors="pt", visual_token_budget=20)
    assert uniform["matryoshka_image_scales"].tolist() == [1] * 6
    full = processor(images=frames, text=texts[0], return_tensors="pt")
    generated = model.generate(**full, visual_token_budget=6, max_new_tokens=3, do_sample=False)
    direct = model.generate(**uniform, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated[:, -3:], direct[:, -3:])


def test_pipeline_takes_the_scale_per_request(model, processor, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    pipe = pipeline("image-text-to-text", model=str(tmp_path))
    assert isinstance(pipe.processor, MatryoshkaLlavaProcessor) and pipe.processor.matryoshka_scales == [1, 4, 16]
    for scale in (1, 4):
        kwargs = {"max_new_tokens": 5, "generate_kwargs": {"do_sample": False}, "return_full_text": False}
        out = pipe(images=image(), text=PROMPT, matryoshka_scale=scale, **kwargs)[0]["generated_text"]
        inputs = processor(images=image(), text=PROMPT, return_tensors="pt", matryoshka_scale=scale)
        ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        assert out == processor.decode(ids, skip_special_tokens=True)
    chat = [{"role": "user", "content": [{"type": "image", "image": image()}, {"type": "text", "text": "Hi?"}]}]
    answer = pipe(text=chat, max_new_tokens=3, processor_kwargs={"matryoshka_scale": 1})[0]["generated_text"][-1]
    assert answer["role"] == "assistant"


def test_save_load_round_trip_and_auto_classes(model, processor, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, MatryoshkaLlavaConfig) and config.matryoshka_scales == [1, 4, 16]
    assert isinstance(AutoModel.from_config(config), MatryoshkaLlavaModel)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, MatryoshkaLlavaForConditionalGeneration)
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded_processor, MatryoshkaLlavaProcessor)
    assert (loaded_processor.matryoshka_scales, loaded_processor.matryoshka_default_scale) == ([1, 4, 16], 16)
    for scale in (1, 4, 16):
        inputs = loaded_processor(images=image(), text=PROMPT, return_tensors="pt", matryoshka_scale=scale)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)


def test_comm_plus_matryoshka_trains_at_every_scale(processor):
    torch.manual_seed(0)
    config = m3_config(
        secondary_vision_config=tiny_vision_config("dinov2"),
        vision_feature_layer=[1, 2, 3, 4],
        vision_feature_merge="lln_layerscale",
        secondary_vision_feature_layer=[3, 4],
        projector_depth=1,
        train_vision_tower=False,
    )
    model = MatryoshkaLlavaForConditionalGeneration(config).train()
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    out = model(**batch_at(processor))
    out.loss.backward()
    assert model.model.connector.merges[1].linear_weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.secondary_vision_tower.parameters())
    frozen_llm = MatryoshkaLlavaForConditionalGeneration(m3_config(train_language_model=False))
    assert not any(p.requires_grad for p in frozen_llm.model.language_model.parameters())
    assert not frozen_llm.lm_head.weight.requires_grad


# --- oracle -----------------------------------------------------------------------------------------------------


def test_oracle_report_on_a_hand_made_table():
    references = ["cat", "dog", "car", "red", "two"]
    predictions = {
        1: ["cat", "cat", "bus", "red", "one"],
        9: ["cat", "dog", "bus", "blue", "one"],
        576: ["dog", "dog", "car", "red", "one"],
    }
    report = oracle_analysis(predictions, references)
    assert report.oracle_scale == [1, 9, 576, 1, None]
    assert report.oracle_tokens == [1, 9, 576, 1, 1]  # an unanswerable sample costs the cheapest scale
    assert report.oracle_accuracy == pytest.approx(0.8) and report.oracle_mean_tokens == pytest.approx(117.6)
    assert report.accuracy_per_scale == pytest.approx({1: 0.4, 9: 0.4, 576: 0.6})
    excluded = oracle_analysis(predictions, references, unanswered="exclude")
    assert excluded.oracle_mean_tokens == pytest.approx(587 / 4)
    per_image = oracle_analysis(predictions, references, tokens_per_scale={1: 6, 9: 54, 576: 3456})
    assert per_image.oracle_tokens[:3] == [6, 54, 3456]
    assert "| oracle | 117.60 | 0.8000 |" in report.to_markdown()
    with pytest.raises(ValueError, match="Scale 9 has 4 predictions for 5 references"):
        oracle_analysis({1: references, 9: references[:4]}, references)


def test_plot_oracle_writes_a_figure(tmp_path):
    pytest.importorskip("matplotlib")
    from comm_vlm import plot_oracle

    report = oracle_analysis({1: ["a", "b"], 9: ["a", "c"], 576: ["x", "c"]}, ["a", "c"])
    ax = plot_oracle(report, path=str(tmp_path / "oracle.png"), title="granularity")
    assert (tmp_path / "oracle.png").stat().st_size > 0 and ax.get_xscale() == "log"
