"""Why the main job's adaptive combiner (Piergiovanni and Angelova 2023) reads the image: an ablation on its setup.

The combiner's N fused tokens are indexed by its text latents and get the image only through attention pools (eq. 2,
then eq. 3's cross-attention). With eq. 2 as printed, `f_N = W2 Attn(X_N, P(X_im))`, the tiny model's attention
starts near-uniform, so each latent is a near-copy of one mean token; the text latents are worse off, because the
LLM's text embeddings are small (std = the LLM's init) and give flat attention logits. The model must then learn to
tell objects apart through two flat attention pools, and in the main job's budget it learns yes/no questions at best,
not attributes (with 250+200 steps it stays at the text-only priors). This script trains the main job's combiner
(same sizes, data, encoder warm-up and stage-1 recipe: one-word-answer rows, batch 16, LLM lr 1e-3) once per variant:

- `combiner_latent_residual`: `X_N + W2 Attn(X_N, X)` (DETR's and Perceiver's latents) instead of eq. 2;
- `combiner_input_norm`: a LayerNorm on each modality's tokens before resampling (Perceiver's pre-norm);
- the combiner's own learning rate as a fraction of the LLM's (the stage's `learning_rates`).

For each it reports POPE accuracy, VQA accuracy per question type on the held-out split, and `fused cos`: the mean
cosine similarity between the fused tokens of 32 test images asked the same question (1.0 = the image makes no
difference).
It keeps the settings `research/results/combiner_study.md` was recorded with: LLaVA-1.5's system prompt, the 600-step
encoder warm-up and the combiner on CLIP's penultimate layer (the LLaVA layout).
Writes `combiner_study.md` and `combiner_study.png` to `--output-dir` (default `research/results`; with `--quick`,
`outputs/quick`).

    PYTHONPATH=src python research/combiner_study.py            # about 13 minutes on 2 cores
    PYTHONPATH=src python research/combiner_study.py --quick    # smoke run, seconds
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
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from comm_vlm.chat_templates import VICUNA_SYSTEM_PROMPT  # noqa: E402
from comm_vlm.demo.main_job import (  # noqa: E402
    MainJobConfig,
    build_family_model,
    family_recipe,
    prepare_training_data,
    pretrain_encoders,
)
from comm_vlm.evaluation.runners import evaluate  # noqa: E402
from comm_vlm.evaluation.tasks import baseline_vqa, pope_object_prior  # noqa: E402
from comm_vlm.training.recipes import run_recipe  # noqa: E402


# name -> (combiner config fields, combiner learning rate as a fraction of the LLM's)
# Every variant leaves out the image position codes (`combiner_image_positions`), as recorded: what they change is
# REC (`research/combiner_rec.py`), which this stage-1 study does not train.
EQ2 = {"combiner_input_norm": False, "combiner_latent_residual": False, "combiner_image_positions": False}
VARIANTS: dict[str, tuple[dict, float]] = {
    "eq. 2 as printed": (EQ2, 1.0),
    "eq. 2 as printed, combiner lr 0.2x": (EQ2, 0.2),
    "residual latents": ({**EQ2, "combiner_latent_residual": True}, 1.0),
    "residual latents, combiner lr 0.2x": ({**EQ2, "combiner_latent_residual": True}, 0.2),
    "input norm + residual latents": ({"combiner_image_positions": False}, 1.0),
    "input norm + residual latents, combiner lr 0.2x": ({"combiner_image_positions": False}, 0.2),
}


def fused_similarity(model, processor, rows) -> float:
    """Mean cosine similarity between the fused tokens (flattened, `N * D`) of different images."""
    captured = []
    hook = model.model.combiner.register_forward_hook(lambda module, args, out: captured.append(out))
    texts = [processor.apply_chat_template(row["messages"][:1], add_generation_prompt=True) for row in rows]
    batch = processor(text=texts, images=[[row["images"][0]] for row in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        model(**batch)
    hook.remove()
    fused = F.normalize(captured[0].flatten(1), dim=-1)  # (num_images, N * D)
    similarity = fused @ fused.T
    off_diagonal = ~torch.eye(len(rows), dtype=torch.bool)
    return similarity[off_diagonal].mean().item()


def one_prompt_per_image(test, limit: int = 32) -> list[dict]:
    """One POPE row per test scene (up to `limit`), all given the first row's question: only the image differs."""
    rows: dict[str, dict] = {}
    for row in test:
        if row["task"] == "pope" and len(rows) < limit:
            rows.setdefault(row["scene_id"], dict(row))
    rows = list(rows.values())
    for row in rows:
        row["messages"] = rows[0]["messages"]
    return rows


def run_variant(name: str, config: MainJobConfig, steps: int, data_paths, encoders, test, work_dir: Path) -> dict:
    """Builds the main job's combiner with the variant's fields, trains stage 1 for `steps` steps, evaluates."""
    fields, lr_scale = VARIANTS[name]
    init_dir = work_dir / "init"
    build_family_model("adaptive_combiner", config, init_dir, encoders=encoders, **fields)
    stage = family_recipe("adaptive_combiner", config, init_dir, data_paths)["stages"][0]  # the one-word-answer rows
    stage["args"]["max_steps"] = steps
    stage["learning_rates"] = {"combiner": lr_scale * config.learning_rate}
    final_dir = run_recipe({"model": {"pretrained": str(init_dir)}, "stages": [stage]}, work_dir)[-1].output_dir
    model = AutoModelForImageTextToText.from_pretrained(final_dir).eval()
    processor = AutoProcessor.from_pretrained(final_dir)
    tasks = evaluate(model, processor, test, batch_size=config.eval_batch_size).to_dict(with_predictions=False)
    return {
        "pope": tasks["tasks"]["pope"]["metrics"]["accuracy"],
        **tasks["tasks"]["vqa"]["metrics"]["per_question_type"],
        "fused_cos": fused_similarity(model, processor, one_prompt_per_image(test)),
    }


def write_report(results: dict, baselines: dict, steps: int, output_dir: Path) -> str:
    columns = ("pope", "colour", "shape", "count", "fused_cos")
    lines = [
        f"| variant ({steps} stage-1 steps) | POPE | colour | shape | count | fused cos |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in results.items():
        cells = [f"{100 * row[c]:.1f}" if c != "fused_cos" else f"{row[c]:.3f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        "| baseline (POPE: text-only prior; VQA: majority answer) | "
        + " | ".join(f"{100 * baselines[c]:.1f}" for c in columns[:-1])
        + " | |"
    )
    table = "\n".join(lines)
    (output_dir / "combiner_study.md").write_text(table + "\n")
    figure, axis = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(results)
    for k, (name, row) in enumerate(results.items()):
        axis.bar([i + k * width for i in range(4)], [100 * row[c] for c in columns[:4]], width, label=name)
    for i, column in enumerate(columns[:4]):
        axis.hlines(100 * baselines[column], i - width / 2, i + 0.8 - width / 2, colors="black", linestyles="--")
    axis.set_xticks([i + 0.4 - width / 2 for i in range(4)], ["POPE", "colour", "shape", "count"])
    axis.set_ylabel("accuracy (%); dashed: baseline")
    axis.set_title(f"Adaptive combiner after {steps} stage-1 steps")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(output_dir / "combiner_study.png", dpi=120)
    plt.close(figure)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", help="default: research/results (with --quick: outputs/quick)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 3 steps (a smoke run)")
    options = parser.parse_args()
    # As recorded: LLaVA-1.5's template, the 600-step encoder warm-up, VQA on the 100 held-out scenes and the combiner
    # on CLIP's penultimate layer (the LLaVA layout; the demo's combiner reads COMM's branch).
    config = MainJobConfig.quick() if options.quick else MainJobConfig(warmup_steps=600, vqa_test_scenes=100)
    config = replace(
        config, system_prompt=VICUNA_SYSTEM_PROMPT, family_plans={"adaptive_combiner": {"layout": "llava"}}
    )
    steps = 3 if options.quick else options.steps
    output_dir = Path(options.output_dir or ("outputs/quick" if options.quick else "research/results"))
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        splits, data_paths = prepare_training_data(config, work)
        encoders, _ = pretrain_encoders(config, work / "encoders")
        test = splits["test"].filter(lambda row: row["task"] in ("pope", "vqa"))
        results = {}
        for k, name in enumerate(options.variants):
            results[name] = run_variant(name, config, steps, data_paths, encoders, test, work / f"variant{k}")
            print(name, results[name], flush=True)
        pope = {split: [row for row in splits[split] if row["task"] == "pope"] for split in ("train", "test")}
        baselines = {"pope": pope_object_prior(pope["train"], pope["test"])["accuracy"]}
        baselines.update(baseline_vqa([row for row in test if row["task"] == "vqa"])["per_question_type_prior"])
    print(write_report(results, baselines, steps, output_dir))


if __name__ == "__main__":
    main()
