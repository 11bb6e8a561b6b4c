"""Adaptive-combiner model configuration.

The adaptive combiner comes from "Joint Adaptive Representations for Image-Language Learning" (Piergiovanni and
Angelova 2023, arXiv 2305.19924). Here it is a COMM-family connector: the visual tokens of any vision branch of
[`CommConfig`] and the prompt's text embeddings are fused into `combiner_num_latents` tokens that enter the LLM in
place of all the visual tokens (so the processor writes N placeholders per image instead of 576).

The default vision branch is LLaVA-1.5's (one CLIP ViT-L/14-336 encoder, penultimate layer, 2-layer MLP projector):
the projector is the paper's image projection `P(X_im) = W1 X_im`, a pretrained LLaVA-1.5 checkpoint supplies every
weight except the combiner's, and the FLOPs claim is measured against exactly that "concatenation" baseline. COMM's
two encoders with multi-level merging are one call away: `AdaptiveCombinerConfig.from_comm_config(CommConfig())`.

Choices where the paper is silent (each one a field): one standard pre-LN transformer layer after the gated block,
fusion weights shared across iterations, gates initialised at 0 (Flamingo's tanh-gating convention), MLP ratio 4,
GELU, LayerNorm on the inputs, residual latents and position codes on the visual tokens (Perceiver's and DETR's
conventions; with `combiner_input_norm`, `combiner_latent_residual` and `combiner_image_positions` off, eq. 2 as
printed), "weighted" = softmax-normalised learnable weights over the iterations' outputs, "residual" = the final
residual stream t_N + F_1 + ... + F_T, "spatial" = adaptive average pooling of the visual token grid to N tokens,
"none" = the visual tokens unpooled (beyond the paper; the fused output is still N tokens).
"""

from transformers.utils import logging

from .configuration_comm import LlavaBranchConfig


logger = logging.get_logger(__name__)

RESAMPLINGS = ("latent", "spatial", "none")
COMBINATIONS = ("weighted", "residual", "none")


class AdaptiveCombinerConfig(LlavaBranchConfig):
    r"""
    Configuration of [`AdaptiveCombinerForConditionalGeneration`]: a [`CommConfig`] vision branch (defaults:
    LLaVA-1.5's single CLIP ViT-L/14-336, penultimate layer, 2-layer MLP projector) followed by the adaptive combiner.

    Every [`CommConfig`] field keeps its meaning (`image_seq_length` is still the number of visual tokens one image
    gives the combiner); the combiner adds:

    Args:
        combiner_num_latents (`int`, defaults to 64): N, the fused tokens per image that replace the visual tokens in
            the LLM input (the processor writes N image placeholders per image; the paper's default 64).
        combiner_iterations (`int`, defaults to 4): fusion iterations T (`t_N <- F + t_N` between them).
        combiner_num_layers (`int`, defaults to 1): standard transformer layers after the gated cross-attention block
            in each iteration (`F = TransformerLayer(F(t_N, f_N))`).
        combiner_hidden_size (`int`, *optional*): width D of the combiner. `None` = the LLM width (no extra
            projections, the paper's setting); otherwise the image and text inputs are projected to D and the output
            back to the LLM width.
        combiner_num_heads (`int`, *optional*): attention heads of every combiner attention; `None` = the LLM's
            `num_attention_heads` (must divide D).
        combiner_mlp_ratio (`int`, defaults to 4): hidden width of the combiner MLPs as a multiple of D.
        combiner_hidden_act (`str`, defaults to `"gelu"`): activation of the combiner MLPs.
        combiner_gating (`bool`, defaults to `True`): tanh(alpha) / tanh(beta) gates on the cross-attention and MLP
            branches; `False` is the paper's "no gating" ablation (both gates fixed to 1).
        combiner_gate_init (`float`, defaults to 0.0): initial alpha and beta (0 = closed gates, as in Flamingo).
        combiner_resampling (`str`, defaults to `"latent"`): how the visual tokens become N tokens. `"latent"`: N
            learned latent queries attend to them (eq. 2). `"spatial"`: adaptive average pooling of the patch grid to
            an `h x w = N` grid (h the largest divisor of N not above sqrt(N)), or of the token sequence when the
            tokens do not form a square grid, followed by W2. `"none"` (not in the paper): every visual token goes
            through W2 unpooled, so eq. 3's cross-attention reads the whole grid; the LLM still gets N tokens. The
            text always uses latents (it has no grid).
        combiner_combination (`str`, defaults to `"weighted"`): how the T iterations' outputs F_1..F_T become the
            fused tokens. `"weighted"`: sum_i w_i F_i with w = softmax(learnable logits), initialised equal.
            `"residual"`: the residual stream after the last iteration, t_N + F_1 + ... + F_T. `"none"`: F_T.
        combiner_share_weights (`bool`, defaults to `True`): one fusion block reused by every iteration (the paper
            repeats "the same process"); `False` gives each iteration its own weights.
        combiner_input_norm (`bool`, defaults to `True`): a LayerNorm on the visual tokens and on the text embeddings
            before they are resampled (Perceiver's pre-norm cross-attention). Without it the text embeddings, whose
            scale is the LLM's init (0.02-0.09), give near-uniform attention, and every text latent is the mean of
            the prompt.
        combiner_latent_residual (`bool`, defaults to `True`): the latent resamplers return `X_N + W2 Attn(X_N, X)`
            (the query kept, as DETR's and Perceiver's latents are) instead of eq. 2's `W2 Attn(X_N, X)`. Without it
            the N latents start as N near-copies of one mean token, and the fused tokens are alike for every image.
            `False` for both fields is eq. 2 as printed.
        combiner_image_positions (`bool`, defaults to `True`): add fixed 2D sine-cosine position codes (MAE's) to the
            visual tokens before resampling, as DETR and Perceiver add positions to what their latents read. Latent
            attention is blind to token order, so without them a latent knows where a patch is only from whatever
            position the encoder left in its features, and the fused tokens (which have no grid) lose the layout
            that a box needs. `False` is the paper's eq. 2.
        combiner_layer_norm_eps (`float`, defaults to 1e-5): epsilon of the combiner's LayerNorms.
    """

    model_type = "adaptive_combiner"
    image_text_to_text_class_ref = "modeling_combiner.AdaptiveCombinerForConditionalGeneration"

    combiner_num_latents: int = 64
    combiner_iterations: int = 4
    combiner_num_layers: int = 1
    combiner_hidden_size: int | None = None
    combiner_num_heads: int | None = None
    combiner_mlp_ratio: int = 4
    combiner_hidden_act: str = "gelu"
    combiner_gating: bool = True
    combiner_gate_init: float = 0.0
    combiner_resampling: str = "latent"
    combiner_combination: str = "weighted"
    combiner_share_weights: bool = True
    combiner_input_norm: bool = True
    combiner_latent_residual: bool = True
    combiner_image_positions: bool = True
    combiner_layer_norm_eps: float = 1e-5

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate_combiner()

    def check_fields(self) -> None:
        """[`CommConfig.check_fields`] plus the combiner's fields."""
        super().check_fields()
        self._validate_combiner()

    @property
    def num_image_tokens(self) -> int:
        """Image placeholders per image in the LLM input (= `combiner_num_latents`)."""
        return self.combiner_num_latents

    @property
    def combiner_width(self) -> int:
        """D: `combiner_hidden_size`, or the LLM width when it is `None`."""
        return self.combiner_hidden_size or self.text_config.hidden_size

    @property
    def combiner_heads(self) -> int:
        """Attention heads of the combiner: `combiner_num_heads`, or the LLM's when it is `None`."""
        return self.combiner_num_heads or self.text_config.num_attention_heads

    def _validate_combiner(self) -> None:
        for name in ("combiner_num_latents", "combiner_iterations", "combiner_num_layers", "combiner_mlp_ratio"):
            _check_positive_int(name, getattr(self, name))
        if self.combiner_hidden_size is not None:
            _check_positive_int("combiner_hidden_size", self.combiner_hidden_size)
        if self.combiner_num_heads is not None:
            _check_positive_int("combiner_num_heads", self.combiner_num_heads)
        else:
            _check_positive_int(
                "text_config.num_attention_heads", getattr(self.text_config, "num_attention_heads", None)
            )
        if self.combiner_width % self.combiner_heads != 0:
            raise ValueError(
                f"The combiner width D={self.combiner_width} is not divisible by its {self.combiner_heads} attention "
                "heads; set `combiner_num_heads` to a divisor of D (or `combiner_hidden_size` to a multiple of it)."
            )
        if self.combiner_resampling not in RESAMPLINGS:
            raise ValueError(f"`combiner_resampling`={self.combiner_resampling!r} is unknown; allowed: {RESAMPLINGS}.")
        if self.combiner_combination not in COMBINATIONS:
            raise ValueError(
                f"`combiner_combination`={self.combiner_combination!r} is unknown; allowed: {COMBINATIONS}."
            )
        for name in ("combiner_gating", "combiner_input_norm", "combiner_latent_residual", "combiner_image_positions"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if not self.combiner_layer_norm_eps > 0:
            raise ValueError(f"`combiner_layer_norm_eps` must be > 0, got {self.combiner_layer_norm_eps!r}.")
        if (
            self.combiner_resampling == "spatial"
            and self.image_seq_length is not None
            and self.combiner_num_latents > self.image_seq_length
        ):
            raise ValueError(
                f"`combiner_resampling`='spatial' averages the {self.image_seq_length} visual tokens into "
                f"`combiner_num_latents`={self.combiner_num_latents} bins, more than there are tokens; lower "
                "`combiner_num_latents` or use `combiner_resampling`='latent'."
            )
        if self.combiner_num_latents >= (self.image_seq_length or 0) > 0:
            logger.warning_once(
                f"`combiner_num_latents`={self.combiner_num_latents} is not below the {self.image_seq_length} visual "
                "tokens per image: the combiner then saves no LLM compute."
            )


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


__all__ = ["AdaptiveCombinerConfig", "COMBINATIONS", "RESAMPLINGS"]
