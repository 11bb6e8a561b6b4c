"""PyTorch adaptive-combiner VLM: a COMM vision branch, the adaptive combiner, and an LLM.

Paper: "Joint Adaptive Representations for Image-Language Learning" (Piergiovanni and Angelova 2023,
arXiv 2305.19924). No public code exists; this is a reference implementation as a transformers LLaVA-layout model:

    pixel_values -> vision branch of COMM (encoder(s), merge, aligner, projector)     -> (num_images, S_v, D_llm)
    input_ids    -> LLM input embeddings (the prompt text, image placeholders removed) -> (B, T, D_llm)
    combiner(visual tokens of image i, text of image i's row)                          -> (num_images, N, D_llm)
    fused tokens scattered into the N placeholders of each image -> LLM

Which text is "the prompt" (`prompt_text_mask`): the positions of the image's row that are not image placeholders,
not padding (`attention_mask`), and before `prompt_length` when given; with `labels`, only positions labelled -100
that come before the first supervised token following the image (so no answer token, and no later turn, is fused
into tokens the answer can attend to). Without labels (inference), the whole prompt. Trainers that compute the loss
outside the model call the backbone without `labels` (TRL's fused LM head): the training collator
(`comm_vlm.training.TrainingBatchCollator`) copies the labels into the batch as `combiner_labels`, which reach the
combiner. A training forward with neither raises, since the combiner would fuse the answer into the tokens the answer
is predicted from.

Multi-turn nuance: in training (labels), an image is fused with the unsupervised text of its own turn and earlier
prompts; at inference the model cannot tell turns apart and fuses each image with the whole conversation so far, so
turns after the first see a slightly different fusion than in training. Several images in one row are each fused
with that row's text, separately.

Generation: `get_image_features` (called once by `generate` before prefill) returns the vision branch's tokens; the
fusion, which needs the text, runs in `forward` at prefill; decode steps have no placeholders, so the fused tokens
live on in the KV cache and are never recomputed. `generate` records the prompt length so that generation without a
cache (which re-runs the whole sequence) fuses the same prompt and never the generated tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import logging

from .combiner import AdaptiveCombiner, GatedCrossAttentionBlock, LatentResampler
from .configuration_combiner import AdaptiveCombinerConfig
from .modeling_comm import (
    CommCausalLMOutputWithPast,
    CommForConditionalGeneration,
    CommModel,
    CommModelOutputWithPast,
    CommPreTrainedModel,
)


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100


def unshift_labels(shift_labels: torch.Tensor) -> torch.Tensor:
    """`labels` `(B, T)` from pre-shifted `shift_labels` (`shift_labels[:, t] = labels[:, t + 1]`); label 0 is -100."""
    return torch.cat([torch.full_like(shift_labels[:, :1], IGNORE_INDEX), shift_labels[:, :-1]], dim=1)


def image_rows_and_starts(
    image_mask: torch.Tensor, num_images: int, tokens_per_image: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps each image to its row and the position of its first placeholder.

    Images are taken in order of appearance (row-major), `tokens_per_image` placeholders each, as `masked_scatter`
    fills them.

    Args:
        image_mask (`torch.BoolTensor` of shape `(B, T)`): image placeholder positions.
        num_images (`int`): images given.
        tokens_per_image (`int`): N.

    Returns:
        `(rows, starts)`, both `(num_images,)` long tensors.
    """
    counts = image_mask.sum(dim=1)  # (B,)
    total = int(counts.sum())
    if total != num_images * tokens_per_image or bool((counts % tokens_per_image != 0).any()):
        raise ValueError(
            f"Image features and image tokens do not match: the text has {total} image tokens (per row: "
            f"{counts.tolist()}) but {num_images} images were given, and the adaptive combiner gives "
            f"{tokens_per_image} fused tokens per image. Expand each image placeholder to `combiner_num_latents` "
            f"= {tokens_per_image} tokens (CommProcessor(num_image_tokens=config.combiner_num_latents) does) and "
            "pass exactly one image per placeholder run."
        )
    rows = torch.repeat_interleave(
        torch.arange(image_mask.shape[0], device=image_mask.device), counts // tokens_per_image
    )
    starts = image_mask.nonzero()[::tokens_per_image, 1]  # first placeholder of each image, row-major
    return rows, starts


def prompt_text_mask(
    image_mask: torch.Tensor,
    rows: torch.Tensor,
    starts: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    prompt_length: int | None = None,
) -> torch.Tensor:
    """Which text positions each image is fused with (see the module docstring for the rule).

    Args:
        image_mask (`torch.BoolTensor` of shape `(B, T)`): image placeholder positions.
        rows, starts (`torch.LongTensor` of shape `(num_images,)`): from `image_rows_and_starts`.
        attention_mask (`torch.Tensor` of shape `(B, T)`, *optional*): 0 for padding (4D masks are ignored here).
        labels (`torch.LongTensor` of shape `(B, T)`, *optional*): -100 for unsupervised positions.
        prompt_length (`int`, *optional*): positions `>= prompt_length` are never fused (set by `generate`).

    Returns:
        `torch.BoolTensor` of shape `(num_images, T)`.
    """
    length = image_mask.shape[1]
    positions = torch.arange(length, device=image_mask.device)
    text = ~image_mask  # (B, T)
    if attention_mask is not None and attention_mask.dim() == 2:
        text = text & attention_mask.to(image_mask.device).bool()
    mask = text
    if prompt_length is not None:
        mask = mask & (positions < prompt_length)[None]
    mask = mask[rows]  # (num_images, T)
    if labels is not None:
        if labels.shape != image_mask.shape:
            raise ValueError(
                f"`labels` has shape {tuple(labels.shape)} but the input is {tuple(image_mask.shape)}: give one "
                "label per input token (-100 for the prompt)."
            )
        supervised = (labels.to(image_mask.device) != IGNORE_INDEX) & text  # answer tokens, (B, T)
        first = torch.where(supervised, positions[None], length)  # (B, T)
        first_after = first.flip(-1).cummin(-1).values.flip(-1)  # first supervised position >= p, (B, T)
        limit = first_after[rows, starts]  # (num_images,)
        mask = mask & ~supervised[rows] & (positions[None] < limit[:, None])
    return mask


class AdaptiveCombinerPreTrainedModel(CommPreTrainedModel):
    config_class = AdaptiveCombinerConfig
    config: AdaptiveCombinerConfig

    # Serving engines that splice cached per-image encoder outputs into the LLM's inputs (vLLM's Transformers backend
    # calls `get_image_features` per image) never run the prompt-dependent fusion, so they would answer from unfused
    # encoder tokens. vLLM admits a Transformers model only if it supports attention backends or can set its
    # attention implementation: both are declined here, so vLLM refuses the combiner instead of serving it wrongly.
    _supports_attention_backend = False
    _can_set_attn_implementation_cached_value = False
    # Sharding units (FSDP, `device_map`) besides the encoders' and the LLM's layers: the resamplers and the fusion
    # step (at LLaVA-7B width 84M, 84M and 403M parameters), so the root unit does not hold the whole combiner.
    _no_split_modules = ["LatentResampler", "FusionStep"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LatentResampler):
            init.normal_(module.latents, mean=0.0, std=1.0)  # DETR-style queries
        if isinstance(module, GatedCrossAttentionBlock) and module.gating:
            init.constant_(module.attn_gate, self.config.combiner_gate_init)
            init.constant_(module.mlp_gate, self.config.combiner_gate_init)
        if isinstance(module, AdaptiveCombiner) and module.combination == "weighted":
            init.zeros_(module.iteration_logits)  # equal iteration weights 1/T


class AdaptiveCombinerModel(AdaptiveCombinerPreTrainedModel, CommModel):
    """COMM's vision branch and LLM with the adaptive combiner in between (`self.combiner`); no LM head."""

    def __init__(self, config: AdaptiveCombinerConfig):
        super().__init__(config)  # CommModel: vision tower(s), connector, projector, language model
        self.combiner = AdaptiveCombiner(
            input_size=config.text_config.hidden_size,
            hidden_size=config.combiner_width,
            num_latents=config.combiner_num_latents,
            iterations=config.combiner_iterations,
            num_layers=config.combiner_num_layers,
            num_heads=config.combiner_heads,
            mlp_ratio=config.combiner_mlp_ratio,
            hidden_act=config.combiner_hidden_act,
            eps=config.combiner_layer_norm_eps,
            gating=config.combiner_gating,
            resampling=config.combiner_resampling,
            combination=config.combiner_combination,
            share_weights=config.combiner_share_weights,
            input_norm=config.combiner_input_norm,
            latent_residual=config.combiner_latent_residual,
            image_positions=config.combiner_image_positions,
        )
        self.post_init()  # initialises the combiner only: the rest is already marked initialised

    def image_token_count_hint(self) -> str:
        n = self.config.combiner_num_latents
        return (
            f"({n} fused tokens per image). Expand each image placeholder to `combiner_num_latents` = {n} tokens "
            "(CommProcessor(num_image_tokens=config.combiner_num_latents) does) and pass exactly one image per "
            "placeholder run."
        )

    def fuse_image_features(
        self,
        image_features: torch.Tensor,
        inputs_embeds: torch.Tensor,
        image_mask: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        prompt_length: int | None = None,
    ) -> torch.Tensor:
        """Fuses each image's visual tokens with its row's prompt text.

        Args:
            image_features (`torch.Tensor` of shape `(num_images, S_v, D_llm)`): the vision branch's output.
            inputs_embeds (`torch.Tensor` of shape `(B, T, D_llm)`): text embeddings (placeholders not yet filled).
            image_mask (`torch.BoolTensor` of shape `(B, T)`): image placeholder positions.
            attention_mask, labels, prompt_length: select the prompt text (see `prompt_text_mask`).

        Returns:
            `torch.Tensor` of shape `(num_images, N, D_llm)`.
        """
        num_latents = self.config.combiner_num_latents
        rows, starts = image_rows_and_starts(image_mask, image_features.shape[0], num_latents)
        text_mask = prompt_text_mask(image_mask, rows, starts, attention_mask, labels, prompt_length)
        if labels is not None and not bool(text_mask.any(-1).all()):
            logger.warning_once(
                "The adaptive combiner got no prompt text for some images: `labels` supervise every token before "
                "the answer. Label the prompt -100 (e.g. TRL `completion_only_loss` or `assistant_only_loss`) so the "
                "combiner sees the prompt in training as it does at inference."
            )
        text = inputs_embeds[rows]  # (num_images, T, D_llm)
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        return self.combiner(image_features, text, text_mask)  # (num_images, N, D_llm)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        labels: torch.LongTensor | None = None,
        prompt_length: int | None = None,
        combiner_labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CommModelOutputWithPast:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(B, T)`): text with `combiner_num_latents` placeholders per image.
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`, *optional*): one image per
                placeholder run, in order of appearance.
            mm_encoder_outputs (`dict`, *optional*): precomputed `{"image": get_image_features(...)}`.
            labels (`torch.LongTensor` of shape `(B, T)`, *optional*): only used to keep supervised (answer) tokens
                out of the combiner; the loss is computed by [`AdaptiveCombinerForConditionalGeneration`].
            prompt_length (`int`, *optional*): positions from here on are never fused (`generate` sets it).
            combiner_labels (`torch.LongTensor` of shape `(B, T)`, *optional*): the training labels, used only to
                keep supervised tokens out of the combiner, for callers that compute the loss outside the model and
                so pass no `labels`. Ignored when `labels` is given.

        Returns:
            [`CommModelOutputWithPast`] whose `image_hidden_states` are the fused tokens `(num_images * N, D_llm)`.
        """
        inputs_embeds, image_outputs, special_image_mask = self.embed_inputs(
            input_ids, inputs_embeds, pixel_values, mm_encoder_outputs, past_key_values, position_ids
        )
        if labels is None and kwargs.get("shift_labels") is not None:
            labels = unshift_labels(kwargs["shift_labels"])
        if labels is None:
            labels = combiner_labels

        fused = None
        if image_outputs is not None:
            image_features = torch.stack(list(image_outputs.pooler_output))  # (num_images, S_v, D_llm)
            image_mask = special_image_mask.squeeze(-1)  # (B, T)
            if labels is None and prompt_length is None and self.training and torch.is_grad_enabled():
                raise ValueError(
                    "The adaptive combiner is training without `labels`, so it cannot tell the prompt from the answer "
                    "and would fuse the answer into the visual tokens the answer is predicted from (label leakage). "
                    "Pass `labels` (-100 on the prompt), or `combiner_labels` when the loss is computed outside the "
                    "model: with TRL's SFTTrainer, pass `data_collator=TrainingBatchCollator(<its collator>, "
                    "model.config)` (from `comm_vlm.training`, it adds them), or build the trainer with "
                    "`comm_vlm.training.build_trainer`. For inference, call `model.eval()`."
                )
            fused = self.fuse_image_features(
                image_features, inputs_embeds, image_mask, attention_mask, labels, prompt_length
            )
            # (num_images * N, D_llm), in the embeddings' dtype (under autocast the combiner's output is not)
            fused = fused.reshape(-1, fused.shape[-1]).to(inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(special_image_mask, fused)

        return self.run_language_model(inputs_embeds, attention_mask, position_ids, past_key_values, fused, **kwargs)


class AdaptiveCombinerForConditionalGeneration(AdaptiveCombinerPreTrainedModel, CommForConditionalGeneration):
    """The adaptive-combiner VLM with a language-modeling head (`model.combiner` holds the combiner)."""

    def __init__(self, config: AdaptiveCombinerConfig):
        PreTrainedModel.__init__(self, config)  # not CommForConditionalGeneration's: it would build a CommModel
        self.model = AdaptiveCombinerModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def generate(self, inputs: torch.Tensor | None = None, *args, prompt_length: int | None = None, **kwargs):
        """`GenerationMixin.generate`, recording the prompt length so the combiner never fuses generated tokens
        (it matters without a KV cache, where every step re-runs the whole sequence).

        Every decoding mode of `GenerationMixin` works (greedy, sampling, beam search, `num_return_sequences`,
        assisted decoding, prompt lookup, static cache) except chunked prefill (`prefill_chunk_size`), which is
        refused: the fusion needs the whole prompt at once.
        """
        generation_config = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("prefill_chunk_size", getattr(generation_config, "prefill_chunk_size", None)) is not None:
            raise ValueError(
                "The adaptive combiner cannot prefill in chunks (`prefill_chunk_size`): each image is fused with the "
                "whole prompt, which a chunk does not hold. Pass `prefill_chunk_size=None`."
            )
        if prompt_length is None:
            prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            prompt_length = prompt.shape[1] if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 else None
        return super().generate(inputs, *args, prompt_length=prompt_length, **kwargs)

    def _expand_multimodal_outputs(
        self,
        input_ids: torch.LongTensor | None,
        mm_encoder_output: dict,
        expand_size: int = 1,
        inputs_embeds: torch.FloatTensor | None = None,
    ) -> dict:
        """Repeats each row's images `expand_size` times, for beam search and `num_return_sequences`.

        `GenerationMixin` splits the encoder outputs into rows by matching placeholder counts to visual token counts,
        which fails here: a row holds N = `combiner_num_latents` placeholders per image while the vision branch gives
        `image_seq_length` tokens per image (the fusion into N tokens runs later, in `forward`). The images of a row
        are counted as its placeholders divided by N instead, and the row's group of images is repeated as
        `GenerationMixin` repeats the row: images `[A, B | C]` of rows `[0 | 1]` become `[A, B, A, B | C, C]` for
        `expand_size=2`.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, T)`, *optional*): the unexpanded prompts.
            mm_encoder_output (`dict`): `{"image": get_image_features(...)}`, whose `pooler_output` holds one
                `(S_v, D)` tensor per image.
            expand_size (`int`): copies of every row.
            inputs_embeds (`torch.FloatTensor` of shape `(B, T, D)`, *optional*): the prompts, when given as
                embeddings.

        Returns:
            `dict`: `mm_encoder_output`, its image features repeated per row.
        """
        image_outputs = mm_encoder_output.get("image")
        if image_outputs is None or getattr(image_outputs, "pooler_output", None) is None:
            return mm_encoder_output
        if input_ids is None or input_ids.numel() == 0:
            image_mask = self.model.get_placeholder_mask(None, inputs_embeds).squeeze(-1)
        else:
            image_mask = input_ids == self.config.image_token_id
        features = list(image_outputs.pooler_output)
        rows, _ = image_rows_and_starts(image_mask, len(features), self.config.combiner_num_latents)
        per_row = torch.bincount(rows, minlength=image_mask.shape[0]).tolist()
        expanded, start = [], 0
        for count in per_row:
            expanded += features[start : start + count] * expand_size
            start += count
        image_outputs.pooler_output = expanded
        if isinstance(image_outputs.last_hidden_state, torch.Tensor) and expanded:
            image_outputs.last_hidden_state = torch.stack(expanded)
        return mm_encoder_output

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
        prompt_length: int | None = None,
        combiner_labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CommCausalLMOutputWithPast:
        """
        Args:
            labels (`torch.LongTensor` of shape `(B, T)`, *optional*): next-token targets (-100 = ignored; image
                placeholders are never targets); the supervised positions are also kept out of the combiner (no label
                leakage).
            logits_to_keep (`int` or `torch.Tensor`): compute logits only for the last `n` positions (0 = all).
            prompt_length, combiner_labels: see [`AdaptiveCombinerModel.forward`].

        See [`AdaptiveCombinerModel.forward`] for the other arguments.
        """
        return super().forward(
            input_ids,
            pixel_values,
            attention_mask,
            position_ids,
            past_key_values,
            inputs_embeds,
            labels,
            logits_to_keep,
            mm_encoder_outputs,
            prompt_length=prompt_length,
            combiner_labels=labels if combiner_labels is None else combiner_labels,
            **kwargs,
        )


__all__ = [
    "AdaptiveCombinerForConditionalGeneration",
    "AdaptiveCombinerModel",
    "AdaptiveCombinerPreTrainedModel",
    "image_rows_and_starts",
    "prompt_text_mask",
    "unshift_labels",
]
