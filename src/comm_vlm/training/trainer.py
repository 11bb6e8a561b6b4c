"""The training engine: TRL's `SFTTrainer` (Accelerate underneath) with a stage's trainable set and optimiser groups.

`build_trainer` freezes what the stage does not train, optionally wraps the LLM with PEFT LoRA (the stage's other
components saved in full through `modules_to_save`), and returns an `SFTTrainer` whose optimiser has one group per
(learning rate, weight decay) pair. TRL's vision collator renders the chat template, expands image placeholders through
our processor and masks everything but assistant tokens (`assistant_only_loss=True`); the trainer wraps it in the
family's `TrainingBatchCollator` (M3 re-lays every batch for all its scales; the adaptive combiner gets
`combiner_labels`, which keep the answer out of its fused tokens), so the loss TRL computes outside the model is the
family's objective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PreTrainedModel, ProcessorMixin
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer

from .collators import TrainingBatchCollator, training_collator
from .stages import COMPONENTS, Stage, apply_stage, get_stage, optimizer_groups


logger = logging.get_logger(__name__)


class CommSFTTrainer(SFTTrainer):
    """`SFTTrainer` whose optimiser groups follow a `Stage` (e.g. M3's separate vision-tower learning rate), and whose
    collator prepares every batch for the family's objective (`TrainingBatchCollator`, wrapped around TRL's collator
    or the one given).

    On a CPU it also scores only the answer tokens (`answer_token_loss`): TRL's fused LM head, built to avoid the full
    logits of large vocabularies on GPUs, runs there as torch ops over every position of the batch, prompt and image
    tokens included. Same loss, gradients and logged metrics; on a 2-thread CPU a main-job loss step (loss, backward,
    AdamW) takes 0.82x as long as through TRL's head (`benchmarks/results_train_step.md`), and a whole `Trainer.train`
    step over 150 stage-2 steps of COMM or the combiner 0.85x (two back-to-back runs each).
    """

    # The most logits (batch x sequence x vocabulary values) `answer_token_loss` materialises: 2**26, 256 MB in fp32
    # (counted on the prepared batch, which for M3 holds the rows of every scale). Larger batches keep TRL's chunked
    # head, which never holds them all (a 7B model's 32k vocabulary on a CPU).
    max_cpu_logits: int = 2**26

    def __init__(self, *args, stage: Stage, **kwargs):
        self.stage = stage
        super().__init__(*args, **kwargs)
        config = self.accelerator.unwrap_model(self.model).config
        self.data_collator = training_collator(self.data_collator, config, self.args.device)

    @contextlib.contextmanager
    def _evaluation_collator(self):
        """Evaluation batches of M3's `random_scale` mode average all scales, as the model's own loss does in eval."""
        collator = self.data_collator
        if isinstance(collator, TrainingBatchCollator):
            self.data_collator = dataclasses.replace(collator, training=False)
        try:
            yield
        finally:
            self.data_collator = collator

    def get_eval_dataloader(self, eval_dataset=None):
        with self._evaluation_collator():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._evaluation_collator():
            return super().get_test_dataloader(test_dataset)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = optimizer_groups(
                opt_model,
                self.stage,
                self.args.learning_rate,
                self.args.weight_decay,
                set(self.get_decay_parameter_names(opt_model)) ^ {n for n, _ in opt_model.named_parameters()},
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`SFTTrainer.compute_loss`; on a CPU, for the plain negative log-likelihood of a batch whose logits fit in
        `max_cpu_logits`, `answer_token_loss`."""
        plain = (
            not return_outputs
            and self.compute_loss_func is None
            and self.label_smoother is None
            and not self.aux_loss_enabled
            and self.args.loss_type == "nll"
            and "labels" in inputs
            and "shift_labels" not in inputs
            and inputs["labels"].device.type == "cpu"
            and inputs["labels"].numel() * self._vocab_size(model) <= self.max_cpu_logits
        )
        if not plain:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return self.answer_token_loss(model, inputs, num_items_in_batch)

    def _vocab_size(self, model) -> int:
        return self.accelerator.unwrap_model(model).get_output_embeddings().weight.shape[0]

    def answer_token_loss(self, model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """The negative log-likelihood of the label tokens from the model's logits at those positions only.

        The loss `SFTTrainer` computes (summed over label tokens, divided by `num_items_in_batch` or else by their
        count) and the metrics it logs (`entropy`, `mean_token_accuracy`, `num_tokens`), without its fused LM head.

        Args:
            inputs (`dict`): a collated batch, prepared by the family's `TrainingBatchCollator`: `input_ids`
                `(batch, seq)`, `labels` `(batch, seq)` with -100 where no loss is taken, and the model's other inputs
                (`attention_mask`, `pixel_values`, ...).
        """
        mode = "train" if self.model.training else "eval"
        call = {**inputs, "use_cache": False}  # what TRL's fused forward passes the model, less `labels`
        labels = call.pop("labels")[:, 1:]  # (batch, seq - 1): token t + 1 is predicted at position t
        logits = model(**call).logits[:, :-1]  # (batch, seq - 1, vocab)
        mask = labels != -100
        log_probs = logits[mask].float().log_softmax(-1)  # (answer tokens, vocab)
        targets = labels[mask]
        token_log_probs = log_probs.gather(-1, targets[:, None]).squeeze(-1)
        num_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -token_log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())

        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            correct = log_probs.argmax(-1) == targets
        gather = self.accelerator.gather_for_metrics
        num_valid = gather(mask.sum()).sum()
        entropy_sum, num_correct = gather(entropy.sum()).sum(), gather(correct.sum()).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                count = inputs["attention_mask"].sum()
            else:
                count = torch.tensor(inputs["position_ids"].size(1))
            self._total_train_tokens += gather(count).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss


def default_sft_config(output_dir: str | os.PathLike, **overrides) -> SFTConfig:
    """`SFTConfig` defaults for these models: assistant-only loss, keep image columns, fp32 on CPU."""
    on_cpu = not torch.cuda.is_available() or overrides.get("use_cpu", False)
    fields = {
        "output_dir": str(output_dir),
        "assistant_only_loss": True,
        "remove_unused_columns": False,
        "bf16": not on_cpu,
        "use_cpu": on_cpu,
        "report_to": "none",
        "lr_scheduler_type": "cosine",
    }
    fields.update(overrides)
    unknown = sorted(set(fields) - set(SFTConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"Unknown SFTConfig field(s) {unknown}; see trl.SFTConfig / transformers.TrainingArguments.")
    return SFTConfig(**fields)


def build_trainer(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    train_dataset: Dataset,
    stage: Stage | str,
    args: SFTConfig,
    peft_config=None,
    eval_dataset: Dataset | None = None,
    callbacks=None,
) -> CommSFTTrainer:
    """Freezes `model` per `stage` and builds the trainer.

    Args:
        peft_config: a PEFT `LoraConfig` (or any PEFT config). LoRA targets the LLM; the stage's non-LLM components
            are added to `modules_to_save` so they train and save in full.
    """
    stage = get_stage(stage) if isinstance(stage, str) else stage
    counts = apply_stage(model, stage)
    logger.info(f"Stage {stage.name}: trainable parameters per component {counts}")
    if peft_config is not None:
        full = [c for c in stage.trains if c != "llm" and counts.get(c)]
        modules = sorted({prefix.split(".")[1] for c in full for prefix in COMPONENTS[c]})
        peft_config.modules_to_save = sorted(set(peft_config.modules_to_save or []) | set(modules))
    if args.activation_checkpointing:
        # Frozen encoders produce inputs without grad; make the LLM's checkpointed blocks still backprop.
        model.enable_input_require_grads()
    return CommSFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=callbacks,
        stage=stage,
    )


def save_atomically(model: PreTrainedModel, processor: ProcessorMixin | None, output_dir: str | os.PathLike) -> Path:
    """Writes `save_pretrained` output to a temporary sibling directory, then renames it into place.

    A crash mid-write leaves the previous `output_dir` (if any) untouched; readers never see a half-written one.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(tmp)
        old = None
        if output_dir.exists():
            old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
            output_dir.rename(old)
        tmp.rename(output_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def merge_lora_and_save(model, processor: ProcessorMixin | None, output_dir: str | os.PathLike) -> PreTrainedModel:
    """Merges LoRA weights into the base model and saves a plain `from_pretrained`-loadable checkpoint."""
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    save_atomically(merged, processor, output_dir)
    return merged
