"""Two-stage training on TRL's SFTTrainer and Accelerate (see `stages` for the contract, `recipes` for the YAML)."""

from .collators import (
    TRAINING_BATCH_PREPARATIONS,
    TrainingBatchCollator,
    prepare_combiner_batch,
    prepare_comm_batch,
    prepare_matryoshka_batch,
    training_collator,
    unlabel_image_placeholders,
)
from .data import (
    SkipReport,
    build_dataset,
    llava_to_messages,
    load_source,
    mix_datasets,
    shikra_to_messages,
    validate_samples,
)
from .provenance import RunProvenance, read_provenance
from .recipes import load_recipe, make_tiny_dataset, parse_overrides, run_recipe
from .stages import COMPONENTS, STAGES, Stage, apply_stage, component_of, get_stage, optimizer_groups
from .trainer import (
    CommSFTTrainer,
    build_trainer,
    default_sft_config,
    lora_config_from_spec,
    lora_target_modules,
    merge_lora_and_save,
    save_atomically,
)


__all__ = [
    "COMPONENTS",
    "STAGES",
    "TRAINING_BATCH_PREPARATIONS",
    "CommSFTTrainer",
    "RunProvenance",
    "SkipReport",
    "Stage",
    "TrainingBatchCollator",
    "apply_stage",
    "build_dataset",
    "build_trainer",
    "component_of",
    "default_sft_config",
    "get_stage",
    "llava_to_messages",
    "load_recipe",
    "load_source",
    "lora_config_from_spec",
    "lora_target_modules",
    "make_tiny_dataset",
    "merge_lora_and_save",
    "mix_datasets",
    "optimizer_groups",
    "parse_overrides",
    "prepare_combiner_batch",
    "prepare_comm_batch",
    "prepare_matryoshka_batch",
    "read_provenance",
    "run_recipe",
    "save_atomically",
    "shikra_to_messages",
    "training_collator",
    "unlabel_image_placeholders",
    "validate_samples",
]
