"""Evaluation runners end to end on tiny random models: results JSON, Markdown table, baselines, M3 scales."""

import json

import pytest
import torch

from comm_vlm.demo.synthetic import TASKS, make_synthetic_dataset
from comm_vlm.evaluation.runners import evaluate, evaluate_matryoshka, generate_answers
from comm_vlm.evaluation.tasks import TASK_SPECS, pope_object_prior, rec_chance
from comm_vlm.testing import build_tiny_checkpoint


SHORT = {"rec": 6, "reg": 4, "caption": 4, "pope": 3, "vqa": 3}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads; on a shared 2-core machine they oversubscribe (5x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), layout="comm")


@pytest.fixture(scope="module")
def dataset():
    return make_synthetic_dataset(2, seed=0)


def test_evaluate_end_to_end(tiny, dataset, tmp_path):
    model, processor = tiny
    result = evaluate(model, processor, dataset, batch_size=4, max_new_tokens=SHORT, output_dir=tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["tasks"]) == set(TASKS)
    for task, entry in saved["tasks"].items():
        for key, _ in TASK_SPECS[task].table:
            assert key in entry["metrics"] and key in entry["baseline"]
        assert entry["baseline"]["name"]
        assert entry["max_new_tokens"] == SHORT[task]
        assert len(entry["predictions"]) == entry["num_samples"] == dataset["task"].count(task)
    assert set(saved["tasks"]["pope"]["metrics"]["settings"]) == {"random", "popular", "adversarial"}
    assert saved["tasks"]["pope"]["baseline"]["accuracy"] == pytest.approx(0.5)  # balanced by construction
    table = result.to_markdown()
    assert (tmp_path / "results.md").read_text().strip() == table
    assert table.startswith("| task | metric (x100) | model | baseline | samples |")
    for task in TASKS:
        assert f"| {task} |" in table


def test_gold_answers_score_perfectly(dataset):
    rows = [dict(r) for r in dataset]
    for task, spec in TASK_SPECS.items():
        task_rows = [r for r in rows if r["task"] == task]
        if task not in TASKS:  # the published benchmarks' own tasks (MME, GQA): tests/test_benchmarks.py
            continue
        score = spec.score([r["answer"] for r in task_rows], task_rows)
        if score.correct is not None:
            assert all(score.correct) and score.metrics[spec.primary] == pytest.approx(1.0)
        else:
            assert score.metrics["cider"] > spec.baseline(task_rows)["cider"] - 1e-9


def test_rec_chance_by_hand():
    boxes = [[0, 0, 1, 1], [0, 0, 0.5, 1], [0.5, 0, 1, 1]]  # ordered pairs: 4 of 6 reach IoU 0.5
    assert rec_chance(boxes)["accuracy"] == pytest.approx(4 / 6)
    many = [[0.0, 0.0, 0.5, 0.5]] * 1050 + [[0.5, 0.5, 1.0, 1.0]] * 1050  # sampled branch (n^2 > 4M), fixed seed
    first, again = rec_chance(many), rec_chance(many)
    assert first == again and 0.45 < first["accuracy"] < 0.55


def test_batching_left_padding_and_state_restored(tiny, dataset):
    model, processor = tiny
    rows = [dict(r) for r in dataset.select(range(6))]
    processor.tokenizer.padding_side = "right"
    model.train()
    one = generate_answers(model, processor, rows, max_new_tokens=5, batch_size=1)
    batched = generate_answers(model, processor, rows, max_new_tokens=5, batch_size=6)
    assert one == batched
    assert processor.tokenizer.padding_side == "right" and model.training
    processor.tokenizer.padding_side = "left"
    model.eval()


def test_bad_inputs(tiny, dataset):
    model, processor = tiny
    with pytest.raises(ValueError, match="no 'task' column"):
        evaluate(model, processor, dataset.remove_columns("task"))
    with pytest.raises(ValueError, match="No runner for tasks"):
        evaluate(model, processor, dataset, tasks=["ocr"])
    with pytest.raises(ValueError, match="has no rows"):
        evaluate(model, processor, dataset.filter(lambda r: r["task"] == "rec"), tasks=["pope"])
    with pytest.raises(ValueError, match="needs the columns"):
        evaluate(model, processor, dataset.remove_columns("box"), tasks=["rec"])
    with pytest.raises(ValueError, match="matryoshka_scales"):
        evaluate_matryoshka(model, processor, dataset)


class ScaleRecordingProcessor:
    """Stands in for MatryoshkaLlavaProcessor: records the per-call `matryoshka_scale` and delegates the rest."""

    matryoshka_scales = [1, 4, 16]

    def __init__(self, inner):
        self.inner, self.tokenizer, self.calls = inner, inner.tokenizer, []

    def apply_chat_template(self, *args, **kwargs):
        return self.inner.apply_chat_template(*args, **kwargs)

    def __call__(self, *args, matryoshka_scale=None, **kwargs):
        self.calls.append(matryoshka_scale)
        return self.inner(*args, **kwargs)


def test_matryoshka_runner_with_stub_and_custom_oracle(tiny, dataset, tmp_path):
    model, processor = tiny
    stub = ScaleRecordingProcessor(processor)
    seen = {}

    def oracle(predictions, references, is_correct, tokens_per_scale):
        seen[len(seen)] = (sorted(predictions), tokens_per_scale)
        return {"oracle_accuracy": 0.25, "oracle_mean_tokens": 2.0}

    subset = dataset.filter(lambda r: r["task"] in ("rec", "reg"))
    result = evaluate_matryoshka(
        model, stub, subset, oracle_fn=oracle, max_new_tokens=4, batch_size=8, output_dir=tmp_path
    )
    assert set(stub.calls) == {1, 4, 16} and result.scales == [1, 4, 16]
    assert seen == {0: ([1, 4, 16], {1: 1.0, 4: 4.0, 16: 16.0})}  # REC only: REG (CIDEr) has no binary oracle
    assert set(result.oracle) == {"rec"}
    saved = json.loads((tmp_path / "matryoshka_results.json").read_text())
    assert set(saved["per_scale"]) == {"1", "4", "16"} and saved["oracle"]["rec"]["oracle_accuracy"] == 0.25
    assert (tmp_path / "accuracy_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| rec | Acc@0.5 |" in result.to_markdown() and "25.0 (2.00)" in result.to_markdown()


def test_matryoshka_runner_on_tiny_m3_model(dataset, tmp_path):
    pytest.importorskip("comm_vlm.models.modeling_matryoshka")
    from comm_vlm.models.configuration_matryoshka import MatryoshkaLlavaConfig
    from comm_vlm.models.modeling_matryoshka import MatryoshkaLlavaForConditionalGeneration
    from comm_vlm.models.processing_matryoshka import MatryoshkaLlavaProcessor
    from comm_vlm.testing import CHAT_TEMPLATE, build_tiny_tokenizer, tiny_comm_config, tiny_image_processor

    fields = tiny_comm_config("llava").to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        fields.pop(key, None)
    config = MatryoshkaLlavaConfig(**fields)
    torch.manual_seed(0)
    model = MatryoshkaLlavaForConditionalGeneration(config).eval()
    processor = MatryoshkaLlavaProcessor(
        image_processor=tiny_image_processor(28),
        tokenizer=build_tiny_tokenizer(),
        num_image_tokens=config.image_seq_length,
        chat_template=CHAT_TEMPLATE,
        matryoshka_scales=config.matryoshka_scales,
    )
    subset = dataset.filter(lambda r: r["task"] in ("pope", "vqa"))
    result = evaluate_matryoshka(model, processor, subset, max_new_tokens=3, output_dir=tmp_path)
    assert result.scales == config.matryoshka_scales == [1, 4, 16]
    assert set(result.oracle) == {"pope", "vqa"}
    report = result.oracle["pope"]
    correct = result.per_scale[1].tasks["pope"].correct
    assert report.accuracy_per_scale[1] == pytest.approx(sum(correct) / len(correct))
    assert 1 <= report.oracle_mean_tokens <= 16
    assert (tmp_path / "accuracy_vs_tokens.png").exists()


def test_vqa_baseline_scores_each_question_type_against_its_own_majority_answer():
    def row(qtype, answer):
        return {"answer": answer, "references": [answer] * 10, "question_type": qtype}

    rows = [row("colour", "red")] * 3 + [row("colour", "blue")] * 2 + [row("shape", "circle")] * 2
    rows += [row("shape", "square")] + [row("count", "1")] * 4
    baseline = TASK_SPECS["vqa"].baseline(rows)
    assert baseline["accuracy"] == pytest.approx(4 / 12)  # "1", the most frequent answer overall
    assert baseline["per_question_type_prior"] == pytest.approx({"colour": 3 / 5, "shape": 2 / 3, "count": 1.0})
    assert baseline["accuracy_per_question_type_prior"] == pytest.approx(9 / 12)
    # The attribute questions together (colour and shape), each against its own type's majority: 5 of 8.
    assert baseline["per_question_group_prior"] == pytest.approx({"attribute": 5 / 8})


def test_vqa_scores_the_attribute_questions_together_weighting_every_question_the_same():
    def row(qtype, answer):
        return {"answer": answer, "references": [answer] * 10, "question_type": qtype}

    rows = [row("colour", "red")] * 3 + [row("shape", "circle")] + [row("count", "2")]
    predictions = ["red", "red", "blue", "square", "2"]  # colour 2/3, shape 0/1, count 1/1
    metrics = TASK_SPECS["vqa"].score(predictions, rows).metrics
    assert metrics["per_question_type"] == pytest.approx({"colour": 2 / 3, "shape": 0.0, "count": 1.0})
    assert metrics["per_question_group"] == pytest.approx({"attribute": 2 / 4})  # not the mean of 2/3 and 0
    # Real VQA question types outside every group leave the groups out.
    assert TASK_SPECS["vqa"].score(["2"], [row("what is the", "2")]).metrics["per_question_group"] == {}


def test_pope_object_prior_answers_each_object_with_its_training_majority():
    def row(obj, answer, setting="random"):
        return {"object": obj, "answer": answer, "pope_setting": setting}

    train = [row("red circle", "no")] * 3 + [row("red circle", "yes")] + [row("blue square", "yes")] * 2
    train += [row("green triangle", "no")] * 5  # makes "no" the overall training majority
    # red circle -> "no", blue square -> "yes", purple circle (never asked in training) -> overall majority "no"
    test = [row("red circle", "no"), row("red circle", "yes", "popular"), row("blue square", "yes", "popular")]
    test += [row("purple circle", "yes")]
    prior = pope_object_prior(train, test)
    assert prior["accuracy"] == pytest.approx(2 / 4)
    assert prior["settings"]["random"]["accuracy"] == pytest.approx(1 / 2)  # right on red circle, wrong on purple
    assert prior["settings"]["popular"]["accuracy"] == pytest.approx(1 / 2)
    assert prior["yes_ratio"] == pytest.approx(1 / 4)
