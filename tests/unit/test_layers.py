"""The house's shape: layers that only point down, and no import circles (docs/architecture.md, "Layers").

Every import counts, at module level or inside a function: a lazy import still makes the importer depend on the
imported module, and a circle hidden behind one is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Where each installed package lives in the checkout (pyproject.toml's package-dir).
PACKAGE_DIRS = {
    "towerflow": ROOT / "towerflow",
    "towerflow.models": ROOT / "models",
    "towerflow.validation": ROOT / "validation",
    "towerflow.tasks": ROOT / "tasks",
    "towerflow.infra": ROOT / "infra",
    "towerflow.flows": ROOT / "flows",
    "towerflow.serving": ROOT / "serving",
}

# Lowest first. A module may import its own layer or any layer below it, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("towerflow",),  # contract, config, errors, data, progress: what everything stands on
    ("towerflow.models",),
    ("towerflow.validation", "towerflow.tasks"),
    ("towerflow.infra",),
    ("towerflow.flows", "towerflow.serving"),
    ("towerflow.cli", "towerflow.commands", "towerflow.demo"),  # the CLI on top
]


def layer_of(module: str) -> int:
    """The layer of a towerflow module: the longest prefix named in LAYERS wins."""
    best, best_len = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def module_files() -> dict[str, Path]:
    """Every towerflow module in the checkout, by dotted name."""
    out: dict[str, Path] = {}
    for pkg, directory in PACKAGE_DIRS.items():
        for path in directory.rglob("*.py"):
            rel = path.relative_to(directory).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if pkg == "towerflow" and parts and parts[0] in {"models", "validation", "tasks", "infra", "flows",
                                                               "serving"}:
                continue  # not a folder under towerflow/ today; guard against a stray copy
            out[".".join([pkg, *parts])] = path
    return out


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """The towerflow modules that ``path`` imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join([*parent, base] if base else parent)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {m: imports_of(p, m, known) for m, p in files.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                  for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    assert [m for m in module_files() if layer_of(m) < 0] == []


def test_layers_point_down_only():
    assert upward_imports(import_graph()) == []


def test_no_import_circles():
    # towerflow/__init__.py imports nothing of its own, so packages and their modules do not form circles through it
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}}, [["a", "b", "c"]]),
])
def test_cycle_finder(graph, expected):
    assert cycles(graph) == expected


def test_layer_checker_catches_an_upward_import():
    graph = {"towerflow.tasks.train": {"towerflow.flows.retrain"}, "towerflow.flows.retrain": {"towerflow.tasks.train"}}
    assert upward_imports(graph) == [
        "towerflow.tasks.train (layer 2) imports towerflow.flows.retrain (layer 4)"]
    assert cycles(graph) == [["towerflow.flows.retrain", "towerflow.tasks.train"]]
