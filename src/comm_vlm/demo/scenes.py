"""The scenes behind the synthetic benchmark (`comm_vlm.demo.synthetic`): coloured shapes on a canvas.

**Scenes.** A canvas of `canvas_size` px (default 96) on a white background holds 1-4 objects. An object is a shape
(square, circle, triangle) of a colour (red, green, blue, yellow, purple, orange) and a size class (small: a bounding
square of 22-30% of the canvas side, large: 34-44%), so shapes stay visible after resizing to a 28 or 56 px model
input. Colour and shape are drawn with non-uniform weights (`SyntheticConfig.colour_weights` / `shape_weights`) so
that POPE's "popular" negatives differ from random ones; a scene never holds two objects of the same colour *and*
shape, so "the red circle" always names one object. Objects do not overlap
(their boxes keep `margin` px apart); a large object that cannot be placed in 50 tries is tried once more as a small
one, then dropped. Drawing has no anti-aliasing, so each object's pixels have exactly its colour; its box is the
tight box of its pixels, `(x1, y1, x2, y2)` with exclusive x2/y2 (continuous pixel coordinates), written
Shikra-style with `format_box(normalize_box(box, (w, h)))`.

`generate_scenes(n, seed, split)` draws scenes deterministically, from
`random.Random("comm-vlm-synthetic/<seed>/<split>")`. `SyntheticConfig` holds the drawing parameters and those of the
rows built from the scenes (prompts, POPE questions per scene, image/question order): one object configures a whole
dataset.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw

from ..prompts import CAPTION_PROMPT, REC_PROMPT, REG_PROMPT, SHORT_ANSWER


COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
SHAPES = ("square", "circle", "triangle")
SIZES = ("small", "large")
PROMPTS: dict[str, str] = {
    "rec": REC_PROMPT,
    "reg": REG_PROMPT,
    "caption": CAPTION_PROMPT,
    "pope": "Is there {article} {object} in the image? " + SHORT_ANSWER,
    "colour": "What colour is the {shape}? " + SHORT_ANSWER,
    "shape": "What shape is the {colour} object? " + SHORT_ANSWER,
    "count": "How many {shape}s are there? " + SHORT_ANSWER,
}


@dataclass
class SyntheticConfig:
    """How scenes are drawn and which rows they give.

    Args:
        canvas_size (`int`, defaults to 96): image side in pixels (64-112 is the intended range).
        min_objects (`int`, defaults to 1): fewest objects drawn per scene.
        max_objects (`int`, defaults to 4): most objects drawn per scene (fewer when they do not fit).
        small_size (`tuple[float, float]`): side range of a small object, as a fraction of the canvas.
        large_size (`tuple[float, float]`): side range of a large object, as a fraction of the canvas.
        margin (`int`, defaults to 3): minimum gap in pixels between two objects' boxes.
        colour_weights (`dict[str, float]`): sampling weight of each colour (keys: the colours used).
        shape_weights (`dict[str, float]`): sampling weight of each shape.
        background (`tuple[int, int, int]`): background RGB.
        pope_questions_per_scene (`int`, defaults to 1): positive (and as many negative) POPE questions per scene and
            setting (capped by the objects present).
        prompts (`dict[str, str]`): question templates (keys as `PROMPTS`).
        image_after_question (`bool`, defaults to `False`): put the image after the question in the user turn
            (LLaVA-1.5's training data has both orders). Under causal attention every visual token then sees the
            question, so a small LLM can mark the patches a question is about where they are.
    """

    canvas_size: int = 96
    min_objects: int = 1
    max_objects: int = 4
    small_size: tuple[float, float] = (0.22, 0.30)
    large_size: tuple[float, float] = (0.34, 0.44)
    margin: int = 3
    colour_weights: dict[str, float] = field(
        default_factory=lambda: {"red": 6, "blue": 5, "green": 4, "yellow": 3, "purple": 2, "orange": 2}
    )
    shape_weights: dict[str, float] = field(default_factory=lambda: {"circle": 5, "square": 4, "triangle": 3})
    background: tuple[int, int, int] = (255, 255, 255)
    pope_questions_per_scene: int = 1
    prompts: dict[str, str] = field(default_factory=lambda: dict(PROMPTS))
    image_after_question: bool = False

    def __post_init__(self) -> None:
        if self.canvas_size < 32:
            raise ValueError(f"canvas_size={self.canvas_size} is too small; use at least 32 px (64-112 intended).")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"Need 1 <= min_objects <= max_objects, got {self.min_objects} and {self.max_objects}; fix the range."
            )
        for name in ("small_size", "large_size"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi < 1:
                raise ValueError(f"{name}={(lo, hi)} must be fractions of the canvas with 0 < low <= high < 1.")
        unknown = (set(self.colour_weights) - set(COLOURS)) | (set(self.shape_weights) - set(SHAPES))
        if unknown:
            raise ValueError(f"Unknown colours/shapes {sorted(unknown)}; use names from {list(COLOURS)} / {SHAPES}.")
        if self.max_objects > len(self.colour_weights) * len(self.shape_weights):
            raise ValueError("max_objects exceeds the number of colour-shape categories; lower it or add colours.")
        if self.pope_questions_per_scene < 1:
            raise ValueError(f"pope_questions_per_scene must be >= 1, got {self.pope_questions_per_scene}.")
        missing = set(PROMPTS) - set(self.prompts)
        if missing:
            raise ValueError(f"prompts is missing templates for {sorted(missing)}; start from a copy of PROMPTS.")

    @property
    def categories(self) -> list[str]:
        """Every colour-shape category name ("red circle", ...), in a fixed order."""
        return [f"{c} {s}" for c in self.colour_weights for s in self.shape_weights]


@dataclass(frozen=True)
class SceneObject:
    """One drawn object.

    Args:
        shape (`str`): one of `SHAPES`.
        colour (`str`): a key of `COLOURS`.
        size (`str`): `"small"` or `"large"`.
        box (`tuple[int, int, int, int]`): tight pixel box `(x1, y1, x2, y2)` of the drawn pixels, x2/y2 exclusive.
        draw_box (`tuple[int, int, int, int]`): the square the shape was drawn in (same convention).
    """

    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]
    draw_box: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A synthetic image: its objects and canvas; `render()` draws it.

    Args:
        scene_id (`str`): unique id (`"<split>-<seed>-<index>"`).
        width (`int`), height (`int`): canvas size.
        objects (`tuple[SceneObject, ...]`): the objects, in drawing order.
        background (`tuple[int, int, int]`): background RGB.
    """

    scene_id: str
    width: int
    height: int
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int] = (255, 255, 255)

    def signature(self) -> tuple:
        """What makes two scenes identical (everything but the id)."""
        return (self.width, self.height, self.background, tuple(sorted(self.objects, key=lambda o: o.box)))

    def render(self) -> Image.Image:
        """The RGB image (no anti-aliasing: every object pixel has exactly the object's colour)."""
        image = Image.new("RGB", (self.width, self.height), self.background)
        draw = ImageDraw.Draw(image)
        for obj in self.objects:
            _draw_shape(draw, obj.shape, obj.draw_box, COLOURS[obj.colour])
        return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: Any) -> None:
    x1, y1, x2, y2 = box  # exclusive x2/y2; PIL's coordinates are inclusive
    if shape == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif shape == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
    else:
        draw.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=fill)


def _tight_box(shape: str, box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    mask = Image.new("L", size, 0)
    _draw_shape(ImageDraw.Draw(mask), shape, box, 255)
    return mask.getbbox()  # type: ignore[return-value]


def _overlaps(a: tuple[int, ...], b: tuple[int, ...], margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _draw_scene(rng: random.Random, scene_id: str, config: SyntheticConfig) -> Scene:
    side = config.canvas_size
    wanted = rng.randint(config.min_objects, config.max_objects)
    colours, shapes = list(config.colour_weights), list(config.shape_weights)
    used: set[tuple[str, str]] = set()
    placed: list[tuple[int, int, int, int]] = []
    objects = []
    for _ in range(wanted):
        while True:
            colour = rng.choices(colours, weights=[config.colour_weights[c] for c in colours])[0]
            shape = rng.choices(shapes, weights=[config.shape_weights[s] for s in shapes])[0]
            if (colour, shape) not in used:
                break
        nominal = None
        for size in ("large", "small") if rng.choice(SIZES) == "large" else ("small",):
            lo, hi = config.small_size if size == "small" else config.large_size
            extent = rng.randint(max(4, round(lo * side)), max(4, round(hi * side)))
            for _ in range(50):
                x, y = rng.randint(0, side - extent), rng.randint(0, side - extent)
                nominal = (x, y, x + extent, y + extent)
                if not any(_overlaps(nominal, other, config.margin) for other in placed):
                    break
                nominal = None
            if nominal is not None:
                break
        if nominal is None:
            continue  # no room left for this object: drop it (deterministically)
        used.add((colour, shape))
        placed.append(nominal)
        objects.append(SceneObject(shape, colour, size, _tight_box(shape, nominal, (side, side)), nominal))
    return Scene(scene_id, side, side, tuple(objects), tuple(config.background))


def random_stream(seed: int, name: str) -> random.Random:
    """The generator's random stream `name` (a split, or e.g. `"test/questions"`) for `seed`: independent of every
    other stream, and the same on every machine and Python version (string seeds hash with SHA-512)."""
    return random.Random(f"comm-vlm-synthetic/{seed}/{name}")


def generate_scenes(
    num_scenes: int,
    seed: int = 0,
    split: str = "test",
    config: SyntheticConfig | None = None,
    exclude: set | None = None,
) -> list[Scene]:
    """Draws `num_scenes` scenes, deterministically from `(seed, split)`.

    Args:
        num_scenes (`int`): how many scenes.
        seed (`int`): the seed; with `split` it fixes every draw.
        split (`str`): split name, part of the random stream and of the scene ids.
        config ([`SyntheticConfig`], *optional*): drawing parameters.
        exclude (`set`, *optional*): scene signatures (`Scene.signature()`) to redraw (used to keep splits disjoint).
    """
    if num_scenes < 0:
        raise ValueError(f"num_scenes must be >= 0, got {num_scenes}.")
    config = config or SyntheticConfig()
    rng = random_stream(seed, split)
    scenes: list[Scene] = []
    while len(scenes) < num_scenes:
        scene = _draw_scene(rng, f"{split}-{seed}-{len(scenes):06d}", config)
        if exclude is None or scene.signature() not in exclude:
            scenes.append(scene)
    return scenes


__all__ = [
    "COLOURS",
    "PROMPTS",
    "SHAPES",
    "SHORT_ANSWER",
    "SIZES",
    "Scene",
    "SceneObject",
    "SyntheticConfig",
    "generate_scenes",
    "random_stream",
]
