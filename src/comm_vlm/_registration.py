"""Registration of the families with transformers' Auto classes, as soon as transformers is imported.

`import comm_vlm` stays cheap (the `comm-vlm` command line answers `--help` without loading torch or transformers), yet
the families must be registered before any Auto class is used. So registration runs at once if transformers is
already imported, and otherwise right after transformers' import finishes (by whichever module imports it), once no
module of this package is half-executed: `FAMILIES` needs the model modules complete.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any


PACKAGE = __name__.rpartition(".")[0]


def _register() -> None:
    """Registers every family of `FAMILIES` (and its base model) with transformers' Auto classes."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    from .families import FAMILIES

    for model_type, family in FAMILIES.items():
        AutoConfig.register(model_type, family.config_class, exist_ok=True)
        AutoModel.register(family.config_class, family.base_model_class, exist_ok=True)
        AutoModelForImageTextToText.register(family.config_class, family.model_class, exist_ok=True)
        AutoProcessor.register(family.config_class, family.processor_class, exist_ok=True)


class _RegisterOnceTransformersLoads(importlib.abc.MetaPathFinder):
    """Runs `_register` once transformers is imported and no module of this package is being executed.

    It finds `transformers` and this package's modules through the other finders and wraps their loaders; waiting for
    this package's modules avoids registering in the middle of one (e.g. `comm_vlm.models.configuration_comm`, whose
    import imports transformers, while `FAMILIES` needs that module complete).
    """

    def __init__(self) -> None:
        self.executing = 0  # modules of this package being executed

    def find_spec(
        self, name: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != "transformers" and not name.startswith(f"{PACKAGE}."):
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(name, path, target) if find else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenRegister(spec.loader, self, counted=name != "transformers")
                return spec
        return None

    def executed(self) -> None:
        if self.executing == 0 and "transformers" in sys.modules and self in sys.meta_path:
            sys.meta_path.remove(self)
            _register()


class _ThenRegister(importlib.abc.Loader):
    """A module's own loader, followed by `_RegisterOnceTransformersLoads.executed`."""

    def __init__(self, loader: importlib.abc.Loader, finder: _RegisterOnceTransformersLoads, counted: bool) -> None:
        self.loader, self.finder, self.counted = loader, finder, counted

    def __getattr__(self, name: str) -> Any:  # the rest of the loader, e.g. `get_code` for `python -m comm_vlm.cli`
        if "loader" not in vars(self):
            raise AttributeError(name)
        return getattr(vars(self)["loader"], name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # the module keeps only its own loader
        self.finder.executing += self.counted
        try:
            self.loader.exec_module(module)
        finally:
            self.finder.executing -= self.counted
        self.finder.executed()


def register_when_transformers_loads() -> None:
    """Registers the families now if transformers is imported, else installs the hook that registers them then."""
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegisterOnceTransformersLoads) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnceTransformersLoads())
