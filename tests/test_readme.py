"""README.md stays a short user document whose quick start runs as written, offline.

The quick start is every ```python block of the README's "## Quick start" section: the blocks are pasted in order
into one script (later blocks use the names earlier ones define, as a reader pasting them would) and run in a fresh
interpreter with `HF_HUB_OFFLINE=1`, in an empty temporary working directory. The other snippets of the README need
real checkpoints or the network and are not run here.
"""

import os
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
QUICK_START_HEADING = "## Quick start"
MAX_README_BYTES = 10_500
# Development history (numbered work sessions, machine nicknames) has no place in the repository: git keeps it.
HISTORY_WORDS = re.compile(r"\b(?i:stops?) [0-9]+|\bmachine [AB]\b")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".json", ".txt", ".cfg"}
NOT_SOURCES = {".git", ".venv", "outputs", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}


def section(text: str, heading: str) -> str:
    """The text under `heading` (a `## ` line) up to the next `## ` heading."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == heading]
    assert starts, f"README.md has no {heading!r} section"
    body = []
    for line in lines[starts[0] + 1 :]:
        if line.startswith("## "):
            break
        body.append(line)
    return "\n".join(body)


def python_blocks(text: str) -> list[str]:
    """The contents of the ```python fenced blocks of `text`, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def test_quick_start_runs_offline(tmp_path):
    blocks = python_blocks(section(README.read_text(), QUICK_START_HEADING))
    assert len(blocks) >= 2, "the quick start should show at least the pipeline and the generate paths"
    script = tmp_path / "quick_start.py"
    script.write_text("\n\n".join(blocks))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["HF_HUB_CACHE"] = str(tmp_path / "hub-cache")  # an empty cache: nothing can come from earlier downloads
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"README quick start failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert (work / "tiny-comm" / "config.json").is_file()  # the snippet wrote its checkpoint where it says


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size < MAX_README_BYTES, f"README.md is {size} bytes; keep it under {MAX_README_BYTES} (details: docs/)"


def test_no_development_history_in_the_repository():
    documents = [
        path
        for path in sorted(ROOT.rglob("*"))
        if path.suffix in TEXT_SUFFIXES
        and path.is_file()
        and not NOT_SOURCES & set(path.relative_to(ROOT).parts)
        and not any(part.endswith(".egg-info") for part in path.relative_to(ROOT).parts)
    ]
    assert README in documents and len(documents) > 50
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in documents
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if HISTORY_WORDS.search(line)
    ]
    assert not hits, "development history in the repository:\n" + "\n".join(hits)
