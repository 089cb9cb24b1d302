"""The MoE benchmark's own logic: method options in a method's name (the runs are benchmarks)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

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


def test_floor_rows_measure_the_unedited_model_in_another_precision():
    """``--floor``: the routing change of the unedited model cast to a dtype; float32 against itself is 0, the
    model itself is not cast, and the table prints the row with routing only."""
    from tests.tiny_models import make_tiny_model

    model, tok = make_tiny_model("mixtral")
    texts = ["The Eiffel Tower is in Paris.", "Berlin is the capital of Germany."]
    same = bench_moe.floor_row("mixtral/routed", model, tok, texts, "float32")
    assert same["routing_change"] == 0.0 and same["method"] == "unedited in float32" and same["records"] == 0
    half = bench_moe.floor_row("mixtral/routed", model, tok, texts, "bfloat16")
    assert 0.0 <= half["routing_change"] <= 100.0
    assert next(model.parameters()).dtype == torch.float32  # the copy was cast, not the model
    line = bench_moe.table([half]).splitlines()[-1]
    assert line.startswith("| mixtral/routed | unedited in bfloat16 | – |") and f"{half['routing_change']:.2f}" in line
