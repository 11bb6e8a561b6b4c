"""comm-vlm: COMM, Matryoshka-LLaVA and adaptive-combiner visual branches for multimodal LLMs in transformers.

`import comm_vlm` registers the model families with transformers' Auto classes (AutoConfig, AutoModel,
AutoModelForImageTextToText, AutoProcessor), so `from_pretrained` and `pipeline("image-text-to-text")` find them.
The modeling code lives in `comm_vlm.models` (the files a checkpoint ships as Hub remote code); training, evaluation
and the Hub tooling in `comm_vlm.training`, `comm_vlm.evaluation` and `comm_vlm.hub`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .evaluation.oracle import OracleReport, oracle_analysis, plot_oracle
from .families import FAMILIES, get_family
from .models.configuration_combiner import AdaptiveCombinerConfig
from .models.configuration_comm import ALIGNERS, MERGE_STRATEGIES, CommConfig
from .models.configuration_matryoshka import MatryoshkaLlavaConfig, choose_image_scales, valid_matryoshka_scales
from .models.image_utils import BoxParseResult, format_box, load_image, normalize_box, parse_boxes
from .models.modeling_combiner import (
    AdaptiveCombinerForConditionalGeneration,
    AdaptiveCombinerModel,
    AdaptiveCombinerPreTrainedModel,
)
from .models.modeling_comm import CommForConditionalGeneration, CommModel, CommPreTrainedModel
from .models.modeling_matryoshka import MatryoshkaLlavaForConditionalGeneration, MatryoshkaLlavaModel
from .models.pooling_matryoshka import nested_visual_tokens, select_visual_tokens
from .models.processing_comm import CommProcessor
from .models.processing_matryoshka import MatryoshkaLlavaProcessor


__version__ = "0.1.0"


def _register() -> None:
    """Registers every family of `FAMILIES` (and its base model) with transformers' Auto classes."""
    for model_type, family in FAMILIES.items():
        AutoConfig.register(model_type, family.config_class, exist_ok=True)
        AutoModel.register(family.config_class, family.base_model_class, exist_ok=True)
        AutoModelForImageTextToText.register(family.config_class, family.model_class, exist_ok=True)
        AutoProcessor.register(family.config_class, family.processor_class, exist_ok=True)


_register()

__all__ = [
    "ALIGNERS",
    "FAMILIES",
    "MERGE_STRATEGIES",
    "AdaptiveCombinerConfig",
    "AdaptiveCombinerForConditionalGeneration",
    "AdaptiveCombinerModel",
    "AdaptiveCombinerPreTrainedModel",
    "BoxParseResult",
    "CommConfig",
    "CommForConditionalGeneration",
    "CommModel",
    "CommPreTrainedModel",
    "CommProcessor",
    "MatryoshkaLlavaConfig",
    "MatryoshkaLlavaForConditionalGeneration",
    "MatryoshkaLlavaModel",
    "MatryoshkaLlavaProcessor",
    "OracleReport",
    "choose_image_scales",
    "format_box",
    "get_family",
    "load_image",
    "nested_visual_tokens",
    "normalize_box",
    "oracle_analysis",
    "parse_boxes",
    "plot_oracle",
    "select_visual_tokens",
    "valid_matryoshka_scales",
]
