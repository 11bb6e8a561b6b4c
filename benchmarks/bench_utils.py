"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`, so this folder is on sys.path)."""

import platform
import statistics
import time
from collections.abc import Callable


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
