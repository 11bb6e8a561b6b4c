"""TRL as a user runs it: `SFTTrainer(model="<checkpoint dir>")` with TRL's defaults trains every family, given the
family's `TrainingBatchCollator`, and no family ever scores an image placeholder: not in the collated batch (which
TRL's fused LM head scores outside the model), not in the model's own loss."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from comm_vlm.families import get_family
from comm_vlm.testing import build_tiny_checkpoint
from comm_vlm.training import TrainingBatchCollator


# (family, layout, config overrides)
FAMILIES = [
    ("comm", "comm", {}),
    ("matryoshka_llava", "llava", {}),
    ("adaptive_combiner", "llava", {"combiner_num_latents": 4}),
]


@pytest.fixture(params=FAMILIES, ids=[f[0] for f in FAMILIES])
def checkpoint(request, tmp_path):
    family, layout, overrides = request.param
    build_tiny_checkpoint(tmp_path / "ckpt", layout=layout, family=family, **overrides)
    return family, str(tmp_path / "ckpt")


class Recording:
    """A collator that keeps the batches it returns."""

    def __init__(self, collator):
        self.collator, self.batches = collator, []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.batches.append(batch)
        return batch


def test_sft_trainer_from_a_directory_never_scores_placeholders(checkpoint, tiny_data, tmp_path):
    family, directory = checkpoint
    config, processor = AutoConfig.from_pretrained(directory), AutoProcessor.from_pretrained(directory)
    collator = Recording(TrainingBatchCollator(DataCollatorForVisionLanguageModeling(processor), config))
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, report_to="none", use_cpu=True, per_device_train_batch_size=2
    )
    trainer = SFTTrainer(model=directory, args=args, train_dataset=tiny_data, data_collator=collator)
    assert type(trainer.model) is get_family(family).model_class
    trainer.train()

    raw = DataCollatorForVisionLanguageModeling(processor)([tiny_data[0], tiny_data[1]])
    assert (raw["labels"] == config.image_token_id).any()  # TRL's defaults label the placeholders
    assert len(collator.batches) >= 2
    for batch in collator.batches:  # for M3, the rows re-laid for every scale
        image = batch["input_ids"] == config.image_token_id
        labelled = batch["labels"] != -100
        assert image.any() and not (labelled & image).any()
        assert (labelled <= batch["attention_mask"].bool()).all()
        assert torch.equal(batch["labels"][labelled], batch["input_ids"][labelled])
        assert labelled[sequence_ends(batch)].all()  # the answer's last token, of every sample (and scale)


def sequence_ends(batch) -> torch.Tensor:
    """`(R, L)` mask of the last token of every sequence: of each row, or of each scale variant in M3's packed rows."""
    segments = batch.get("matryoshka_segment_ids")
    if segments is None:
        segments = batch["attention_mask"].long() * 2 - 1  # 1 on tokens, -1 on padding
    following = torch.cat([segments[:, 1:], torch.full_like(segments[:, :1], -1)], dim=1)
    return (segments >= 1) & (following != segments)


def test_model_loss_ignores_placeholder_labels(checkpoint, tiny_data):
    family, directory = checkpoint
    config, processor = AutoConfig.from_pretrained(directory), AutoProcessor.from_pretrained(directory)
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    batch = dict(DataCollatorForVisionLanguageModeling(processor)([tiny_data[0], tiny_data[1], tiny_data[2]]))
    image = batch["input_ids"] == config.image_token_id
    assert (batch["labels"][image] == config.image_token_id).all()
    masked = batch["labels"].masked_fill(image, -100)
    with torch.no_grad():
        out = model(**batch)
        loss_masked = model(**{**batch, "labels": masked}).loss
    torch.testing.assert_close(out.loss, loss_masked, rtol=0, atol=0)
    if family != "matryoshka_llava":  # M3's logits follow its re-laid rows
        with_images = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
        assert not torch.allclose(out.loss, with_images)  # the placeholders would have counted


def test_saved_config_names_its_auto_class_without_remote_code(checkpoint):
    """TRL picks the Auto class from `config.auto_map`; the entry loads the registered class, never remote code."""
    family, directory = checkpoint
    model_class = get_family(family).model_class
    saved = json.loads((Path(directory) / "config.json").read_text())
    module = model_class.__module__.rsplit(".", 1)[-1]
    assert saved["auto_map"] == {"AutoModelForImageTextToText": f"{module}.{model_class.__name__}"}
    assert type(AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=True)) is model_class
    assert getattr(get_family(family).config_class(), "auto_map", None) is None  # in memory, until saved
