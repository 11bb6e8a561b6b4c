"""FLOPs of the adaptive combiner (Piergiovanni and Angelova 2023, arXiv 2305.19924) vs the plain LLaVA path.

One full forward, batch 1, one 336 px image (576 visual tokens) and `--text-tokens` text tokens (default 64: a
LLaVA-1.5 system prompt, a question and a short answer), at LLaVA-1.5-7B proportions: CLIP ViT-L/14-336
(penultimate layer) + 2-layer MLP projector, Vicuna-7B-shaped Llama (32 layers, width 4096, vocabulary 32000).

- LLaVA path ("concatenation"): vision branch -> 576 visual tokens + text -> LLM (+ LM head).
- Combiner path: the same vision branch -> adaptive combiner (with the prompt) -> N fused tokens + text -> LLM.

Counting: `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention; elementwise ops, norms and
softmax are not counted, as usual). The 7B models are built on the `meta` device, so nothing is allocated or
computed. A forward on meta tensors cannot locate the image placeholders (that needs the token values), so the full
forward is counted as its parts on exactly the shapes it runs: `get_image_features(pixels)`, `combiner(visual
tokens, text of length T, mask)` and `lm_head(language_model(inputs_embeds))` (embedding lookup and scatter are
0 FLOPs). `check_decomposition()` proves the sum equals a real full forward (`model(input_ids, pixel_values)` on
CPU) at toy size, and the script refuses to print a table if it does not.

Run: `PYTHONPATH=src python benchmarks/bench_combiner.py [--text-tokens 64] [--output results_combiner.md]`
(about a minute on 2 cores; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import sys
from collections.abc import Callable

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from comm_vlm import (
    AdaptiveCombinerConfig,
    AdaptiveCombinerForConditionalGeneration,
    CommConfig,
    CommForConditionalGeneration,
)
from comm_vlm.testing import IMAGE_TOKEN_ID, tiny_comm_config


VICUNA_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}
NUM_LATENTS = (16, 32, 64, 128)
ITERATIONS = (1, 2, 4, 8)


def cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# CPU SDPA dispatches to an op FlopCounterMode has no formula for: count it like the CUDA flash kernel. (On meta,
# SDPA decomposes into two bmm's, which are counted: the same number.)
FLOP_MAPPING = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_attention_flops}


def count_flops(fn: Callable[[], object]) -> int:
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=FLOP_MAPPING) as counter:
        fn()
    return counter.get_total_flops()


def llava_config(text_config: dict | None = None) -> CommConfig:
    """LLaVA-1.5: CLIP ViT-L/14-336, penultimate layer, 2-layer MLP projector (CommConfig in the LLaVA layout)."""
    return CommConfig(
        secondary_vision_config=None,
        vision_feature_layer=-2,
        vision_feature_merge="single",
        vision_aligner="identity",
        projector_depth=2,
        text_config=text_config or dict(VICUNA_7B),
    )


def build(config, device: str):
    model_class = (
        AdaptiveCombinerForConditionalGeneration
        if isinstance(config, AdaptiveCombinerConfig)
        else CommForConditionalGeneration
    )
    with torch.device(device) if device == "meta" else contextlib.nullcontext():
        return model_class(config).eval()


def component_flops(model, text_tokens: int, device: str = "meta") -> dict[str, int]:
    """FLOPs of one forward (batch 1, one image, `text_tokens` text tokens) counted as vision + combiner + LLM."""
    config = model.config
    size = config.vision_config.image_size
    width = config.text_config.hidden_size
    pixels = torch.zeros(1, 3, size, size, device=device)
    parts = {"vision": count_flops(lambda: model.model.get_image_features(pixels))}
    if isinstance(config, AdaptiveCombinerConfig):
        llm_tokens = text_tokens + config.combiner_num_latents
        visual = torch.zeros(1, config.image_seq_length, width, device=device)
        text = torch.zeros(1, llm_tokens, width, device=device)  # the combiner reads the whole row, masked
        mask = torch.ones(1, llm_tokens, dtype=torch.bool, device=device)
        parts["combiner"] = count_flops(lambda: model.model.combiner(visual, text, mask))
    else:
        llm_tokens = text_tokens + config.image_seq_length
        parts["combiner"] = 0
    embeds = torch.zeros(1, llm_tokens, width, device=device)
    parts["llm"] = count_flops(lambda: model.lm_head(model.model.language_model(inputs_embeds=embeds)[0]))
    parts["total"] = parts["vision"] + parts["combiner"] + parts["llm"]
    parts["llm_tokens"] = llm_tokens
    return parts


def check_decomposition(text_tokens: int = 12) -> tuple[dict[str, int], dict[str, int]]:
    """Toy-size proof of the method: a real CPU full forward (`model(input_ids, pixel_values)`) and the meta
    decomposition give the same FLOPs, for the LLaVA path and the combiner path. Returns `(real, meta)`."""
    llava = tiny_comm_config("llava")
    configs = {
        "llava": llava,
        "combiner": AdaptiveCombinerConfig.from_comm_config(llava, combiner_num_latents=4, combiner_iterations=3),
    }
    real, meta = {}, {}
    for name, config in configs.items():
        placeholders = config.combiner_num_latents if name == "combiner" else config.image_seq_length
        ids = torch.tensor([[1] + [IMAGE_TOKEN_ID] * placeholders + list(range(5, 5 + text_tokens - 1))])
        pixels = torch.randn(1, 3, config.vision_config.image_size, config.vision_config.image_size)
        model = build(config, "cpu")
        real[name] = count_flops(lambda model=model, ids=ids, pixels=pixels: model(input_ids=ids, pixel_values=pixels))
        meta[name] = component_flops(build(config, "meta"), text_tokens)["total"]
    return real, meta


def gflops(flops: int) -> str:
    return f"{flops / 1e9:.1f}"


def run(text_tokens: int) -> str:
    real, meta = check_decomposition()
    if real != meta:
        raise SystemExit(f"FLOPs decomposition check failed: real forward {real} != vision+combiner+LLM {meta}")
    lines = []
    out = lines.append
    base_config = llava_config()
    llava = component_flops(build(base_config, "meta"), text_tokens)
    out(f"Decomposition check (toy size, real CPU forward == meta vision + combiner + LLM): {real} == {meta}\n")
    out(
        f"LLaVA path: {llava['llm_tokens']} LLM tokens (576 visual + {text_tokens} text): vision "
        f"{gflops(llava['vision'])} + LLM {gflops(llava['llm'])} = **{gflops(llava['total'])} GFLOPs**\n"
    )

    grid: dict[tuple[int, int], dict[str, int]] = {}
    for num_latents in NUM_LATENTS:
        for iterations in ITERATIONS:
            config = AdaptiveCombinerConfig.from_comm_config(
                base_config, combiner_num_latents=num_latents, combiner_iterations=iterations
            )
            grid[num_latents, iterations] = component_flops(build(config, "meta"), text_tokens)

    out("### Full forward GFLOPs of the combiner path (LLaVA / combiner ratio)\n")
    out("| N \\ iterations | " + " | ".join(str(i) for i in ITERATIONS) + " |")
    out("|---|" + "---|" * len(ITERATIONS))
    for num_latents in NUM_LATENTS:
        cells = [
            f"{gflops(grid[num_latents, i]['total'])} ({llava['total'] / grid[num_latents, i]['total']:.2f}x)"
            for i in ITERATIONS
        ]
        out(f"| {num_latents} | " + " | ".join(cells) + " |")
    out("\n### GFLOPs of the combiner module alone (part of the totals above)\n")
    out("| N \\ iterations | " + " | ".join(str(i) for i in ITERATIONS) + " |")
    out("|---|" + "---|" * len(ITERATIONS))
    for num_latents in NUM_LATENTS:
        out(f"| {num_latents} | " + " | ".join(gflops(grid[num_latents, i]["combiner"]) for i in ITERATIONS) + " |")

    out("\n### Other ablation knobs at N = 64, 4 iterations (full forward GFLOPs, ratio)\n")
    out("| variant | combiner GF | total GF | LLaVA / combiner |")
    out("|---|---|---|---|")
    variants = {
        "default (latent, weighted, gated, 1 layer, D = 4096)": {},
        "spatial resampling": dict(combiner_resampling="spatial"),
        "no resampling (all 576 visual tokens in the cross-attention)": dict(combiner_resampling="none"),
        "no gating": dict(combiner_gating=False),
        "residual combination": dict(combiner_combination="residual"),
        "2 fusion layers": dict(combiner_num_layers=2),
        "4 fusion layers": dict(combiner_num_layers=4),
        "D = 1024 (16 heads)": dict(combiner_hidden_size=1024, combiner_num_heads=16),
    }
    for name, overrides in variants.items():
        config = AdaptiveCombinerConfig.from_comm_config(base_config, **overrides)
        parts = component_flops(build(config, "meta"), text_tokens)
        out(
            f"| {name} | {gflops(parts['combiner'])} | {gflops(parts['total'])} | "
            f"{llava['total'] / parts['total']:.2f}x |"
        )
    default = grid[64, 4]
    ratio = llava["total"] / default["total"]
    out(
        f"\nAcceptance (N = 64, 4 iterations): LLaVA {gflops(llava['total'])} GF / combiner "
        f"{gflops(default['total'])} GF = **{ratio:.2f}x** fewer FLOPs (target >= 1.5x): "
        + ("PASS" if ratio >= 1.5 else "FAIL")
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens besides the image (default 64)")
    parser.add_argument("--output", help="also write the report (Markdown) to this file")
    args = parser.parse_args()
    header = (
        f"# Adaptive combiner FLOPs vs LLaVA concatenation\n\n"
        f"Run {datetime.datetime.now().isoformat(timespec='seconds')}: torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}; models on the meta device (shapes only).\n"
        f"Vision: CLIP ViT-L/14-336, penultimate layer, 2-layer MLP projector. LLM: Vicuna-7B-shaped Llama "
        f"(32 layers, width 4096, vocabulary 32000). Batch 1, one image (576 visual tokens), {args.text_tokens} text "
        "tokens. Combiner defaults unless stated: width D = 4096 (32 heads), 1 fusion layer, latent resampling, "
        "weighted combination, gates on, weights shared across iterations.\n"
    )
    report = header + "\n" + run(args.text_tokens)
    sys.stdout.write(report + "\n")
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(report + "\n")


if __name__ == "__main__":
    main()
