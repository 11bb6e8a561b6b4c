"""The README's main job and `pipeline("image-text-to-text")` on a tiny offline checkpoint."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, pipeline

from comm_vlm.cli import main
from comm_vlm.demo.plumbing import run_plumbing
from comm_vlm.testing import build_tiny_checkpoint


pytestmark = pytest.mark.demo  # the demo (`comm_vlm.demo`): run with `python -m pytest -m demo`


@pytest.mark.parametrize("layout", ["comm", "llava"])
def test_plumbing_round_trips_and_answers(tmp_path, layout):
    result = run_plumbing(tmp_path / "plumbing", layout=layout)
    assert result["reload_max_abs_logit_diff"] == 0.0
    assert "model.safetensors" in result["files"] and "processor_config.json" in result["files"]
    assert result["visual_tokens_per_image"] == 16
    assert isinstance(result["answer"], str)


def test_cli_exit_code(tmp_path, capsys):
    assert main(["plumbing", "--output-dir", str(tmp_path / "cli")]) == 0
    assert "reload_max_abs_logit_diff  0.0" in capsys.readouterr().out


def test_pipeline_generates_like_model_generate(tmp_path):
    model, processor = build_tiny_checkpoint(tmp_path, layout="comm")
    pipe = pipeline("image-text-to-text", model=str(tmp_path))
    image = Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8"))
    prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    out = pipe(
        images=image, text=prompt, max_new_tokens=6, generate_kwargs={"do_sample": False}, return_full_text=False
    )[0]["generated_text"]
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert out == processor.decode(ids, skip_special_tokens=True)


def test_main_job_quick_runs_every_family_end_to_end(tmp_path, capsys):
    import json

    from comm_vlm.demo.main_job import FAMILY_PLANS, MainJobConfig

    assert main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["encoder_warmup"]) == {"vision", "secondary_vision"}
    # Where the time went: the warm-up and each family, all within the job's wall time.
    parts = [results["encoder_warmup_seconds"]] + [r["seconds"] for r in results["models"].values()]
    assert all(part > 0 for part in parts) and sum(parts) <= results["seconds"]
    assert f"{results['encoder_warmup_seconds']} s\n" in printed
    shared = load_file(tmp_path / "encoders" / "model.safetensors")
    assert list(results["models"]) == list(FAMILY_PLANS)
    for family, result in results["models"].items():
        assert [s["stage"] for s in result["stages"]] == list(FAMILY_PLANS[family]["stages"])
        assert (Path(result["final_dir"]) / "model.safetensors").exists()
        assert {"rec", "reg", "pope", "vqa", "caption"} <= set(result["eval"])
        # Every family reads COMM's branch and starts from the one warmed-up CLIP and DINOv2, as from one checkpoint.
        init = load_file(tmp_path / family / "init" / "model.safetensors")
        towers = [k for k in init if ".vision_tower." in k or ".secondary_vision_tower." in k]
        assert any(".secondary_vision_tower." in k for k in towers)
        assert towers and all(torch.equal(init[k], shared[k]) for k in towers)
        assert isinstance(result["served"]["answer"], str)
        # The tiny models' template has no system prompt (`MainJobConfig.system_prompt`), M3's copied from COMM's.
        template = AutoProcessor.from_pretrained(result["final_dir"]).apply_chat_template
        assert template([{"role": "user", "content": "Hi"}], add_generation_prompt=True) == "<s>USER: Hi ASSISTANT:"
        assert result["served"]["image_first"] is not MainJobConfig.quick().image_after_question
    assert Path(results["models"]["matryoshka_llava"]["plot"]).exists()
    assert printed.count("  served (question first) 'Please provide the bounding box coordinate") == len(FAMILY_PLANS)
    table = (tmp_path / "results.md").read_text()
    assert table.strip() in printed
    assert "| task | metric (x100) | comm | matryoshka_llava | adaptive_combiner | baseline |" in table
    assert "| vqa (colour) | VQA acc vs colour majority |" in table
    assert "| vqa (attribute) | VQA acc vs per-type majority |" in table
    assert "| pope | Acc vs text-only prior |" in table
    assert "Held-out scenes: 6; VQA on 12 (those and 6 more)." in table
    assert "| model | bar | score | bar value | met |" in table and len(results["bars"]) == 8
    assert (tmp_path / "results.json").exists()


@pytest.mark.parametrize("image_after_question", [False, True])
def test_served_grounding_prompt_is_the_training_rec_prompt(tmp_path, image_after_question):
    """The pipeline prompt of the main job renders to the same text as the REC rows the models were trained on."""
    from comm_vlm.demo.main_job import MainJobConfig, grounding_prompt
    from comm_vlm.demo.synthetic import SyntheticConfig, build_rows, generate_scenes

    _, processor = build_tiny_checkpoint(tmp_path, layout="comm")
    config = MainJobConfig(image_after_question=image_after_question)
    scene = generate_scenes(1, 1, "demo")[0]
    messages, row = grounding_prompt(scene, config)
    assert row["object"] == scene.objects[0].name and row["task"] == "rec"
    assert [part["type"] for part in messages[0]["content"]] == (
        ["text", "image"] if image_after_question else ["image", "text"]
    )
    (image,) = [part["image"] for part in messages[0]["content"] if part["type"] == "image"]
    assert np.array_equal(np.asarray(image), np.asarray(scene.render()))
    trained = build_rows(
        [scene], split="train", tasks=["rec"], config=SyntheticConfig(image_after_question=image_after_question)
    )[0]
    render = processor.apply_chat_template
    assert render(messages, add_generation_prompt=True) == render(trained["messages"][:1], add_generation_prompt=True)


def test_m3_derived_from_a_trained_comm_starts_as_that_comm(tmp_path):
    """M3's main-job init carries every COMM weight over: at its full scale it computes COMM's logits exactly."""
    from comm_vlm.demo.main_job import MainJobConfig, build_family_model, derive_family_model

    config = MainJobConfig.quick()
    comm, comm_processor = build_family_model("comm", config, tmp_path / "comm")
    m3, m3_processor = derive_family_model("matryoshka_llava", config, tmp_path / "comm", tmp_path / "m3")
    assert type(m3).__name__ == "MatryoshkaLlavaForConditionalGeneration"
    assert m3.config.matryoshka_default_scale == m3.config.image_seq_length == comm.config.image_seq_length
    assert m3_processor.matryoshka_scales == m3.config.matryoshka_scales
    m3_state = m3.state_dict()
    assert all(torch.equal(value, m3_state[name]) for name, value in comm.state_dict().items())
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    prompt = "USER: What is here? <image> ASSISTANT:"
    inputs = comm_processor(images=image, text=prompt, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], m3_processor(images=image, text=prompt, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(m3.eval()(**inputs).logits, comm.eval()(**inputs).logits, rtol=0, atol=0)


def test_main_job_refuses_m3_without_the_comm_it_starts_from(tmp_path):
    from comm_vlm.demo.main_job import MainJobConfig, run_main_job

    with pytest.raises(ValueError, match="matryoshka_llava starts from the trained comm model"):
        run_main_job(tmp_path, MainJobConfig(families=("matryoshka_llava", "comm")))
    with pytest.raises(ValueError, match="Unknown families"):
        run_main_job(tmp_path, MainJobConfig(families=("llava",)))
    with pytest.raises(ValueError, match="Unknown families"):
        run_main_job(tmp_path, MainJobConfig(family_plans={"combiner": {"mixture_weights": {}}}))
    with pytest.raises(ValueError, match=r"unknown entries \['mixture'\]"):
        run_main_job(tmp_path, MainJobConfig(family_plans={"adaptive_combiner": {"mixture": {}}}))
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_cli_demo_rejects_bad_families_before_any_work(tmp_path, capsys):
    assert main(["demo", "--quick", "--families", "matryoshka_llava", "--output-dir", str(tmp_path / "out")]) == 2
    assert "put 'comm' before 'matryoshka_llava'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # one size at a time
        main(["demo", "--quick", "--long"])


def test_cli_demo_seed_reaches_data_and_training(tmp_path):
    import json

    from comm_vlm.demo.main_job import MainJobConfig, family_recipe, prepare_training_data

    out = tmp_path / "seed1"
    assert main(["demo", "--quick", "--families", "comm", "--seed", "1", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["seed"] == 1

    def messages(path):  # the rows' text (their image paths differ by folder)
        return [json.loads(line)["messages"] for line in Path(path).read_text().splitlines()]

    rows = messages(out / "data" / "train_all.jsonl")
    for seed in (0, 1):
        config = MainJobConfig.quick()
        config.seed = seed
        _, paths = prepare_training_data(config, tmp_path / f"data{seed}")
        assert (messages(paths["all"]) == rows) is (seed == 1)
        recipe = family_recipe("comm", config, tmp_path / "init", paths)
        assert [stage["args"]["seed"] for stage in recipe["stages"]] == [seed, seed]


def test_vqa_is_scored_on_the_held_out_scenes_and_more(tmp_path):
    """`vqa_test_scenes`: VQA rows from more held-out scenes, starting with the other tasks' scenes and questions."""
    from comm_vlm.demo.main_job import MainJobConfig, prepare_training_data

    config = MainJobConfig.quick()  # 6 held-out scenes, VQA on 12
    test = prepare_training_data(config, tmp_path / "more")[0]["test"]
    alone = prepare_training_data(replace(config, vqa_test_scenes=6), tmp_path / "same")[0]["test"]

    def rows(split, task):
        return [(row["scene_id"], row["question"], row["answer"]) for row in split if row["task"] == task]

    assert len({scene for scene, _, _ in rows(test, "vqa")}) == 12
    assert rows(test, "vqa")[: len(rows(alone, "vqa"))] == rows(alone, "vqa")
    for task in ("rec", "reg", "pope", "caption"):  # every other task: the 6 scenes, unchanged
        assert rows(test, task) == rows(alone, task) and len({scene for scene, _, _ in rows(test, task)}) == 6
    with pytest.raises(ValueError, match="vqa_test_scenes .5. is below test_scenes .6."):
        replace(config, vqa_test_scenes=5).validate()


def test_for_run_is_the_cli_s_config():
    from comm_vlm.demo.main_job import MainJobConfig

    assert MainJobConfig.for_run() == MainJobConfig()
    assert MainJobConfig.for_run(long=True, seed=3) == replace(MainJobConfig.long(), seed=3)
    quick = MainJobConfig.for_run(quick=True, families=["comm"], seed=2)
    assert quick == replace(MainJobConfig.quick(), families=("comm",), seed=2)
    with pytest.raises(ValueError, match="Pick one size"):
        MainJobConfig.for_run(quick=True, long=True)


def test_long_job_is_the_longer_schedule_of_the_same_job(tmp_path):
    """`MainJobConfig.long()` changes only the number of steps: every family trains longer on the same data, with the
    same plans, rates and sizes."""
    from comm_vlm.demo.main_job import MainJobConfig, family_recipe

    default, long = MainJobConfig(), MainJobConfig.long()
    assert replace(long, family_stage_steps=default.family_stage_steps) == default
    assert sum(map(sum, long.family_stage_steps.values())) > sum(map(sum, default.family_stage_steps.values()))
    paths = {group: tmp_path / f"train_{group}.jsonl" for group in ("all", "short", "rec")}
    for family, steps in default.family_stage_steps.items():
        assert len(long.family_stage_steps[family]) == len(steps)
        assert all(more >= fewer for more, fewer in zip(long.family_stage_steps[family], steps))
        long_recipe, default_recipe = (family_recipe(family, c, "init", paths) for c in (long, default))
        for stage in (*long_recipe["stages"], *default_recipe["stages"]):
            stage["args"].pop("max_steps")
        assert long_recipe == default_recipe


def evaluation(rec, rec_chance, pope, attribute, attribute_prior):
    """The part of an evaluation the bars read (fractions)."""
    return {
        "rec": {"metrics": {"accuracy": rec}, "baseline": {"accuracy": rec_chance}},
        "pope": {"metrics": {"accuracy": pope}, "baseline": {"accuracy": 0.5}},
        "vqa": {
            "metrics": {"per_question_group": {"attribute": attribute}},
            "baseline": {"per_question_group_prior": {"attribute": attribute_prior}},
        },
    }


def test_bars_are_checked_per_family_and_reported_in_the_table():
    from comm_vlm.demo.main_job import bars_table, check_bars

    results = {
        "models": {
            "comm": {"eval": evaluation(0.146, 0.026, 0.86, 0.791, 0.344)},
            "matryoshka_llava": {"eval": evaluation(0.07, 0.026, 0.858, 0.70, 0.344)},
            "adaptive_combiner": {"eval": evaluation(0.0, 0.026, 0.74, 0.711, 0.344)},
        }
    }
    checks = {(c["family"], c["bar"]): c for c in check_bars(results)}
    assert set(checks) == {
        (family, bar)
        for family in ("comm", "matryoshka_llava")
        for bar in ("REC acc@0.5 >= 3x chance", "POPE acc >= 75", "attribute VQA >= 2x per-type majority")
    } | {("adaptive_combiner", "POPE acc >= 75"), ("adaptive_combiner", "attribute VQA >= 2x per-type majority")}
    assert checks[("comm", "REC acc@0.5 >= 3x chance")]["threshold"] == pytest.approx(0.078)
    assert [c["met"] for c in check_bars(results)] == [True, True, True, False, True, True, False, True]
    table = bars_table(check_bars(results))
    assert "| matryoshka_llava | REC acc@0.5 >= 3x chance | 7.0 | 7.8 | **no** |" in table
    assert "| adaptive_combiner | POPE acc >= 75 | 74.0 | 75.0 | **no** |" in table
    assert "| comm | attribute VQA >= 2x per-type majority | 79.1 | 68.8 | yes |" in table


def test_family_recipes_carry_their_learning_rates_and_mixtures(tmp_path):
    """The combiner trains at `learning_rate_scales` x the job's rate and without the extra REC weight; COMM keeps
    the job's rate and its REC-weighted stage 2."""
    from comm_vlm.demo.main_job import MainJobConfig, family_recipe

    config = MainJobConfig(learning_rate=5e-4, rec_weight=3.0)
    paths = {group: tmp_path / f"train_{group}.jsonl" for group in ("all", "short", "rec")}
    combiner = family_recipe("adaptive_combiner", config, tmp_path / "init", paths)["stages"]
    comm = family_recipe("comm", config, tmp_path / "init", paths)["stages"]
    assert [s["learning_rates"] for s in combiner] == [{"combiner": pytest.approx(1e-4)}] * 2
    assert [s["learning_rates"] for s in comm] == [{}, {}]
    assert [s["args"]["max_steps"] for s in combiner] == list(config.family_stage_steps["adaptive_combiner"])
    assert combiner[0]["dataset"]["path"] == comm[0]["dataset"]["path"] == str(paths["short"])
    weights = {Path(m["path"]).stem: m["weight"] for m in combiner[1]["dataset"]["mixture"]}
    assert weights == {"train_all": 1.0, "train_short": config.short_answer_weight}
    weights = {Path(m["path"]).stem: m["weight"] for m in comm[1]["dataset"]["mixture"]}
    assert weights == {"train_all": 1.0, "train_short": config.short_answer_weight, "train_rec": 3.0}
    # M3 fine-tunes the trained COMM at 0.3x the job's rate, COMM and the combiner's LLM at the job's rate.
    m3 = family_recipe("matryoshka_llava", config, tmp_path / "init", paths)["stages"]
    assert [s["args"]["learning_rate"] for s in m3] == [pytest.approx(1.5e-4)]
    assert {s["args"]["learning_rate"] for s in comm + combiner} == {5e-4}
