"""Parameter counts of every family at the papers' scale, built from the published configs, against the papers.

Each build (`tests/published_configs.py`, `PUBLISHED_BUILDS`) is made from the published `config.json` of its
checkpoints (`tests/fixtures/published_configs/`) on the `meta` device, so nothing is allocated or downloaded:
LLaVA-1.5-7B's layout, COMM-7B (CLIP ViT-L/14-336 + DINOv2-L at 336 px), M3 and the adaptive combiner on LLaVA-1.5-7B,
and a SigLIP-so400m variant of COMM that no paper describes. transformers' own `LlavaForConditionalGeneration`, built
from llava-hf's config, is counted as the reference for the LLaVA-1.5 layout. Counts are split by component: vision
towers, the connector (multi-level merges and aligners), projector, combiner and the LLM (decoder and LM head).

Run: `PYTHONPATH=src python benchmarks/param_counts.py [--output results_param_counts.md]` (a few seconds).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path
from types import ModuleType

import torch
import transformers
from bench_utils import load_published_configs

from comm_vlm.families import get_family


# What the sources say about each build's size; none of the three papers states a total parameter count.
REFERENCES: dict[str, tuple[float | None, str]] = {
    "llava-1.5-7b": (7.06, "7.06B: llava-hf/llava-1.5-7b-hf on the Hub"),
    "llava-hf (transformers Llava)": (7.06, "the reference implementation of the row above"),
    "comm-7b": (7.4, "no total in the paper (ViT-Large ~300M per encoder + Vicuna-7B): ~7.4B"),
    "m3-llava-1.5-7b": (7.06, "= LLaVA-1.5-7B: M3 adds no learnable parameters (the paper)"),
    "combiner-llava-1.5-7b": (None, "no number for this build (the paper's own small model: 350M, not LLaVA)"),
    "comm-siglip-so400m": (None, "not a paper model"),
}


def build_all(published: ModuleType) -> dict[str, torch.nn.Module]:
    """Every build, and transformers' Llava on llava-hf's config, on the meta device."""
    models = {}
    with torch.device("meta"):
        for name, (family, _) in published.PUBLISHED_BUILDS.items():
            models[name] = get_family(family).model_class(published.published_build(name))
        config = published.load_published_config(published.LLAVA_15_7B)
        models["llava-hf (transformers Llava)"] = transformers.LlavaForConditionalGeneration(config)
    return models


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unused_note(models: dict[str, torch.nn.Module]) -> str:
    """The encoder parameters the forward never reads (counted in `vision towers`, as the checkpoints hold them)."""
    clip = models["llava-1.5-7b"].model.vision_tower
    after_penultimate = numel(clip.encoder.layers[-1]) + numel(clip.post_layernorm)
    siglip_head = numel(models["comm-siglip-so400m"].model.vision_tower.head)
    return (
        f"- Counted but never run: LLaVA-1.5 and M3 read CLIP's penultimate layer, so its last layer and "
        f"`post_layernorm` ({millions(after_penultimate)}M) are idle; SigLIP's attention-pooling head "
        f"({millions(siglip_head)}M) is built by `SiglipVisionModel` but COMM reads only hidden states."
    )


def millions(value: int) -> str:
    return f"{value / 1e6:,.1f}" if value else "-"


def table(counts: dict[str, dict[str, int]]) -> str:
    """The Markdown table: totals in billions and exact, components in millions, and the reference sizes."""
    lines = [
        "| build | total (B) | total (exact) | vision towers (M) | merges (M) | aligners (M) | projector (M) "
        "| combiner (M) | LLM (M) | reference | total - reference |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, build in counts.items():
        towers = millions(build["vision_tower"])
        if build["secondary_vision_tower"]:
            towers += f" + {millions(build['secondary_vision_tower'])}"
        reference, note = REFERENCES[name]
        difference = f"{build['total'] / 1e9 - reference:+.3f}B" if reference is not None else "-"
        lines.append(
            f"| {name} | {build['total'] / 1e9:.3f} | {build['total']:,} | {towers} | {millions(build['merges'])} "
            f"| {millions(build['aligners'])} | {millions(build['projector'])} | {millions(build['combiner'])} "
            f"| {millions(build['llm'])} | {note} | {difference} |"
        )
    return "\n".join(lines)


def notes(counts: dict[str, dict[str, int]], published: ModuleType) -> str:
    """What each build is, and the checks the tests make, restated on these numbers."""
    llava, comm = counts["llava-1.5-7b"], counts["comm-7b"]
    reference = counts["llava-hf (transformers Llava)"]
    lines = [f"- `{name}`: {description}." for name, (_, description) in published.PUBLISHED_BUILDS.items()]
    lines += [
        f"- LLaVA-1.5 layout == transformers' Llava on llava-hf's config, per component: {llava == reference}.",
        f"- M3 == LLaVA-1.5-7B, component by component: {counts['m3-llava-1.5-7b'] == llava}.",
        f"- COMM-7B - LLaVA-1.5-7B = {(comm['total'] - llava['total']) / 1e6:,.1f}M: DINOv2-L "
        f"{millions(comm['secondary_vision_tower'])}M + merges {millions(comm['merges'])}M + DINOv2 aligner "
        f"{millions(comm['aligners'])}M + (COMM's linear projector {millions(comm['projector'])}M - LLaVA's MLP "
        f"{millions(llava['projector'])}M) + LLM {(comm['llm'] - llava['llm']) / 1e6:+,.1f}M (Vicuna's vocabulary "
        "32000, not llava-hf's 32064).",
        f"- `comm-siglip-so400m` merges {counts['comm-siglip-so400m']['merges']:,} parameters: `CommConfig`'s default "
        "`vision_feature_layer` is layers 1-24, so of SigLIP's 27 layers the first 24 are merged, not all.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output",
        default=str(Path(__file__).resolve().parent / "results_param_counts.md"),
        help="also write the report (Markdown) here (default: benchmarks/results_param_counts.md; '' for none)",
    )
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()  # SigLIP's text-tower defaults warn about token ids; not ours
    published = load_published_configs()
    models = build_all(published)
    counts = {name: published.component_counts(model) for name, model in models.items()}
    report = (
        "# Parameter counts of the published builds\n\n"
        f"Run {datetime.datetime.now().isoformat(timespec='seconds')}: torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}; models on the meta device, built from the "
        "published configs in `tests/fixtures/published_configs/`. Components in millions; `LLM` is the decoder and "
        "the LM head (untied); `vision towers` counts every parameter of each encoder, used or not.\n\n"
        f"{table(counts)}\n\n{notes(counts, published)}\n{unused_note(models)}\n"
    )
    sys.stdout.write(report)
    if args.output:
        Path(args.output).write_text(report)


if __name__ == "__main__":
    main()
