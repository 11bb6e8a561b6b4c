"""The offline encoder warm-up (the demo's stand-in for pretrained CLIP/DINOv2)."""

import pytest
import torch

from comm_vlm.demo.encoder_warmup import patch_labels, warm_up_encoders
from comm_vlm.demo.synthetic import COLOURS, SHAPES, generate_scenes
from comm_vlm.testing import build_tiny_checkpoint, tiny_vision_config


pytestmark = pytest.mark.demo  # the demo (`comm_vlm.demo`): run with `python -m pytest -m demo`


def test_patch_labels_name_the_object_under_each_patch_and_its_box():
    scene = generate_scenes(1, 3, "train")[0]
    grid = 8
    colour_ids, shape_ids, boxes = patch_labels(scene, grid, list(COLOURS), list(SHAPES))
    assert colour_ids.shape == shape_ids.shape == (grid * grid,) and boxes.shape == (grid * grid, 4)
    on_object = colour_ids > 0
    assert torch.equal(on_object, shape_ids > 0) and on_object.any()
    assert torch.all(boxes[~on_object] == 0)
    for obj in scene.objects:
        mine = (colour_ids == list(COLOURS).index(obj.colour) + 1) & (shape_ids == list(SHAPES).index(obj.shape) + 1)
        x1, y1, x2, y2 = obj.box
        expected = torch.tensor([x1 / scene.width, y1 / scene.height, x2 / scene.width, y2 / scene.height])
        assert torch.allclose(boxes[mine], expected.expand(int(mine.sum()), 4))
        # every labelled patch's centre lies inside the object's box
        rows, cols = mine.nonzero().squeeze(-1).div(grid, rounding_mode="floor"), mine.nonzero().squeeze(-1) % grid
        cx, cy = (cols + 0.5) / grid * scene.width, (rows + 0.5) / grid * scene.height
        assert torch.all((cx >= x1) & (cx <= x2) & (cy >= y1) & (cy <= y2))


@pytest.mark.parametrize("box_weight", [0.0, 5.0])
def test_warm_up_trains_only_the_encoders_and_reports_object_accuracy(tmp_path, box_weight):
    torch.manual_seed(0)
    vision = {"image_size": 32, "patch_size": 8}
    model, processor = build_tiny_checkpoint(
        tmp_path,
        vision_config=tiny_vision_config(**vision),
        secondary_vision_config=tiny_vision_config("dinov2", **vision),
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scenes = generate_scenes(16, 0, "train")
    accuracy = warm_up_encoders(model, processor.image_processor, scenes, steps=3, batch_size=4, box_weight=box_weight)
    assert set(accuracy) == {"vision", "secondary_vision"}
    assert all(0.0 <= a <= 1.0 for a in accuracy.values())
    for name, value in model.state_dict().items():
        tower = ".vision_tower." in f".{name}" or "secondary_vision_tower." in name
        changed = not torch.equal(before[name], value)
        if not tower:
            assert not changed, f"{name} is not an encoder weight but changed"
    towers = [n for n in before if "vision_tower.encoder.layers.0.mlp" in n or "vision_tower.encoder.layer.0.mlp" in n]
    assert towers and all(not torch.equal(before[n], model.state_dict()[n]) for n in towers)
    assert not any(p.training for p in model.model.vision_towers)
