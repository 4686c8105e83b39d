"""Architecture rules from the design guide, checked on the source: transformers is never a runtime
dependency (tests, and the opt-in `dgemma bench --compare-transformers`, which imports it inside a
function), lower layers never import higher ones, and importing dgemma does no work."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "dgemma"
# each unit may import only from its own level and below (model/config.py is a plain record: level 0)
LEVEL = {
    "errors": 0, "params": 0, "outputs": 0, "logs": 0, "model.config": 0,
    "cache": 1, "ops": 1, "model": 2, "text": 2, "denoise": 3, "engine": 4,
    "api": 5, "bench": 5, "bench_transformers": 5, "train": 5,
    "serve": 6, "cli": 7,
}  # fmt: skip


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def unit(module: str) -> str:
    return "model.config" if module == "dgemma.model.config" else module.split(".")[1]


def module_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        name
        for node in tree.body
        for name in (
            [a.name for a in node.names] if isinstance(node, ast.Import)
            else [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        )
    }  # fmt: skip


def test_transformers_is_never_imported_by_the_package():
    comparison = PACKAGE / "bench_transformers.py"  # the opt-in benchmark against the reference
    for path in PACKAGE.rglob("*.py"):
        names = module_level_imports(path) if path == comparison else imports_of(path)
        assert not any(m.split(".")[0] == "transformers" for m in names), path


def test_lower_layers_do_not_import_higher_ones():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        own = rel.parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for module in imports_of(path):
            if module.startswith("dgemma."):
                assert LEVEL[unit(module)] <= LEVEL[own], f"{rel} imports {module}"


def test_only_the_server_imports_the_web_stack():
    for path in PACKAGE.rglob("*.py"):
        web = {m for m in imports_of(path) if m.split(".")[0] in ("starlette", "uvicorn")}
        assert not web or path.parent.name == "serve" or path.name == "cli.py", path


def test_training_never_imports_the_engine():
    for path in (PACKAGE / "train").rglob("*.py"):
        assert not any(m.startswith(("dgemma.engine", "dgemma.api")) for m in imports_of(path)), path


def test_import_does_no_work():
    code = (
        "import sys, dgemma, dgemma.cli, dgemma.bench; "
        "assert 'transformers' not in sys.modules; "
        "import torch; assert not torch.cuda.is_initialized(); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_every_subpackage_is_a_real_package():
    """A folder of modules without __init__.py is left out of a wheel (setuptools finds packages only)."""
    for folder in {p.parent for p in PACKAGE.rglob("*.py")}:
        assert (folder / "__init__.py").exists(), folder
