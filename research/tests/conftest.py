"""Fixtures of the research scripts' tests (`python -m pytest research/tests`; not part of the default run)."""

import importlib.util
from pathlib import Path

import pytest
import torch


RESEARCH = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def load_script():
    """Imports `research/<name>.py` (not a package) as a module, with its folder on `sys.path` for its siblings."""

    def load(name: str):
        path = RESEARCH / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        with pytest.MonkeyPatch.context() as patch:
            patch.syspath_prepend(str(RESEARCH))
            spec.loader.exec_module(module)
        return module

    return load
