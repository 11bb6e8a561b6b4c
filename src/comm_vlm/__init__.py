"""comm-vlm: COMM, Matryoshka-LLaVA and adaptive-combiner visual branches for multimodal LLMs in transformers.

`import comm_vlm` registers the model families with transformers' Auto classes (AutoConfig, AutoModel,
AutoModelForImageTextToText, AutoProcessor), so `from_pretrained` and `pipeline("image-text-to-text")` find them.
The modeling code lives in `comm_vlm.models` (the files a checkpoint ships as Hub remote code); training, evaluation
and the Hub tooling in `comm_vlm.training`, `comm_vlm.evaluation` and `comm_vlm.hub`.

The import itself is cheap (the `comm-vlm` command line answers `--help` without loading torch): the names below load
on first use (PEP 562), and the families are registered as soon as transformers is imported (`_registration`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._registration import register_when_transformers_loads


if TYPE_CHECKING:
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

# Where each public name is defined (the same as the `TYPE_CHECKING` imports above).
_SOURCES = {
    ".evaluation.oracle": ("OracleReport", "oracle_analysis", "plot_oracle"),
    ".families": ("FAMILIES", "get_family"),
    ".models.configuration_combiner": ("AdaptiveCombinerConfig",),
    ".models.configuration_comm": ("ALIGNERS", "MERGE_STRATEGIES", "CommConfig"),
    ".models.configuration_matryoshka": ("MatryoshkaLlavaConfig", "choose_image_scales", "valid_matryoshka_scales"),
    ".models.image_utils": ("BoxParseResult", "format_box", "load_image", "normalize_box", "parse_boxes"),
    ".models.modeling_combiner": (
        "AdaptiveCombinerForConditionalGeneration",
        "AdaptiveCombinerModel",
        "AdaptiveCombinerPreTrainedModel",
    ),
    ".models.modeling_comm": ("CommForConditionalGeneration", "CommModel", "CommPreTrainedModel"),
    ".models.modeling_matryoshka": ("MatryoshkaLlavaForConditionalGeneration", "MatryoshkaLlavaModel"),
    ".models.pooling_matryoshka": ("nested_visual_tokens", "select_visual_tokens"),
    ".models.processing_comm": ("CommProcessor",),
    ".models.processing_matryoshka": ("MatryoshkaLlavaProcessor",),
}
_SOURCE_OF = {name: module for module, names in _SOURCES.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _SOURCE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCE_OF[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


register_when_transformers_loads()

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
