"""Training the learned scale selector of Matryoshka-LLaVA (M3) for `matryoshka_scale="auto"`.

The selector (`comm_vlm.models.scale_selector_matryoshka`) predicts, per image, P(correct) at every trained scale from
the mean and std of the image's projected grid and the mean text embedding of its prompt. Its labels are what
`evaluate_matryoshka` measures: per sample and scale, whether the answer was right (the oracle analysis's table):

    report = train_scale_selector(model, processor, rows, task="vqa")   # evaluates every scale, fits, attaches
    save_with_scale_selector(model, processor, "out", report)          # model + selector + processor + record

Use a split the model was not trained on and that is not the split you report on (the labels must reflect the
model's held-out behaviour). A row's label is its own correctness; rows with several images give every image the
row's label (the selector is meant for one image per question). `comm-vlm train-scale-selector` runs this.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.utils import logging

from ..models.configuration_matryoshka import check_scale_selector
from ..models.scale_selector_matryoshka import (
    MatryoshkaScaleSelector,
    choose_scales,
    selector_features,
    selector_grids,
)
from .runners import MatryoshkaEvalResult, _open_image, _prompt_messages, _rows_by_task, evaluate_matryoshka


logger = logging.get_logger(__name__)

SELECTOR_RECORD = "scale_selector_training.json"


@dataclass
class SelectorTrainingReport:
    """What [`train_scale_selector`] measured.

    Args:
        split (`str`): the data the selector was trained on (a path or a description).
        task (`str`): the task whose correctness is the label.
        samples (`int`): images (= rows with one image) trained on.
        scales (`list[int]`): the scales predicted for.
        label_balance (`dict[str, float]`): per scale, the fraction of samples answered correctly (the positives).
        train_accuracy (`dict[str, float]`): per scale, the selector's accuracy (P >= 0.5) on the training samples.
        train_loss (`float`): final mean BCE over scales, on all training samples.
        margin (`float`): the operating point saved in the config.
        chosen_accuracy (`float`), chosen_mean_tokens (`float`): on the training split, the accuracy and mean visual
            tokens per image of the scales the selector picks at `margin` (read from the per-scale correctness).
        oracle_accuracy (`float`), oracle_mean_tokens (`float`): the oracle on the same split.
        steps (`int`), learning_rate (`float`), width (`int`), seed (`int`), seconds (`float`): the fit.
    """

    split: str
    task: str
    samples: int
    scales: list[int]
    label_balance: dict[str, float]
    train_accuracy: dict[str, float]
    train_loss: float
    margin: float
    chosen_accuracy: float
    chosen_mean_tokens: float
    oracle_accuracy: float
    oracle_mean_tokens: float
    steps: int
    learning_rate: float
    width: int
    seed: int
    seconds: float = 0.0

    def summary(self) -> str:
        """One paragraph: the data, label balance, train accuracy and the operating point's outcome."""
        balance = ", ".join(f"{s}: {self.label_balance[str(s)]:.3f}" for s in self.scales)
        accuracy = ", ".join(f"{s}: {self.train_accuracy[str(s)]:.3f}" for s in self.scales)
        return (
            f"trained on {self.split} ({self.task}, {self.samples} samples, {self.steps} Adam steps, width "
            f"{self.width}, seed {self.seed}); fraction correct per scale {{{balance}}}; selector train accuracy per "
            f"scale {{{accuracy}}}; at margin {self.margin:g} on this split, auto answers "
            f"{100 * self.chosen_accuracy:.1f}% at {self.chosen_mean_tokens:.2f} visual tokens per image (oracle "
            f"{100 * self.oracle_accuracy:.1f}% at {self.oracle_mean_tokens:.2f})."
        )

    def to_markdown(self) -> str:
        """A short Markdown summary (for the console and logs)."""
        lines = [
            f"Scale selector trained on `{self.split}` ({self.task}, {self.samples} samples, {self.steps} Adam steps, "
            f"width {self.width}, seed {self.seed}, {self.seconds:.1f} s).",
            "",
            "| scale | fraction correct (positives) | selector train accuracy (P >= 0.5) |",
            "|---:|---:|---:|",
        ]
        for scale in self.scales:
            key = str(scale)
            lines.append(f"| {scale} | {self.label_balance[key]:.3f} | {self.train_accuracy[key]:.3f} |")
        lines.append(
            f"\nOn this split at margin {self.margin:g}: auto {100 * self.chosen_accuracy:.1f} at "
            f"{self.chosen_mean_tokens:.2f} tokens per image; oracle {100 * self.oracle_accuracy:.1f} at "
            f"{self.oracle_mean_tokens:.2f}."
        )
        return "\n".join(lines)


def read_eval_rows(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Evaluation rows (`messages`, `images`, `task`, `answer`, ... as `comm_vlm.demo.synthetic` writes them) from a
    `.jsonl` / `.json` file, a folder of them, or a folder written by `datasets.Dataset.save_to_disk`.

    Relative image paths are resolved against the file's folder when they do not exist as given.

    Args:
        path (`str` or `os.PathLike`): the file or folder.
        limit (`int`, *optional*): keep the first `limit` rows.

    Raises:
        FileNotFoundError: nothing to read at `path`.
        ValueError: a file that is neither JSON lines nor a JSON list of rows.
    """
    path = Path(path)
    if path.is_dir() and (path / "dataset_info.json").is_file():
        from datasets import load_from_disk

        rows = [dict(row) for row in load_from_disk(str(path))]
        return rows[:limit] if limit is not None else rows
    files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"No .jsonl/.json evaluation rows at {path}; give a file or a folder of them.")
    rows: list[dict] = []
    for file in files:
        text = file.read_text(encoding="utf-8")
        try:
            records = json.loads(text) if file.suffix == ".json" else [json.loads(s) for s in text.splitlines() if s]
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not JSON lines (or a JSON list) of evaluation rows: {err}") from None
        if not isinstance(records, list):
            raise ValueError(f"{file} holds a {type(records).__name__}; give a JSON list or JSON lines of rows.")
        for record in records:
            images = record.get("images") or []
            record["images"] = [
                str(file.parent / im) if isinstance(im, str) and not os.path.exists(im) else im for im in images
            ]
            rows.append(record)
        if limit is not None and len(rows) >= limit:
            break
    return rows[:limit] if limit is not None else rows


@torch.no_grad()
def extract_selector_inputs(
    model: Any, processor: Any, rows: Sequence[dict], batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The selector's inputs for every image of `rows`, computed as `generate(..., matryoshka_scale="auto")` does.

    Args:
        model (`MatryoshkaLlavaForConditionalGeneration`): the frozen model.
        processor (`MatryoshkaLlavaProcessor`): its processor (chat template, default-scale placeholders).
        rows (`Sequence[dict]`): conversational rows (a trailing assistant turn is dropped).
        batch_size (`int`): rows per encoder call.

    Returns:
        `(image_summary, text_summary, row_of_image)`: `(N, 2D)` and `(N, D)` float32 tensors on the CPU, and the row
        of each of the N images.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    padding_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    model.eval()
    images_out, texts_out, row_of_image = [], [], []
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="Selector inputs", unit="batch"):
            batch = [r for r in range(start, min(start + batch_size, len(rows))) if rows[r].get("images")]
            if not batch:
                continue
            prompts = [
                processor.apply_chat_template(
                    _prompt_messages(rows[r]["messages"]), add_generation_prompt=True, tokenize=False
                )
                for r in batch
            ]
            images = [_open_image(im) for r in batch for im in rows[r]["images"]]
            inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
            inputs = inputs.to(model.device).to(model.dtype)
            grids = selector_grids(model, inputs["pixel_values"], inputs.get("image_sizes"))
            per_row = [len(rows[r]["images"]) for r in batch]
            image, text = selector_features(model, inputs["input_ids"], inputs.get("attention_mask"), grids, per_row)
            images_out.append(image.cpu())
            texts_out.append(text.cpu())
            row_of_image += [r for r, n in zip(batch, per_row) for _ in range(n)]
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    if not images_out:
        raise ValueError("No row has an image; the scale selector needs image rows.")
    return torch.cat(images_out), torch.cat(texts_out), row_of_image


def fit_selector(
    image_summary: torch.Tensor,
    text_summary: torch.Tensor,
    labels: torch.Tensor,
    scales: Sequence[int],
    width: int = 256,
    steps: int = 1000,
    learning_rate: float = 3e-3,
    batch_size: int = 256,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> tuple[MatryoshkaScaleSelector, float]:
    """Fits a fresh selector with per-scale BCE (Adam, minibatches drawn with a fixed seed), on the CPU.

    Args:
        image_summary (`torch.Tensor` of shape `(N, 2D)`), text_summary (`torch.Tensor` of shape `(N, D)`): inputs.
        labels (`torch.Tensor` of shape `(N, K)`): 1 where the model answered correctly at scale k.
        scales (`Sequence[int]`): the K scales, ascending.
        width, steps, learning_rate, batch_size, weight_decay, seed: the fit.

    Returns:
        `(selector, final_loss)`: the float32 selector in eval mode and its mean BCE on all samples.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    selector = MatryoshkaScaleSelector(text_summary.shape[-1], scales, width)
    optimizer = torch.optim.Adam(selector.parameters(), lr=learning_rate, weight_decay=weight_decay)
    image_summary, text_summary, labels = image_summary.float().cpu(), text_summary.float().cpu(), labels.float().cpu()
    num = labels.shape[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: one thread is fastest, and immune to a busy second core
    try:
        selector.train()
        for _ in tqdm(range(steps), desc="Scale selector", unit="step"):
            index = torch.randint(num, (min(batch_size, num),), generator=generator)
            logits = selector(image_summary[index], text_summary[index])
            loss = F.binary_cross_entropy_with_logits(logits, labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        selector.eval()
        with torch.no_grad():
            final = F.binary_cross_entropy_with_logits(selector(image_summary, text_summary), labels).item()
    finally:
        torch.set_num_threads(threads)
    return selector, final


def train_scale_selector(
    model: Any,
    processor: Any,
    dataset: Any,
    task: str = "vqa",
    width: int = 256,
    margin: float = 0.05,
    steps: int = 1000,
    learning_rate: float = 3e-3,
    seed: int = 0,
    batch_size: int = 32,
    split_name: str = "",
    evaluation: MatryoshkaEvalResult | None = None,
) -> SelectorTrainingReport:
    """Evaluates `model` at every scale on `dataset`'s `task` rows, fits a selector to the per-sample correctness and
    attaches it (`model.scale_selector`, `config.matryoshka_scale_selector`), so `generate(matryoshka_scale="auto")`
    and `save_pretrained` use it.

    Args:
        model (`MatryoshkaLlavaForConditionalGeneration`): the frozen model (left unchanged but for the selector).
        processor (`MatryoshkaLlavaProcessor`): its processor.
        dataset (`datasets.Dataset` or list of rows): evaluation rows (not the split you report on).
        task (`str`): a task with binary correctness (`vqa`, `pope`, `rec`).
        width (`int`), margin (`float`): the selector's config (`matryoshka_scale_selector`).
        steps (`int`), learning_rate (`float`), seed (`int`): the fit (see [`fit_selector`]).
        batch_size (`int`): prompts per `generate` / encoder call.
        split_name (`str`): how the record names the data.
        evaluation ([`MatryoshkaEvalResult`], *optional*): a finished `evaluate_matryoshka` of these rows (skips it).

    Raises:
        ValueError: a task without binary correctness, a bad width/margin, or fewer than two samples.
    """
    start = time.perf_counter()
    scales = list(model.config.matryoshka_scales)
    spec = check_scale_selector({"width": width, "margin": margin}, scales)
    rows = _rows_by_task(dataset, [task])[task]
    if evaluation is None:
        evaluation = evaluate_matryoshka(model, processor, rows, scales=scales, tasks=[task], batch_size=batch_size)
    result = evaluation.per_scale[scales[0]].tasks[task]
    if result.correct is None:
        raise ValueError(
            f"Task {task!r} has no per-sample right/wrong (a CIDEr task); train the selector on vqa, pope or rec."
        )
    correct = torch.tensor([evaluation.per_scale[s].tasks[task].correct for s in scales], dtype=torch.float32).T
    image, text, row_of_image = extract_selector_inputs(model, processor, rows, batch_size)
    labels = correct[row_of_image]
    if labels.shape[0] < 2:
        raise ValueError(f"The selector needs at least two image samples; {task} has {labels.shape[0]}.")
    selector, loss = fit_selector(image, text, labels, scales, spec["width"], steps, learning_rate, seed=seed)
    with torch.no_grad():
        probabilities = torch.sigmoid(selector(image, text))
    chosen = choose_scales(probabilities, scales, spec["margin"])
    chosen_correct = [bool(labels[i, scales.index(s)]) for i, s in enumerate(chosen)]
    oracle_tokens = [next((s for s, ok in zip(scales, row) if ok), scales[0]) for row in labels.bool().tolist()]
    train_accuracy = ((probabilities >= 0.5) == labels.bool()).float().mean(0)
    model.config.matryoshka_scale_selector = spec
    param = next(model.parameters())
    model.scale_selector = selector.to(param.device, param.dtype)
    report = SelectorTrainingReport(
        split=split_name or f"{len(rows)} {task} rows",
        task=task,
        samples=int(labels.shape[0]),
        scales=scales,
        label_balance={str(s): float(labels[:, k].mean()) for k, s in enumerate(scales)},
        train_accuracy={str(s): float(train_accuracy[k]) for k, s in enumerate(scales)},
        train_loss=loss,
        margin=spec["margin"],
        chosen_accuracy=sum(chosen_correct) / len(chosen),
        chosen_mean_tokens=sum(chosen) / len(chosen),
        oracle_accuracy=float(labels.any(1).float().mean()),
        oracle_mean_tokens=sum(oracle_tokens) / len(oracle_tokens),
        steps=steps,
        learning_rate=learning_rate,
        width=spec["width"],
        seed=seed,
    )
    report.seconds = round(time.perf_counter() - start, 1)
    if not math.isfinite(report.train_loss):
        logger.warning(f"The scale selector's training loss is {report.train_loss}; check the inputs.")
    logger.info(report.to_markdown())
    return report


@torch.no_grad()
def auto_scale_points(
    model: Any, processor: Any, rows: Sequence[dict], outcome: MatryoshkaEvalResult, batch_size: int = 32
) -> dict[str, tuple[float, float]]:
    """`matryoshka_scale="auto"` on an evaluation already run at every scale: per task with per-sample correctness,
    (mean visual tokens per sample, accuracy) of the selector's choices.

    Each sample is scored from the run at the scale the selector picks for it, which is what `generate(...,
    matryoshka_scale="auto")` answers (it pools the same grids and re-lays the prompt as that fixed scale; asserted in
    `tests/test_scale_selector.py`). Rows with several images are skipped (their images may get different scales).

    Args:
        model: an M3 model with a `scale_selector`; processor: its processor.
        rows (`Sequence[dict]`): the evaluated rows, in the order `outcome` saw them.
        outcome ([`MatryoshkaEvalResult`]): the per-scale runs (`evaluate_matryoshka`).
    """
    single = [i for i, row in enumerate(rows) if len(row.get("images") or []) == 1]
    if not single:
        return {}
    image, text, row_of_image = extract_selector_inputs(model, processor, [rows[i] for i in single], batch_size)
    selector = model.scale_selector
    param = next(selector.parameters())
    probabilities = torch.sigmoid(selector(image.to(param.device), text.to(param.device)).float()).cpu()
    margin = model.config.matryoshka_scale_selector["margin"]
    chosen = dict(zip((single[r] for r in row_of_image), choose_scales(probabilities, selector.scales, margin)))
    row_tasks = [row.get("task") for row in rows]
    points = {}
    for task, first in outcome.per_scale[outcome.scales[0]].tasks.items():
        if first.correct is None:
            continue
        task_rows = [i for i, t in enumerate(row_tasks) if t == task]
        picked = [(k, chosen[i]) for k, i in enumerate(task_rows) if i in chosen]
        if picked:
            right = [outcome.per_scale[s].tasks[task].correct[k] for k, s in picked]
            tokens = sum(outcome.tokens_per_scale[s] for _, s in picked) / len(picked)
            points[task] = (tokens, sum(map(bool, right)) / len(right))
    return points


def save_with_scale_selector(
    model: Any, processor: Any, output_dir: str | os.PathLike, report: SelectorTrainingReport
) -> Path:
    """Writes the model with its selector, the processor, the remote code, a model card that states the selector's
    training numbers, and `scale_selector_training.json`, atomically (`comm_vlm.training.trainer.save_atomically`).

    Args:
        model, processor: from [`train_scale_selector`].
        output_dir (`str` or `os.PathLike`): replaced as a whole.
        report ([`SelectorTrainingReport`]): recorded next to the weights.
    """
    from ..hub import ModelCardInfo, render_model_card
    from ..training.trainer import save_atomically

    def write_extra(directory: Path) -> None:
        (directory / SELECTOR_RECORD).write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
        note = (
            'Learned scale selector for `matryoshka_scale="auto"` (`comm-vlm train-scale-selector`): '
            + report.summary()
        )
        render_model_card(model.config, ModelCardInfo(notes=[note])).save(directory / "README.md")

    return save_atomically(model, processor, output_dir, remote_code=True, write_extra=write_extra)


__all__ = [
    "SELECTOR_RECORD",
    "SelectorTrainingReport",
    "extract_selector_inputs",
    "fit_selector",
    "read_eval_rows",
    "save_with_scale_selector",
    "train_scale_selector",
]
