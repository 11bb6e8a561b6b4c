"""The package's layout rules, read from the source with `ast`: the remote-code closure imports nothing of the package
outside `comm_vlm/models/`, and no product module imports the testing module or the demo."""

import ast
import sys
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "src" / "comm_vlm"
ALLOWED_IN_MODELS = frozenset(sys.stdlib_module_names) | {"__future__", "torch", "transformers", "numpy", "PIL"}
# Not product: the tiny offline checkpoints, and the demo (which may use them).
NOT_PRODUCT = ("testing.py", "demo/")


def imports(path: Path) -> list[str]:
    """Absolute names of the modules `path` imports (relative imports resolved against the package)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
                names += [module] if node.module else [f"{base}.{alias.name}" for alias in node.names]
            else:
                names.append(node.module or "")
    return names


def product_modules() -> list[Path]:
    return [
        p
        for p in sorted(PACKAGE.rglob("*.py"))
        if not str(p.relative_to(PACKAGE)).startswith(NOT_PRODUCT) and "__pycache__" not in p.parts
    ]


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("models/*.py")), ids=lambda p: p.name)
def test_models_import_only_each_other_and_the_allowed_libraries(path):
    outside = [
        name
        for name in imports(path)
        if name.split(".")[0] not in ALLOWED_IN_MODELS and not name.startswith("comm_vlm.models.")
    ]
    assert outside == [], f"{path.name} imports {outside}: remote code may import only {sorted(ALLOWED_IN_MODELS)}"


def test_no_product_module_imports_the_testing_module_or_the_demo():
    offenders = {
        str(p.relative_to(PACKAGE)): [n for n in imports(p) if n.startswith(("comm_vlm.testing", "comm_vlm.demo"))]
        for p in product_modules()
    }
    offenders = {k: v for k, v in offenders.items() if v and k != "cli.py"}
    assert offenders == {}


def test_the_cli_reaches_the_demo_only_lazily():
    """`comm-vlm demo`/`plumbing` run the demo package; the CLI imports it inside those commands only."""
    tree = ast.parse((PACKAGE / "cli.py").read_text(encoding="utf-8"))
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n for n in top_level if isinstance(n, ast.ImportFrom) and "demo" in (n.module or "")]
    assert "comm_vlm.testing" not in imports(PACKAGE / "cli.py")


def test_no_module_overrides_setattr():
    assert [p.name for p in PACKAGE.rglob("*.py") if "def __setattr__" in p.read_text(encoding="utf-8")] == []
