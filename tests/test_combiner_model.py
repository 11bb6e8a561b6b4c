"""AdaptiveCombinerForConditionalGeneration: prompt selection (no label leakage), several images, generation with and
without cache, save/load, Auto classes, pipeline, a COMM branch, 3-step SFT, FLOPs accounting."""

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationMixin,
    pipeline,
)

from comm_vlm import (
    AdaptiveCombinerConfig,
    AdaptiveCombinerForConditionalGeneration,
    AdaptiveCombinerModel,
    CommProcessor,
)
from comm_vlm.models.modeling_combiner import image_rows_and_starts, prompt_text_mask
from comm_vlm.testing import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN_ID,
    build_tiny_tokenizer,
    tiny_comm_config,
    tiny_image_processor,
)


N = 4  # fused tokens per image in the tiny model (the encoder gives 16 visual tokens)
IMG = [IMAGE_TOKEN_ID] * N


def tiny_config(layout="llava", **overrides):
    fields = dict(combiner_num_latents=N, combiner_iterations=2)
    fields.update(overrides)
    return AdaptiveCombinerConfig.from_comm_config(tiny_comm_config(layout), **fields)


def randomize(model):
    """Random values everywhere (open gates, LayerNorm affine, iteration weights) so nothing passes on an init."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name and "weight" in name else 0.0))
            if name.endswith("_gate"):
                param.fill_(0.7)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize(AdaptiveCombinerForConditionalGeneration(tiny_config()))


@pytest.fixture(scope="module")
def processor():
    return CommProcessor(
        image_processor=tiny_image_processor(28),
        tokenizer=build_tiny_tokenizer(),
        num_image_tokens=N,
        chat_template=CHAT_TEMPLATE,
    )


def fused(model, **inputs):
    with torch.no_grad():
        return model(**inputs).image_hidden_states


# --- which text is fused -----------------------------------------------------------------------------------------


def test_fused_tokens_replace_the_placeholders(model):
    ids, pixels = torch.tensor([[1, 5, 6] + IMG + [7, 8, 9]]), torch.randn(1, 3, 28, 28)
    seen = {}
    model.model.language_model.register_forward_hook(
        lambda m, a, kw, out: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    assert out.image_hidden_states.shape == (N, 64) and out.logits.shape == (1, ids.shape[1], 320)
    assert torch.equal(seen["embeds"][0, 3 : 3 + N], out.image_hidden_states)


def test_no_label_leakage(model):
    """Changing the answer (input_ids and labels) leaves the fused tokens bit-identical; the prompt changes them."""
    prompt, answer = [1, 5, 6] + IMG + [7, 8, 9], [20, 21, 22, 2]
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    pixels = torch.randn(1, 3, 28, 28)
    reference = fused(model, input_ids=ids, pixel_values=pixels, labels=labels)
    other = [30, 31, 32, 33]
    ids2, labels2 = torch.tensor([prompt + other]), torch.tensor([[-100] * len(prompt) + other])
    assert torch.equal(reference, fused(model, input_ids=ids2, pixel_values=pixels, labels=labels2))
    # control: the prompt does reach the combiner
    ids3 = torch.tensor([[1, 5, 6] + IMG + [7, 8, 40] + answer])
    assert not torch.allclose(reference, fused(model, input_ids=ids3, pixel_values=pixels, labels=labels))
    # at inference the prompt alone gives the fused tokens of training (up to float summation order: fewer keys)
    torch.testing.assert_close(reference, fused(model, input_ids=torch.tensor([prompt]), pixel_values=pixels))
    loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
    assert torch.isfinite(loss)


def test_prompt_text_mask_multi_turn():
    """[sys, IMG, q1, a1*, q2, IMG, q3, a2*] (* supervised): image 1 sees sys+q1, image 2 sees sys+q1+q2+q3."""
    image = torch.tensor([[0, 1, 0, 0, 0, 1, 0, 0]]).bool()
    labels = torch.tensor([[-100, -100, -100, 5, -100, -100, -100, 6]])
    rows, starts = image_rows_and_starts(image, num_images=2, tokens_per_image=1)
    assert rows.tolist() == [0, 0] and starts.tolist() == [1, 5]
    mask = prompt_text_mask(image, rows, starts, labels=labels)
    assert mask.int().tolist() == [[1, 0, 1, 0, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0, 1, 0]]
    inference = prompt_text_mask(image, rows, starts, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]]))
    assert inference.int().tolist() == [[0, 0, 1, 1, 1, 0, 1, 1]] * 2
    limited = prompt_text_mask(image, rows, starts, prompt_length=5)
    assert limited.int().tolist() == [[1, 0, 1, 1, 1, 0, 0, 0]] * 2


def test_each_image_is_fused_with_its_own_row_separately(model):
    """Row 0: two images; row 1 (left-padded): one image. Each image = combiner(its tokens, its row's prompt)."""
    ids = torch.tensor([[1, 5] + IMG + [6] + IMG + [7, 8], [3] * 6 + [1, 9] + IMG + [10]])
    mask = torch.tensor([[1] * 13, [0] * 6 + [1] * 7])
    pixels = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        out = fused(model, input_ids=ids, pixel_values=pixels, attention_mask=mask).view(3, N, -1)
        visual = torch.stack(model.model.get_image_features(pixels).pooler_output)
        embeds = model.get_input_embeddings()(ids)
        text_masks = (ids != IMAGE_TOKEN_ID) & mask.bool()
        for image, row in enumerate([0, 0, 1]):
            expected = model.model.combiner(
                visual[image : image + 1], embeds[row : row + 1], text_masks[row : row + 1]
            )
            torch.testing.assert_close(out[image], expected[0])
        assert not torch.allclose(out[0], out[1])  # same text, different images
        ids_edit = ids.clone()
        ids_edit[0, -1] = 11  # row 0's text changes: row 1's image does not
        out2 = fused(model, input_ids=ids_edit, pixel_values=pixels, attention_mask=mask).view(3, N, -1)
    assert torch.equal(out2[2], out[2]) and not torch.allclose(out2[0], out[0])


@pytest.mark.parametrize("num_tokens,num_images", [(N - 1, 1), (N + 1, 1), (N, 2), (16, 1)])
def test_placeholder_image_mismatch_is_a_clear_error(model, num_tokens, num_images):
    ids = torch.tensor([[1] + [IMAGE_TOKEN_ID] * num_tokens + [7]])
    with pytest.raises(ValueError, match=r"Expand each image placeholder to `combiner_num_latents` = 4"):
        model(input_ids=ids, pixel_values=torch.randn(num_images, 3, 28, 28))


def test_inputs_embeds_path_equals_input_ids_path(model):
    ids, pixels = torch.tensor([[1, 5] + IMG + [7, 8]]), torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels).logits
        b = model(inputs_embeds=model.get_input_embeddings()(ids), pixel_values=pixels).logits
    torch.testing.assert_close(a, b)


# --- generation --------------------------------------------------------------------------------------------------


def spy_combiner(model):
    calls = []
    handle = model.model.combiner.register_forward_hook(lambda m, args, out: calls.append((args[2].sum(), out)))
    return calls, handle


def test_greedy_generation_cache_equals_no_cache_and_fuses_once(model):
    ids = torch.tensor([[3, 3, 1, 5, 6] + IMG + [7, 8], [1, 5, 9, 10, 11] + IMG + [12, 8]])
    mask = torch.tensor([[0, 0] + [1] * (ids.shape[1] - 2), [1] * ids.shape[1]])
    pixels = torch.randn(2, 3, 28, 28)
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6, do_sample=False)
    calls, handle = spy_combiner(model)
    try:
        cached = model.generate(use_cache=True, **kwargs)
        assert len(calls) == 1  # fused once, at prefill
        calls.clear()
        uncached = model.generate(use_cache=False, **kwargs)
    finally:
        handle.remove()
    assert torch.equal(cached, uncached) and cached.shape[1] == ids.shape[1] + 6
    assert len(calls) == 6  # without a cache every step re-fuses ... the same prompt, to the same tokens
    for text_tokens, out in calls:  # (up to float summation order: each step has more, masked, keys)
        assert text_tokens == calls[0][0]
        torch.testing.assert_close(out, calls[0][1])


def test_without_the_recorded_prompt_length_no_cache_would_fuse_generated_tokens(model):
    ids, pixels = torch.tensor([[1, 5, 6] + IMG + [7, 8]]), torch.randn(1, 3, 28, 28)
    calls, handle = spy_combiner(model)
    try:  # bypass our generate: plain GenerationMixin.generate does not know the prompt length
        GenerationMixin.generate(model, input_ids=ids, pixel_values=pixels, max_new_tokens=3, use_cache=False)
    finally:
        handle.remove()
    assert [int(c[0]) for c in calls] == [5, 6, 7]


# --- save, load, Auto classes, pipeline --------------------------------------------------------------------------


def test_save_load_round_trip_auto_classes_and_pipeline(model, processor, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, AdaptiveCombinerForConditionalGeneration)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), AdaptiveCombinerConfig)
    assert isinstance(AutoModel.from_config(reloaded.config), AdaptiveCombinerModel)
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded_processor, CommProcessor) and loaded_processor.num_image_tokens == N

    image = Image.new("RGB", (40, 30), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    inputs = loaded_processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == N
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)
    pipe = pipeline("image-text-to-text", model=reloaded, processor=loaded_processor)
    answer = pipe(text=messages, max_new_tokens=5, generate_kwargs={"do_sample": False})[0]["generated_text"]
    assert answer[-1]["role"] == "assistant" and isinstance(answer[-1]["content"], str)
    expected = reloaded.generate(**inputs, max_new_tokens=5, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert answer[-1]["content"] == loaded_processor.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize(
    "layout,overrides",
    [
        ("comm", {}),  # COMM's CLIP + DINOv2 with LLN-Layerscale feeds the combiner
        ("comm", dict(combiner_resampling="none")),  # every visual token reaches the cross-attention, N still out
        ("llava", dict(combiner_resampling="spatial", combiner_combination="residual", combiner_gating=False)),
        ("llava", dict(combiner_hidden_size=32, combiner_num_heads=2, combiner_share_weights=False)),
    ],
)
def test_variants_forward_and_generate(layout, overrides):
    model = randomize(AdaptiveCombinerForConditionalGeneration(tiny_config(layout, **overrides)))
    ids, pixels = torch.tensor([[1, 5] + IMG + [7, 8]]), torch.randn(1, 3, 28, 28)
    assert fused(model, input_ids=ids, pixel_values=pixels).shape == (N, 64)
    kwargs = dict(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(use_cache=True, **kwargs), model.generate(use_cache=False, **kwargs))


def test_llava_weights_load_and_only_the_combiner_is_new():
    from transformers import LlavaForConditionalGeneration

    from comm_vlm.testing import tiny_llava_config

    llava = LlavaForConditionalGeneration(tiny_llava_config())
    model = AdaptiveCombinerForConditionalGeneration(tiny_config())
    result = model.load_state_dict(llava.state_dict(), strict=False)
    assert not result.unexpected_keys and result.missing_keys
    assert all(key.startswith("model.combiner.") for key in result.missing_keys)


# --- training ----------------------------------------------------------------------------------------------------


def test_training_without_labels_is_a_clear_error(model):
    """A training forward that cannot tell the answer from the prompt would fuse the answer: it must raise."""
    ids, pixels = torch.tensor([[1, 5, 6] + IMG + [7, 8, 9, 20, 21]]), torch.randn(1, 3, 28, 28)
    model.train()
    try:
        with pytest.raises(ValueError, match="combiner_labels"):
            model(input_ids=ids, pixel_values=pixels)
        labels = torch.tensor([[-100] * 10 + [20, 21]])
        by_labels = model(input_ids=ids, pixel_values=pixels, labels=labels).image_hidden_states
        by_combiner_labels = model(input_ids=ids, pixel_values=pixels, combiner_labels=labels).image_hidden_states
        assert torch.equal(by_labels, by_combiner_labels)
    finally:
        model.eval()


def sft_rows():
    rows = []
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (90, 90, 90)]):
        question = {"type": "text", "text": "What is in the image?"}
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, question]},
                    {"role": "assistant", "content": [{"type": "text", "text": f"A square {i}."}]},
                ],
                "images": [Image.new("RGB", (32, 32), color)],
            }
        )
    from datasets import Dataset

    return Dataset.from_list(rows)


def sft_model():
    torch.manual_seed(0)
    # Random weights at a realistic scale (the tiny init's visual tokens are ~0.01, so attention starts uniform and
    # its query path gets ~0 gradient); the gates start closed, as the default init has them.
    model = randomize(AdaptiveCombinerForConditionalGeneration(tiny_config())).train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_gate"):
                param.zero_()
    return model


@pytest.mark.parametrize("trainer_kind", ["trl", "comm_vlm"])
def test_three_step_sft_trains_the_combiner_without_leakage_and_reloads(trainer_kind, processor, tmp_path):
    """Plain TRL `SFTTrainer` (its fused LM head calls the backbone without `labels`; the training collator adds
    `combiner_labels`) and our stage trainer (which installs that collator)."""
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from comm_vlm.training import TrainingBatchCollator, build_trainer, default_sft_config

    model = sft_model()
    before = {k: v.clone() for k, v in model.model.combiner.state_dict().items()}
    args = default_sft_config(
        tmp_path / "run",
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
    )
    if trainer_kind == "trl":
        collator = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)
        collator = TrainingBatchCollator(collator, model.config)
        trainer = SFTTrainer(model, args, data_collator=collator, train_dataset=sft_rows(), processing_class=processor)
    else:
        trainer = build_trainer(model, processor, sft_rows(), "combiner", args)
    # Record every training batch's labels and the text mask the combiner received for it.
    seen = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):
        seen.append({"labels": inputs["labels"].clone(), "attention_mask": inputs["attention_mask"].clone()})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    model.model.combiner.register_forward_hook(lambda m, a, out: seen[-1].update(text_mask=a[2]))
    trainer.train()
    assert len(seen) == 3
    for batch in seen:
        labels, text_mask = batch["labels"], batch["text_mask"]  # (B, T) each; one image per row
        assert not (text_mask & (labels != -100)).any()  # no answer token is fused
        prompt = (labels == -100) & batch["attention_mask"].bool()
        assert (text_mask.sum(-1) == prompt.sum(-1) - N).all()  # the whole prompt but the image placeholders
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = model.model.combiner.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "text_resampler.latents" in changed and "steps.0.block.attn_gate" in changed
    assert set(changed) == set(before), set(before) - set(changed)  # every combiner tensor learned
    model.save_pretrained(tmp_path / "final")
    reloaded = AdaptiveCombinerForConditionalGeneration.from_pretrained(tmp_path / "final")
    for key, value in reloaded.model.combiner.state_dict().items():
        assert torch.equal(value, after[key]), key


def test_sft_trainer_without_the_collator_is_a_clear_error(processor, tmp_path):
    from trl import SFTTrainer

    from comm_vlm.training import default_sft_config

    args = default_sft_config(tmp_path / "run", max_steps=1, per_device_train_batch_size=2, save_strategy="no")
    trainer = SFTTrainer(model=sft_model(), args=args, train_dataset=sft_rows(), processing_class=processor)
    with pytest.raises(ValueError, match=r"label leakage.*TrainingBatchCollator"):
        trainer.train()


# --- FLOPs accounting of the benchmark ---------------------------------------------------------------------------


def test_benchmark_flop_decomposition_equals_a_real_full_forward():
    """The benchmark counts vision + combiner + LLM on meta tensors; at toy size that equals the real forward."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_combiner.py"
    spec = importlib.util.spec_from_file_location("bench_combiner", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    real, meta = bench.check_decomposition()
    assert real == meta and real["combiner"] > 0 and real["llava"] > 0
