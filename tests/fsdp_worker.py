"""FSDP2 on CPU processes over gloo: a few training steps of a tiny model of one family, each encoder / decoder layer
sharded as its own unit (the model's `_no_split_modules`, as Accelerate's TRANSFORMER_BASED_WRAP does), then the
gathered full state dict and the losses are written by rank 0.

Run under `torch.distributed.run --nproc_per_node N` (or with N = 1, unsharded, as the reference):

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUT FAMILY STEPS

Every rank builds the same model (same seed) and takes its own rows of each global batch of `GLOBAL_BATCH` rows; the
loss is the token sum of the rank's rows over the global batch's label count, times the world size (FSDP averages
gradients over ranks), so every step's update is the single process's on the whole batch. Rank 0 saves the gathered
full state dict with `save_pretrained` to `OUT/final` and the per-step losses to `OUT/losses.json`.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from comm_vlm.testing import build_tiny_checkpoint
from comm_vlm.training import TrainingBatchCollator, apply_stage, make_tiny_dataset
from comm_vlm.training.data import build_dataset


GLOBAL_BATCH = 4
LAYOUTS = {"comm": "comm", "matryoshka_llava": "llava", "adaptive_combiner": "llava"}
STAGES = {"comm": "comm_pretrain", "matryoshka_llava": "m3_finetune", "adaptive_combiner": "combiner"}


def token_loss_sum(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token loss summed over label tokens, and their count."""
    labels = batch.pop("labels")[:, 1:]
    logits = model(**batch, use_cache=False).logits[:, :-1]
    mask = labels != -100
    log_probs = logits[mask].float().log_softmax(-1)
    return -log_probs.gather(-1, labels[mask][:, None]).sum(), mask.sum()


def main(output_dir: str, family: str, steps: str) -> None:
    distributed = dist.is_available() and "RANK" in __import__("os").environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    fields = {"combiner_num_latents": 8} if family == "adaptive_combiner" else {}
    model, processor = build_tiny_checkpoint(
        Path(output_dir) / f"init-{rank}", layout=LAYOUTS[family], family=family, **fields
    )
    model.train()
    apply_stage(model, STAGES[family])
    if world > 1:
        for module in model.modules():
            if type(module).__name__ in model._no_split_modules:
                fully_shard(module)
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    data_dir = Path(output_dir) / f"data-{rank}"
    dataset, _ = build_dataset({"path": str(make_tiny_dataset(data_dir, 16, seed=1)), "image_folder": str(data_dir)})
    collator = TrainingBatchCollator(DataCollatorForVisionLanguageModeling(processor), model.config, device="cpu")
    losses = []
    for step in range(int(steps)):
        rows = [dataset[(step * GLOBAL_BATCH + i) % len(dataset)] for i in range(GLOBAL_BATCH)]
        share = GLOBAL_BATCH // world
        total = sum(int((collator([r])["labels"][:, 1:] != -100).sum()) for r in rows)  # the global label count
        loss_sum, _ = token_loss_sum(model, collator(rows[rank * share : (rank + 1) * share]))
        loss = loss_sum / total * world
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step_loss = loss_sum.detach() / total
        if distributed:
            dist.all_reduce(step_loss)
        losses.append(step_loss.item())

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options) if world > 1 else model.state_dict()
    if rank == 0:
        model.save_pretrained(Path(output_dir) / "final", state_dict=state)  # the gathered weights, plain tensors
        processor.save_pretrained(Path(output_dir) / "final")
        Path(output_dir, "losses.json").write_text(json.dumps(losses))
        wrapped = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "reshard")} - {type(model).__name__})
        Path(output_dir, "sharded_units.json").write_text(json.dumps(wrapped))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
