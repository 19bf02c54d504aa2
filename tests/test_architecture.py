"""The dependency rules of the layout (README, "Layout"), as import-linter contracts in pyproject.toml.

The first test checks the real tree; the second breaks two rules in a copy of it, to prove that the
contracts bite and that a broken one names the import, its file and line."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
MAX_MODULE_LINES = 300


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(root / "pyproject.toml")],
                          cwd=root, capture_output=True, text=True, timeout=120)


def test_the_import_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_broken_contract_names_the_import(tmp_path):
    for part in ("app", "actors", "pyproject.toml"):
        source = ROOT / part
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / part)
    with open(tmp_path / "app" / "router" / "balancing.py", "a") as module:
        module.write("\nimport torch  # noqa: E402,F401\n")
    with open(tmp_path / "app" / "weights" / "identity.py", "a") as module:
        module.write("\nfrom app.engine import spec  # noqa: E402,F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "app.router is not allowed to import torch" in result.stdout
    assert "app.router.balancing -> torch (l." in result.stdout
    assert "app.weights is not allowed to import app.engine" in result.stdout
    assert "app.weights.identity -> app.engine.spec (l." in result.stdout


def test_long_modules_say_why():
    """A module over ~300 lines is a sign that it holds more than one job; it may, if its docstring
    says why (the words "long because")."""
    unexplained = []
    for path in sorted((ROOT / "app").rglob("*.py")):
        source = path.read_text()
        docstring = ast.get_docstring(ast.parse(source)) or ""
        if len(source.splitlines()) > MAX_MODULE_LINES and "long because" not in docstring:
            unexplained.append(f"{path.relative_to(ROOT)}: {len(source.splitlines())} lines")
    assert not unexplained, unexplained
