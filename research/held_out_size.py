"""How much of the demo's pass/fail against its bars is the size of its held-out split?

The main job (`comm_vlm.demo.main_job`: tiny COMM, Jiang et al. 2023, arXiv 2310.08825; Matryoshka-LLaVA, Cai et al.
2024, arXiv 2405.17430; the adaptive combiner, Piergiovanni and Angelova 2023, arXiv 2305.19924) scores REC, REG,
captions and POPE on 100 held-out scenes. The attribute-VQA bar is 2x answering each question with its type's majority
answer *in the split scored*; on 100 scenes "circle" answers 37-49% of the shape questions depending on the seed (the
generator draws circles, squares and triangles 5:4:3, i.e. 41.7%), so the bar itself moves by seed, on top of the
models' own sampling error. What this script measures (`research/results/held_out_size.md`) is why the demo scores VQA
on 500 held-out scenes (`MainJobConfig.vqa_test_scenes`).

This script takes finished main-job runs (`<runs-dir>/seed<k>/results.json`, e.g. from `comm-vlm demo --seed k` or
`research/main_job_seeds.py`), draws a larger held-out split from the same seed (`--test-scenes`), and scores every
saved model on both: the job's split (`prepare_training_data`, as the run's config drew it), which reproduces the
recorded numbers, and the larger one. Scenes are drawn in sequence and kept disjoint from the same training scenes, so
the larger split's first 100 scenes and their questions are the job's own, except POPE's popular and adversarial
negatives, which follow the split's own object frequencies (as POPE draws them from its dataset's). Nothing is trained.
M3 is scored at its full scale, where the bars are read. Writes `held_out_size.md` (per model, check and seed: value,
bar and value/bar on each split, the seeds meeting each bar, and each split's majority rates), `held_out_size.json`
(the same scores) and `held_out_size.png` (value/bar on the job's split against the larger one) to `--output-dir`
(default `research/results`; with `--quick`, the runs' folder, `outputs/quick/main_job_seeds`).

    PYTHONPATH=src python research/held_out_size.py --runs-dir DIR --seeds 0 1 2 3 --test-scenes 500
    PYTHONPATH=src python research/held_out_size.py --quick   # smoke run on a --quick job, under a minute
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from main_job_seeds import CHECKS, seed_results, vqa_test_scenes  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from comm_vlm.demo.main_job import MainJobConfig, prepare_training_data  # noqa: E402
from comm_vlm.evaluation.runners import evaluate, evaluate_matryoshka  # noqa: E402


# The demo's three bars and the two attribute types one by one (`main_job_seeds.CHECKS`).
REPORTED = CHECKS
# Per split, the share of each attribute question type's majority answer (the bar's baseline).
MAJORITY_TYPES = ("colour", "shape")


def score(final_dir: str, family: str, split, batch_size: int) -> dict:
    """The eval dict (`EvalResult.to_dict()["tasks"]`) of the model saved in `final_dir` on `split`."""
    model = AutoModelForImageTextToText.from_pretrained(final_dir).eval()
    processor = AutoProcessor.from_pretrained(final_dir)
    if family == "matryoshka_llava":
        full = max(model.config.matryoshka_scales)
        result = evaluate_matryoshka(model, processor, split, scales=[full], plot=False, batch_size=batch_size)
        result = result.per_scale[full]
    else:
        result = evaluate(model, processor, split, batch_size=batch_size)
    return result.to_dict(with_predictions=False)["tasks"]


def majority_rates(split) -> dict[str, float]:
    """Per attribute question type: the share of its most frequent answer, and the number of questions."""
    rates = {}
    for qtype in MAJORITY_TYPES:
        answers = [row["answer"] for row in split if row["task"] == "vqa" and row["question_type"] == qtype]
        if answers:
            rates[qtype] = Counter(answers).most_common(1)[0][1] / len(answers)
            rates[f"{qtype} questions"] = len(answers)
    return rates


def seed_scores(results: dict, test_scenes: int, batch_size: int, work_dir: Path) -> dict:
    """Per split size (the job's and `test_scenes`): the majority rates and, per family, the checks `(value, bar)`."""
    config = results["config"]
    job = MainJobConfig(
        train_scenes=config["train_scenes"],
        test_scenes=config["test_scenes"],
        vqa_test_scenes=vqa_test_scenes(config),
        seed=config["seed"],
        image_after_question=config["image_after_question"],
    )
    larger = replace(job, test_scenes=test_scenes, vqa_test_scenes=max(test_scenes, job.vqa_test_scenes))
    out = {}
    for split_config in (job, larger):
        # The held-out rows exactly as the job draws them (`prepare_training_data`).
        split = prepare_training_data(split_config, work_dir / f"test{split_config.test_scenes}")[0]["test"]
        families = {}
        for family, model in results["models"].items():
            evaluation = score(model["final_dir"], family, split, batch_size)
            families[family] = {label: read(evaluation) for label, _, read in REPORTED}
        out[split_config.test_scenes] = {"majority": majority_rates(split), "families": families}
    return out


def markdown(scores: dict[int, dict], sizes: tuple[int, int]) -> str:
    """Per model, check and seed: value, bar and ratio on each split; then the seeds meeting each bar per split."""
    small, large = sizes
    seeds = list(scores)
    lines = [
        f"| model | check (bar) | seed | {small} scenes: value / bar | ratio | {large} scenes: value / bar | ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    met = Counter()
    families = scores[seeds[0]][small]["families"]
    for family in families:
        for label, bar_text, _ in REPORTED:
            for seed in seeds:
                cells = []
                for size in sizes:
                    value, bar = scores[seed][size]["families"][family][label]
                    cells += [f"{100 * value:.1f} / {100 * bar:.1f}", f"{value / bar:.2f}" if bar else "-"]
                    met[family, label, size] += value >= bar - 1e-9
                lines.append(f"| {family} | {label} ({bar_text}) | {seed} | " + " | ".join(cells) + " |")
    lines += ["", f"Seeds meeting each bar (of {len(seeds)}), on {small} and on {large} scenes:", ""]
    for family in families:
        for label, _, _ in REPORTED:
            lines.append(f"- {family}, {label}: {met[family, label, small]} -> {met[family, label, large]}")
    lines += ["", "Majority answer's share per attribute question type (questions), per seed:", ""]
    for seed in seeds:
        parts = []
        for size in sizes:
            rates = scores[seed][size]["majority"]
            shares = ", ".join(f"{q} {100 * rates[q]:.1f}% ({rates[f'{q} questions']})" for q in MAJORITY_TYPES)
            parts.append(f"{size} scenes: {shares}")
        lines.append(f"- seed {seed}: " + "; ".join(parts))
    return "\n".join(lines)


def plot(scores: dict[int, dict], sizes: tuple[int, int], path: Path, limit: float = 1.6) -> None:
    """value / bar on the job's split (x) against the larger split (y), one panel per model, one dot per seed and
    check; ratios above `limit` (REC's, mostly) are drawn at the edge as triangles, so the bars' region stays
    legible."""
    small, large = sizes
    seeds = list(scores)
    families = list(scores[seeds[0]][small]["families"])
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 4.2), squeeze=False)
    for ax, family in zip(axes[0], families):
        for k, (label, _, _) in enumerate(REPORTED):
            ax.plot([], [], "o", color=f"C{k}", label=label)
            for seed in seeds:
                ratios = []
                for size in sizes:
                    value, bar = scores[seed][size]["families"][family][label]
                    ratios.append(value / bar if bar else float("nan"))
                clipped = any(r > limit for r in ratios)
                x, y = (min(r, limit) for r in ratios)
                ax.plot(x, y, "^" if clipped else "o", color=f"C{k}", alpha=0.8)
        ax.plot([0, limit], [0, limit], color="grey", linewidth=0.8)
        ax.axvline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.set_xlim(0, limit * 1.03)
        ax.set_ylim(0, limit * 1.03)
        ax.set_title(family, fontsize=9)
        ax.set_xlabel(f"value / bar, the job's {small} scenes")
        ax.set_ylabel(f"value / bar, {large} scenes")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"Main-job checks on its own held-out split vs a larger one (one dot per seed; triangles: ratio > {limit})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs-dir", help="holds seed<k>/results.json (default: outputs/main_job_seeds; --quick: outputs/quick/...)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--test-scenes", type=int, default=500, help="scenes of the larger held-out split")
    parser.add_argument("--output-dir", help="default: research/results (with --quick: --runs-dir)")
    parser.add_argument("--quick", action="store_true", help="score a --quick job (run here if missing)")
    args = parser.parse_args()
    runs_dir = Path(args.runs_dir or ("outputs/quick/main_job_seeds" if args.quick else "outputs/main_job_seeds"))
    output_dir = Path(args.output_dir or (runs_dir if args.quick else "research/results"))
    output_dir.mkdir(parents=True, exist_ok=True)
    test_scenes = 12 if args.quick else args.test_scenes
    scores = {}
    for seed in args.seeds:
        path = runs_dir / f"seed{seed}" / "results.json"
        if args.quick:
            results = seed_results(MainJobConfig.for_run(quick=True, seed=seed), runs_dir)
        elif path.exists():
            results = json.loads(path.read_text())
        else:
            raise ValueError(
                f"No main-job run at {path}: run `comm-vlm demo --seed {seed} --output-dir {path.parent}` first."
            )
        if test_scenes <= results["config"]["test_scenes"]:
            raise ValueError(
                f"--test-scenes {test_scenes} is not larger than the job's {results['config']['test_scenes']} scenes."
            )
        with tempfile.TemporaryDirectory() as work:
            scores[seed] = seed_scores(results, test_scenes, results["config"]["eval_batch_size"], Path(work))
        sizes = tuple(scores[seed])
    table = markdown(scores, sizes)
    (output_dir / "held_out_size.md").write_text(table + "\n")
    (output_dir / "held_out_size.json").write_text(json.dumps({str(s): v for s, v in scores.items()}, indent=1))
    plot(scores, sizes, output_dir / "held_out_size.png")
    print(table)


if __name__ == "__main__":
    main()
