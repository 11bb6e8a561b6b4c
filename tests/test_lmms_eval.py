"""The `comm_vlm` model of lmms-eval (`comm_vlm.evaluation.lmms_eval_model`), offline.

lmms-eval is an optional dependency (install command in docs/evaluation.md); without it these tests skip. The
end-to-end test runs `python -m lmms_eval --model comm_vlm ... --tasks comm_vlm_pope_local` in a subprocess:
lmms-eval's own POPE task (tests/fixtures/lmms_eval_tasks/) over a local parquet file in lmms-lab/POPE's schema, on a
tiny M3 checkpoint at `matryoshka_scale=9`, and compares lmms-eval's POPE with this package's on the same file
(`comm-vlm evaluate --task pope`, through `comm_vlm.cli.main`).

Fair comparison: lmms-eval scores POPE by exact match of the whole lowercased, stripped answer, while this package
parses a leading yes/no and sends any other answer to the official POPE script's fallback. Both agree when every
answer is exactly "yes" or "no", so the checkpoint is a random tiny M3 fine-tuned (seconds) to answer each question
with "yes" or "no" and end; its targets flip 3 of the 18 labels, so the accuracy is neither 0 nor 1. The test asserts
that precondition on both sides' answers before comparing the numbers. lmms-eval's `pope_yes_ratio` is the ground
truth's yes fraction, this package's `yes_ratio` the predictions'; each is checked against its own definition.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw


pytest.importorskip(
    "lmms_eval", reason="lmms-eval is an optional extra (not in the dev extras); see docs/evaluation.md to install it"
)

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.models import MODEL_REGISTRY_V2  # noqa: E402

from comm_vlm.cli import main  # noqa: E402
from comm_vlm.evaluation import generate_answers, pope_metrics  # noqa: E402
from comm_vlm.evaluation.lmms_eval_model import CommVLM  # noqa: E402
from comm_vlm.testing import build_tiny_checkpoint, tiny_vision_config  # noqa: E402


TASKS_DIR = Path(__file__).parent / "fixtures" / "lmms_eval_tasks"
TASK = "comm_vlm_pope_local"
POST_PROMPT = "\nAnswer the question using a single word or phrase."  # the task's (and lmms-eval's POPE) post_prompt
OBJECTS = ["dog", "cat", "car", "bottle", "person", "chair"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
CATEGORIES = ["random", "popular", "adversarial"]
SCALE = 9  # M3 visual tokens per image (the tiny grid is 6 x 6: scales 1, 9, 36)


def pope_docs() -> list[dict]:
    """18 rows in lmms-lab/POPE's schema, 6 per category, labels alternating yes/no; images drawn here."""
    docs = []
    for i in range(18):
        image = Image.new("RGB", (48, 40), COLOURS[i % 6])
        ImageDraw.Draw(image).rectangle([i % 5 * 5, i % 3 * 6, 20 + i, 30], fill=COLOURS[(i * 7 + 1) % 6])
        docs.append(
            {
                "question_id": str(i),
                "question": f"Is there a {OBJECTS[i % 6]} in the image?",
                "answer": "yes" if i % 2 == 0 else "no",
                "image_source": f"synthetic_{i:03d}",
                "image": image,
                "category": CATEGORIES[i // 6],
            }
        )
    return docs


def package_rows(docs: list[dict]) -> list[dict]:
    """The same questions as this package's evaluation rows (image first, the task's post-prompt)."""
    return [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": d["question"] + POST_PROMPT}]}
            ],
            "images": [d["image"]],
            "task": "pope",
            "answer": d["answer"],
            "pope_setting": d["category"],
        }
        for d in docs
    ]


def fine_tune_yes_no(model, processor, docs: list[dict], targets: list[str], steps: int = 60) -> None:
    """Teaches a tiny model to answer each row's question with its target ("yes"/"no") and stop (answer-token loss)."""
    prompts = [
        processor.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False)
        for r in package_rows(docs)
    ]
    tokenizer = processor.tokenizer
    images = [d["image"] for d in docs]
    lengths = [
        len(processor(images=[image], text=[p], matryoshka_scale=SCALE)["input_ids"][0])
        for image, p in zip(images, prompts)
    ]
    tokenizer.padding_side = "right"
    texts = [p + " " + t + tokenizer.eos_token for p, t in zip(prompts, targets)]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt", matryoshka_scale=SCALE)
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    for i, length in enumerate(lengths):
        labels[i, :length] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.eval()  # one scale (the processor's), no dropout in the tiny model
    for _ in range(steps):
        logits = model(**inputs).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tokenizer.padding_side = "left"


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return pope_docs()


@pytest.fixture(scope="module")
def targets(docs) -> list[str]:
    """The fine-tuning answers: the labels, flipped on rows 1, 7 and 13 (one per category)."""
    flip = {"yes": "no", "no": "yes"}
    return [flip[d["answer"]] if i % 6 == 1 else d["answer"] for i, d in enumerate(docs)]


@pytest.fixture(scope="module")
def yes_no_m3(tmp_path_factory, docs, targets) -> Path:
    """A tiny M3 (6 x 6 grid) fine-tuned to answer the rows' questions with `targets`, saved."""
    path = tmp_path_factory.mktemp("m3_yes_no")
    torch.manual_seed(0)
    model, processor = build_tiny_checkpoint(
        path, layout="llava", family="matryoshka_llava", vision_config=tiny_vision_config(image_size=42)
    )
    assert SCALE in processor.matryoshka_scales
    fine_tune_yes_no(model, processor, docs, targets)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def random_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Random tiny COMM (COMM layout) and adaptive-combiner (LLaVA layout) checkpoints."""
    paths = {}
    for family, layout, fields in (("comm", "comm", {}), ("adaptive_combiner", "llava", {"combiner_num_latents": 8})):
        paths[family] = tmp_path_factory.mktemp(family)
        build_tiny_checkpoint(paths[family], layout=layout, family=family, **fields)
    return paths


def requests_for(
    lm: CommVLM, docs: list[dict], gen_kwargs: dict | None = None, context_suffix: str = POST_PROMPT
) -> list[Instance]:
    """lmms-eval `generate_until` requests over `docs` (as the harness builds them), with `lm.task_dict` set."""
    lm.task_dict = {"local": {"test": docs}}
    gen_kwargs = gen_kwargs or {"max_new_tokens": 6, "temperature": 0, "top_p": 1.0, "num_beams": 1}

    def doc_to_visual(doc: dict) -> list:
        return [doc["image"]]

    return [
        Instance(
            request_type="generate_until",
            arguments=(d["question"] + context_suffix, dict(gen_kwargs), doc_to_visual, i, "local", "test"),
            idx=0,
            metadata={"task": "local", "doc_id": i, "repeats": 1},
        )
        for i, d in enumerate(docs)
    ]


# ----------------------------------------------------------------------------------------------------------------
# Registration and arguments
# ----------------------------------------------------------------------------------------------------------------


def test_the_entry_point_registers_comm_vlm():
    resolved = MODEL_REGISTRY_V2.resolve("comm_vlm")
    assert resolved.class_path == "comm_vlm.evaluation.lmms_eval_model.CommVLM", (
        "lmms-eval does not see the entry point; refresh the install: python -m pip install -e . --no-deps"
    )
    assert resolved.model_type == "simple"
    assert MODEL_REGISTRY_V2.get_model_class("comm_vlm") is CommVLM


def test_model_args_are_checked(random_checkpoints, yes_no_m3):
    comm = str(random_checkpoints["comm"])
    with pytest.raises(ValueError, match="Unknown model_args"):
        CommVLM(pretrained=comm, device="cpu", image_frist=True)
    with pytest.raises(ValueError, match="applies to Matryoshka-LLaVA"):
        CommVLM(pretrained=comm, device="cpu", matryoshka_scale=9)
    with pytest.raises(ValueError, match=r"not a scale of this model; use one of \[1, 9, 36\]"):
        CommVLM(pretrained=str(yes_no_m3), device="cpu", matryoshka_scale=4)
    with pytest.raises(ValueError, match="batch_size"):
        CommVLM(pretrained=comm, device="cpu", batch_size="auto")
    # The harness parses `key=value` strings: numbers and true/false arrive converted, the rest as strings.
    lm = CommVLM.create_from_arg_string(
        f"pretrained={yes_no_m3},matryoshka_scale=9,image_first=false", {"batch_size": "4", "device": "cpu"}
    )
    assert (lm.batch_size, lm.image_first, lm.processor_kwargs) == (4, False, {"matryoshka_scale": 9})
    assert lm.device == torch.device("cpu")
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([])


def test_the_prompt_layout_is_explicit(random_checkpoints, tmp_path):
    path = random_checkpoints["comm"]
    lm = CommVLM(pretrained=str(path), device="cpu")
    row = package_rows(pope_docs()[:1])[0]
    # image_first (the default) is the layout of this package's own evaluation rows.
    assert lm.build_prompt("Q?", 1) == lm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert "USER: <image>\nQ? ASSISTANT:" in lm.build_prompt("Q?", 1)
    image_last = CommVLM(pretrained=str(path), device="cpu", image_first=False)
    assert "USER: Q?<image>\n ASSISTANT:" in image_last.build_prompt("Q?", 1)
    assert lm.build_prompt("<image>\nQ?", 1).count("<image>") == 1  # a context holding the image token is kept
    assert "Be brief. USER:" in CommVLM(pretrained=str(path), device="cpu", system_prompt="Be brief.").build_prompt(
        "Q?", 1
    )
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}Q: {{ m['content'][-1]['text'] }}{% endfor %} A:")
    assert CommVLM(pretrained=str(path), device="cpu", chat_template=str(template)).build_prompt("Hi", 1) == "Q: Hi A:"
    assert row["messages"][0]["content"][0] == {"type": "image"}


# ----------------------------------------------------------------------------------------------------------------
# generate_until and loglikelihood in process
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["comm", "adaptive_combiner"])
def test_generate_until_batched_equals_one_at_a_time_and_the_package(random_checkpoints, family):
    docs = pope_docs()[:6]
    one = CommVLM(pretrained=str(random_checkpoints[family]), device="cpu", batch_size=1)
    batched = CommVLM(pretrained=str(random_checkpoints[family]), device="cpu", batch_size=4)
    answers_one = one.generate_until(requests_for(one, docs))
    answers_batched = batched.generate_until(requests_for(batched, docs))
    ours = generate_answers(one.model, one.processor, package_rows(docs), max_new_tokens=6, batch_size=4)
    assert answers_batched == answers_one == ours
    assert len(set(answers_one)) > 1  # the random model's answers depend on the image and question


def test_generate_until_stops_at_until(random_checkpoints):
    docs = pope_docs()[:4]
    lm = CommVLM(pretrained=str(random_checkpoints["comm"]), device="cpu", batch_size=4)
    full = lm.generate_until(requests_for(lm, docs, {"max_new_tokens": 8}))
    stop = next(a[len(a) // 2] for a in full if len(a.strip()) > 2 and a[len(a) // 2].strip())
    cut = lm.generate_until(requests_for(lm, docs, {"max_new_tokens": 8, "until": [stop]}))
    assert cut == [a.split(stop, 1)[0].strip() for a in full]
    assert any(c != a for c, a in zip(cut, full))


def test_loglikelihood_prefers_the_trained_answer(yes_no_m3, docs, targets):
    lm = CommVLM(pretrained=str(yes_no_m3), device="cpu", matryoshka_scale=SCALE)
    lm.task_dict = {"local": {"test": docs}}
    requests = [
        Instance(
            request_type="loglikelihood",
            arguments=(d["question"] + POST_PROMPT, f" {answer}", lambda doc: [doc["image"]], i, "local", "test"),
            idx=0,
            metadata={"task": "local", "doc_id": i, "repeats": 1},
        )
        for i, d in enumerate(docs)
        for answer in ("yes", "no")
    ]
    scores = lm.loglikelihood(requests)
    for i, target in enumerate(targets):
        (yes, yes_greedy), (no, no_greedy) = scores[2 * i], scores[2 * i + 1]
        assert (yes > no) == (target == "yes")
        assert (yes_greedy, no_greedy) == (target == "yes", target == "no")
        assert max(yes, no) > -0.5 and min(yes, no) < max(yes, no) - 1.0


# ----------------------------------------------------------------------------------------------------------------
# The lmms-eval command line against this package's POPE
# ----------------------------------------------------------------------------------------------------------------


def test_lmms_eval_cli_pope_equals_the_package_pope(yes_no_m3, docs, targets, tmp_path):
    import datasets

    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image_source": datasets.Value("string"),
            "image": datasets.Image(),
            "category": datasets.Value("string"),
        }
    )
    columns = {name: [d[name] for d in docs] for name in features}
    datasets.Dataset.from_dict(columns, features=features).to_parquet(tmp_path / "pope_local.parquet")
    output = tmp_path / "lmms_eval_out"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "comm_vlm",
        "--model_args",
        f"pretrained={yes_no_m3},matryoshka_scale={SCALE},device=cpu,dtype=float32",
        "--tasks",
        TASK,
        "--include_path",
        str(TASKS_DIR),
        "--batch_size",
        "4",
        "--output_path",
        str(output),
        "--log_samples",
    ]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    # lmms-eval exits 0 even when the evaluation fails: the results file is the evidence.
    results_files = glob.glob(str(output / "**" / "*_results.json"), recursive=True)
    samples_files = glob.glob(str(output / "**" / f"*_samples_{TASK}.jsonl"), recursive=True)
    assert run.returncode == 0 and len(results_files) == 1 and len(samples_files) == 1, log
    theirs = json.loads(Path(results_files[0]).read_text())["results"][TASK]
    samples = sorted(
        (json.loads(line) for line in Path(samples_files[0]).read_text().splitlines()), key=lambda s: s["doc_id"]
    )
    assert [s["doc_id"] for s in samples] == list(range(len(docs)))
    assert [s["input"] for s in samples] == [d["question"] + POST_PROMPT for d in docs]  # the context we use too
    their_answers = [s["filtered_resps"] for s in samples]
    their_answers = [a[0] if isinstance(a, list) else a for a in their_answers]

    # The same parquet file through this package's own command line (`comm-vlm evaluate --task pope`).
    ours_dir = tmp_path / "comm_vlm_out"
    status = main(
        ["evaluate", "--model", str(yes_no_m3), "--task", "pope", "--data", str(tmp_path / "pope_local.parquet"),
         "--matryoshka-scale", str(SCALE), "--batch-size", "4", "--max-new-tokens", "16", "--device", "cpu",
         "--output-dir", str(ours_dir)]
    )  # fmt: skip
    assert status == 0
    (results_path,) = glob.glob(str(ours_dir / "**" / "results.json"), recursive=True)
    (predictions_path,) = glob.glob(str(ours_dir / "**" / "predictions.jsonl"), recursive=True)
    ours = json.loads(Path(results_path).read_text())["tasks"]["pope"]["metrics"]
    records = [json.loads(line) for line in Path(predictions_path).read_text().splitlines()]
    records = sorted(records, key=lambda r: int(r["question_id"]))
    assert [r["question_id"] for r in records] == [d["question_id"] for d in docs]
    our_answers = [r["prediction"] for r in records]
    labels = [d["answer"] for d in docs]

    # The precondition of a fair comparison: every answer is exactly "yes" or "no" on both sides.
    assert set(our_answers) == {"yes", "no"} and our_answers == targets
    assert their_answers == our_answers
    # Accuracy: lmms-eval pools the rows; ours is the mean over the settings, equal here (6 rows per setting).
    # Precision, recall and F1 (ours per setting, then averaged) are compared pooled, as lmms-eval computes them.
    assert 0 < theirs["pope_accuracy,none"] < 1
    assert theirs["pope_accuracy,none"] == pytest.approx(ours["accuracy"], abs=1e-12)
    assert theirs["pope_accuracy,none"] == pytest.approx(15 / 18, abs=1e-12)
    pooled = pope_metrics(our_answers, labels, unknown="wrong")
    for key, their_key in (("precision", "pope_precision"), ("recall", "pope_recall"), ("f1", "pope_f1_score")):
        assert theirs[f"{their_key},none"] == pytest.approx(pooled[key], abs=1e-12), key
    # yes-ratio: lmms-eval reports the labels' yes fraction, this package the predictions'.
    assert theirs["pope_yes_ratio,none"] == pytest.approx(labels.count("yes") / len(labels))
    assert ours["yes_ratio"] == pooled["yes_ratio"] == pytest.approx(our_answers.count("yes") / len(docs))
