"""PyTorch Matryoshka-LLaVA-NeXT: M3 (Cai et al. 2024, arXiv 2405.17430) on transformers' LLaVA-NeXT.

    pixel_values (1 + rows * cols tiles of 336 px per image) -> CLIP -> projector -> (tiles, g * g, D)
        -> avg_pool2d(kernel = stride = g / s) per tile, the base view included (official `llava_arch.py`)
        -> LLaVA-NeXT's packing at the pooled side s: base view (S tokens), then the tiles joined into one
           (rows * s) x (cols * s) map, unpadded, with `image_newline` after every row (see
           `configuration_matryoshka_next` for the count and the unpadding rule)

The classes subclass `LlavaNextModel` / `LlavaNextForConditionalGeneration` and keep their attribute names, weights
and forward; only the image features are pooled before the packing. At the full scale nothing is pooled and the
outputs equal LLaVA-NeXT's bit for bit.

* Scale per request: the processor writes the placeholders of the chosen scale and returns `matryoshka_image_scales`
  (tokens per tile of every image); without it the model finds the one scale whose token count matches the
  placeholders. `generate(..., matryoshka_scale=S)` or `visual_token_budget=N` re-lay the prompt for that call.
* Training: with `labels` (and no explicit scale) the loss is the mean over `config.matryoshka_scales` of each
  scale's next-token loss, as the official code computes it: the vision tower and projector run once, the LLM once
  per scale on the prompt re-laid at that scale (our choice over the packed rows of `MatryoshkaLlavaModel`: tiled
  images have per-image token counts, and the official loop is the reference).

torch and transformers only, so that it can ship as remote code.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextCausalLMOutputWithPast,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    LlavaNextPreTrainedModel,
    image_size_to_num_patches,
    unpad_image,
)
from transformers.utils import can_return_tuple, logging

from .configuration_matryoshka import as_integer
from .configuration_matryoshka_next import MatryoshkaLlavaNextConfig, anyres_tile_grid
from .packing_matryoshka import IGNORE_INDEX, _as_list
from .packing_matryoshka_next import image_runs, relay_prompt
from .pooling_matryoshka import select_visual_tokens
from .scale_selector_matryoshka import auto_image_scales, build_scale_selector, is_auto_scale, refuse_auto_in_forward


logger = logging.get_logger(__name__)


@dataclass
class MatryoshkaLlavaNextImageOutput(BaseModelOutputWithPooling):
    """`get_image_features` output: the vision tower's outputs, `pooler_output` one `(tokens, hidden_size)` tensor per
    image (packed as LLaVA-NeXT packs), `matryoshka_image_scales` `(num_images,)` the tokens per tile of each."""

    matryoshka_image_scales: torch.LongTensor | None = None


@dataclass
class MatryoshkaLlavaNextCausalLMOutputWithPast(LlavaNextCausalLMOutputWithPast):
    """[`LlavaNextCausalLMOutputWithPast`]; with the all-scale loss, `logits` are those of the scale the input's
    placeholders hold and `matryoshka_scale_losses` `(num_scales,)` the loss of every scale."""

    matryoshka_scale_losses: torch.FloatTensor | None = None


def pool_tiles(tiles: torch.Tensor, scale: int) -> torch.Tensor:
    """Average-pools every tile's row-major g x g grid to `scale` = s * s tokens (kernel = stride = g / s).

    Args:
        tiles (`torch.Tensor` of shape `(num_tiles, g * g, hidden_size)`): projected features of one image's tiles.
        scale (`int`): tokens per tile.

    Returns:
        `torch.Tensor` of shape `(num_tiles, scale, hidden_size)`; the input itself at the full scale.
    """
    return select_visual_tokens(tiles, scale, "avg_pool")


class MatryoshkaLlavaNextModel(LlavaNextModel):
    """`LlavaNextModel` whose tiles are pooled to a Matryoshka scale before LLaVA-NeXT's packing."""

    config_class = MatryoshkaLlavaNextConfig
    config: MatryoshkaLlavaNextConfig

    def pack_image_features(
        self, image_features, image_sizes, vision_feature_select_strategy=None, image_newline=None
    ):
        """LLaVA-NeXT's packing at any tile side: the side s is read from the features (S = s * s tokens per tile).

        Args:
            image_features (`list[torch.Tensor]`): per image `(1 + rows * cols, s * s, hidden_size)`, base view first.
            image_sizes (`torch.Tensor` of shape `(num_images, 2)`): original (height, width) of every image.
            vision_feature_select_strategy (`str`, *optional*): unused (kept for `LlavaNextModel`'s signature).
            image_newline (`torch.Tensor` of shape `(hidden_size,)`, *optional*): appended after every row.

        Returns:
            `(list[torch.Tensor], torch.LongTensor)`: per image `(tokens, hidden_size)`, and the token counts.
        """
        packed = []
        for features, size in zip(image_features, image_sizes):
            tokens_per_tile = features.shape[1]
            side = int(tokens_per_tile**0.5)
            if side * side != tokens_per_tile:
                raise ValueError(f"A tile has {tokens_per_tile} tokens, not a square grid; pool to a scale s*s.")
            if features.shape[0] == 1:
                image = features[0]
                if image_newline is not None:
                    image = torch.cat((image, image_newline[None].to(image)), dim=0)
                packed.append(image)
                continue
            size_list = size.tolist() if isinstance(size, torch.Tensor) else list(size)
            rows, cols = anyres_tile_grid(
                size_list, self.config.image_grid_pinpoints, self.config.vision_config.image_size
            )
            if features.shape[0] - 1 != rows * cols:
                raise ValueError(
                    f"An image of size {size_list} is cut into {rows}x{cols} tiles, but {features.shape[0] - 1} "
                    "tiles were encoded: pass the `image_sizes` the processor returned with its `pixel_values`."
                )
            base, tiles = features[0], features[1:]
            # (rows * cols, s * s, D) -> (D, rows * s, cols * s): tile (r, c) covers rows r*s.., columns c*s..
            grid = tiles.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).contiguous()
            grid = grid.flatten(1, 2).flatten(2, 3)
            grid = unpad_image(grid, size)  # (D, h_S, w_S)
            if image_newline is not None:
                newline = image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.device, grid.dtype)
                grid = torch.cat((grid, newline), dim=-1)  # (D, h_S, w_S + 1)
            packed.append(torch.cat((base, grid.flatten(1, 2).transpose(0, 1)), dim=0))
        lengths = torch.tensor([p.shape[0] for p in packed], dtype=torch.long, device=image_features[0].device)
        return packed, lengths

    def encode_tiles(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> tuple[list[torch.Tensor], BaseModelOutputWithPooling]:
        """Projected features of every tile, split per image (no pooling, no packing).

        Args:
            pixel_values (`torch.Tensor` of shape `(num_images, max_tiles, 3, H, W)` or `(total_tiles, 3, H, W)`).
            image_sizes (`torch.Tensor` of shape `(num_images, 2)`): original (height, width) of every image.
            vision_feature_layer, vision_feature_select_strategy: as for `LlavaNextModel` (default: the config's).

        Returns:
            per image a `(1 + rows * cols, g * g, hidden_size)` tensor, and the vision tower's outputs.
        """
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(
                "Matryoshka pooling needs the CLS token dropped: vision_feature_select_strategy='default'."
            )
        num_tiles = [
            image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
            for size in image_sizes
        ]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, num_tiles)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected 4 or 5 dimensions.")
        if pixel_values.shape[0] != sum(num_tiles):
            raise ValueError(
                f"{pixel_values.shape[0]} tiles for image sizes {[list(map(int, s)) for s in image_sizes]}, which cut "
                f"into {sum(num_tiles)}: pass the `pixel_values` and `image_sizes` the processor returned together."
            )
        kwargs.pop("output_hidden_states", None)
        outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True, **kwargs)
        if isinstance(layer, int):
            selected = outputs.hidden_states[layer]
        else:
            selected = torch.cat([outputs.hidden_states[i] for i in layer], dim=-1)
        projected = self.multi_modal_projector(selected[:, 1:])  # (total_tiles, g * g, D)
        return list(torch.split(projected, num_tiles, dim=0)), outputs

    def image_scales_for(
        self,
        input_ids: torch.LongTensor | None,
        image_sizes: torch.Tensor,
        matryoshka_scale: int | None = None,
        matryoshka_image_scales: torch.LongTensor | Sequence[int] | None = None,
    ) -> list[int]:
        """The tokens per tile of every image: explicit per image, one for all, or the one scale whose token count
        matches the placeholders in `input_ids` (default scale without `input_ids`).

        Raises:
            ValueError: an invalid scale, a count per image that does not match the images, or placeholders that no
                single scale explains (the expected counts are listed).
        """
        sizes = [[int(v) for v in size] for size in image_sizes]
        scales = _as_list(matryoshka_image_scales)
        if scales is not None:
            if len(scales) != len(sizes):
                raise ValueError(f"`matryoshka_image_scales` has {len(scales)} entries for {len(sizes)} images.")
        elif matryoshka_scale is not None:
            scales = [as_integer(matryoshka_scale, "matryoshka_scale")] * len(sizes)
        elif input_ids is None:
            scales = [self.config.matryoshka_default_scale] * len(sizes)
        else:
            total = int((input_ids == self.config.image_token_id).sum())
            scales = [self.config.placeholder_scale(total, sizes)] * len(sizes)
        for scale in set(scales):
            self.config.check_scale(scale)
            if scale not in self.config.matryoshka_scales:
                logger.warning_once(
                    f"{scale} tokens per tile is valid for the tile grid but was not trained "
                    f"(matryoshka_scales={self.config.matryoshka_scales})."
                )
        return [int(s) for s in scales]

    def pooled_features(
        self, tiles: list[torch.Tensor], image_sizes: torch.Tensor, scales: Sequence[int]
    ) -> list[torch.Tensor]:
        """Per image `(tokens, hidden_size)`: every tile pooled to the image's scale, then packed."""
        pooled = [pool_tiles(image_tiles, scale) for image_tiles, scale in zip(tiles, scales)]
        packed, _ = self.pack_image_features(pooled, image_sizes, image_newline=self.image_newline)
        return packed

    def relaid_image_features(
        self, pixel_values, image_sizes, image_index, run_scales, vision_feature_layer=None, strategy=None
    ) -> MatryoshkaLlavaNextImageOutput:
        """Features of the image runs of a re-laid batch: run r shows image `image_index[r]` at `run_scales[r]`."""
        index, scales = _as_list(image_index), _as_list(run_scales)
        if scales is None or len(scales) != len(index):
            raise ValueError("A re-laid batch needs `matryoshka_image_scales` with one scale per run of the index.")
        if index and max(index) >= len(image_sizes):
            raise ValueError(f"`matryoshka_image_index` refers to image {max(index)} of {len(image_sizes)}.")
        for scale in set(scales):
            self.config.check_scale(scale)
        tiles, outputs = self.encode_tiles(pixel_values, image_sizes, vision_feature_layer, strategy)
        sizes = torch.stack([torch.as_tensor(image_sizes[i]) for i in index]) if index else image_sizes[:0]
        return MatryoshkaLlavaNextImageOutput(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=self.pooled_features([tiles[i] for i in index], sizes, scales),
            matryoshka_image_scales=torch.tensor(scales, dtype=torch.long),
        )

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        matryoshka_scale: int | None = None,
        matryoshka_image_scales: torch.LongTensor | Sequence[int] | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> MatryoshkaLlavaNextImageOutput | tuple:
        """Image features as LLaVA-NeXT packs them, every tile pooled to the image's scale.

        Args:
            pixel_values, image_sizes: as for `LlavaNextModel.get_image_features`.
            matryoshka_scale (`int`, *optional*): tokens per tile of every image (default: the config's default).
            matryoshka_image_scales (`torch.LongTensor` of shape `(num_images,)`, *optional*): per image instead.
            vision_feature_layer, vision_feature_select_strategy: as for `LlavaNextModel`.

        Returns:
            [`MatryoshkaLlavaNextImageOutput`]: the vision tower's outputs; `pooler_output`: packed tokens per image.
        """
        scales = self.image_scales_for(None, image_sizes, matryoshka_scale, matryoshka_image_scales)
        tiles, outputs = self.encode_tiles(
            pixel_values, image_sizes, vision_feature_layer, vision_feature_select_strategy, **kwargs
        )
        return MatryoshkaLlavaNextImageOutput(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=self.pooled_features(tiles, image_sizes, scales),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            matryoshka_image_scales=torch.tensor(scales, dtype=torch.long, device=tiles[0].device),
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        matryoshka_scale: int | None = None,
        matryoshka_image_scales: torch.LongTensor | None = None,
        matryoshka_image_index: torch.LongTensor | None = None,
        **kwargs,
    ):
        """`LlavaNextModel.forward` with the images pooled to `matryoshka_scale` / `matryoshka_image_scales` (tokens
        per tile; default: the scale the placeholders hold, see `image_scales_for`). A batch re-laid for all scales
        (`relay_next_training_batch`) names the image of every run in `matryoshka_image_index`, with
        `matryoshka_image_scales` then per run; each image is still encoded once."""
        refuse_auto_in_forward(matryoshka_scale)
        if pixel_values is not None and pixel_values.size(0) > 0 and (mm_encoder_outputs or {}).get("image") is None:
            if image_sizes is None:
                raise ValueError("LLaVA-NeXT images need `image_sizes` (the processor returns them).")
            if matryoshka_image_index is not None:
                image = self.relaid_image_features(
                    pixel_values,
                    image_sizes,
                    matryoshka_image_index,
                    matryoshka_image_scales,
                    vision_feature_layer,
                    vision_feature_select_strategy,
                )
            else:
                if self.training and torch.is_grad_enabled() and matryoshka_scale is None:
                    raise ValueError(
                        "Matryoshka-LLaVA-NeXT is training on a batch that was not re-laid for its scales and has no "
                        "`labels` (a loss computed outside the model, e.g. TRL's), so it would train only the scale "
                        "the placeholders hold, not the mean over `matryoshka_scales`. Pass `labels` (the model then "
                        "averages the scales), or re-lay every batch with `comm_vlm.training.TrainingBatchCollator` "
                        "(`build_trainer` does), or pass `matryoshka_scale` to train one scale."
                    )
                scales = self.image_scales_for(input_ids, image_sizes, matryoshka_scale, matryoshka_image_scales)
                image = self.get_image_features(
                    pixel_values,
                    image_sizes,
                    matryoshka_image_scales=scales,
                    vision_feature_layer=vision_feature_layer,
                    vision_feature_select_strategy=vision_feature_select_strategy,
                    return_dict=True,
                )
            mm_encoder_outputs = {**(mm_encoder_outputs or {}), "image": image}
            pixel_values = None
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )


class MatryoshkaLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """Matryoshka-LLaVA-NeXT with a language-modeling head: per-request scales in `generate`, the all-scale loss with
    `labels`. `accepts_loss_kwargs = False`: the loss is the mean of per-scale token means."""

    config_class = MatryoshkaLlavaNextConfig
    config: MatryoshkaLlavaNextConfig
    accepts_loss_kwargs = False

    def __init__(self, config: MatryoshkaLlavaNextConfig):
        LlavaNextPreTrainedModel.__init__(self, config)
        self.model = MatryoshkaLlavaNextModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.scale_selector = build_scale_selector(config)  # `matryoshka_scale="auto"`; None without a selector
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, **kwargs):
        """See [`MatryoshkaLlavaNextModel.get_image_features`]."""
        return self.model.get_image_features(pixel_values, image_sizes, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        matryoshka_scale: int | None = None,
        matryoshka_image_scales: torch.LongTensor | None = None,
        matryoshka_image_index: torch.LongTensor | None = None,
        **kwargs,
    ) -> MatryoshkaLlavaNextCausalLMOutputWithPast | tuple:
        """`LlavaNextForConditionalGeneration.forward` at a Matryoshka scale.

        Args:
            labels (`torch.LongTensor` of shape `(B, T)`, *optional*): next-token targets (-100 = ignored). With
                images and no explicit scale, the loss is the mean over `config.matryoshka_scales` of each scale's
                token-mean loss (`random_scale` mode while training: one random scale per step); image placeholders
                are never targets.
            matryoshka_scale (`int`, *optional*): tokens per tile of every image (checked against the placeholders).
            matryoshka_image_scales (`torch.LongTensor` of shape `(num_images,)`, *optional*): per image (the
                processor returns it); the scales the placeholders hold, so the all-scale loss still applies.
            matryoshka_image_index (`torch.LongTensor` of shape `(num_runs,)`, *optional*): a batch re-laid for all
                scales (`relay_next_training_batch`): the image of every run; the loss is then the token mean of
                its rows.

        See `LlavaNextForConditionalGeneration.forward` for the other arguments.
        """
        refuse_auto_in_forward(matryoshka_scale)
        common = dict(
            image_sizes=image_sizes,
            past_key_values=past_key_values,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        if labels is not None and input_ids is not None:
            labels = labels.masked_fill(input_ids == self.config.image_token_id, IGNORE_INDEX)
        all_scales = (
            labels is not None
            and pixel_values is not None
            and input_ids is not None
            and mm_encoder_outputs is None
            and matryoshka_scale is None
            and matryoshka_image_index is None
        )
        if not all_scales:
            outputs = super().forward(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                mm_encoder_outputs=mm_encoder_outputs,
                matryoshka_scale=matryoshka_scale,
                matryoshka_image_scales=matryoshka_image_scales,
                matryoshka_image_index=matryoshka_image_index,
                return_dict=True,
                **common,
            )
            return MatryoshkaLlavaNextCausalLMOutputWithPast(**outputs)
        current = self.model.image_scales_for(input_ids, image_sizes, None, matryoshka_image_scales)
        scales = list(self.config.matryoshka_scales)
        if self.training and self.config.matryoshka_training_mode == "random_scale":
            scales = [random.choice(scales)]
        tiles, _ = self.model.encode_tiles(
            pixel_values, image_sizes, vision_feature_layer, vision_feature_select_strategy
        )
        losses, kept = [], None
        for scale in scales:
            target = [scale] * len(current)
            if target == current:
                ids, mask, scale_labels, positions = input_ids, attention_mask, labels, position_ids
            else:
                ids, mask, scale_labels = relay_prompt(
                    self.config, input_ids, attention_mask, labels, image_sizes, current, target
                )
                positions = None
            features = self.model.pooled_features(tiles, image_sizes, target)
            outputs = super().forward(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                labels=scale_labels,
                mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)},
                return_dict=True,
                **common,
            )
            losses.append(outputs.loss)
            if kept is None or target == current:
                kept = outputs
        scale_losses = torch.stack(losses)
        return MatryoshkaLlavaNextCausalLMOutputWithPast(
            **{**kept, "loss": scale_losses.mean()}, matryoshka_scale_losses=scale_losses.detach()
        )

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        *args,
        matryoshka_scale: int | None = None,
        visual_token_budget: int | None = None,
        **kwargs,
    ):
        """`GenerationMixin.generate` with a per-call scale.

        Args:
            matryoshka_scale (`int` or `"auto"`, *optional*): tokens per tile for every image of this call; `"auto"`:
                the model's learned `scale_selector` picks each image's scale from its base view's projected grid and
                its prompt (the tiles are encoded once; see `scale_selector_matryoshka`).
            visual_token_budget (`int`, *optional*): total visual tokens per prompt (tiles, base views and newlines of
                all its images or video grids); each prompt gets the largest trained scale that fits.

        Without either, every image keeps the scale its placeholders hold. When the prompt must be re-laid, it is
        left-padded for this call and the returned sequences still begin with the caller's `input_ids`.
        """
        input_ids = kwargs.pop("input_ids", inputs)
        pixel_values, image_sizes = kwargs.get("pixel_values"), kwargs.get("image_sizes")
        if input_ids is None or pixel_values is None or image_sizes is None:
            if matryoshka_scale is not None or visual_token_budget is not None:
                raise ValueError("matryoshka_scale/visual_token_budget need input_ids, pixel_values and image_sizes.")
            return super().generate(input_ids, *args, **kwargs)
        if matryoshka_scale is not None and visual_token_budget is not None:
            raise ValueError("Pass either matryoshka_scale or visual_token_budget, not both.")
        current = self.model.image_scales_for(input_ids, image_sizes, None, kwargs.get("matryoshka_image_scales"))
        sizes = [[int(v) for v in size] for size in image_sizes]
        auto, encoded = is_auto_scale(matryoshka_scale), None
        if auto or visual_token_budget is not None:  # both choose per row
            _, per_row = image_runs(self.config, input_ids, kwargs.get("attention_mask"), sizes, current)
        if auto:  # encode once: the selector reads the base views, the tiles are pooled
            options = ("vision_feature_layer", "vision_feature_select_strategy")
            tiles, _ = self.model.encode_tiles(pixel_values, image_sizes, *(kwargs.pop(k, None) for k in options))
            base_views = torch.stack([image_tiles[0] for image_tiles in tiles])  # (num_images, g * g, D)
            target = auto_image_scales(self, input_ids, kwargs.get("attention_mask"), base_views, per_row)
            encoded = BaseModelOutputWithPooling(pooler_output=self.model.pooled_features(tiles, image_sizes, target))
        elif matryoshka_scale is not None:
            target = self.model.image_scales_for(None, image_sizes, matryoshka_scale)
        elif visual_token_budget is not None:
            target, k = [], 0
            for n in per_row:
                target += self.config.budget_scales(sizes[k : k + n], visual_token_budget)
                k += n
        else:
            target = current
        kwargs["matryoshka_image_scales"] = torch.tensor(target, dtype=torch.long, device=input_ids.device)
        if encoded is not None:
            kwargs.pop("pixel_values")
            kwargs["mm_encoder_outputs"] = {**(kwargs.get("mm_encoder_outputs") or {}), "image": encoded}
        if target == current:
            return super().generate(input_ids, *args, **kwargs)
        ids, mask, _ = relay_prompt(
            self.config,
            input_ids,
            kwargs.get("attention_mask"),
            None,
            image_sizes,
            current,
            target,
            padding_side="left",
        )
        kwargs["attention_mask"] = mask
        output = super().generate(ids, *args, **kwargs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        sequences = torch.cat([prompt, sequences[:, ids.shape[1] :]], dim=1)
        if isinstance(output, torch.Tensor):
            return sequences
        output.sequences = sequences
        return output


__all__ = [
    "MatryoshkaLlavaNextCausalLMOutputWithPast",
    "MatryoshkaLlavaNextForConditionalGeneration",
    "MatryoshkaLlavaNextImageOutput",
    "MatryoshkaLlavaNextModel",
    "pool_tiles",
]
