"""Matryoshka-LLaVA (M3) training: TRL's SFTTrainer (with the training collator) and transformers' Trainer optimise the
all-scale loss; without the collator, SFTTrainer stops with a clear error; the model reloads and generates at every
scale."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments


pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling  # noqa: E402

from comm_vlm import MatryoshkaLlavaConfig, MatryoshkaLlavaForConditionalGeneration, MatryoshkaLlavaProcessor  # noqa: E402
from comm_vlm.testing import (  # noqa: E402
    CHAT_TEMPLATE,
    IMAGE_TOKEN_ID,
    build_tiny_tokenizer,
    tiny_image_processor,
    tiny_text_config,
    tiny_vision_config,
)
from comm_vlm.training import TrainingBatchCollator  # noqa: E402


def tiny_m3(seed=0):
    torch.manual_seed(seed)
    config = MatryoshkaLlavaConfig(
        vision_config=tiny_vision_config(), text_config=tiny_text_config(320), image_token_index=IMAGE_TOKEN_ID
    )
    model = MatryoshkaLlavaForConditionalGeneration(config)
    processor = MatryoshkaLlavaProcessor(
        tiny_image_processor(28), build_tiny_tokenizer(), num_image_tokens=16, chat_template=CHAT_TEMPLATE
    )
    return model, processor


def tiny_dataset(n=4):
    rng = np.random.default_rng(0)
    colors = ["red", "blue", "green", "white"]
    rows = {"messages": [], "images": []}
    for i in range(n):
        rows["images"].append([Image.fromarray((rng.random((30, 30, 3)) * 255).astype("uint8"))])
        rows["messages"].append(
            [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"A {colors[i % 4]} square."}]},
            ]
        )
    return datasets.Dataset.from_dict(rows)


def all_scale_loss(model, batch) -> float:
    """The all-scale loss of `batch` from the model's own forward, checked against the mean of single-scale losses."""
    model.eval()
    with torch.no_grad():
        expected = model(**batch).loss.item()
        singles = [model(**batch, matryoshka_scale=s).loss.item() for s in model.config.matryoshka_scales]
    assert len(set(singles)) > 1 and abs(expected - float(np.mean(singles))) <= 1e-5
    return expected


def sft_args(tmp_path, max_steps=3) -> SFTConfig:
    return SFTConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=None,
        seed=0,
    )


def logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_sft_trainer_optimises_the_all_scale_loss_and_the_model_reloads(tmp_path):
    model, processor = tiny_m3()
    data = tiny_dataset()
    # The all-scale loss of the whole (only) batch, before training, from the model's own forward.
    collator = TrainingBatchCollator(DataCollatorForVisionLanguageModeling(processor), model.config)
    examples = [data[i] for i in range(len(data))]
    batch = collator.collator(examples)
    assert batch["matryoshka_image_scales"].tolist() == [16] * 4  # the collator's processor writes full grids
    expected = all_scale_loss(model, batch)
    prepared = collator(examples)  # every sample at every scale, uniform loss weights
    assert prepared["labels"].shape[0] > 4 and len(prepared["matryoshka_image_index"]) == 4 * 3
    assert prepared["attention_mask"].shape == prepared["labels"].shape
    before = {k: v.clone() for k, v in model.state_dict().items()}

    args = sft_args(tmp_path)
    trainer = SFTTrainer(model, args, data_collator=collator, train_dataset=data, processing_class=processor)
    trainer.train()
    logged = logged_losses(trainer)
    # TRL's fused LM head computes the loss outside the model, on the batch the collator re-laid for all scales
    assert len(logged) == 3 and abs(logged[0] - expected) <= 1e-4
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("vision_tower" in k for k in changed) and any("language_model" in k for k in changed)

    trainer.save_model(str(tmp_path / "final"))
    processor.save_pretrained(tmp_path / "final")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "final").eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path / "final")
    assert isinstance(reloaded, MatryoshkaLlavaForConditionalGeneration)
    model.eval()
    image = data[0]["images"][0]
    prompt = "USER: <image>\nWhat is in the image? ASSISTANT:"
    for scale in reloaded.config.matryoshka_scales:
        inputs = loaded_processor(images=image, text=prompt, return_tensors="pt", matryoshka_scale=scale)
        out = reloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert out.shape[1] > inputs["input_ids"].shape[1]
        assert torch.equal(out, model.generate(**inputs, max_new_tokens=4, do_sample=False))


def test_sft_trainer_without_the_collator_stops_with_a_clear_error(tmp_path):
    """TRL's fused LM head calls the backbone without `labels`: un-re-laid, it would train one scale only."""
    model, processor = tiny_m3()
    trainer = SFTTrainer(
        model=model, args=sft_args(tmp_path, max_steps=1), train_dataset=tiny_dataset(), processing_class=processor
    )
    with pytest.raises(ValueError, match=r"data_collator=TrainingBatchCollator\(.*build_trainer"):
        trainer.train()


@pytest.mark.parametrize("with_collator", [False, True])
def test_plain_trainer_optimises_the_all_scale_loss(with_collator, tmp_path):
    """transformers' Trainer passes `labels`: the model re-lays the batch itself (shared-prefix rows with loss
    weights), or takes the collator's re-laid batch as it is; the loss is the mean over scales either way."""
    model, processor = tiny_m3()
    data = tiny_dataset()
    collator = DataCollatorForVisionLanguageModeling(processor)
    expected = all_scale_loss(model, collator([data[i] for i in range(len(data))]))
    if with_collator:
        collator = TrainingBatchCollator(collator, model.config)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    logged = logged_losses(trainer)
    assert len(logged) == 2 and abs(logged[0] - expected) <= 1e-4 and logged[1] < logged[0]


def test_build_trainer_collates_random_scale_training_batches_and_all_scale_evaluation_batches(tmp_path):
    """`random_scale` mode: one scale per sample in training; evaluation batches average all scales, as the model's
    own loss does in eval mode."""
    from comm_vlm.training import build_trainer, default_sft_config

    model, processor = tiny_m3()
    model.config.matryoshka_training_mode = "random_scale"
    data = tiny_dataset()
    args = default_sft_config(
        tmp_path / "out", max_steps=1, per_device_train_batch_size=4, per_device_eval_batch_size=4, save_strategy="no"
    )
    trainer = build_trainer(model, processor, data, "m3_finetune", args, eval_dataset=data)
    assert isinstance(trainer.data_collator, TrainingBatchCollator) and trainer.data_collator.training
    train_batch = next(iter(trainer.get_train_dataloader()))
    eval_batch = next(iter(trainer.get_eval_dataloader()))
    assert trainer.data_collator.training  # the trainer's own collator is left as it was
    num_scales = len(model.config.matryoshka_scales)
    assert len(train_batch["matryoshka_image_index"]) == 4
    assert len(eval_batch["matryoshka_image_index"]) == 4 * num_scales
