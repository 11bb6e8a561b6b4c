"""How far the demo's numbers move with the seed, against its bars (REC, POPE, attribute VQA).

The main job (`comm_vlm.demo.main_job`: tiny COMM, Jiang et al. 2023, arXiv 2310.08825; Matryoshka-LLaVA, Cai et al.
2024, arXiv 2405.17430; the adaptive combiner, Piergiovanni and Angelova 2023, arXiv 2305.19924) is one recorded run
per setting, and at this size a run's numbers move by several points with the seed alone. This script runs the job
once per seed (`MainJobConfig.seed` draws the synthetic splits, the encoder warm-up, every init and every training
order) and checks every model against the bars:

- REC acc@0.5 at least 3x the chance rate (the REC baseline);
- POPE (yes/no) accuracy at least 75%;
- attribute VQA at least 2x the majority baseline: accuracy on the attribute questions (colour and shape together)
  against answering each with its question type's majority answer ("red" for colour, "circle" for shape).

Colour and shape are also checked one by one against the same 2x, for information. Shape is the harder of the two
readings: the scenes draw three shapes 5:4:3, so "circle" answers about 42% of a test split's shape questions
(39-41% of the 500 held-out scenes' over seeds 0-3), and 2x asks for 79-83% accuracy on a three-way question.

Each seed's run goes to `<runs-dir>/seed<k>` (default `outputs/main_job_seeds`); a seed whose
`<runs-dir>/seed<k>/results.json` exists is read, not run again (so `comm-vlm demo --seed k --output-dir
<runs-dir>/seed<k>` runs count too). Writes `main_job_seeds.md` (value per seed, ratio to the bar, seeds that meet it)
and `main_job_seeds.png` (every check's value over its bar, one dot per seed) to `--output-dir` (default
`research/results`; with `--quick`, the runs' folder, `outputs/quick/main_job_seeds`). `--against DIR` lists, after
each check, the same check in other finished runs of the same seeds (e.g. the default demo's, beside a variant's),
named by `--against-label`.

    PYTHONPATH=src python research/main_job_seeds.py --seeds 0 1 2 3   # about 20-23 minutes per seed on 2 cores
    PYTHONPATH=src python research/main_job_seeds.py --quick            # smoke run, seconds
    PYTHONPATH=src python research/main_job_seeds.py --seeds 0 1 2 3 --runs-dir <variant runs> \
        --output-dir <dir> --families adaptive_combiner --against <default runs> --against-label "default"
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from comm_vlm.demo.main_job import MainJobConfig, run_main_job  # noqa: E402


def attribute_vqa(evaluation: dict) -> tuple[float, float]:
    """(attribute VQA accuracy, its bar: 2x the per-type majority baseline) of one model's eval.

    Raises `ValueError` for an eval written before the attribute group was scored (rerun that seed).
    """
    metrics, baseline = evaluation["vqa"]["metrics"], evaluation["vqa"]["baseline"]
    if "attribute" not in metrics.get("per_question_group", {}):
        raise ValueError(
            "This results.json has no attribute VQA score (`per_question_group`), so it predates that metric: "
            "delete that seed's directory to run it again."
        )
    return metrics["per_question_group"]["attribute"], 2 * baseline["per_question_group_prior"]["attribute"]


# (label, bar as a multiple of the baseline or an absolute accuracy, how to read (value, bar) from a model's eval)
CHECKS: list[tuple[str, str, Callable[[dict], tuple[float, float]]]] = [
    ("REC acc@0.5", "3x chance", lambda e: (e["rec"]["metrics"]["accuracy"], 3 * e["rec"]["baseline"]["accuracy"])),
    ("POPE acc", ">= 75", lambda e: (e["pope"]["metrics"]["accuracy"], 0.75)),
    ("VQA attribute", "2x per-type majority", attribute_vqa),
    *[
        (
            f"VQA {qtype}",
            f"2x {qtype} majority",
            lambda e, q=qtype: (
                e["vqa"]["metrics"]["per_question_type"][q],
                2 * e["vqa"]["baseline"]["per_question_type_prior"][q],
            ),
        )
        for qtype in ("colour", "shape")
    ],
]


def seed_results(config: MainJobConfig, output_dir: Path) -> dict:
    """The job's results for `config.seed`: read from `<output_dir>/seed<k>/results.json`, else run and written."""
    path = output_dir / f"seed{config.seed}" / "results.json"
    if path.exists():
        return json.loads(path.read_text())
    return run_main_job(path.parent, config)


def vqa_test_scenes(run_config: dict) -> int:
    """The held-out scenes a recorded run scored VQA on: its `vqa_test_scenes`, or, in a results.json without that
    field, its `test_scenes` (every task scored on the same split)."""
    return run_config.get("vqa_test_scenes", run_config["test_scenes"])


def check_rows(results: dict[int, dict], families: list[str] | None = None, label: str | None = None) -> list[dict]:
    """Per model (those of `families`, default all) and check: the value and the bar per seed (x100), and the seeds
    that meet the bar. `label` is appended to the model's name in the rows (`--against`'s runs)."""
    first = next(iter(results.values()))
    rows = []
    for family in families or first["models"]:
        for check, bar_text, read in CHECKS:
            per_seed = {seed: read(r["models"][family]["eval"]) for seed, r in results.items()}
            rows.append(
                {
                    "model": family if label is None else f"{family} ({label})",
                    "check": check,
                    "bar": bar_text,
                    "values": {seed: 100 * value for seed, (value, _) in per_seed.items()},
                    "bars": {seed: 100 * bar for seed, (_, bar) in per_seed.items()},
                    # A tolerance for the rounding of a multiple (3 * 0.05 > 0.15 in floating point).
                    "met": [seed for seed, (value, bar) in per_seed.items() if value >= bar - 1e-9],
                }
            )
    return rows


def against_rows(rows: list[dict], results: dict[int, dict], against_dir: Path, label: str) -> list[dict]:
    """`rows` with, after each, the same check of the same models in other runs of the same seeds (`--against`).

    Raises `ValueError` if a seed's `<against_dir>/seed<k>/results.json` is missing or lacks one of the models.
    """
    other = {}
    for seed in results:
        path = against_dir / f"seed{seed}" / "results.json"
        if not path.exists():
            raise ValueError(
                f"{path} does not exist: `--against` needs finished runs of the same seeds ({list(results)})."
            )
        other[seed] = json.loads(path.read_text())
    families = list(next(iter(results.values()))["models"])
    missing = sorted({f for r in other.values() for f in families if f not in r["models"]})
    if missing:
        raise ValueError(f"The runs in {against_dir} have no {missing} model: compare runs of the same families.")
    paired = []
    for row, base in zip(rows, check_rows(other, families, label)):
        paired += [row, base]
    return paired


def markdown(rows: list[dict], results: dict[int, dict]) -> str:
    seeds = list(results)
    lines = [
        "| model | check (bar) | " + " | ".join(f"seed {s}" for s in seeds) + " | seeds meeting the bar |",
        "|---|---|" + "---:|" * len(seeds) + "---:|",
    ]
    for row in rows:
        cells = []
        for seed in seeds:
            value, bar = row["values"][seed], row["bars"][seed]
            cells.append(f"{value:.1f} ({value / bar:.2f})" if bar else f"{value:.1f}")
        lines.append(
            f"| {row['model']} | {row['check']} ({row['bar']}) | "
            + " | ".join(cells)
            + f" | {len(row['met'])} of {len(seeds)} |"
        )
    walls = " / ".join(f"{results[s]['seconds']:.0f}" for s in seeds)
    lines += ["", f"Cells: value x100 (value / bar). Seconds of work per seed: {walls}."]
    return "\n".join(lines)


def plot(rows: list[dict], results: dict[int, dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows)), 4.0))
    for seed in results:
        ratios = [row["values"][seed] / row["bars"][seed] if row["bars"][seed] else float("nan") for row in rows]
        ax.plot(range(len(rows)), ratios, "o", alpha=0.75, label=f"seed {seed}")
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="bar")
    ax.set_xticks(range(len(rows)), [f"{row['model']}\n{row['check']}" for row in rows], rotation=90, fontsize=7)
    ax.set_ylabel("value / bar")
    ax.set_title("Main job vs its acceptance bars, per seed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument(
        "--runs-dir", help="the seeds' runs, <dir>/seed<k> (default: outputs/main_job_seeds; --quick: outputs/quick)"
    )
    parser.add_argument("--output-dir", help="where the table and plot go (default: research/results; --quick: runs)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI-sized runs (numbers not meaningful)")
    size.add_argument("--long", action="store_true", help="`MainJobConfig.long()` (`comm-vlm demo --long`)")
    parser.add_argument("--families", nargs="+", help="default: every family of the main job")
    parser.add_argument(
        "--against", help="finished runs of the same seeds (`<dir>/seed<k>/results.json`) to list beside each check"
    )
    parser.add_argument("--against-label", default="against", help="their name in the table and plot")
    args = parser.parse_args()
    runs_dir = Path(args.runs_dir or ("outputs/quick/main_job_seeds" if args.quick else "outputs/main_job_seeds"))
    output_dir = Path(args.output_dir or (runs_dir if args.quick else "research/results"))
    output_dir.mkdir(parents=True, exist_ok=True)
    # Each seed's job is exactly what `comm-vlm demo [--quick | --long] [--families ...] --seed k` runs.
    results = {
        seed: seed_results(MainJobConfig.for_run(args.quick, args.long, args.families, seed), runs_dir)
        for seed in args.seeds
    }
    rows = check_rows(results)
    if args.against:
        rows = against_rows(rows, results, Path(args.against), args.against_label)
    table = markdown(rows, results)
    (output_dir / "main_job_seeds.md").write_text(table + "\n")
    plot(rows, results, output_dir / "main_job_seeds.png")
    print(table)


if __name__ == "__main__":
    main()
