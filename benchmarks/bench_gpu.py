"""GPU benchmark at 7B: a stage-2 training step (tokens/s, MFU, peak memory), M3's prefill per scale, and generation.

One command on one H100/H200 (`python benchmarks/bench_gpu.py --device cuda`, sized for under 10 minutes): every
build of `tests/published_configs.py` at 7B (LLaVA-1.5-7B's layout, COMM-7B, M3, the adaptive combiner) and
transformers' `LlavaForConditionalGeneration` on llava-hf's config, random weights, built directly on the device
with bf16 as the default dtype (no fp32 copy). Each model is built once and run under every attention
implementation asked for: SDPA, plus `flash_attention_2` when `flash_attn` imports (`--attn` to choose).

* train: forward + backward + fused AdamW on the stage-2 trainables, encoders frozen (`llava_instruct`,
  `comm_instruct`, `combiner`; M3 with the loss over all five scales, rows packed as on GPU), activation checkpointing
  on (`--no-checkpointing` to turn it off), bf16 weights and AdamW states (8 B per trained parameter: the fp32-master
  recipe's 16 B do not fit one 80 GB GPU; `memory_model.py`). Tokens/s counts LLM tokens. MFU = model FLOPs / time /
  peak: 6 N T for trained parts (N their parameters without the input embedding, T the tokens each sees), 2 N T for
  the frozen encoders' forward, and attention 4 L h T^2 per sequence forward (x 3 for trained parts; dense over the
  sequence, as `FlopCounterMode` counts SDPA); checkpointing's recompute is NOT counted. The forward part of that
  formula is checked against `FlopCounterMode` on one forward (`fwd formula / counted`; the counter does not see
  flash-attn's kernels, so under `flash_attention_2` that ratio exceeds 1). Peak: bf16 H100/H200 dense
  989 TFLOP/s (detected from the device name; A100 312; `--peak-tflops` otherwise). Memory: the step's
  `torch.cuda.max_memory_allocated`, next to `memory_model.py`'s prediction for this precision.
* prefill: M3 at S = 576, 144, 36, 9, 1 visual tokens (`logits_to_keep=1`), prompt 1 + S + 29 tokens.
* generate: greedy, a fixed number of new tokens (`min_new_tokens = max_new_tokens`), our LLaVA layout and COMM
  against transformers' Llava (loaded with our LLaVA layout's weights; ids compared).

`--device cpu --size tiny` runs the same code on tiny models (2-layer encoders of width 32 at 336 px, a 2-layer Llama
of width 64) in seconds (`tests/test_bench_gpu.py`).

Run: `python benchmarks/bench_gpu.py --device cuda [--attn sdpa flash_attention_2] [--batch 4] [--output FILE]`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from bench_matryoshka import count_flops
from bench_utils import load_published_configs
from memory_model import GIB, Precision, build_shape, predict_peak
from transformers import LlavaForConditionalGeneration

from comm_vlm.families import get_family
from comm_vlm.models.packing_matryoshka import build_training_scale_batch
from comm_vlm.testing import tiny_comm_config, tiny_llava_config, tiny_text_config, tiny_vision_config
from comm_vlm.training.stages import apply_stage


MODELS = {  # name -> (family or None for transformers' Llava, published build, stage)
    "llava-hf": (None, None, "llava_instruct"),
    "llava": ("comm", "llava-1.5-7b", "llava_instruct"),
    "comm": ("comm", "comm-7b", "comm_instruct"),
    "m3": ("matryoshka_llava", "m3-llava-1.5-7b", "llava_instruct"),
    "combiner": ("adaptive_combiner", "combiner-llava-1.5-7b", "combiner"),
}
TRAINED_MODELS, GENERATE_MODELS = ("llava", "comm", "m3", "combiner"), ("llava-hf", "llava", "comm")
SCALES = (576, 144, 36, 9, 1)
TEXT_TOKENS, ANSWER_TOKENS = 30, 8
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0}
# bf16 weights, gradients and AdamW states: what this benchmark's step holds per trained parameter.
BF16_ADAMW = Precision("bf16 weights + bf16 AdamW", activation=2, frozen=2, trained=8)


def row_names(attns: list[str]) -> list[str]:
    """Every row the benchmark prints, `attn | workload | model` (the test checks them)."""
    names = []
    for attn in attns:
        names += [f"{attn} | train | {m}" for m in TRAINED_MODELS]
        names += [f"{attn} | prefill S={s} | m3" for s in SCALES]
        names += [f"{attn} | generate | {m}" for m in GENERATE_MODELS]
    return names


def tiny_configs() -> dict[str, Any]:
    """Tiny configs with the 7B builds' layouts: 336 px / patch 14 (the 24x24 grid M3 pools), small widths."""
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "image_size": 336, "patch_size": 14}
    text = tiny_text_config(320, hidden_size=64, num_layers=2, num_key_value_heads=4, max_position_embeddings=2048)
    clip, dino = tiny_vision_config(**vision), tiny_vision_config("dinov2", **vision)
    llava = {"vision_config": clip, "text_config": text}
    return {
        "llava-hf": tiny_llava_config(**llava),
        "llava": tiny_comm_config("llava", **llava),
        "comm": tiny_comm_config(
            "comm",
            **llava,
            secondary_vision_config=dino,
            vision_feature_layer=[1, 2],
            secondary_vision_feature_layer=[2],
        ),
        "m3": tiny_comm_config("llava", family="matryoshka_llava", **llava),
        "combiner": tiny_comm_config("llava", family="adaptive_combiner", **llava, combiner_num_latents=16),
    }


def published_configs() -> dict[str, Any]:
    """The 7B configs: the published builds, and llava-hf's own config for transformers' Llava."""
    published = load_published_configs()
    configs = {"llava-hf": published.load_published_config(published.LLAVA_15_7B)}
    for name, (_, build, _) in MODELS.items():
        if build is not None:
            configs[name] = published.published_build(build)
    return configs


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(name: str, config: Any, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights (seed 0), allocated on `device` in `dtype` from the start."""
    torch.manual_seed(0)
    family = MODELS[name][0]
    model_class = LlavaForConditionalGeneration if family is None else get_family(family).model_class
    with torch.device(device), default_dtype(dtype):
        model = model_class(config)
    return model.to(device=device, dtype=dtype)


def image_token_id(config: Any) -> int:
    return getattr(config, "image_token_id", None) or config.image_token_index


def make_batch(name: str, config: Any, batch: int, device: torch.device, dtype: torch.dtype, **kw) -> dict:
    """`batch` prompts: <s>, the image's placeholders, TEXT_TOKENS - 1 text tokens; labels on the last few."""
    scale, labels = kw.get("scale", 576), kw.get("labels", False)
    image_tokens = config.combiner_num_latents if name == "combiner" else scale
    gen = torch.Generator().manual_seed(0)
    image_id, vocab = image_token_id(config), config.text_config.vocab_size
    low, high = (image_id + 1, vocab) if image_id < vocab // 2 else (5, min(vocab, image_id))
    text = torch.randint(low, high, (batch, TEXT_TOKENS - 1), generator=gen)
    ids = torch.cat(
        [torch.ones(batch, 1, dtype=torch.long), torch.full((batch, image_tokens), image_token_id(config)), text], 1
    )
    size = config.vision_config.image_size
    out = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, size, size, generator=gen),
    }
    if labels:
        out["labels"] = torch.full_like(ids, -100)
        out["labels"][:, -ANSWER_TOKENS:] = ids[:, -ANSWER_TOKENS:]
    out = {k: v.to(device) for k, v in out.items()}
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def timed(fn: Callable[[], object], reps: int, device: torch.device) -> tuple[float, float]:
    """(median, min) seconds of `reps` calls after one warm-up, synchronising a GPU around each."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def _numel(module: torch.nn.Module | None, skip: tuple[str, ...] = ()) -> int:
    if module is None:
        return 0
    return sum(p.numel() for n, p in module.named_parameters() if not any(s in n for s in skip))


def llm_tokens(name: str, model: torch.nn.Module, batch: dict, device_type: str) -> list[int]:
    """LLM sequence lengths of the batch (M3 training: the packed rows of every scale, as laid out on the device)."""
    if name != "m3" or "labels" not in batch:
        return [batch["input_ids"].shape[1]] * batch["input_ids"].shape[0]
    rows = build_training_scale_batch(
        model.config,
        batch["input_ids"].cpu(),
        batch["attention_mask"].cpu(),
        batch["labels"].cpu(),
        device_type="cuda",
    )
    return [int(n) for n in rows.rows[:, 0]]


def forward_flops(name: str, model: torch.nn.Module, config: Any, sequences: list[int], images: int) -> dict:
    """Forward FLOPs by the formula, split into trained-side (`llm`, `branch`) and frozen encoder parts."""
    inner = model.model
    text = config.text_config
    llm = _numel(inner.language_model, ("embed_tokens",)) + _numel(model.lm_head)
    flops = {"llm": sum(2 * llm * t + 4 * text.num_hidden_layers * text.hidden_size * t * t for t in sequences)}
    encoders = 0
    for tower in (inner.vision_tower, getattr(inner, "secondary_vision_tower", None)):
        if tower is None:
            continue
        vision = tower.config
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        params = _numel(tower, ("position_embedding", "position_embeddings"))
        encoders += 2 * params * tokens + 4 * vision.num_hidden_layers * vision.hidden_size * tokens * tokens
    flops["encoders"] = images * encoders
    branch = 2 * 576 * (_numel(getattr(inner, "connector", None)) + _numel(inner.multi_modal_projector))
    combiner = getattr(inner, "combiner", None)
    if combiner is not None:
        latents, iterations = config.combiner_num_latents, config.combiner_iterations
        for pname, param in combiner.named_parameters():
            if "resampler.attn.k_proj" in pname or "resampler.attn.v_proj" in pname:
                tokens = 576 if pname.startswith("image") else TEXT_TOKENS
            elif pname.startswith("steps."):
                tokens = latents * (iterations if config.combiner_share_weights else 1)
            else:
                tokens = latents
            branch += 2 * param.numel() * tokens
    flops["branch"] = images * branch
    return flops


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def freeze(name: str, model: torch.nn.Module) -> None:
    if name == "llava-hf":
        for param in model.model.vision_tower.parameters():
            param.requires_grad_(False)
    else:
        apply_stage(model, MODELS[name][2])


class Bench:
    """Runs the workloads of one model under each attention implementation and collects table rows."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
        self.args, self.device, self.dtype = args, device, dtype
        self.rows: dict[str, str] = {}
        self.peak = peak_tflops(device, args.peak_tflops)

    def add(self, key: str, shape: str, stats: tuple[float, float], tokens: int, note: str = "", **cells: str) -> None:
        med, low = stats
        tflops = cells.get("tflops", "-")
        self.rows[key] = (
            f"| {key} | {shape} | {med * 1e3:,.1f} ({low * 1e3:,.1f}) | {tokens / low:,.0f} | {tflops} | "
            f"{cells.get('mfu', '-')} | {cells.get('peak', '-')} | {cells.get('predicted', '-')} | {note} |"
        )

    def set_attn(self, model: torch.nn.Module, attn: str) -> None:
        model.set_attn_implementation(attn)

    def run_model(self, name: str, model: torch.nn.Module, configs: dict, attn: str) -> None:
        """COMM: generate and train; M3: prefill per scale and train; the combiner: train. Each guarded."""

        def generate() -> None:
            self.set_attn(model, attn)
            self.generate({name: model}, configs, attn)

        def prefill() -> None:
            self.set_attn(model, attn)
            self.prefill(model, configs[name], attn)

        def train() -> None:
            self.set_attn(model, attn)
            self.train(name, model, configs[name], attn)

        if name == "comm":
            self.guarded([f"{attn} | generate | {name}"], generate)
        if name == "m3":
            self.guarded([f"{attn} | prefill S={s} | m3" for s in SCALES], prefill)
        self.guarded([f"{attn} | train | {name}"], train)

    def guarded(self, keys: list[str], fn: Callable[[], None]) -> None:
        """Runs `fn`; on a GPU an error (out of memory, an attention kernel the model refuses) becomes a row per key
        that says so, and the run goes on. On CPU (the tests) errors propagate."""
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - reported in the table, the other rows still run
            if self.device.type != "cuda":
                raise
            message = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
            for key in keys:
                self.rows.setdefault(key, f"| {key} | - | - | - | - | - | - | - | {message} |")
            gc.collect()
            torch.cuda.empty_cache()

    def train(self, name: str, model: torch.nn.Module, config: Any, attn: str) -> None:
        args, device = self.args, self.device
        freeze(name, model)
        if args.checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        batch = make_batch(name, config, args.batch, device, self.dtype, labels=True)
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=True)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            optimizer.step()

        if device.type == "cuda":
            step()  # AdamW's states exist before the peak is reset
            torch.cuda.reset_peak_memory_stats(device)
        stats = timed(step, args.reps, device)
        sequences = llm_tokens(name, model, batch, device.type)
        parts = forward_flops(name, model, config, sequences, args.batch)
        train_flops = 3 * (parts["llm"] + parts["branch"]) + parts["encoders"]
        cells = {"tflops": f"{train_flops / stats[1] / 1e12:,.2f}"}
        if self.peak:
            cells["mfu"] = f"{train_flops / stats[1] / (self.peak * 1e12):.1%}"
        if device.type == "cuda":
            cells["peak"] = f"{torch.cuda.max_memory_allocated(device) / GIB:,.1f}"
        shape = build_shape(name, model, TEXT_TOKENS, MODELS[name][2])
        shape.llm_tokens = sum(sequences) // args.batch
        cells["predicted"] = f"{predict_peak(shape, BF16_ADAMW, args.batch, args.checkpointing) / GIB:,.1f}"
        model.eval()
        with torch.no_grad():
            one = {k: v[:1] for k, v in batch.items() if k != "labels"}
            kwargs = {"matryoshka_scale": 576} if name == "m3" else {}
            counted = count_flops(lambda: model(**one, **kwargs))
        formula = forward_flops(name, model, config, [one["input_ids"].shape[1]], 1)
        note = f"fwd formula / counted {sum(formula.values()) / counted:.2f}; ckpt {args.checkpointing}"
        self.add(f"{attn} | train | {name}", f"{args.batch} x {max(sequences)}", stats, sum(sequences), note, **cells)
        if args.checkpointing:
            model.activation_checkpointing_disable()

    def prefill(self, model: torch.nn.Module, config: Any, attn: str) -> None:
        model.eval()
        base = None
        for scale in SCALES:
            batch = make_batch("m3", config, self.args.batch, self.device, self.dtype, scale=scale)

            def run(batch: dict = batch, scale: int = scale) -> None:
                with torch.inference_mode():
                    model(**batch, matryoshka_scale=scale, logits_to_keep=1)

            stats = timed(run, self.args.reps, self.device)
            base = base or stats[1]
            tokens = batch["input_ids"].numel()
            shape = f"{self.args.batch} x {batch['input_ids'].shape[1]}"
            self.add(f"{attn} | prefill S={scale} | m3", shape, stats, tokens, f"x{base / stats[1]:.2f} vs S=576")

    def generate(self, models: dict[str, torch.nn.Module], configs: dict, attn: str) -> None:
        new = self.args.new_tokens
        ids = {}
        for name, model in models.items():
            model.eval()
            batch = make_batch(name, configs[name], self.args.batch, self.device, self.dtype)
            kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False}

            def run(batch: dict = batch, model: torch.nn.Module = model, kwargs: dict = kwargs) -> torch.Tensor:
                with torch.inference_mode():
                    return model.generate(**batch, **kwargs)

            ids[name] = run()
            note = ""
            if name == "llava" and "llava-hf" in ids:
                equal = torch.equal(ids[name], ids["llava-hf"])
                # fp32 must match exactly; bf16 kernels may reorder sums, so there it is reported, not asserted.
                assert equal or self.dtype != torch.float32, "our LLaVA layout generates other ids than llava-hf"
                note = f"ids equal to llava-hf: {equal}"
            stats = timed(run, self.args.reps, self.device)
            shape = f"{self.args.batch} x ({batch['input_ids'].shape[1]} + {new})"
            self.add(f"{attn} | generate | {name}", shape, stats, self.args.batch * new, note)


def free(*models: torch.nn.Module) -> None:
    for model in models:
        model.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    configs = tiny_configs() if args.size == "tiny" else published_configs()
    bench = Bench(args, device, dtype)
    # Generation: transformers' Llava and our LLaVA layout on the same weights, then COMM.
    reference = build("llava-hf", configs["llava-hf"], device, dtype)
    llava = build("llava", configs["llava"], device, dtype)
    llava.load_state_dict(reference.state_dict(), strict=True)
    for attn in args.attn:

        def generate(attn: str = attn) -> None:
            for model in (reference, llava):
                bench.set_attn(model, attn)
            bench.generate({"llava-hf": reference, "llava": llava}, configs, attn)

        bench.guarded([f"{attn} | generate | {m}" for m in ("llava-hf", "llava")], generate)
    free(reference)
    for attn in args.attn:

        def train(attn: str = attn) -> None:
            bench.set_attn(llava, attn)
            bench.train("llava", llava, configs["llava"], attn)

        bench.guarded([f"{attn} | train | llava"], train)
    free(llava)
    for name in ("comm", "m3", "combiner"):
        model = build(name, configs[name], device, dtype)
        for attn in args.attn:
            bench.run_model(name, model, configs, attn)
        free(model)
    header = [
        "| attn | workload | model | batch x tokens | ms, median (min) | tokens/s (min) | TFLOP/s (min) | MFU | "
        "peak GiB | predicted GiB | note |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    missing = [key for key in row_names(args.attn) if key not in bench.rows]
    assert not missing, f"rows not run: {missing}"
    return "\n".join(header + [bench.rows[key] for key in row_names(args.attn)])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=("7b", "tiny"), default=None, help="default: 7b on cuda, tiny on cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--attn", nargs="+", default=None, help="default: sdpa, + flash_attention_2 if installed")
    parser.add_argument("--batch", type=int, default=None, help="per-step batch (default: 4 at 7b, 2 tiny)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default: 64 at 7b, 8 tiny)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak (default: from the GPU)")
    parser.add_argument("--output", default="", help="also write the report (Markdown) here")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.size = args.size or ("7b" if cuda else "tiny")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.batch = args.batch or (4 if args.size == "7b" else 2)
    args.new_tokens = args.new_tokens or (64 if args.size == "7b" else 8)
    if args.attn is None:
        args.attn = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    transformers.logging.set_verbosity_error()
    device_name = torch.cuda.get_device_name(args.device) if cuda else platform.processor() or "cpu"
    peak = peak_tflops(torch.device(args.device), args.peak_tflops)
    header = (
        f"{datetime.datetime.now().isoformat(timespec='seconds')} | {device_name} | torch {torch.__version__} | "
        f"transformers {transformers.__version__} | python {platform.python_version()} | size {args.size} | "
        f"{args.dtype} | batch {args.batch} | attn {args.attn} | peak {peak} "
        f"TFLOP/s | load avg {os.getloadavg()[0]:.2f}\n"
    )
    print(header)
    table = run(args)
    print(table)
    if args.output:
        Path(args.output).write_text("# GPU benchmark\n\n" + header + "\n" + table + "\n")
    return table


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
