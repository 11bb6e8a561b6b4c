"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`, so this folder is on sys.path)."""

import importlib.util
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType


ROOT = Path(__file__).resolve().parents[1]


def load_published_configs() -> ModuleType:
    """`tests/published_configs.py` (the published-config fixtures and the paper-scale builds the tests share),
    imported by path."""
    path = ROOT / "tests" / "published_configs.py"
    spec = importlib.util.spec_from_file_location("published_configs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def interleaved_times(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int, sync: Callable[[], None] | None = None
) -> dict[str, tuple[float, float]]:
    """Warm-up, then the functions in turn (ABAB...) `reps` times; (median, min) seconds per function.

    Args:
        sync (`Callable`, *optional*): called before starting and after stopping each timer (e.g.
            `torch.cuda.synchronize` on a GPU, so asynchronous kernels are timed).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if sync is not None:
                sync()
            start = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}
