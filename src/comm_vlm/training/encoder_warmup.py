"""Warm-up of tiny, randomly initialised vision encoders on synthetic scenes (offline demo only).

The papers' recipes start from pretrained encoders (CLIP, DINOv2) and keep them frozen. Offline there are none, so
before the two VLM stages the main job gives each tiny encoder a few hundred steps of dense supervision on the same
synthetic scenes: every patch token predicts the colour and the shape of the object under its centre (or
background), from the mean of the layers the COMM merge reads. This is a stand-in for pretraining, stated as such in
the main job's output; with real checkpoints it is skipped and the paper's frozen-encoder recipes apply unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from tqdm.auto import tqdm

from ..configuration_comm import patch_grid


def patch_labels(scene, grid: int, colours: list[str], shapes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch colour and shape class (0 = background) of a synthetic `Scene`, row-major `(grid * grid,)` each."""
    from ..evaluation.synthetic import _draw_shape

    colour_ids = torch.zeros(grid * grid, dtype=torch.long)
    shape_ids = torch.zeros(grid * grid, dtype=torch.long)
    for obj in scene.objects:
        mask = Image.new("L", (scene.width, scene.height), 0)
        _draw_shape(ImageDraw.Draw(mask), obj.shape, obj.draw_box, 255)
        covered = torch.tensor(list(mask.resize((grid, grid), Image.Resampling.BOX).getdata())) >= 128
        colour_ids[covered] = colours.index(obj.colour) + 1
        shape_ids[covered] = shapes.index(obj.shape) + 1
    return colour_ids, shape_ids


def warm_up_encoders(
    model, image_processor, scenes, steps: int = 300, batch_size: int = 32, learning_rate: float = 2e-3, seed: int = 0
) -> dict[str, float]:
    """Trains every vision tower of a COMM-family `model` on per-patch colour/shape labels of `scenes`.

    Returns:
        per encoder prefix, the patch accuracy (colour and shape both right) on the last batch.
    """
    from ..evaluation.synthetic import COLOURS, SHAPES

    colours, shapes = list(COLOURS), list(SHAPES)
    pixel_values = image_processor([s.render() for s in scenes], return_tensors="pt").pixel_values
    generator = torch.Generator().manual_seed(seed)
    results = {}
    inner = model.model
    for tower, prefix in zip(inner.vision_towers, model.config.encoder_prefixes):
        grid = patch_grid(getattr(model.config, f"{prefix}_config"))
        labels = [patch_labels(s, grid, colours, shapes) for s in scenes]
        colour_ids = torch.stack([c for c, _ in labels])  # (S, N)
        shape_ids = torch.stack([s for _, s in labels])
        head = nn.Linear(tower.config.hidden_size, len(colours) + len(shapes) + 2)
        tower.requires_grad_(True).train()
        optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=learning_rate)
        for _ in tqdm(range(steps), desc=f"warm-up {prefix} encoder"):
            idx = torch.randint(len(scenes), (batch_size,), generator=generator)
            pixels = inner._encoder_pixels(pixel_values[idx], prefix)
            features = inner._encode(tower, pixels, prefix).mean(0)  # (B, N, C): the layers the merge reads
            logits = head(features)
            colour_logits, shape_logits = logits.split([len(colours) + 1, len(shapes) + 1], dim=-1)
            loss = F.cross_entropy(colour_logits.flatten(0, 1), colour_ids[idx].flatten()) + F.cross_entropy(
                shape_logits.flatten(0, 1), shape_ids[idx].flatten()
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        right = (colour_logits.argmax(-1) == colour_ids[idx]) & (shape_logits.argmax(-1) == shape_ids[idx])
        results[prefix] = right.float().mean().item()
        tower.eval()
    return results
