"""`CommSFTTrainer.answer_token_loss` (the CPU loss path) against TRL's own `SFTTrainer.compute_loss` (its fused LM
head): same loss, same gradients, same logged metrics, for every family, with and without LoRA, on the batches the
family's `TrainingBatchCollator` prepares."""

import pytest
import torch
from trl import SFTTrainer

from comm_vlm.testing import build_tiny_checkpoint
from comm_vlm.training import CommSFTTrainer, TrainingBatchCollator, build_trainer, default_sft_config


# (family, layout, stage, LoRA): every family's batch preparation (M3 re-lays the batch for all its scales, the
# combiner needs the labels to keep answers out of its fused tokens) and a PEFT-wrapped LLM.
CASES = [
    ("comm", "comm", "comm_instruct", False),
    ("comm", "llava", "llava_instruct", False),
    ("matryoshka_llava", "comm", "m3_finetune", False),
    ("adaptive_combiner", "comm", "comm_instruct", False),
    ("comm", "comm", "comm_instruct", True),
]


def make_trainer(family, layout, stage, lora, data, tmp_path):
    overrides = {"combiner_num_latents": 4} if family == "adaptive_combiner" else {}
    model, processor = build_tiny_checkpoint(tmp_path / "init", layout=layout, family=family, **overrides)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])
    args = default_sft_config(
        tmp_path / "out", max_steps=1, per_device_train_batch_size=4, save_strategy="no", logging_steps=1
    )
    return build_trainer(model.train(), processor, data, stage, args, peft_config=peft_config)


def loss_grads_metrics(trainer, compute_loss, batch, num_items_in_batch):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = compute_loss(trainer, model, dict(batch), num_items_in_batch=num_items_in_batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


@pytest.mark.parametrize("family,layout,stage,lora", CASES)
@pytest.mark.parametrize("num_items_in_batch", [None, 7])
def test_answer_token_loss_matches_trl_fused_lm_head(
    family, layout, stage, lora, num_items_in_batch, tiny_data, tmp_path
):
    trainer = make_trainer(family, layout, stage, lora, tiny_data, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss, trl_grads, trl_metrics = loss_grads_metrics(trainer, SFTTrainer.compute_loss, batch, num_items_in_batch)
    tokens_before = trainer._total_train_tokens
    loss, grads, metrics = loss_grads_metrics(trainer, CommSFTTrainer.compute_loss, batch, num_items_in_batch)

    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == trl_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert metrics["entropy"] == pytest.approx(trl_metrics["entropy"], rel=1e-5)
    assert metrics["mean_token_accuracy"] == pytest.approx(trl_metrics["mean_token_accuracy"])
    # Tokens seen: counted once per call, as TRL counts them.
    assert trainer._total_train_tokens - tokens_before == tokens_before == int(batch["attention_mask"].sum())


def test_training_on_a_cpu_goes_through_answer_token_loss(tiny_data, tmp_path, monkeypatch):
    calls = []
    original = CommSFTTrainer.answer_token_loss

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CommSFTTrainer, "answer_token_loss", counted)
    trainer = make_trainer("comm", "comm", "comm_instruct", False, tiny_data, tmp_path)
    trainer.train()
    assert len(calls) == 1
    assert {"loss", "entropy", "mean_token_accuracy", "num_tokens"} <= set(trainer.state.log_history[0])


def test_outputs_requested_fall_back_to_trl(tiny_data, tmp_path, monkeypatch):
    trainer = make_trainer("comm", "comm", "comm_instruct", False, tiny_data, tmp_path)
    monkeypatch.setattr(CommSFTTrainer, "answer_token_loss", lambda *a, **k: pytest.fail("fast path taken"))
    batch = next(iter(trainer.get_train_dataloader()))
    with pytest.warns(FutureWarning):
        loss, outputs = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
    assert outputs.logits.shape[:2] == batch["input_ids"].shape


def test_logits_over_the_cap_keep_trl_chunked_head(tiny_data, tmp_path, monkeypatch):
    trainer = make_trainer("comm", "comm", "comm_instruct", False, tiny_data, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    vocab = trainer.model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(trainer, "max_cpu_logits", batch["labels"].numel() * vocab - 1)
    monkeypatch.setattr(CommSFTTrainer, "answer_token_loss", lambda *a, **k: pytest.fail("fast path taken"))
    loss = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(loss, SFTTrainer.compute_loss(trainer, trainer.model, dict(batch)))


def test_a_batch_without_answer_tokens_gives_a_zero_loss_that_backpropagates(tiny_data, tmp_path):
    trainer = make_trainer("comm", "comm", "comm_instruct", False, tiny_data, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()  # still connected to the model, as TRL's is
    assert loss.item() == SFTTrainer.compute_loss(trainer, trainer.model, dict(batch)).item() == 0.0
    assert trainer._metrics["train"]["mean_token_accuracy"][-1] == 0.0


@pytest.mark.parametrize(
    "family,layout,stage",
    [("matryoshka_llava", "comm", "m3_finetune"), ("adaptive_combiner", "comm", "comm_instruct")],
)
def test_under_ddp_the_family_still_prepares_its_batch(family, layout, stage, tiny_data, tmp_path):
    """DDP hands `compute_loss` the wrapper; the collator prepared the batch before it (one gloo rank)."""
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    trainer = make_trainer(family, layout, stage, False, tiny_data, tmp_path)
    assert isinstance(trainer.data_collator, TrainingBatchCollator)  # installed by build_trainer
    batch = next(iter(trainer.get_train_dataloader()))
    expected = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(trainer.model, find_unused_parameters=True)
        loss = trainer.compute_loss(wrapped, dict(batch))
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_m3_loss_under_the_trainer_is_the_mean_over_scales(tiny_data, tmp_path):
    """M3 takes no loss kwargs, so the `Trainer` passes no `num_items_in_batch` and the loss it optimises on the
    collator's re-laid batch is the paper's: the mean over the scales of each scale's token-mean loss, on either loss
    path, and the model's own loss on the collated batch."""
    trainer = make_trainer("matryoshka_llava", "comm", "m3_finetune", False, tiny_data, tmp_path)
    examples = [trainer.train_dataset[i] for i in range(4)]
    collated = trainer.data_collator.collator(examples)  # TRL's collation: one row per sample, full grids
    batch = trainer.data_collator(examples)  # the same, re-laid for every scale
    assert batch["labels"].shape[0] > collated["labels"].shape[0]
    _, num_items_in_batch = trainer.get_batch_samples(iter([batch]), 1, "cpu")
    assert trainer.model_accepts_loss_kwargs is False and num_items_in_batch is None
    model = trainer.model
    with torch.no_grad():
        per_scale = [model(**collated, matryoshka_scale=s).loss for s in model.config.matryoshka_scales]
        paper = torch.stack(per_scale).mean()
        assert len(per_scale) > 1 and not torch.allclose(per_scale[0], per_scale[-1])
        torch.testing.assert_close(model(**collated).loss, paper, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(**batch).loss, paper, rtol=1e-5, atol=1e-6)
        for compute_loss in (CommSFTTrainer.compute_loss, SFTTrainer.compute_loss):
            loss = compute_loss(trainer, model, dict(batch), num_items_in_batch=num_items_in_batch)
            torch.testing.assert_close(loss, paper, rtol=1e-5, atol=1e-6)
