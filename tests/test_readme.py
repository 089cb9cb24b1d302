"""The README's first Python snippet runs as written: every name it reads is defined in it, and every
``hf_knowedit.X`` it calls exists (an undefined ``name`` once made it fail on line 4)."""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

import hf_knowedit

README = Path(__file__).resolve().parents[1] / "README.md"


def _first_python_block() -> str:
    return re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)


def undefined_names(source: str) -> list[str]:
    """Names read before any assignment or import binds them (a straight-line snippet; no scopes)."""
    bound = set(dir(builtins))
    missing = []
    for stmt in ast.parse(source).body:
        loads = [n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]
        missing += [n for n in loads if n not in bound]
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                bound.add(node.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                bound.update((a.asname or a.name).split(".")[0] for a in node.names)
    return missing


def test_undefined_names_finds_what_the_old_snippet_lacked():
    assert undefined_names("import x\nmodel = f(name)\n") == ["f", "name"]


def test_the_first_snippet_defines_every_name_it_reads():
    source = _first_python_block()
    assert undefined_names(source) == []
    called = set(re.findall(r"hf_knowedit\.(\w+)", source))
    assert called and all(hasattr(hf_knowedit, name) for name in called)
    assert {"load_smollm2", "attach"} <= called
