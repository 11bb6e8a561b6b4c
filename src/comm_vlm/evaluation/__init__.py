"""Evaluation of COMM-family models: the papers' metrics, synthetic benchmark data and batched runners.

* `metrics`: REC accuracy at IoU >= 0.5, CIDEr-D (as coco-caption), POPE accuracy/precision/recall/F1/yes-ratio,
  official VQA accuracy (COMM, Jiang et al. 2023; Shikra; POPE; VQAv2).
* `tasks`: the task registry (metric, generation length, baseline per task).
* `runners`: `evaluate` (one model) and `evaluate_matryoshka` (every M3 scale, oracle analysis, accuracy-vs-tokens
  plot).
* `benchmarks`: the published benchmarks read from their own files (`BENCHMARKS`, `load_benchmark`);
  `benchmark_runs.evaluate_benchmark` is one `comm-vlm evaluate` run (results, predictions, model-index entries).
"""

from .benchmark_runs import evaluate_benchmark
from .benchmarks import BENCHMARKS, Benchmark, load_benchmark
from .metrics import (
    box_iou,
    caption_tokenize,
    cider_d,
    mme_scores,
    normalize_vqa_answer,
    parse_yes_no,
    pope_metrics,
    rec_accuracy,
    vqa_accuracy,
    vqa_score,
)
from .oracle import OracleReport, oracle_analysis, plot_oracle
from .runners import EvalResult, MatryoshkaEvalResult, evaluate, evaluate_matryoshka, generate_answers
from .tasks import TASK_SPECS, TaskSpec, rec_chance


__all__ = [
    "BENCHMARKS",
    "TASK_SPECS",
    "Benchmark",
    "EvalResult",
    "OracleReport",
    "MatryoshkaEvalResult",
    "TaskSpec",
    "box_iou",
    "caption_tokenize",
    "cider_d",
    "evaluate",
    "evaluate_benchmark",
    "evaluate_matryoshka",
    "oracle_analysis",
    "generate_answers",
    "load_benchmark",
    "mme_scores",
    "normalize_vqa_answer",
    "parse_yes_no",
    "plot_oracle",
    "pope_metrics",
    "rec_accuracy",
    "rec_chance",
    "vqa_accuracy",
    "vqa_score",
]
