"""COMM model configuration.

COMM ("From CLIP to DINO: Visual Encoders Shout in Multi-modal Large Language Models", Jiang et al. 2023,
arXiv 2310.08825) feeds a LLaVA-style LLM with the multi-level merged patch tokens of CLIP and DINOv2:

    v1 = sum_i alpha_i * Linear_i(LN_i(z1_i))     (CLIP, layers 1-24)
    v2 = sum_j beta_j  * Linear_j(LN_j(z2_j))     (DINOv2, layers 19-24)
    visual_tokens = Linear(concat(v1, MLP(v2)))

The defaults reproduce that model. Every encoder (primary `vision_config`, optional `secondary_vision_config`) has
its own layer list, multi-level-merge (MFM) strategy and aligner, so the same class covers the paper's encoder study
(any single encoder at any layer or layer mix) and plain LLaVA-1.5 (one CLIP encoder, penultimate layer, identity
aligner, 2-layer MLP projector).

Layer indices follow `hidden_states` of transformers' vision models: 0 is the embedding output and `i` (1..N) is the
output of transformer layer `i`; negative indices count from the end (-1 is the last layer, -2 the penultimate).
"""

import sys
import types
import typing
from dataclasses import field
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.utils import logging


logger = logging.get_logger(__name__)

MERGE_STRATEGIES = ("single", "mean", "layerscale", "lln_layerscale", "conv_layerscale")
ALIGNERS = ("identity", "linear", "mlp")
FEATURE_SELECT_STRATEGIES = ("default", "full")

# ViT-L/14 at 336 px, the size of both COMM encoders (24 layers, width 1024, 24x24 = 576 patches).
_VIT_L_14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
}
_CLIP_DEFAULTS = {**_VIT_L_14_336, "projection_dim": 768}
_DINOV2_DEFAULTS = {"model_type": "dinov2", **_VIT_L_14_336, "mlp_ratio": 4, "layerscale_value": 1.0}

# Per-family pixel statistics, used to re-normalise the primary encoder's pixels for the secondary encoder.
_PIXEL_STATS = {
    "clip_vision_model": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "siglip_vision_model": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
}


def default_pixel_stats(model_type: str) -> tuple[list[float], list[float]]:
    """Mean/std a family's image processor normalises with (ImageNet for DINOv2, MAE, DeiT, ViT and unknown)."""
    mean, std = _PIXEL_STATS.get(model_type, (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    return list(mean), list(std)


def resolve_layers(layers: int | list[int], num_layers: int, field_name: str) -> list[int]:
    """Turns a layer index or list (negative allowed) into sorted-as-given, non-negative `hidden_states` indices.

    Raises:
        ValueError: empty list, duplicates, or an index outside `[-(num_layers + 1), num_layers]`.
    """
    if not isinstance(layers, (int, list, tuple)) or isinstance(layers, bool):
        raise ValueError(
            f"`{field_name}` must be a layer index or a list of layer indices (integers), got {layers!r} "
            f"({type(layers).__name__}); e.g. {field_name}=-2 or {field_name}=[{num_layers - 1}, {num_layers}]."
        )
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    if not layer_list:
        raise ValueError(f"`{field_name}` is empty: give at least one layer index in 0..{num_layers}.")
    resolved = []
    for layer in layer_list:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"`{field_name}` must hold integers, got {layer!r}.")
        if not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(
                f"`{field_name}` has layer {layer}, outside the encoder: it has {num_layers} layers, so valid "
                f"indices are 0..{num_layers} (0 = embeddings) or -{num_layers + 1}..-1."
            )
        resolved.append(layer % (num_layers + 1))
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"`{field_name}` lists a layer twice: {layer_list}.")
    return resolved


# Fields whose values `resolve_layers` checks, with its own messages.
_LAYER_FIELDS = ("vision_feature_layer", "secondary_vision_feature_layer")


def _type_matches(value: Any, hint: Any) -> bool:
    """Whether `value` has the annotated type `hint` (bools are not integers; integers are floats; tuples are
    lists)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and (not args or all(_type_matches(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return not isinstance(hint, type) or isinstance(value, hint)


def _describe_type(hint: Any) -> str:
    """`int | None` -> "an integer or None", for error messages."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(arg) for arg in typing.get_args(hint))
    if origin is list:
        args = typing.get_args(hint)
        return f"a list of {_describe_type(args[0]).split(' ', 1)[1]}s" if args else "a list"
    names = {bool: "a bool (True or False)", int: "an integer", float: "a number", str: "a string", dict: "a dict"}
    if hint is type(None):
        return "None"
    return names.get(hint, f"a {getattr(hint, '__name__', hint)}")


def check_field_types(config: PretrainedConfig, base: type) -> None:
    """Checks every field that `base` and its subclasses declare against its annotation.

    Args:
        config (`PretrainedConfig`): an instance of a subclass of `base`.
        base (`type`): the first class whose fields are checked (the ones of `PretrainedConfig` are transformers').

    Raises:
        ValueError: a field whose value has another type, naming the field, the type expected and the value.
    """
    hints: dict[str, Any] = {}
    for cls in reversed(type(config).__mro__):
        if not (isinstance(cls, type) and issubclass(cls, base)):
            continue
        namespace = vars(sys.modules[cls.__module__])
        for name, hint in cls.__dict__.get("__annotations__", {}).items():
            hints[name] = eval(hint, namespace) if isinstance(hint, str) else hint  # noqa: S307 (own annotations)
    for name, hint in hints.items():
        if name in _LAYER_FIELDS:
            continue
        value = getattr(config, name)
        if not _type_matches(value, hint):
            raise ValueError(
                f"`{name}` must be {_describe_type(hint)}, got {value!r} ({type(value).__name__}). Set it to a value "
                "of that type (configs edited after construction are checked again when a model is built)."
            )


def _side(value: int | list[int] | tuple[int, ...]) -> int:
    return value[0] if isinstance(value, (list, tuple)) else value


def patch_grid(vision_config: PretrainedConfig) -> int:
    """Side of the square patch grid an encoder produces (image_size // patch_size)."""
    return _side(vision_config.image_size) // _side(vision_config.patch_size)


class CommConfig(PretrainedConfig):
    r"""
    Configuration of [`CommForConditionalGeneration`]. Defaults give COMM-7B's architecture (CLIP ViT-L/14-336 and
    DINOv2 ViT-L/14 at 336 px, Vicuna/Llama LLM).

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            Primary vision encoder (any transformers vision model returning hidden states). Defaults to CLIP
            ViT-L/14-336.
        secondary_vision_config (`dict`, `PretrainedConfig` or `None`, *optional*):
            Second encoder, concatenated channel-wise after its own merge and aligner. Defaults to DINOv2 ViT-L/14 at
            336 px; pass `None` for a single-encoder model.
        text_config (`dict` or `PretrainedConfig`, *optional*): any causal LM config. Defaults to Llama.
        image_token_index (`int`): id of the image placeholder token.
        image_seq_length (`int`, *optional*): visual tokens per image; derived from the patch grid when `None`.
        vision_feature_layer (`int` or `list[int]`): `hidden_states` indices of the primary encoder fed to the merge.
        vision_feature_merge (`str`): one of `MERGE_STRATEGIES` for the primary encoder.
        vision_aligner (`str`): one of `ALIGNERS` applied after the primary merge (`identity` for CLIP in COMM).
        vision_aligner_depth (`int`): number of linear layers of the `mlp` aligner (>= 1).
        vision_aligner_ratio (`int`): hidden width of the `mlp` aligner as a multiple of its input width.
        vision_image_mean, vision_image_std (`list[float]`, *optional*): the pixel statistics `pixel_values` arrive
            normalised with (the primary encoder's image processor); defaults per encoder family.
        secondary_vision_*: the same fields for the secondary encoder (defaults: DINOv2 layers 19-24,
            LLN-Layerscale, 2-layer MLP with ratio 8, ImageNet statistics).
        merge_hidden_size (`int`, *optional*): output width of the LLN/Conv per-layer modules; encoder width if `None`.
        merge_conv_kernel_size (`int`): kernel of the per-layer convolution of `conv_layerscale` (odd; default 3, our
            choice: the paper does not give it).
        aligner_hidden_act (`str`): activation of the `mlp` aligners (GELU, as the paper).
        vision_feature_select_strategy (`str`): `default` drops CLS/distillation/register tokens, `full` keeps them.
        projector_depth (`int`): linear layers of the projector to the LLM width (1 = COMM's linear, 2 = LLaVA-1.5).
        projector_hidden_act (`str`): activation between projector layers.
        multimodal_projector_bias (`bool`): bias in projector layers.
    """

    model_type = "comm"
    # The class that `AutoModelForImageTextToText` loads a checkpoint of this config as, in `transformers`'
    # `auto_map` form (`<module>.<class>`): see `to_dict`.
    image_text_to_text_class_ref = "modeling_comm.CommForConditionalGeneration"
    attribute_map = {"image_token_id": "image_token_index"}
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=_CLIP_DEFAULTS
        ),
        "secondary_vision_config": SubConfigSpec(config_class=AutoConfig, model_type="dinov2", optional=True),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PretrainedConfig | None = None
    secondary_vision_config: dict | PretrainedConfig | None = field(default_factory=lambda: dict(_DINOV2_DEFAULTS))
    text_config: dict | PretrainedConfig | None = None
    image_token_index: int = 32000
    image_seq_length: int | None = None
    vision_feature_layer: int | list[int] = field(default_factory=lambda: list(range(1, 25)))
    vision_feature_merge: str = "lln_layerscale"
    vision_aligner: str = "identity"
    vision_aligner_depth: int = 2
    vision_aligner_ratio: int = 8
    vision_image_mean: list[float] | None = None
    vision_image_std: list[float] | None = None
    secondary_vision_feature_layer: int | list[int] = field(default_factory=lambda: list(range(19, 25)))
    secondary_vision_feature_merge: str = "lln_layerscale"
    secondary_vision_aligner: str = "mlp"
    secondary_vision_aligner_depth: int = 2
    secondary_vision_aligner_ratio: int = 8
    secondary_vision_image_mean: list[float] | None = None
    secondary_vision_image_std: list[float] | None = None
    merge_hidden_size: int | None = None
    merge_conv_kernel_size: int = 3
    aligner_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "default"
    projector_depth: int = 1
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = self.text_config.tie_word_embeddings
        self._validate_branches()

    def check_fields(self) -> None:
        """Checks every field of this family, types and values, as construction does (and fills the derived ones
        left `None`). The models' `__init__` call it, so a config edited after construction is refused with a
        `ValueError` naming the field before any module is built from it.

        Raises:
            ValueError: the first invalid field, with how to fix it.
        """
        self._validate_branches()

    def validate(self) -> None:
        """transformers' config validators (run by `save_pretrained`), then [`~CommConfig.check_fields`]."""
        super().validate()
        self.check_fields()

    def to_dict(self) -> dict:
        """`PretrainedConfig.to_dict`, whose `auto_map` names the model class for `AutoModelForImageTextToText`
        (`image_text_to_text_class_ref`) unless it names one already.

        A saved `config.json` thus tells tools that pick the Auto class from the config alone which one to use:
        TRL's `SFTTrainer(model="<checkpoint dir>")` reads `config.auto_map` for any architecture that is not a
        `transformers` attribute. The entry adds no remote code: with comm-vlm imported, transformers loads the
        registered class whatever `trust_remote_code` says (local code wins), and there is no `AutoConfig` entry, so a
        checkpoint without its modeling files still needs comm-vlm. `comm_vlm.hub.save_for_hub` writes the full
        remote-code `auto_map` over it.
        """
        output = super().to_dict()
        auto_map = output.get("auto_map") or {}
        output["auto_map"] = {"AutoModelForImageTextToText": self.image_text_to_text_class_ref, **auto_map}
        return output

    @classmethod
    def from_comm_config(cls, comm_config: "CommConfig", **kwargs):
        """This config class on the vision branch and LLM of any COMM-family config: e.g.
        `AdaptiveCombinerConfig.from_comm_config(CommConfig())` puts the combiner on CLIP + DINOv2 with LLN-Layerscale,
        `MatryoshkaLlavaConfig.from_comm_config(trained.config)` makes M3 of a trained COMM.

        Args:
            comm_config (`CommConfig`): the vision branch and LLM to keep.
            kwargs: fields overriding the branch's (e.g. `combiner_*`, `matryoshka_*`).
        """
        fields = comm_config.to_dict()
        for key in ("model_type", "transformers_version", "architectures", "auto_map"):
            fields.pop(key, None)
        fields.update(kwargs)
        return cls(**fields)

    @property
    def encoder_prefixes(self) -> list[str]:
        """Field prefixes of the configured encoders: `["vision"]` or `["vision", "secondary_vision"]`."""
        return ["vision"] if self.secondary_vision_config is None else ["vision", "secondary_vision"]

    def branch(self, prefix: str) -> dict:
        """Settings of one encoder's branch (`prefix` in `encoder_prefixes`), layer indices resolved."""
        vision_config = getattr(self, f"{prefix}_config")
        return {
            "vision_config": vision_config,
            "layers": resolve_layers(
                getattr(self, f"{prefix}_feature_layer"), vision_config.num_hidden_layers, f"{prefix}_feature_layer"
            ),
            "merge": getattr(self, f"{prefix}_feature_merge"),
            "aligner": getattr(self, f"{prefix}_aligner"),
            "aligner_depth": getattr(self, f"{prefix}_aligner_depth"),
            "aligner_ratio": getattr(self, f"{prefix}_aligner_ratio"),
            "image_mean": getattr(self, f"{prefix}_image_mean"),
            "image_std": getattr(self, f"{prefix}_image_std"),
        }

    def _validate_branches(self) -> None:
        check_field_types(self, CommConfig)
        for name in ("vision_config", "text_config", "secondary_vision_config"):
            value = getattr(self, name)
            if not isinstance(value, PretrainedConfig) and not (name == "secondary_vision_config" and value is None):
                raise ValueError(
                    f"`{name}` is a {type(value).__name__}, not a config object: assign a config (e.g. "
                    "`AutoConfig.for_model(**fields)`), or pass the dict when constructing the config, which "
                    "converts it."
                )
        for name in ("hidden_size", "vocab_size"):
            _check_positive_int(f"text_config.{name}", getattr(self.text_config, name, None))
        if isinstance(self.image_token_index, int) and self.image_token_index < 0:
            raise ValueError(
                f"`image_token_index` must be a token id (>= 0), got {self.image_token_index}: set it to the id of "
                "the image placeholder in the tokenizer."
            )
        if self.vision_feature_select_strategy not in FEATURE_SELECT_STRATEGIES:
            raise ValueError(
                f"`vision_feature_select_strategy`={self.vision_feature_select_strategy!r} is unknown; "
                f"allowed: {FEATURE_SELECT_STRATEGIES}."
            )
        _check_positive_int("projector_depth", self.projector_depth)
        if self.merge_hidden_size is not None:
            _check_positive_int("merge_hidden_size", self.merge_hidden_size)
        _check_positive_int("merge_conv_kernel_size", self.merge_conv_kernel_size)
        if self.merge_conv_kernel_size % 2 == 0:
            raise ValueError(
                "`merge_conv_kernel_size` must be odd so the patch grid keeps its size, got "
                f"{self.merge_conv_kernel_size}."
            )
        grids = {}
        for prefix in self.encoder_prefixes:
            vision_config = getattr(self, f"{prefix}_config")
            for attr in ("hidden_size", "num_hidden_layers", "image_size", "patch_size"):
                if getattr(vision_config, attr, None) is None:
                    raise ValueError(
                        f"`{prefix}_config` ({vision_config.model_type}) has no `{attr}`: COMM needs a ViT-style "
                        "encoder with a square patch grid."
                    )
            for attr in ("hidden_size", "num_hidden_layers"):
                _check_positive_int(f"{prefix}_config.{attr}", getattr(vision_config, attr))
            for attr in ("image_size", "patch_size"):
                _check_positive_int(f"{prefix}_config.{attr}", _side(getattr(vision_config, attr)))
            if patch_grid(vision_config) < 1:
                raise ValueError(
                    f"`{prefix}_config` has image_size {vision_config.image_size} smaller than its patch_size "
                    f"{vision_config.patch_size}: no patch fits; raise `image_size` or lower `patch_size`."
                )
            if vision_config.model_type == "vit_mae" and vision_config.mask_ratio != 0.0:
                logger.info(f"`{prefix}_config`: MAE masking is disabled (mask_ratio 0) for feature extraction.")
                vision_config.mask_ratio = 0.0
            branch = self.branch(prefix)  # validates the layer list
            if branch["merge"] not in MERGE_STRATEGIES:
                raise ValueError(
                    f"`{prefix}_feature_merge`={branch['merge']!r} is unknown; allowed: {MERGE_STRATEGIES}."
                )
            if branch["merge"] == "single" and len(branch["layers"]) != 1:
                raise ValueError(
                    f"`{prefix}_feature_merge`='single' takes exactly one layer, but `{prefix}_feature_layer` has "
                    f"{len(branch['layers'])}; use 'mean', 'layerscale', 'lln_layerscale' or 'conv_layerscale' to "
                    "merge several."
                )
            if branch["aligner"] not in ALIGNERS:
                raise ValueError(f"`{prefix}_aligner`={branch['aligner']!r} is unknown; allowed: {ALIGNERS}.")
            _check_positive_int(f"{prefix}_aligner_depth", branch["aligner_depth"])
            _check_positive_int(f"{prefix}_aligner_ratio", branch["aligner_ratio"])
            mean, std = default_pixel_stats(vision_config.model_type)
            for stat, default in (("mean", mean), ("std", std)):
                name = f"{prefix}_image_{stat}"
                value = getattr(self, name)
                if value is None:
                    setattr(self, name, list(default))
                elif len(value) != 3 or (stat == "std" and any(s <= 0 for s in value)):
                    raise ValueError(f"`{name}` must be 3 per-channel values (std > 0), got {value}.")
            grids[prefix] = patch_grid(vision_config)
        if len(set(grids.values())) > 1:
            # The grids each encoder produces: its pixels are resized to its `image_size` (modeling `_encoder_pixels`).
            primary = grids["vision"]
            fixes = ", ".join(
                f"{p}_config.image_size={primary * _side(getattr(self, f'{p}_config').patch_size)}"
                for p, g in grids.items()
                if g != primary
            )
            raise ValueError(
                "The encoders' patch grids must match to concatenate their tokens, got "
                + ", ".join(f"{p}_config: {g}x{g}" for p, g in grids.items())
                + f". Run every encoder at the primary's {primary}x{primary} grid: `assemble_comm` / `comm-vlm "
                "assemble` do it for published encoders (e.g. DINOv2 at 336 px instead of its native 518, its "
                "position table resampled once by `comm_vlm.resolution.at_resolution`); for a config built by hand "
                f"set {fixes}."
            )
        expected = grids["vision"] ** 2
        if self.vision_feature_select_strategy == "full":
            expected = None  # prefix tokens kept: the count depends on the encoder; checked at run time
        if self.image_seq_length is None:
            self.image_seq_length = expected
        elif expected is not None and self.image_seq_length != expected:
            raise ValueError(
                f"`image_seq_length`={self.image_seq_length} does not match the encoder's {grids['vision']}x"
                f"{grids['vision']} patch grid ({expected} tokens); leave it unset to derive it."
            )


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


class LlavaBranchConfig(CommConfig):
    """A `CommConfig` whose defaults are LLaVA-1.5's vision branch (CLIP's penultimate layer, no second encoder, the
    2-layer MLP projector): the base of the families that start from a LLaVA-1.5 checkpoint (M3, the combiner)."""

    secondary_vision_config: dict | PretrainedConfig | None = None
    vision_feature_layer: int | list[int] = -2
    vision_feature_merge: str = "single"
    vision_aligner: str = "identity"
    projector_depth: int = 2


__all__ = ["CommConfig", "LlavaBranchConfig", "MERGE_STRATEGIES", "ALIGNERS"]
