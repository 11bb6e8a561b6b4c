"""Training collators: each family's preparation of a collated batch for its training objective.

Trainers may compute the loss outside the model: TRL's `SFTTrainer` scores tokens with its fused LM head, which calls
the model's backbone without `labels`. So the batch itself must hold the family's objective:

* Every family: image placeholders are never targets (`mask_image_labels`, the rule of the models' own losses, as in
  LLaVA). TRL's `DataCollatorForVisionLanguageModeling` labels them unless `assistant_only_loss=True`; a model that
  learns them generates placeholders. This runs first, before the family's own preparation.
* COMM (`comm`) needs nothing more.
* M3 (`matryoshka_llava`) averages the loss over all trained scales: the batch is re-laid so every sample appears at
  every scale (`relay_training_inputs`, the code the model's own forward runs on `labels`), with uniform loss weights
  (packed rows, not the shared-prefix rows whose prefix weights only the model's own loss applies). A plain token mean
  over the re-laid labels, as TRL's fused head and `CommSFTTrainer.answer_token_loss` take, is then the paper's mean
  over scales; the Trainer's `num_items_in_batch`, when it counts, counts the re-laid labels.
* Matryoshka-LLaVA-NeXT (`matryoshka_llava_next`): every sample once per trained scale in padded rows, each image
  encoded once (`relay_next_training_batch`); a plain token mean over them is again the mean over scales.
* The adaptive combiner (`adaptive_combiner`) must not fuse the answer into its tokens: the labels are copied into the
  batch as `combiner_labels`, which the backbone reads.

`TrainingBatchCollator` wraps any collator (TRL's `DataCollatorForVisionLanguageModeling`, which `SFTTrainer` builds
for vision datasets), unlabels the image placeholders and applies the preparation registered for the config's
`model_type` in `TRAINING_BATCH_PREPARATIONS`. `build_trainer` installs it. With a plain `SFTTrainer`, pass it as
`data_collator=`: TRL has no hook into its own collator or its fused loss, so without it COMM trains on the
placeholders, and M3 and the adaptive combiner refuse to train (their models check for the prepared batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from transformers import PretrainedConfig

from ..models.modeling_comm import mask_image_labels
from ..models.packing_matryoshka import relay_training_inputs
from ..models.packing_matryoshka_next import relay_next_training_batch


def unlabel_image_placeholders(config: PretrainedConfig, batch: dict) -> dict:
    """Every family: the batch with `labels` `(B, T)` set to -100 where `input_ids` `(B, T)` holds the image
    placeholder (`config.image_token_id`); batches without both pass through."""
    labels, input_ids = batch.get("labels"), batch.get("input_ids")
    image_token_id = getattr(config, "image_token_id", None)
    if labels is None or input_ids is None or image_token_id is None:
        return batch
    return {**batch, "labels": mask_image_labels(labels, input_ids, image_token_id)}


def prepare_comm_batch(config: PretrainedConfig, batch: dict, device_type: str, training: bool) -> dict:
    """COMM: the plain next-token objective, so the batch as it is (its placeholders already unlabelled)."""
    return batch


def prepare_matryoshka_batch(config: PretrainedConfig, batch: dict, device_type: str, training: bool) -> dict:
    """M3: the batch re-laid for every trained scale, with uniform loss weights (see the module docstring).

    Args:
        config (`MatryoshkaLlavaConfig`): scales, training mode and packing.
        batch (`dict`): `input_ids`, `attention_mask`, `labels` `(B, T)`, `pixel_values` `(num_images, 3, H, W)` and
            the processor's `matryoshka_image_scales` `(num_images,)`.
        device_type (`str`): where the LLM runs (`matryoshka_packing="auto"` splits rows on CPU).
        training (`bool`): whether `random_scale` mode draws one scale per sample (evaluation averages all scales).

    Returns:
        `dict`: `input_ids`, `attention_mask`, `labels` and `position_ids` `(R, L)`, `matryoshka_image_scales`,
        `matryoshka_image_index` `(num_runs,)`, `matryoshka_segment_ids` `(R, L)`, and the other inputs unchanged.
    """
    relaid, _ = relay_training_inputs(config, batch, weighted=False, training=training, device_type=device_type)
    return relaid


def prepare_matryoshka_next_batch(config: PretrainedConfig, batch: dict, device_type: str, training: bool) -> dict:
    """Matryoshka-LLaVA-NeXT: every sample once per trained scale, each image encoded once
    (`relay_next_training_batch`); `random_scale` mode draws one scale per sample while training."""
    return relay_next_training_batch(config, batch, training=training)


def prepare_combiner_batch(config: PretrainedConfig, batch: dict, device_type: str, training: bool) -> dict:
    """Adaptive combiner: `combiner_labels` `(B, T)`, a copy of `labels`, so the backbone keeps the answer out of the
    fused tokens when it is called without `labels`."""
    labels = batch.get("labels")
    if labels is None or batch.get("combiner_labels") is not None:
        return batch
    return {**batch, "combiner_labels": labels}


TrainingBatchPreparation = Callable[[PretrainedConfig, dict, str, bool], dict]

# model_type -> the preparation of a collated batch for that family's training objective.
TRAINING_BATCH_PREPARATIONS: dict[str, TrainingBatchPreparation] = {
    "comm": prepare_comm_batch,
    "matryoshka_llava": prepare_matryoshka_batch,
    "adaptive_combiner": prepare_combiner_batch,
    "matryoshka_llava_next": prepare_matryoshka_next_batch,
}


@dataclasses.dataclass
class TrainingBatchCollator:
    """Collates with `collator`, sets the labels of image placeholders to -100 (every family), then prepares the batch
    for the family's training objective (`TRAINING_BATCH_PREPARATIONS`).

    Example:

    ```python
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    collator = TrainingBatchCollator(DataCollatorForVisionLanguageModeling(processor), model.config)
    trainer = SFTTrainer(model, args, data_collator=collator, train_dataset=data, processing_class=processor)
    ```

    Args:
        collator (`Callable[[list], dict]`): the collator of the examples (e.g. TRL's
            `DataCollatorForVisionLanguageModeling`).
        config (`PretrainedConfig`): the model's config; its `model_type` selects the preparation
            (`TRAINING_BATCH_PREPARATIONS`).
        device (`str` or `torch.device`, *optional*): where the model trains; M3's `matryoshka_packing="auto"` lays
            rows out for it. Default: CUDA when available, else CPU.
        training (`bool`): `False` for evaluation batches (M3's `random_scale` mode then averages all scales);
            `CommSFTTrainer` collates its evaluation batches so. A plain `SFTTrainer` uses one collator for both.
    """

    collator: Callable[[list], dict]
    config: PretrainedConfig
    device: str | torch.device | None = None
    training: bool = True

    @property
    def device_type(self) -> str:
        if self.device is None:
            return "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(self.device).type

    def __call__(self, examples: list[Any]) -> dict:
        batch = unlabel_image_placeholders(self.config, self.collator(examples))
        prepare = TRAINING_BATCH_PREPARATIONS.get(self.config.model_type)
        return batch if prepare is None else prepare(self.config, batch, self.device_type, self.training)


def training_collator(
    collator: Callable[[list], dict], config: PretrainedConfig, device: str | torch.device | None = None
) -> Callable[[list], dict]:
    """`collator` wrapped in a `TrainingBatchCollator` for the families of `TRAINING_BATCH_PREPARATIONS` (else as it
    is; a `TrainingBatchCollator` is never wrapped twice)."""
    if isinstance(collator, TrainingBatchCollator) or config.model_type not in TRAINING_BATCH_PREPARATIONS:
        return collator
    return TrainingBatchCollator(collator, config, device)


__all__ = [
    "TRAINING_BATCH_PREPARATIONS",
    "TrainingBatchCollator",
    "TrainingBatchPreparation",
    "prepare_combiner_batch",
    "prepare_comm_batch",
    "prepare_matryoshka_batch",
    "prepare_matryoshka_next_batch",
    "training_collator",
    "unlabel_image_placeholders",
]
