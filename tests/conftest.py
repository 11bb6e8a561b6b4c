import importlib.util
from pathlib import Path

import pytest
import torch

from comm_vlm.testing import build_tiny_tokenizer, register_tiny_model_source
from comm_vlm.training import build_dataset, make_tiny_dataset


register_tiny_model_source()  # the test recipes (tests/recipes/) build random tiny checkpoints


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """8 rows of `make_tiny_dataset` (LLaVA JSON with image files) as a training `Dataset`, every row usable."""
    directory = tmp_path_factory.mktemp("data")
    path = make_tiny_dataset(directory, 8)
    dataset, report = build_dataset({"path": str(path), "format": "llava", "image_folder": str(directory)})
    assert report.skipped == 0
    return dataset


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine threads oversubscribe."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def load_benchmark():
    """Imports `benchmarks/<name>.py` (not a package) as a module: `load_benchmark("bench_train_step")`."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        with pytest.MonkeyPatch.context() as patch:
            # Scripts import their siblings (`bench_utils`, `main_job_seeds`), as under `python benchmarks/<name>.py`.
            patch.syspath_prepend(str(path.parent))
            spec.loader.exec_module(module)
        return module

    return load
