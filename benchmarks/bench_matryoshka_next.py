"""Matryoshka-LLaVA-NeXT at LLaVA-NeXT's real geometry: visual tokens per image, and the prefill cost against
transformers' `LlavaNextForConditionalGeneration` on the same weights.

Table 1 (no model): tokens per image (base view + unpadded tile map + one newline per row) at every scale, for common
image sizes on LLaVA-NeXT's five 336 px canvases (up to 2x2 tiles) and with 3x3 canvases added; next to the paper's
round numbers (5 x 576 = 2,880 for a 2x2 image, 5 x 9 = 45, 10 x 144 = 1,440 on 3x3), which leave out newlines and
unpadding.

Table 2 (CPU, fp32, batch 1, one 672 x 672 image = 5 tiles, 30 text tokens, `logits_to_keep=1`, interleaved
ABAB..., median and min): the vision tower is CLIP ViT-L/14-336 as published (random weights; `--quick`: 2 layers),
the LLM a random Llama of width 1024 and 2 layers (the vision tower dominates here, as it does not at 7B). The full
scale is checked equal to LLaVA-NeXT first; the ratio column is time / LLaVA-NeXT's.

Run: `PYTHONPATH=src python benchmarks/bench_matryoshka_next.py [--quick] [--threads N] [--output FILE]`.
"""

from __future__ import annotations

import argparse
import datetime

import torch
from bench_utils import cpu_name, interleaved_times, load_published_configs
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from comm_vlm.models.configuration_matryoshka_next import MatryoshkaLlavaNextConfig
from comm_vlm.models.modeling_matryoshka_next import MatryoshkaLlavaNextForConditionalGeneration


SIZES = [(336, 336), (480, 640), (640, 480), (672, 672), (768, 1024), (1080, 1920), (1000, 300)]  # (H, W)
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
GRID_3X3 = NEXT_PINPOINTS + [[1008, 1008], [672, 1008], [1008, 672]]


def token_table() -> str:
    lines = []
    for name, pins in (("LLaVA-NeXT canvases (up to 2x2)", NEXT_PINPOINTS), ("with 3x3 canvases", GRID_3X3)):
        config = MatryoshkaLlavaNextConfig(image_grid_pinpoints=pins)
        scales = config.matryoshka_scales
        lines += [f"\n{name}:\n", "| image (H x W) | " + " | ".join(f"S={s}" for s in scales) + " |"]
        lines.append("|---|" + "---:|" * len(scales))
        for size in SIZES:
            cells = " | ".join(f"{config.num_image_tokens(size, s):,}" for s in scales)
            lines.append(f"| {size[0]} x {size[1]} | {cells} |")
    return "\n".join(lines)


def build(quick: bool):
    configs = load_published_configs()
    vision = configs.load_vision_config(configs.CLIP_L_336).to_dict()
    if quick:
        vision.update(num_hidden_layers=2)
    text = dict(
        model_type="llama",
        vocab_size=32064,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=4096,
    )
    fields = dict(vision_config=vision, text_config=text, image_token_index=32000)
    torch.manual_seed(0)
    reference = LlavaNextForConditionalGeneration(LlavaNextConfig(**fields)).eval()
    ours = MatryoshkaLlavaNextForConditionalGeneration(MatryoshkaLlavaNextConfig(**fields)).eval()
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def timing_table(quick: bool, reps: int) -> str:
    reference, ours = build(quick)
    config = ours.config
    size = (672, 672)
    pixel_values = torch.randn(1, 5, 3, 336, 336)
    image_sizes = torch.tensor([size])
    text = torch.randint(0, 32000, (30,))

    def inputs(scale):
        ids = torch.cat([text[:5], torch.full((config.num_image_tokens(size, scale),), 32000), text[5:]])[None]
        return {"input_ids": ids, "pixel_values": pixel_values, "image_sizes": image_sizes, "logits_to_keep": 1}

    full = inputs(576)
    with torch.inference_mode():
        assert torch.equal(reference(**full).logits, ours(**full).logits), "full scale differs from LLaVA-NeXT"
    fns = {"LLaVA-NeXT": lambda: reference(**full)}
    for scale in reversed(config.matryoshka_scales):
        batch = inputs(scale)
        fns[f"M3-NeXT S={scale}"] = lambda batch=batch: ours(**batch)
    with torch.inference_mode():
        times = interleaved_times(fns, reps=reps, warmup=1)
    base = times["LLaVA-NeXT"][0]
    lines = ["| model | LLM tokens | median s | min s | ratio |", "|---|---:|---:|---:|---:|"]
    for name, (median, low) in times.items():
        scale = 576 if name == "LLaVA-NeXT" else int(name.split("=")[1])
        tokens = config.num_image_tokens(size, scale) + 30
        lines.append(f"| {name} | {tokens:,} | {median:.3f} | {low:.3f} | {median / base:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 CLIP layers instead of 24")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--output", default=None, help="also write the report to this markdown file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = "\n".join(
        [
            f"# Matryoshka-LLaVA-NeXT: tokens and prefill ({datetime.date.today()}, {cpu_name()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}{', --quick' if args.quick else ''})",
            "\n## Visual tokens per image",
            token_table(),
            "\n## Prefill, one 672 x 672 image (5 tiles)\n",
            timing_table(args.quick, args.reps),
        ]
    )
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
