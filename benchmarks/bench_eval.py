"""Evaluation throughput: batched greedy generation (`generate_answers`, left padding) against a per-sample loop.

Evaluation is generation-bound: every benchmark row is a prompt (image + question) and a greedy answer. This times
`comm_vlm.evaluation.generate_answers` (the runners' generation: chat template, batched processor call, left padding,
`generate`) at batch sizes 1, 8 and 32 against a loop that calls `model.generate` on one row at a time, on POPE rows
of the synthetic scenes (`comm_vlm.demo.synthetic`) and a random tiny checkpoint (`build_tiny_checkpoint`), with a
fixed `max_new_tokens`. Before timing, the answers of every batch size are compared with the loop's (greedy decoding,
so they must be equal; padding changes the floating-point sums, so a near-tie could flip a token: the script reports
how many answers differ and fails unless `--allow-mismatch`). The paths run interleaved (ABAB...); medians and mins.

Run: `PYTHONPATH=src python benchmarks/bench_eval.py [--quick] [--threads N] [--rows 64] [--new-tokens 16]`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile


os.environ.setdefault("TQDM_DISABLE", "1")  # generate_answers' progress bar would interleave with the tables

import torch  # noqa: E402
import transformers  # noqa: E402
from bench_utils import cpu_name, interleaved_times  # noqa: E402

from comm_vlm.demo.synthetic import make_synthetic_dataset  # noqa: E402
from comm_vlm.evaluation import generate_answers  # noqa: E402
from comm_vlm.models.image_utils import load_image  # noqa: E402
from comm_vlm.testing import TINY_FAMILY_LAYOUTS, build_tiny_checkpoint  # noqa: E402


BATCH_SIZES = (1, 8, 32)


def pope_rows(num_rows: int) -> list[dict]:
    """The first `num_rows` POPE rows of the synthetic test split (image, then the question)."""
    dataset = make_synthetic_dataset(max(4, num_rows // 4), seed=0, split="test")
    rows = [dict(row) for row in dataset if row["task"] == "pope"]
    if len(rows) < num_rows:
        raise ValueError(f"The synthetic split has {len(rows)} POPE rows; ask for at most that many.")
    return rows[:num_rows]


def prompt_messages(row: dict) -> list[dict]:
    """The user turn of a row (the trailing answer dropped), image parts cleaned of Arrow's null fields."""
    messages = [m for m in row["messages"] if m["role"] != "assistant"]
    return [
        {
            "role": m["role"],
            "content": [{k: v for k, v in part.items() if v is not None} for part in m["content"]]
            if not isinstance(m["content"], str)
            else m["content"],
        }
        for m in messages
    ]


def per_sample_answers(
    model, processor, rows: list[dict], max_new_tokens: int, lengths: list[tuple[int, int]] | None = None
) -> list[str]:
    """`model.generate` on one row at a time (no padding), greedy, answers decoded and stripped.

    Args:
        lengths (`list`, *optional*): receives `(prompt tokens, generated tokens)` per row.
    """
    tokenizer = processor.tokenizer
    answers = []
    with torch.inference_mode():
        for row in rows:
            prompt = processor.apply_chat_template(prompt_messages(row), add_generation_prompt=True, tokenize=False)
            images = [load_image(image) for image in row["images"]]
            inputs = processor(images=images, text=[prompt], return_tensors="pt").to(model.device).to(model.dtype)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[0, inputs["input_ids"].shape[1] :]
            if lengths is not None:
                lengths.append((inputs["input_ids"].shape[1], len(new_tokens)))
            answers.append(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repetitions, 1 warm-up (default 5 and 1)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    parser.add_argument("--rows", type=int, default=64, help="POPE rows per timed call")
    parser.add_argument("--new-tokens", type=int, default=16, help="max_new_tokens of every answer")
    parser.add_argument("--family", default="comm", choices=sorted(TINY_FAMILY_LAYOUTS), help="tiny model family")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument(
        "--allow-mismatch", action="store_true", help="report answers that differ from the loop's instead of failing"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reps, warmup = (2, 1) if args.quick else (5, 1)
    rows = pope_rows(args.rows)

    with tempfile.TemporaryDirectory() as tmp:
        model, processor = build_tiny_checkpoint(
            tmp, layout=TINY_FAMILY_LAYOUTS[args.family], family=args.family, seed=0
        )
    model.eval()
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    print(
        f"{stamp} | {cpu_name()} | nproc {len(os.sched_getaffinity(0))} | torch threads {torch.get_num_threads()} | "
        f"torch {torch.__version__} | transformers {transformers.__version__} | python {platform.python_version()} | "
        f"fp32, eval, inference_mode | {reps} reps, {warmup} warm-up(s) | load avg {os.getloadavg()[0]:.2f}"
    )
    text = model.config.text_config
    print(
        f"model: random tiny {args.family} ({sum(p.numel() for p in model.parameters()):,} parameters; LLM width "
        f"{text.hidden_size} x {text.num_hidden_layers} layers, vocab {text.vocab_size}); {len(rows)} POPE rows of "
        f"the synthetic scenes, greedy, max_new_tokens {args.new_tokens}\n"
    )

    def batched(batch_size: int):
        return lambda: generate_answers(model, processor, rows, args.new_tokens, batch_size=batch_size)

    lengths: list[tuple[int, int]] = []
    reference = per_sample_answers(model, processor, rows, args.new_tokens, lengths)
    mismatches = {}
    for batch_size in args.batch_sizes:
        answers = batched(batch_size)()
        mismatches[batch_size] = [i for i, (a, b) in enumerate(zip(answers, reference)) if a != b]
        for i in mismatches[batch_size][:3]:
            print(f"batch size {batch_size}, row {i}: batched {answers[i]!r} vs per-sample {reference[i]!r}")
    differing = {b: len(m) for b, m in mismatches.items() if m}
    if differing and not args.allow_mismatch:
        raise AssertionError(f"Batched answers differ from the per-sample loop's (rows per batch size: {differing}).")
    prompts, generated = zip(*lengths)
    print(
        f"prompts {min(prompts)}-{max(prompts)} tokens (visual tokens included); answers {min(generated)}-"
        f"{max(generated)} new tokens, {sum(generated)} in all\n"
    )

    loop_name = "per-sample loop (`model.generate`, 1 row)"
    fns = {loop_name: lambda: per_sample_answers(model, processor, rows, args.new_tokens)}
    fns.update({f"`generate_answers`, batch {b}": batched(b) for b in args.batch_sizes})
    times = interleaved_times(fns, reps, warmup)
    loop = times[loop_name]
    print(
        "| path | s per call, median (min) | samples/s, median (from min) | speedup vs loop, median | answers = loop |"
    )
    print("|---|---:|---:|---:|---|")
    for name, (median, low) in times.items():
        batch = name.rsplit(" ", 1)[-1]
        equal = "reference" if name == loop_name else f"{len(rows) - len(mismatches[int(batch)])}/{len(rows)}"
        print(
            f"| {name} | {median:.3f} ({low:.3f}) | {len(rows) / median:.1f} ({len(rows) / low:.1f}) | "
            f"{loop[0] / median:.2f}x | {equal} |"
        )
    print(f"\nload avg at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
