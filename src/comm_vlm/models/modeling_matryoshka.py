"""PyTorch Matryoshka-LLaVA (M3): nested visual tokens on any COMM-family visual branch.

Paper: "Matryoshka Multimodal Models" (Cai et al. 2024, arXiv 2405.17430); official code GitHub
mu-cai/matryoshka-mm. One set of weights serves S in {1, 9, 36, 144, 576} visual tokens per image:

    pixel_values -> COMM visual branch (encoders, merge, align, projector) -> g x g projected grid
                 -> avg_pool2d(kernel = stride = g / sqrt(S)) per image (row-major) -> the LLM's image placeholders

* Inference: the scale of every image is read from its placeholder run (the processor writes S placeholders per
  image, or per-image counts under a token budget and passes them as `matryoshka_image_scales`), so
  `pipeline("image-text-to-text")` just works; `generate(..., matryoshka_scale=9)` or `visual_token_budget=N`
  re-lay the prompt for that call (the returned sequences still start with the caller's prompt).
* `generate(..., matryoshka_scale="auto")` (or the processor's `matryoshka_scale="auto"`): a learned selector
  (`scale_selector_matryoshka`, `config.matryoshka_scale_selector`) picks every image's scale from its full grid and
  its prompt; the images are encoded once.
* Training: with `labels`, the loss is the mean over `config.matryoshka_scales` of each scale's next-token loss
  (`random_scale`: one random scale per sample). The vision branch runs once per image; all scales are pooled from
  the same projected grid, and the scale variants are packed into rows (see `packing_matryoshka`) that go through
  the LLM in one batched call (`matryoshka_packing="one_row"`) or two (`"split"`: full-grid rows, then the packed
  rest), never one pass per scale. A Trainer that passes `labels` gets the objective from the model. A loss computed
  outside the model (TRL's fused LM head calls the backbone without `labels`) needs the batch re-laid beforehand by
  the training collator (`comm_vlm.training.TrainingBatchCollator`, the same `relay_training_inputs`); a training
  forward on images that were neither re-laid nor given labels or an explicit `matryoshka_scale` raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import can_return_tuple, logging

from .configuration_matryoshka import (
    MatryoshkaLlavaConfig,
    as_integer,
    check_matryoshka_scale,
    choose_image_scales,
)
from .modeling_comm import (
    CommCausalLMOutputWithPast,
    CommForConditionalGeneration,
    CommModel,
    CommModelOutputWithPast,
    CommPreTrainedModel,
    mask_image_labels,
    mask_image_shift_labels,
)
from .packing_matryoshka import (
    IGNORE_INDEX,
    _as_list,
    build_scale_batch,
    packed_attention_mask,
    relay_training_inputs,
    split_image_occurrences,
    weighted_next_token_loss,
)
from .pooling_matryoshka import select_visual_tokens
from .scale_selector_matryoshka import (
    auto_image_scales,
    build_scale_selector,
    is_auto_scale,
    refuse_auto_in_forward,
)


logger = logging.get_logger(__name__)


def shifted_target_loss(logits: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy against targets already aligned with the logits (no shift).

    Args:
        logits (`torch.Tensor` of shape `(B, T, V)`).
        shift_labels (`torch.LongTensor` of shape `(B, T)`): `shift_labels[:, t]` is the target of position t
            (-100 = ignored).

    Returns:
        `torch.Tensor` of shape `()`: 0 when every target is ignored.
    """
    shift_labels = shift_labels.to(logits.device)
    targets = shift_labels.reshape(-1)
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    weights = (targets != IGNORE_INDEX).float()
    return (nll * weights).sum() / weights.sum().clamp(min=1.0)


@dataclass
class MatryoshkaImageOutput(BaseModelOutputWithPooling):
    """`get_image_features` output. `pooler_output`: one `(tokens, hidden_size)` tensor per image run;
    `matryoshka_image_scales` `(num_runs,)`: their token counts, `None` when they are full grids (not yet pooled)."""

    matryoshka_image_scales: torch.LongTensor | None = None


@dataclass
class MatryoshkaCausalLMOutputWithPast(CommCausalLMOutputWithPast):
    """Outputs of [`MatryoshkaLlavaForConditionalGeneration`].

    With `labels` the model re-lays the batch into rows holding the scale variants (see `packing_matryoshka`):
    `logits` then follow those rows. `matryoshka_image_scales` `(num_runs,)` gives the tokens
    of every image run the LLM saw, `matryoshka_row_source` `(rows,)` the input sample of each row (`None` when the
    model did not re-lay the batch).
    """

    matryoshka_image_scales: torch.LongTensor | None = None
    matryoshka_row_source: torch.LongTensor | None = None


class MatryoshkaLlavaModel(CommModel):
    """The COMM backbone (encoders, connector, projector, LLM) with Matryoshka visual token selection."""

    config_class = MatryoshkaLlavaConfig
    config: MatryoshkaLlavaConfig

    def __init__(self, config: MatryoshkaLlavaConfig):
        super().__init__(config)
        for tower in self.vision_towers:
            tower.requires_grad_(config.train_vision_tower)
        self.language_model.requires_grad_(config.train_language_model)

    def _check_scales(self, scales: list[int]) -> None:
        grid = self.config.matryoshka_grid
        for scale in sorted(set(scales)):
            check_matryoshka_scale(scale, grid)
            if scale not in self.config.matryoshka_scales:
                logger.warning_once(
                    f"Scale {scale} is valid for the {grid}x{grid} grid but was not trained "
                    f"(matryoshka_scales={self.config.matryoshka_scales})."
                )

    def select_tokens(
        self, full_grid: torch.Tensor, scales: list[int], image_index: list[int] | None = None
    ) -> list[torch.Tensor]:
        """Visual tokens of every image run from the full projected grids.

        Args:
            full_grid (`torch.Tensor` of shape `(num_images, g * g, hidden_size)`): projected features.
            scales (`list[int]`): tokens of each run.
            image_index (`list[int]`, *optional*): the image of each run (default: run i is image i).

        Returns:
            `list[torch.Tensor]`, one `(scale, hidden_size)` tensor per run, pooled with
            `config.matryoshka_token_selection`; each distinct scale is pooled in one batched op.
        """
        image_index = list(range(full_grid.shape[0])) if image_index is None else image_index
        if len(image_index) != len(scales):
            raise ValueError(f"Got {len(scales)} image scales for {len(image_index)} image runs; give one per run.")
        if image_index and max(image_index) >= full_grid.shape[0]:
            raise ValueError(f"`matryoshka_image_index` refers to image {max(image_index)} of {full_grid.shape[0]}.")
        self._check_scales(scales)
        tokens: list[torch.Tensor | None] = [None] * len(scales)
        for scale in sorted(set(scales)):
            runs = [i for i, s in enumerate(scales) if s == scale]
            images = torch.tensor([image_index[i] for i in runs], device=full_grid.device)
            pooled = select_visual_tokens(full_grid[images], scale, self.config.matryoshka_token_selection)
            for i, feats in zip(runs, pooled):
                tokens[i] = feats
        return tokens  # type: ignore[return-value]

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        matryoshka_scale: int | None = None,
        matryoshka_image_scales: torch.LongTensor | list[int] | None = None,
        matryoshka_image_index: torch.LongTensor | list[int] | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> MatryoshkaImageOutput | tuple:
        """Encodes images into LLM-width visual tokens, pooled to the requested scales.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`): as for [`CommModel`].
            matryoshka_scale (`int`, *optional*): one scale for every image.
            matryoshka_image_scales (`torch.LongTensor` of shape `(num_runs,)`, *optional*): tokens of each image run.
            matryoshka_image_index (`torch.LongTensor` of shape `(num_runs,)`, *optional*): image of each run.
            vision_feature_layer, vision_feature_select_strategy, kwargs: see [`CommModel.get_image_features`].

        Returns:
            [`MatryoshkaImageOutput`] (a tuple with `return_dict=False`): the primary encoder's outputs as for
            [`CommModel`], with `pooler_output` the tokens per run (the full `(g * g, hidden_size)` grids when no
            scale is given, then `matryoshka_image_scales` is `None`).
        """
        outputs = super().get_image_features(
            pixel_values,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            return_dict=True,
            **kwargs,
        )
        full = torch.stack(list(outputs.pooler_output))  # (num_images, g * g, hidden_size)
        encoder_outputs = {
            "last_hidden_state": outputs.last_hidden_state,
            "hidden_states": outputs.hidden_states,
            "attentions": outputs.attentions,
        }
        scales = _as_list(matryoshka_image_scales)
        if scales is None and matryoshka_scale is not None:
            scales = [as_integer(matryoshka_scale, "matryoshka_scale")] * full.shape[0]
        if scales is None:
            return MatryoshkaImageOutput(pooler_output=list(full), **encoder_outputs)
        tokens = self.select_tokens(full, scales, _as_list(matryoshka_image_index))
        return MatryoshkaImageOutput(
            pooler_output=tokens,
            matryoshka_image_scales=torch.tensor(scales, dtype=torch.long, device=full.device),
            **encoder_outputs,
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        matryoshka_scale: int | None = None,
        matryoshka_image_scales: torch.LongTensor | None = None,
        matryoshka_image_index: torch.LongTensor | None = None,
        matryoshka_segment_ids: torch.LongTensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> CommModelOutputWithPast | tuple:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(B, T)`): text whose image placeholder runs hold each image's
                scale (S placeholders = S visual tokens).
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`, *optional*): the images, in order.
            attention_mask (`torch.Tensor` of shape `(B, T)` or a 4D mask `(B, 1, T, T)`, *optional*).
            position_ids (`torch.LongTensor` of shape `(B, T)`, *optional*).
            mm_encoder_outputs (`dict`, *optional*): `{"image": get_image_features(...)}` computed beforehand.
            matryoshka_scale (`int`, *optional*): the scale of every image; must match the placeholders.
            matryoshka_image_scales (`torch.LongTensor` of shape `(num_runs,)`, *optional*): tokens of each image run
                (the processor returns it; needed only when runs of different scales touch).
            matryoshka_image_index (`torch.LongTensor` of shape `(num_runs,)`, *optional*): the image of each run
                (a re-laid training batch shows an image once per scale).
            matryoshka_segment_ids (`torch.LongTensor` of shape `(B, T)`, *optional*): the segments of every row of a
                re-laid training batch (`MatryoshkaScaleBatch.segment_ids`); plain and packed rows then run as two
                trimmed LLM calls, packed ones under the 4D mask built from the segments.
            vision_feature_layer, vision_feature_select_strategy: encode `pixel_values` with these instead of the
                config's (see [`CommModel.get_image_features`]).
        """
        refuse_auto_in_forward(matryoshka_scale)
        pixel_values, mm_encoder_outputs = self.encode_images_for_call(
            pixel_values, mm_encoder_outputs, vision_feature_layer, vision_feature_select_strategy
        )
        inputs_embeds, image_outputs, mask = self.embed_inputs(
            input_ids, inputs_embeds, pixel_values, mm_encoder_outputs, past_key_values, position_ids
        )
        image_features = None
        if image_outputs is not None:
            objective_set = matryoshka_image_index is not None or matryoshka_scale is not None  # re-laid, or one scale
            if not objective_set and self.training and torch.is_grad_enabled():
                raise ValueError(
                    "Matryoshka-LLaVA is training on images whose batch was not re-laid for its scales, with no "
                    "`labels` to re-lay it here (a loss computed outside the model, e.g. TRL's fused LM head), so it "
                    "would train only the scale the placeholders hold, not the mean over `matryoshka_scales`. With "
                    "TRL's SFTTrainer, pass `data_collator=TrainingBatchCollator(DataCollatorForVisionLanguageModeling"
                    "(processor), model.config)` (from `comm_vlm.training`, it re-lays every batch), or build the "
                    "trainer with `comm_vlm.training.build_trainer`. For one scale, pass `matryoshka_scale`; for "
                    "inference, call `model.eval()`."
                )
            run_scales = _as_list(matryoshka_image_scales)
            image_features = self._image_tokens(
                image_outputs, mask.squeeze(-1), matryoshka_scale, run_scales, matryoshka_image_index
            )
            image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_features)

        if matryoshka_segment_ids is not None and past_key_values is None:
            return self._run_scale_rows(inputs_embeds, position_ids, matryoshka_segment_ids, image_features, kwargs)
        return self.run_language_model(
            inputs_embeds, attention_mask, position_ids, past_key_values, image_features, **kwargs
        )

    def _run_scale_rows(self, inputs_embeds, position_ids, segment_ids, image_features, kwargs):
        """Runs a re-laid training batch (right-padded rows) as two LLM calls, plain rows (causal) and packed rows (4D
        mask from `segment_ids`), each trimmed to its longest row; rows are independent, so this equals one call on
        the padded batch. Padding positions of the returned `last_hidden_state` (and of the per-layer `hidden_states`
        and `attentions`, when requested) are zero."""
        lengths, packed = (segment_ids >= 0).sum(1), segment_ids.amax(1) > 1
        attn = getattr(self.language_model.config, "_attn_implementation", None)
        mask_dtype = inputs_embeds.dtype if attn == "eager" else None  # additive for eager, bool for SDPA
        rows, total = inputs_embeds.shape[:2]
        kwargs = {key: value for key, value in kwargs.items() if key != "return_dict"}
        hidden = torch.zeros_like(inputs_embeds)
        layer_hidden: list[torch.Tensor | None] | None = None
        layer_attentions: list[torch.Tensor | None] | None = None
        for is_packed in (False, True):
            idx = (packed == is_packed).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            length = int(lengths[idx].max())
            if is_packed:
                mask = packed_attention_mask(segment_ids[idx, :length], mask_dtype)
                positions = None if position_ids is None else position_ids[idx, :length]
            else:
                mask = (torch.arange(length, device=idx.device)[None] < lengths[idx, None]).long()
                positions = None
            out = self.language_model(
                inputs_embeds=inputs_embeds[idx, :length],
                attention_mask=mask,
                position_ids=positions,
                return_dict=True,
                **kwargs,
            )
            hidden = hidden.index_copy(0, idx, F.pad(out.last_hidden_state, (0, 0, 0, total - length)))
            if out.hidden_states is not None:  # each (n, length, D) -> (rows, total, D)
                layer_hidden = layer_hidden or [None] * len(out.hidden_states)
                for i, state in enumerate(out.hidden_states):
                    if state is not None:
                        merged = layer_hidden[i] if layer_hidden[i] is not None else torch.zeros_like(hidden)
                        layer_hidden[i] = merged.index_copy(0, idx, F.pad(state, (0, 0, 0, total - length)))
            if out.attentions is not None:  # each (n, heads, length, length) -> (rows, heads, total, total)
                layer_attentions = layer_attentions or [None] * len(out.attentions)
                for i, weights in enumerate(out.attentions):
                    if weights is not None:
                        merged = layer_attentions[i]
                        if merged is None:
                            merged = weights.new_zeros(rows, weights.shape[1], total, total)
                        pad = (0, total - length, 0, total - length)
                        layer_attentions[i] = merged.index_copy(0, idx, F.pad(weights, pad))
        return CommModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=None if layer_hidden is None else tuple(layer_hidden),
            attentions=None if layer_attentions is None else tuple(layer_attentions),
            image_hidden_states=image_features,
        )

    def _image_tokens(self, image_outputs, mask, scale, run_scales, run_index) -> torch.Tensor:
        """`(total_visual_tokens, hidden_size)` for the placeholder mask: pooled outputs as they are, or full grids
        pooled to the scale of each run (explicit, or read from the run lengths)."""
        if getattr(image_outputs, "matryoshka_image_scales", None) is not None:
            features = torch.cat(list(image_outputs.pooler_output), dim=0)
        else:
            full = torch.stack(list(image_outputs.pooler_output))  # (num_images, g * g, hidden_size)
            index = _as_list(run_index)
            num_runs = full.shape[0] if index is None else len(index)
            if run_scales is None and scale is not None:
                scale = as_integer(scale, "matryoshka_scale")
                run_scales = [scale] * num_runs
                if int(scale) * num_runs != int(mask.sum()):
                    raise ValueError(
                        f"matryoshka_scale={scale} needs {int(scale) * num_runs} image tokens for {num_runs} image(s) "
                        f"but the text has {int(mask.sum())}: build the inputs with "
                        f"MatryoshkaLlavaProcessor(..., matryoshka_scale={scale}), or call "
                        "generate(..., matryoshka_scale=...), which re-lays the prompt."
                    )
            occurrences = split_image_occurrences(mask, num_runs, run_scales)
            run_scales = [length for row in occurrences for _, length in row]
            features = torch.cat(self.select_tokens(full, run_scales, index), dim=0)
        self.check_image_token_count(mask, features)
        return features

    def image_token_count_hint(self) -> str:
        """How to write the placeholders right, for the error of `check_image_token_count`."""
        grid = self.config.matryoshka_grid
        return (
            f"Write one run of S placeholders per image with S a scale of the {grid}x{grid} grid "
            f"({self.config.valid_scales()}); MatryoshkaLlavaProcessor(..., matryoshka_scale=S) does."
        )


class MatryoshkaLlavaForConditionalGeneration(CommForConditionalGeneration):
    """M3 with a language-modeling head: per-request scales in `generate`, all-scale loss with `labels`.

    `accepts_loss_kwargs = False`: the loss is the (weighted) token mean of the batch the model builds, so Trainers
    must not rescale it with a token count of the unexpanded batch.
    """

    config_class = MatryoshkaLlavaConfig
    config: MatryoshkaLlavaConfig
    accepts_loss_kwargs = False

    def __init__(self, config: MatryoshkaLlavaConfig):
        CommPreTrainedModel.__init__(self, config)
        self.model = MatryoshkaLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.scale_selector = build_scale_selector(config)  # `matryoshka_scale="auto"`; None without a selector
        self.post_init()
        self.lm_head.requires_grad_(config.train_language_model)

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> MatryoshkaImageOutput | tuple:
        """See [`MatryoshkaLlavaModel.get_image_features`]."""
        return self.model.get_image_features(pixel_values, **kwargs)

    # ---- forward / loss ---------------------------------------------------------------------------------------

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        matryoshka_scale: int | None = None,
        matryoshka_image_scales: torch.LongTensor | None = None,
        matryoshka_image_index: torch.LongTensor | None = None,
        matryoshka_segment_ids: torch.LongTensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> MatryoshkaCausalLMOutputWithPast | tuple:
        """
        Args:
            labels (`torch.LongTensor` of shape `(B, T)`, *optional*): next-token targets (-100 = ignored). The batch
                is then re-laid (`relay_training_inputs`, shared-prefix rows with loss weights) and the loss is the
                mean over `config.matryoshka_scales` of each scale's token-mean loss (`matryoshka_scale=S`: the loss
                at S only; `random_scale` mode in training: one random scale per sample). Image placeholders are never
                targets. A batch the training collator already re-laid keeps its rows: the loss is their token mean.
            matryoshka_scale (`int`, *optional*): without labels, the scale the placeholders hold (checked); with
                labels, the single scale to train.
            shift_labels (`torch.LongTensor` of shape `(B, T)`, *optional*, in `kwargs`): targets already aligned with
                the logits (context-parallel training passes them with `labels`); they replace `labels` in the loss.
                A batch this forward re-lays for the scales gets them as `labels` (`shift_labels[:, t]` becomes the
                label of position t + 1), so the last position's target, which lies past the input, is not scored:
                re-lay such batches beforehand with `comm_vlm.training.TrainingBatchCollator`, then every target is.

        See [`MatryoshkaLlavaModel.forward`] for the other arguments.
        """
        refuse_auto_in_forward(matryoshka_scale)
        shift_labels = kwargs.pop("shift_labels", None)
        if shift_labels is not None:
            shift_labels = mask_image_shift_labels(shift_labels, input_ids, self.config.image_token_id)
            has_images = pixel_values is not None or (mm_encoder_outputs or {}).get("image") is not None
            if has_images and matryoshka_image_index is None:  # the batch is re-laid below, from `labels`
                if bool((shift_labels[:, -1] != IGNORE_INDEX).any()):
                    logger.warning_once(
                        "Matryoshka-LLaVA re-lays this batch for its scales from `labels`: the target of the last "
                        "position in `shift_labels` lies past the input and is not scored. Re-lay the batch with "
                        "`comm_vlm.training.TrainingBatchCollator` beforehand to score every target."
                    )
                labels = torch.cat([torch.full_like(shift_labels[:, :1], IGNORE_INDEX), shift_labels[:, :-1]], dim=1)
                shift_labels = None
        call = dict(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            mm_encoder_outputs=mm_encoder_outputs,
            matryoshka_scale=matryoshka_scale,
            matryoshka_image_scales=matryoshka_image_scales,
            matryoshka_image_index=matryoshka_image_index,
            matryoshka_segment_ids=matryoshka_segment_ids,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
        )
        call, scale_batch = relay_training_inputs(self.config, call, weighted=True, training=self.training)
        labels = call.pop("labels")
        kwargs.pop("num_items_in_batch", None)
        outputs = self.lm_head_outputs(self.model(**call, **kwargs, return_dict=True), None, logits_to_keep)
        loss = None
        if shift_labels is not None:
            if outputs.logits.shape[1] != shift_labels.shape[1]:
                raise ValueError("`shift_labels` need the logits of every position; leave logits_to_keep at 0.")
            loss = shifted_target_loss(outputs.logits, shift_labels)
        elif labels is not None:
            if outputs.logits.shape[1] != labels.shape[1]:
                raise ValueError("`labels` need the logits of every position; leave logits_to_keep at 0.")
            label_weights = None if scale_batch is None else scale_batch.label_weights
            labels = mask_image_labels(labels, call.get("input_ids"), self.config.image_token_id)
            loss = weighted_next_token_loss(outputs.logits, labels, label_weights)
        return MatryoshkaCausalLMOutputWithPast(
            **outputs,
            loss=loss,
            matryoshka_image_scales=None if scale_batch is None else scale_batch.image_scales,
            matryoshka_row_source=None if scale_batch is None else scale_batch.row_source,
        )

    # ---- generation -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        *args,
        matryoshka_scale: int | None = None,
        visual_token_budget: int | None = None,
        budget_strategy: str = "uniform",
        **kwargs,
    ):
        """`GenerationMixin.generate` with a per-call scale.

        Args:
            matryoshka_scale (`int` or `"auto"`, *optional*): visual tokens for every image of this call; `"auto"`: the
                model's learned `scale_selector` picks each image's scale (see `scale_selector_matryoshka`).
            visual_token_budget (`int`, *optional*): total visual tokens per prompt; per-image scales are chosen
                from `config.matryoshka_scales` (see `choose_image_scales`).
            budget_strategy (`str`): `uniform` (one scale for all images of a prompt, the paper's video setting) or
                `greedy`.

        Without either, every image keeps the scale its placeholder run has. When the prompt's runs differ from the
        requested scales, the prompt is re-laid (left-padded) for this call and the returned sequences still begin
        with the caller's `input_ids`, so `output[:, input_ids.shape[1]:]` are the new tokens.
        """
        input_ids = kwargs.pop("input_ids", inputs)
        pixel_values = kwargs.get("pixel_values")
        if input_ids is None or pixel_values is None:
            if matryoshka_scale is not None or visual_token_budget is not None:
                raise ValueError("matryoshka_scale/visual_token_budget need input_ids and pixel_values.")
            return super().generate(input_ids, *args, **kwargs)
        if matryoshka_scale is not None and visual_token_budget is not None:
            raise ValueError("Pass either matryoshka_scale or visual_token_budget, not both.")
        auto = is_auto_scale(matryoshka_scale)
        if matryoshka_scale is not None and not auto:
            matryoshka_scale = as_integer(matryoshka_scale, "matryoshka_scale", allow_auto=True)
        if visual_token_budget is not None:
            visual_token_budget = as_integer(visual_token_budget, "visual_token_budget")
        attention_mask = kwargs.get("attention_mask")
        mask = input_ids == self.config.image_token_id
        if attention_mask is not None:
            mask &= attention_mask.bool()
        occurrences = split_image_occurrences(
            mask, pixel_values.shape[0], _as_list(kwargs.get("matryoshka_image_scales"))
        )
        current = [[length for _, length in row] for row in occurrences]
        if auto:  # encode once; the selector reads the full grids the chosen scales are pooled from
            options = ("vision_feature_layer", "vision_feature_select_strategy")
            vision = {k: kwargs.pop(k) for k in options if k in kwargs}
            image_outputs = self.model.get_image_features(pixel_values, return_dict=True, **vision)
            full = torch.stack(list(image_outputs.pooler_output))
            chosen = iter(auto_image_scales(self, input_ids, attention_mask, full, [len(r) for r in current]))
            target = [[next(chosen) for _ in row] for row in current]
        elif matryoshka_scale is not None:
            target = [[matryoshka_scale] * len(row) for row in current]
        elif visual_token_budget is not None:
            scales = self.config.matryoshka_scales
            target = [choose_image_scales(len(row), visual_token_budget, scales, budget_strategy) for row in current]
        else:
            target = current
        flat_target = [s for row in target for s in row]
        self.model._check_scales(flat_target)
        kwargs["matryoshka_image_scales"] = torch.tensor(flat_target, dtype=torch.long, device=input_ids.device)
        if auto:
            tokens = self.model.select_tokens(full, flat_target)
            scales = kwargs["matryoshka_image_scales"]
            encoded = MatryoshkaImageOutput(pooler_output=tokens, matryoshka_image_scales=scales)
            kwargs.pop("pixel_values")
            kwargs["mm_encoder_outputs"] = {**(kwargs.get("mm_encoder_outputs") or {}), "image": encoded}
        if target == current:
            return super().generate(input_ids, *args, **kwargs)
        pad_id = self.config.text_config.pad_token_id
        prompts = build_scale_batch(
            input_ids,
            attention_mask,
            None,
            self.config.image_token_id,
            [[row] for row in target],
            token_counts=[s for row in current for s in row],
            pad_token_id=0 if pad_id is None else pad_id,
            row_format="padded",
            padding_side="left",
        )
        kwargs["attention_mask"] = prompts.attention_mask
        output = super().generate(prompts.input_ids, *args, **kwargs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        sequences = torch.cat([prompt, sequences[:, prompts.input_ids.shape[1] :]], dim=1)
        if isinstance(output, torch.Tensor):
            return sequences
        output.sequences = sequences
        return output


__all__ = [
    "MatryoshkaCausalLMOutputWithPast",
    "MatryoshkaImageOutput",
    "MatryoshkaLlavaForConditionalGeneration",
    "MatryoshkaLlavaModel",
]
