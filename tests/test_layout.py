"""The package layout: no import cycles, the core never imports the wings, and a tidy ``__all__``.

The import graph is read from the source with :mod:`ast` (module-level and function-level imports
alike, relative imports resolved). Importing ``a.b.c`` also runs the ``__init__`` of ``a.b`` (and of
``a``), so an import edge to a module is also an edge to each package above it, except the packages
the importing module itself lives in (they are already being imported). Imports by name at run time
(``importlib.import_module("...")``, the method registry's plugins) are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import hf_knowedit

PACKAGE = "hf_knowedit"
ROOT = Path(hf_knowedit.__file__).resolve().parent

#: the core: lower layers that must not depend on the methods, tracing, evaluation or apply_edits
CORE = [
    f"{PACKAGE}.{m}"
    for m in (
        "errors",
        "architectures",
        "hooks",
        "tokens",
        "requests",
        "generation",
        "deltas",
        "moments",
        "adapter_files",
        "editset",
        "stack",
    )
]
WINGS = [f"{PACKAGE}.methods", f"{PACKAGE}.tracing", f"{PACKAGE}.evaluation", f"{PACKAGE}.editing"]


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports (anywhere in the file), plus the packages above them that
    importing them runs."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from pkg import sub` imports the submodule pkg.sub
                targets.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source)
    edges = set()
    for target in targets:
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            while target not in known:  # `import hf_knowedit.x.Name` style: the longest module prefix
                target = target.rsplit(".", 1)[0]
            edges |= {target} | {a for a in _ancestors(target) if a not in _ancestors(name) and a != name}
    edges.discard(name)
    return edges


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def path_to(graph: dict[str, set[str]], start: str, goal) -> list[str] | None:
    """The shortest import chain from ``start`` to a module satisfying ``goal``, or None."""
    seen, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for node in frontier:
            for target in sorted(graph.get(node, ())):
                if target in seen:
                    continue
                seen[target] = node
                if goal(target):
                    chain = [target]
                    while seen[chain[-1]] is not None:
                        chain.append(seen[chain[-1]])
                    return chain[::-1]
                nxt.append(target)
        frontier = nxt
    return None


def _is_wing(name: str) -> bool:
    return any(name == w or name.startswith(w + ".") for w in WINGS)


# -----------------------------------------------------------------------------
# the checks on the helpers themselves (so a broken parser cannot pass vacuously)


def test_graph_reader_resolves_relative_absolute_and_function_level_imports(tmp_path, monkeypatch):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from . import a\nfrom .sub.c import thing\n",
        "a.py": "import os\nfrom hf_knowedit.b import f\n",
        "b.py": "def f():\n    from .sub import c\n    import hf_knowedit.a\n",
        "sub/__init__.py": "",
        "sub/c.py": "from .. import b\nfrom . import d\nthing = 1\n",
        "sub/d.py": "from ..b import f\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    monkeypatch.setattr(f"{__name__}.ROOT", pkg)
    graph = import_graph()
    assert graph == {
        PACKAGE: {f"{PACKAGE}.a", f"{PACKAGE}.sub", f"{PACKAGE}.sub.c"},
        f"{PACKAGE}.a": {f"{PACKAGE}.b"},
        f"{PACKAGE}.b": {f"{PACKAGE}.sub", f"{PACKAGE}.sub.c", f"{PACKAGE}.a"},
        f"{PACKAGE}.sub": set(),
        f"{PACKAGE}.sub.c": {f"{PACKAGE}.b", f"{PACKAGE}.sub.d"},
        f"{PACKAGE}.sub.d": {f"{PACKAGE}.b"},
    }
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and all(b in graph[a] for a, b in zip(cycle, cycle[1:]))
    assert find_cycle({"x": {"y"}, "y": set()}) is None
    assert path_to(graph, f"{PACKAGE}.sub.d", lambda m: m == f"{PACKAGE}.sub.c") == [
        f"{PACKAGE}.sub.d",
        f"{PACKAGE}.b",
        f"{PACKAGE}.sub.c",
    ]


# -----------------------------------------------------------------------------
# the package


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and f"{PACKAGE}.methods.memit" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_never_imports_the_wings():
    graph = import_graph()
    assert all(m in graph for m in CORE), [m for m in CORE if m not in graph]
    chains = {m: path_to(graph, m, _is_wing) for m in CORE}
    bad = {m: " -> ".join(chain) for m, chain in chains.items() if chain}
    assert not bad, "the core imports the wings:\n" + "\n".join(bad.values())


def test_all_names_exist_and_are_sorted():
    missing = [name for name in hf_knowedit.__all__ if not hasattr(hf_knowedit, name)]
    assert not missing, missing
    assert len(set(hf_knowedit.__all__)) == len(hf_knowedit.__all__)
    assert hf_knowedit.__all__ == sorted(hf_knowedit.__all__)
