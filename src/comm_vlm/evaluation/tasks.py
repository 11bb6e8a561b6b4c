"""Task registry of the evaluation: per task its metric, generation length, baseline and table columns.

`TASK_SPECS` maps a task name to a [`TaskSpec`]; the runners (`comm_vlm.evaluation.runners`) look tasks up there, so
a new benchmark is one entry. Metrics are those of COMM (Jiang et al. 2023): REC accuracy at IoU >= 0.5, REG and
caption CIDEr-D, POPE accuracy / F1 / yes-ratio (mean over the random / popular / adversarial settings), VQA accuracy;
and M3's (Cai et al. 2024): MME perception / cognition scores, GQA exact-match accuracy (`exact_match`; see
`comm_vlm.evaluation.metrics`). Baselines:

* REC *chance*: the accuracy of answering every sample with the target box of another sample of the same set, i.e. a
  box drawn from the set's own box distribution (the generator's distribution on synthetic data), averaged exactly
  over all ordered pairs (i != j); when n * n exceeds `REC_CHANCE_MAX_PAIRS` (n > 2,000), over `REC_CHANCE_PARTNERS`
  partners per sample drawn with a fixed seed (0).
* REG / caption *majority*: the most frequent `answer` of the set (ties: alphabetical first), given for every sample.
* POPE *majority*: the majority label for every question ("yes" on a tie): 50% accuracy on balanced POPE.
* MME *majority*: the majority label for every question; *exact match* (GQA): the set's most frequent answer.
* VQA *majority*: the most frequent answer of the set for every question (the VQA paper's "prior" baseline);
  `accuracy_per_question_type_prior` gives the prior per `question_type` too, and `per_question_group_prior` over each
  `VQA_QUESTION_GROUPS` group (e.g. the synthetic scenes' attribute questions: colour and shape together), each
  question answered with its own type's majority answer.

Baselines use the evaluated set's own answer statistics: they are chance levels, not models. One baseline learns from
a training split instead: `pope_object_prior`, a text-only POPE model that answers each question with the training
split's majority answer for the object it names (POPE's popular/adversarial negatives make that prior informative).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .metrics import (
    REC_IOU_THRESHOLD,
    cider_d,
    mme_scores,
    parse_mme_answer,
    pope_metrics,
    rec_ious,
    resolve_yes_no,
    vqa_accuracy,
    vqa_score,
)


REC_CHANCE_MAX_PAIRS = 4_000_000
REC_CHANCE_PARTNERS = 1000
# Question types scored together as well as one by one: the attribute questions of the synthetic scenes (what colour
# is the <shape>, what shape is the <colour> object). A group none of whose types occur is left out of the metrics.
VQA_QUESTION_GROUPS: dict[str, tuple[str, ...]] = {"attribute": ("colour", "shape")}


@dataclass
class TaskScore:
    """Scores of one task.

    Args:
        metrics (`dict`): the task's metrics (fractions; CIDEr in coco-caption units).
        correct (`list[bool]`, *optional*): per-sample correctness where the metric is binary (REC, POPE, VQA full
            credit); `None` for CIDEr tasks.
        per_sample (`list[float]`): per-sample value (IoU, CIDEr-D, VQA score, 1/0 for POPE).
    """

    metrics: dict[str, Any]
    correct: list[bool] | None
    per_sample: list[float]


def _column(rows: Sequence[dict], name: str) -> list:
    return [row[name] for row in rows]


def _majority(values: Sequence[str]) -> str:
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def score_rec(predictions: Sequence[str], rows: Sequence[dict]) -> TaskScore:
    """REC accuracy at IoU >= 0.5 (first parsed box; no box = wrong) against `box`.

    Args:
        predictions (`Sequence[str]`): generated answers.
        rows (`Sequence[dict]`): the task's rows, in the same order.
    """
    ious = rec_ious(predictions, _column(rows, "box"))
    values = [iou or 0.0 for iou in ious]
    correct = [iou is not None and iou >= REC_IOU_THRESHOLD for iou in ious]
    metrics = {
        "accuracy": sum(correct) / len(correct),
        "mean_iou": sum(values) / len(values),
        "unparsable": sum(iou is None for iou in ious) / len(ious),
        "num_samples": len(ious),
    }
    return TaskScore(metrics, correct, values)


def score_cider(predictions: Sequence[str], rows: Sequence[dict]) -> TaskScore:
    """CIDEr-D against `references` (coco-caption units).

    Args:
        predictions (`Sequence[str]`): generated answers.
        rows (`Sequence[dict]`): the task's rows, in the same order.
    """
    result = cider_d(predictions, _column(rows, "references"))
    return TaskScore({"cider": result.score, "num_samples": len(predictions)}, None, result.scores)


_POPE_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "unparsed")


def score_pope(predictions: Sequence[str], rows: Sequence[dict]) -> TaskScore:
    """POPE metrics per `pope_setting` and their mean over the settings present (COMM's "avg POPE").

    Args:
        predictions (`Sequence[str]`): generated answers.
        rows (`Sequence[dict]`): the task's rows, in the same order.
    """
    labels = [str(a).strip().lower() for a in _column(rows, "answer")]
    settings: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        settings.setdefault(row.get("pope_setting") or "all", []).append(i)
    per_setting = {
        name: pope_metrics([predictions[i] for i in idx], [labels[i] for i in idx]) for name, idx in settings.items()
    }
    metrics: dict[str, Any] = {k: float(np.mean([m[k] for m in per_setting.values()])) for k in _POPE_KEYS}
    metrics["num_samples"] = len(predictions)
    metrics["settings"] = per_setting
    correct = [resolve_yes_no(p) == label for p, label in zip(predictions, labels)]
    return TaskScore(metrics, correct, [float(c) for c in correct])


def _by_type(rows: Sequence[dict], values: Sequence[float]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for row, value in zip(rows, values):
        if row.get("question_type"):
            groups.setdefault(row["question_type"], []).append(value)
    return {name: sum(v) / len(v) for name, v in sorted(groups.items())}


def _by_group(rows: Sequence[dict], values: Sequence[float]) -> dict[str, float]:
    """Mean value over the rows of each `VQA_QUESTION_GROUPS` group (every question weighs the same)."""
    means = {}
    for name, types in VQA_QUESTION_GROUPS.items():
        members = [value for row, value in zip(rows, values) if row.get("question_type") in types]
        if members:
            means[name] = sum(members) / len(members)
    return means


def score_vqa(predictions: Sequence[str], rows: Sequence[dict]) -> TaskScore:
    """Official VQA accuracy against `references` (the human answers), overall, per `question_type` and per
    `VQA_QUESTION_GROUPS` group of question types.

    Args:
        predictions (`Sequence[str]`): generated answers.
        rows (`Sequence[dict]`): the task's rows, in the same order.
    """
    references = _column(rows, "references")
    metrics: dict[str, Any] = vqa_accuracy(predictions, references)
    scores = [vqa_score(p, r) for p, r in zip(predictions, references)]
    metrics["per_question_type"] = _by_type(rows, scores)
    metrics["per_question_group"] = _by_group(rows, scores)
    return TaskScore(metrics, [s >= 1.0 for s in scores], scores)


def score_mme(predictions: Sequence[str], rows: Sequence[dict]) -> TaskScore:
    """MME perception and cognition scores (`comm_vlm.evaluation.metrics.mme_scores`) over `answer`, `category` and
    `image_id` (the pair key).

    Args:
        predictions (`Sequence[str]`): generated answers.
        rows (`Sequence[dict]`): the task's rows, in the same order.
    """
    labels = [str(a).strip().lower() for a in _column(rows, "answer")]
    metrics = mme_scores(predictions, labels, _column(rows, "category"), _column(rows, "image_id"))
    correct = [parse_mme_answer(p) == label for p, label in zip(predictions, labels)]
    return TaskScore(metrics, correct, [float(c) for c in correct])


def exact_match_answer(text: str) -> str:
    """A short answer as GQA's evaluation compares it in LLaVA-1.5 (`convert_gqa_for_eval.py`): stripped, trailing
    periods removed, lowercased.

    Args:
        text (`str`): a generated or reference answer.
    """
    return text.strip().rstrip(".").lower()


def score_exact_match(predictions: Sequence[str], rows: Sequence[dict]) -> TaskScore:
    """Exact-match accuracy against `answer` (GQA), overall and per `question_type`.

    Args:
        predictions (`Sequence[str]`): generated answers.
        rows (`Sequence[dict]`): the task's rows, in the same order.
    """
    answers = [exact_match_answer(str(a)) for a in _column(rows, "answer")]
    correct = [exact_match_answer(p) == a for p, a in zip(predictions, answers)]
    values = [float(c) for c in correct]
    metrics = {
        "accuracy": sum(values) / len(values),
        "num_samples": len(values),
        "per_question_type": _by_type(rows, values),
    }
    return TaskScore(metrics, correct, values)


def rec_chance(boxes: Sequence[Sequence[float]], threshold: float = REC_IOU_THRESHOLD) -> dict[str, float]:
    """Chance REC accuracy: P(IoU(box_i, box_j) >= threshold) over ordered pairs i != j of the set's target boxes.

    Args:
        boxes (`Sequence[Sequence[float]]`): the target boxes.
        threshold (`float`): IoU for a hit.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(b)
    if n < 2:
        return {"accuracy": 0.0, "mean_iou": 0.0, "num_samples": n}
    if n * n <= REC_CHANCE_MAX_PAIRS:
        left, right = np.repeat(np.arange(n), n), np.tile(np.arange(n), n)
        keep = left != right
        left, right = left[keep], right[keep]
    else:
        rng = np.random.default_rng(0)
        left = np.repeat(np.arange(n), REC_CHANCE_PARTNERS)
        right = (left + rng.integers(1, n, size=left.shape)) % n  # never the sample itself
    x1, y1 = np.maximum(b[left, 0], b[right, 0]), np.maximum(b[left, 1], b[right, 1])
    x2, y2 = np.minimum(b[left, 2], b[right, 2]), np.minimum(b[left, 3], b[right, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area[left] + area[right] - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    return {"accuracy": float((iou >= threshold).mean()), "mean_iou": float(iou.mean()), "num_samples": n}


def baseline_rec(rows: Sequence[dict]) -> dict[str, Any]:
    """REC chance: `rec_chance` of the rows' `box` column.

    Args:
        rows (`Sequence[dict]`): the task's rows.
    """
    return {"name": "chance (a random box of the set)", **rec_chance(_column(rows, "box"))}


def baseline_cider(rows: Sequence[dict]) -> dict[str, Any]:
    """CIDEr-D of the set's most frequent `answer` given for every row.

    Args:
        rows (`Sequence[dict]`): the task's rows.
    """
    constant = _majority(_column(rows, "answer"))
    metrics = score_cider([constant] * len(rows), rows).metrics
    return {"name": f"majority answer {constant!r}", **metrics}


def baseline_pope(rows: Sequence[dict]) -> dict[str, Any]:
    """POPE metrics of always answering the majority label ("yes" on a tie).

    Args:
        rows (`Sequence[dict]`): the task's rows.
    """
    labels = Counter(str(a).strip().lower() for a in _column(rows, "answer"))
    constant = "yes" if labels["yes"] >= labels["no"] else "no"
    metrics = score_pope([constant] * len(rows), rows).metrics
    return {"name": f"majority label {constant!r}", **metrics}


def pope_object_prior(train_rows: Sequence[dict], test_rows: Sequence[dict]) -> dict[str, Any]:
    """POPE metrics of a text-only model: each test question gets the majority answer of the training rows that ask
    about the same `object` (the training split's overall majority for an object it never asks about).

    Args:
        train_rows, test_rows (`Sequence[dict]`): POPE rows with `object` and `answer`.
    """
    votes: dict[str, Counter] = {}
    for row in train_rows:
        votes.setdefault(row["object"], Counter())[str(row["answer"]).strip().lower()] += 1
    overall = sum(votes.values(), Counter())
    fallback = "yes" if overall["yes"] >= overall["no"] else "no"
    predictions = []
    for row in test_rows:
        counts = votes.get(row["object"])
        predictions.append(("yes" if counts["yes"] >= counts["no"] else "no") if counts else fallback)
    return {"name": "text-only prior: training majority per object", **score_pope(predictions, test_rows).metrics}


def baseline_vqa(rows: Sequence[dict]) -> dict[str, Any]:
    """VQA accuracy of the set's most frequent answer, plus the per-question-type prior.

    Args:
        rows (`Sequence[dict]`): the task's rows.
    """
    constant = _majority(_column(rows, "answer"))
    metrics = score_vqa([constant] * len(rows), rows).metrics
    priors = {}
    for row in rows:
        priors.setdefault(row.get("question_type") or "", []).append(row["answer"])
    priors = {qtype: _majority(answers) for qtype, answers in priors.items()}
    per_type = [priors[row.get("question_type") or ""] for row in rows]
    prior_scores = score_vqa(per_type, rows).metrics
    metrics["accuracy_per_question_type_prior"] = prior_scores["accuracy"]
    # Each question type against its own majority answer (e.g. "red" for colour questions): the attribute baseline.
    metrics["per_question_type_prior"] = prior_scores.get("per_question_type", {})
    # A group of types (e.g. colour and shape: the attribute questions) against the same per-type answers.
    metrics["per_question_group_prior"] = prior_scores.get("per_question_group", {})
    return {"name": f"majority answer {constant!r}", **metrics}


def baseline_mme(rows: Sequence[dict]) -> dict[str, Any]:
    """MME scores of always answering the majority label ("yes" on a tie).

    Args:
        rows (`Sequence[dict]`): the task's rows.
    """
    labels = Counter(str(a).strip().lower() for a in _column(rows, "answer"))
    constant = "yes" if labels["yes"] >= labels["no"] else "no"
    return {"name": f"majority label {constant!r}", **score_mme([constant] * len(rows), rows).metrics}


def baseline_exact_match(rows: Sequence[dict]) -> dict[str, Any]:
    """Exact-match accuracy of the set's most frequent answer given for every question.

    Args:
        rows (`Sequence[dict]`): the task's rows.
    """
    constant = _majority([exact_match_answer(str(a)) for a in _column(rows, "answer")])
    return {"name": f"majority answer {constant!r}", **score_exact_match([constant] * len(rows), rows).metrics}


@dataclass(frozen=True)
class TaskSpec:
    """How one task is generated, scored and compared.

    Args:
        max_new_tokens (`int`): generation length.
        score (`Callable[[predictions, rows], TaskScore]`): the metric.
        baseline (`Callable[[rows], dict]`): the chance / majority baseline (same metric keys plus `name`).
        table (`tuple[tuple[str, str], ...]`): `(metric key, column label)` pairs shown in the Markdown table.
        columns (`tuple[str, ...]`): dataset columns the score and baseline need.
    """

    max_new_tokens: int
    score: Callable[[Sequence[str], Sequence[dict]], TaskScore]
    baseline: Callable[[Sequence[dict]], dict]
    table: tuple[tuple[str, str], ...]
    columns: tuple[str, ...] = ("answer",)

    @property
    def primary(self) -> str:
        return self.table[0][0]


TASK_SPECS: dict[str, TaskSpec] = {
    "rec": TaskSpec(48, score_rec, baseline_rec, (("accuracy", "Acc@0.5"),), ("box",)),
    "reg": TaskSpec(24, score_cider, baseline_cider, (("cider", "CIDEr"),), ("answer", "references")),
    "caption": TaskSpec(48, score_cider, baseline_cider, (("cider", "CIDEr"),), ("answer", "references")),
    "pope": TaskSpec(8, score_pope, baseline_pope, (("accuracy", "Acc"), ("f1", "F1"), ("yes_ratio", "Yes-ratio"))),
    "vqa": TaskSpec(10, score_vqa, baseline_vqa, (("accuracy", "VQA acc"),), ("answer", "references")),
    "mme": TaskSpec(
        8,
        score_mme,
        baseline_mme,
        (("perception", "Perception"), ("cognition", "Cognition")),
        ("answer", "category", "image_id"),
    ),
    "exact_match": TaskSpec(10, score_exact_match, baseline_exact_match, (("accuracy", "Acc"),)),
}


__all__ = [
    "REC_CHANCE_MAX_PAIRS",
    "REC_CHANCE_PARTNERS",
    "TASK_SPECS",
    "TaskScore",
    "TaskSpec",
    "VQA_QUESTION_GROUPS",
    "baseline_cider",
    "baseline_exact_match",
    "baseline_mme",
    "baseline_pope",
    "baseline_rec",
    "baseline_vqa",
    "exact_match_answer",
    "rec_chance",
    "score_cider",
    "score_exact_match",
    "score_mme",
    "score_pope",
    "score_rec",
    "score_vqa",
]
