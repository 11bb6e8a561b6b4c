"""Learned scale selection for Matryoshka-LLaVA (M3): `matryoshka_scale="auto"` against every fixed scale and the
oracle, on the demo's held-out synthetic VQA split.

The model is the demo's trained M3 (`comm-vlm demo`, default config, seed 0: `<demo>/matryoshka_llava/0-m3_finetune/
final`); it is not retrained. Data, all from `comm_vlm.demo.synthetic` with the demo's `SyntheticConfig`:

* **test** (reported on): the demo's held-out VQA split, rebuilt exactly as `prepare_training_data` builds it
  (600 train scenes, the first 500 held-out scenes of seed 0's test stream, every task's questions drawn, VQA kept).
  Its fixed-scale accuracies are checked against the demo's recorded `matryoshka_results.json`.
* **selector** (the selector is fitted on it): fresh scenes of the same generator from another stream (seed 0,
  split name `selector`), excluding every train and test scene, VQA questions only. Neither the M3 model nor the
  report saw it.

Steps: write the selector split as JSON lines; run what `comm-vlm train-scale-selector` runs on it (every scale
evaluated, the selector fitted to the per-sample correctness, the model saved with it); evaluate the saved model at
every fixed scale on the test split (and the oracle); sweep the operating point (`margin`): the selector's choices on
the test split, scored from the per-scale answers (each choice's answer is the fixed-scale answer at that scale), and,
at a few margins, real `generate(matryoshka_scale="auto")` runs, whose accuracy and agreement with the scored choices
are reported. Fixed scales are interpolated linearly in tokens between neighbouring scales (what a random mixture of
the two achieves). Ablations refit the selector with the image or the text summary zeroed. The selector's inputs and
schedule were chosen on an 80/20 split of the selector split (the "design choice" table), never on the test split.

Run: `PYTHONPATH=src python benchmarks/bench_auto_scale.py [--demo /tmp/demo_full] [--work-dir /tmp/auto_scale]
[--selector-scenes 2000] [--quick]`; writes `benchmarks/results_auto_scale.md` and `results_auto_scale.png`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch
from bench_utils import cpu_name
from transformers import AutoModelForImageTextToText, AutoProcessor

from comm_vlm.demo.main_job import MainJobConfig
from comm_vlm.demo.scenes import SyntheticConfig, generate_scenes
from comm_vlm.demo.synthetic import build_rows, held_out_scenes
from comm_vlm.evaluation import TASK_SPECS, evaluate, evaluate_matryoshka
from comm_vlm.evaluation.plots import plot_metric_vs_tokens
from comm_vlm.evaluation.scale_selection import (
    extract_selector_inputs,
    fit_selector,
    read_eval_rows,
    save_with_scale_selector,
    train_scale_selector,
)
from comm_vlm.models.scale_selector_matryoshka import choose_scales


HERE = Path(__file__).resolve().parent
MARGINS = [round(0.01 * k, 2) for k in range(0, 101)]
E2E_MARGINS = [0.0, 0.1, 0.2, 0.4]
TABLE_MARGINS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 1.0]


def build_splits(work: Path, selector_scenes: int, job: MainJobConfig) -> tuple[list[dict], Path]:
    """The demo's held-out VQA rows (images under `work/test_vqa`) and the selector split's JSON-lines file."""
    synthetic = SyntheticConfig(image_after_question=job.image_after_question)
    train = generate_scenes(job.train_scenes, job.seed, "train", synthetic)
    test_scenes = held_out_scenes(train, job.vqa_test_scenes, job.seed, synthetic)
    test = [
        row
        for row in build_rows(test_scenes, job.seed, "test", config=synthetic, image_dir=work / "test_vqa")
        if row["task"] == "vqa"
    ]
    seen = {s.signature() for s in train} | {s.signature() for s in test_scenes}
    scenes = generate_scenes(selector_scenes, job.seed, "selector", synthetic, exclude=seen)
    assert not seen & {s.signature() for s in scenes}
    rows = build_rows(scenes, job.seed, "selector", tasks=["vqa"], config=synthetic, image_dir=work / "selector")
    path = work / "selector_vqa.jsonl"
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return test, path


def fixed_at(tokens: float, points: dict[float, float]) -> float:
    """Fixed-scale accuracy interpolated linearly in tokens (clamped at the ends)."""
    xs = sorted(points)
    if tokens <= xs[0]:
        return points[xs[0]]
    for lo, hi in zip(xs, xs[1:]):
        if tokens <= hi:
            return points[lo] + (points[hi] - points[lo]) * (tokens - lo) / (hi - lo)
    return points[xs[-1]]


def score_choices(chosen: list[int], per_sample: dict[int, list[float]]) -> tuple[float, float]:
    """(accuracy, mean tokens) of per-sample scale choices, from the per-scale per-sample scores."""
    accuracy = sum(per_sample[s][i] for i, s in enumerate(chosen)) / len(chosen)
    return accuracy, sum(chosen) / len(chosen)


def auto_curve(probabilities: torch.Tensor, scales: list[int], per_sample, margins) -> list[dict]:
    out = []
    for margin in margins:
        chosen = choose_scales(probabilities, scales, margin)
        accuracy, tokens = score_choices(chosen, per_sample)
        share = {s: chosen.count(s) / len(chosen) for s in scales}
        out.append({"margin": margin, "accuracy": accuracy, "tokens": tokens, "share": share, "chosen": chosen})
    return out


def auto_at_tokens(curve: list[dict], tokens: float) -> float:
    """Auto's accuracy at `tokens`, interpolated along its operating points (by tokens)."""
    points: dict[float, float] = {}
    for point in curve:
        points.setdefault(point["tokens"], point["accuracy"])
    return fixed_at(tokens, points)


def validation_study(image, text, labels, scales, width) -> list[str]:
    """The design choice, on the selector split only: 80/20 split, fits of the candidate inputs and schedules, each
    scored on the 20 % by BCE and by its accuracy at the (20 %) oracle's mean tokens."""
    num = labels.shape[0]
    order = torch.randperm(num, generator=torch.Generator().manual_seed(0))
    train, val = order[: int(0.8 * num)], order[int(0.8 * num) :]
    per_sample = {s: labels[val, k].tolist() for k, s in enumerate(scales)}
    fixed = {float(s): sum(v) / len(v) for s, v in per_sample.items()}
    oracle = [next((s for s, ok in zip(scales, row) if ok), scales[0]) for row in labels[val].bool().tolist()]
    oracle_tokens, oracle_acc = sum(oracle) / len(oracle), float(labels[val].any(1).float().mean())
    base = fixed_at(oracle_tokens, fixed)
    no_std = torch.cat([image[:, : text.shape[1]], torch.zeros_like(text)], dim=1)
    candidates = [
        ("grid mean + text", no_std, 300, 1e-3),
        ("grid mean + text", no_std, 1000, 3e-3),
        ("grid mean + std + text", image, 300, 1e-3),
        ("grid mean + std + text", image, 1000, 3e-3),
        ("grid mean + std + text", image, 2000, 3e-3),
    ]
    lines = [
        f"Validation (20 % of the selector split, {len(val)} questions; fixed "
        + ", ".join(f"{s}: {100 * fixed[float(s)]:.1f}" for s in scales)
        + f"; oracle {100 * oracle_acc:.1f} at {oracle_tokens:.2f} tokens):",
        "",
        "| selector inputs | steps | lr | val BCE | acc at the oracle's tokens | gap closed there |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, features, steps, lr in candidates:
        fitted, _ = fit_selector(features[train], text[train], labels[train], scales, width, steps, lr, seed=0)
        with torch.no_grad():
            logits = fitted(features[val], text[val])
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[val]).item()
        acc = auto_at_tokens(auto_curve(torch.sigmoid(logits), scales, per_sample, MARGINS), oracle_tokens)
        gap = (acc - base) / (oracle_acc - base)
        lines.append(f"| {name} | {steps} | {lr:g} | {bce:.3f} | {100 * acc:.1f} | {100 * gap:.0f}% |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="/tmp/demo_full", help="output folder of `comm-vlm demo`")
    parser.add_argument("--work-dir", default="/tmp/auto_scale", help="data, the model with its selector, logs")
    parser.add_argument("--selector-scenes", type=int, default=2000, help="scenes of the selector's split")
    parser.add_argument("--steps", type=int, default=1000, help="Adam steps of the selector fit")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="Adam learning rate of the fit")
    parser.add_argument("--width", type=int, default=256, help="selector MLP width")
    parser.add_argument("--margin", type=float, default=0.05, help="operating point saved with the model")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generate call (the demo's 32)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="tiny splits, seconds: the numbers mean nothing")
    parser.add_argument("--output", default=str(HERE / "results_auto_scale.md"), help="Markdown results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    demo = Path(args.demo)
    source = demo / "matryoshka_llava" / "0-m3_finetune" / "final"
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    job = MainJobConfig()
    if args.quick:
        job.train_scenes, job.vqa_test_scenes, args.selector_scenes, args.steps = 600, 20, 20, 20

    test_rows, selector_path = build_splits(work, args.selector_scenes, job)
    selector_rows = read_eval_rows(selector_path)
    output = work / "m3_auto"
    # what `comm-vlm train-scale-selector` runs, in-process so that the ablations reuse the selector split's labels
    t0 = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(source).eval()
    processor = AutoProcessor.from_pretrained(source)
    sel_eval = evaluate_matryoshka(model, processor, selector_rows, tasks=["vqa"], batch_size=args.batch_size)
    report = train_scale_selector(
        model, processor, selector_rows, task="vqa", width=args.width, margin=args.margin, steps=args.steps,
        learning_rate=args.learning_rate, batch_size=args.batch_size, split_name=str(selector_path),
        evaluation=sel_eval,
    )  # fmt: skip
    save_with_scale_selector(model, processor, output, report)
    train_seconds = time.perf_counter() - t0
    record = json.loads((output / "scale_selector_training.json").read_text())

    model = AutoModelForImageTextToText.from_pretrained(output).eval()
    processor = AutoProcessor.from_pretrained(output)
    scales = list(model.config.matryoshka_scales)
    m3 = evaluate_matryoshka(model, processor, test_rows, tasks=["vqa"], batch_size=args.batch_size)
    per_sample = {s: m3.per_scale[s].tasks["vqa"].per_sample for s in scales}
    predictions = {s: m3.per_scale[s].tasks["vqa"].predictions for s in scales}
    fixed = {float(s): m3.per_scale[s].tasks["vqa"].metrics["accuracy"] for s in scales}
    oracle = m3.oracle["vqa"]
    recorded = json.loads((demo / "matryoshka_llava" / "eval" / "matryoshka_results.json").read_text())
    demo_fixed = {
        int(s): recorded["per_scale"][s]["tasks"]["vqa"]["metrics"]["accuracy"] for s in recorded["per_scale"]
    }

    image, text, row_of_image = extract_selector_inputs(model, processor, test_rows, args.batch_size)
    assert row_of_image == list(range(len(test_rows)))
    with torch.no_grad():
        probabilities = torch.sigmoid(model.scale_selector(image, text).float())
    curve = auto_curve(probabilities, scales, per_sample, MARGINS)

    # end to end: generate(matryoshka_scale="auto") through the processor, at a few operating points
    e2e = []
    for margin in E2E_MARGINS:
        model.config.matryoshka_scale_selector["margin"] = margin
        t1 = time.perf_counter()
        result = evaluate(
            model, processor, test_rows, tasks=["vqa"], batch_size=args.batch_size,
            processor_kwargs={"matryoshka_scale": "auto"},
        )  # fmt: skip
        seconds = time.perf_counter() - t1
        vqa = result.tasks["vqa"]
        chosen = choose_scales(probabilities, scales, margin)
        same = sum(p == predictions[s][i] for i, (p, s) in enumerate(zip(vqa.predictions, chosen))) / len(chosen)
        scored, tokens = score_choices(chosen, per_sample)
        e2e.append(
            {"margin": margin, "accuracy": vqa.metrics["accuracy"], "scored": scored, "tokens": tokens,
             "same_answers": same, "seconds": seconds}
        )  # fmt: skip
    model.config.matryoshka_scale_selector["margin"] = args.margin
    t1 = time.perf_counter()
    evaluate(
        model, processor, test_rows, tasks=["vqa"], batch_size=args.batch_size,
        processor_kwargs={"matryoshka_scale": scales[1]},
    )  # fmt: skip
    fixed_seconds = time.perf_counter() - t1

    # ablations: the same fit with one summary zeroed (selector split features)
    sel_image, sel_text, sel_rows_of_image = extract_selector_inputs(model, processor, selector_rows, args.batch_size)
    ablations = {}
    labels_path = output / "scale_selector_training.json"
    sel_labels = torch.tensor([sel_eval.per_scale[s].tasks["vqa"].correct for s in scales], dtype=torch.float32).T
    sel_labels = sel_labels[sel_rows_of_image]
    validation = validation_study(sel_image, sel_text, sel_labels, scales, args.width)
    for name, keep_image, keep_text in (("text only", False, True), ("image only", True, False)):
        fitted, _ = fit_selector(
            sel_image * keep_image, sel_text * keep_text, sel_labels, scales, args.width, args.steps,
            args.learning_rate, seed=0,
        )  # fmt: skip
        with torch.no_grad():
            probs = torch.sigmoid(fitted(image * keep_image, text * keep_text))
        ablations[name] = auto_curve(probs, scales, per_sample, MARGINS)

    # the table
    oracle_tokens, oracle_accuracy = oracle.oracle_mean_tokens, oracle.oracle_accuracy
    at_oracle_tokens = auto_at_tokens(curve, oracle_tokens)
    fixed_at_oracle = fixed_at(oracle_tokens, fixed)
    del sel_eval
    lines = [
        '# Learned scale selection (`matryoshka_scale="auto"`) on the demo\'s M3',
        "",
        f"Produced by `benchmarks/bench_auto_scale.py` on {datetime.date.today()} ({cpu_name()}, "
        f"{os.cpu_count()} cores, torch threads: {torch.get_num_threads()}; "
        f"wall {time.perf_counter() - start:.0f} s). "
        f"Model: `{source}` (the demo's M3, not retrained). Test: the demo's held-out VQA split, "
        f"{len(test_rows)} questions; selector split: {len(selector_rows)} VQA questions on "
        f"{args.selector_scenes} fresh scenes (split `selector`, disjoint from train and test).",
        "",
        "Reproduce:",
        "",
        "```bash",
        "PYTHONPATH=src python benchmarks/bench_auto_scale.py --demo /tmp/demo_full --work-dir /tmp/auto_scale \\",
        "    --threads 1",
        "# the selector alone:",
        f"comm-vlm train-scale-selector --model {source} --data {selector_path} --task vqa \\",
        f"    --output-dir {output} --steps {args.steps} --learning-rate {args.learning_rate} --width {args.width} "
        f"--margin {args.margin}",
        "```",
        "",
        "## Fixed scales and oracle (test split)",
        "",
        "| setting | visual tokens / image | VQA acc (this run) | VQA acc (demo's record) |",
        "|---|---:|---:|---:|",
    ]
    for s in scales:
        lines.append(f"| fixed {s} | {s} | {100 * fixed[float(s)]:.1f} | {100 * demo_fixed[s]:.1f} |")
    lines.append(f"| oracle | {oracle_tokens:.2f} | {100 * oracle_accuracy:.1f} | - |")
    lines += [
        "",
        "## Auto: operating points (test split; answers scored from the per-scale runs)",
        "",
        "`fixed@tokens`: the fixed scales interpolated linearly in tokens at auto's mean tokens. `gap closed`: "
        "(auto - fixed@tokens) / (oracle - fixed@tokens), the oracle's accuracy taken as the ceiling.",
        "",
        "| margin | tokens / image | auto acc | fixed@tokens | gain | gap closed | share of scales "
        + " / ".join(str(s) for s in scales)
        + " |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for point in curve:
        if point["margin"] not in TABLE_MARGINS:
            continue
        base = fixed_at(point["tokens"], fixed)
        gap = (point["accuracy"] - base) / (oracle_accuracy - base) if oracle_accuracy > base else float("nan")
        share = " / ".join(f"{point['share'][s]:.2f}" for s in scales)
        lines.append(
            f"| {point['margin']:g} | {point['tokens']:.2f} | {100 * point['accuracy']:.1f} | {100 * base:.1f} "
            f"| {100 * (point['accuracy'] - base):+.1f} | {100 * gap:.0f}% | {share} |"
        )
    best = max(curve, key=lambda p: p["accuracy"] - fixed_at(p["tokens"], fixed))
    best_gain = best["accuracy"] - fixed_at(best["tokens"], fixed)
    gap_at_oracle = (at_oracle_tokens - fixed_at_oracle) / (oracle_accuracy - fixed_at_oracle)
    lines += [
        "",
        f"At the oracle's {oracle_tokens:.2f} tokens per image (auto interpolated between its operating points): "
        f"auto {100 * at_oracle_tokens:.1f}, fixed {100 * fixed_at_oracle:.1f}, oracle {100 * oracle_accuracy:.1f}: "
        f"gain {100 * (at_oracle_tokens - fixed_at_oracle):+.1f} points, gap closed {100 * gap_at_oracle:.0f}%. "
        f"Largest gain over the fixed curve: {100 * best_gain:+.1f} points at margin {best['margin']:g} "
        f"({best['tokens']:.2f} tokens, {100 * best['accuracy']:.1f}).",
        "",
        '## Auto end to end (`generate(matryoshka_scale="auto")` via the processor, test split)',
        "",
        "| margin | tokens / image | VQA acc (generated) | VQA acc (scored) | answers equal to the chosen "
        "fixed scale's | eval seconds |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for run in e2e:
        lines.append(
            f"| {run['margin']:g} | {run['tokens']:.2f} | {100 * run['accuracy']:.1f} | {100 * run['scored']:.1f} "
            f"| {100 * run['same_answers']:.1f}% | {run['seconds']:.1f} |"
        )
    lines += [
        "",
        f"For reference, a fixed-scale pass at {scales[1]} tokens over the same rows took {fixed_seconds:.1f} s (the "
        f"auto passes hold {min(r['tokens'] for r in e2e):.1f}-{max(r['tokens'] for r in e2e):.1f} tokens per image "
        "on average). An auto pass runs the vision tower once per batch: the "
        "selector reads the grids that the chosen scales are then pooled from (asserted in "
        "`tests/test_scale_selector.py`).",
        "",
        "## Ablations (same fit, one input zeroed; test split)",
        "",
        "| selector inputs | acc at the oracle's tokens | gap closed there | acc at margin 0 (tokens) |",
        "|---|---:|---:|---:|",
    ]
    for name, ablation in (("image + text", curve), *ablations.items()):
        acc = auto_at_tokens(ablation, oracle_tokens)
        gap = (acc - fixed_at_oracle) / (oracle_accuracy - fixed_at_oracle)
        top = ablation[0]
        lines.append(
            f"| {name} | {100 * acc:.1f} | {100 * gap:.0f}% | {100 * top['accuracy']:.1f} ({top['tokens']:.2f}) |"
        )
    lines += ["", "## Design choice (selector split only; the test split was not used)", "", *validation]
    balance = ", ".join(f"{s}: {record['label_balance'][str(s)]:.3f}" for s in scales)
    train_acc = ", ".join(f"{s}: {record['train_accuracy'][str(s)]:.3f}" for s in scales)
    lines += [
        "",
        "## Selector training (selector split)",
        "",
        f"{record['samples']} samples, {record['steps']} Adam steps (lr {record['learning_rate']:g}, batch 256, "
        f"seed {record['seed']}), width {record['width']}; fraction correct per scale {{{balance}}}; selector "
        f"train accuracy per scale {{{train_acc}}}; final BCE {record['train_loss']:.3f}; the whole command "
        f"(evaluating {len(scales)} scales, features, fit, save) took {train_seconds:.0f} s. Record: "
        f"`{labels_path}`.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    Path(args.output).write_text(table)
    series = {"vqa": fixed}
    curves = {
        "vqa": {
            "auto (selector)": [(p["tokens"], p["accuracy"]) for p in curve],
            "auto, text only": [(p["tokens"], p["accuracy"]) for p in ablations["text only"]],
        }
    }
    plot = Path(args.output).with_suffix(".png")
    plot_metric_vs_tokens(
        series, plot, {"vqa": (oracle_tokens, oracle_accuracy)}, TASK_SPECS,
        title="M3 demo, held-out VQA", curves=curves,
    )  # fmt: skip
    (work / "bench_auto_scale.json").write_text(
        json.dumps(
            {"fixed": fixed, "oracle": [oracle_tokens, oracle_accuracy], "e2e": e2e,
             "curve": [{k: v for k, v in p.items() if k != "chosen"} for p in curve]},
            indent=1, default=str,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
