"""Warm-up of tiny, randomly initialised vision encoders on synthetic scenes (offline demo only).

The papers' recipes start from pretrained encoders (CLIP, DINOv2) and keep them frozen. Offline there are none, so
before the two VLM stages the main job gives each tiny encoder a few hundred steps of dense supervision on the same
synthetic scenes: every patch token predicts the colour, the shape and the colour-shape category of the object under
its centre (or background) and regresses that object's box, from the mean of the layers the COMM merge reads. This
is a stand-in for pretraining (what pretrained encoders know about objects and where they are), stated as such in
the main job's output; with real checkpoints it is skipped and the paper's frozen-encoder recipes apply unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from tqdm.auto import tqdm

from ..models.configuration_comm import patch_grid
from ..models.image_utils import normalize_box


def patch_labels(
    scene, grid: int, colours: list[str], shapes: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch labels of a synthetic `Scene`, row-major over the `grid x grid` patches.

    Returns:
        colour and shape class (0 = background), each `(grid * grid,)`, and the normalised box `(x1, y1, x2, y2)` of
        the object under each patch, `(grid * grid, 4)` (zeros on background).
    """
    from .scenes import _draw_shape

    colour_ids = torch.zeros(grid * grid, dtype=torch.long)
    shape_ids = torch.zeros(grid * grid, dtype=torch.long)
    boxes = torch.zeros(grid * grid, 4)
    for obj in scene.objects:
        mask = Image.new("L", (scene.width, scene.height), 0)
        _draw_shape(ImageDraw.Draw(mask), obj.shape, obj.draw_box, 255)
        covered = torch.tensor(list(mask.resize((grid, grid), Image.Resampling.BOX).getdata())) >= 128
        colour_ids[covered] = colours.index(obj.colour) + 1
        shape_ids[covered] = shapes.index(obj.shape) + 1
        boxes[covered] = torch.tensor(normalize_box(obj.box, (scene.width, scene.height)))
    return colour_ids, shape_ids, boxes


def warm_up_encoders(
    model,
    image_processor,
    scenes,
    steps: int = 600,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    seed: int = 0,
    object_weight: float = 5.0,
    box_weight: float = 5.0,
) -> dict[str, float]:
    """Trains every vision tower of a COMM-family `model` on per-patch colour/shape/category labels of `scenes`.

    Args:
        object_weight (`float`): loss weight of a patch on an object against 1 for a background patch. Objects cover
            about a sixth of the patches; without the weight the encoder learns colours and background quickly but
            shapes (which need context from neighbouring patches) only after several times more steps.
        box_weight (`float`): weight of the L1 loss of each object patch's regression of its object's normalised box
            (dense box regression, as detection pre-training gives; 0 turns it off).

    Returns:
        per encoder prefix, the category accuracy over the object patches of the last batch.
    """
    from .scenes import COLOURS, SHAPES

    colours, shapes = list(COLOURS), list(SHAPES)
    pixel_values = image_processor([s.render() for s in scenes], return_tensors="pt").pixel_values
    generator = torch.Generator().manual_seed(seed)
    results = {}
    inner = model.model
    for tower, prefix in zip(inner.vision_towers, model.config.encoder_prefixes):
        grid = patch_grid(getattr(model.config, f"{prefix}_config"))
        labels = [patch_labels(s, grid, colours, shapes) for s in scenes]
        colour_ids = torch.stack([c for c, _, _ in labels])  # (S, N)
        shape_ids = torch.stack([s for _, s, _ in labels])
        boxes = torch.stack([b for _, _, b in labels])  # (S, N, 4)
        # Colour, shape and one class per colour-shape category (0 = background everywhere): the features carry each
        # attribute (what a question names) and their binding (what tells "red circle" from "red square").
        category_ids = torch.where(colour_ids > 0, (colour_ids - 1) * len(shapes) + shape_ids, 0)
        sizes = [len(colours) + 1, len(shapes) + 1, len(colours) * len(shapes) + 1]
        head = nn.Linear(tower.config.hidden_size, sum(sizes) + 4)
        tower.requires_grad_(True).train()
        optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=learning_rate)
        for _ in tqdm(range(steps), desc=f"warm-up {prefix} encoder"):
            idx = torch.randint(len(scenes), (batch_size,), generator=generator)
            pixels = inner._encoder_pixels(pixel_values[idx], prefix)
            features = inner._encode(tower, pixels, prefix).mean(0)  # (B, N, C): the layers the merge reads
            *logits, box = head(features).split([*sizes, 4], dim=-1)  # (B, N, classes) per label kind, (B, N, 4)
            targets = (colour_ids[idx], shape_ids[idx], category_ids[idx])
            weight = 1 + (object_weight - 1) * (colour_ids[idx] > 0).float().flatten()  # (B * N,)
            loss = sum(
                (F.cross_entropy(lg.flatten(0, 1), t.flatten(), reduction="none") * weight).sum() / weight.sum()
                for lg, t in zip(logits, targets)
            )
            on_object = colour_ids[idx] > 0  # (B, N)
            if box_weight > 0 and on_object.any():
                loss = loss + box_weight * F.l1_loss(box.sigmoid()[on_object], boxes[idx][on_object])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        on_object = colour_ids[idx] > 0
        results[prefix] = (logits[2].argmax(-1) == category_ids[idx])[on_object].float().mean().item()
        tower.eval()
    return results
