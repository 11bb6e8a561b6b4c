"""A memory model of one training step of every family: model states, activations, and what fits on one GPU.

Predicted peak of a training step, per device, for a model whose parameters split into trained (`N_t`) and frozen
(`N_f`) parts (`comm_vlm.training.stages`):

    peak = model states + batch x (LLM activations + vision-branch activations) + LM head and loss

Model states, bf16 mixed precision as DeepSpeed does it (the ZeRO paper's accounting): a trained parameter costs 2
(bf16 weight) + 2 (bf16 gradient) + 12 bytes (fp32 master weight, AdamW's m and v), a frozen one 2 bytes (bf16 weight,
no gradient, no state): 16 N_t + 2 N_f. `Trainer(bf16=True)` without DeepSpeed on an fp32 model holds the same 16 B per
trained parameter (fp32 weight, gradient, m, v) and autocast's bf16 weight copies besides. `Precision.fp32()` is the
CPU check's plain fp32 (4 + 4 + 8 = 16 bytes per trained parameter). ZeRO-3 over `shards` devices divides all of it;
ZeRO-2 divides the gradients and optimizer states but keeps every bf16 weight.

Activations are the tensors autograd saves for backward, per token, derived op by op from transformers' Llama
(`LlamaDecoderLayer`, SDPA or flash attention, so no score matrix is saved), `e` the bytes of the compute dtype:

    RMSNorm    4h (its fp32 input) + e h (the normalised input, saved by the weight multiply) + e h (its output)
    attention  e h (q after RoPE) + 2 e h_kv (k, v) + e h (SDPA output) + e h (its contiguous copy for o_proj)
    MLP        4 e i (gate output for SiLU, SiLU output, up output, their product for down_proj)
    layer      2 RMSNorms + attention + MLP = 8h + 7e h + 2e h_kv + 4e i   (bf16, MHA: 26h + 8i bytes)

With activation checkpointing a layer keeps only its input (e h per token) and one layer is recomputed at a time. The
LM head and loss peak at the start of backward with the larger of two moments: the log-softmax output of the fp32 loss,
its gradient and the logits' gradient (`V (8 + e)` per token; the logits themselves are not saved), or the logits'
gradient with the LM head's weight gradient being formed (`V e` per token + `e` x the largest trained matrix, before it
is added to `.grad`); M3's loss, weighted per scale, keeps the logits and a copy besides (`2 V e`). Frozen encoders run
without autograd: they keep only the hidden states the trained modules read (LLaVA: the penultimate layer; COMM: CLIP
1-24 and DINOv2 19-24), `(N + 1) C e` per kept layer per image; COMM's per-layer LayerNorm + Linear save two more `N C
e` per merged layer, its DINOv2 MLP aligner `2 r C e` per token, and the projectors their hidden widths. The adaptive
combiner is counted as `4 D e` per visual and text token it resamples (LayerNorm input, position-coded tokens, keys,
values) plus, per latent and iteration, about `22 D e` for the gated cross-attention block and `18 D e` per transformer
layer; it is the roughest term, and the CPU check reports its error.

Checked on CPU (`bench_scale.py`, table 3, fp32): measured/predicted activation peak of the training step 0.86-0.99
with the real encoders and a width-1024 LLM, 0.96-1.03 at `--quick` size; the stated tolerance is 15%.

What the model leaves out: the CUDA context and allocator fragmentation (a fixed reserve, `RESERVE_GIB`), ZeRO-3's
gathered-parameter buffers, kernel workspaces, and the transient peak of a frozen encoder's own forward (one layer).

Run: `PYTHONPATH=src python benchmarks/memory_model.py [--output results_memory_model.md]` (seconds: meta device).
`bench_scale.py` checks the model against measured CPU peaks at small size and prints these 7B tables with its own.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_utils import load_published_configs
from torch import nn

from comm_vlm.families import get_family
from comm_vlm.training.stages import apply_stage


GIB = 1024**3
GPU_GIB = 80.0  # one 80 GB A100/H100
RESERVE_GIB = 5.0  # CUDA context, NCCL buffers, allocator fragmentation: not modelled, kept free
# Stage-2 trainables of each family with the encoders frozen (M3's own recipe also trains CLIP; see `m3_finetune`).
STAGE_OF_FAMILY = {"comm": "comm_instruct", "matryoshka_llava": "llava_instruct", "adaptive_combiner": "combiner"}


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter and per activation element.

    Args:
        name: label for tables.
        activation: bytes of the compute dtype (`e`).
        frozen: bytes per frozen parameter.
        trained: bytes per trained parameter held in every step: weight, gradient, master copy, optimizer state.
    """

    name: str
    activation: int
    frozen: int
    trained: int

    @classmethod
    def bf16_mixed(cls) -> Precision:
        """bf16 weights and gradients, fp32 master weights and AdamW states (2 + 2 + 4 + 4 + 4 bytes)."""
        return cls("bf16 mixed, fp32 master + AdamW", 2, 2, 16)

    @classmethod
    def fp32(cls) -> Precision:
        """fp32 everything: weight 4, gradient 4, AdamW m and v 8."""
        return cls("fp32 + AdamW", 4, 4, 16)


@dataclass
class BuildShape:
    """What the memory model needs from one build: parameter split, LLM shape, vision branch, tokens per sample.

    Args:
        name: build name.
        trained, frozen: parameter counts.
        hidden, intermediate, layers, heads, kv_heads, vocab: the Llama LLM.
        llm_tokens: LLM tokens per sample in training (M3: the packed rows of every scale).
        text_tokens: text tokens per sample (the combiner reads them).
        vision_elements: activation elements per image of the vision branch (kept states, merges, aligners,
            projector, combiner).
        largest_trained: elements of the largest trained parameter (the LM head's weight, untied).
        logits_copies: logits-sized tensors the family's loss keeps besides the shared ones (M3's per-scale loss
            keeps the logits and a copy: 2).
    """

    name: str
    trained: int
    frozen: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    llm_tokens: int
    text_tokens: int
    vision_elements: int
    largest_trained: int = 0
    logits_copies: int = 0
    notes: list[str] = field(default_factory=list)


def layer_bytes_per_token(shape: BuildShape, e: int) -> int:
    """Saved activations of one Llama decoder layer per token (see the module docstring)."""
    h, h_kv = shape.hidden, shape.hidden * shape.kv_heads // shape.heads
    rms_norm = 4 * h + 2 * e * h
    attention = 3 * e * h + 2 * e * h_kv
    return 2 * rms_norm + attention + 4 * e * shape.intermediate


def llm_bytes_per_sample(shape: BuildShape, e: int, checkpointing: bool) -> int:
    """LLM decoder layers and final norm, per sample (the LM head and loss: `head_bytes`)."""
    layer = layer_bytes_per_token(shape, e)
    layers = shape.layers * e * shape.hidden + layer if checkpointing else shape.layers * layer
    final_norm = 4 * shape.hidden + 2 * e * shape.hidden
    return shape.llm_tokens * (layers + final_norm)


def head_bytes(shape: BuildShape, e: int, batch: int) -> int:
    """Peak of the LM head and the loss for `batch` samples (see the module docstring)."""
    tokens = batch * shape.llm_tokens
    extra = tokens * shape.vocab * shape.logits_copies * e
    return extra + max(tokens * shape.vocab * (8 + e), tokens * shape.vocab * e + shape.largest_trained * e)


def activation_bytes(shape: BuildShape, e: int, checkpointing: bool, batch: int = 1) -> int:
    """Activations of a step on `batch` samples, one image each: LLM, vision branch, LM head and loss."""
    per_sample = llm_bytes_per_sample(shape, e, checkpointing) + shape.vision_elements * e
    return batch * per_sample + head_bytes(shape, e, batch)


def state_bytes(shape: BuildShape, precision: Precision, shards: int = 1, zero: int = 3) -> float:
    """Weights, gradients and optimizer states per device (ZeRO-`zero` over `shards` devices; 1 = unsharded)."""
    if shards == 1:
        return shape.trained * precision.trained + shape.frozen * precision.frozen
    weights = (shape.trained + shape.frozen) * precision.frozen
    rest = shape.trained * (precision.trained - precision.frozen)
    if zero == 3:
        return (weights + rest) / shards
    return weights + rest / shards


def predict_peak(
    shape: BuildShape, precision: Precision, batch: int, checkpointing: bool, shards: int = 1, zero: int = 3
) -> float:
    """Predicted peak bytes of one training step per device."""
    return state_bytes(shape, precision, shards, zero) + activation_bytes(
        shape, precision.activation, checkpointing, batch
    )


def max_batch(
    shape: BuildShape, precision: Precision, checkpointing: bool, shards: int = 1, zero: int = 3, gib: float = GPU_GIB
) -> int:
    """The largest per-device batch that fits in `gib` minus `RESERVE_GIB` (0: not even the model states)."""
    budget = (gib - RESERVE_GIB) * GIB
    batch = 0
    while predict_peak(shape, precision, batch + 1, checkpointing, shards, zero) <= budget:
        batch += 1
    return batch


def vision_elements(config, llm_hidden: int, text_tokens: int) -> tuple[int, list[str]]:
    """Activation elements per image of the vision branch of a COMM-family config (see the module docstring)."""
    family = config.model_type
    notes = []
    elements = 0
    image_tokens = 0
    channels = 0
    for prefix in config.encoder_prefixes:
        branch = config.branch(prefix)
        vision = branch["vision_config"]
        grid = vision.image_size // vision.patch_size
        tokens, width = grid * grid, vision.hidden_size
        kept = len(branch["layers"])
        elements += kept * (tokens + 1) * width  # kept hidden states (CLS included), saved by the merge or projector
        if kept > 1:
            elements += kept * 2 * tokens * width  # per-layer LayerNorm and Linear outputs
            notes.append(f"{prefix}: {kept} kept layers")
        if branch["aligner"] == "mlp":
            ratio = branch["aligner_ratio"]
            elements += tokens * (width + 2 * ratio * width)
        image_tokens, channels = tokens, channels + width
    depth = config.projector_depth
    elements += image_tokens * (channels if depth == 1 else channels + 2 * (depth - 1) * llm_hidden)
    if family == "adaptive_combiner":
        width = config.combiner_width
        latents = config.combiner_num_latents
        # Resampling: LayerNorm input, position-coded tokens, keys and values per visual and text token; the two
        # latent resamplers' queries, attention output and projections; per iteration the gated cross-attention
        # block (about 22 D per latent) and each transformer layer (about 18 D per latent).
        resampling = (image_tokens + text_tokens) * 4 * width + 2 * latents * 5 * width
        blocks = config.combiner_iterations * latents * (22 + 18 * config.combiner_num_layers) * width
        elements += resampling + blocks
        notes.append(f"combiner: {latents} latents x {config.combiner_iterations} iterations, width {width}")
    return elements, notes


def llm_tokens_per_sample(config, text_tokens: int) -> int:
    """LLM tokens of one training sample: text + the image's tokens (M3: the packed rows of every scale)."""
    family = config.model_type
    if family == "adaptive_combiner":
        return text_tokens + config.combiner_num_latents
    image_tokens = config.image_seq_length
    if family != "matryoshka_llava":
        return text_tokens + image_tokens
    from comm_vlm.models.packing_matryoshka import build_training_scale_batch

    prefix = text_tokens // 2
    ids = torch.cat(
        [
            torch.full((1, prefix), 100),
            torch.full((1, image_tokens), config.image_token_id),
            torch.full((1, text_tokens - prefix), 100),
        ],
        dim=1,
    )
    labels = ids.clone()
    labels[:, : prefix + image_tokens] = -100
    batch = build_training_scale_batch(config, ids, torch.ones_like(ids), labels, device_type="cuda")
    return int(batch.rows[:, 0].sum())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trained, frozen) parameter counts."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trained, sum(p.numel() for p in model.parameters()) - trained


def build_shape(name: str, model: nn.Module, text_tokens: int, stage: str | None = None) -> BuildShape:
    """The `BuildShape` of a COMM-family `model` (any device, `meta` included) after `apply_stage`."""
    config = model.config
    apply_stage(model, stage or STAGE_OF_FAMILY[config.model_type])
    trained, frozen = count_parameters(model)
    text = config.text_config
    elements, notes = vision_elements(config, text.hidden_size, text_tokens)
    return BuildShape(
        name=name,
        trained=trained,
        frozen=frozen,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads or text.num_attention_heads,
        vocab=text.vocab_size,
        llm_tokens=llm_tokens_per_sample(config, text_tokens),
        text_tokens=text_tokens,
        vision_elements=elements,
        largest_trained=max((p.numel() for p in model.parameters() if p.requires_grad), default=0),
        logits_copies=2 if config.model_type == "matryoshka_llava" else 0,
        notes=notes,
    )


def published_shapes(text_tokens: int) -> list[BuildShape]:
    """The 7B builds of `tests/published_configs.py` on the meta device."""
    published = load_published_configs()
    shapes = []
    for name in ("llava-1.5-7b", "comm-7b", "m3-llava-1.5-7b", "combiner-llava-1.5-7b"):
        family, _ = published.PUBLISHED_BUILDS[name]
        with torch.device("meta"):
            model = get_family(family).model_class(published.published_build(name))
        shapes.append(build_shape(name, model, text_tokens))
    return shapes


def gib(value: float) -> str:
    return f"{value / GIB:,.1f}"


def prediction_table(text_tokens: int = 128) -> str:
    """Markdown: the 7B builds' states, activations per sample, and the largest per-device batch on 80 GB."""
    precision = Precision.bf16_mixed()
    shapes = published_shapes(text_tokens)
    lines = [
        f"Precision: {precision.name} ({precision.trained} B per trained parameter, {precision.frozen} B per frozen "
        f"one, activations {precision.activation} B); one image and {text_tokens} text tokens per sample; "
        f"{GPU_GIB:.0f} GiB per GPU with {RESERVE_GIB:.0f} GiB kept free; stage-2 trainables with frozen encoders "
        f"({', '.join(f'{k}: `{v}`' for k, v in STAGE_OF_FAMILY.items())}).",
        "",
        "| build | trained / frozen params (B) | LLM tokens per sample | model states, 1 GPU (GiB) | activations "
        "per sample, no ckpt / ckpt (GiB) | of which vision branch (MiB) | max batch 1 GPU, no ckpt / ckpt | "
        "ZeRO-2 x 8: states (GiB), max batch no ckpt / ckpt | ZeRO-3 x 8: states (GiB), max batch no ckpt / ckpt |",
        "|---|---|---:|---:|---|---:|---|---|---|",
    ]
    for shape in shapes:
        e = precision.activation
        no_ckpt = activation_bytes(shape, e, False)
        ckpt = activation_bytes(shape, e, True)
        cells = []
        for shards, zero in ((8, 2), (8, 3)):
            states = state_bytes(shape, precision, shards, zero)
            batches = [max_batch(shape, precision, c, shards, zero) for c in (False, True)]
            cells.append(f"{gib(states)}; {batches[0]} / {batches[1]}")
        one = [max_batch(shape, precision, c) for c in (False, True)]
        lines.append(
            f"| {shape.name} | {shape.trained / 1e9:.3f} / {shape.frozen / 1e9:.3f} | {shape.llm_tokens} | "
            f"{gib(state_bytes(shape, precision))} | {gib(no_ckpt)} / {gib(ckpt)} | "
            f"{shape.vision_elements * e / 2**20:,.0f} | {one[0]} / {one[1]} | {cells[0]} | {cells[1]} |"
        )
    llava = shapes[0]
    recipe = predict_peak(llava, precision, 16, True, shards=8, zero=3)
    lines += [
        "",
        f"- One 80 GB GPU cannot hold a full stage-2 step of any 7B build: the trained LLM's model states alone are "
        f"{gib(state_bytes(llava, precision))} GiB (16 B x {llava.trained / 1e9:.2f}B). It needs sharding (ZeRO-2/3, "
        "FSDP), LoRA, or an 8-bit/offloaded optimizer.",
        f"- LLaVA-1.5's published recipe (8 GPUs, ZeRO-3, checkpointing, per-device batch 16): predicted "
        f"{gib(recipe)} GiB per device at {text_tokens} text tokens, "
        f"{gib(predict_peak(_with_tokens(llava, 2048), precision, 16, True, 8, 3))} GiB at the full 2048-token "
        "sequences; the recipe runs on 80 GB A100s.",
        f"- M3 (every sample at 5 scales): {shapes[2].llm_tokens} LLM tokens per sample against LLaVA's "
        f"{llava.llm_tokens}: 576 + 144 + 36 + 9 + 1 = 766 visual tokens, and the text of each scale's row "
        "(the packing shares the prompt prefix; the suffix is repeated per scale).",
    ]
    return "\n".join(lines)


def _with_tokens(shape: BuildShape, tokens: int) -> BuildShape:
    return BuildShape(**{**shape.__dict__, "llm_tokens": tokens, "notes": list(shape.notes)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-tokens", type=int, default=128, help="text tokens per training sample")
    parser.add_argument("--output", default="", help="also write the table (Markdown) here")
    args = parser.parse_args()
    report = "# Memory model of a stage-2 training step at 7B\n\n" + prediction_table(args.text_tokens) + "\n"
    print(report)
    if args.output:
        Path(args.output).write_text(report)


if __name__ == "__main__":
    main()
