"""glmkit's modules import one way: every import (inside functions too) points to the same layer or one below,
and no chain of imports comes back to where it started.

To add a module: put its name in the layer it belongs to in ``LAYERS`` (a subpackage ``glmkit/x/`` is listed as
``"x"`` for all its modules, or module by module as ``"x.y"``). A layer may import its own layer and those above it
in the list, never those below.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "glmkit"

# Lowest first. Each layer may import from itself and from the layers listed before it.
LAYERS: list[tuple[str, set[str]]] = [
    ("vocabulary and helpers", {"__init__", "vocabulary", "tables", "chat_template", "corpus"}),
    ("model structure", {"models", "device_map"}),
    ("planner: costs", {"costs"}),
    ("planner: placement", {"placement"}),
    ("planner: plan, search, advice", {"planning"}),
    ("kernels", {"gemv", "gemv4bit", "gemv4bit_mma", "gemv4bit_one", "gemv16_one", "mlp16_one", "gemv_tuning", "attention",
                 "greedy"}),
    ("runtime", {"monitor", "env", "loading", "generation", "sampling", "fast_decode", "step_tuning", "allreduce", "tp_decode",
                 "parallel"}),
    ("engine", {"request", "scheduler", "runner", "metrics", "engine"}),
    ("measurement and results", {"bench", "quantization", "results", "cards"}),
    ("front ends", {"widgets", "server", "server_guard", "vllm_command", "cli"}),
]


def module_name(path: Path) -> str:
    """``glmkit/engine/step.py`` -> ``"engine.step"``; a package's ``__init__.py`` -> its package name."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """Index in ``LAYERS`` of a module, or of the closest package above it that is listed."""
    name = module
    while name:
        for i, (_, members) in enumerate(LAYERS):
            if name in members:
                return i
        name = name.rpartition(".")[0]
    return None


def glmkit_imports(module: str, path: Path, known: set[str]) -> set[str]:
    """glmkit modules that ``module`` imports anywhere in its file (top level, functions, classes)."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name == "glmkit" or a.name.startswith("glmkit.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .y import z
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                absolute = ".".join(["glmkit", *base, *([node.module] if node.module else [])])
            else:
                absolute = node.module or ""
            if absolute == "glmkit" or absolute.startswith("glmkit."):
                targets = [absolute] + [f"{absolute}.{a.name}" for a in node.names]
        for target in targets:
            name = target.removeprefix("glmkit").removeprefix(".")
            if name in known:  # "from glmkit.x import y" names module x; "from glmkit import x" names x too
                found.add(name)
            elif name.rpartition(".")[0] in known:
                found.add(name.rpartition(".")[0])
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: glmkit_imports(m, p, known) for m, p in mods.items()}


def test_every_module_has_a_layer():
    missing = [m for m in modules() if layer_of(m) is None]
    assert not missing, (
        f"{missing} belong to no layer: add each to the right layer in LAYERS in tests/test_architecture.py "
        "(lowest first; a module may import only its own layer and the ones listed before it)."
    )


def test_no_import_runs_upward():
    upward = []
    for module, deps in import_graph().items():
        mine = layer_of(module)
        for dep in sorted(deps):
            theirs = layer_of(dep)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} ({LAYERS[mine][0]}) imports {dep} ({LAYERS[theirs][0]})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"a", "b"}}, None),
])
def test_find_cycle_finds_what_it_should(graph, cycle):
    assert find_cycle(graph) == cycle


def test_imports_inside_functions_are_seen(tmp_path, monkeypatch):
    pkg = tmp_path / "glmkit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "vocabulary.py").write_text("def f():\n    from glmkit.planning import plan_memory\n")
    (pkg / "planning.py").write_text("from . import vocabulary\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    graph = import_graph()
    assert graph["vocabulary"] == {"planning"} and graph["planning"] == {"vocabulary"}
    assert find_cycle(graph) == ["planning", "vocabulary", "planning"]
    assert layer_of("engine.step") == layer_of("engine") and layer_of("nowhere") is None
