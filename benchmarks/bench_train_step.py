"""CPU cost of one main-job training step (COMM stage 2): TRL's collation, the forward/backward and the loss.

Three measured choices of the main job (`comm_vlm.demo.main_job`, COMM paper: Jiang et al. 2023, arXiv 2310.08825):

1. **Assistant masks.** TRL's vision collator asks the processor for assistant-token masks. `ProcessorMixin` builds
   them by iterating the `(batch, seq, 2)` offset tensor element by element; `CommProcessor` computes the same masks on
   the tensor. Timed: the collation of one batch of rows with each, outputs asserted equal.
2. **Activation checkpointing.** TRL's `SFTConfig` turns it on by default; the main job turns it off for its tiny
   models. Timed: forward + backward + AdamW step of the main job's tiny COMM on one collated batch with and without,
   losses and gradients asserted equal.
3. **The loss on a CPU.** TRL's `SFTTrainer.compute_loss` goes through its fused LM head, which on a device without
   Triton scores every position of the batch with torch ops; `CommSFTTrainer` scores the answer tokens from the
   model's logits there. Timed: the loss, backward and AdamW step through each, losses and gradients asserted equal.

Run: `PYTHONPATH=src python benchmarks/bench_train_step.py [--quick] [--threads N]`.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from bench_utils import cpu_name, interleaved_times
from transformers.processing_utils import ProcessorMixin
from trl import SFTTrainer

from comm_vlm.demo.main_job import MainJobConfig, build_family_model
from comm_vlm.demo.synthetic import SyntheticConfig, make_synthetic_splits
from comm_vlm.models.processing_comm import CommProcessor
from comm_vlm.training import CommSFTTrainer, build_trainer, default_sft_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 repetitions, 1 warm-up (default 20 and 3)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    parser.add_argument("--batch-size", type=int, default=MainJobConfig.batch_size)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reps, warmup = (5, 1) if args.quick else (20, 3)
    job = MainJobConfig()

    with tempfile.TemporaryDirectory() as tmp:
        model, processor = build_family_model("comm", job, f"{tmp}/init")
        synthetic = SyntheticConfig(image_after_question=job.image_after_question)
        rows = make_synthetic_splits(24, 1, seed=0, config=synthetic, image_dir=f"{tmp}/data")["train"]
        rows = rows.shuffle(seed=0).select(range(args.batch_size)).select_columns(["messages", "images"])
        sft_args = default_sft_config(
            f"{tmp}/out", per_device_train_batch_size=args.batch_size, activation_checkpointing=False
        )
        trainer = build_trainer(model, processor, rows, "comm_instruct", sft_args)
        collator = trainer.data_collator
        examples = [dict(row) for row in rows]

        def collate_ours():
            return collator([dict(e) for e in examples])

        vectorised = CommProcessor._adjust_assistant_masks_indices

        def collate_base():
            CommProcessor._adjust_assistant_masks_indices = ProcessorMixin._adjust_assistant_masks_indices
            try:
                return collator([dict(e) for e in examples])
            finally:
                CommProcessor._adjust_assistant_masks_indices = vectorised

        ours, base = collate_ours(), collate_base()
        if not all(torch.equal(ours[k], base[k]) for k in base if isinstance(base[k], torch.Tensor)):
            raise RuntimeError("the two collations differ")
        collate = interleaved_times({"ours": collate_ours, "base": collate_base}, reps, warmup)

        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
        model.train()

        def backward_step(loss: torch.Tensor):
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            optimizer.step()  # lr 0: the weights stay put, every repetition does identical work
            optimizer.zero_grad()
            return loss.detach(), grads

        def assert_same(a, b):
            (loss_a, grads_a), (loss_b, grads_b) = a, b
            torch.testing.assert_close(loss_a, loss_b)
            for grad_a, grad_b in zip(grads_a, grads_b):
                torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-6)

        def step(checkpointing: bool):
            if checkpointing:
                model.activation_checkpointing_enable()
            else:
                model.activation_checkpointing_disable()
            return backward_step(model(**ours).loss)

        assert_same(step(True), step(False))
        train = interleaved_times({"off": lambda: step(False), "on": lambda: step(True)}, reps, warmup)

        model.activation_checkpointing_disable()  # as the main job trains

        def loss_step(compute_loss):
            return backward_step(compute_loss(trainer, model, dict(ours)))

        assert_same(loss_step(CommSFTTrainer.compute_loss), loss_step(SFTTrainer.compute_loss))
        losses = interleaved_times(
            {
                "ours": lambda: loss_step(CommSFTTrainer.compute_loss),
                "trl": lambda: loss_step(SFTTrainer.compute_loss),
            },
            reps,
            warmup,
        )

    seq = tuple(ours["input_ids"].shape)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"main job's tiny COMM, {args.batch_size} question-first synthetic rows per batch, input_ids {seq}\n")
    print("| timed | ours (ms) | baseline (ms) | ours / baseline |")
    print("|---|---:|---:|---:|")
    print(
        f"| collation, assistant masks on the tensor vs `ProcessorMixin`'s loop | {1e3 * collate['ours'][0]:.1f} "
        f"| {1e3 * collate['base'][0]:.1f} | {collate['ours'][0] / collate['base'][0]:.2f} |"
    )
    print(
        f"| forward + backward + AdamW, checkpointing off vs on | {1e3 * train['off'][0]:.1f} "
        f"| {1e3 * train['on'][0]:.1f} | {train['off'][0] / train['on'][0]:.2f} |"
    )
    print(
        f"| loss + backward + AdamW, answer tokens (`CommSFTTrainer`) vs TRL's fused LM head | "
        f"{1e3 * losses['ours'][0]:.1f} | {1e3 * losses['trl'][0]:.1f} | {losses['ours'][0] / losses['trl'][0]:.2f} |"
    )
    print(
        f"\nmedians of {reps} interleaved repetitions after {warmup} warm-up; mins: "
        f"collation {1e3 * collate['ours'][1]:.1f} / {1e3 * collate['base'][1]:.1f} ms, "
        f"step {1e3 * train['off'][1]:.1f} / {1e3 * train['on'][1]:.1f} ms, "
        f"loss step {1e3 * losses['ours'][1]:.1f} / {1e3 * losses['trl'][1]:.1f} ms"
    )


if __name__ == "__main__":
    main()
