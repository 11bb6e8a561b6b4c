"""CPU benchmark of Matryoshka-LLaVA (M3, Cai et al. 2024): all-scale training cost and prefill speed per scale.

Sizes where the LLM dominates: a narrow CLIP tower (width 64, 2 layers) at 336 px / patch 14, so the real 24x24 grid
and the paper's scales {1, 9, 36, 144, 576} apply; a Llama LLM of width 512 and 4 layers (vocab 320). Prompts follow
LLaVA-1.5's short-answer VQA turns: a 35-token prefix (system prompt + "USER:"), the image, a 25-token suffix
(question, "ASSISTANT:", a 6-token answer + EOS); labels on the answer only, as in LLaVA training.

Table 1, one training step (forward + backward, fp32, batch 2 samples, `train()` mode), interleaved medians:
  * single scale 576: the LLaVA-1.5 step (the model's loss at `matryoshka_scale=576`);
  * all scales, packed `split` (the `auto` choice on CPU): per sample a plain full-grid row and one packed row with
    the other scales (shared prefix, 4D mask), run as two trimmed LLM calls;
  * all scales, packed `one_row` (the `auto` choice on GPU): every scale of a sample in one packed row, one LLM call
    (attention dense over the row);
  * all scales, padded rows: one LLM call on B x M rows padded to the longest (the naive batching);
  * M sequential passes: one forward + backward per scale (vision tower re-run each time).
The losses of the three all-scale variants are checked equal (1e-5). FLOPs from `FlopCounterMode` (forward +
backward; CPU SDPA kernels counted like the CUDA flash kernel, dense over the whole mask).

Table 2, prefill (`logits_to_keep=1`, eval, `inference_mode`, batch 4) at every scale: time, FLOPs, and
speedup / FLOPs ratio relative to 576 tokens, for the LLM prefill (image features encoded beforehand, as `generate`
does and as the paper's roofline analysis counts) and end to end (vision tower + projector on the 576 patches too).

Run: `PYTHONPATH=src python benchmarks/bench_matryoshka.py [--quick] [--threads N]`.
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
from torch.utils.flop_counter import FlopCounterMode

from comm_vlm import MatryoshkaLlavaConfig, MatryoshkaLlavaForConditionalGeneration
from comm_vlm.models.packing_matryoshka import build_scale_batch, build_training_scale_batch
from comm_vlm.testing import IMAGE_TOKEN_ID, tiny_text_config, tiny_vision_config


VOCAB, TRAIN_BATCH, PREFILL_BATCH = 320, 2, 4
PREFIX, QUESTION, ANSWER = 35, 18, 7  # suffix = question + "ASSISTANT:" (18) + answer incl. EOS (7) = 25
VISION = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 336,
    "patch_size": 14,
}
TEXT = tiny_text_config(VOCAB, hidden_size=512, num_layers=4, max_position_embeddings=4096)  # Vicuna's positions
SETUP = {"device": torch.device("cpu"), "dtype": torch.float32}


def _sdpa_flops(query, key, value) -> int:
    """QK^T and AV matmuls of attention, dense over the whole (masked) score matrix; grouped-query aware."""
    (batch, heads, q_len, head_dim), key, value = (tuple(getattr(x, "shape", x)) for x in (query, key, value))
    return 2 * batch * heads * q_len * key[-2] * (head_dim + value[-1])


def _fwd_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _sdpa_flops(query, key, value)


def _bwd_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * _sdpa_flops(query, key, value)  # four matmuls (dQ, dK, dV, dP) vs two forward


# Every SDPA kernel counted with one formula (the CPU flash kernel has none in torch, and torch's own formulas reject
# grouped-query shapes): dense over the mask, so a packed row's masked blocks count as work, as they are on CPU.
_SDPA_OPS = [
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention",
]
FLOP_MAPPING = {}
for _name in _SDPA_OPS:
    if hasattr(torch.ops.aten, _name):
        FLOP_MAPPING[getattr(torch.ops.aten, _name)] = _fwd_flops
    if hasattr(torch.ops.aten, _name + "_backward"):
        FLOP_MAPPING[getattr(torch.ops.aten, _name + "_backward")] = _bwd_flops


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False, custom_mapping=FLOP_MAPPING) as counter:
        fn()
    return counter.get_total_flops()


def _sync() -> None:
    if SETUP["device"].type == "cuda":
        torch.cuda.synchronize()


def build_model() -> MatryoshkaLlavaForConditionalGeneration:
    torch.manual_seed(0)
    config = MatryoshkaLlavaConfig(
        vision_config=tiny_vision_config(**VISION), text_config=TEXT, image_token_index=IMAGE_TOKEN_ID
    )
    return MatryoshkaLlavaForConditionalGeneration(config).to(**SETUP)


def make_batch(batch: int, scale: int, with_labels: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """`batch` prompts: PREFIX text tokens, `scale` placeholders, QUESTION + ANSWER tokens; one image each."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(IMAGE_TOKEN_ID + 1, VOCAB, (batch, PREFIX + QUESTION + ANSWER), generator=gen)
    input_ids = torch.cat([text[:, :PREFIX], torch.full((batch, scale), IMAGE_TOKEN_ID), text[:, PREFIX:]], dim=1)
    if not with_labels:
        input_ids = input_ids[:, :-ANSWER]
    out = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch, 3, VISION["image_size"], VISION["image_size"], generator=gen),
    }
    if with_labels:
        labels = torch.full_like(input_ids, -100)
        labels[:, -ANSWER:] = input_ids[:, -ANSWER:]
        out["labels"] = labels
    out = {k: v.to(SETUP["device"]) for k, v in out.items()}
    out["pixel_values"] = out["pixel_values"].to(SETUP["dtype"])
    return out


SPLIT = "all scales, packed: split (full-grid row + packed row)"
ONE_ROW = "all scales, packed: one_row (one row per sample)"


def bench_training(reps: int, warmup: int) -> str:
    model = build_model().train()
    scales = model.config.matryoshka_scales
    batch = make_batch(TRAIN_BATCH, 576, with_labels=True)
    padded = build_scale_batch(
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        IMAGE_TOKEN_ID,
        [[[s] for s in scales]] * TRAIN_BATCH,
        pad_token_id=TEXT["pad_token_id"],
        row_format="padded",
    )
    padded_inputs = {
        "input_ids": padded.input_ids,
        "attention_mask": padded.attention_mask,
        "labels": padded.labels,
        "pixel_values": batch["pixel_values"],
        "matryoshka_image_scales": padded.image_scales,
        "matryoshka_image_index": padded.image_index,
    }
    scale_batches = {}
    for packing in ("split", "one_row"):
        model.config.matryoshka_packing = packing
        scale_batches[packing] = build_training_scale_batch(
            model.config, batch["input_ids"], batch["attention_mask"], batch["labels"]
        )
    auto = "split" if SETUP["device"].type == "cpu" else "one_row"

    def step(packing: str = "auto", **kwargs) -> torch.Tensor:
        model.config.matryoshka_packing = packing
        model.zero_grad(set_to_none=True)
        loss = model(**kwargs).loss
        loss.backward()
        return loss.detach()

    def sequential() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        total = 0.0
        for scale in scales:
            loss = model(**batch, matryoshka_scale=scale).loss / len(scales)
            loss.backward()
            total += loss.detach()
        return total

    fns = {
        "single scale 576 (LLaVA-1.5 step)": lambda: step(**batch, matryoshka_scale=576),
        SPLIT: lambda: step("split", **batch),
        ONE_ROW: lambda: step("one_row", **batch),
        "all scales, padded B*M rows": lambda: step(**padded_inputs),
        "all scales, M sequential passes": sequential,
    }
    losses = {name: float(fn()) for name, fn in fns.items()}
    ref = losses["all scales, M sequential passes"]
    tolerance = 1e-5 if SETUP["dtype"] == torch.float32 else 5e-2 * abs(ref)
    for name in list(fns)[1:]:
        assert abs(losses[name] - ref) < tolerance, f"{name}: loss {losses[name]} != sequential {ref}"
    flops = {name: count_flops(fn) for name, fn in fns.items()}
    stats = interleaved_times(fns, reps, warmup, sync=_sync)
    base = "single scale 576 (LLaVA-1.5 step)"
    tokens = {
        base: TRAIN_BATCH * (PREFIX + 576 + QUESTION + ANSWER),
        SPLIT: int(scale_batches["split"].rows[:, 0].sum()),
        ONE_ROW: int(scale_batches["one_row"].rows[:, 0].sum()),
        "all scales, padded B*M rows": int(padded.input_ids.numel()),
        "all scales, M sequential passes": TRAIN_BATCH * sum(PREFIX + s + QUESTION + ANSWER for s in scales),
    }
    rows = [
        f"batch {TRAIN_BATCH} samples x (prefix {PREFIX} + image + suffix {QUESTION + ANSWER}); scales {scales}; "
        f"row lengths per sample: split {scale_batches['split'].rows[:2, 0].tolist()}, one_row "
        f"{scale_batches['one_row'].rows[:1, 0].tolist()}, padded {padded.input_ids.shape[1]} x {len(scales)}; "
        f"all-scale loss {losses[SPLIT]:.6f} (one_row {losses[ONE_ROW]:.6f}, "
        f"padded {losses['all scales, padded B*M rows']:.6f}, sequential mean {ref:.6f}); "
        f"`matryoshka_packing='auto'` uses {auto} on {SETUP['device'].type}",
        "",
        "| training step (fwd + bwd) | LLM tokens | ms, median (min) | x single (median) | x single (min) | "
        "GFLOPs | FLOPs x single |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in fns:
        med, low = stats[name]
        rows.append(
            f"| {name} | {tokens[name]} | {med * 1e3:.0f} ({low * 1e3:.0f}) | {med / stats[base][0]:.2f} | "
            f"{low / stats[base][1]:.2f} | {flops[name] / 1e9:.1f} | {flops[name] / flops[base]:.2f} |"
        )
    packed_name, seq_name = SPLIT if auto == "split" else ONE_ROW, "all scales, M sequential passes"
    rows += [
        "",
        f"all-scale ({auto}, the default here) / single-scale step: "
        f"{stats[packed_name][0] / stats[base][0]:.2f}x median, "
        f"{stats[packed_name][1] / stats[base][1]:.2f}x min (target <= 1.5); vs M sequential passes: "
        f"{stats[packed_name][0] / stats[seq_name][0]:.2f}x median; token ratio "
        f"{tokens[packed_name] / tokens[base]:.2f}",
    ]
    return "\n".join(rows)


def bench_prefill(reps: int, warmup: int) -> str:
    model = build_model().eval()
    scales = sorted(model.config.matryoshka_scales, reverse=True)
    inputs = {s: make_batch(PREFILL_BATCH, s, with_labels=False) for s in scales}
    # LLM prefill as `generate` runs it: images encoded (and pooled) beforehand, passed as `mm_encoder_outputs`
    encoded = {s: model.get_image_features(inputs[s]["pixel_values"], matryoshka_scale=s) for s in scales}
    llm = {
        s: {"input_ids": inputs[s]["input_ids"], "attention_mask": inputs[s]["attention_mask"],
            "mm_encoder_outputs": {"image": encoded[s]}}
        for s in scales
    }  # fmt: skip
    fns = {("llm", s): (lambda s=s: model(**llm[s], logits_to_keep=1)) for s in scales}
    fns.update({("e2e", s): (lambda s=s: model(**inputs[s], logits_to_keep=1)) for s in scales})
    flops = {key: count_flops(fn) for key, fn in fns.items()}
    stats = interleaved_times(fns, reps, warmup, sync=_sync)
    rows = [
        f"batch {PREFILL_BATCH}, prompt = {PREFIX} + S + {QUESTION} tokens. LLM prefill: image features encoded "
        "beforehand (as `generate` does); end to end: + vision tower and projector on the 576 patches.",
        "",
        "| visual tokens S | prompt tokens | LLM prefill ms, median (min) | GFLOPs | FLOPs ratio 576/S | speedup "
        "576/S (median) | speedup / FLOPs ratio: median (min) | end to end ms, median (min) | GFLOPs | end to end "
        "speedup / FLOPs ratio: median (min) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary = {}
    for s in scales:
        cells = []
        for kind in ("llm", "e2e"):
            (med, low), base = stats[(kind, s)], stats[(kind, 576)]
            ratio = flops[(kind, 576)] / flops[(kind, s)]
            speed, speed_min = base[0] / med, base[1] / low
            summary[(kind, s)] = (speed, ratio)
            cells.append((med, low, flops[(kind, s)] / 1e9, ratio, speed, speed / ratio, speed_min / ratio))
        (lm, ll, lf, lr, ls, le, lem), (em, el, ef, _, _, ee, eem) = cells
        rows.append(
            f"| {s} | {inputs[s]['input_ids'].shape[1]} | {lm * 1e3:.1f} ({ll * 1e3:.1f}) | {lf:.2f} | {lr:.2f} | "
            f"{ls:.2f} | {le:.2f} ({lem:.2f}) | {em * 1e3:.1f} ({el * 1e3:.1f}) | {ef:.2f} | {ee:.2f} ({eem:.2f}) |"
        )
    (ls9, lr9), (es9, er9) = summary[("llm", 9)], summary[("e2e", 9)]
    rows += [
        "",
        f"S=9 vs 576, LLM prefill: speedup {ls9:.2f}x for a FLOPs ratio of {lr9:.2f}x -> {ls9 / lr9:.2f} of it "
        f"(target >= 0.8); end to end: {es9:.2f}x for {er9:.2f}x -> {es9 / er9:.2f}",
    ]
    return "\n".join(rows)


def main() -> None:
    global TRAIN_BATCH, PREFILL_BATCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions, 1 warm-up (default 7 and 2)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    parser.add_argument("--device", default="cpu", help="cpu (the recorded benchmark) or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--llm-width", type=int, default=512)
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--train-batch", type=int, default=TRAIN_BATCH)
    parser.add_argument("--prefill-batch", type=int, default=PREFILL_BATCH)
    args = parser.parse_args()
    TRAIN_BATCH, PREFILL_BATCH = args.train_batch, args.prefill_batch
    reps, warmup = (3, 1) if args.quick else (7, 2)
    torch.set_num_threads(args.threads)
    SETUP.update(device=torch.device(args.device), dtype=getattr(torch, args.dtype))
    heads = max(4, args.llm_width // 128)  # head dim 128 (4 heads at width 512, as tiny_text_config)
    TEXT.update(
        tiny_text_config(
            VOCAB,
            hidden_size=args.llm_width,
            num_layers=args.llm_layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            max_position_embeddings=4096,
        )
    )
    device_name = torch.cuda.get_device_name() if SETUP["device"].type == "cuda" else cpu_name()
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    print(
        f"{stamp} | {device_name} | nproc {len(os.sched_getaffinity(0))} | torch threads {torch.get_num_threads()} | "
        f"torch {torch.__version__} | transformers {transformers.__version__} | python {platform.python_version()} | "
        f"{args.dtype} on {args.device} | {reps} reps, {warmup} warm-up(s) | load avg {os.getloadavg()[0]:.2f}"
    )
    print(
        f"sizes: CLIP width {VISION['hidden_size']} x {VISION['num_hidden_layers']} layers, {VISION['image_size']} px "
        f"/ patch {VISION['patch_size']} (24x24 = 576 tokens); Llama width {TEXT['hidden_size']} x "
        f"{TEXT['num_hidden_layers']} layers (MLP {TEXT['intermediate_size']}), vocab {VOCAB}\n"
    )
    print("## 1. Training step: all-scale loss vs single scale (target <= 1.5x) and M sequential passes\n")
    print(bench_training(reps, warmup))
    print("\n## 2. Prefill time vs FLOPs per scale (target: speedup >= 0.8 x FLOPs ratio at S=9)\n")
    with torch.inference_mode():
        print(bench_prefill(reps, warmup))
    print(f"\nload avg at end {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
