"""comm-vlm: COMM, Matryoshka-LLaVA and adaptive-combiner visual branches for multimodal LLMs in transformers.

`import comm_vlm` registers the model families with transformers' Auto classes (AutoConfig, AutoModel,
AutoModelForImageTextToText, AutoProcessor), so `from_pretrained` and `pipeline("image-text-to-text")` find them.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_combiner import AdaptiveCombinerConfig
from .configuration_comm import ALIGNERS, MERGE_STRATEGIES, CommConfig
from .modeling_combiner import (
    AdaptiveCombinerForConditionalGeneration,
    AdaptiveCombinerModel,
    AdaptiveCombinerPreTrainedModel,
)
from .modeling_comm import CommForConditionalGeneration, CommModel, CommPreTrainedModel
from .processing_comm import BoxParseResult, CommProcessor, format_box, load_image, normalize_box, parse_boxes


__version__ = "0.1.0"


def _register() -> None:
    AutoConfig.register("comm", CommConfig, exist_ok=True)
    AutoModel.register(CommConfig, CommModel, exist_ok=True)
    AutoModelForImageTextToText.register(CommConfig, CommForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(CommConfig, CommProcessor, exist_ok=True)
    AutoConfig.register("adaptive_combiner", AdaptiveCombinerConfig, exist_ok=True)
    AutoModel.register(AdaptiveCombinerConfig, AdaptiveCombinerModel, exist_ok=True)
    AutoModelForImageTextToText.register(
        AdaptiveCombinerConfig, AdaptiveCombinerForConditionalGeneration, exist_ok=True
    )
    AutoProcessor.register(AdaptiveCombinerConfig, CommProcessor, exist_ok=True)


from .configuration_matryoshka import MatryoshkaLlavaConfig, choose_image_scales, valid_matryoshka_scales  # noqa: E402
from .matryoshka_oracle import OracleReport, oracle_analysis, plot_oracle  # noqa: E402
from .modeling_matryoshka import MatryoshkaLlavaForConditionalGeneration, MatryoshkaLlavaModel  # noqa: E402
from .pooling_matryoshka import nested_visual_tokens, select_visual_tokens  # noqa: E402
from .processing_matryoshka import MatryoshkaLlavaProcessor  # noqa: E402


def _register_matryoshka() -> None:
    AutoConfig.register("matryoshka_llava", MatryoshkaLlavaConfig, exist_ok=True)
    AutoModel.register(MatryoshkaLlavaConfig, MatryoshkaLlavaModel, exist_ok=True)
    AutoModelForImageTextToText.register(MatryoshkaLlavaConfig, MatryoshkaLlavaForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(MatryoshkaLlavaConfig, MatryoshkaLlavaProcessor, exist_ok=True)


_register()
_register_matryoshka()

__all__ = [
    "MatryoshkaLlavaConfig",
    "MatryoshkaLlavaForConditionalGeneration",
    "MatryoshkaLlavaModel",
    "MatryoshkaLlavaProcessor",
    "OracleReport",
    "choose_image_scales",
    "nested_visual_tokens",
    "oracle_analysis",
    "plot_oracle",
    "select_visual_tokens",
    "valid_matryoshka_scales",
    "AdaptiveCombinerConfig",
    "AdaptiveCombinerForConditionalGeneration",
    "AdaptiveCombinerModel",
    "AdaptiveCombinerPreTrainedModel",
    "ALIGNERS",
    "BoxParseResult",
    "CommProcessor",
    "format_box",
    "load_image",
    "normalize_box",
    "parse_boxes",
    "MERGE_STRATEGIES",
    "CommConfig",
    "CommForConditionalGeneration",
    "CommModel",
    "CommPreTrainedModel",
]
