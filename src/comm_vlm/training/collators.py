"""Training collators: each family's preparation of a collated batch for its training objective.

Trainers may compute the loss outside the model: TRL's `SFTTrainer` scores tokens with its fused LM head, which calls
the model's backbone without `labels`. Two families need the labels before the backbone runs:

* M3 (`matryoshka_llava`) averages the loss over all trained scales: the batch is re-laid so every sample appears at
  every scale (`relay_training_inputs`, the code the model's own forward runs on `labels`), with uniform loss weights
  (packed rows, not the shared-prefix rows whose prefix weights only the model's own loss applies). A plain token mean
  over the re-laid labels, as TRL's fused head and `CommSFTTrainer.answer_token_loss` take, is then the paper's mean
  over scales; the Trainer's `num_items_in_batch`, when it counts, counts the re-laid labels.
* The adaptive combiner (`adaptive_combiner`) must not fuse the answer into its tokens: the labels are copied into the
  batch as `combiner_labels`, which the backbone reads.

`TrainingBatchCollator` wraps any collator (TRL's `DataCollatorForVisionLanguageModeling`, which `SFTTrainer` builds
for vision datasets) and applies the preparation registered for the config's `model_type` in
`TRAINING_BATCH_PREPARATIONS`; batches of other families pass through unchanged. `build_trainer` installs it; with a
plain `SFTTrainer`, pass it as `data_collator=`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from transformers import PretrainedConfig

from ..models.packing_matryoshka import relay_training_inputs


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
    "matryoshka_llava": prepare_matryoshka_batch,
    "adaptive_combiner": prepare_combiner_batch,
}


@dataclasses.dataclass
class TrainingBatchCollator:
    """Collates with `collator`, then prepares the batch for the family's training objective.

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
        batch = self.collator(examples)
        prepare = TRAINING_BATCH_PREPARATIONS.get(self.config.model_type)
        return batch if prepare is None else prepare(self.config, batch, self.device_type, self.training)


def training_collator(
    collator: Callable[[list], dict], config: PretrainedConfig, device: str | torch.device | None = None
) -> Callable[[list], dict]:
    """`collator` wrapped in a `TrainingBatchCollator` when the family prepares its batches (else as it is; a
    `TrainingBatchCollator` is never wrapped twice)."""
    if isinstance(collator, TrainingBatchCollator) or config.model_type not in TRAINING_BATCH_PREPARATIONS:
        return collator
    return TrainingBatchCollator(collator, config, device)


__all__ = [
    "TRAINING_BATCH_PREPARATIONS",
    "TrainingBatchCollator",
    "TrainingBatchPreparation",
    "prepare_combiner_batch",
    "prepare_matryoshka_batch",
    "training_collator",
]
