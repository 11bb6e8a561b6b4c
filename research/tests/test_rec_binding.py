"""The REC binding diagnostic (`research/rec_binding.py`): its token indexing and an end-to-end smoke run."""

import sys

import pytest
import torch

from comm_vlm.demo.main_job import MainJobConfig, build_family_model
from comm_vlm.demo.synthetic import make_synthetic_splits


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("rec_binding")


def test_rec_batches_point_at_the_x1_tenths_digit_and_label_only_the_box(bench, tmp_path):
    _, processor = build_family_model("comm", MainJobConfig.quick(), tmp_path)
    split = make_synthetic_splits(2, 3, seed=0)["test"]
    rows = [row for row in split if row["task"] == "rec"]
    batch, positions, counts = bench.rec_batches(processor, split)
    assert len(positions) == len(rows) == len(counts)
    for i, row in enumerate(rows):
        token = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][i, positions[i]].item())
        assert token == row["answer"][3]  # "[0.271,..." -> "2"
        supervised = processor.tokenizer.decode(batch["input_ids"][i][batch["labels"][i] != -100])
        assert supervised.strip() == row["answer"] + processor.tokenizer.eos_token
        assert counts[i] == row["num_objects"]


def test_quick_run_writes_the_tables_and_the_plot(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["rec_binding.py", "--quick", "--output-dir", str(tmp_path)])
    torch.manual_seed(0)
    bench.main()
    table = (tmp_path / "rec_binding.md").read_text()
    assert "linear probe, object mean (binding given)" in table and "attention probe, category query, 4 steps" in table
    assert "LLM after 4 REC-only steps on 1-4-object scenes" in table
    assert (tmp_path / "rec_binding.png").stat().st_size > 0
