"""PyTorch COMM: CLIP + DINOv2 with multi-level feature merging for LLaVA-style multimodal LLMs.

Paper: "From CLIP to DINO: Visual Encoders Shout in Multi-modal Large Language Models" (Jiang et al. 2023,
arXiv 2310.08825). The authors published no code; this module is a reference implementation in transformers' LLaVA
layout:

    pixel_values -> vision_tower (+ secondary_vision_tower on re-normalised pixels)
                 -> connector (per encoder: merge selected layers, align; concat channels)
                 -> multi_modal_projector -> scattered into the LLM's input embeddings at `image_token_id`

Attribute names (`vision_tower`, `multi_modal_projector`, `language_model`, `lm_head`) and the state-dict layout
match `LlavaForConditionalGeneration`, so a COMM configured as LLaVA loads LLaVA weights as they are.

Training: with `labels`, the loss is the next-token loss in which image placeholders are never targets
(`mask_image_labels`, every family's rule, as in LLaVA). A loss computed outside the model (TRL's fused LM head calls
the backbone without `labels`) scores the batch's labels as they are: build the batches with
`comm_vlm.training.TrainingBatchCollator`, which applies the same rule. Unlike M3 and the adaptive combiner, whose
backbones read what that collator adds and refuse to train without it, COMM's backbone receives nothing that tells a
prepared batch from another, so it does not check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, ModelOutput
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import logging

from .configuration_comm import CommConfig, patch_grid
from .feature_merging import LayerscaleMerge, LLNLayerscaleMerge, build_aligner, build_merge


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100


def mask_image_labels(labels: torch.Tensor, input_ids: torch.Tensor | None, image_token_id: int) -> torch.Tensor:
    """`labels` with -100 wherever `input_ids` holds the image placeholder: an image is never a target.

    The one rule of every family (as in LLaVA's training), applied by the models' own losses and by the training
    collator (`comm_vlm.training.TrainingBatchCollator`), so a loss computed outside the model never scores
    placeholders either.

    Args:
        labels (`torch.LongTensor` of shape `(B, T)`): unshifted next-token targets (-100 = ignored).
        input_ids (`torch.LongTensor` of shape `(B, T)`, *optional*): the inputs the labels belong to; `None`
            (inputs given as embeddings) returns `labels` as they are.
        image_token_id (`int`): the placeholder id (`config.image_token_id`).

    Returns:
        `torch.LongTensor` of shape `(B, T)`: a new tensor (the input is not modified).
    """
    if input_ids is None:
        return labels
    if input_ids.shape != labels.shape:
        raise ValueError(
            f"`labels` has shape {tuple(labels.shape)} but `input_ids` {tuple(input_ids.shape)}: give one label per "
            "input token (-100 where no loss is taken)."
        )
    return labels.masked_fill(input_ids.to(labels.device) == image_token_id, IGNORE_INDEX)


@dataclass
class CommModelOutputWithPast(BaseModelOutputWithPast):
    """[`CommModel`] outputs.

    Args:
        image_hidden_states (`torch.FloatTensor` of shape `(total_image_tokens, hidden_size)`, *optional*): the
            visual tokens scattered into the sequence, when images were given.
    """

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class CommCausalLMOutputWithPast(ModelOutput):
    """[`CommForConditionalGeneration`] outputs.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): next-token loss, when `labels` are given.
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`).
        past_key_values (`Cache`, *optional*): the KV cache.
        hidden_states, attentions (`tuple[torch.FloatTensor]`, *optional*): per-layer LLM outputs when requested.
        image_hidden_states (`torch.FloatTensor` of shape `(total_image_tokens, hidden_size)`, *optional*).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


class CommMultiModalProjector(nn.Module):
    """`depth` linear layers from the connector width to the LLM width (`linear_1`, `act`, `linear_2`, ...).

    Depth 1 is COMM's linear projection; depth 2 is LLaVA-1.5's `mlp2x_gelu` with LLaVA's parameter names.
    """

    def __init__(self, input_size: int, output_size: int, depth: int, hidden_act: str, bias: bool):
        super().__init__()
        self.depth = depth
        self.linear_1 = nn.Linear(input_size, output_size, bias=bias)
        if depth > 1:
            self.act = ACT2FN[hidden_act]
        for i in range(2, depth + 1):
            setattr(self, f"linear_{i}", nn.Linear(output_size, output_size, bias=bias))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        hidden_states = self.linear_1(image_features)  # (B, N, C_in) -> (B, N, D)
        for i in range(2, self.depth + 1):
            hidden_states = getattr(self, f"linear_{i}")(self.act(hidden_states))
        return hidden_states


class CommConnector(nn.Module):
    """Per encoder: multi-level merge then aligner; the encoders' outputs are concatenated channel-wise.

    `merges[k]` / `aligners[k]` belong to encoder k (0 = primary, 1 = secondary). For COMM: CLIP -> LLN-Layerscale ->
    identity, DINOv2 -> LLN-Layerscale -> MLP, then concat.
    """

    def __init__(self, config: CommConfig):
        super().__init__()
        self.merges = nn.ModuleList()
        self.aligners = nn.ModuleList()
        self.output_size = 0
        for prefix in config.encoder_prefixes:
            branch = config.branch(prefix)
            merge = build_merge(
                branch["merge"],
                num_layers=len(branch["layers"]),
                hidden_size=branch["vision_config"].hidden_size,
                output_size=config.merge_hidden_size,
                kernel_size=config.merge_conv_kernel_size,
            )
            aligner = build_aligner(
                branch["aligner"],
                merge.output_size,
                branch["aligner_depth"],
                branch["aligner_ratio"],
                config.aligner_hidden_act,
            )
            self.merges.append(merge)
            self.aligners.append(aligner)
            self.output_size += aligner.output_size

    def forward(self, layer_features: list[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            layer_features (`list[torch.Tensor]`): per encoder, the selected layers' patch tokens `(L_k, B, N, C_k)`.

        Returns:
            `torch.Tensor` of shape `(B, N, sum_k C'_k)`.
        """
        merged = [aligner(merge(feats)) for merge, aligner, feats in zip(self.merges, self.aligners, layer_features)]
        return merged[0] if len(merged) == 1 else torch.cat(merged, dim=-1)


class CommPreTrainedModel(PreTrainedModel):
    config_class = CommConfig
    config: CommConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = getattr(self.config.get_text_config(), "initializer_range", 0.02)
        if isinstance(module, LayerscaleMerge):
            init.zeros_(module.layer_logits)  # equal layer weights 1/L
        if isinstance(module, LLNLayerscaleMerge):
            init.ones_(module.norm_weight)
            init.zeros_(module.norm_bias)
            init.normal_(module.linear_weight, mean=0.0, std=std)
            init.zeros_(module.linear_bias)


class CommModel(CommPreTrainedModel):
    """COMM without a language-modeling head: encoders, connector, projector and the LLM backbone."""

    def __init__(self, config: CommConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.secondary_vision_tower = (
            AutoModel.from_config(config.secondary_vision_config)
            if config.secondary_vision_config is not None
            else None
        )
        self.connector = CommConnector(config)
        self.multi_modal_projector = CommMultiModalProjector(
            self.connector.output_size,
            config.text_config.hidden_size,
            config.projector_depth,
            config.projector_hidden_act,
            config.multimodal_projector_bias,
        )
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @property
    def vision_towers(self) -> list[nn.Module]:
        towers = [self.vision_tower]
        return towers if self.secondary_vision_tower is None else towers + [self.secondary_vision_tower]

    def _encoder_pixels(self, pixel_values: torch.Tensor, prefix: str) -> torch.Tensor:
        """Re-normalises pixels given with the primary encoder's statistics for encoder `prefix` (and resizes)."""
        if prefix == "vision":
            return pixel_values
        config = self.config
        kwargs = {"device": pixel_values.device, "dtype": torch.float32}
        mean_in = torch.tensor(config.vision_image_mean, **kwargs).view(1, 3, 1, 1)
        std_in = torch.tensor(config.vision_image_std, **kwargs).view(1, 3, 1, 1)
        mean_out = torch.tensor(getattr(config, f"{prefix}_image_mean"), **kwargs).view(1, 3, 1, 1)
        std_out = torch.tensor(getattr(config, f"{prefix}_image_std"), **kwargs).view(1, 3, 1, 1)
        pixels = (pixel_values.float() * std_in + mean_in - mean_out) / std_out
        size = getattr(config, f"{prefix}_config").image_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if tuple(pixels.shape[-2:]) != size:
            pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True)
        return pixels.to(pixel_values.dtype)

    def _encode(self, tower: nn.Module, pixels: torch.Tensor, prefix: str) -> torch.Tensor:
        """Runs one encoder, keeping only the hidden states the merge uses.

        Returns:
            `torch.Tensor` of shape `(L, B, N, C)`: the selected layers' patch tokens (prefix tokens dropped unless
            `vision_feature_select_strategy="full"`).
        """
        vision_config = getattr(self.config, f"{prefix}_config")
        layers = self.config.branch(prefix)["layers"]
        kwargs = {}
        if vision_config.model_type == "vit_mae":
            # Identity "shuffle": with mask_ratio 0 ViTMAE would still permute the patches randomly.
            num_patches = patch_grid(vision_config) ** 2
            kwargs["noise"] = torch.arange(num_patches, device=pixels.device).expand(pixels.shape[0], -1).float()
        frozen = not any(p.requires_grad for p in tower.parameters())
        pixels = pixels.to(dtype=tower.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            outputs = tower(pixels, output_hidden_states=layers, return_dict=True, **kwargs)
        selected = torch.stack([outputs.hidden_states[i] for i in layers])  # (L, B, S, C)
        if self.config.vision_feature_select_strategy == "default":
            num_prefix = selected.shape[2] - patch_grid(vision_config) ** 2
            if num_prefix < 0:
                raise ValueError(
                    f"{prefix} encoder returned {selected.shape[2]} tokens, fewer than its "
                    f"{patch_grid(vision_config) ** 2} patches: check `image_size`/`patch_size` and the pixel size."
                )
            selected = selected[:, :, num_prefix:]  # drop CLS / distillation / register tokens
        return selected

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        """Encodes images into LLM-width visual tokens.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`): normalised with the primary
                encoder's statistics (`config.vision_image_mean/std`); the secondary encoder gets its own.

        Returns:
            `BaseModelOutputWithPooling` whose `pooler_output` is a list of `(image_seq_length, hidden_size)` tensors,
            one per image, and `last_hidden_state` the stacked `(num_images, image_seq_length, hidden_size)`.
        """
        layer_features = [
            self._encode(tower, self._encoder_pixels(pixel_values, prefix), prefix)
            for tower, prefix in zip(self.vision_towers, self.config.encoder_prefixes)
        ]
        image_features = self.multi_modal_projector(self.connector(layer_features))  # (B, N, D)
        return BaseModelOutputWithPooling(last_hidden_state=image_features, pooler_output=list(image_features))

    def get_placeholder_mask(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        image_features: torch.Tensor | None = None,
    ) -> torch.BoolTensor:
        """Image placeholder positions, from `input_ids` or (without them) by matching the placeholder's embedding.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, T)`, *optional*).
            inputs_embeds (`torch.Tensor` of shape `(B, T, D)`).
            image_features (`torch.Tensor` of shape `(total_image_tokens, D)`, *optional*): when given, their count
                is checked against the placeholders (`check_image_token_count`).

        Returns:
            `torch.BoolTensor` of shape `(B, T, 1)`, as LLaVA's (ready for `masked_scatter`).
        """
        if input_ids is None:
            image_embed = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            special_image_mask = (inputs_embeds == image_embed).all(-1)
        else:
            special_image_mask = input_ids == self.config.image_token_id
        special_image_mask = special_image_mask.unsqueeze(-1).to(inputs_embeds.device)
        if image_features is not None:
            self.check_image_token_count(special_image_mask, image_features)
        return special_image_mask

    def image_token_count_hint(self) -> str:
        """How to write the placeholders right, for the error of `check_image_token_count`."""
        per_image = self.config.image_seq_length
        return (
            f"({per_image} per image). Expand each image placeholder to {per_image} tokens (CommProcessor does) and "
            "pass exactly one image per placeholder."
        )

    def check_image_token_count(self, special_image_mask: torch.BoolTensor, image_features: torch.Tensor) -> None:
        """Raises if the placeholders `(B, T[, 1])` are not as many as the visual tokens `(total_image_tokens, D)`."""
        n_image_tokens = int(special_image_mask.sum())
        if n_image_tokens != image_features.shape[0]:
            raise ValueError(
                f"Image features and image tokens do not match: the text has {n_image_tokens} image tokens "
                f"(id {self.config.image_token_id}) but the images give {image_features.shape[0]} visual tokens "
                f"{self.image_token_count_hint()}"
            )

    def embed_inputs(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.FloatTensor | None,
        pixel_values: torch.FloatTensor | None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None,
    ) -> tuple[torch.FloatTensor, BaseModelOutputWithPooling | None, torch.BoolTensor | None]:
        """LLaVA's forward preamble, shared by every family: checks the inputs, embeds the text, encodes the images
        (unless `mm_encoder_outputs` holds them) and finds their placeholders.

        Returns:
            `(inputs_embeds, image_outputs, special_image_mask)`: the text embeddings `(B, T, D)` (placeholders not yet
            filled), `get_image_features`' output (`None` without images) and the placeholder mask `(B, T, 1)`
            (`None` without images; its count is the family's to check).
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds.")
        image_outputs = (mm_encoder_outputs or {}).get("image")
        if pixel_values is not None and image_outputs is not None:
            raise ValueError("Pass either pixel_values or mm_encoder_outputs['image'], not both.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values)
        if image_outputs is None:
            return inputs_embeds, None, None
        return inputs_embeds, image_outputs, self.get_placeholder_mask(input_ids, inputs_embeds)

    def run_language_model(
        self,
        inputs_embeds: torch.FloatTensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        past_key_values: Cache | None,
        image_hidden_states: torch.FloatTensor | None,
        **kwargs,
    ) -> CommModelOutputWithPast:
        """The LLM on `(B, T, D)` input embeddings (visual tokens already in place); shared by every family."""
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        return CommModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_hidden_states,
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs,
    ) -> CommModelOutputWithPast:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(B, T)`): text with expanded image placeholders.
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`, *optional*): one image per placeholder
                run, in order of appearance.
            mm_encoder_outputs (`dict`, *optional*): precomputed `{"image": get_image_features(...)}` (generation
                encodes images once before prefill and passes them here).
        """
        inputs_embeds, image_outputs, special_image_mask = self.embed_inputs(
            input_ids, inputs_embeds, pixel_values, mm_encoder_outputs
        )
        image_features = None
        if image_outputs is not None:
            image_features = torch.cat(list(image_outputs.pooler_output), dim=0)
            image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
            self.check_image_token_count(special_image_mask, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(special_image_mask, image_features)

        return self.run_language_model(
            inputs_embeds, attention_mask, position_ids, past_key_values, image_features, **kwargs
        )


class CommForConditionalGeneration(CommPreTrainedModel, GenerationMixin):
    """COMM with a language-modeling head; generation encodes the images once, then decodes with the KV cache."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: CommConfig):
        super().__init__(config)
        self.model = CommModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    def lm_head_outputs(
        self,
        outputs: CommModelOutputWithPast,
        labels: torch.LongTensor | None,
        logits_to_keep: int | torch.Tensor = 0,
        input_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> CommCausalLMOutputWithPast:
        """Logits of the kept positions and, with `labels` `(B, T)`, the causal-LM loss; shared by every family.

        Args:
            outputs ([`CommModelOutputWithPast`]): the backbone's, `last_hidden_state` `(B, T, D)`.
            labels (`torch.LongTensor` of shape `(B, T)`, *optional*): next-token targets (-100 = ignored). Image
                placeholder positions of `input_ids` are never targets (`mask_image_labels`).
            logits_to_keep (`int` or `torch.Tensor`): see `transformers.modeling_utils.slice_logits_to_keep`.
            input_ids (`torch.LongTensor` of shape `(B, T)`, *optional*): the inputs, to find the placeholders.
        """
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            labels = mask_image_labels(labels, input_ids, self.config.image_token_id)
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return CommCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )

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
        **kwargs,
    ) -> CommCausalLMOutputWithPast:
        """
        Args:
            labels (`torch.LongTensor` of shape `(B, T)`, *optional*): next-token targets (-100 = ignored), shifted
                inside the loss as in transformers' causal LMs; image placeholder positions are never targets.
            logits_to_keep (`int` or `torch.Tensor`): compute logits only for the last `n` positions (0 = all).

        See [`CommModel.forward`] for the other arguments.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        return self.lm_head_outputs(outputs, labels, logits_to_keep, input_ids=input_ids, **kwargs)


__all__ = ["CommModel", "CommForConditionalGeneration", "CommPreTrainedModel", "mask_image_labels"]
