"""The training engine: TRL's `SFTTrainer` (Accelerate underneath) with a stage's trainable set and optimiser groups.

`build_trainer` freezes what the stage does not train, optionally adds PEFT LoRA adapters to the LLM's linear layers
(or those of the components a recipe names; every other component keeps its weights, and the stage's other trained
components train and save in full through `modules_to_save`), and returns an `SFTTrainer` whose optimiser has one
group per (learning rate, weight decay) pair. TRL's vision collator renders the chat template, expands image
placeholders through our processor and masks everything but assistant tokens (`assistant_only_loss=True`); the trainer
wraps it in the family's `TrainingBatchCollator` (M3 re-lays every batch for all its scales; the adaptive combiner gets
`combiner_labels`, which keep the answer out of its fused tokens), so the loss TRL computes outside the model is the
family's objective.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel, ProcessorMixin
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer

from .collators import TrainingBatchCollator, training_collator
from .stages import COMPONENTS, Stage, apply_stage, component_of, get_stage, optimizer_groups


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
        launched = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}
        for variable, kind in launched.items():
            if os.environ.get(variable, "false").lower() == "true" and self.accelerator.distributed_type.name != kind:
                logger.warning(
                    f"Launched with an {kind} config, but Accelerate runs {self.accelerator.distributed_type.name}: "
                    f"{kind} needs an accelerator (on a CPU-only machine Accelerate falls back to plain data "
                    "parallelism, every rank holding the whole model)."
                )

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


# The layers LoRA adapts, as PEFT's `"all-linear"`: `nn.Linear` and transformers' GPT-2-style `Conv1D`.
LORA_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
DEFAULT_LORA_COMPONENTS: tuple[str, ...] = ("llm",)


def lora_target_modules(
    model: nn.Module, target_modules: str | Sequence[str] | None, components: Sequence[str] = DEFAULT_LORA_COMPONENTS
) -> list[str] | str:
    """The full names of the modules LoRA adapts: `target_modules` resolved inside `components` only.

    PEFT matches a name like `q_proj` anywhere in the model, CLIP's attention included; resolved here, a name can only
    reach the linear layers of the components named.

    Args:
        model (`nn.Module`): a `*ForConditionalGeneration` model (module names as in `COMPONENTS`).
        target_modules (`str`, `list[str]` or `None`): module-name suffixes (`["q_proj", "v_proj"]`) or full module
            names; `"all-linear"` (every linear layer of the components); `None` (PEFT's default names for the LLM's
            architecture); or any other string, a regular expression PEFT matches against full module names, which
            is explicit and returned as it is.
        components (`Sequence[str]`): keys of `COMPONENTS` whose linear layers names may resolve to (default: the LLM).

    Returns:
        `list[str]`: sorted full module names, each a `LORA_LAYER_TYPES` layer and never the LM head; or the regular
        expression.

    Raises:
        ValueError: an unknown component, or a target that names no linear layer inside `components`.
    """
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown or not components:
        raise ValueError(f"LoRA `components` {list(components)}: each must be one of {sorted(COMPONENTS)}.")
    if isinstance(target_modules, str) and target_modules.lower() != "all-linear":
        return target_modules
    modules = dict(model.named_modules())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = {
        name: module
        for name, module in modules.items()
        if isinstance(module, LORA_LAYER_TYPES) and module is not head and component_of(name) in components
    }
    if target_modules is None:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

        model_type = model.config.get_text_config().model_type
        if model_type not in defaults:
            raise ValueError(f"PEFT has no default LoRA targets for {model_type!r}: give `target_modules`.")
        target_modules = defaults[model_type]
    if isinstance(target_modules, str):  # "all-linear"
        names = sorted(linear)
    else:
        names, missing = set(), []
        for target in target_modules:
            if _is_full_name(target, modules) and modules[target] is not head:
                hits = [target]
            else:
                hits = [n for n in linear if n == target or n.endswith(f".{target}")]
            names.update(hits)
            missing += [] if hits else [target]
        if missing:
            suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise ValueError(
                f"LoRA target(s) {missing} name no linear layer of the components {list(components)} (the LM head is "
                f"never adapted; train it in full with `modules_to_save`). Their linear layers end in {suffixes}: "
                "name some of those or use 'all-linear', add the component to `components`, or give a regular "
                "expression over full module names."
            )
        names = sorted(names)
    if not names:
        raise ValueError(f"The components {list(components)} of {type(model).__name__} have no linear layer for LoRA.")
    return names


def _is_full_name(target: str, modules: dict[str, nn.Module]) -> bool:
    """Whether `target` is the full name of a LoRA-able layer of the model (then taken as given, in any component)."""
    return "." in target and isinstance(modules.get(target), LORA_LAYER_TYPES)


def _names_modules(target_modules: str | Sequence[str] | None, modules: dict[str, nn.Module]) -> bool:
    """Whether `target_modules` picks modules itself: a regular expression, or full module names only."""
    if isinstance(target_modules, str):
        return target_modules.lower() != "all-linear"
    return bool(target_modules) and all(_is_full_name(t, modules) for t in target_modules)


def _modules_to_save(model: nn.Module, components: Sequence[str]) -> set[str]:
    """The `modules_to_save` names that train `components` in full: the top module of each under the backbone
    (`connector` for merges and aligners: PEFT copies whole modules), present in `model`."""
    present = {name for name, _ in model.named_modules()}
    names = set()
    for component in components:
        for prefix in COMPONENTS[component]:
            parts = prefix.rstrip(".").split(".")
            path = ".".join(parts[:2]) if parts[0] == "model" else parts[0]
            if path in present:
                names.add(path.rsplit(".", 1)[-1])
    return names


def _lora_config_for_stage(peft_config, model: nn.Module, stage: Stage, components: Sequence[str] | None = None):
    """A copy of `peft_config` with explicit `target_modules` (`lora_target_modules` inside `components`, the LLM by
    default) and the stage's other trained components in `modules_to_save`."""
    config = copy.deepcopy(peft_config)
    adapted = set()
    if hasattr(config, "target_modules"):
        targets = lora_target_modules(model, config.target_modules, components or DEFAULT_LORA_COMPONENTS)
        config.target_modules = targets
        if isinstance(targets, str):
            from peft.tuners.tuners_utils import check_target_module_exists

            targets = [name for name, _ in model.named_modules() if check_target_module_exists(config, name)]
        adapted = {component_of(name) for name in targets}
        frozen = sorted(c for c in adapted if c not in stage.trains)
        given = _names_modules(peft_config.target_modules, dict(model.named_modules()))
        if frozen and components is None and not given:
            raise ValueError(
                f"Stage {stage.name!r} freezes {frozen}, which LoRA adapts by default. Drop `peft` from this stage, "
                "or name the components to adapt (the recipe's `peft: {components: [...]}`)."
            )
    if hasattr(config, "modules_to_save"):
        full = [c for c in stage.trains if c not in adapted]
        config.modules_to_save = sorted(set(config.modules_to_save or []) | _modules_to_save(model, full))
    return config


def lora_config_from_spec(spec: Mapping[str, Any], model: nn.Module, stage: Stage | str):
    """A recipe's `peft:` mapping as the `peft.LoraConfig` that `build_trainer` trains `model` with in `stage`.

    The mapping holds `LoraConfig` arguments (`task_type` defaults to `CAUSAL_LM`) and, optionally, `components`: the
    components whose linear layers LoRA adapts (keys of `COMPONENTS`; default `[llm]`). `target_modules` is resolved
    inside them (`lora_target_modules`); the stage's other trained components train in full (`modules_to_save`), and
    every other component keeps its weights. E.g. `{r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj]}` adapts
    the LLM's query and value projections only; `components: [llm, vision_towers]` adds the encoders'.

    Args:
        spec (`Mapping[str, Any]`): the recipe stage's `peft:` mapping.
        model (`nn.Module`): the model the stage trains.
        stage (`Stage` or `str`): the stage.

    Returns:
        `peft.LoraConfig` with explicit `target_modules` and `modules_to_save`.
    """
    from peft import LoraConfig

    if not isinstance(spec, Mapping):
        raise ValueError(
            f"`peft` must map LoraConfig arguments to values, e.g. {{r: 16, target_modules: [q_proj]}}; got {spec!r}."
        )
    fields = dict(spec)
    components = fields.pop("components", None)
    if isinstance(components, str):
        components = [components]
    if components is not None and not (isinstance(components, Sequence) and components):
        raise ValueError(f"`peft.components` must list components among {sorted(COMPONENTS)}, got {components!r}.")
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(LoraConfig)})
    if unknown:
        raise ValueError(
            f"`peft` has unknown key(s) {unknown}: it takes `components` and the arguments of `peft.LoraConfig`."
        )
    fields.setdefault("task_type", "CAUSAL_LM")
    stage = get_stage(stage) if isinstance(stage, str) else stage
    return _lora_config_for_stage(LoraConfig(**fields), model, stage, components)


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
        peft_config (`peft.PeftConfig` or `Mapping`, *optional*): a PEFT config (e.g. `LoraConfig`), or a recipe's
            `peft:` mapping (`lora_config_from_spec`, which may name the adapted `components`). Its `target_modules`
            resolve inside the LLM unless the mapping names other components (`lora_target_modules`): a frozen
            encoder is never adapted by a name it happens to share. The stage's other trained components are added to
            `modules_to_save`, so they train and save in full.
    """
    stage = get_stage(stage) if isinstance(stage, str) else stage
    counts = apply_stage(model, stage)
    logger.info(f"Stage {stage.name}: trainable parameters per component {counts}")
    if isinstance(peft_config, Mapping):
        peft_config = lora_config_from_spec(peft_config, model, stage)
    elif peft_config is not None:
        peft_config = _lora_config_for_stage(peft_config, model, stage)
    if peft_config is not None:
        logger.info(f"LoRA adapts {peft_config.target_modules}; trained in full: {peft_config.modules_to_save}")
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


def save_atomically(
    model: PreTrainedModel,
    processor: ProcessorMixin | None,
    output_dir: str | os.PathLike,
    *,
    remote_code: bool = False,
    write_extra: Callable[[Path], None] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Writes `save_pretrained` output to a temporary sibling directory, then renames it into place.

    A crash mid-write leaves the previous `output_dir` (if any) untouched; readers never see a half-written one.

    Args:
        remote_code (`bool`): also write the modeling code and `auto_map` (`comm_vlm.hub.remote_code_export`), so
            `trust_remote_code=True` loads the directory without comm-vlm. When the written code would need the
            package (`check_remote_code`), the directory is written without it and a warning says so.
        write_extra (`Callable[[Path], None]`, *optional*): writes more files (a model card, a training record) into
            the temporary directory after the model and processor, so they appear together with them.
        state_dict (`dict[str, torch.Tensor]`, *optional*): the weights to write instead of `model.state_dict()`, e.g.
            the full weights gathered from ZeRO-3 / FSDP shards (`Accelerator.get_state_dict`).
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        _save_pretrained(model, processor, tmp, remote_code, state_dict)
        if write_extra is not None:
            write_extra(tmp)
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


def _save_pretrained(
    model: PreTrainedModel,
    processor: ProcessorMixin | None,
    directory: Path,
    remote_code: bool,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    if remote_code:
        from ..hub.remote_code import check_remote_code, remote_code_export

        with remote_code_export(model, processor):
            model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
            if processor is not None:
                processor.save_pretrained(directory)
        try:
            check_remote_code(directory)
            return
        except ValueError as err:
            logger.warning(f"Saving without the modeling code (load the checkpoint after `import comm_vlm`): {err}")
            shutil.rmtree(directory)
            directory.mkdir()
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    if processor is not None:
        processor.save_pretrained(directory)


def merge_lora_and_save(model, processor: ProcessorMixin | None, output_dir: str | os.PathLike) -> PreTrainedModel:
    """Merges LoRA weights into the base model and saves a plain `from_pretrained`-loadable checkpoint."""
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    save_atomically(merged, processor, output_dir)
    return merged
