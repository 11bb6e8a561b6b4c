"""The learned scale selector of Matryoshka-LLaVA (M3): config, save/load, `matryoshka_scale="auto"` in generate, the
processor and the pipeline, the refusals, and `comm-vlm train-scale-selector` end to end, on tiny random models."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from comm_vlm import MatryoshkaLlavaConfig
from comm_vlm.hub import check_remote_code, save_for_hub
from comm_vlm.models.configuration_matryoshka import as_integer, check_matryoshka_scale
from comm_vlm.models.scale_selector_matryoshka import auto_image_scales, choose_scales
from comm_vlm.testing import build_tiny_checkpoint


PROMPTS = [
    "USER: <image>\nWhat is this? ASSISTANT:",
    "USER: <image>\nHow many circles are there? ASSISTANT:",
    "USER: <image>\nWhat colour is the triangle? Answer yes or no. ASSISTANT:",
]
GREEDY = {"max_new_tokens": 5, "do_sample": False}


def image(seed=0, size=(40, 50)):
    return Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype("uint8"))


def spread_selector(model, seed=3):
    """Large random selector weights, so that different images and prompts get different scales at margin 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.scale_selector.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 2.0)
    return model


@pytest.fixture(scope="module")
def with_selector(tmp_path_factory):
    path = tmp_path_factory.mktemp("m3_selector")
    model, processor = build_tiny_checkpoint(
        path, family="matryoshka_llava", matryoshka_scale_selector={"width": 16, "margin": 0.0}
    )
    spread_selector(model)
    model.save_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor, path


def batch(processor, **kwargs):
    return processor(
        images=[image(i) for i in range(len(PROMPTS))], text=PROMPTS, padding=True, return_tensors="pt", **kwargs
    )


def chosen_scales(model, inputs):
    full = torch.stack(list(model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output))
    return auto_image_scales(model, inputs["input_ids"], inputs["attention_mask"], full, [1] * full.shape[0])


# --- config -----------------------------------------------------------------------------------------------------


def test_config_fills_defaults_and_refuses_bad_operating_points():
    config = MatryoshkaLlavaConfig(matryoshka_scale_selector={"margin": 0.1})
    assert config.matryoshka_scale_selector == {"width": 256, "margin": 0.1, "scales": [1, 9, 36, 144, 576]}
    assert MatryoshkaLlavaConfig().matryoshka_scale_selector is None
    bad = [
        ({"margin": -0.1}, "number in \\[0, 1\\]"),
        ({"margin": 1.5}, "number in \\[0, 1\\]"),
        ({"margin": "low"}, "number in \\[0, 1\\]"),
        ({"margin": True}, "number in \\[0, 1\\]"),
        ({"width": 0}, "at least 1"),
        ({"width": 2.5}, "must be an integer"),
        ({"cost": 0.1}, "unknown keys \\['cost'\\]"),
        ({"scales": [1, 4]}, "at least two of the trained"),
        ({"scales": [9]}, "at least two of the trained"),
        (0.05, "must be a dict"),
    ]
    for value, message in bad:
        with pytest.raises(ValueError, match=message):
            MatryoshkaLlavaConfig(matryoshka_scale_selector=value)
    config.matryoshka_scale_selector["margin"] = 2.0
    with pytest.raises(ValueError, match="number in \\[0, 1\\]"):
        config.check_fields()


def test_scale_checks_accept_auto_only_where_meant():
    assert as_integer("auto", "matryoshka_scale", allow_auto=True) == "auto"
    assert check_matryoshka_scale("auto", 4, allow_auto=True) is None
    with pytest.raises(ValueError, match="must be an integer, got 'auto'"):
        as_integer("auto", "matryoshka_scale")
    with pytest.raises(ValueError, match="integer or \"auto\", got 'fast'"):
        as_integer("fast", "matryoshka_scale", allow_auto=True)
    with pytest.raises(ValueError, match="not an integer"):
        check_matryoshka_scale("auto", 4)


def test_decision_rule_is_the_smallest_scale_within_the_margin():
    probabilities = torch.tensor([[0.2, 0.6, 0.7], [0.9, 0.9, 0.3], [0.1, 0.2, 0.3]])
    assert choose_scales(probabilities, [1, 4, 16], 0.0) == [16, 1, 16]
    assert choose_scales(probabilities, [1, 4, 16], 0.15) == [4, 1, 4]
    assert choose_scales(probabilities, [1, 4, 16], 1.0) == [1, 1, 1]


# --- save / load ------------------------------------------------------------------------------------------------


def test_selector_saves_and_loads_with_the_model(with_selector, tmp_path):
    model, processor, path = with_selector
    with safe_open(str(path / "model.safetensors"), "pt") as weights:
        assert {"scale_selector.fc1.weight", "scale_selector.fc2.bias"} <= set(weights.keys())
    reloaded = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert reloaded.config.matryoshka_scale_selector == model.config.matryoshka_scale_selector
    for name, param in model.scale_selector.state_dict().items():
        assert torch.equal(param, reloaded.scale_selector.state_dict()[name])
    inputs = batch(processor)
    chosen = chosen_scales(model, inputs)
    assert len(set(chosen)) > 1  # the images get different scales, so per-image handling is exercised
    assert chosen_scales(reloaded, inputs) == chosen
    files = save_for_hub(model, tmp_path / "hub", processor)
    assert "scale_selector_matryoshka.py" in files and "scale_selector_matryoshka.py" in check_remote_code(
        tmp_path / "hub"
    )


def test_a_checkpoint_without_selector_loads_and_refuses_auto(tmp_path):
    model, processor = build_tiny_checkpoint(tmp_path, family="matryoshka_llava")
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("matryoshka_scale_selector", None)  # as a checkpoint written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert loaded.scale_selector is None and loaded.config.matryoshka_scale_selector is None
    inputs = processor(images=image(), text=PROMPTS[0], return_tensors="pt")
    with pytest.raises(ValueError, match="comm-vlm train-scale-selector"):
        loaded.generate(**inputs, matryoshka_scale="auto", **GREEDY)
    with pytest.raises(ValueError, match='integer or "auto"'):
        loaded.generate(**inputs, matryoshka_scale="smallest", **GREEDY)


# --- "auto" in generate, the processor and the pipeline ---------------------------------------------------------


def test_generate_auto_equals_the_fixed_scale_it_chose_per_image(with_selector):
    model, processor, _ = with_selector
    inputs = batch(processor)
    chosen = chosen_scales(model, inputs)
    auto = model.generate(**inputs, matryoshka_scale="auto", **GREEDY)
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(auto[:, :prompt_length], inputs["input_ids"])
    for row, scale in enumerate(chosen):
        single = processor(images=image(row), text=PROMPTS[row], return_tensors="pt")
        fixed = model.generate(**single, matryoshka_scale=scale, **GREEDY)
        assert auto[row, prompt_length:].tolist() == fixed[0, single["input_ids"].shape[1] :].tolist()
    # the vision tower runs once for "auto"
    calls = []
    hook = model.model.vision_towers[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        model.generate(**inputs, matryoshka_scale="auto", **GREEDY)
    finally:
        hook.remove()
    assert len(calls) == 1


def test_processor_auto_reaches_generate_and_forward_refuses_it(with_selector):
    model, processor, _ = with_selector
    auto_inputs = batch(processor, matryoshka_scale="auto")
    default = batch(processor)
    assert auto_inputs["matryoshka_scale"] == "auto"
    assert torch.equal(auto_inputs["input_ids"], default["input_ids"])  # the default scale's placeholders
    assert "matryoshka_scale" not in default
    from_processor = model.generate(**auto_inputs, **GREEDY)
    assert torch.equal(from_processor, model.generate(**default, matryoshka_scale="auto", **GREEDY))
    with torch.no_grad(), pytest.raises(ValueError, match="Call `model.generate"):
        model(**auto_inputs)
    with pytest.raises(ValueError, match="not both"):
        model.generate(**default, matryoshka_scale="auto", visual_token_budget=8, **GREEDY)


def test_pipeline_auto_through_processor_or_generate_kwargs(with_selector):
    model, processor, path = with_selector
    processor.save_pretrained(path)
    pipe = pipeline("image-text-to-text", model=str(path))
    inputs = processor(images=image(1), text=PROMPTS[1], return_tensors="pt")
    ids = model.generate(**inputs, matryoshka_scale="auto", **GREEDY)[0, inputs["input_ids"].shape[1] :]
    expected = processor.decode(ids, skip_special_tokens=True)
    common = {"max_new_tokens": 5, "return_full_text": False}
    by_processor = pipe(
        images=image(1),
        text=PROMPTS[1],
        processor_kwargs={"matryoshka_scale": "auto"},
        generate_kwargs={"do_sample": False},
        **common,
    )
    by_generate = pipe(
        images=image(1), text=PROMPTS[1], generate_kwargs={"do_sample": False, "matryoshka_scale": "auto"}, **common
    )
    assert by_processor[0]["generated_text"] == by_generate[0]["generated_text"] == expected
    scale = chosen_scales(model, inputs)[0]
    fixed = pipe(images=image(1), text=PROMPTS[1], processor_kwargs={"matryoshka_scale": scale}, **common)
    assert fixed[0]["generated_text"] == expected


# --- training command -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["matryoshka_llava", "matryoshka_llava_next"])
def test_train_scale_selector_command_end_to_end(tmp_path, capsys, family):
    from comm_vlm.cli import main
    from comm_vlm.demo.synthetic import make_synthetic_dataset

    build_tiny_checkpoint(tmp_path / "m3", family=family)
    rows = make_synthetic_dataset(3, seed=5, split="selector", tasks=["vqa"], image_dir=tmp_path / "images")
    with open(tmp_path / "rows.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    argv = ["train-scale-selector", "--model", str(tmp_path / "m3"), "--data", str(tmp_path / "rows.jsonl")]
    argv += ["--task", "vqa", "--limit", "6", "--output-dir", str(tmp_path / "out"), "--steps", "20"]
    assert main([*argv, "--width", "32", "--margin", "0.2"]) == 0
    assert "wrote" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "scale_selector_training.json").read_text())
    assert record["samples"] == 6 and record["task"] == "vqa" and record["steps"] == 20
    assert set(record["label_balance"]) == {"1", "4", "16"} and 0.0 <= record["chosen_accuracy"] <= 1.0
    assert "scale selector" in (tmp_path / "out" / "README.md").read_text()
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    assert model.config.matryoshka_scale_selector == {"width": 32, "margin": 0.2, "scales": [1, 4, 16]}
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    inputs = processor(images=image(), text=PROMPTS[0], return_tensors="pt", matryoshka_scale="auto")
    assert model.generate(**inputs, **GREEDY).shape[1] > inputs["input_ids"].shape[1]
    assert main([*argv[:-2], "--output-dir", str(tmp_path / "bad"), "--margin", "3"]) == 2
    assert "number in [0, 1]" in capsys.readouterr().err


def test_evaluate_matryoshka_scores_auto_next_to_the_fixed_scales_and_the_oracle(with_selector, tmp_path):
    from comm_vlm.demo.synthetic import make_synthetic_dataset
    from comm_vlm.evaluation.runners import _prompt_messages, evaluate_matryoshka
    from comm_vlm.evaluation.scale_selection import auto_scale_points

    model, processor, _ = with_selector
    saved_weights = {k: v.clone() for k, v in model.scale_selector.state_dict().items()}
    rows = make_synthetic_dataset(4, seed=7, split="selector", tasks=["vqa"], image_dir=tmp_path / "images")
    prompts = [
        processor.apply_chat_template(_prompt_messages(r["messages"]), add_generation_prompt=True) for r in rows
    ]
    try:
        for seed in range(40):  # a selector that picks different scales for these rows
            spread_selector(model, seed)
            chosen = []  # the selector's choice per row, from the processor's inputs one row at a time
            for row, prompt in zip(rows, prompts):
                inputs = processor(images=[Image.open(row["images"][0])], text=prompt, return_tensors="pt")
                chosen += chosen_scales(model, inputs)
            if len(set(chosen)) > 1:
                break
        assert len(set(chosen)) > 1, chosen
        outcome = evaluate_matryoshka(
            model, processor, rows, output_dir=tmp_path / "eval", batch_size=4, max_new_tokens=3
        )
        tokens, accuracy = outcome.auto["vqa"]
        assert tokens == pytest.approx(sum(chosen) / len(chosen))
        assert "auto (mean tokens)" in (tmp_path / "eval" / "matryoshka_results.md").read_text()
        saved = json.loads((tmp_path / "eval" / "matryoshka_results.json").read_text())
        assert saved["auto"]["vqa"] == {"mean_tokens": tokens, "accuracy": accuracy}
        # the bookkeeping on correctness that differs between scales: row k right at scale s iff (k + s) is odd
        for scale in outcome.scales:
            outcome.per_scale[scale].tasks["vqa"].correct = [(k + scale) % 2 == 1 for k in range(len(rows))]
        expected = sum((k + s) % 2 == 1 for k, s in enumerate(chosen)) / len(rows)
        assert auto_scale_points(model, processor, list(rows), outcome)["vqa"][1] == pytest.approx(expected)
    finally:
        model.scale_selector.load_state_dict(saved_weights)
