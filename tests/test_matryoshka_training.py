"""Matryoshka-LLaVA (M3) training: TRL's SFTTrainer optimises the all-scale loss; the model reloads and generates at
every scale."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


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


def test_sft_trainer_optimises_the_all_scale_loss_and_the_model_reloads(tmp_path):
    model, processor = tiny_m3()
    data = tiny_dataset()
    # The all-scale loss of the whole (only) batch, before training, from the model's own forward.
    batch = DataCollatorForVisionLanguageModeling(processor)([data[i] for i in range(len(data))])
    assert batch["matryoshka_image_scales"].tolist() == [16] * 4  # the collator's processor writes full grids
    model.eval()
    with torch.no_grad():
        expected = model(**batch).loss.item()
        singles = []
        for scale in model.config.matryoshka_scales:
            singles.append(model(**batch, matryoshka_scale=scale).loss.item())
    assert abs(expected - float(np.mean(singles))) <= 1e-5
    before = {k: v.clone() for k, v in model.state_dict().items()}

    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=None,
        seed=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=processor)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # TRL's fused LM head computes the loss outside the model; it still gets the all-scale batch
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
