"""Training stages as a table: what trains in each stage, and its optimiser groups.

The two-stage contract (COMM, Jiang et al. 2023; LLaVA-1.5; M3, Cai et al. 2024):

- Vision encoders stay frozen unless a stage names `vision_towers` (M3 fine-tunes CLIP, at its own learning rate).
- Stage 1 aligns vision to language: LLaVA trains only the projector; COMM trains merges, aligners, projector and LLM.
- Stage 2 instruction-tunes starting from stage 1's output, with the same or a larger trainable set.

A stage names *components*; `COMPONENTS` maps each to parameter-name prefixes of the `*ForConditionalGeneration`
models. Everything not named is frozen (`requires_grad=False`), so frozen encoders run without autograd.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn


COMPONENTS: dict[str, tuple[str, ...]] = {
    "vision_towers": ("model.vision_tower.", "model.secondary_vision_tower."),
    "merges": ("model.connector.merges.",),
    "aligners": ("model.connector.aligners.",),
    "projector": ("model.multi_modal_projector.", "model.image_newline"),  # LLaVA-NeXT's newline trains with it
    "combiner": ("model.combiner.",),
    "llm": ("model.language_model.", "lm_head."),
}


@dataclass(frozen=True)
class Stage:
    """One training stage.

    Args:
        name: registry key.
        trains: components whose parameters are trainable (see `COMPONENTS`).
        description: one line for logs and model cards.
        learning_rates: optional per-component learning rate (e.g. M3's vision tower); others use the run's lr.
        optional: components that may be absent from a model (skipped instead of raising), e.g. `merges` for a
            single-layer LLaVA configuration.
    """

    name: str
    trains: tuple[str, ...]
    description: str
    learning_rates: dict[str, float] = field(default_factory=dict)
    optional: tuple[str, ...] = ("merges", "aligners")


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("llava_pretrain", ("projector",), "LLaVA stage 1: projector only, encoders and LLM frozen"),
        Stage("llava_instruct", ("projector", "llm"), "LLaVA stage 2: projector and LLM, encoders frozen"),
        Stage(
            "comm_pretrain",
            ("merges", "aligners", "projector", "llm"),
            "COMM stage 1: MFM, aligners, projector and LLM; CLIP and DINOv2 frozen",
        ),
        Stage(
            "comm_instruct",
            ("merges", "aligners", "projector", "llm"),
            "COMM stage 2: instruction tuning, same trainable set as stage 1",
        ),
        Stage(
            "m3_finetune",
            ("vision_towers", "merges", "aligners", "projector", "llm"),
            "M3: the whole LMM (vision tower at its own learning rate), all-scale Matryoshka loss",
            learning_rates={"vision_towers": 2e-5},
        ),
        Stage(
            "from_scratch",
            ("vision_towers", "merges", "aligners", "projector", "combiner", "llm"),
            "Everything trains: for tiny offline models whose encoders have no pretrained weights (demo only)",
            optional=("merges", "aligners", "projector", "combiner"),
        ),
        Stage(
            "combiner_pretrain",
            ("combiner", "merges", "aligners", "projector"),
            "Adaptive combiner stage 1: combiner, connector and projector; encoders and LLM frozen",
            optional=("merges", "aligners", "projector"),
        ),
        Stage(
            "combiner",
            ("combiner", "merges", "aligners", "projector", "llm"),
            "Adaptive combiner: combiner, connector, projector and LLM; encoders frozen",
            optional=("merges", "aligners", "projector"),
        ),
    )
}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"Unknown training stage {name!r}; available: {sorted(STAGES)}.")
    return STAGES[name]


# PEFT's copies of a `modules_to_save` module: `<module>.modules_to_save.<adapter>.<rest>` (trained) and
# `<module>.original_module.<rest>` (frozen), both named here as `<module>.<rest>`.
_PEFT_COPY = re.compile(r"\.(?:modules_to_save\.[^.]+|original_module)\.")


def component_of(param_name: str) -> str | None:
    """The component a parameter belongs to (prefixes as in `COMPONENTS`; PEFT's `base_model.model.` prefix and its
    `modules_to_save` copies are seen through)."""
    name = _PEFT_COPY.sub(".", param_name.removeprefix("base_model.model."), count=1)
    for component, prefixes in COMPONENTS.items():
        if name.startswith(prefixes):
            return component
    return None


def apply_stage(model: nn.Module, stage: Stage | str) -> dict[str, int]:
    """Freezes everything but the stage's components. Returns the trainable parameter count per component.

    Raises:
        ValueError: a required component of the stage has no parameters in `model`.
    """
    stage = get_stage(stage) if isinstance(stage, str) else stage
    counts = dict.fromkeys(stage.trains, 0)
    for name, param in model.named_parameters():
        component = component_of(name)
        param.requires_grad_(component in counts)
        if component in counts:
            counts[component] += param.numel()
    missing = [c for c, n in counts.items() if n == 0 and c not in stage.optional]
    if missing:
        raise ValueError(
            f"Stage {stage.name!r} trains {missing}, but {type(model).__name__} has no parameters there "
            f"(prefixes {[COMPONENTS[c] for c in missing]}). Pick a stage that fits the model: {sorted(STAGES)}."
        )
    return counts


def optimizer_groups(
    model: nn.Module, stage: Stage | str, learning_rate: float, weight_decay: float, no_decay: set[str]
) -> list[dict]:
    """AdamW parameter groups: one per (learning rate, decay) pair, only trainable parameters.

    Args:
        no_decay: parameter names exempt from weight decay (the Trainer's biases and norms).
    """
    stage = get_stage(stage) if isinstance(stage, str) else stage
    groups: dict[tuple[float, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = stage.learning_rates.get(component_of(name), learning_rate)
        groups.setdefault((lr, name not in no_decay), []).append(param)
    return [
        {"params": params, "lr": lr, "weight_decay": weight_decay if decay else 0.0}
        for (lr, decay), params in groups.items()
    ]
