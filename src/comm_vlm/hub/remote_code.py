"""Hub remote code: `save_pretrained` that also writes the modeling files, and the check that they run bare.

The files of `comm_vlm.models` that a family imports are copied next to the weights with an `auto_map`, so
`from_pretrained(..., trust_remote_code=True)` loads the checkpoint where comm-vlm is not installed.
"""

from __future__ import annotations

import ast
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers.utils import logging


logger = logging.get_logger(__name__)


# Modules remote code may import: the standard library plus what a bare `pip install transformers torch pillow` has.
REMOTE_CODE_ALLOWED_IMPORTS = frozenset(sys.stdlib_module_names) | {"torch", "transformers", "numpy", "PIL"}


@contextlib.contextmanager
def remote_code_export(model: Any, processor: Any = None) -> Iterator[None]:
    """Within the block, `save_pretrained` of `model` (and `processor`) also writes the remote code.

    Registers the objects' classes with `register_for_auto_class` (so transformers copies their module files and
    relative imports next to the weights and writes `auto_map`), and adds an `AutoModel` entry for the base model.
    On exit every class attribute and `auto_map` it touched is restored, so later plain saves stay package-native.

    Args:
        model (`PreTrainedModel`): a model of this package (any family).
        processor (`ProcessorMixin`, *optional*): its processor.
    """
    touched: list[tuple[Any, str, bool, Any]] = []  # (object, attribute, existed in its __dict__, old value)

    def remember(obj: Any, attribute: str) -> None:
        touched.append((obj, attribute, attribute in vars(obj), vars(obj).get(attribute)))

    config = model.config
    model_auto_class = "AutoModelForImageTextToText" if hasattr(model, "lm_head") else "AutoModel"
    pairs = [(type(config), "AutoConfig"), (type(model), model_auto_class)]
    if processor is not None:
        pairs.append((type(processor), "AutoProcessor"))
        for name in processor.get_attributes():
            remember(getattr(processor, name), "auto_map")
        remember(processor, "auto_map")
    remember(config, "auto_map")
    for cls, auto_class in pairs:
        remember(cls, "_auto_class")
        cls.register_for_auto_class(auto_class)
    base = getattr(model, "base_model", None)
    if base is not None and base is not model:
        base_name = f"{type(base).__module__.rsplit('.', 1)[-1]}.{type(base).__name__}"
        config.auto_map = {**(getattr(config, "auto_map", None) or {}), "AutoModel": base_name}
    try:
        yield
    finally:
        for obj, attribute, existed, old in reversed(touched):
            if existed:
                setattr(obj, attribute, old)
            elif attribute in vars(obj):
                delattr(obj, attribute)


def check_remote_code(directory: str | os.PathLike) -> list[str]:
    """Checks that the `.py` files of a saved checkpoint can run without this package.

    Every import must be the standard library, torch, transformers, numpy or PIL, or a relative import of a file that
    is present in `directory`.

    Args:
        directory (`str` or `os.PathLike`): a directory written by `save_for_hub`.

    Returns the names of the `.py` files checked; raises `ValueError` listing every offending `file: import`.
    """
    directory = Path(directory)
    files = sorted(p.name for p in directory.glob("*.py"))
    problems = []
    for name in files:
        tree = ast.parse((directory / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                if node.level != 1 or f"{node.module}.py" not in files:
                    problems.append(f"{name}: relative import of {'.' * node.level}{node.module or ''} (not shipped)")
                continue
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            modules += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for module in modules:
                if module.split(".")[0] not in REMOTE_CODE_ALLOWED_IMPORTS | {"__future__"}:
                    problems.append(f"{name}: import {module}")
    if problems:
        raise ValueError(
            "The remote code would not load without comm_vlm: " + "; ".join(problems) + ". Remote-code modules "
            "(configuration_*, modeling_*, processing_* and what they import relatively) may import only the "
            "standard library, torch, transformers, numpy and PIL, and each other as `from .module import ...`."
        )
    return files
