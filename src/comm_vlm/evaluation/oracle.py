"""Oracle granularity analysis of Matryoshka-LLaVA (M3, Cai et al. 2024, arXiv 2405.17430, Sec. 4.2 and Table 2).

Given one model's predictions at every visual-token scale, the *oracle* picks for each sample the scale with the
fewest tokens that still answers correctly. The paper reports its average tokens (8.9 on LLaVA-NeXT's six benchmarks)
and accuracy (above the full-token model), next to the accuracy of every fixed scale: the gap motivates a learned
scale predictor.

    report = oracle_analysis({1: preds_1, 9: preds_9, 576: preds_576}, answers, is_correct=my_match)
    print(report.to_markdown())

Pure Python (matplotlib is imported lazily by `plot_oracle` only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


UNANSWERED_POLICIES = ("min", "max", "exclude")


def exact_match(prediction: Any, reference: Any) -> bool:
    """Default correctness: case- and whitespace-insensitive string equality."""
    return str(prediction).strip().lower() == str(reference).strip().lower()


@dataclass
class OracleReport:
    """Result of [`oracle_analysis`].

    Args:
        scales (`list[int]`): the analysed scales, ascending.
        correct (`dict[int, list[bool]]`): per scale, whether each sample is answered correctly.
        accuracy_per_scale (`dict[int, float]`): accuracy of every fixed scale.
        oracle_tokens (`list[float | None]`): per sample, the fewest visual tokens that answer correctly; for a
            sample no scale answers, the tokens the `unanswered` policy charges (`None` when excluded).
        oracle_scale (`list[int | None]`): per sample, the smallest correct scale (`None` when none is correct).
        oracle_accuracy (`float`): fraction of samples some scale answers correctly.
        oracle_mean_tokens (`float`): mean of `oracle_tokens` over the samples counted.
        unanswered (`str`): the policy used for samples no scale answers (`min`, `max` or `exclude`).
    """

    scales: list[int]
    correct: dict[int, list[bool]]
    accuracy_per_scale: dict[int, float]
    oracle_tokens: list[float | None]
    oracle_scale: list[int | None]
    oracle_accuracy: float
    oracle_mean_tokens: float
    unanswered: str = "min"
    tokens_per_scale: dict[int, float] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return len(self.oracle_scale)

    def to_markdown(self) -> str:
        """A markdown table: one row per scale plus the oracle row (tokens, accuracy)."""
        lines = ["| setting | visual tokens | accuracy |", "|---|---:|---:|"]
        for scale in self.scales:
            tokens, accuracy = self.tokens_per_scale[scale], self.accuracy_per_scale[scale]
            lines.append(f"| scale {scale} | {tokens:g} | {accuracy:.4f} |")
        lines.append(f"| oracle | {self.oracle_mean_tokens:.2f} | {self.oracle_accuracy:.4f} |")
        return "\n".join(lines)


def oracle_analysis(
    predictions: Mapping[int, Sequence[Any]],
    references: Sequence[Any],
    is_correct: Callable[[Any, Any], bool] = exact_match,
    tokens_per_scale: Mapping[int, float] | None = None,
    unanswered: str = "min",
) -> OracleReport:
    """Per-sample fewest correct tokens, the oracle's accuracy and mean tokens, and accuracy per scale.

    Args:
        predictions (`Mapping[int, Sequence]`): scale -> one prediction per sample (all the same length).
        references (`Sequence`): the reference answer of every sample.
        is_correct (`Callable[[prediction, reference], bool]`): correctness (default: `exact_match`).
        tokens_per_scale (`Mapping[int, float]`, *optional*): visual tokens a scale costs per sample (e.g.
            `scale * images`, or LLaVA-NeXT's tokens per grid); defaults to the scale itself.
        unanswered (`str`): tokens charged for a sample no scale answers: `min` (the cheapest scale: an oracle would
            not spend more on a lost sample; default), `max` (the full scale) or `exclude` (left out of the mean).

    Raises:
        ValueError: no scales, prediction lists of a different length than `references`, or an unknown policy.
    """
    if unanswered not in UNANSWERED_POLICIES:
        raise ValueError(f"Unknown `unanswered`={unanswered!r}; use one of {UNANSWERED_POLICIES}.")
    if not predictions:
        raise ValueError("`predictions` is empty: give {scale: [prediction per sample]} for at least one scale.")
    scales = sorted(predictions)
    num = len(references)
    for scale in scales:
        if len(predictions[scale]) != num:
            raise ValueError(
                f"Scale {scale} has {len(predictions[scale])} predictions for {num} references; give one per sample."
            )
    tokens = {s: float(s if tokens_per_scale is None else tokens_per_scale[s]) for s in scales}
    correct = {s: [bool(is_correct(p, r)) for p, r in zip(predictions[s], references)] for s in scales}
    accuracy = {s: (sum(c) / num if num else 0.0) for s, c in correct.items()}
    by_cost = sorted(scales, key=lambda s: (tokens[s], s))
    oracle_scale: list[int | None] = []
    oracle_tokens: list[float | None] = []
    for i in range(num):
        best = next((s for s in by_cost if correct[s][i]), None)
        oracle_scale.append(best)
        if best is not None:
            oracle_tokens.append(tokens[best])
        elif unanswered == "exclude":
            oracle_tokens.append(None)
        else:
            oracle_tokens.append(tokens[by_cost[0]] if unanswered == "min" else tokens[by_cost[-1]])
    counted = [t for t in oracle_tokens if t is not None]
    return OracleReport(
        scales=scales,
        correct=correct,
        accuracy_per_scale=accuracy,
        oracle_tokens=oracle_tokens,
        oracle_scale=oracle_scale,
        oracle_accuracy=(sum(s is not None for s in oracle_scale) / num) if num else 0.0,
        oracle_mean_tokens=(sum(counted) / len(counted)) if counted else 0.0,
        unanswered=unanswered,
        tokens_per_scale=tokens,
    )


def plot_oracle(report: OracleReport, path: str | None = None, ax: Any = None, title: str | None = None) -> Any:
    """Accuracy vs visual tokens (log x axis): one point per scale and the oracle point. Returns the axes.

    Args:
        report ([`OracleReport`]): from `oracle_analysis`.
        path (`str`, *optional*): save the figure there.
        ax (`matplotlib.axes.Axes`, *optional*): draw into these axes.
        title (`str`, *optional*): axes title.

    Raises:
        ImportError: matplotlib is not installed (`pip install comm-vlm[eval]`).
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plot_oracle needs matplotlib: pip install 'comm-vlm[eval]'.") from err
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    xs = [report.tokens_per_scale[s] for s in report.scales]
    ax.plot(xs, [report.accuracy_per_scale[s] for s in report.scales], marker="o", label="fixed scale")
    ax.scatter([report.oracle_mean_tokens], [report.oracle_accuracy], marker="*", s=150, color="C3", label="oracle")
    ax.set_xscale("log")
    ax.set_xlabel("visual tokens per sample")
    ax.set_ylabel("accuracy")
    if title:
        ax.set_title(title)
    ax.legend()
    if path is not None:
        ax.figure.savefig(path, bbox_inches="tight")
    return ax


__all__ = ["OracleReport", "exact_match", "oracle_analysis", "plot_oracle"]
