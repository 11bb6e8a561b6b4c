"""Fetches transformers' common test mixins (see `transformers_sdist`) once per session.

The sdist and its extracted tests live in pytest's cache (`.pytest_cache/d/transformers-sdist/`), reused across runs;
`COMM_VLM_TRANSFORMERS_SDIST_CACHE` names another directory (e.g. a CI cache), and without pytest's cache plugin a
directory under the system's temporary directory is used.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import transformers_sdist


def sdist_cache_dir(config: pytest.Config) -> Path:
    if os.environ.get("COMM_VLM_TRANSFORMERS_SDIST_CACHE"):
        return Path(os.environ["COMM_VLM_TRANSFORMERS_SDIST_CACHE"])
    cache = getattr(config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("transformers-sdist"))
    return Path(tempfile.gettempdir()) / "comm-vlm-transformers-sdist"


def pytest_configure(config: pytest.Config) -> None:
    transformers_sdist.load(sdist_cache_dir(config))


def pytest_report_header(config: pytest.Config) -> str | None:
    suite = transformers_sdist.SUITE
    if suite is None:
        return None
    if suite.skip_reason:
        return suite.skip_reason
    source = "fetched" if suite.fetched else "cached"
    return f"transformers {suite.version} common tests: sdist {source}, ready in {suite.fetch_seconds:.1f}s"
