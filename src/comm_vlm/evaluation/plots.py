"""Accuracy vs visual tokens for Matryoshka models (M3, Cai et al. 2024, Fig. 1 / Table 2 style), as a PNG.

Drawn with `matplotlib.figure.Figure` on the Agg canvas directly, so no pyplot state or global backend is touched
(safe in notebooks, servers and test runs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any


def plot_metric_vs_tokens(
    series: Mapping[str, Mapping[float, float]],
    path: str | os.PathLike,
    oracle: Mapping[str, tuple[float, float]] | None = None,
    task_specs: Mapping[str, Any] | None = None,
    title: str | None = None,
    curves: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]] | None = None,
) -> str:
    """One panel per task: the task's primary metric (x100) against visual tokens per sample (log x axis), plus the
    oracle point (mean tokens, accuracy) where given. Returns the PNG path.

    Args:
        series (`Mapping[str, Mapping[float, float]]`): task -> {visual tokens: metric value (fraction or CIDEr)}.
        path (`str` or `os.PathLike`): where to write the PNG.
        oracle (`Mapping[str, tuple[float, float]]`, *optional*): task -> (mean oracle tokens, oracle accuracy).
        task_specs (`Mapping[str, TaskSpec]`, *optional*): labels the y axes with each task's metric name.
        title (`str`, *optional*): figure title.
        curves (`Mapping[str, Mapping[str, Sequence[tuple[float, float]]]]`, *optional*): task -> label -> points
            (visual tokens, metric value), drawn as further lines (e.g. a learned scale selector's operating points).

    Raises:
        ImportError: matplotlib is not installed (`pip install 'comm-vlm[eval]'`).
        ValueError: `series` is empty.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plot_metric_vs_tokens needs matplotlib: pip install 'comm-vlm[eval]'.") from err
    if not series:
        raise ValueError("Nothing to plot: `series` is empty; evaluate at least one task at one scale.")
    oracle = oracle or {}
    figure = Figure(figsize=(3.6 * len(series), 3.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(series), squeeze=False)[0]
    for ax, (task, values) in zip(axes, series.items()):
        tokens = sorted(values)
        ax.plot(tokens, [100 * values[t] for t in tokens], marker="o", label="fixed scale")
        for k, (label, points) in enumerate(((curves or {}).get(task) or {}).items()):
            points = sorted(points)
            xs, ys = [max(x, 1e-3) for x, _ in points], [100 * y for _, y in points]
            ax.plot(xs, ys, marker=".", linestyle="--" if k else "-", color=f"C{k + 1}", label=label)
        if task in oracle:
            mean_tokens, accuracy = oracle[task]
            ax.scatter([max(mean_tokens, 1e-3)], [100 * accuracy], marker="*", s=150, color="C3", label="oracle")
        ax.set_xscale("log")
        ax.set_xlabel("visual tokens per sample")
        label = task_specs[task].table[0][1] if task_specs and task in task_specs else "metric"
        ax.set_ylabel(f"{label} (x100)")
        ax.set_title(task)
        ax.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.savefig(os.fspath(path), dpi=100)
    return os.fspath(path)


__all__ = ["plot_metric_vs_tokens"]
