"""The MoE benchmark's own logic: method options in a method's name (the runs are benchmarks)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_moe  # noqa: E402


def test_a_method_name_carries_its_options(monkeypatch):
    import hf_knowedit

    seen = {}

    def fake_evaluate(model, tok, cases, **kwargs):
        seen.update(kwargs["config"], method=kwargs["method"], protocol=kwargs["protocol"])
        scores = {"ES": 1.0, "PS": 1.0, "NS": 1.0}
        return types.SimpleNamespace(pre=scores, post=scores, timing={"edit_s": 0.0})

    monkeypatch.setattr(hf_knowedit, "evaluate", fake_evaluate)
    args = types.SimpleNamespace(rome=1, memit=2, context_templates=0)
    row = bench_moe.run_one("dense", "moeedit+nullspace_threshold=0.002", None, None, [{}] * 3, [], args)
    assert seen["method"] == "moeedit" and seen["protocol"] == "batch" and seen["nullspace_threshold"] == 0.002
    assert row["method"] == "moeedit+nullspace_threshold=0.002" and row["records"] == 2
    with pytest.raises(SystemExit):
        bench_moe.main(["--methods", "nosuch+x=1", "--state", "/nonexistent/x.json"])
