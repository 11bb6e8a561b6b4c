"""Benchmark runners: generate answers for task rows, score them with the papers' metrics, compare to baselines.

The rows follow `comm_vlm.demo.synthetic` (TRL conversational `messages` + `images`, plus `task`, `answer`,
`references`, `box`, `pope_setting`, `question_type`); any dataset with those columns works (RefCOCO converted to
Shikra boxes, POPE, VQAv2, COCO captions). Each task of `TASK_SPECS` defines its metric (COMM, Jiang et al. 2023:
REC accuracy at IoU >= 0.5, REG/caption CIDEr-D, POPE accuracy/F1/yes-ratio, VQA accuracy), its generation length
and its baseline (`comm_vlm.evaluation.tasks`: REC chance = a random box of the set; majority answer / label for
REG, captions, POPE and VQA).

Generation is greedy, batched, left-padded, with a tqdm bar. For M3 (Cai et al. 2024), `evaluate_matryoshka` runs
every visual-token scale (passing `matryoshka_scale` to the processor through `processor_kwargs`), feeds the per-sample
correctness to the oracle analysis (`comm_vlm.evaluation.oracle.oracle_analysis`, or any callable with its signature)
and plots each task's metric against the visual tokens.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers.utils import logging

from ..models.image_utils import load_image
from .tasks import TASK_SPECS


logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------


def _prompt_messages(messages: Sequence[dict]) -> list[dict]:
    """The conversation up to (not including) the final assistant turn, image parts cleaned of Arrow's nulls."""
    messages = list(messages)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages:
        raise ValueError("A row has no user turn to answer; every row needs a user message before the answer.")
    cleaned = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [{k: v for k, v in part.items() if v is not None} for part in content]
        cleaned.append({"role": message["role"], "content": content})
    return cleaned


def _open_image(image: Any) -> Any:
    """`load_image`, also for undecoded `datasets.Image` values (`{"bytes", "path"}`), as benchmark rows hold them."""
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            return load_image(Image.open(io.BytesIO(image["bytes"])))
        if image.get("path"):
            return load_image(image["path"])
        raise ValueError("A row's image has neither `bytes` nor `path`; give the image file or its bytes.")
    return load_image(image)


def generate_answers(
    model: Any,
    processor: Any,
    rows: Sequence[dict],
    max_new_tokens: int,
    batch_size: int = 8,
    processor_kwargs: dict | None = None,
    generate_kwargs: dict | None = None,
    desc: str = "Generating",
) -> list[str]:
    """Greedy answers for conversational rows, in batches (left padding), in the rows' order.

    Args:
        model: an image-text-to-text model with `generate`.
        processor: its processor (chat template + `images=`/`text=` call).
        rows (`Sequence[dict]`): rows with `messages` and `images` (paths, images or undecoded `{"bytes", "path"}`
            values); a trailing assistant turn is dropped.
        max_new_tokens (`int`): generation length.
        batch_size (`int`): prompts per `generate` call.
        processor_kwargs (`dict`, *optional*): extra processor call arguments (e.g. `matryoshka_scale`).
        generate_kwargs (`dict`, *optional*): extra `generate` arguments (greedy decoding is forced).
        desc (`str`): progress bar label.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    tokenizer = getattr(processor, "tokenizer", processor)
    prompts = [
        processor.apply_chat_template(_prompt_messages(r["messages"]), add_generation_prompt=True, tokenize=False)
        for r in rows
    ]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))  # similar lengths share a batch: less padding
    answers: list[str] = [""] * len(rows)
    generation = {"max_new_tokens": max_new_tokens, **(generate_kwargs or {}), "do_sample": False, "num_beams": 1}
    if getattr(tokenizer, "pad_token_id", None) is not None:
        generation.setdefault("pad_token_id", tokenizer.pad_token_id)
    padding_side, was_training = getattr(tokenizer, "padding_side", None), model.training
    tokenizer.padding_side = "left"
    model.eval()
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
                batch = order[start : start + batch_size]
                images = [_open_image(image) for i in batch for image in (rows[i].get("images") or [])]
                inputs = processor(
                    images=images or None,
                    text=[prompts[i] for i in batch],
                    padding=True,
                    return_tensors="pt",
                    **(processor_kwargs or {}),
                )
                inputs = inputs.to(model.device).to(model.dtype)
                output = model.generate(**inputs, **generation)
                new_tokens = output[:, inputs["input_ids"].shape[1] :]
                for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                    answers[i] = text.strip()
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return answers


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TaskResult:
    """One task's outcome.

    Args:
        metrics (`dict`): the model's metrics.
        baseline (`dict`): the baseline's metrics (`name` says which).
        num_samples (`int`): rows scored.
        max_new_tokens (`int`): generation length used.
        predictions (`list[str]`): generated answers, in row order.
        correct (`list[bool]`, *optional*): per-sample correctness (binary tasks).
        per_sample (`list[float]`): per-sample metric values.
    """

    metrics: dict[str, Any]
    baseline: dict[str, Any]
    num_samples: int
    max_new_tokens: int
    predictions: list[str] = field(default_factory=list)
    correct: list[bool] | None = None
    per_sample: list[float] = field(default_factory=list)


@dataclass
class EvalResult:
    """Results of [`evaluate`]: `tasks` maps task name -> [`TaskResult`]; `rows` keeps the scored rows' metadata."""

    tasks: dict[str, TaskResult]
    rows: dict[str, list[dict]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, with_predictions: bool = True) -> dict:
        """JSON-ready results (metrics as fractions, CIDEr in coco-caption units).

        Args:
            with_predictions (`bool`): include one record per sample (question, prediction, answer, value).
        """
        out: dict[str, Any] = {"settings": self.settings, "tasks": {}}
        for name, result in self.tasks.items():
            entry = {
                "metrics": result.metrics,
                "baseline": result.baseline,
                "num_samples": result.num_samples,
                "max_new_tokens": result.max_new_tokens,
            }
            if with_predictions:
                entry["predictions"] = [
                    {"question": row.get("question"), "answer": row.get("answer"), "prediction": pred, "value": value}
                    for row, pred, value in zip(self.rows.get(name, []), result.predictions, result.per_sample)
                ]
            out["tasks"][name] = entry
        return out

    def to_markdown(self) -> str:
        """A Markdown table: task, metric, model, baseline, samples; values x100 as the papers print them."""
        lines = [
            "| task | metric (x100) | model | baseline | samples |",
            "|---|---|---:|---:|---:|",
        ]
        for name, result in self.tasks.items():
            for key, label in TASK_SPECS[name].table:
                lines.append(
                    f"| {name} | {label} | {100 * result.metrics[key]:.1f} | {100 * result.baseline[key]:.1f} "
                    f"| {result.num_samples} |"
                )
        return "\n".join(lines)

    def save(self, output_dir: str | os.PathLike, with_predictions: bool = True) -> Path:
        """Writes `results.json` and `results.md` into `output_dir`; returns the JSON path.

        Args:
            output_dir (`str` or `os.PathLike`): folder (created).
            with_predictions (`bool`): include per-sample records in the JSON.
        """
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "results.json"
        path.write_text(json.dumps(self.to_dict(with_predictions), indent=2))
        (folder / "results.md").write_text(self.to_markdown() + "\n")
        return path


def _rows_by_task(dataset: Any, tasks: Sequence[str] | None) -> dict[str, list[dict]]:
    columns = dataset.column_names if hasattr(dataset, "column_names") else list(dataset[0]) if dataset else []
    for needed in ("messages", "images", "task"):
        if needed not in columns:
            raise ValueError(
                f"The dataset has no {needed!r} column (columns: {columns}). Read a published benchmark's own files "
                "with comm_vlm.evaluation.load_benchmark (or `comm-vlm evaluate --task NAME --data FILE`), build "
                "synthetic rows with comm_vlm.demo.synthetic.make_synthetic_dataset, or add the column."
            )
    all_tasks = list(dataset["task"]) if hasattr(dataset, "column_names") else [r["task"] for r in dataset]
    wanted = list(dict.fromkeys(all_tasks)) if tasks is None else list(tasks)
    unknown = [t for t in wanted if t not in TASK_SPECS]
    if unknown:
        raise ValueError(f"No runner for tasks {unknown}; known tasks: {list(TASK_SPECS)}.")
    out = {}
    for task in wanted:
        indices = [i for i, t in enumerate(all_tasks) if t == task]
        if not indices:
            raise ValueError(f"Task {task!r} has no rows in the dataset (its tasks: {sorted(set(all_tasks))}).")
        missing = [c for c in TASK_SPECS[task].columns if c not in columns]
        if missing:
            raise ValueError(f"Task {task!r} needs the columns {missing}; add them (see synthetic.py's row format).")
        subset = dataset.select(indices) if hasattr(dataset, "select") else [dataset[i] for i in indices]
        out[task] = [dict(row) for row in subset]
    return out


def evaluate(
    model: Any,
    processor: Any,
    dataset: Any,
    tasks: Sequence[str] | None = None,
    batch_size: int = 8,
    max_new_tokens: int | dict[str, int] | None = None,
    processor_kwargs: dict | None = None,
    generate_kwargs: dict | None = None,
    output_dir: str | os.PathLike | None = None,
    save_predictions: bool = True,
) -> EvalResult:
    """Generates, scores and compares to the baseline every task of `dataset`.

    Args:
        model: an image-text-to-text model.
        processor: its processor.
        dataset (`datasets.Dataset` or list of rows): rows in the documented format.
        tasks (`Sequence[str]`, *optional*): tasks to run (default: every task in the dataset).
        batch_size (`int`): prompts per `generate` call.
        max_new_tokens (`int` or `dict[str, int]`, *optional*): one length for all tasks or per task (default:
            `TASK_SPECS[task].max_new_tokens`).
        processor_kwargs (`dict`, *optional*): extra processor arguments (e.g. `{"matryoshka_scale": 9}`).
        generate_kwargs (`dict`, *optional*): extra `generate` arguments.
        output_dir (`str` or `os.PathLike`, *optional*): write `results.json` / `results.md` there.
        save_predictions (`bool`): include per-sample predictions in the JSON.
    """
    by_task = _rows_by_task(dataset, tasks)
    results = {}
    for task, rows in by_task.items():
        spec = TASK_SPECS[task]
        if isinstance(max_new_tokens, dict):
            length = max_new_tokens.get(task, spec.max_new_tokens)
        else:
            length = max_new_tokens or spec.max_new_tokens
        predictions = generate_answers(
            model, processor, rows, length, batch_size, processor_kwargs, generate_kwargs, desc=f"{task}"
        )
        score = spec.score(predictions, rows)
        results[task] = TaskResult(
            metrics=score.metrics,
            baseline=spec.baseline(rows),
            num_samples=len(rows),
            max_new_tokens=length,
            predictions=predictions,
            correct=score.correct,
            per_sample=score.per_sample,
        )
    rows_meta = {
        task: [{k: v for k, v in row.items() if k not in ("messages", "images")} for row in rows]
        for task, rows in by_task.items()
    }
    settings = {
        "model": type(model).__name__,
        "name_or_path": getattr(getattr(model, "config", None), "_name_or_path", ""),
        "batch_size": batch_size,
        "processor_kwargs": processor_kwargs or {},
        "units": "fractions in [0, 1]; CIDEr in coco-caption units (x100 = the papers' numbers)",
    }
    result = EvalResult(results, rows_meta, settings)
    if output_dir is not None:
        result.save(output_dir, with_predictions=save_predictions)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Matryoshka (M3): every scale, oracle, plot
# ----------------------------------------------------------------------------------------------------------------


def _is_true(prediction: Any, reference: Any) -> bool:
    return bool(prediction)


_ORACLE_FIELDS = ("scales", "accuracy_per_scale", "oracle_accuracy", "oracle_mean_tokens", "tokens_per_scale")


def _report_dict(report: Any) -> dict:
    if isinstance(report, dict):
        return report
    fields = {k: getattr(report, k) for k in _ORACLE_FIELDS if hasattr(report, k)}
    return fields or dict(vars(report))


@dataclass
class MatryoshkaEvalResult:
    """Results of [`evaluate_matryoshka`].

    Args:
        scales (`list[int]`): the evaluated scales (visual tokens per image), ascending.
        per_scale (`dict[int, EvalResult]`): the full results at each scale.
        tokens_per_scale (`dict[int, float]`): visual tokens per sample at each scale (scale x images per row).
        oracle (`dict[str, Any]`): per binary task (REC, POPE, VQA), the oracle report (fewest tokens that answer
            each sample correctly; see `comm_vlm.evaluation.oracle`). CIDEr tasks have no binary correctness and no
            oracle.
        plot_path (`str`, *optional*): the accuracy-vs-tokens PNG, when written.
        auto (`dict[str, tuple[float, float]]`): for a model with a learned scale selector, per binary task, the
            (mean visual tokens, accuracy) of `matryoshka_scale="auto"` (`scale_selection.auto_scale_points`).
    """

    scales: list[int]
    per_scale: dict[int, EvalResult]
    tokens_per_scale: dict[int, float]
    oracle: dict[str, Any] = field(default_factory=dict)
    plot_path: str | None = None
    auto: dict[str, tuple[float, float]] = field(default_factory=dict)

    def series(self) -> dict[str, dict[float, float]]:
        """Per task, visual tokens -> the primary metric (fraction; CIDEr in coco-caption units)."""
        out: dict[str, dict[float, float]] = {}
        for scale in self.scales:
            for task, result in self.per_scale[scale].tasks.items():
                key = TASK_SPECS[task].primary
                out.setdefault(task, {})[self.tokens_per_scale[scale]] = result.metrics[key]
        return out

    def to_dict(self, with_predictions: bool = False) -> dict:
        """JSON-ready results: every scale's results, the oracle per task and the plot path.

        Args:
            with_predictions (`bool`): include per-sample records of every scale.
        """
        return {
            "scales": self.scales,
            "tokens_per_scale": {str(s): t for s, t in self.tokens_per_scale.items()},
            "per_scale": {str(s): self.per_scale[s].to_dict(with_predictions) for s in self.scales},
            "oracle": {task: _report_dict(report) for task, report in self.oracle.items()},
            "auto": {task: {"mean_tokens": t, "accuracy": a} for task, (t, a) in self.auto.items()},
            "plot": self.plot_path,
        }

    def to_markdown(self) -> str:
        """Per task, the primary metric (x100) at every scale, the baseline and the oracle (metric @ mean tokens)."""
        header = " | ".join(f"{self.tokens_per_scale[s]:g} tok" for s in self.scales)
        auto_header = " auto (mean tokens) |" if self.auto else ""
        lines = [
            f"| task | metric (x100) | {header} | baseline | oracle (mean tokens) |{auto_header}",
            "|---|---|" + "---:|" * len(self.scales) + "---:|---:|" + ("---:|" if self.auto else ""),
        ]
        for task, values in self.series().items():
            key, label = TASK_SPECS[task].table[0]
            cells = " | ".join(f"{100 * values[self.tokens_per_scale[s]]:.1f}" for s in self.scales)
            baseline = 100 * self.per_scale[self.scales[0]].tasks[task].baseline[key]
            report = self.oracle.get(task)
            oracle = "-"
            if report is not None:
                info = _report_dict(report)
                oracle = f"{100 * info['oracle_accuracy']:.1f} ({info['oracle_mean_tokens']:.2f})"
            auto = ""
            if self.auto:
                auto = f" {100 * self.auto[task][1]:.1f} ({self.auto[task][0]:.2f}) |" if task in self.auto else " - |"
            lines.append(f"| {task} | {label} | {cells} | {baseline:.1f} | {oracle} |{auto}")
        return "\n".join(lines)

    def save(self, output_dir: str | os.PathLike, with_predictions: bool = False) -> Path:
        """Writes `matryoshka_results.json` and `matryoshka_results.md` into `output_dir`; returns the JSON path.

        Args:
            output_dir (`str` or `os.PathLike`): folder (created).
            with_predictions (`bool`): include per-sample records.
        """
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "matryoshka_results.json"
        path.write_text(json.dumps(self.to_dict(with_predictions), indent=2))
        (folder / "matryoshka_results.md").write_text(self.to_markdown() + "\n")
        return path


def _default_oracle() -> Callable[..., Any]:
    from .oracle import oracle_analysis

    return oracle_analysis


def evaluate_matryoshka(
    model: Any,
    processor: Any,
    dataset: Any,
    scales: Sequence[int] | None = None,
    oracle_fn: Callable[..., Any] | None = None,
    output_dir: str | os.PathLike | None = None,
    plot: bool = True,
    processor_kwargs: dict | None = None,
    **evaluate_kwargs: Any,
) -> MatryoshkaEvalResult:
    """Runs [`evaluate`] at every Matryoshka scale, then the oracle analysis and the accuracy-vs-tokens plot.

    The scale reaches the model through the processor (`processor(..., matryoshka_scale=S)` writes S placeholders per
    image, from which `MatryoshkaLlavaForConditionalGeneration` infers the scale).

    Args:
        model: a Matryoshka model (any model whose processor takes `matryoshka_scale`).
        processor: a processor with a `matryoshka_scales` attribute that accepts `matryoshka_scale` per call.
        dataset (`datasets.Dataset` or list of rows): rows in the documented format.
        scales (`Sequence[int]`, *optional*): scales to run (default: `model.config.matryoshka_scales`, else the
            processor's `matryoshka_scales`).
        oracle_fn (`Callable`, *optional*): `oracle_fn(predictions={scale: [...]}, references=[...],
            is_correct=..., tokens_per_scale={...})` (default: `comm_vlm.evaluation.oracle.oracle_analysis`).
        output_dir (`str` or `os.PathLike`, *optional*): write the JSON, Markdown and `accuracy_vs_tokens.png` there.
        plot (`bool`): draw the plot (needs `output_dir` and matplotlib).
        processor_kwargs (`dict`, *optional*): other processor arguments.
        evaluate_kwargs: passed to [`evaluate`] (`tasks`, `batch_size`, `max_new_tokens`, ...).

    A model with a learned scale selector (`config.matryoshka_scale_selector`) also gets `matryoshka_scale="auto"`
    per binary task (`MatryoshkaEvalResult.auto`: mean tokens and accuracy, in the table and on the plot).

    Raises:
        ValueError: the processor does not take `matryoshka_scale`, or no scales are known.
    """
    if not hasattr(processor, "matryoshka_scales"):
        raise ValueError(
            f"{type(processor).__name__} has no `matryoshka_scales`, so it cannot take a per-call `matryoshka_scale`; "
            "use MatryoshkaLlavaProcessor (or run `evaluate` for a single-scale model)."
        )
    if scales is None:
        scales = getattr(getattr(model, "config", None), "matryoshka_scales", None) or processor.matryoshka_scales
    scales = sorted({int(s) for s in scales or []})
    if not scales:
        raise ValueError("No Matryoshka scales to evaluate; pass `scales=[...]` or set config.matryoshka_scales.")
    images = list(dataset["images"]) if hasattr(dataset, "column_names") else [r["images"] for r in dataset]
    images_per_row = sum(len(x or []) for x in images) / max(1, len(images))
    tokens = {s: s * images_per_row for s in scales}
    per_scale = {}
    for scale in scales:
        logger.info(f"Matryoshka evaluation at {scale} visual tokens per image")
        kwargs = {**(processor_kwargs or {}), "matryoshka_scale": scale}
        per_scale[scale] = evaluate(model, processor, dataset, processor_kwargs=kwargs, **evaluate_kwargs)
    oracle_fn = oracle_fn or _default_oracle()
    oracle = {}
    for task, result in per_scale[scales[0]].tasks.items():
        if result.correct is None:
            continue
        correct = {s: per_scale[s].tasks[task].correct for s in scales}
        oracle[task] = oracle_fn(correct, [True] * result.num_samples, is_correct=_is_true, tokens_per_scale=tokens)
    outcome = MatryoshkaEvalResult(scales, per_scale, tokens, oracle)
    if getattr(model, "scale_selector", None) is not None and oracle:
        from .scale_selection import auto_scale_points

        rows = [dict(row) for row in dataset]
        outcome.auto = auto_scale_points(model, processor, rows, outcome, evaluate_kwargs.get("batch_size", 32))
    if output_dir is not None:
        if plot:
            from .plots import plot_metric_vs_tokens

            oracle_points = {}
            for task, report in oracle.items():
                info = _report_dict(report)
                oracle_points[task] = (info["oracle_mean_tokens"], info["oracle_accuracy"])
            path = Path(output_dir) / "accuracy_vs_tokens.png"
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            curves = {task: {"auto (selector)": [point]} for task, point in outcome.auto.items()}
            plot_metric_vs_tokens(outcome.series(), path, oracle_points, TASK_SPECS, curves=curves or None)
            outcome.plot_path = str(path)
        outcome.save(output_dir)
    return outcome


__all__ = [
    "EvalResult",
    "MatryoshkaEvalResult",
    "TaskResult",
    "evaluate",
    "evaluate_matryoshka",
    "generate_answers",
]
