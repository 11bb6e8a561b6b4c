"""Deterministic synthetic scenes (coloured squares, circles, triangles) with the task types of COMM's benchmarks.

COMM (Jiang et al. 2023) and M3 (Cai et al. 2024) evaluate on REC (RefCOCO, box from a referring expression), REG
(RefCOCOg, expression from a box; CIDEr), POPE (Li et al. 2023; "Is there a <object> in the image?" with random /
popular / adversarial negatives), VQA (VQAv2 accuracy) and captioning (CIDEr). This module generates small scenes on
which all five can be trained and scored offline, in seconds:

    ds = make_synthetic_dataset(200, seed=0, split="test")          # ~3,000 rows, PIL images
    splits = make_synthetic_splits(1000, 200, seed=0)               # DatasetDict(train, test), disjoint scenes

**Scenes** (`comm_vlm.demo.scenes`): 1-4 coloured squares, circles and triangles on a white canvas, drawn
deterministically; each object's box is written Shikra-style with `format_box(normalize_box(box, (w, h)))`.

**Rows** (TRL conversational format, what `comm_vlm.training` consumes, plus scoring metadata):

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                  {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
     "images": [PIL.Image or path], "task": "rec" | "reg" | "pope" | "vqa" | "caption",
     "question": str, "answer": str, "references": list[str], "box": list[float] (normalized, [] if none),
     "question_type": str, "pope_setting": str, "object": str, "scene_id": str, "split": str, "num_objects": int}

Per scene: `rec` and `reg` one row per object (REC answer: the box; REG answer: "the large red circle", references
add "the red circle" and "a large red circle at the top left"); `caption` one row (three reference captions);
`vqa` a colour question for one shape present exactly once, a shape question for one colour present exactly once,
and a count question for a random shape (answers are digits; `references` holds the answer 10 times, as if the
10 annotators of VQAv2 agreed); `pope` `pope_questions_per_scene` present objects ("yes") and as many absent ones
("no") for each setting, so every setting is balanced (50% yes).

**POPE negatives** (our definitions on the synthetic vocabulary; an "object" is a colour-shape category such as
"red circle"; statistics are counted over the scenes of the same split):
* `random`: an absent category drawn uniformly.
* `popular`: the absent categories in the split with the most scenes containing them (ties by name), as POPE's
  "top-k most frequent objects".
* `adversarial`: absent categories that share the colour or the shape of a present object (the model must bind
  colour to shape), ranked by how often they co-occur with the present objects in the split (POPE's co-occurrence
  ranking), then by frequency and name; other absent categories follow when too few share an attribute.

**Splits** are disjoint by seed: split `s` of seed `k` draws from `random.Random("comm-vlm-synthetic/k/s")`, and
`make_synthetic_splits` regenerates any test scene identical (same objects, boxes, canvas) to a train scene.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, List, Value
from tqdm.auto import tqdm
from transformers.utils import logging

from ..models.image_utils import format_box, normalize_box
from .scenes import (
    COLOURS,
    PROMPTS,
    SHAPES,
    Scene,
    SceneObject,
    SyntheticConfig,
    generate_scenes,
    random_stream,
)


logger = logging.get_logger(__name__)

TASKS = ("rec", "reg", "pope", "vqa", "caption")
POPE_SETTINGS = ("random", "popular", "adversarial")
VQA_QUESTION_TYPES = ("colour", "shape", "count")
_NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six")


def _position(obj: SceneObject, width: int, height: int) -> str:
    cx, cy = (obj.box[0] + obj.box[2]) / 2 / width, (obj.box[1] + obj.box[3]) / 2 / height
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    if not horizontal and not vertical:
        return "in the center"
    if not vertical:
        return f"on the {horizontal}"
    return f"at the {vertical} {horizontal}".rstrip()


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _row(scene: Scene, image: Any, split: str, task: str, question: str, answer: str, **meta: Any) -> dict:
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [image],
        "task": task,
        "question": question,
        "answer": answer,
        "references": meta.get("references") or [answer],
        "box": list(meta.get("box") or []),
        "question_type": meta.get("question_type", ""),
        "pope_setting": meta.get("pope_setting", ""),
        "object": meta.get("object", ""),
        "scene_id": scene.scene_id,
        "split": split,
        "num_objects": len(scene.objects),
    }


@dataclass
class _SplitStats:
    frequency: Counter
    cooccurrence: dict[str, Counter]

    @classmethod
    def of(cls, scenes: Sequence[Scene]) -> _SplitStats:
        frequency: Counter = Counter()
        cooccurrence: dict[str, Counter] = {}
        for scene in scenes:
            names = {o.name for o in scene.objects}
            frequency.update(names)
            for name in names:
                cooccurrence.setdefault(name, Counter()).update(names - {name})
        return cls(frequency, cooccurrence)


def pope_negatives(
    present: Sequence[SceneObject], setting: str, k: int, rng: random.Random, stats: Any, config: SyntheticConfig
) -> list[str]:
    """`k` absent categories for one scene under a POPE setting (see the module docstring for the definitions).

    Args:
        present (`Sequence[SceneObject]`): the scene's objects.
        setting (`str`): `"random"`, `"popular"` or `"adversarial"`.
        k (`int`): how many negatives.
        rng (`random.Random`): the random stream (used by `random` only).
        stats: split statistics (`frequency` and `cooccurrence` counters).
        config ([`SyntheticConfig`]): gives the category vocabulary.
    """
    names = {o.name for o in present}
    absent = [c for c in config.categories if c not in names]
    if setting == "random":
        return rng.sample(absent, min(k, len(absent)))
    if setting == "popular":
        return sorted(absent, key=lambda c: (-stats.frequency[c], c))[:k]
    if setting == "adversarial":
        colours, shapes = {o.colour for o in present}, {o.shape for o in present}

        def rank(category: str) -> tuple:
            colour, shape = category.split(" ")
            shares = colour in colours or shape in shapes
            cooc = sum(stats.cooccurrence.get(n, Counter())[category] for n in names)
            return (not shares, -cooc, -stats.frequency[category], category)

        return sorted(absent, key=rank)[:k]
    raise ValueError(f"Unknown POPE setting {setting!r}; use one of {POPE_SETTINGS}.")


def _rec_rows(scene, image, split, rng, stats, config):
    size = (scene.width, scene.height)
    for obj in scene.objects:
        box = normalize_box(obj.box, size)
        question = config.prompts["rec"].format(expression=f"the {obj.name}")
        yield _row(scene, image, split, "rec", question, format_box(box), box=box, object=obj.name)


def _reg_rows(scene, image, split, rng, stats, config):
    size = (scene.width, scene.height)
    for obj in scene.objects:
        box = normalize_box(obj.box, size)
        answer = f"the {obj.size} {obj.name}"
        refs = [answer, f"the {obj.name}", f"a {obj.size} {obj.name} {_position(obj, *size)}"]
        question = config.prompts["reg"].format(box=format_box(box))
        yield _row(scene, image, split, "reg", question, answer, references=refs, box=box, object=obj.name)


def _caption_rows(scene, image, split, rng, stats, config):
    by_x = sorted(scene.objects, key=lambda o: (o.box[0], o.box[1]))
    by_y = sorted(scene.objects, key=lambda o: (o.box[1], o.box[0]))
    size = (scene.width, scene.height)
    first = _join([f"{_article(o.size)} {o.size} {o.name} {_position(o, *size)}" for o in by_x])
    count = len(scene.objects)
    refs = [
        first[0].upper() + first[1:] + ".",
        f"{_NUMBER_WORDS[count].capitalize()} shape{'s' if count > 1 else ''} on a white background: "
        + _join([f"{_article(o.colour)} {o.name}" for o in by_y])
        + ".",
        "There "
        + ("is " if count == 1 else "are ")
        + _join([f"{_article(o.size)} {o.size} {o.name}" for o in by_y])
        + ".",
    ]
    yield _row(scene, image, split, "caption", config.prompts["caption"], refs[0], references=refs)


def _pope_rows(scene, image, split, rng, stats, config):
    k = min(config.pope_questions_per_scene, len(scene.objects))
    for setting in POPE_SETTINGS:
        positives = [o.name for o in rng.sample(list(scene.objects), k)]
        negatives = pope_negatives(scene.objects, setting, k, rng, stats, config)
        for name, answer in [(p, "yes") for p in positives] + [(n, "no") for n in negatives]:
            question = config.prompts["pope"].format(article=_article(name), object=name)
            yield _row(scene, image, split, "pope", question, answer, pope_setting=setting, object=name)


def _vqa_rows(scene, image, split, rng, stats, config):
    shape_counts = Counter(o.shape for o in scene.objects)
    colour_counts = Counter(o.colour for o in scene.objects)
    unique_shapes = [o for o in scene.objects if shape_counts[o.shape] == 1]
    unique_colours = [o for o in scene.objects if colour_counts[o.colour] == 1]
    questions = []
    if unique_shapes:
        obj = rng.choice(unique_shapes)
        questions.append(("colour", config.prompts["colour"].format(shape=obj.shape), obj.colour, obj.name))
    if unique_colours:
        obj = rng.choice(unique_colours)
        questions.append(("shape", config.prompts["shape"].format(colour=obj.colour), obj.shape, obj.name))
    shape = rng.choice(list(config.shape_weights))
    questions.append(("count", config.prompts["count"].format(shape=shape), str(shape_counts[shape]), ""))
    for qtype, question, answer, name in questions:
        yield _row(
            scene, image, split, "vqa", question, answer, references=[answer] * 10, question_type=qtype, object=name
        )


TASK_BUILDERS = {
    "rec": _rec_rows,
    "reg": _reg_rows,
    "pope": _pope_rows,
    "vqa": _vqa_rows,
    "caption": _caption_rows,
}


def _check_tasks(tasks: Sequence[str] | None) -> list[str]:
    tasks = list(TASKS if tasks is None else tasks)
    unknown = [t for t in tasks if t not in TASK_BUILDERS]
    if unknown or not tasks:
        raise ValueError(f"Unknown or no tasks {unknown or tasks}; choose from {list(TASK_BUILDERS)}.")
    return tasks


def build_rows(
    scenes: Sequence[Scene],
    seed: int = 0,
    split: str = "test",
    tasks: Sequence[str] | None = None,
    config: SyntheticConfig | None = None,
    image_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """Task rows (see the module docstring) for the given scenes.

    Args:
        scenes (`Sequence[Scene]`): from `generate_scenes`.
        seed (`int`), split (`str`): fix the question sampling stream (separate from the scene stream).
        tasks (`Sequence[str]`, *optional*): subset of `TASKS` (default: all).
        config ([`SyntheticConfig`], *optional*): must be the one the scenes were drawn with.
        image_dir (`str` or `os.PathLike`, *optional*): write `<scene_id>.png` there and put paths in `images`
            (what `comm_vlm.training.validate_samples` loads); otherwise rows hold PIL images.
    """
    tasks = _check_tasks(tasks)
    config = config or SyntheticConfig()
    rng = random_stream(seed, f"{split}/questions")
    stats = _SplitStats.of(scenes)
    if image_dir is not None:
        Path(image_dir).mkdir(parents=True, exist_ok=True)
    rows = []
    for scene in tqdm(scenes, desc=f"Synthetic {split} rows", disable=len(scenes) < 500):
        image: Any = scene.render()
        if image_dir is not None:
            path = Path(image_dir) / f"{scene.scene_id}.png"
            image.save(path)
            image = str(path)
        for task in tasks:
            rows.extend(TASK_BUILDERS[task](scene, image, split, rng, stats, config))
    if config.image_after_question:
        for row in rows:
            row["messages"][0]["content"].reverse()  # [text, image]
    return rows


def make_synthetic_dataset(
    num_scenes: int,
    seed: int = 0,
    split: str = "test",
    tasks: Sequence[str] | None = None,
    config: SyntheticConfig | None = None,
    image_dir: str | os.PathLike | None = None,
    exclude: set | None = None,
) -> Dataset:
    """A `datasets.Dataset` of synthetic task rows (PIL images, or paths with `image_dir`).

    Args:
        num_scenes (`int`): scenes to draw (each gives several rows: about 15 with all tasks).
        seed (`int`), split (`str`): fix every draw; different splits of one seed draw different streams.
        tasks (`Sequence[str]`, *optional*): subset of `TASKS`.
        config ([`SyntheticConfig`], *optional*): drawing parameters.
        image_dir (`str` or `os.PathLike`, *optional*): write images there and store paths.
        exclude (`set`, *optional*): scene signatures to avoid (e.g. the train split's).
    """
    config = config or SyntheticConfig()
    scenes = generate_scenes(num_scenes, seed, split, config, exclude)
    rows = build_rows(scenes, seed, split, tasks, config, image_dir)
    if not rows:
        raise ValueError("No rows were generated; ask for at least one scene.")
    return Dataset.from_list(rows)


def held_out_scenes(
    train_scenes: Sequence[Scene], num_scenes: int, seed: int = 0, config: SyntheticConfig | None = None
) -> list[Scene]:
    """The test scenes of `make_synthetic_splits`: drawn from the seed's test stream, none equal to a train scene.

    Scenes are drawn in sequence, so the first `k` of `num_scenes >= k` scenes are the `k` scenes of a smaller split.

    Args:
        train_scenes (`Sequence[Scene]`): the train split's scenes (`generate_scenes(n, seed, "train", config)`).
        num_scenes (`int`): test scenes to draw.
        seed (`int`), config ([`SyntheticConfig`], *optional*): as for the train scenes.
    """
    seen = {scene.signature() for scene in train_scenes}
    test = generate_scenes(num_scenes, seed, "test", config, exclude=seen)
    if seen & {scene.signature() for scene in test}:
        raise RuntimeError("A test scene equals a train scene; this is a bug in generate_scenes(exclude=...).")
    return test


def make_synthetic_splits(
    num_train_scenes: int,
    num_test_scenes: int,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    config: SyntheticConfig | None = None,
    image_dir: str | os.PathLike | None = None,
) -> DatasetDict:
    """Train and test splits with no identical scene in both (test scenes that equal a train scene are redrawn).

    Args:
        num_train_scenes (`int`), num_test_scenes (`int`): scenes per split.
        seed (`int`): fixes both splits.
        tasks (`Sequence[str]`, *optional*): subset of `TASKS`.
        config ([`SyntheticConfig`], *optional*): drawing parameters.
        image_dir (`str` or `os.PathLike`, *optional*): write images under `<image_dir>/<split>/` and store paths.
    """
    config = config or SyntheticConfig()
    train = generate_scenes(num_train_scenes, seed, "train", config)
    test = held_out_scenes(train, num_test_scenes, seed, config)
    splits = {}
    for name, scenes in (("train", train), ("test", test)):
        folder = None if image_dir is None else Path(image_dir) / name
        splits[name] = Dataset.from_list(build_rows(scenes, seed, name, tasks, config, folder))
    return DatasetDict(splits)


def write_images(dataset: Dataset, directory: str | os.PathLike) -> Dataset:
    """Saves every row's images as PNG under `directory` (one file per scene and image) and returns the rows with
    paths in `images`, as `comm_vlm.training.validate_samples` expects.

    Args:
        dataset (`Dataset`): rows with PIL images (e.g. from `make_synthetic_dataset`).
        directory (`str` or `os.PathLike`): output folder (created).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()

    def save(row: dict, index: int) -> dict:
        paths = []
        for k, image in enumerate(row["images"]):
            if isinstance(image, (str, os.PathLike)):
                paths.append(str(image))
                continue
            stem = f"{row.get('scene_id') or f'row{index:07d}'}-{k}"
            path = directory / f"{stem}.png"
            if stem not in written:
                image.save(path)
                written.add(stem)
            paths.append(str(path))
        return {"images": paths}

    features = dataset.features.copy()
    features["images"] = List(Value("string"))
    return dataset.map(save, with_indices=True, features=features, load_from_cache_file=False, desc="Writing images")


__all__ = [
    "COLOURS",
    "POPE_SETTINGS",
    "PROMPTS",
    "SHAPES",
    "TASKS",
    "Scene",
    "SceneObject",
    "SyntheticConfig",
    "build_rows",
    "generate_scenes",
    "held_out_scenes",
    "make_synthetic_dataset",
    "make_synthetic_splits",
    "pope_negatives",
    "write_images",
]
