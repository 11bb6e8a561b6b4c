"""comm-vlm: COMM, Matryoshka-LLaVA and adaptive-combiner visual branches for multimodal LLMs in transformers.

`import comm_vlm` registers the model families with transformers' Auto classes (AutoConfig, AutoModel,
AutoModelForImageTextToText, AutoProcessor), so `from_pretrained` and `pipeline("image-text-to-text")` find them.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_comm import ALIGNERS, MERGE_STRATEGIES, CommConfig
from .modeling_comm import CommForConditionalGeneration, CommModel, CommPreTrainedModel
from .processing_comm import BoxParseResult, CommProcessor, format_box, load_image, normalize_box, parse_boxes


__version__ = "0.1.0"


def _register() -> None:
    AutoConfig.register("comm", CommConfig, exist_ok=True)
    AutoModel.register(CommConfig, CommModel, exist_ok=True)
    AutoModelForImageTextToText.register(CommConfig, CommForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(CommConfig, CommProcessor, exist_ok=True)


_register()

__all__ = [
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
