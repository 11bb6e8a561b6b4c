"""The `comm-vlm` command line.

    comm-vlm demo [--output-dir DIR] [--quick | --long] [--families NAME ...] [--seed N]
    comm-vlm layer-study [--output-dir DIR] [--quick] [--variants NAME ...] [--encoder-layers L] [--stage-steps N N]
    comm-vlm plumbing [--output-dir DIR] [--layout comm|llava] [--seed N]
    comm-vlm train --recipe NAME_OR_YAML [--output-dir DIR] [key=value ...]
    comm-vlm assemble OUT --vision ID --text ID [--secondary-vision ID] [--family F] [--set KEY=VALUE ...] ...
    comm-vlm convert --from {llava-hf,llava-original,comm-vlm} SRC DST [--to FAMILY] [--vision-tower P] ...
    comm-vlm push SRC REPO_ID [--card CARD.json] [--recipe NAME] [--max-shard-size 5GB] [--local-dir DIR] ...
    comm-vlm evaluate --model DIR --task NAME --data FILE [FILE ...] [--images DIR] [--split S] [--limit N] ...
    comm-vlm train-scale-selector --model DIR --data EVAL_JSONL_OR_DIR --task vqa [--limit N] --output-dir OUT ...

`demo` runs the main job (`comm_vlm.demo.main_job`): tiny COMM, Matryoshka-LLaVA and adaptive-combiner models trained
through both stages on synthetic scenes, evaluated against chance/majority baselines, saved, reloaded and served.
`layer-study` is COMM's layer study (`comm_vlm.demo.layer_study`): single CLIP layers vs multi-level merging, scored on
REC and POPE. `plumbing` saves, reloads and serves a random tiny COMM in seconds (`comm_vlm.demo.plumbing`).

`train` runs a YAML recipe's stages on TRL's SFTTrainer (`comm_vlm.training.recipes`); `key=value` overrides apply to
every stage's SFTConfig (e.g. `max_steps=3 resume=true`). Under `accelerate launch -m comm_vlm.cli train ...` it runs
on every process (configs in `comm_vlm/accelerate_configs/`). `assemble` builds any family from published encoders and
an LLM (`comm_vlm.assemble`); `convert` turns a LLaVA-1.5 checkpoint into a `comm` or `matryoshka_llava` one
(`comm_vlm.convert`), or derives M3 or the combiner from a checkpoint of this package (`comm_vlm.derive`); `push`
uploads a saved checkpoint with remote code and a model card, or writes that repo to `--local-dir` (`comm_vlm.hub`).
`evaluate` scores a checkpoint on a published benchmark read from its own files (`comm_vlm.evaluation.benchmarks`),
writes the results, the table and the predictions, and the model-index entries `push --card` takes.
`train-scale-selector` evaluates an M3 checkpoint at every scale on evaluation rows, fits the learned scale selector
to the per-sample correctness and writes the checkpoint with it, for `matryoshka_scale="auto"`
(`comm_vlm.evaluation.scale_selection`).

Bad input (a `ValueError` or `OSError`, e.g. a missing directory or an unknown recipe) prints one line,
`comm-vlm COMMAND: error: ...`, and exits with status 2. Everything heavy is imported inside the commands, so `--help`
answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


USER_ERRORS = (ValueError, OSError)
# The names of `comm_vlm.evaluation.benchmarks.BENCHMARKS`, listed here so that `--help` imports nothing heavy.
EVALUATE_TASKS = (
    "pope", "refcoco", "refcoco+", "refcocog", "refcocog_reg", "vqav2", "okvqa", "coco_caption", "flickr30k", "mme",
    "gqa", "textvqa",
)  # fmt: skip


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default, except `None`, whose meaning the option's help text gives in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The `comm-vlm` argument parser (every subcommand)."""
    parser = argparse.ArgumentParser(
        prog="comm-vlm",
        description="COMM, Matryoshka-LLaVA and adaptive-combiner models: demos, training, conversion, Hub upload.",
        epilog="Run `comm-vlm COMMAND --help` for a command's options.",
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)

    demo = add_command("demo", "the main job: train, evaluate, save and serve tiny models of each family")
    demo.add_argument("--output-dir", default="outputs/demo", help="where the models, data and results are written")
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI-sized run: seconds, and the numbers are not meaningful")
    size.add_argument("--long", action="store_true", help="the longer schedule (`MainJobConfig.long()`)")
    demo.add_argument(
        "--families",
        nargs="+",
        metavar="FAMILY",
        help="families to train, in order; Matryoshka-LLaVA needs COMM before it "
        "(default: comm matryoshka_llava adaptive_combiner)",
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the synthetic splits, the encoder warm-up, every init and run"
    )

    study = add_command("layer-study", "COMM's layer study: single CLIP layers vs multi-level merging")
    study.add_argument("--output-dir", default="outputs/layer_study", help="where the table, JSON and plot go")
    study.add_argument(
        "--quick", action="store_true", help="CI-sized run of 2 variants: the numbers are not meaningful"
    )
    study.add_argument(
        "--variants", nargs="+", metavar="VARIANT", help="e.g. single@1 single@4 lln_layerscale (default: all)"
    )
    study.add_argument("--encoder-layers", type=int, help="depth of the tiny CLIP (default: the main job's)")
    study.add_argument(
        "--stage-steps",
        type=int,
        nargs=2,
        metavar=("STAGE1", "STAGE2"),
        help="training steps of each stage (default: the main job's COMM steps)",
    )

    plumbing = add_command("plumbing", "build, save, reload and serve a random tiny COMM offline (seconds)")
    plumbing.add_argument("--output-dir", default="outputs/plumbing", help="where the tiny checkpoint is saved")
    plumbing.add_argument(
        "--layout", choices=["comm", "llava"], default="comm", help="COMM, or its LLaVA-equivalent configuration"
    )
    plumbing.add_argument("--seed", type=int, default=0, help="seed of the random weights")

    train = add_command("train", "run a training recipe (YAML) on TRL's SFTTrainer")
    train.add_argument("--recipe", required=True, help="shipped recipe name (comm, llava) or path of a YAML recipe")
    train.add_argument("--output-dir", default="outputs/train", help="where each stage's checkpoints are saved")
    train.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="SFTConfig overrides for every stage (default: none)"
    )

    assemble = add_command("assemble", "build a model of any family from published encoders and an LLM, and save it")
    assemble.add_argument("output", help="output directory (must not exist or be empty, unless --overwrite)")
    assemble.add_argument("--vision", required=True, help="primary encoder: repo id or directory (CLIP, SigLIP, ...)")
    assemble.add_argument("--text", required=True, help="causal LM: repo id or directory (its tokenizer is used)")
    assemble.add_argument(
        "--secondary-vision",
        help="second encoder, e.g. facebook/dinov2-large, run at the primary's grid (default: none, one encoder)",
    )
    assemble.add_argument(
        "--family",
        choices=["comm", "matryoshka_llava", "adaptive_combiner", "matryoshka_llava_next"],
        default="comm",
        help="model family (M3 and the combiner default to LLaVA-1.5's vision branch; matryoshka_llava_next: "
        "LLaVA-NeXT's tiles, one encoder)",
    )
    assemble.add_argument(
        "--set",
        dest="fields",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config fields, e.g. projector_depth=2",
    )
    assemble.add_argument("--dtype", default="float32", help="weight dtype, e.g. bfloat16 for a 7B model")
    assemble.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    assemble.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")

    convert = add_command(
        "convert", "convert a LLaVA-1.5 checkpoint to comm / matryoshka_llava, or derive one family from another"
    )
    convert.add_argument(
        "--from",
        dest="source_layout",
        required=True,
        choices=["llava-hf", "llava-original", "comm-vlm"],
        help="layout of the source: transformers' llava-hf, the LLaVA / M3 training code's, or this package's "
        "(derive M3 or the combiner from a trained model)",
    )
    convert.add_argument("source", help="source checkpoint directory (safetensors)")
    convert.add_argument("output", help="output directory (must not exist or be empty, unless --overwrite)")
    convert.add_argument(
        "--to",
        dest="target",
        choices=["comm", "matryoshka_llava", "adaptive_combiner", "matryoshka_llava_next"],
        default="comm",
        help="family of the output (adaptive_combiner: --from comm-vlm only; matryoshka_llava_next: from LLaVA-NeXT)",
    )
    convert.add_argument(
        "--set", dest="fields", nargs="+", default=[], metavar="KEY=VALUE", help="comm-vlm: target config fields"
    )
    convert.add_argument(
        "--vision-tower",
        help="llava-original: CLIP directory or Hub id (default: the source config's mm_vision_tower)",
    )
    convert.add_argument(
        "--matryoshka-scales",
        help="matryoshka_llava: trained scales, e.g. 1,9,36,144,576 (default: the paper's cascade for the grid)",
    )
    convert.add_argument("--base-model", help="Hub id of the source, recorded in the model card (default: none)")
    convert.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")

    push = add_command("push", "push a checkpoint with remote code and a model card to the Hub")
    push.add_argument("source", help="checkpoint directory saved by this package")
    push.add_argument("repo_id", help="Hub repo, e.g. me/comm-7b (also used in the card with --local-dir)")
    push.add_argument(
        "--card", help="JSON file with model-card fields, see comm_vlm.hub.ModelCardInfo (default: none)"
    )
    push.add_argument(
        "--recipe",
        help="training recipe (name or YAML) to describe in the card when the checkpoint has no "
        "training_provenance.json (default: none; a `final/` of `comm-vlm train` describes the run that made it)",
    )
    push.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    push.add_argument("--private", action="store_true", help="make a new repo private")
    push.add_argument(
        "--revision", help="branch to commit to, created if missing (default: the repo's default branch)"
    )
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--commit-message", help='commit message (default: "Upload <model class> with comm-vlm")')
    push.add_argument("--local-dir", help="write the repo's files here instead of uploading (default: upload)")

    evaluate = add_command("evaluate", "score a checkpoint on a published benchmark read from its own files")
    evaluate.add_argument("--model", required=True, help="checkpoint directory or Hub repo id")
    evaluate.add_argument(
        "--task",
        required=True,
        choices=EVALUATE_TASKS,
        metavar="NAME",
        help="the benchmark: %(choices)s (docs/evaluation.md)",
    )
    evaluate.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="PATH",
        help="the benchmark's files, a folder of them, or a dataset id already in the local Hugging Face cache "
        "(nothing is downloaded)",
    )
    evaluate.add_argument(
        "--images", help="folder of the images the files name (default: none; parquet files hold their images)"
    )
    evaluate.add_argument(
        "--split",
        help="e.g. testA (RefCOCO), adversarial (POPE), val (Karpathy) (default: the split the files state, else "
        "the benchmark's first)",
    )
    evaluate.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (greedy, left-padded)")
    evaluate.add_argument("--limit", type=int, help="score only the first N rows (default: all)")
    evaluate.add_argument("--max-new-tokens", type=int, help="generation length (default: the task's)")
    evaluate.add_argument(
        "--matryoshka-scale",
        nargs="+",
        metavar="SCALE",
        help="M3 visual tokens per image: one scale, several, or `all` (several and all add the oracle analysis and "
        "the accuracy-vs-tokens plot) (default: the processor's)",
    )
    evaluate.add_argument(
        "--prompt", help="question template with {question}, {expression} or {box} (default: the benchmark's)"
    )
    evaluate.add_argument("--output-dir", default="outputs/eval", help="where results, tables and predictions go")
    evaluate.add_argument("--dtype", help="weight dtype, e.g. bfloat16 (default: the checkpoint's)")
    evaluate.add_argument("--device", help="e.g. cuda:0 or cpu (default: cuda when available, else cpu)")

    selector = add_command(
        "train-scale-selector", 'fit an M3 checkpoint\'s learned scale selector (matryoshka_scale="auto") and save it'
    )
    selector.add_argument("--model", required=True, help="Matryoshka-LLaVA checkpoint directory or Hub repo id")
    selector.add_argument(
        "--data",
        required=True,
        help="evaluation rows (messages, images, task, answer, ...) as a .jsonl/.json file or a folder of them; "
        "not the split you report on",
    )
    selector.add_argument(
        "--task", default="vqa", help="task whose right/wrong answers are the labels (vqa, pope, rec)"
    )
    selector.add_argument("--limit", type=int, help="use only the first N rows (default: all)")
    selector.add_argument("--output-dir", required=True, help="where the checkpoint with its selector is written")
    selector.add_argument("--steps", type=int, default=1000, help="Adam steps of the fit")
    selector.add_argument("--learning-rate", type=float, default=3e-3, help="Adam learning rate")
    selector.add_argument("--width", type=int, default=256, help="hidden width of the selector's MLP")
    selector.add_argument(
        "--margin",
        type=float,
        default=0.05,
        help="operating point: the smallest scale within this P(correct) of the best",
    )
    selector.add_argument("--seed", type=int, default=0, help="seed of the fit")
    selector.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    selector.add_argument("--device", help="e.g. cuda:0 or cpu (default: cuda when available, else cpu)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs `comm-vlm` with `argv` (default: the process's) and returns the exit status."""
    args = build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = COMMANDS[args.command]
    try:
        return command(args)
    except USER_ERRORS as err:
        message = str(err) or type(err).__name__
        sys.stderr.write(f"comm-vlm {args.command}: error: {message}\n")
        return 2


def _main_job(args: argparse.Namespace) -> int:
    from .demo.main_job import MainJobConfig, run_main_job

    config = MainJobConfig.for_run(args.quick, args.long, args.families, args.seed)
    config.validate()
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


def layer_study_config(args: argparse.Namespace) -> Any:
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
    from .demo.layer_study import run_layer_study

    results = run_layer_study(args.output_dir, layer_study_config(args))
    sys.stdout.write(f"\n{results['table']}\n\nwall time {results['seconds']} s; plot {results['plot']}\n")
    return 0


def _plumbing(args: argparse.Namespace) -> int:
    import numpy as np

    from .demo.plumbing import run_plumbing

    np.random.seed(args.seed)
    result = run_plumbing(args.output_dir, layout=args.layout, seed=args.seed)
    width = max(len(k) for k in result)
    for key, value in result.items():
        sys.stdout.write(f"{key:<{width}}  {value}\n")
    if result["reload_max_abs_logit_diff"] != 0.0:
        sys.stderr.write("comm-vlm plumbing: reload changed the logits\n")
        return 1
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


def _convert(args: argparse.Namespace) -> int:
    try:
        scales = [int(s) for s in args.matryoshka_scales.split(",")] if args.matryoshka_scales else None
    except ValueError:
        raise ValueError(
            f"--matryoshka-scales takes integers separated by commas, got {args.matryoshka_scales!r}"
        ) from None
    from .convert import convert_checkpoint

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
        config_fields=_fields(args.fields),
    )
    sys.stdout.write(f"wrote {args.output}: {', '.join(files)}\n")
    return 0


def _fields(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs, values read as YAML (`projector_depth=2`, `vision_feature_layer=[12,16]`)."""
    from .training.recipes import parse_overrides

    return parse_overrides(items)


def _assemble(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise ValueError(f"{output} exists and is not empty; pass --overwrite or another directory.")
    from .assemble import assemble_comm
    from .hub import ModelCardInfo, save_for_hub_into

    parts = {"vision": args.vision, "secondary_vision": args.secondary_vision, "text": args.text}
    model, processor = assemble_comm(family=args.family, dtype=args.dtype, **parts, **_fields(args.fields))
    published = [str(p) for p in parts.values() if p is not None and not Path(p).exists()]
    card = ModelCardInfo(
        base_model=published,
        notes=[
            "Assembled with `comm-vlm assemble` from "
            + ", ".join(f"{k}: `{v}`" for k, v in parts.items() if v is not None)
            + "; the connector and projector are freshly initialised: train stage 1 before use."
        ],
    )
    files = save_for_hub_into(model, output, processor, card, max_shard_size=args.max_shard_size)
    sys.stdout.write(f"wrote {output}: {', '.join(files)}\n")
    return 0


def _push(args: argparse.Namespace) -> int:
    import json

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .hub import ModelCardInfo, push_to_hub, save_for_hub, training_from_recipe
    from .hub.cards import PROVENANCE_FILE, base_models_from_recipe, read_provenance

    card = ModelCardInfo.from_dict(json.loads(Path(args.card).read_text())) if args.card else ModelCardInfo()
    card.repo_id = card.repo_id or args.repo_id
    # The card describes, in this order: the fields of --card, the run recorded in SRC, --recipe.
    record = read_provenance(args.source)
    if args.recipe and record is not None:
        sys.stderr.write(
            f"comm-vlm push: {args.source} records the run that trained it ({PROVENANCE_FILE}): the card describes "
            "that run, not --recipe\n"
        )
    elif args.recipe:
        from .training import load_recipe

        recipe = load_recipe(args.recipe)
        card.training = card.training or training_from_recipe(recipe)
        card.base_model = card.base_model or base_models_from_recipe(recipe)
    model = AutoModelForImageTextToText.from_pretrained(args.source)
    has_processor = any((Path(args.source) / f).is_file() for f in ("processor_config.json", "tokenizer_config.json"))
    processor = AutoProcessor.from_pretrained(args.source) if has_processor else None
    if args.local_dir:
        files = save_for_hub(
            model, args.local_dir, processor, card, max_shard_size=args.max_shard_size, provenance=record or False
        )
        sys.stdout.write(f"wrote {args.local_dir}: {', '.join(files)}\n")
        return 0
    commit = push_to_hub(
        model,
        args.repo_id,
        processor,
        card,
        max_shard_size=args.max_shard_size,
        provenance=record or False,
        private=args.private or None,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
    )
    sys.stdout.write(f"pushed to {args.repo_id}: {getattr(commit, 'commit_url', commit)}\n")
    return 0


def matryoshka_scales(values: list[str] | None) -> int | list[int] | str | None:
    """`--matryoshka-scale` values as `evaluate_benchmark` takes them: None, one int, a list, or `"all"`."""
    if not values:
        return None
    if values == ["all"]:
        return "all"
    try:
        scales = [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--matryoshka-scale takes integers or `all`, got {' '.join(values)!r}") from None
    if min(scales) < 1:
        raise ValueError(f"--matryoshka-scale takes positive token counts, got {scales}")
    return scales[0] if len(scales) == 1 else scales


def _evaluate(args: argparse.Namespace) -> int:
    scales = matryoshka_scales(args.matryoshka_scale)
    for option, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be positive, got {value}")
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .evaluation.benchmark_runs import evaluate_benchmark
    from .evaluation.benchmarks import load_benchmark

    dataset = load_benchmark(args.task, args.data, args.images, args.split, args.limit, args.prompt)
    processor = AutoProcessor.from_pretrained(args.model)
    if scales is not None and not hasattr(processor, "matryoshka_scales"):
        raise ValueError(
            f"--matryoshka-scale needs a Matryoshka (M3) model; {args.model} has a {type(processor).__name__}, which "
            "takes no scale. Leave the option out for this model."
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=args.dtype or "auto").to(device)
    run = evaluate_benchmark(
        model, processor, args.task, dataset, args.output_dir, scales, args.batch_size, args.max_new_tokens
    )
    sys.stdout.write(
        f"{run.table}\n\nwrote {run.folder}: {', '.join(run.files)}\nmodel-index entries in {run.eval_results} "
        f"(comm-vlm push {args.model} REPO_ID --card {run.eval_results})\n"
    )
    return 0


def _train_scale_selector(args: argparse.Namespace) -> int:
    for option, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be positive, got {value}")
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .evaluation.scale_selection import read_eval_rows, save_with_scale_selector, train_scale_selector

    rows = read_eval_rows(args.data, args.limit)
    processor = AutoProcessor.from_pretrained(args.model)
    if not hasattr(processor, "matryoshka_scales"):
        raise ValueError(
            f"train-scale-selector needs a Matryoshka-LLaVA (M3) checkpoint; {args.model} has a "
            f"{type(processor).__name__}, which takes no scale."
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForImageTextToText.from_pretrained(args.model).to(device).eval()
    report = train_scale_selector(
        model,
        processor,
        rows,
        task=args.task,
        width=args.width,
        margin=args.margin,
        steps=args.steps,
        learning_rate=args.learning_rate,
        seed=args.seed,
        batch_size=args.batch_size,
        split_name=str(args.data) + (f" (first {args.limit} rows)" if args.limit else ""),
    )
    output = save_with_scale_selector(model, processor, args.output_dir, report)
    sys.stdout.write(f"{report.to_markdown()}\n\nwrote {output} (load it and generate with matryoshka_scale='auto')\n")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": _main_job,
    "layer-study": _layer_study,
    "plumbing": _plumbing,
    "train": _train,
    "assemble": _assemble,
    "convert": _convert,
    "push": _push,
    "evaluate": _evaluate,
    "train-scale-selector": _train_scale_selector,
}


if __name__ == "__main__":
    raise SystemExit(main())
