"""Can the adaptive combiner (Piergiovanni and Angelova 2023) learn REC, and what does it need? A learning curve.

The combiner's fused tokens have no grid: they are indexed by its text latents and get the image through two attention
pools (eq. 2, then eq. 3's cross-attention). Latent attention is blind to the order of the visual tokens, so a box can
only come from whatever position the encoder left in its features, unless position codes are added to the visual
tokens before resampling (`combiner_image_positions`, as DETR and Perceiver do). This script trains the main job's
combiner (same sizes, data, encoder warm-up and recipe, 16 latents) for 1200 one-word-answer steps, then 2400 steps on
the stage-2 mixture with the REC weight, with and without the position codes. By default it uses the settings
`research/results/combiner_rec.md` was recorded with (`RECORDED`): the Vicuna system prompt in the chat template, the
combiner on CLIP's penultimate layer (the LLaVA layout) with 16 latents, and 600 encoder warm-up steps.
Every `--eval-every` stage-2 steps it scores REC (acc@0.5 and mean IoU) on the held-out split; at the end REC, POPE
and VQA per question type.

Writes `<name>.md` and `<name>.png` (REC acc@0.5 vs stage-2 steps; `--name`, default `combiner_rec`) to
`--output-dir` (default `research/results`; with `--quick`, `outputs/quick`). `--settings current` trains with the
demo's settings instead (`MainJobConfig()`: no system prompt, the 1200-step encoder warm-up) and the recorded combiner
(16 latents, LLaVA layout, REC-weighted stage 2) for `--stage2-steps` steps; `--settings main-job` trains the demo's
own combiner (COMM's branch) with the REC-weighted stage 2.

    PYTHONPATH=src python research/combiner_rec.py            # about 17 minutes on 2 cores
    PYTHONPATH=src python research/combiner_rec.py --quick    # smoke run, seconds
    # the paper's spatial resampling against latents, the demo's settings (about 18 minutes on 2 cores):
    PYTHONPATH=src python research/combiner_rec.py --settings current --stage2-steps 1200 --eval-every 300 \
        --seed 1 --variants "spatial resampling" "image position codes (the default)" --name combiner_rec_spatial
    # the demo's combiner (COMM's branch) with and without resampling the image, on the encoders that
    # `comm-vlm demo --seed 0` saved (about 20 minutes on 2 cores):
    PYTHONPATH=src python research/combiner_rec.py --settings main-job --stage2-steps 900 --eval-every 150 \
        --encoders outputs/demo/encoders --variants "image position codes (the default)" \
        "no resampling (every visual token)" --name combiner_resampling_rec
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback  # noqa: E402

from comm_vlm.chat_templates import VICUNA_SYSTEM_PROMPT  # noqa: E402
from comm_vlm.demo.main_job import (  # noqa: E402
    MainJobConfig,
    build_family_model,
    encoder_state_dicts,
    family_recipe,
    prepare_training_data,
    pretrain_encoders,
)
from comm_vlm.evaluation.runners import evaluate  # noqa: E402
from comm_vlm.training.recipes import run_recipe  # noqa: E402


# The settings `combiner_rec.md` was recorded with: the combiner on CLIP's penultimate layer (the LLaVA layout; the
# demo's combiner reads COMM's branch) with 16 latents, 1200+2400 steps with the stage-2 mixture's REC weight, and
# LLaVA-1.5's (Vicuna's) system prompt in the template (and VQA on the 100 held-out scenes, which `main` sets: the
# quick run keeps its own few).
RECORDED = {
    "system_prompt": VICUNA_SYSTEM_PROMPT,
    "family_stage_steps": {"adaptive_combiner": (1200, 2400)},
    "family_plans": {
        "adaptive_combiner": {
            "layout": "llava",
            "overrides": {"combiner_num_latents": 16, "combiner_iterations": 2, "combiner_gate_init": 1.0},
            "mixture_weights": {},
        }
    },
}


VARIANTS: dict[str, dict] = {
    "image position codes (the default)": {},
    "no image position codes (eq. 2's input)": {"combiner_image_positions": False},
    # The paper's alternative to latents: the 8x8 patch grid average-pooled to 4x4 tokens (position codes added first).
    "spatial resampling": {"combiner_resampling": "spatial"},
    # Beyond the paper: no resampling of the image, so eq. 3's cross-attention reads all 64 visual tokens.
    "no resampling (every visual token)": {"combiner_resampling": "none"},
}


class RecCurve(TrainerCallback):
    """Scores REC on `rows` every `every` optimizer steps of the stage it is given to; keeps `(step, acc, iou)`."""

    def __init__(self, processor, rows: list[dict], every: int, batch_size: int):
        self.processor, self.rows, self.every, self.batch_size = processor, rows, every, batch_size
        self.points: list[tuple[int, float, float]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:
            return
        model.eval()
        with torch.no_grad():
            result = evaluate(model, self.processor, self.rows, batch_size=self.batch_size)
        model.train()
        metrics = result.to_dict(with_predictions=False)["tasks"]["rec"]["metrics"]
        self.points.append((state.global_step, metrics["accuracy"], metrics["mean_iou"]))


def run_variant(name: str, config: MainJobConfig, data_paths, encoders, test, every: int, work_dir: Path) -> dict:
    """Builds the combiner with the variant's fields, trains both stages of `config`, returns its curve and scores."""
    init_dir = work_dir / "init"
    _, processor = build_family_model("adaptive_combiner", config, init_dir, encoders=encoders, **VARIANTS[name])
    stage_1, stage_2 = family_recipe("adaptive_combiner", config, init_dir, data_paths)["stages"]
    stage_1_dir = run_recipe({"model": {"pretrained": str(init_dir)}, "stages": [stage_1]}, work_dir / "stage1")
    rec_rows = [row for row in test if row["task"] == "rec"]
    curve = RecCurve(processor, rec_rows, every, config.eval_batch_size)
    recipe = {"model": {"pretrained": str(stage_1_dir[-1].output_dir)}, "stages": [stage_2]}
    final_dir = run_recipe(recipe, work_dir / "stage2", callbacks=[curve])[-1].output_dir
    model = AutoModelForImageTextToText.from_pretrained(final_dir).eval()
    tasks = evaluate(model, AutoProcessor.from_pretrained(final_dir), test, batch_size=config.eval_batch_size)
    tasks = tasks.to_dict(with_predictions=False)["tasks"]
    return {
        "curve": curve.points,
        "rec": tasks["rec"]["metrics"]["accuracy"],
        "mean_iou": tasks["rec"]["metrics"]["mean_iou"],
        "chance": tasks["rec"]["baseline"]["accuracy"],
        "pope": tasks["pope"]["metrics"]["accuracy"],
        **tasks["vqa"]["metrics"]["per_question_type"],
        "steps": (stage_1["args"]["max_steps"], stage_2["args"]["max_steps"]),
    }


def write_report(results: dict, output_dir: Path, stem: str = "combiner_rec") -> str:
    first = next(iter(results.values()))
    steps = "+".join(str(s) for s in first["steps"])
    lines = [
        f"| variant ({steps} steps) | REC acc@0.5 | REC mean IoU | POPE | colour | shape | count |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results.items():
        cells = [f"{100 * row['rec']:.1f}", f"{row['mean_iou']:.3f}"]
        cells += [f"{100 * row[c]:.1f}" for c in ("pope", "colour", "shape", "count")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "REC acc@0.5 (mean IoU) during stage 2:", "", "| stage-2 step | " + " | ".join(results) + " |"]
    lines.append("|---:|" + "---:|" * len(results))
    for k, (step, *_) in enumerate(first["curve"]):
        cells = [f"{100 * row['curve'][k][1]:.1f} ({row['curve'][k][2]:.3f})" for row in results.values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nChance (the REC baseline): {100 * first['chance']:.1f}; the bar (3x chance): {300 * first['chance']:.1f}."
    )
    table = "\n".join(lines)
    (output_dir / f"{stem}.md").write_text(table + "\n")
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, row in results.items():
        axis.plot([p[0] for p in row["curve"]], [100 * p[1] for p in row["curve"]], marker="o", label=name)
    axis.axhline(100 * first["chance"], color="grey", linestyle=":", label="chance")
    axis.axhline(300 * first["chance"], color="black", linestyle="--", label="3x chance (the bar)")
    axis.set_xlabel(f"stage-2 step (after {first['steps'][0]} stage-1 steps)")
    axis.set_ylabel("REC acc@0.5 (%)")
    axis.set_title("Adaptive combiner (16 fused tokens): REC on the held-out scenes")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output_dir / f"{stem}.png", dpi=120)
    plt.close(figure)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", help="default: research/results (with --quick: outputs/quick)")
    parser.add_argument("--eval-every", type=int, default=400, help="stage-2 steps between REC scores")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a few steps (a smoke run)")
    parser.add_argument(
        "--settings",
        choices=("recorded", "current", "main-job"),
        default="recorded",
        help="recorded: the settings of combiner_rec.md (system prompt, 600 warm-up steps); current: the demo's "
        "MainJobConfig() with the recorded combiner (LLaVA layout); main-job: the demo's MainJobConfig() and combiner "
        "(COMM's branch)",
    )
    parser.add_argument(
        "--encoders", help="a main job's saved `encoders` directory (same seed) to use instead of a new warm-up"
    )
    parser.add_argument("--stage2-steps", type=int, default=2400, help="REC-weighted stage-2 steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="combiner_rec", help="stem of the .md and .png written")
    options = parser.parse_args()
    steps = {"adaptive_combiner": (RECORDED["family_stage_steps"]["adaptive_combiner"][0], options.stage2_steps)}
    every = 2 if options.quick else options.eval_every
    if options.quick:
        config = replace(MainJobConfig.quick(), **{**RECORDED, "family_stage_steps": {}})
    elif options.settings == "current":
        config = replace(MainJobConfig(), family_stage_steps=steps, family_plans=RECORDED["family_plans"])
    elif options.settings == "main-job":
        job = MainJobConfig()
        steps = {"adaptive_combiner": (job.family_stage_steps["adaptive_combiner"][0], options.stage2_steps)}
        config = replace(job, family_stage_steps=steps, family_plans={"adaptive_combiner": {"mixture_weights": {}}})
    else:
        config = replace(
            MainJobConfig(warmup_steps=600, vqa_test_scenes=100), **{**RECORDED, "family_stage_steps": steps}
        )
    config.seed = options.seed
    output_dir = Path(options.output_dir or ("outputs/quick" if options.quick else "research/results"))
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        splits, data_paths = prepare_training_data(config, work)
        if options.encoders:
            encoders = encoder_state_dicts(AutoModelForImageTextToText.from_pretrained(options.encoders))
        else:
            encoders, _ = pretrain_encoders(config, work / "encoders")
        test = splits["test"].filter(lambda row: row["task"] in ("rec", "pope", "vqa"))
        results = {}
        for k, name in enumerate(options.variants):
            results[name] = run_variant(name, config, data_paths, encoders, test, every, work / f"variant{k}")
            print(name, {key: value for key, value in results[name].items() if key != "curve"}, flush=True)
    print(write_report(results, output_dir, options.name))


if __name__ == "__main__":
    main()
