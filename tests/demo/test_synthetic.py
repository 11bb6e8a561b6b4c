"""Synthetic scenes: determinism, disjoint splits, every task present, answers consistent with the drawn scene."""

import time
from collections import Counter

import numpy as np
import pytest

from comm_vlm.demo.synthetic import (
    COLOURS,
    POPE_SETTINGS,
    TASKS,
    SyntheticConfig,
    build_rows,
    generate_scenes,
    make_synthetic_dataset,
    make_synthetic_splits,
    write_images,
)
from comm_vlm.models.image_utils import format_box, parse_boxes


pytestmark = pytest.mark.demo  # the demo (`comm_vlm.demo`): run with `python -m pytest -m demo`


@pytest.fixture(scope="module")
def scenes_and_rows():
    scenes = generate_scenes(40, seed=5, split="test")
    return {s.scene_id: s for s in scenes}, build_rows(scenes, seed=5, split="test")


def _strip_images(dataset):
    return [{k: v for k, v in row.items() if k != "images"} for row in dataset]


def test_same_seed_same_data_and_other_seed_other_data():
    a, b = make_synthetic_dataset(5, seed=3), make_synthetic_dataset(5, seed=3)
    assert _strip_images(a) == _strip_images(b)
    assert all(
        np.array_equal(np.asarray(x["images"][0]), np.asarray(y["images"][0])) for x, y in zip(a, b)
    )  # same pixels
    c = make_synthetic_dataset(5, seed=4)
    assert _strip_images(a) != _strip_images(c)


def test_splits_are_disjoint():
    splits = make_synthetic_splits(30, 30, seed=0, tasks=["rec"])
    train_ids, test_ids = set(splits["train"]["scene_id"]), set(splits["test"]["scene_id"])
    assert train_ids.isdisjoint(test_ids)
    assert set(splits["train"]["split"]) == {"train"} and set(splits["test"]["split"]) == {"test"}
    train = {s.signature() for s in generate_scenes(30, 0, "train")}
    assert train.isdisjoint(s.signature() for s in generate_scenes(30, 0, "test"))
    # an excluded (identical) scene is redrawn
    first = generate_scenes(3, 0, "train")
    redrawn = generate_scenes(3, 0, "train", exclude={first[0].signature()})
    assert first[0].signature() not in {s.signature() for s in redrawn}


def test_every_task_setting_and_question_type_present(scenes_and_rows):
    _, rows = scenes_and_rows
    assert set(r["task"] for r in rows) == set(TASKS)
    pope = [r for r in rows if r["task"] == "pope"]
    for setting in POPE_SETTINGS:
        answers = Counter(r["answer"] for r in pope if r["pope_setting"] == setting)
        assert answers["yes"] == answers["no"] > 0  # balanced
    assert set(r["question_type"] for r in rows if r["task"] == "vqa") == {"colour", "shape", "count"}
    row = rows[0]
    assert row["messages"][0]["content"][0] == {"type": "image"} and row["messages"][1]["role"] == "assistant"
    assert row["messages"][1]["content"][0]["text"] == row["answer"]


def test_rec_box_covers_exactly_the_named_shape(scenes_and_rows):
    scenes, rows = scenes_and_rows
    fill = {"square": (0.99, 1.0), "circle": (0.72, 0.85), "triangle": (0.45, 0.62)}
    images = {}
    for row in (r for r in rows if r["task"] == "rec"):
        scene = scenes[row["scene_id"]]
        image = images.setdefault(scene.scene_id, np.asarray(scene.render()))
        (box,) = parse_boxes(row["answer"]).boxes
        assert row["answer"] == format_box(row["box"])
        x1, y1, x2, y2 = (round(v * s) for v, s in zip(box, (scene.width, scene.height) * 2))
        colour, shape = row["object"].split(" ")
        assert f"the {colour} {shape}" in row["question"]
        crop = image[y1:y2, x1:x2]
        is_obj = (crop == COLOURS[colour]).all(-1)
        is_bg = (crop == scene.background).all(-1)
        assert (is_obj | is_bg).all()  # nothing else inside the box
        assert is_obj[0].any() and is_obj[-1].any() and is_obj[:, 0].any() and is_obj[:, -1].any()  # tight
        lo, hi = fill[shape]
        assert lo <= is_obj.mean() <= hi
        # no pixel of the object lies outside its box (same colour elsewhere belongs to another object's box)
        others = [o.box for o in scene.objects if o.colour == colour and o.name != row["object"]]
        outside = (image == COLOURS[colour]).all(-1)
        outside[y1:y2, x1:x2] = False
        for ox1, oy1, ox2, oy2 in others:
            outside[oy1:oy2, ox1:ox2] = False
        assert not outside.any()


def test_answers_match_the_scene(scenes_and_rows):
    scenes, rows = scenes_and_rows
    for row in rows:
        scene = scenes[row["scene_id"]]
        names = {o.name for o in scene.objects}
        if row["task"] == "pope":
            assert (row["object"] in names) == (row["answer"] == "yes")
            if row["pope_setting"] == "adversarial" and row["answer"] == "no":
                colour, shape = row["object"].split(" ")
                assert any(o.colour == colour or o.shape == shape for o in scene.objects)
        elif row["task"] == "vqa":
            assert row["references"] == [row["answer"]] * 10
            if row["question_type"] == "count":
                shape = row["question"].split("How many ")[1].split("s are")[0]
                assert row["answer"] == str(sum(o.shape == shape for o in scene.objects))
            elif row["question_type"] == "colour":
                assert f"{row['answer']} {row['question'].split('the ')[1].split('?')[0]}" in names
            else:
                assert row["object"] in names and row["object"].endswith(row["answer"])
        elif row["task"] == "reg":
            assert row["object"] in names and row["object"] in row["answer"]
            assert format_box(row["box"]) in row["question"]
        elif row["task"] == "caption":
            assert all(name in row["answer"] for name in names) and len(row["references"]) == 3


def test_popular_negatives_are_the_most_frequent_absent_objects(scenes_and_rows):
    scenes, rows = scenes_and_rows
    frequency = Counter(name for s in scenes.values() for name in {o.name for o in s.objects})
    for row in rows:
        if row["task"] == "pope" and row["pope_setting"] == "popular" and row["answer"] == "no":
            present = {o.name for o in scenes[row["scene_id"]].objects}
            best = max(frequency[c] for c in SyntheticConfig().categories if c not in present)
            assert frequency[row["object"]] == best


def test_shapes_stay_visible_at_model_resolution():
    scenes = generate_scenes(200, seed=0)
    sides = [min(o.box[2] - o.box[0], o.box[3] - o.box[1]) / s.width for s in scenes for o in s.objects]
    assert min(sides) >= 0.2  # >= 5.6 px after resizing a canvas to 28 px
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2, 3, 4}


def test_images_on_disk_pass_training_validation(tmp_path):
    from comm_vlm.training.data import validate_samples

    dataset = make_synthetic_dataset(2, seed=0, tasks=["rec", "caption"])
    with_paths = write_images(dataset, tmp_path / "images")
    assert all(isinstance(p, str) for row in with_paths for p in row["images"])
    assert len(list((tmp_path / "images").glob("*.png"))) == 2  # one file per scene
    kept, report = validate_samples(with_paths)
    assert report.skipped == 0 and len(kept) == len(dataset)
    direct = make_synthetic_dataset(2, seed=0, tasks=["rec"], image_dir=tmp_path / "direct")
    assert direct[0]["images"][0].endswith(".png")


def test_generation_is_fast():
    start = time.perf_counter()
    dataset = make_synthetic_dataset(150, seed=1)
    assert len(dataset) > 1500
    assert time.perf_counter() - start < 20


@pytest.mark.parametrize(
    "kwargs, match",
    [({"min_objects": 3, "max_objects": 2}, "min_objects"), ({"colour_weights": {"pink": 1}}, "Unknown colours")],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticConfig(**kwargs)


def test_bad_task():
    with pytest.raises(ValueError, match="choose from"):
        make_synthetic_dataset(1, tasks=["ocr"])


def test_image_after_question_only_reorders_the_user_turn():
    before = build_rows(generate_scenes(4, 0, "train"), 0, "train")
    after = build_rows(generate_scenes(4, 0, "train"), 0, "train", config=SyntheticConfig(image_after_question=True))
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert [p["type"] for p in a["messages"][0]["content"]] == ["image", "text"]
        assert [p["type"] for p in b["messages"][0]["content"]] == ["text", "image"]
        assert a["messages"][0]["content"][::-1] == b["messages"][0]["content"]
        assert a["messages"][1:] == b["messages"][1:] and a["answer"] == b["answer"] and a["box"] == b["box"]
