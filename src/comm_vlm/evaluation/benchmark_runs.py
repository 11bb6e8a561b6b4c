"""One benchmark run, as `comm-vlm evaluate` does it: generate, score, and write the results where they are read.

    run = evaluate_benchmark(model, processor, "pope", load_benchmark("pope", ...), "outputs/eval")
    run = evaluate_benchmark(m3, m3_processor, "gqa", dataset, "outputs/eval", scales="all")   # every M3 scale

Writes under `output_dir/<benchmark>/<split>/` (a single Matryoshka scale: `.../scale-<S>/`; several or all:
`.../matryoshka/`):

* `results.json` (metrics, baseline, settings) and `results.md` (the table), or with several scales
  `matryoshka_results.{json,md}` (every scale, the baseline and the oracle), `oracle.md` (M3's oracle analysis per
  task with binary correctness) and `accuracy_vs_tokens.png`;
* `predictions.jsonl` (`predictions_scale-<S>.jsonl` per scale): one record per sample, the prediction beside the
  ground truth and its score;

and merges the run's `model-index` entries into `output_dir/eval_results.json`, a model-card file that
`comm-vlm push SRC REPO --card output_dir/eval_results.json` puts into the card (runs of several benchmarks into the
same `output_dir` accumulate there; a rerun replaces its own entries).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import logging

from .benchmarks import get_benchmark, model_index_entries
from .runners import EvalResult, evaluate, evaluate_matryoshka
from .tasks import TASK_SPECS


logger = logging.get_logger(__name__)

EVAL_RESULTS_FILE = "eval_results.json"
_IDENTITY = ("dataset_type", "dataset_name", "dataset_config", "dataset_split", "metric_type", "metric_name")


@dataclass
class BenchmarkRun:
    """What [`evaluate_benchmark`] did.

    Args:
        benchmark (`str`), split (`str`): what ran.
        folder (`Path`): where its files are.
        table (`str`): the Markdown table.
        files (`list[str]`): the files in `folder`.
        eval_results (`Path`): the model-card file the entries were merged into.
        entries (`list[dict]`): this run's `model-index` entries.
        result (`EvalResult` or `MatryoshkaEvalResult`): the full result.
    """

    benchmark: str
    split: str
    folder: Path
    table: str
    files: list[str] = field(default_factory=list)
    eval_results: Path | None = None
    entries: list[dict[str, Any]] = field(default_factory=list)
    result: Any = None


def prediction_records(result: EvalResult) -> list[dict[str, Any]]:
    """One JSON-ready record per sample of every task of `result`: its metadata (empty fields left out), the
    prediction, its metric value and, for binary tasks, whether it is correct.

    Args:
        result (`EvalResult`): an `evaluate` result.
    """
    records = []
    for task, task_result in result.tasks.items():
        for index, (row, prediction) in enumerate(zip(result.rows.get(task, []), task_result.predictions)):
            record = {"index": index, **{k: v for k, v in row.items() if v not in ("", [], None)}}
            record["prediction"] = prediction
            record["value"] = task_result.per_sample[index]
            if task_result.correct is not None:
                record["correct"] = task_result.correct[index]
            records.append(record)
    return records


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Writes one JSON object per line.

    Args:
        path (`Path`): the file. records (`Sequence[dict]`): the objects.
    """
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def merge_eval_results(path: str | os.PathLike, entries: Sequence[dict[str, Any]]) -> Path:
    """Merges model-index entries into a model-card file `{"eval_results": [...]}` (created when missing); an entry
    replaces an earlier one of the same dataset, split, metric and configuration.

    Args:
        path (`str` or `os.PathLike`): the card file (`comm-vlm push --card`).
        entries (`Sequence[dict]`): `ModelCardInfo.eval_results` entries.
    """
    path = Path(path)
    card: dict[str, Any] = {"eval_results": []}
    if path.is_file():
        card = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(card, dict) or not isinstance(card.get("eval_results", []), list):
            raise ValueError(f"{path} is not a model-card file with an `eval_results` list; move it or fix it.")
    key = lambda e: tuple(e.get(k) for k in (*_IDENTITY, "metric_config"))  # noqa: E731
    new = {key(e) for e in entries}
    card["eval_results"] = [e for e in card.get("eval_results", []) if key(e) not in new] + list(entries)
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path


def _header(name: str, split: str, count: int, extra: str = "") -> str:
    benchmark = get_benchmark(name)
    return f"## {benchmark.title} ({split}, {count} samples{extra})\n\n"


def evaluate_benchmark(
    model: Any,
    processor: Any,
    name: str,
    dataset: Any,
    output_dir: str | os.PathLike,
    scales: int | Sequence[int] | str | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
) -> BenchmarkRun:
    """Generates, scores and writes one benchmark's results (see the module docstring for the files).

    Args:
        model: an image-text-to-text model. processor: its processor.
        name (`str`): the benchmark (`BENCHMARKS` key) whose rows `dataset` holds (`load_benchmark`).
        dataset (`datasets.Dataset`): the rows.
        output_dir (`str` or `os.PathLike`): the root of the outputs.
        scales (`int`, `Sequence[int]` or `"all"`, *optional*): Matryoshka visual tokens per image: one scale runs
            `evaluate` at it; several, or `"all"` (the model's `matryoshka_scales`), run `evaluate_matryoshka` with
            the oracle analysis and the accuracy-vs-tokens plot. `None`: the processor's default.
        batch_size (`int`): prompts per `generate` call.
        max_new_tokens (`int`, *optional*): generation length (default: the task's).

    Raises:
        ValueError: scales for a processor that takes none.
    """
    benchmark = get_benchmark(name)
    task = benchmark.task
    split = dataset[0]["split"]
    folder = Path(output_dir) / name / split
    if scales is not None and not hasattr(processor, "matryoshka_scales"):
        raise ValueError(
            f"--matryoshka-scale needs a Matryoshka (M3) model; {type(processor).__name__} takes no scale. Leave the "
            "option out for this model."
        )
    kwargs = {"tasks": [task], "batch_size": batch_size, "max_new_tokens": max_new_tokens}
    if scales is None or isinstance(scales, int):
        processor_kwargs = None if scales is None else {"matryoshka_scale": scales}
        folder = folder if scales is None else folder / f"scale-{scales}"
        folder.mkdir(parents=True, exist_ok=True)
        result = evaluate(model, processor, dataset, processor_kwargs=processor_kwargs, **kwargs)
        result.settings.update(benchmark=name, split=split, max_new_tokens=result.tasks[task].max_new_tokens)
        (folder / "results.json").write_text(json.dumps(result.to_dict(with_predictions=False), indent=2) + "\n")
        tokens = "" if scales is None else f", {scales} visual tokens per image"
        table = _header(name, split, len(dataset), tokens) + result.to_markdown()
        (folder / "results.md").write_text(table + "\n")
        write_jsonl(folder / "predictions.jsonl", prediction_records(result))
        entries = model_index_entries(name, split, result.tasks[task].metrics, scales, scales)
        outcome: Any = result
    else:
        folder = folder / "matryoshka"
        outcome = evaluate_matryoshka(
            model, processor, dataset, scales=None if scales == "all" else list(scales), output_dir=folder, **kwargs
        )
        table = _header(name, split, len(dataset), ", every Matryoshka scale") + outcome.to_markdown()
        (folder / "matryoshka_results.md").write_text(table + "\n")
        reports = [f"### {t}\n\n{r.to_markdown()}" for t, r in outcome.oracle.items() if hasattr(r, "to_markdown")]
        if reports:
            (folder / "oracle.md").write_text("\n\n".join(reports) + "\n")
        entries = []
        for scale in outcome.scales:
            write_jsonl(folder / f"predictions_scale-{scale}.jsonl", prediction_records(outcome.per_scale[scale]))
            metrics = outcome.per_scale[scale].tasks[task].metrics
            entries += model_index_entries(name, split, metrics, scale, outcome.tokens_per_scale[scale])
    eval_results = merge_eval_results(Path(output_dir) / EVAL_RESULTS_FILE, entries)
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    logger.info(f"{name} ({split}): {TASK_SPECS[task].primary} written to {folder}")
    return BenchmarkRun(name, split, folder, table, files, eval_results, entries, outcome)


__all__ = [
    "EVAL_RESULTS_FILE",
    "BenchmarkRun",
    "evaluate_benchmark",
    "merge_eval_results",
    "prediction_records",
    "write_jsonl",
]
