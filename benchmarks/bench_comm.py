"""CPU benchmark of `CommForConditionalGeneration` (fp32, eval, `torch.inference_mode()`), random tiny weights.

Table 1, plain-LLaVA parity of speed: COMM in the "llava" layout vs transformers' `LlavaForConditionalGeneration`
loaded with the same state dict (logits and greedy generations are checked equal, so both time identical work);
batched forward and greedy `generate`, the two models interleaved (ABAB...) after warm-up, medians and ours/llava.

Table 2, MFM share of the vision branch: COMM layout (CLIP all layers LLN-Layerscale + DINOv2 last half
LLN-Layerscale + MLP aligner); time and FLOPs (`FlopCounterMode`, CPU flash attention added) of
`get_image_features` vs `connector` (merges + aligners) on precomputed `_encode` outputs.

Run: `PYTHONPATH=src python benchmarks/bench_comm.py [--quick] [--threads N]`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from collections.abc import Callable

import torch
import transformers
from bench_utils import cpu_name, interleaved_times
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import LlavaForConditionalGeneration

from comm_vlm import CommForConditionalGeneration
from comm_vlm.testing import IMAGE_TOKEN_ID, tiny_comm_config, tiny_llava_config, tiny_text_config, tiny_vision_config


VOCAB, BATCH, TEXT_TOKENS, NEW_TOKENS = 320, 4, 64, 16
VISION = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "image_size": 112,
    "patch_size": 14,
}
IMAGE_TOKENS = (VISION["image_size"] // VISION["patch_size"]) ** 2
TEXT = tiny_text_config(VOCAB, hidden_size=512, num_layers=4)  # intermediate 1024, 4 heads, 2 KV heads


def cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# CPU SDPA dispatches to an op that `FlopCounterMode` has no formula for: count it like the CUDA flash kernel.
FLOP_MAPPING = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_attention_flops}


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False, custom_mapping=FLOP_MAPPING) as counter:
        fn()
    return counter.get_total_flops()


def make_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """BATCH prompts: <s>, IMAGE_TOKENS placeholders, TEXT_TOKENS - 1 random text tokens; one image each."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.cat(
        [
            torch.ones(BATCH, 1, dtype=torch.long),
            torch.full((BATCH, IMAGE_TOKENS), IMAGE_TOKEN_ID),
            torch.randint(IMAGE_TOKEN_ID + 1, VOCAB, (BATCH, TEXT_TOKENS - 1), generator=gen),
        ],
        dim=1,
    )
    pixel_values = torch.randn(BATCH, 3, VISION["image_size"], VISION["image_size"], generator=gen)
    return {"input_ids": input_ids, "pixel_values": pixel_values, "attention_mask": torch.ones_like(input_ids)}


def bench_llava_parity(reps: int, warmup: int) -> str:
    torch.manual_seed(0)
    comm_config = tiny_comm_config("llava", VOCAB, vision_config=tiny_vision_config(**VISION), text_config=TEXT)
    comm = CommForConditionalGeneration(comm_config).eval()
    llava_config = tiny_llava_config(
        VOCAB, vision_config=tiny_vision_config(**VISION), text_config=TEXT, image_seq_length=IMAGE_TOKENS
    )
    llava = LlavaForConditionalGeneration(llava_config).eval()
    llava.load_state_dict(comm.state_dict(), strict=True)
    inputs = make_inputs()
    gen_kwargs = {"max_new_tokens": NEW_TOKENS, "do_sample": False}

    logits_diff = (comm(**inputs).logits - llava(**inputs).logits).abs().max().item()
    ours_ids, llava_ids = comm.generate(**inputs, **gen_kwargs), llava.generate(**inputs, **gen_kwargs)
    assert logits_diff == 0.0, f"logits differ: max abs diff {logits_diff}"
    assert torch.equal(ours_ids, llava_ids), "greedy generations differ"
    new_tokens = ours_ids.shape[1] - inputs["input_ids"].shape[1]

    fwd = interleaved_times({"ours": lambda: comm(**inputs), "llava": lambda: llava(**inputs)}, reps, warmup)
    gen = interleaved_times(
        {
            "ours": lambda: comm.generate(**inputs, **gen_kwargs),
            "llava": lambda: llava.generate(**inputs, **gen_kwargs),
        },
        reps,
        warmup,
    )
    seq = inputs["input_ids"].shape[1]
    rows = [
        "| workload | COMM llava-layout ms, median (min) | LlavaForConditionalGeneration ms, median (min) | "
        "ours/llava median | ours/llava min | identical work |",
        "|---|---:|---:|---:|---:|---|",
    ]
    workloads = [
        (f"forward, batch {BATCH} x {seq} tokens ({IMAGE_TOKENS} image)", fwd, f"logits max abs diff {logits_diff}"),
        (f"greedy generate, {new_tokens} new tokens", gen, f"token ids equal: {torch.equal(ours_ids, llava_ids)}"),
    ]
    for name, timed, check in workloads:
        ours, ref = timed["ours"], timed["llava"]
        rows.append(
            f"| {name} | {ours[0] * 1e3:.1f} ({ours[1] * 1e3:.1f}) | {ref[0] * 1e3:.1f} ({ref[1] * 1e3:.1f}) | "
            f"{ours[0] / ref[0]:.3f} | {ours[1] / ref[1]:.3f} | {check} |"
        )
    return "\n".join(rows)


def bench_mfm_share(reps: int, warmup: int) -> str:
    torch.manual_seed(0)
    layers = VISION["num_hidden_layers"]
    config = tiny_comm_config(
        "comm",
        VOCAB,
        vision_config=tiny_vision_config(**VISION),
        secondary_vision_config=tiny_vision_config("dinov2", **VISION),
        vision_feature_layer=list(range(1, layers + 1)),
        secondary_vision_feature_layer=list(range(layers // 2 + 1, layers + 1)),
        text_config=TEXT,
    )
    inner = CommForConditionalGeneration(config).eval().model
    pixel_values = make_inputs()["pixel_values"]

    def encode() -> list[torch.Tensor]:
        return [
            inner._encode(tower, inner._encoder_pixels(pixel_values, prefix), prefix)
            for tower, prefix in zip(inner.vision_towers, config.encoder_prefixes)
        ]

    layer_features = encode()
    merged = inner.connector(layer_features)
    reference = torch.stack(inner.get_image_features(pixel_values).pooler_output)  # the visual tokens
    assert torch.equal(inner.multi_modal_projector(merged), reference), "connector path differs from the branch"

    fns = {
        "vision branch: get_image_features": lambda: inner.get_image_features(pixel_values),
        "  encoders: _encode (CLIP + DINOv2)": encode,
        "  connector: merges + aligners (MFM)": lambda: inner.connector(layer_features),
        "  projector": lambda: inner.multi_modal_projector(merged),
    }
    flops = {name: count_flops(fn) for name, fn in fns.items()}
    stats = interleaved_times(fns, reps, warmup)
    times = {name: median for name, (median, _) in stats.items()}
    branch, mfm = "vision branch: get_image_features", "  connector: merges + aligners (MFM)"
    shapes = ", ".join(f"{p}: {tuple(f.shape)}" for p, f in zip(config.encoder_prefixes, layer_features))
    rows = [
        f"COMM layout, {BATCH} images, layer features (L, B, N, C) {shapes}",
        "",
        "| part | ms, median (min) | GFLOPs (FlopCounterMode) | time share (median) | FLOPs share |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in fns:
        rows.append(
            f"| {name} | {times[name] * 1e3:.2f} ({stats[name][1] * 1e3:.2f}) | {flops[name] / 1e9:.3f} | "
            f"{times[name] / times[branch]:.1%} | {flops[name] / flops[branch]:.1%} |"
        )
    time_share, flop_share = times[mfm] / times[branch], flops[mfm] / flops[branch]
    min_share = stats[mfm][1] / stats[branch][1]
    rows += [
        "",
        f"MFM time share {time_share:.1%} (from mins: {min_share:.1%}), MFM FLOPs share {flop_share:.1%}; "
        f"time share / FLOPs share = {time_share / flop_share:.2f} (from mins: {min_share / flop_share:.2f}), "
        "target <= 1.10",
    ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 repetitions, 1 warm-up (default 20 and 3)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    args = parser.parse_args()
    reps, warmup = (5, 1) if args.quick else (20, 3)
    torch.set_num_threads(args.threads)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    print(
        f"{stamp} | {cpu_name()} | nproc {len(os.sched_getaffinity(0))} | torch threads {torch.get_num_threads()} | "
        f"torch {torch.__version__} | transformers {transformers.__version__} | python {platform.python_version()} | "
        f"fp32, eval, inference_mode | {reps} reps, {warmup} warm-up(s) | load avg {os.getloadavg()[0]:.2f}"
    )
    print(
        f"sizes: vision width {VISION['hidden_size']} x {VISION['num_hidden_layers']} layers, "
        f"{VISION['image_size']} px / patch {VISION['patch_size']} ({IMAGE_TOKENS} tokens); LLM width "
        f"{TEXT['hidden_size']} x {TEXT['num_hidden_layers']} layers, vocab {VOCAB}\n"
    )
    with torch.inference_mode():
        print("## 1. Plain-LLaVA parity of speed (target ours/llava <= 1.05)\n")
        print(bench_llava_parity(reps, warmup))
        print("\n## 2. MFM share of vision-branch time vs FLOPs share (target ratio <= 1.10)\n")
        print(bench_mfm_share(reps, warmup))
    print(f"\nload avg at end {os.getloadavg()[0]:.2f} (1 min; this script alone adds about the thread count)")


if __name__ == "__main__":
    main()
