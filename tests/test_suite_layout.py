"""The test suite's own layout: shared helpers live in tests/helpers.py, and no test file imports another.

A helper imported from a test file drags that file's fixtures and module state into the importer
(and runs its module-level code twice under two names); one helper module keeps each helper in
one place. Fixtures live in conftest.py, which pytest loads itself: nothing imports it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# The modules under tests/ that other files may import: the helpers, and two single-topic modules
# (a loopback HTTP server; the driver that local multi-worker tests run as a process).
IMPORTABLE = {"tests.helpers", "tests.http_fixture", "tests.local_workers"}
# The tiers are markers (pyproject.toml); the fast tier is `-m "not slurm and not slow"`.
TIER_MARKERS = {"slow", "slurm"}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module under ``tests`` that ``path`` imports, at any depth (imports inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "tests"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "tests":  # from tests import local_workers
                found += [(node.lineno, f"tests.{alias.name}") for alias in node.names]
            elif node.module.startswith("tests."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def test_no_test_file_imports_another_or_conftest():
    wrong = [
        f"{path.name}:{line}: imports {module}"
        for path in sorted(TESTS.glob("*.py"))
        for line, module in imported_modules(path)
        if module not in IMPORTABLE
    ]
    assert not wrong, ("tests import shared helpers from tests/helpers.py only (fixtures go to conftest.py):\n"
                       + "\n".join(wrong))


def test_the_check_sees_imports_at_any_depth(tmp_path):
    """The reader above finds a test-to-test import inside a function, a relative one and conftest."""
    sample = tmp_path / "test_sample.py"
    sample.write_text(
        "import tests.test_other\n"
        "from tests import helpers, test_x\n"
        "from . import conftest\n"
        "def f():\n"
        "    from tests.conftest import REPO\n"
        "    from tests.helpers import REPO as R\n"
    )
    modules = [m for _, m in imported_modules(sample)]
    assert modules == ["tests.test_other", "tests.helpers", "tests.test_x", ".", "tests.conftest", "tests.helpers"]
    assert [m for m in modules if m not in IMPORTABLE] == ["tests.test_other", "tests.test_x", ".", "tests.conftest"]


def body_key(node: ast.FunctionDef | ast.ClassDef) -> str:
    """A definition's code without its name and docstring: equal keys mean a copied helper."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        body = body[1:]
    head = ast.dump(node.args) if isinstance(node, ast.FunctionDef) else "".join(ast.dump(b) for b in node.bases)
    return head + "".join(ast.dump(stmt) for stmt in body)


def copied_helpers(paths: list[Path]) -> dict[str, list[str]]:
    """Top-level functions and classes (not tests) whose code appears in more than one file."""
    seen: dict[str, list[str]] = {}
    for path in paths:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("test"):
                seen.setdefault(body_key(node), []).append(f"{path.name}:{node.name}")
    return {key: places for key, places in seen.items() if len(places) > 1}


def test_no_helper_is_copied_into_two_files():
    """The same code defined at the top of two files under tests/ belongs once in tests/helpers.py."""
    copies = copied_helpers(sorted(TESTS.glob("*.py")))
    assert not copies, f"copied helpers (keep one, in tests/helpers.py): {list(copies.values())}"


def test_the_copy_check_sees_a_renamed_copy(tmp_path):
    (tmp_path / "test_a.py").write_text('def weights(run_dir):\n    """Doc."""\n    return load(run_dir / "model.keras")\n')
    (tmp_path / "test_b.py").write_text('def final_weights(run_dir):\n    return load(run_dir / "model.keras")\n\n\n'
                                        'def other(run_dir):\n    return load(run_dir / "other.keras")\n')
    assert list(copied_helpers(sorted(tmp_path.glob("*.py"))).values()) == [["test_a.py:weights", "test_b.py:final_weights"]]


def test_the_tier_markers_are_registered_and_strict():
    """`-m "not slurm and not slow"` selects the fast tier only if the markers exist and a typo fails."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the project's Python is 3.11+
        pytest.skip("tomllib needs Python 3.11")
    ini = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    registered = {line.split(":")[0].strip() for line in ini["markers"]}
    assert TIER_MARKERS <= registered, registered
    assert "--strict-markers" in ini["addopts"].split()
