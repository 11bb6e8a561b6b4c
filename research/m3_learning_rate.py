"""Matryoshka-LLaVA's fine-tuning learning rate in the main job: the full scale against the smaller ones.

M3 (Cai et al. 2024, arXiv 2405.17430) fine-tunes a trained LLaVA-1.5 at the learning rate of LLaVA-1.5's own
instruction tuning (2e-5), with the loss averaged over every scale. The main job (`comm_vlm.demo.main_job`) does the
same with the trained tiny COMM: 200 steps at the job's learning rate (1e-3, the rate of COMM's stage 2). The demo's
bars are read at the full scale (64 tokens), where M3 ends a little below the COMM it starts from. This script reruns
the fine-tuning with the merges, aligners, projector and LLM at fractions of that rate (`--lr-scales`; the vision
towers keep the stage's own 2e-5) and scores REC, POPE and attribute VQA at every scale, against the bars of
`research/main_job_seeds.py`.

For each seed it reads the trained COMM of `<runs-dir>/seed<k>/results.json` (default `outputs/main_job_seeds`, so
the runs of `research/main_job_seeds.py` or of `comm-vlm demo --seed k --output-dir <runs-dir>/seed<k>` count), or
trains COMM alone there first (`run_main_job` with `families=("comm",)`); the fine-tuned models go to
`<runs-dir>/m3_seed<k>`. Writes `m3_learning_rate.md` (per seed and rate: the full scale against the bars, and the
16-token scale) and `m3_learning_rate.png` (accuracy vs visual tokens per rate, mean over the seeds) to `--output-dir`
(default `research/results`; with `--quick`, the runs' folder, `outputs/quick/main_job_seeds`).

    PYTHONPATH=src python research/m3_learning_rate.py --seeds 0 1 2 3 --lr-scales 1 0.3   # ~3 min per seed and rate
    PYTHONPATH=src python research/m3_learning_rate.py --quick   # smoke run, seconds
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from main_job_seeds import CHECKS, seed_results, vqa_test_scenes  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from comm_vlm.demo.main_job import (  # noqa: E402
    MainJobConfig,
    derive_family_model,
    family_recipe,
    prepare_training_data,
)
from comm_vlm.evaluation.runners import evaluate_matryoshka  # noqa: E402
from comm_vlm.training.recipes import run_recipe  # noqa: E402


# The components of the `m3_finetune` stage that train at the job's learning rate (the vision towers have their own).
COMPONENTS = ("merges", "aligners", "projector", "llm")
# (label, bar, reader) of the checks reported: the demo's three bars, the first entries of `main_job_seeds.CHECKS`.
REPORTED = CHECKS[:3]


def trained_comm(config: MainJobConfig, runs_dir: Path) -> tuple[str, dict]:
    """The final checkpoint directory of the seed's trained COMM and the config of the run that trained it
    (`main_job_seeds.seed_results`: the run in `<runs_dir>/seed<k>`, or COMM alone trained there if the seed has no
    run)."""
    results = seed_results(replace(config, families=("comm",)), runs_dir)
    if "comm" not in results["models"]:
        path = runs_dir / f"seed{config.seed}" / "results.json"
        raise ValueError(
            f"{path} has no trained COMM (models: {sorted(results['models'])}): point --runs-dir at runs that "
            "trained COMM, or at a folder without this seed, where COMM is trained first."
        )
    return results["models"]["comm"]["final_dir"], results["config"]


def finetune(config: MainJobConfig, source: str, lr_scale: float, work_dir: Path, data_paths, test) -> dict:
    """M3 from `source` with its trained components at `lr_scale` x the job's rate; per scale (tokens), per check,
    `(value, bar)`."""
    plan = {"learning_rate_scales": {c: lr_scale for c in COMPONENTS}}
    config = replace(config, family_plans={"matryoshka_llava": plan})
    derive_family_model("matryoshka_llava", config, source, work_dir / "init")
    stages = run_recipe(family_recipe("matryoshka_llava", config, work_dir / "init", data_paths), work_dir)
    final_dir = stages[-1].output_dir
    model = AutoModelForImageTextToText.from_pretrained(final_dir).eval()
    processor = AutoProcessor.from_pretrained(final_dir)
    m3 = evaluate_matryoshka(model, processor, test, output_dir=work_dir / "eval", batch_size=config.eval_batch_size)
    out = {}
    for scale, result in m3.per_scale.items():
        tasks = result.to_dict(with_predictions=False)["tasks"]
        out[m3.tokens_per_scale[scale]] = {label: read(tasks) for label, _, read in REPORTED}
    return out


def markdown(results: dict[int, dict[float, dict]]) -> str:
    """Per seed and rate: the full scale's checks (value x100 and value / bar), then the 16-token scale's values."""
    full = max(next(iter(next(iter(results.values())).values())))
    labels = [label for label, _, _ in REPORTED]
    lines = [
        "| seed | lr scale | "
        + " | ".join(f"{label} @{full:g}" for label in labels)
        + " | "
        + " | ".join(f"{label} @16" for label in labels)
        + " |",
        "|---:|---:|" + "---:|" * (2 * len(labels)),
    ]
    met = Counter()
    for seed, per_rate in results.items():
        for rate, per_tokens in per_rate.items():
            cells = []
            for label in labels:
                value, bar = per_tokens[full][label]
                cells.append(f"{100 * value:.1f} ({value / bar:.2f})")
                met[(rate, label)] += value >= bar - 1e-9
            cells += [f"{100 * per_tokens[16.0][label][0]:.1f}" if 16.0 in per_tokens else "-" for label in labels]
            lines.append(f"| {seed} | {rate:g} | " + " | ".join(cells) + " |")
    lines += ["", f"Seeds meeting each bar at {full:g} tokens, of {len(results)}:", ""]
    for (rate, label), count in met.items():
        lines.append(f"- lr scale {rate:g}, {label}: {count}")
    lines.append("\nCells: value x100 (value / bar at the full scale; bars as in `main_job_seeds.py`).")
    return "\n".join(lines)


def plot(results: dict[int, dict[float, dict]], path: Path) -> None:
    """Accuracy vs visual tokens per learning-rate scale, the mean over the seeds, one panel per check."""
    rates = list(next(iter(results.values())))
    fig, axes = plt.subplots(1, len(REPORTED), figsize=(4 * len(REPORTED), 3.6))
    for ax, (label, _, _) in zip(axes, REPORTED):
        for rate in rates:
            tokens = sorted(next(iter(results.values()))[rate])
            means = [sum(100 * r[rate][t][label][0] for r in results.values()) / len(results) for t in tokens]
            ax.plot(tokens, means, marker="o", label=f"lr x{rate:g}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("visual tokens")
        ax.set_title(label, fontsize=9)
    axes[0].set_ylabel(f"accuracy x100 (mean of {len(results)} seeds)")
    axes[0].legend(fontsize=8)
    fig.suptitle("M3 fine-tuned from the trained COMM: learning rate vs scale", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lr-scales", type=float, nargs="+", default=[1.0, 0.3])
    parser.add_argument(
        "--runs-dir", help="the seeds' runs, <dir>/seed<k> (default: outputs/main_job_seeds; --quick: outputs/quick)"
    )
    parser.add_argument("--output-dir", help="where the table and plot go (default: research/results; --quick: runs)")
    parser.add_argument("--quick", action="store_true", help="CI-sized configs (numbers not meaningful)")
    args = parser.parse_args()
    runs_dir = Path(args.runs_dir or ("outputs/quick/main_job_seeds" if args.quick else "outputs/main_job_seeds"))
    output_dir = Path(args.output_dir or (runs_dir if args.quick else "research/results"))
    output_dir.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict[float, dict]] = {}
    for seed in args.seeds:
        config = replace(MainJobConfig.quick() if args.quick else MainJobConfig(), seed=seed)
        source, run = trained_comm(config, runs_dir)
        # Scored on the held-out rows of the run M3 starts from.
        config = replace(config, vqa_test_scenes=vqa_test_scenes(run))
        splits, data_paths = prepare_training_data(config, runs_dir / f"m3_seed{seed}")
        results[seed] = {
            rate: finetune(
                config, source, rate, runs_dir / f"m3_seed{seed}" / f"lr{rate:g}", data_paths, splits["test"]
            )
            for rate in args.lr_scales
        }
    table = markdown(results)
    (output_dir / "m3_learning_rate.md").write_text(table + "\n")
    plot(results, output_dir / "m3_learning_rate.png")
    print(table)


if __name__ == "__main__":
    main()
