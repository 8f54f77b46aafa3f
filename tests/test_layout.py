"""The package's layout, read from its source: imports run one way, and each side keeps to its own.

The import graph is built with ``ast`` from every module of ``mnist_hpc`` and ``hydra_plugins``,
imports inside functions and under ``TYPE_CHECKING`` included (a deferred import is still a
dependency). On it:

- no cycle, of any length;
- ``login/`` never imports TensorFlow, Keras or ``compute/``; ``compute/`` never imports ``login/``
  or ``cli``; what the two sides share at the boundary (what submitit pickles) is ``contract/``,
  which both import and which imports neither;
- ``cli.py`` only parses and dispatches: it is short and defines no behaviour of its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("mnist_hpc", "hydra_plugins")
CLI_MAX_LINES = 90


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for root in ROOTS for p in sorted((REPO / root).rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module of ours (and tensorflow/keras, by their top name) that ``path`` imports, anywhere in it.

    ``from a.b import c`` imports ``a.b.c`` when that is a module of ours, else ``a.b``; a relative
    import is resolved against the module's package.
    """
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        top = target.split(".")[0]
        if top in ("tensorflow", "keras"):
            found.add(top)
        elif target in known:
            found.add(target)
        elif top in ROOTS:
            # A name inside a module: the module itself.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target:
                found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base)
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(path, name, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root] & graph.keys())))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child] & graph.keys()))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_graph_sees_imports_inside_functions(graph):
    # A deferred import must count: this module of the test's own imports one only inside a function.
    assert "mnist_hpc.compute.train" in graph["mnist_hpc.compute.run"]


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def side(name: str) -> str:
    for prefix, label in (("mnist_hpc.login", "login"), ("mnist_hpc.compute", "compute"),
                          ("mnist_hpc.contract", "contract"), ("mnist_hpc.cli", "cli"), ("hydra_plugins", "plugins")):
        if name == prefix or name.startswith(prefix + "."):
            return label
    return "shared"


def test_login_never_imports_tensorflow_keras_or_compute(graph):
    bad = {m: sorted(t for t in deps if t in ("tensorflow", "keras") or side(t) == "compute")
           for m, deps in graph.items() if side(m) == "login"}
    assert {m: d for m, d in bad.items() if d} == {}


def test_compute_never_imports_login_or_cli(graph):
    bad = {m: sorted(t for t in deps if side(t) in ("login", "cli", "plugins")) for m, deps in graph.items()
           if side(m) == "compute"}
    assert {m: d for m, d in bad.items() if d} == {}


def test_the_contract_is_shared_by_both_sides_and_imports_neither(graph):
    contract = {m for m in graph if side(m) == "contract"}
    assert contract, "no mnist_hpc/contract package"
    bad = {m: sorted(t for t in graph[m] if side(t) in ("login", "compute", "cli", "plugins")
                     or t in ("tensorflow", "keras")) for m in contract}
    assert {m: d for m, d in bad.items() if d} == {}
    users = {side(m) for m, deps in graph.items() if deps & contract}
    assert {"login", "compute"} <= users


def test_shared_modules_import_neither_side(graph):
    """config, io, rundir, claim, cache, dataset, slurm, search: formats and policies both sides use."""
    bad = {m: sorted(t for t in deps if side(t) in ("login", "compute", "cli", "plugins", "contract")
                     or t in ("tensorflow", "keras"))
           for m, deps in graph.items() if side(m) == "shared"}
    # rundir.save_model is handed a Keras model; it never imports Keras itself.
    assert {m: d for m, d in bad.items() if d} == {}


def test_cli_only_parses_and_dispatches(graph):
    path = REPO / "mnist_hpc" / "cli.py"
    lines = path.read_text().splitlines()
    assert len(lines) < CLI_MAX_LINES, f"cli.py has {len(lines)} lines"
    tree = ast.parse(path.read_text())
    # Its functions are entry points, each a few lines: no training, no composing, no checks of its own.
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            body = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
            assert len(body) <= 12, f"cli.{node.name} does more than dispatch ({len(body)} statements)"
    assert "tensorflow" not in graph["mnist_hpc.cli"] and "keras" not in graph["mnist_hpc.cli"]


def test_the_compute_entry_lives_in_compute(graph):
    """The Hydra task a job runs is compute/'s; the command line only hands it to Hydra."""
    import mnist_hpc.compute.run as run

    assert callable(run.train_task)
    assert "mnist_hpc.compute.run" in graph["mnist_hpc.cli"]
