"""`comm-vlm evaluate` end to end on tiny random checkpoints: every task, the files it writes, M3's scales with the
oracle and the plot, and the model-index entries that `comm-vlm push --card` puts into the model card."""

import json

import pytest
from benchmark_files import FIXTURES, make_layouts

from comm_vlm.cli import EVALUATE_TASKS, main
from comm_vlm.evaluation.benchmarks import BENCHMARKS
from comm_vlm.testing import build_tiny_checkpoint


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return make_layouts(tmp_path_factory.mktemp("benchmarks"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    families = {"comm": "comm", "matryoshka_llava": "llava", "adaptive_combiner": "llava", "matryoshka_llava_next": ""}
    for family, layout in families.items():
        build_tiny_checkpoint(root / family, layout=layout, family=family)
    return {family: str(root / family) for family in families}


def evaluate(checkpoint, task, data, output, *extra):
    argv = ["evaluate", "--model", checkpoint, "--task", task, "--data", *map(str, data), "--output-dir", str(output)]
    return main([*argv, "--max-new-tokens", "3", "--batch-size", "2", "--device", "cpu", *extra])


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_cli_lists_every_benchmark():
    assert EVALUATE_TASKS == tuple(BENCHMARKS)


# Every task of TASK_SPECS: (benchmark, data, family, extra options, rows, split written).
RUNS = [
    ("pope", ["coco_pope_random.json"], "comm", ["--images", "IMAGES"], 4, "random"),
    ("refcoco", ["@refcoco"], "comm", ["--limit", "2"], 2, "val"),
    ("refcocog_reg", ["REC_refcocog_umd_val.jsonl"], "adaptive_combiner", ["--images", "IMAGES"], 2, "val"),
    ("vqav2", ["v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"], "comm",
     ["--images", "IMAGES"], 3, "val2014"),
    ("coco_caption", ["dataset_coco.json"], "comm", ["--images", "IMAGES"], 2, "test"),
    ("mme", ["@mme"], "comm", ["--limit", "4"], 4, "test"),
    ("textvqa", ["TextVQA_0.5.1_val.json"], "matryoshka_llava", ["--images", "IMAGES", "--matryoshka-scale", "4"],
     2, "val"),
]  # fmt: skip


@pytest.mark.parametrize("name,data,family,extra,num_rows,split", RUNS, ids=[r[0] for r in RUNS])
def test_evaluate_writes_results_table_predictions_and_model_index(
    name, data, family, extra, num_rows, split, layouts, checkpoints, tmp_path, capsys
):
    files = [layouts[d[1:]] if d.startswith("@") else FIXTURES / d for d in data]
    options = [str(layouts["images"]) if o == "IMAGES" else o for o in extra]
    assert evaluate(checkpoints[family], name, files, tmp_path, *options) == 0
    folder = tmp_path / name / split
    if "--matryoshka-scale" in extra:
        folder = folder / "scale-4"
    results = json.loads((folder / "results.json").read_text())
    task = BENCHMARKS[name].task
    assert results["settings"]["benchmark"] == name and results["tasks"][task]["num_samples"] == num_rows
    assert results["tasks"][task]["max_new_tokens"] == 3 and "predictions" not in results["tasks"][task]
    predictions = records(folder / "predictions.jsonl")
    assert len(predictions) == num_rows and all("prediction" in r and "value" in r for r in predictions)
    table = (folder / "results.md").read_text()
    assert table.startswith(f"## {BENCHMARKS[name].title} ({split}, {num_rows} samples") and f"| {task} |" in table
    assert table.strip() in capsys.readouterr().out
    entries = json.loads((tmp_path / "eval_results.json").read_text())["eval_results"]
    assert {e["dataset_name"] for e in entries} == {BENCHMARKS[name].title}
    assert all(e["dataset_split"] == split for e in entries)


@pytest.mark.parametrize("family", ["matryoshka_llava", "matryoshka_llava_next"])
def test_matryoshka_all_scales_writes_the_oracle_and_the_plot(layouts, checkpoints, tmp_path, family):
    data = [FIXTURES / "testdev_balanced_questions.json"]
    args = ["--images", str(layouts["images"]), "--matryoshka-scale", "all"]
    assert evaluate(checkpoints[family], "gqa", data, tmp_path, *args) == 0
    folder = tmp_path / "gqa" / "testdev_balanced" / "matryoshka"
    assert (folder / "accuracy_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (folder / "matryoshka_results.md").read_text()
    assert "| 1 tok | 4 tok | 16 tok |" in table and "oracle (mean tokens)" in table
    assert "oracle" in (folder / "oracle.md").read_text().lower()
    for scale in (1, 4, 16):
        assert len(records(folder / f"predictions_scale-{scale}.jsonl")) == 2
    saved = json.loads((folder / "matryoshka_results.json").read_text())
    assert saved["scales"] == [1, 4, 16] and "exact_match" in saved["oracle"]
    entries = json.loads((tmp_path / "eval_results.json").read_text())["eval_results"]
    assert [e["metric_config"] for e in entries] == [f"matryoshka_scale={s}" for s in (1, 4, 16)]


def test_results_accumulate_into_a_card_that_push_writes_into_the_model_index(layouts, checkpoints, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "eval"
    images = ["--images", str(layouts["images"])]
    pope = [FIXTURES / "coco_pope_random.json"]
    assert evaluate(checkpoints["comm"], "pope", pope, out, *images) == 0
    assert evaluate(checkpoints["comm"], "mme", [layouts["mme"]], out, "--limit", "2") == 0
    assert evaluate(checkpoints["comm"], "pope", pope, out, *images) == 0  # a rerun replaces its entries
    card_file = out / "eval_results.json"
    entries = json.loads(card_file.read_text())["eval_results"]
    assert [(e["dataset_name"], e["metric_type"]) for e in entries] == [
        ("MME", "mme_perception"),
        ("MME", "mme_cognition"),
        ("POPE", "accuracy"),
        ("POPE", "f1"),
        ("POPE", "yes_ratio"),
    ]
    local = tmp_path / "repo"
    push = ["push", checkpoints["comm"], "me/tiny-comm", "--card", str(card_file), "--local-dir", str(local)]
    assert main(push) == 0
    card = ModelCard.load(local / "README.md")
    shown = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    pope_accuracy = next(e["metric_value"] for e in entries if e["metric_type"] == "accuracy")
    assert shown[("POPE", "accuracy")] == pope_accuracy and ("MME", "mme_perception") in shown
    assert "model-index" in (local / "README.md").read_text()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--matryoshka-scale", "4"], "needs a Matryoshka (M3) model"),
        (["--matryoshka-scale", "x"], "--matryoshka-scale takes integers or `all`"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--split", "popular"], "is of split 'popular'"),
    ],
)
def test_user_errors_are_one_line(extra, message, layouts, checkpoints, tmp_path, capsys):
    data = [FIXTURES / "coco_pope_random.json"]
    assert evaluate(checkpoints["comm"], "pope", data, tmp_path, "--images", str(layouts["images"]), *extra) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("comm-vlm evaluate: error: ") and message in err
