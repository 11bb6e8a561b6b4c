"""transformers' own common test mixins, taken at test time from the installed version's source distribution.

The sdist is fetched with pip (`pip download transformers==<installed> --no-binary :all: --no-deps`) into a cache
directory (pytest's cache, `.pytest_cache/d/transformers-sdist/`, reused across runs), and its `tests/` directory is
extracted there as the package `hf_transformers_tests` and put on `sys.path`. Nothing of it is copied into this
repository.

The PyPI sdist ships only the top-level `tests/*.py` files, not the subdirectories those files import
(`tests/exporters/`, `tests/generation/`, `tests/utils/`, `tests/models/`). A subdirectory module that is absent is
replaced by a stand-in whose mixin defines no tests, and `Suite.missing` names it so the test classes can skip, with
the reason, what depends on it; a later sdist that ships the module runs it as it is.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tarfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import transformers


PACKAGE = "hf_transformers_tests"

# Modules of transformers' tests that the top-level files import, and the stand-in attributes used when the sdist
# lacks them.
STAND_INS: dict[str, dict[str, object]] = {
    "exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
    "generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
    "utils.test_configuration_utils": {"config_common_kwargs": None},
}


@dataclass
class Suite:
    """What was loaded: the test modules, or why not (`skip_reason`)."""

    version: str
    skip_reason: str | None = None
    modules: dict[str, types.ModuleType] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # module -> reason its tests do not run
    fetch_seconds: float = 0.0
    fetched: bool = False  # False: taken from the cache


SUITE: Suite | None = None


def _fetch_sdist(cache_dir: Path, version: str) -> Path:
    archive = cache_dir / f"transformers-{version}.tar.gz"
    if archive.exists():
        return archive
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        f"transformers=={version}",
        "--no-binary",
        ":all:",
        "--no-deps",
        "--quiet",
        "-d",
        str(cache_dir),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 or not archive.exists():
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"`pip download transformers=={version} --no-binary :all:` failed: {' | '.join(tail)}")
    return archive


def _extract_tests(archive: Path, root: Path, version: str) -> Path:
    """Extracts `tests/**/*.py` (and the JSON files next to them) into `root/hf_transformers_tests/`."""
    package_dir = root / PACKAGE
    marker = package_dir / ".complete"
    if marker.exists():
        return package_dir
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.startswith(prefix):
                continue
            relative = member.name[len(prefix) :]
            if not relative.endswith((".py", ".json")) or ".." in Path(relative).parts:
                continue
            target = package_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    for directory in [package_dir, *[p for p in package_dir.rglob("*") if p.is_dir()]]:
        (directory / "__init__.py").touch()
    marker.touch()
    return package_dir


def _install_stand_ins(package_dir: Path) -> dict[str, str]:
    missing = {}
    for name, attributes in STAND_INS.items():
        if (package_dir / (name.replace(".", "/") + ".py")).exists():
            continue
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            module_name = ".".join([PACKAGE, *parts[:depth]])
            if module_name in sys.modules:
                continue
            module = types.ModuleType(module_name)
            if depth < len(parts):
                module.__path__ = []
            sys.modules[module_name] = module
        sys.modules[f"{PACKAGE}.{name}"].__dict__.update(attributes)
        missing[name] = (
            f"tests/{name.replace('.', '/')}.py is not in the transformers {transformers.__version__} sdist"
        )
    return missing


def load(cache_dir: Path) -> Suite:
    """Fetches (once) and imports transformers' common test modules; never raises (see `Suite.skip_reason`)."""
    global SUITE
    if SUITE is not None:
        return SUITE
    version = transformers.__version__
    suite = Suite(version=version)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        archive = cache_dir / f"transformers-{version}.tar.gz"
        suite.fetched = not archive.exists()
        archive = _fetch_sdist(cache_dir, version)
        root = cache_dir / f"tests-{version}"
        package_dir = _extract_tests(archive, root, version)
        suite.fetch_seconds = time.perf_counter() - start
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        suite.missing = _install_stand_ins(package_dir)
        for name in ("test_modeling_common", "test_configuration_common"):
            suite.modules[name] = importlib.import_module(f"{PACKAGE}.{name}")
    except Exception as error:  # no index, no sdist for this version, or a test module that does not import
        suite.skip_reason = f"transformers {version} common tests unavailable: {type(error).__name__}: {error}"
    SUITE = suite
    return suite
