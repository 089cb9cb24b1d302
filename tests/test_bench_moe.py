"""The MoE benchmark's own logic: method options in a method's name (the runs are benchmarks)."""

from __future__ import annotations

import json
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


def test_preserved_texts_share_no_subject_with_the_measured_texts_or_the_edits(tmp_path):
    facts = [
        {"subject": s, "prompt": f"{s} is located in", "attribute": a}
        for s, a in [("Oslo", "Norway"), ("Oslo", "Europe"), ("Rome", "Italy"), ("Lima", "Peru"), ("Kyiv", "Ukraine")]
    ]
    (tmp_path / "known_1000.json").write_text(json.dumps(facts))
    measured = ["Oslo is located in Norway."]
    got = bench_moe.preserved_texts(tmp_path, {"Rome"}, measured, 2)
    assert got == ["Lima is located in Peru.", "Kyiv is located in Ukraine."]  # not Oslo (measured), not Rome (edited)
    with pytest.raises(SystemExit, match="only 2 known facts"):
        bench_moe.preserved_texts(tmp_path, {"Rome"}, measured, 3)


def test_a_preserve_option_becomes_mom2_preserve_texts(monkeypatch, tmp_path):
    import hf_knowedit

    seen = {}

    def fake_evaluate(model, tok, cases, **kwargs):
        seen.update(kwargs["config"])
        scores = {"ES": 1.0, "PS": 1.0, "NS": 1.0}
        return types.SimpleNamespace(pre=scores, post=scores, timing={"edit_s": 0.0})

    monkeypatch.setattr(hf_knowedit, "evaluate", fake_evaluate)
    facts = [{"subject": f"S{i}", "prompt": f"S{i} is in", "attribute": f"A{i}"} for i in range(5)]
    (tmp_path / "known_1000.json").write_text(json.dumps(facts))
    args = types.SimpleNamespace(rome=1, memit=1, context_templates=0, data=tmp_path)
    cases = [{"requested_rewrite": {"subject": "S0"}}]
    bench_moe.run_one("dense", "memit+preserve=2+mom2_preserve_weight=3", None, None, cases, ["S1 is in A1."], args)
    assert seen["mom2_preserve"] == ["S2 is in A2.", "S3 is in A3."] and seen["mom2_preserve_weight"] == 3
    assert "preserve" not in seen
