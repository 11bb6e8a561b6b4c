"""Running a pretrained ViT at another input resolution: its position table resampled once, exactly, and saved.

COMM runs CLIP ViT-L/14-336 and DINOv2 ViT-L/14 on the same 336 px image (24x24 patches each), though DINOv2 was
published at 518 px (`image_size: 518`, a 37x37 position table). transformers' DINOv2 resamples its table to the input
size on every call (bicubic, `Dinov2Embeddings.interpolate_pos_encoding`); CLIP and SigLIP do so when asked. Here the
table is resampled once, by the encoder's own `interpolate_pos_encoding`, and the encoder is rebuilt with `image_size`
set to the new resolution and the resampled table as its position parameter. The rebuilt encoder's outputs at that
resolution are identical to the published one's with interpolation, and a saved checkpoint reloads without any
interpolation step (the table is a plain weight; `config.image_size` says its grid).

Each encoder family names where its table lives in `POSITION_TABLES`; others are refused with a clear error.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class PositionTable:
    """Where an encoder family keeps its learned position table.

    Args:
        embeddings (`str`): attribute path of the embeddings module that has `interpolate_pos_encoding`.
        key (`str`): state-dict key of the table.
        prefix_tokens (`int`): tokens before the patches that have a position (1 for a CLS token, 0 for SigLIP).
    """

    embeddings: str
    key: str
    prefix_tokens: int


POSITION_TABLES: dict[str, PositionTable] = {
    "clip_vision_model": PositionTable("embeddings", "embeddings.position_embedding.weight", 1),
    "siglip_vision_model": PositionTable("embeddings", "embeddings.position_embedding.weight", 0),
    "dinov2": PositionTable("embeddings", "embeddings.position_embeddings", 1),
    "dinov2_with_registers": PositionTable("embeddings", "embeddings.position_embeddings", 1),
}


def _side(value: int | list[int] | tuple[int, ...]) -> int:
    return value[0] if isinstance(value, (list, tuple)) else value


def resolution_for_grid(config: PretrainedConfig, grid: int) -> int:
    """The input size (px) at which encoder `config` produces a `grid` x `grid` patch grid."""
    return grid * _side(config.patch_size)


def at_resolution(encoder: nn.Module, config: PretrainedConfig, image_size: int) -> tuple[nn.Module, PretrainedConfig]:
    """`encoder` rebuilt to take `image_size` px inputs, its position table resampled by its own interpolation.

    Args:
        encoder (`nn.Module`): a pretrained vision model (`CLIPVisionModel`, `SiglipVisionModel`, `Dinov2Model`, ...).
        config (`PretrainedConfig`): its config (not modified).
        image_size (`int`): the new input side in pixels; a multiple of the patch size.

    Returns:
        `(encoder, config)`: the same objects when `image_size` is already the config's, else a new encoder (same
        dtype and device) and a copy of the config with `image_size` set.

    Raises:
        ValueError: `image_size` is not a multiple of the patch size, or the family has no entry in
            `POSITION_TABLES`.
    """
    native, patch = _side(config.image_size), _side(config.patch_size)
    if image_size == native:
        return encoder, config
    if image_size % patch:
        raise ValueError(f"image_size {image_size} is not a multiple of the {config.model_type} patch size {patch}.")
    spec = POSITION_TABLES.get(config.model_type)
    if spec is None:
        raise ValueError(
            f"Cannot run a {config.model_type} encoder at {image_size} px instead of its native {native} px: its "
            f"position table is not known here (known: {sorted(POSITION_TABLES)}). Use an encoder whose patch grid "
            "matches the primary's at its native size, or add its table to `comm_vlm.resolution.POSITION_TABLES`."
        )
    state = encoder.state_dict()
    table = state[spec.key]  # (positions, C) for CLIP / SigLIP, (1, positions, C) for DINOv2
    grid = image_size // patch
    probe = table.new_zeros(1, spec.prefix_tokens + grid * grid, table.shape[-1])  # only its length is read
    embeddings = operator.attrgetter(spec.embeddings)(encoder)
    with torch.no_grad():
        resampled = embeddings.interpolate_pos_encoding(probe, image_size, image_size)  # (1, positions', C)
    state[spec.key] = resampled.reshape(*table.shape[:-2], -1, table.shape[-1]).contiguous()  # table's own rank

    new_config = copy.deepcopy(config)
    new_config.image_size = image_size
    with torch.device("meta"):
        rebuilt = AutoModel.from_config(new_config)
    rebuilt.load_state_dict(state, assign=True)
    for name, buffer in encoder.named_buffers():
        if name not in state:  # non-persistent buffers (e.g. CLIP's position_ids): rebuilt for the new grid
            _rebuild_buffer(rebuilt, new_config, name, buffer)
    leftover = [n for n, t in (*rebuilt.named_parameters(), *rebuilt.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"Rebuilding the {config.model_type} encoder at {image_size} px left {leftover} unset.")
    logger.info(
        f"{config.model_type}: position table resampled from {native // patch}x{native // patch} to {grid}x{grid} "
        f"({native} -> {image_size} px)."
    )
    return rebuilt.to(table.device), new_config


def _rebuild_buffer(model: nn.Module, config: PretrainedConfig, name: str, old: torch.Tensor) -> None:
    """Recreates a non-persistent buffer on a real device: `position_ids` for the new grid, anything else copied."""
    module_name, _, buffer_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    if buffer_name == "position_ids":
        positions = module.position_embedding.num_embeddings
        value = torch.arange(positions, device=old.device).expand((1, -1))
    else:
        value = old.clone()
    module.register_buffer(buffer_name, value, persistent=False)


__all__ = ["POSITION_TABLES", "PositionTable", "at_resolution", "resolution_for_grid"]
