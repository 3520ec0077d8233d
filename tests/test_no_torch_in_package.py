"""Nothing under ``trl_jax/`` imports torch or trl (they are the reference we compare against, not dependencies):
every module is parsed and its ``import`` statements checked, wherever they sit (top level or inside functions).
The TRL side of ``trl-jax compare`` lives in ``trl_jax_compare`` and is only run as a subprocess."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "trl_jax"
FORBIDDEN = {"torch", "trl", "trl_jax_compare"}
MODULES = sorted(PACKAGE.rglob("*.py"))


def imported_roots(path: pathlib.Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            roots.add(str(node.args[0].value).split(".")[0])
    return roots


def test_package_has_modules():
    assert len(MODULES) > 20 and PACKAGE / "compare.py" in MODULES


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_torch_or_trl_import(path):
    bad = imported_roots(path) & FORBIDDEN
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)}"


def test_the_check_sees_nested_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    import torch.nn\n    from trl.trainer import x\n    importlib.import_module('trl')\n")
    assert imported_roots(src) == {"torch", "trl"}
