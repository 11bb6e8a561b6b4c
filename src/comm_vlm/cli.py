"""`comm-vlm` command line.

    comm-vlm demo [--output-dir DIR] [--quick | --long] [--families NAME ...]
    comm-vlm layer-study [--output-dir DIR] [--quick] [--variants NAME ...] [--encoder-layers L] [--stage-steps N N]
    comm-vlm plumbing [--output-dir DIR] [--layout comm|llava]
    comm-vlm train --recipe NAME_OR_YAML [--output-dir DIR] [key=value ...]
    comm-vlm convert --from {llava-hf,llava-original} SRC DST [--to comm|matryoshka_llava] [--vision-tower P]
    comm-vlm push SRC REPO_ID [--card CARD.json] [--recipe NAME] [--max-shard-size 5GB] [--local-dir DIR]

`demo` is the main job (`comm_vlm.demo.main_job`): tiny COMM, Matryoshka-LLaVA and adaptive-combiner models trained through
both stages on synthetic scenes, evaluated on the papers' metrics against chance/majority baselines, saved, reloaded
and served; `--quick` is the CI-sized run, `--long` the run where the combiner also trains on REC (about 6 minutes
more, 8-11 on slower CPUs), `--families` a subset (in order; M3 needs COMM before it). `layer-study` is COMM's layer
study (`comm_vlm.demo.layer_study`): one frozen tiny CLIP read at each single layer or merged over all layers (MFM), each
variant trained with the main job's COMM recipe and scored on REC and POPE (table, JSON and plot). `plumbing` builds a
tiny random COMM and its processor, saves them with `save_pretrained` (safetensors), reloads with the Auto classes,
checks the reload is exact, and answers a chat prompt about a generated image through `pipeline("image-text-to-text")`
(random weights: the answer is noise).

`train` runs a YAML recipe's stages in order on TRL's SFTTrainer (see `comm_vlm.training.recipes`); `key=value`
overrides apply to every stage's SFTConfig (e.g. `max_steps=3 resume=true`). Under `accelerate launch` it runs on
every process (DDP, FSDP, DeepSpeed: `comm_vlm/accelerate_configs/`).

`convert` turns a LLaVA-1.5 checkpoint (llava-hf or LLaVA / M3 training-code layout) into a `comm` or
`matryoshka_llava` one with processor, remote code and model card (`comm_vlm.convert`). `push` uploads a saved
checkpoint with remote code and a rendered model card in one commit, or writes that repo to `--local-dir` only
(`comm_vlm.hub`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def _demo_image(size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A synthetic scene: a red box on a blue background (so no image is downloaded)."""
    image = Image.new("RGB", size, (30, 60, 200))
    ImageDraw.Draw(image).rectangle([12, 10, 52, 50], fill=(220, 30, 30))
    return image


def run_demo(output_dir: str | Path, layout: str = "comm", seed: int = 0) -> dict:
    """Runs the demo and returns what it measured (also printed by the CLI)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    from .models.image_utils import format_box, normalize_box, parse_boxes
    from .testing import build_tiny_checkpoint

    output_dir = Path(output_dir)
    model, _ = build_tiny_checkpoint(output_dir, layout=layout, seed=seed)
    reloaded = AutoModelForImageTextToText.from_pretrained(output_dir).eval()
    processor = AutoProcessor.from_pretrained(output_dir)

    image = _demo_image()
    box_text = format_box(normalize_box((12, 10, 52, 50), image.size))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": f"What is the object at {box_text}?"},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        max_diff = (model(**inputs).logits - reloaded(**inputs).logits).abs().max().item()

    pipe = pipeline("image-text-to-text", model=reloaded, processor=processor)
    answer = pipe(text=messages, max_new_tokens=12, generate_kwargs={"do_sample": False})[0]["generated_text"][-1]
    config = reloaded.config
    return {
        "output_dir": str(output_dir),
        "files": sorted(p.name for p in output_dir.iterdir()),
        "encoders": [
            f"{getattr(config, f'{p}_config').model_type}: layers {config.branch(p)['layers']}, "
            f"{config.branch(p)['merge']} -> {config.branch(p)['aligner']}"
            for p in config.encoder_prefixes
        ],
        "parameters": sum(p.numel() for p in reloaded.parameters()),
        "visual_tokens_per_image": config.image_seq_length,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "reload_max_abs_logit_diff": max_diff,
        "prompt_box": box_text,
        "boxes_in_answer": parse_boxes(answer["content"]).boxes,
        "answer": answer["content"],
    }


def build_parser() -> argparse.ArgumentParser:
    """The `comm-vlm` argument parser (every subcommand)."""
    parser = argparse.ArgumentParser(prog="comm-vlm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job: train, evaluate, save and serve tiny models of each family")
    demo.add_argument("--output-dir", default="outputs/demo")
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI-sized run (seconds; numbers are not meaningful)")
    size.add_argument(
        "--long",
        action="store_true",
        help="the combiner also trains on REC: 32 latents, 2400 REC-weighted stage-2 steps (~6-11 minutes more)",
    )
    demo.add_argument(
        "--families", nargs="+", help="families to train, in order (default: comm matryoshka_llava adaptive_combiner)"
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the synthetic splits, the encoder warm-up, every init and training run (default 0, recorded)",
    )
    study = sub.add_parser("layer-study", help="COMM's layer study: single CLIP layers vs multi-level merging")
    study.add_argument("--output-dir", default="outputs/layer_study")
    study.add_argument("--quick", action="store_true", help="CI-sized run with 2 variants (numbers not meaningful)")
    study.add_argument("--variants", nargs="+", help="e.g. single@1 single@4 lln_layerscale (default: all)")
    study.add_argument("--encoder-layers", type=int, help="depth of the tiny CLIP (default: the main job's)")
    study.add_argument(
        "--stage-steps",
        type=int,
        nargs=2,
        metavar=("STAGE1", "STAGE2"),
        help="steps per stage (default: the main job's COMM steps)",
    )
    plumbing = sub.add_parser("plumbing", help="build, save, reload and serve a random tiny COMM offline")
    plumbing.add_argument("--output-dir", default="outputs/plumbing")
    plumbing.add_argument("--layout", choices=["comm", "llava"], default="comm")
    plumbing.add_argument("--seed", type=int, default=0)
    train = sub.add_parser("train", help="run a training recipe (YAML) on TRL's SFTTrainer")
    train.add_argument("--recipe", required=True, help="shipped recipe name (e.g. tiny_comm, comm) or YAML path")
    train.add_argument("--output-dir", default="outputs/train")
    train.add_argument("overrides", nargs="*", help="SFTConfig overrides for every stage, as key=value")
    _add_hub_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if args.command == "train":
        return _train(args)
    if args.command in ("convert", "push"):
        try:
            return _convert(args) if args.command == "convert" else _push(args)
        except ValueError as err:
            sys.stderr.write(f"comm-vlm {args.command}: {err}\n")
            return 2
    if args.command == "demo":
        return _main_job(args)
    if args.command == "layer-study":
        return _layer_study(args)
    np.random.seed(args.seed)
    result = run_demo(args.output_dir, layout=args.layout, seed=args.seed)
    width = max(len(k) for k in result)
    for key, value in result.items():
        sys.stdout.write(f"{key:<{width}}  {value}\n")
    if result["reload_max_abs_logit_diff"] != 0.0:
        sys.stderr.write("reload changed the logits\n")
        return 1
    return 0


def _main_job(args: argparse.Namespace) -> int:
    from .demo.main_job import MainJobConfig, run_main_job

    config = MainJobConfig.for_run(args.quick, args.long, args.families, args.seed)
    try:
        config.validate()
    except ValueError as err:
        sys.stderr.write(f"comm-vlm demo: {err}\n")
        return 2
    sys.stdout.write(
        "Offline main job. No pretrained encoders can be downloaded here, so one tiny CLIP and one tiny DINOv2 are\n"
        "first warmed up on the synthetic training scenes (per-patch colour/shape/category labels and boxes), then\n"
        "shared by every model and frozen as in the papers' recipes.\n"
    )
    results = run_main_job(args.output_dir, config)
    sys.stdout.write(
        f"encoder warm-up, category accuracy on object patches: {results['encoder_warmup']}, "
        f"{results['encoder_warmup_seconds']} s\n"
    )
    for family, result in results["models"].items():
        served = result["served"]
        sys.stdout.write(
            f"{family}: stages {[(s['stage'], round(s['train_loss'], 3)) for s in result['stages']]}, "
            f"{result['seconds']} s\n"
            f"  served ({'image' if served['image_first'] else 'question'} first) {served['question']!r} -> "
            f"{served['answer']!r} (true box {served['true_box']})\n"
        )
        if result.get("plot"):
            sys.stdout.write(f"  accuracy vs visual tokens: {result['plot']}\n")
    sys.stdout.write(f"\n{results['table']}\n\nwall time {results['seconds']} s; results in {args.output_dir}\n")
    return 0


def layer_study_config(args: argparse.Namespace):
    """The `LayerStudyConfig` of parsed `layer-study` arguments (`ValueError` for non-positive `--stage-steps`)."""
    from .demo.layer_study import LayerStudyConfig

    variants = tuple(args.variants) if args.variants else None
    config = LayerStudyConfig.quick(variants) if args.quick else LayerStudyConfig(variants=variants)
    config.encoder_layers = args.encoder_layers
    if args.stage_steps:
        if min(args.stage_steps) < 1:
            raise ValueError(f"--stage-steps must be positive, got {args.stage_steps}")
        # The study trains COMM's recipe, whose per-family steps take precedence over `stage_steps`.
        config.job.stage_steps = tuple(args.stage_steps)
        config.job.family_stage_steps = {**config.job.family_stage_steps, "comm": tuple(args.stage_steps)}
    return config


def _layer_study(args: argparse.Namespace) -> int:
    from .demo.layer_study import VariantError, run_layer_study

    try:
        config = layer_study_config(args)
    except ValueError as err:
        sys.stderr.write(f"comm-vlm layer-study: {err}\n")
        return 2
    try:
        results = run_layer_study(args.output_dir, config)
    except VariantError as err:
        sys.stderr.write(f"comm-vlm layer-study: {err}\n")
        return 2
    sys.stdout.write(f"\n{results['table']}\n\nwall time {results['seconds']} s; plot {results['plot']}\n")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .training import load_recipe, parse_overrides, run_recipe

    recipe = load_recipe(args.recipe, parse_overrides(args.overrides))
    results = run_recipe(recipe, args.output_dir)
    for result in results:
        losses = [round(h["loss"], 4) for h in result.log_history if "loss" in h]
        sys.stdout.write(
            f"{result.stage}: final model {result.output_dir}; train loss {result.train_loss:.4f} "
            f"(logged {losses}); {result.skip_report}\n"
        )
    return 0


def _add_hub_commands(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser("convert", help="convert a LLaVA-1.5 checkpoint to comm / matryoshka_llava")
    convert.add_argument("--from", dest="source_layout", required=True, choices=["llava-hf", "llava-original"])
    convert.add_argument("source", help="source checkpoint directory (safetensors)")
    convert.add_argument("output", help="output directory (must not exist or be empty, unless --overwrite)")
    convert.add_argument("--to", dest="target", choices=["comm", "matryoshka_llava"], default="comm")
    convert.add_argument("--vision-tower", help="llava-original: CLIP directory or Hub id (default: mm_vision_tower)")
    convert.add_argument("--matryoshka-scales", help="matryoshka_llava: trained scales, e.g. 1,9,36,144,576")
    convert.add_argument("--base-model", help="Hub id of the source, recorded in the model card")
    convert.add_argument("--max-shard-size", default="5GB")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    push = sub.add_parser("push", help="push a checkpoint with remote code and a model card to the Hub")
    push.add_argument("source", help="checkpoint directory saved by this package")
    push.add_argument("repo_id", help="Hub repo, e.g. me/comm-7b (also used in the card with --local-dir)")
    push.add_argument("--card", help="JSON file with model-card fields (see comm_vlm.hub.ModelCardInfo)")
    push.add_argument("--recipe", help="training recipe (name or YAML) to describe in the card")
    push.add_argument("--max-shard-size", default="5GB")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", help="branch to commit to")
    push.add_argument("--create-pr", action="store_true")
    push.add_argument("--commit-message")
    push.add_argument("--local-dir", help="write the repo's files here instead of uploading (no network)")


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    scales = [int(s) for s in args.matryoshka_scales.split(",")] if args.matryoshka_scales else None
    files = convert_checkpoint(
        args.source,
        args.output,
        args.source_layout,
        args.target,
        vision_tower=args.vision_tower,
        matryoshka_scales=scales,
        base_model=args.base_model,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
    )
    sys.stdout.write(f"wrote {args.output}: {', '.join(files)}\n")
    return 0


def _push(args: argparse.Namespace) -> int:
    import json

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .hub import ModelCardInfo, push_to_hub, save_for_hub, training_from_recipe

    card = ModelCardInfo.from_dict(json.loads(Path(args.card).read_text())) if args.card else ModelCardInfo()
    card.repo_id = card.repo_id or args.repo_id
    if args.recipe:
        from .training import load_recipe

        recipe = load_recipe(args.recipe)
        card.training = training_from_recipe(recipe)
        source = recipe.get("model", {})
        parts = [*(source.get("assemble") or {}).values(), source.get("pretrained")]
        card.base_model = card.base_model or [p for p in parts if isinstance(p, str) and not Path(p).exists()]
    model = AutoModelForImageTextToText.from_pretrained(args.source)
    has_processor = any((Path(args.source) / f).is_file() for f in ("processor_config.json", "tokenizer_config.json"))
    processor = AutoProcessor.from_pretrained(args.source) if has_processor else None
    if args.local_dir:
        files = save_for_hub(model, args.local_dir, processor, card, max_shard_size=args.max_shard_size)
        sys.stdout.write(f"wrote {args.local_dir}: {', '.join(files)}\n")
        return 0
    commit = push_to_hub(
        model,
        args.repo_id,
        processor,
        card,
        max_shard_size=args.max_shard_size,
        private=args.private or None,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
    )
    sys.stdout.write(f"pushed to {args.repo_id}: {getattr(commit, 'commit_url', commit)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
