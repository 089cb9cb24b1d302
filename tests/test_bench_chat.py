"""The chat benchmark's own logic: variant options and the table with its targets (the runs are benchmarks)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_chat  # noqa: E402


def test_variants_are_method_options():
    assert bench_chat.variant_options("default") == {}
    assert bench_chat.variant_options("chat_context=2,mom2=identity") == {"chat_context": 2, "mom2": "identity"}
    with pytest.raises(SystemExit, match="bad variant"):
        bench_chat.variant_options("chat_context")


def test_chat_questions_is_a_variant():
    from hf_knowedit.methods.memit import MEMITConfig

    options = bench_chat.variant_options("chat_questions=true,chat_context=2")
    assert options == {"chat_questions": True, "chat_context": 2}
    assert MEMITConfig(**options).chat_questions is True


def test_the_table_names_each_missed_target():
    pre = dict.fromkeys(bench_chat.COLUMNS, 0.0) | {"NS": 80.0, "chat_keep": 96.0}
    good = {"ES": 100.0, "PS": 90.0, "NS": 78.0, "gen_ES": 95.0, "gen_PS": 75.0, "gen_ES_prefix": 90.0}
    good |= {"chat_ES": 92.0, "chat_PS": 71.0, "chat_NS": 60.0, "chat_keep": 96.0}
    bad = good | {"chat_ES": 89.0, "NS": 70.0}
    rows = [
        {"method": "rome", "variant": v, "records": 2, "pre": pre, "post": post, "seconds": 1.0}
        for v, post in (("default", bad), ("chat_context=2", good))
    ]
    lines = bench_chat.table("m", rows).splitlines()
    assert lines[4].startswith("| unedited | – | 0 | 0 | 80 |")
    assert lines[5].endswith("| chat_ES ≥ 90, NS drop ≤ 5 | 1 |")
    worse = {**rows[1], "post": good | {"chat_keep": 91.0}}  # 91 < 0.95 · 96
    assert bench_chat.table("m", [worse]).splitlines()[5].endswith("| chat_keep ≥ 95 % of unedited | 1 |")
    assert lines[6].endswith("| none | 1 |")


def test_a_variant_overrides_the_runs_options(monkeypatch):
    """``context_templates=5`` in a variant replaces ``--context-templates`` (it used to be a duplicate keyword)."""
    import types

    import hf_knowedit

    seen = {}

    def fake_evaluate(model, tok, cases, **kwargs):
        seen.update(kwargs["config"])
        scores = dict.fromkeys(bench_chat.COLUMNS, 1.0)
        return types.SimpleNamespace(pre=scores, post=scores)

    monkeypatch.setattr(hf_knowedit, "evaluate", fake_evaluate)
    args = types.SimpleNamespace(context_templates=0)
    row = bench_chat.run_one(None, None, [1, 2], "memit", "context_templates=5,v_position_noise=true", args)
    assert seen["context_templates"] == 5 and seen["v_position_noise"] is True and row["records"] == 2
    bench_chat.run_one(None, None, [1], "rome", "default", args)
    assert seen["context_templates"] == 0


def test_the_default_context_templates_are_the_librarys():
    """The benchmark measures what users get unless told otherwise: the library's default context templates."""
    from hf_knowedit.methods.memit import MEMITConfig
    from hf_knowedit.methods.rome import ROMEConfig

    assert bench_chat.LIBRARY_TEMPLATES == MEMITConfig().context_templates == ROMEConfig().context_templates
