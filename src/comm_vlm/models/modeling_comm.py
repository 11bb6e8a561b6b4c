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

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, ModelOutput
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import cached_file, can_return_tuple, logging

from .checkpoint_files import damaged_checkpoint_files
from .configuration_comm import CommConfig, patch_grid, resolve_layers
from .feature_merging import LayerscaleMerge, LLNLayerscaleMerge, build_aligner, build_merge


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100

# The call-time vision options of transformers' LLaVA (`vision_feature_layer`, `vision_feature_select_strategy`).
VISION_OPTIONS = ("vision_feature_layer", "vision_feature_select_strategy")
SELECT_STRATEGIES = ("default", "full")


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


def mask_image_shift_labels(
    shift_labels: torch.Tensor, input_ids: torch.Tensor | None, image_token_id: int
) -> torch.Tensor:
    """`mask_image_labels` for pre-shifted targets (`shift_labels[:, t]` is the target of position t, the token at
    t + 1; context-parallel training passes them): -100 wherever the target is an image placeholder.

    Args:
        shift_labels (`torch.LongTensor` of shape `(B, T)`): targets aligned with the logits (-100 = ignored).
        input_ids (`torch.LongTensor` of shape `(B, T)`, *optional*): the inputs; `input_ids[:, t + 1]` is the token
            that `shift_labels[:, t]` targets (the last target's token lies past the input, e.g. in the next shard).
        image_token_id (`int`): the placeholder id.

    Returns:
        `torch.LongTensor` of shape `(B, T)`: a new tensor.
    """
    is_image = shift_labels == image_token_id
    if input_ids is not None and input_ids.shape == shift_labels.shape:
        is_image[:, :-1] |= input_ids[:, 1:].to(shift_labels.device) == image_token_id
    return shift_labels.masked_fill(is_image, IGNORE_INDEX)


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
    _can_compile_fullgraph = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`; when loading fails on a damaged weight file (truncated, empty, not
        safetensors, or a shard its index lists but the directory lacks) of a local directory or of the downloaded
        snapshot of a Hub repository, the error names the file and the cause
        (`checkpoint_files.damaged_checkpoint_files`) instead of safetensors' bare header message.
        """
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except Exception as error:
            if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
                raise
            directory = os.fspath(pretrained_model_name_or_path)
            if kwargs.get("subfolder"):
                directory = os.path.join(directory, kwargs["subfolder"])
            if not os.path.isdir(directory):  # a Hub repository: its local snapshot, if downloaded
                config_file = cached_file(
                    pretrained_model_name_or_path,
                    "config.json",
                    subfolder=kwargs.get("subfolder") or "",
                    revision=kwargs.get("revision"),
                    cache_dir=kwargs.get("cache_dir"),
                    local_files_only=True,
                    _raise_exceptions_for_missing_entries=False,
                    _raise_exceptions_for_connection_errors=False,
                )
                directory = os.path.dirname(config_file) if config_file else directory
            problems = damaged_checkpoint_files(directory) if os.path.isdir(directory) else []
            if not problems:
                raise
            raise OSError(
                f"Cannot load the checkpoint in {directory}: " + "; ".join(problems) + ". Download or copy the "
                "file(s) again, or save the model again from an intact copy."
            ) from error

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """`PreTrainedModel.initialize_weights`, with each transformers sub-model (encoders, LLM) initialised first by
        its own `initialize_weights`, as inside a transformers composite model.

        transformers treats a model defined outside the library as custom code and hands that flag down to its
        sub-models, where it skips the modules without parameters of their own (e.g. CLIP's attention and MLP blocks,
        whose `_init_weights` sets their projections): weights missing from a checkpoint would then get the generic
        init instead of the encoder's own. Sub-models initialised here are marked done, so the rest of the model
        initialises as usual.
        """
        done: list[str] = []
        for name, module in self.named_modules():
            if (
                module is self
                or not isinstance(module, PreTrainedModel)
                or module.is_custom_code()
                or any(name.startswith(f"{prefix}.") for prefix in done)
            ):
                continue
            module.initialize_weights()
            done.append(name)
        super().initialize_weights()

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
        config.check_fields()  # a config edited after construction is checked before any module is built from it
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

    def _feature_layers(self, prefix: str, vision_feature_layer: int | list[int] | None = None) -> list[int]:
        """The `hidden_states` indices encoder `prefix` feeds its merge: the config's, or for the primary encoder
        `vision_feature_layer` given at call time, which must select as many layers as the merge was built for.

        Raises:
            ValueError: `vision_feature_layer` selects another number of layers (the merge's weights and the
                projector's input size are per layer), or a layer outside the encoder.
        """
        layers = self.config.branch(prefix)["layers"]
        if vision_feature_layer is None or prefix != "vision":
            return layers
        num_layers = self.config.vision_config.num_hidden_layers
        requested = resolve_layers(vision_feature_layer, num_layers, "vision_feature_layer")
        if len(requested) != len(layers):
            raise ValueError(
                f"`vision_feature_layer={vision_feature_layer}` selects {len(requested)} layer(s), but the model's "
                f"merge (`vision_feature_merge={self.config.vision_feature_merge!r}`) and projector were built for "
                f"{len(layers)} (config: `vision_feature_layer={self.config.vision_feature_layer}`). Select "
                f"{len(layers)} layer(s), or leave it unset to use the config's."
            )
        return requested

    def _encode(self, tower: nn.Module, pixels: torch.Tensor, prefix: str) -> torch.Tensor:
        """The selected layers' patch tokens `(L, B, N, C)` of one encoder, with the config's settings (see
        `_encode_with_outputs`)."""
        return self._encode_with_outputs(tower, pixels, prefix)[0]

    def _encode_with_outputs(
        self,
        tower: nn.Module,
        pixels: torch.Tensor,
        prefix: str,
        layers: list[int] | None = None,
        select_strategy: str | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, ModelOutput]:
        """Runs one encoder, keeping only the hidden states the merge uses (all of them with `output_hidden_states`).

        Args:
            tower (`nn.Module`): the encoder.
            pixels (`torch.Tensor` of shape `(B, 3, H, W)`): its pixels (see `_encoder_pixels`).
            prefix (`str`): the encoder's field prefix (`"vision"` or `"secondary_vision"`).
            layers (`list[int]`, *optional*): `hidden_states` indices to merge (default: the config's).
            select_strategy (`str`, *optional*): `"default"` (drop prefix tokens) or `"full"` (default: the config's
                `vision_feature_select_strategy`).
            kwargs: passed to the encoder (`output_attentions`, `output_hidden_states`).

        Returns:
            `(selected, outputs)`: the selected layers' patch tokens `(L, B, N, C)` and the encoder's outputs.
        """
        vision_config = getattr(self.config, f"{prefix}_config")
        layers = self.config.branch(prefix)["layers"] if layers is None else layers
        select_strategy = select_strategy or self.config.vision_feature_select_strategy
        if kwargs.get("output_hidden_states") is not True:
            kwargs["output_hidden_states"] = layers  # only these are kept
        if vision_config.model_type == "vit_mae":
            # Identity "shuffle": with mask_ratio 0 ViTMAE would still permute the patches randomly.
            num_patches = patch_grid(vision_config) ** 2
            kwargs["noise"] = torch.arange(num_patches, device=pixels.device).expand(pixels.shape[0], -1).float()
        frozen = not any(p.requires_grad for p in tower.parameters())
        pixels = pixels.to(dtype=tower.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            outputs = tower(pixels, return_dict=True, **kwargs)
        selected = torch.stack([outputs.hidden_states[i] for i in layers])  # (L, B, S, C)
        if select_strategy == "default":
            num_prefix = selected.shape[2] - patch_grid(vision_config) ** 2
            if num_prefix < 0:
                raise ValueError(
                    f"{prefix} encoder returned {selected.shape[2]} tokens, fewer than its "
                    f"{patch_grid(vision_config) ** 2} patches: check `image_size`/`patch_size` and the pixel size."
                )
            selected = selected[:, :, num_prefix:]  # drop CLS / distillation / register tokens
        return selected, outputs

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """Encodes images into LLM-width visual tokens, with the output layout of LLaVA's `get_image_features`.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`): normalised with the primary
                encoder's statistics (`config.vision_image_mean/std`); the secondary encoder gets its own.
            vision_feature_layer (`int` or `list[int]`, *optional*): the primary encoder's layers to merge, instead of
                the config's; as many as the config selects (the merge and projector are sized for them).
            vision_feature_select_strategy (`str`, *optional*): `"default"` (drop the prefix tokens) or `"full"`,
                instead of the config's; applies to every encoder.
            kwargs: `output_hidden_states`, `output_attentions` (of the primary encoder), `return_dict`.

        Returns:
            `BaseModelOutputWithPooling` (a tuple with `return_dict=False`): the primary encoder's outputs
            (`last_hidden_state` `(num_images, S, C_vision)`, `hidden_states`, `attentions` when requested) whose
            `pooler_output` is the visual tokens, a list of one `(image_seq_length, hidden_size)` tensor per image.
        """
        if vision_feature_select_strategy is not None and vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(
                f"`vision_feature_select_strategy={vision_feature_select_strategy!r}`: use one of {SELECT_STRATEGIES}."
            )
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_hidden_states is True:
            kwargs["output_hidden_states"] = True
        layer_features, primary_outputs = [], None
        for tower, prefix in zip(self.vision_towers, self.config.encoder_prefixes):
            selected, outputs = self._encode_with_outputs(
                tower,
                self._encoder_pixels(pixel_values, prefix),
                prefix,
                layers=self._feature_layers(prefix, vision_feature_layer),
                select_strategy=vision_feature_select_strategy,
                **(kwargs if primary_outputs is None else {}),
            )
            layer_features.append(selected)
            if primary_outputs is None:
                primary_outputs = outputs
        image_features = self.multi_modal_projector(self.connector(layer_features))  # (B, N, D)
        return BaseModelOutputWithPooling(
            last_hidden_state=primary_outputs.last_hidden_state,
            pooler_output=list(image_features),
            hidden_states=primary_outputs.hidden_states if output_hidden_states is True else None,
            attentions=getattr(primary_outputs, "attentions", None),
        )

    def encode_images_for_call(
        self,
        pixel_values: torch.FloatTensor | None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **image_kwargs,
    ) -> tuple[torch.FloatTensor | None, dict[str, BaseModelOutputWithPooling] | None]:
        """A forward's image encoding: `pixel_values` become `mm_encoder_outputs={"image": get_image_features(...)}`
        (with the call-time vision options, and as a `ModelOutput` whatever `config.return_dict` says).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`, *optional*).
            mm_encoder_outputs (`dict`, *optional*): precomputed `{"image": get_image_features(...)}`.
            vision_feature_layer, vision_feature_select_strategy: see [`CommModel.get_image_features`].
            image_kwargs: further `get_image_features` arguments (M3's scales).

        Returns:
            `(pixel_values, mm_encoder_outputs)` for `embed_inputs`: `(None, outputs)` once encoded; the inputs as
            they are without images, or with both images and precomputed features (`embed_inputs` refuses those).

        Raises:
            ValueError: a vision option with precomputed image features (they were encoded already, the option
                cannot apply), or with neither images nor features.
        """
        has_options = vision_feature_layer is not None or vision_feature_select_strategy is not None
        precomputed = (mm_encoder_outputs or {}).get("image") is not None
        if has_options and (precomputed or pixel_values is None):
            raise ValueError(
                "`vision_feature_layer`/`vision_feature_select_strategy` apply when the model encodes `pixel_values`; "
                "with precomputed `mm_encoder_outputs` (or no images) they cannot apply. Pass them to "
                "`get_image_features` instead."
            )
        if pixel_values is None or precomputed:
            return pixel_values, mm_encoder_outputs
        image_outputs = self.get_image_features(
            pixel_values,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            return_dict=True,
            **image_kwargs,
        )
        return None, {**(mm_encoder_outputs or {}), "image": image_outputs}

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
        past_key_values: Cache | None = None,
        position_ids: torch.LongTensor | None = None,
    ) -> tuple[torch.FloatTensor, BaseModelOutputWithPooling | None, torch.BoolTensor | None]:
        """LLaVA's forward preamble, shared by every family: checks the inputs, embeds the text, encodes the images
        (unless `mm_encoder_outputs` holds them) and finds their placeholders.

        Requests that would silently compute something else are refused with a `ValueError`: an empty input, an
        input past the LLM's `max_position_embeddings` (counting the tokens in `past_key_values`), and image
        placeholders without images (checked when the cache is empty; decode steps carry no images). Images without
        placeholders are refused by the families' count checks.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, T)`, *optional*), inputs_embeds (`torch.FloatTensor` of shape
                `(B, T, D)`, *optional*): the text, exactly one of them.
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`, *optional*): the images.
            mm_encoder_outputs (`dict`, *optional*): `{"image": get_image_features(...)}` computed beforehand.
            past_key_values (`Cache`, *optional*): the KV cache, whose length counts towards the positions.
            position_ids (`torch.LongTensor` of shape `(B, T)`, *optional*): explicit positions; the largest is
                checked against `max_position_embeddings`.

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
        prompt = input_ids if input_ids is not None else inputs_embeds
        past_length = 0
        if past_key_values is not None and not torch.compiler.is_compiling():
            past_length = past_key_values.get_seq_length()
        self.check_sequence_length(prompt.shape[1], past_length, position_ids)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values, return_dict=True)
        if image_outputs is None:
            if past_length == 0 and not torch.compiler.is_compiling():
                mask = self.get_placeholder_mask(input_ids, inputs_embeds)
                if bool(mask.any()):
                    raise ValueError(
                        f"The text has {int(mask.sum())} image tokens (id {self.config.image_token_id}) but no images "
                        "were given, so the model would read the placeholder embeddings as if they were the image. "
                        "Pass the images as `pixel_values` (the processor returns them with the text), or drop the "
                        "image placeholders from a text-only prompt."
                    )
            return inputs_embeds, None, None
        return inputs_embeds, image_outputs, self.get_placeholder_mask(input_ids, inputs_embeds)

    def check_sequence_length(
        self, length: int, past_length: int = 0, position_ids: torch.LongTensor | None = None
    ) -> None:
        """Refuses an empty input and one that runs past the LLM's position table (`max_position_embeddings`).

        Args:
            length (`int`): tokens of this call's input `(B, T)`: `T`.
            past_length (`int`): tokens already in the KV cache (0 at prefill).
            position_ids (`torch.LongTensor` of shape `(B, T)`, *optional*): explicit positions (packed rows restart
                them per segment); the largest one is checked instead of `past_length + T`.

        Raises:
            ValueError: `T == 0` without a cache, or a position at or past `max_position_embeddings`.
        """
        if length == 0 and past_length == 0:
            raise ValueError(
                "The prompt is empty (0 tokens): the language model needs at least one token to predict from. Start "
                "the prompt with the tokenizer's BOS token or a chat template."
            )
        limit = getattr(self.config.get_text_config(), "max_position_embeddings", None)
        reach = past_length + length
        if position_ids is not None and position_ids.numel() and not torch.compiler.is_compiling():
            reach = int(position_ids.max()) + 1
        if isinstance(limit, int) and reach > limit:
            raise ValueError(
                f"The input reaches position {reach}, past the {limit} positions of the language "
                f"model (`text_config.max_position_embeddings`); no position beyond {limit} was trained. Shorten the "
                "prompt, use fewer or smaller images (M3: a lower `matryoshka_scale`), or lower `max_new_tokens`."
            )

    def run_language_model(
        self,
        inputs_embeds: torch.FloatTensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        past_key_values: Cache | None,
        image_hidden_states: torch.FloatTensor | None,
        **kwargs,
    ) -> CommModelOutputWithPast:
        """The LLM on `(B, T, D)` input embeddings (visual tokens already in place); shared by every family.

        Returns a tuple when `kwargs` hold `return_dict=False`, so that a family `forward` not wrapped in
        `can_return_tuple` (which handles `config.return_dict`) answers it as transformers' models do.

        Raises:
            ValueError: a call-time vision option reached the LLM (the images were encoded without it).
        """
        leftover = [name for name in VISION_OPTIONS if kwargs.get(name) is not None]
        if leftover:
            raise ValueError(
                f"{leftover} cannot apply here: this forward encodes the images without them. Encode the images with "
                "`get_image_features(pixel_values, vision_feature_layer=..., vision_feature_select_strategy=...)` and "
                "pass the result as `mm_encoder_outputs={'image': ...}`."
            )
        for name in VISION_OPTIONS:
            kwargs.pop(name, None)
        return_dict = kwargs.pop("return_dict", None)
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        output = CommModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_hidden_states,
        )
        return output.to_tuple() if return_dict is False else output

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
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> CommModelOutputWithPast | tuple:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(B, T)`): text with expanded image placeholders.
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`, *optional*): one image per placeholder
                run, in order of appearance.
            mm_encoder_outputs (`dict`, *optional*): precomputed `{"image": get_image_features(...)}` (generation
                encodes images once before prefill and passes them here).
            vision_feature_layer, vision_feature_select_strategy: encode `pixel_values` with these instead of the
                config's (see [`CommModel.get_image_features`]).
        """
        pixel_values, mm_encoder_outputs = self.encode_images_for_call(
            pixel_values, mm_encoder_outputs, vision_feature_layer, vision_feature_select_strategy
        )
        inputs_embeds, image_outputs, special_image_mask = self.embed_inputs(
            input_ids, inputs_embeds, pixel_values, mm_encoder_outputs, past_key_values, position_ids
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
    _tp_plan = {"lm_head": "colwise_gather_output"}

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

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling | tuple:
        """See [`CommModel.get_image_features`]."""
        return self.model.get_image_features(pixel_values, **kwargs)

    def _validate_generated_length(
        self, generation_config: GenerationConfig, input_ids_length: int, has_default_max_length: bool
    ) -> None:
        """`GenerationMixin`'s length checks, plus the LLM's position table: a generation that would run past
        `text_config.max_position_embeddings` is refused before it starts (an explicit `max_new_tokens` or
        `max_length`), or stops at the last position (the default `max_length`, as transformers does for LLMs)."""
        limit = getattr(self.config.get_text_config(), "max_position_embeddings", None)
        if isinstance(limit, int) and generation_config.max_length > limit:
            if has_default_max_length and generation_config.max_new_tokens is None:
                generation_config.max_length = limit
            else:
                raise ValueError(
                    f"Generating up to {generation_config.max_length} tokens ({input_ids_length} of prompt) runs past "
                    f"the {limit} positions of the language model (`text_config.max_position_embeddings`). Lower "
                    f"`max_new_tokens` to at most {limit - input_ids_length}, or shorten the prompt."
                )
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        """`GenerationMixin.prepare_inputs_for_generation`, keeping the images for any forward whose KV cache is
        still empty.

        transformers runs an assistant model (`generate(assistant_model=...)`) as if past its first iteration, so it
        would drop the images from the assistant's prefill, and the assistant would draft from placeholder embeddings
        instead of visual tokens. With the images kept, an assistant of this family drafts from what the main model
        sees.
        """
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if (
            not is_first_iteration
            and kwargs.get("mm_encoder_outputs") is not None
            and "mm_encoder_outputs" not in model_inputs
            and (past_key_values is None or past_key_values.get_seq_length() == 0)
        ):
            model_inputs["mm_encoder_outputs"] = kwargs["mm_encoder_outputs"]
        return model_inputs

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
            if kwargs.get("shift_labels") is not None:  # pre-shifted targets (context parallelism) replace `labels`
                kwargs["shift_labels"] = mask_image_shift_labels(
                    kwargs["shift_labels"], input_ids, self.config.image_token_id
                )
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
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> CommCausalLMOutputWithPast | tuple:
        """
        Args:
            labels (`torch.LongTensor` of shape `(B, T)`, *optional*): next-token targets (-100 = ignored), shifted
                inside the loss as in transformers' causal LMs; image placeholder positions are never targets.
                `shift_labels` `(B, T)` (pre-shifted targets, passed by context-parallel training) replace them in the
                loss, as in transformers' causal LMs.
            logits_to_keep (`int` or `torch.Tensor`): compute logits only for the last `n` positions (0 = all).

        See [`CommModel.forward`] for the other arguments.
        """
        pixel_values, mm_encoder_outputs = self.model.encode_images_for_call(
            pixel_values, mm_encoder_outputs, vision_feature_layer, vision_feature_select_strategy
        )
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            return_dict=True,
            **kwargs,
        )
        return self.lm_head_outputs(outputs, labels, logits_to_keep, input_ids=input_ids, **kwargs)


__all__ = [
    "CommModel",
    "CommForConditionalGeneration",
    "CommPreTrainedModel",
    "mask_image_labels",
    "mask_image_shift_labels",
]
