"""CPU costs at the real encoder sizes: COMM, M3 and the combiner against transformers' Llava, time and memory.

The vision encoders are the published ones (CLIP ViT-L/14-336, and DINOv2-L at 336 px for COMM, from
`tests/fixtures/published_configs/`), random weights; the LLM is a small random Llama (width 1024, 2 layers,
Vicuna's 32064-token vocabulary), so the encoders dominate the cost as they would not at 7B, where the LLM does.
One image and 30 text tokens per sample (576 visual tokens for LLaVA/COMM, S for M3, 64 fused for the combiner).

Table 1, time (fp32, batch 1, interleaved ABAB..., median and min; the min is the uncontended cost on a shared host):
  * prefill (`logits_to_keep=1`, eval, `inference_mode`); M3 at every scale (the same weights as LLaVA);
  * one training step: forward + backward + AdamW (fused) on the stage-2 trainables, encoders frozen
    (`comm_instruct`, `llava_instruct` for LLaVA and M3, `combiner`); M3 with the loss over all five scales.
  Outputs are asserted equal first: our LLaVA layout and M3 at 576 against transformers' Llava on the same weights.

Table 2, COMM against its bound: LLaVA's time + DINOv2-L's forward (no grad: it is frozen) + the MFM's share, the
multi-level merges and aligners timed at LLaVA's measured FLOP rate (their FLOPs / LLaVA's FLOPs x LLaVA's time).
Target: COMM <= 1.10 x bound.

Memory (table 1): the peak of live tensors (a `TorchDispatchMode` that tracks every storage an op allocates, freed
by weak references; valid for torch, unlike `tracemalloc`) over each workload, steady state for training (second
step; gradients kept allocated, `zero_grad(set_to_none=False)`, so the peak is the activations); and in the full run
the resident-set peak of the same workload in a fresh subprocess (`VmHWM` after resetting it through
`/proc/self/clear_refs`, minus `VmRSS` before). The kept hidden states of COMM's encoders (CLIP 1-24, DINOv2 19-24)
are compared with 30 layers x 577 tokens x 1024 x 4 bytes per image.

Table 3, `memory_model.py` predicted against the measured activation peak of each training step here; table 4,
that model's predictions for the 7B builds (bf16 mixed precision, 80 GB GPUs).

Run: `PYTHONPATH=src python benchmarks/bench_scale.py [--quick] [--threads N] [--output results_scale.md]`.
`--quick` shrinks the encoders to 2 layers of width 64 and the LLM to 1 layer of width 128 (seconds).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from bench_matryoshka import count_flops
from bench_utils import cpu_name, interleaved_times, load_published_configs
from memory_model import Precision, activation_bytes, build_shape, prediction_table
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from comm_vlm.families import get_family
from comm_vlm.training.stages import apply_stage


TEXT_TOKENS, ANSWER_TOKENS, SCALES = 30, 8, (576, 144, 36, 9, 1)
MODELS = ("llava-hf", "llava", "comm", "m3", "combiner")
FAMILY = {"llava": "comm", "comm": "comm", "m3": "matryoshka_llava", "combiner": "adaptive_combiner"}
STAGE = {
    "llava-hf": "llava_instruct",
    "llava": "llava_instruct",
    "comm": "comm_instruct",
    "m3": "llava_instruct",
    "combiner": "combiner",
}


def sizes(quick: bool) -> dict[str, Any]:
    """LLM and encoder overrides: the real encoders with a small LLM, or everything small (`--quick`)."""
    if quick:
        llm = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 1, "num_attention_heads": 2}
        vision = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2}
        return {"llm": llm, "vision": vision, "vocab": 512, "layers": 2}
    llm = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 2, "num_attention_heads": 16}
    return {"llm": llm, "vision": {}, "vocab": 32064, "layers": 24}


def text_config(size: dict[str, Any]) -> LlamaConfig:
    llm = size["llm"]
    return LlamaConfig(
        vocab_size=size["vocab"],
        num_key_value_heads=llm["num_attention_heads"],
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **llm,
    )


def build_configs(quick: bool) -> dict[str, Any]:
    """Configs of every model here (LLaVA-1.5 and COMM-7B's encoders, the small LLM)."""
    published = load_published_configs()
    size = sizes(quick)
    clip = published.load_vision_config(published.CLIP_L_336, **size["vision"])
    dino = published.load_vision_config(published.DINOV2_L, image_size=published.COMM_IMAGE_SIZE, **size["vision"])
    llava_fields = {**published.llava_15_branch(), "vision_config": clip, "text_config": text_config(size)}
    image_token = llava_fields["image_token_index"]
    if image_token >= size["vocab"]:
        image_token = llava_fields["image_token_index"] = size["vocab"] - 1
    layers = size["layers"]
    comm_fields = {"vision_config": clip, "secondary_vision_config": dino, "text_config": text_config(size)}
    comm_fields["image_token_index"] = image_token
    if quick:
        comm_fields |= {"vision_feature_layer": list(range(1, layers + 1)), "secondary_vision_feature_layer": [layers]}
    branch = {"vision_config": clip, "text_config": text_config(size), "image_token_index": image_token}
    return {
        "llava-hf": LlavaConfig(
            vision_config=clip.to_dict(),
            text_config=text_config(size).to_dict(),
            image_token_index=image_token,
            image_seq_length=576,
            projector_hidden_act="gelu",
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        ),
        "llava": get_family("comm").config_class(**llava_fields),
        "comm": get_family("comm").config_class(**comm_fields),
        "m3": get_family("matryoshka_llava").config_class(**branch),
        "combiner": get_family("adaptive_combiner").config_class(**branch),
    }


def build_model(name: str, config: Any, reference: torch.nn.Module | None = None) -> torch.nn.Module:
    """Model `name`, random weights (seed 0); LLaVA-layout models load `reference`'s weights when given."""
    torch.manual_seed(0)
    if name == "llava-hf":
        model = LlavaForConditionalGeneration(config)
    else:
        model = get_family(FAMILY[name]).model_class(config)
    if reference is not None:
        model.load_state_dict(reference.state_dict(), strict=True)
    return model


def image_tokens(name: str, config: Any, scale: int = 576) -> int:
    if name == "combiner":
        return config.combiner_num_latents
    return scale if name == "m3" else 576


def make_inputs(name: str, config: Any, labels: bool, scale: int = 576) -> dict[str, torch.Tensor]:
    """<s>, the image's placeholders, TEXT_TOKENS - 1 text tokens; labels on the last ANSWER_TOKENS."""
    gen = torch.Generator().manual_seed(0)
    image_token = config.image_token_index
    vocab = config.text_config.vocab_size
    text = torch.randint(5, image_token if image_token > vocab // 2 else vocab, (1, TEXT_TOKENS - 1), generator=gen)
    ids = torch.cat(
        [torch.ones(1, 1, dtype=torch.long), torch.full((1, image_tokens(name, config, scale)), image_token), text], 1
    )
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out["pixel_values"] = torch.randn(1, 3, 336, 336, generator=gen)
    if labels:
        out["labels"] = torch.full_like(ids, -100)
        out["labels"][:, -ANSWER_TOKENS:] = ids[:, -ANSWER_TOKENS:]
    return out


def freeze(name: str, model: torch.nn.Module) -> None:
    """Stage-2 trainables; transformers' Llava by its own module names (vision tower frozen)."""
    if name == "llava-hf":
        for param in model.model.vision_tower.parameters():
            param.requires_grad_(False)
    else:
        apply_stage(model, STAGE[name])


class PeakTensorMemory(TorchDispatchMode):
    """Bytes of live tensor storages allocated by ops run under the mode; `peak` is their high-water mark.

    Storages that an op returns but that one of its inputs already holds (views, in-place ops) are not counted;
    tensors that existed before the mode (weights, optimizer states) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self.live or storage.data_ptr() in inputs or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)


def tensor_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors allocated while `fn` runs (its result is dropped inside)."""
    gc.collect()
    with PeakTensorMemory() as tracker:
        fn()
        gc.collect()
    return tracker.peak


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def workloads(name: str, model: torch.nn.Module, config: Any) -> dict[str, Callable[[], object]]:
    """Named callables of one model: prefill (M3: per scale) and one training step."""
    prefill = {}
    for scale in SCALES if name == "m3" else (576,):
        inputs = make_inputs(name, config, labels=False, scale=scale)
        kwargs = {"matryoshka_scale": scale} if name == "m3" else {}

        def run(inputs=inputs, kwargs=kwargs) -> torch.Tensor:
            model.eval()
            with torch.inference_mode():
                return model(**inputs, **kwargs, logits_to_keep=1).logits

        prefill[f"prefill {scale}" if name == "m3" else "prefill"] = run
    batch = make_inputs(name, config, labels=True)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=True)

    def step() -> torch.Tensor:
        model.train()
        optimizer.zero_grad(set_to_none=False)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return {**prefill, "train step": step}


def measure_rss(name: str, workload: str, quick: bool) -> float:
    """Resident-set peak (MiB) of `workload` in a fresh subprocess; training: the second step."""
    args = [sys.executable, __file__, "--measure", name, workload] + (["--quick"] if quick else [])
    result = subprocess.run(
        args, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["rss_mib"]


def measure_main(name: str, workload: str, quick: bool) -> None:
    """Subprocess entry point: build, warm up (training: one step), reset VmHWM, run once, print the delta."""
    torch.set_num_threads(1)
    config = build_configs(quick)[name]
    model = build_model(name, config)
    freeze(name, model)
    fn = workloads(name, model, config)[workload]
    if workload == "train step":
        fn()
    gc.collect()
    before = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    print(json.dumps({"rss_mib": (rss_kib("VmHWM") - before) / 1024}))


def check_equal(models: dict[str, torch.nn.Module], configs: dict[str, Any]) -> str:
    """Our LLaVA layout and M3 at 576 give transformers' Llava's logits on the same weights."""
    inputs = make_inputs("llava", configs["llava"], labels=False)
    with torch.inference_mode():
        ref = models["llava-hf"].eval()(**inputs, logits_to_keep=1).logits
        ours = models["llava"].eval()(**inputs, logits_to_keep=1).logits
        m3 = models["m3"].eval()(**inputs, matryoshka_scale=576, logits_to_keep=1).logits
    diffs = {"llava": (ours - ref).abs().max().item(), "m3 at 576": (m3 - ref).abs().max().item()}
    for key, diff in diffs.items():
        assert diff < 1e-4, f"{key} logits differ from transformers' Llava by {diff}"
    return ", ".join(f"{key} vs llava-hf max abs logit diff {diff:.1e}" for key, diff in diffs.items())


def comm_parts(model: torch.nn.Module, config: Any) -> dict[str, Callable[[], object]]:
    """DINOv2-L's forward alone (frozen: no grad), and the MFM (merges + aligners) forward + backward."""
    inner = model.model
    pixels = make_inputs("comm", config, labels=False)["pixel_values"]
    prefixes = config.encoder_prefixes
    dino = inner.vision_towers[1]
    dino_pixels = inner._encoder_pixels(pixels, prefixes[1])
    with torch.no_grad():
        features = [
            inner._encode(t, inner._encoder_pixels(pixels, p), p) for t, p in zip(inner.vision_towers, prefixes)
        ]

    def dino_forward() -> torch.Tensor:
        with torch.no_grad():
            return dino(dino_pixels).last_hidden_state

    def mfm_step() -> None:
        inner.connector(features).sum().backward()

    def mfm_forward() -> torch.Tensor:
        with torch.inference_mode():
            return inner.connector(features)

    return {"dino forward": dino_forward, "mfm step": mfm_step, "mfm forward": mfm_forward}


def kept_states_memory(model: torch.nn.Module, config: Any) -> tuple[int, int, int, int]:
    """COMM's two encoders (no grad, one image): tensor peak with the merged layers kept, tensor peak with only the
    last hidden state, bytes of the kept layers returned, and their size by the formula (layers x tokens x width x 4
    B; (24 + 6) x 577 x 1024 x 4 at full size)."""
    inner = model.model
    pixels = make_inputs("comm", config, labels=False)["pixel_values"]
    prefixes = config.encoder_prefixes
    retained = []

    def kept() -> None:
        with torch.no_grad():
            outputs = [
                inner._encode(t, inner._encoder_pixels(pixels, p), p) for t, p in zip(inner.vision_towers, prefixes)
            ]
        retained.append(sum(x.untyped_storage().nbytes() for x in outputs))

    def last_only() -> None:
        with torch.no_grad():
            for tower, prefix in zip(inner.vision_towers, prefixes):
                tower(inner._encoder_pixels(pixels, prefix), output_hidden_states=False)

    layers = sum(len(config.branch(p)["layers"]) for p in prefixes)
    width = config.vision_config.hidden_size
    tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1
    return tensor_peak(kept), tensor_peak(last_only), retained[0], layers * tokens * width * 4


def mib(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def run(quick: bool, reps: int, warmup: int, rss: bool) -> str:
    configs = build_configs(quick)
    models = {"llava-hf": build_model("llava-hf", configs["llava-hf"])}
    models["llava"] = build_model("llava", configs["llava"], models["llava-hf"])
    models["m3"] = build_model("m3", configs["m3"], models["llava-hf"])
    models["comm"] = build_model("comm", configs["comm"])
    models["combiner"] = build_model("combiner", configs["combiner"])
    for name in ("llava", "m3", "combiner"):  # one frozen CLIP for the four LLaVA-branch models (same weights)
        models[name].model.vision_tower = models["llava-hf"].model.vision_tower
    for name, model in models.items():
        freeze(name, model)
    parity = check_equal(models, configs)
    fns = {}
    for name in MODELS:
        for workload, fn in workloads(name, models[name], configs[name]).items():
            fns[(name, workload)] = fn
    parts = comm_parts(models["comm"], configs["comm"])
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    trained = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()}

    # Counting FLOPs runs every workload once, so the training steps after it find AdamW's states allocated.
    flops = {key: count_flops(fn) for key, fn in fns.items()}
    flops.update({("comm", part): count_flops(fn) for part, fn in parts.items()})
    activation_peaks = {key: tensor_peak(fn) for key, fn in fns.items()}
    kept, last_only, retained, kept_bound = kept_states_memory(models["comm"], configs["comm"])
    rss_peaks = {key: measure_rss(key[0], key[1], quick) for key in fns} if rss else {}

    # Table 2's terms back to back in each round (the load of a shared host drifts over a round of all workloads).
    first = [("llava-hf", "prefill"), ("comm", "prefill"), ("llava-hf", "train step"), ("comm", "train step")]
    timed = {f"{name} | {workload}": fns[(name, workload)] for name, workload in first}
    timed.update({f"comm part | {part}": fn for part, fn in parts.items() if part != "mfm forward"})
    timed.update({f"{name} | {workload}": fn for (name, workload), fn in fns.items() if (name, workload) not in first})
    stats = interleaved_times(timed, reps, warmup)

    lines = [
        "## 1. Time and memory per workload (batch 1, fp32)",
        "",
        f"Parity: {parity}. Parameters (M), total / trained: "
        + ", ".join(f"{n} {params[n] / 1e6:,.1f} / {trained[n] / 1e6:,.1f}" for n in MODELS)
        + ".",
        "",
        "| model | workload | ms, median (min) | x llava-hf (min) | GFLOPs | tensor peak (MiB) | RSS peak, fresh "
        "process (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (name, workload), peak in activation_peaks.items():
        med, low = stats[f"{name} | {workload}"]
        base_workload = "prefill" if workload.startswith("prefill") else workload
        base = stats[f"llava-hf | {base_workload}"][1]
        gflops = f"{flops[(name, workload)] / 1e9:,.1f}" if (name, workload) in flops else "-"
        rss_cell = mib(rss_peaks[(name, workload)] * 2**20) if (name, workload) in rss_peaks else "-"
        lines.append(
            f"| {name} | {workload} | {med * 1e3:,.0f} ({low * 1e3:,.0f}) | {low / base:.2f} | {gflops} | "
            f"{mib(peak)} | {rss_cell} |"
        )
    lines += ["", "## 2. COMM against LLaVA + DINOv2-L's forward + the MFM's FLOPs share (target <= 1.10)", ""]
    lines += [
        "| workload | COMM ms (min) | LLaVA ms (min) | DINOv2-L forward ms (min) | MFM FLOPs / LLaVA FLOPs | bound ms "
        "| COMM / bound (min) | COMM / bound (median) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    dino = stats["comm part | dino forward"]
    for workload, mfm_key in (("prefill", "mfm forward"), ("train step", "mfm step")):
        comm, llava = stats[f"comm | {workload}"], stats[f"llava-hf | {workload}"]
        share = flops[("comm", mfm_key)] / flops[("llava-hf", workload)]
        bound_min = llava[1] + dino[1] + share * llava[1]
        bound_med = llava[0] + dino[0] + share * llava[0]
        lines.append(
            f"| {workload} | {comm[1] * 1e3:,.0f} | {llava[1] * 1e3:,.0f} | {dino[1] * 1e3:,.0f} | {share:.3f} | "
            f"{bound_min * 1e3:,.0f} | {comm[1] / bound_min:.2f} | {comm[0] / bound_med:.2f} |"
        )
    lines += [
        "",
        f"Kept hidden states (COMM's two encoders, no grad, one image): the merged layers, as returned, hold "
        f"{mib(retained)} MiB against their size by the formula {mib(kept_bound)} MiB (layers x 577 tokens x width x "
        f"4 B; ratio {retained / kept_bound:.2f}); tensor peak of encoding {mib(kept)} MiB with them kept vs "
        f"{mib(last_only)} MiB with only the last hidden state: +{mib(kept - last_only)} MiB "
        f"({(kept - last_only) / kept_bound:.2f} x the formula).",
    ]
    lines += ["", "## 3. Memory model against the measured training step (activations, fp32)", ""]
    lines += [
        "| model | predicted activations (MiB) | measured tensor peak (MiB) | measured / predicted |",
        "|---|---:|---:|---:|",
    ]
    for name in MODELS[1:]:
        shape = build_shape(name, models[name], TEXT_TOKENS, STAGE[name])
        shape.llm_tokens = _llm_tokens(name, configs[name])
        predicted = activation_bytes(shape, Precision.fp32().activation, checkpointing=False)
        measured = activation_peaks[(name, "train step")]
        lines.append(f"| {name} | {mib(predicted)} | {mib(measured)} | {measured / predicted:.2f} |")
    return "\n".join(lines)


def _llm_tokens(name: str, config: Any) -> int:
    """LLM tokens of the training sample here (M3: the packed rows of every scale, as the model lays them on CPU)."""
    if name != "m3":
        return 1 + image_tokens(name, config) + TEXT_TOKENS - 1
    from comm_vlm.models.packing_matryoshka import build_training_scale_batch

    batch = make_inputs(name, config, labels=True)
    rows = build_training_scale_batch(config, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return int(rows.rows[:, 0].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small encoders and LLM, 1 repetition (seconds)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3, --quick 1)")
    parser.add_argument("--no-rss", action="store_true", help="skip the fresh-process RSS peaks (on by default)")
    parser.add_argument("--output", default="", help="also write the report (Markdown) here")
    parser.add_argument("--measure", nargs=2, metavar=("MODEL", "WORKLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    if args.measure:
        measure_main(*args.measure, args.quick)
        return
    torch.set_num_threads(args.threads)
    reps = args.reps or (1 if args.quick else 3)
    warmup = 0  # the FLOP-counting and memory passes have run every workload twice before the timed ones
    size = sizes(args.quick)
    header = (
        f"{datetime.datetime.now().isoformat(timespec='seconds')} | {cpu_name()} | nproc "
        f"{len(os.sched_getaffinity(0))} | torch threads {torch.get_num_threads()} | torch {torch.__version__} | "
        f"transformers {transformers.__version__} | python {platform.python_version()} | {reps} reps, {warmup} "
        f"warm-up | load avg {os.getloadavg()[0]:.2f}\n\n"
        f"Encoders: {'CLIP-L/14-336 and DINOv2-L at 336 px (published configs)' if not args.quick else size['vision']}"
        f"; LLM: Llama {size['llm']}, vocab {size['vocab']} (small on purpose: the encoders dominate here, the LLM "
        f"dominates at 7B); {TEXT_TOKENS} text tokens, labels on the last {ANSWER_TOKENS}.\n"
    )
    print(header)
    body = run(args.quick, reps, warmup, rss=not (args.quick or args.no_rss))
    footer = f"\nload avg at end {os.getloadavg()[0]:.2f} (1 min)"
    print(body + "\n" + footer)
    body += "\n\n## 4. Memory model at 7B (`memory_model.py`): one stage-2 training step\n\n" + prediction_table()
    print(body[body.index("## 4.") :])
    if args.output:
        Path(args.output).write_text("# Real-size costs on CPU\n\n" + header + "\n" + body + "\n" + footer + "\n")


if __name__ == "__main__":
    main()
