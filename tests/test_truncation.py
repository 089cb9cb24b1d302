"""Rank truncation of edit sets (``ModuleDelta.truncate``, ``EditSet.truncate``, ``hf-knowedit truncate``):
exact at full rank, the error is the tail of the singular values, and the result is still a PEFT adapter."""

import json

import pytest
import torch

import hf_knowedit
from hf_knowedit.cli import main
from hf_knowedit.deltas import ModuleDelta
from hf_knowedit.editset import EditSet
from hf_knowedit.errors import InvalidConfigError
from tests.helpers import logits
from tests.test_stack import random_set
from tests.tiny_models import make_tiny_model


def known_spectrum(out_dim=40, in_dim=56, s=(5.0, 3.0, 2.0, 1.0, 0.5, 0.25), seed=0):
    """Factors ``B [out, r]``, ``A [r, in]`` of ``ΔW = U diag(s) Vᵀ`` (orthonormal ``U``, ``V``), mixed by a
    random invertible ``M`` so that the factors themselves are not the SVD: ``B = U S M``, ``A = M⁻¹ Vᵀ``."""
    g = torch.Generator().manual_seed(seed)
    r = len(s)
    u = torch.linalg.qr(torch.randn(out_dim, r, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(in_dim, r, generator=g, dtype=torch.float64))[0]
    m = torch.randn(r, r, generator=g, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
    sv = torch.tensor(s, dtype=torch.float64)
    B, A = u * sv @ m, torch.linalg.solve(m, v.t())
    return ModuleDelta(A=A, B=B), u, sv, v


def test_singular_values_come_from_the_factors():
    d, _, s, _ = known_spectrum()
    torch.testing.assert_close(d.singular_values(), s, rtol=1e-5, atol=1e-6)
    dense = d.B.double() @ d.A.double()
    every = torch.linalg.svdvals(dense)  # min(out, in) values, the rest zero
    torch.testing.assert_close(d.singular_values(), every[: d.rank], rtol=1e-6, atol=1e-8)
    assert float(every[d.rank :].abs().max()) < 1e-12
    u, sv, vh = d.svd()
    torch.testing.assert_close(u * sv @ vh, dense, rtol=0, atol=1e-9)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_error_is_the_tail_of_the_singular_values(k):
    d, u, s, v = known_spectrum()
    small, error = d.truncate(k)
    assert small.rank == k and not small.dense
    assert error == pytest.approx(float((s[k:].square().sum() / s.square().sum()).sqrt()), rel=1e-5)
    full = d.delta().double()
    measured = float((full - small.delta().double()).norm() / full.norm())
    assert measured == pytest.approx(error, rel=1e-4, abs=1e-6)
    # ... and it is the best rank-k approximation: U_k S_k V_kᵀ (Eckart-Young)
    best = u[:, :k] * s[:k] @ v[:, :k].t()
    torch.testing.assert_close(small.delta().double(), best, rtol=0, atol=1e-5)
    # the singular values are split evenly between the factors
    torch.testing.assert_close(small.A.norm(dim=1).double(), s[:k].sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(small.B.norm(dim=0).double(), s[:k].sqrt(), rtol=1e-5, atol=0)


def test_full_rank_is_exact():
    d, _, _, _ = known_spectrum()
    for k in (d.rank, d.rank + 1, 10_000):
        same, error = d.truncate(k)
        assert error == 0.0 and torch.equal(same.A, d.A) and torch.equal(same.B, d.B)
        assert same.A is not d.A  # a copy
    # through the SVD, keeping every singular value gives ΔW back to float32 rounding
    u, s, vh = d.svd()
    full = d.B.double() @ d.A.double()
    assert float((u * s @ vh - full).norm() / full.norm()) < 1e-12


def test_dense_deltas_truncate_to_factors():
    g = torch.Generator().manual_seed(1)
    for shape in ((24, 40), (40, 24)):
        m = torch.randn(*shape, generator=g)
        d = ModuleDelta.from_dense(m)
        assert d.dense and d.rank == min(shape)
        small, error = d.truncate(4)
        s = torch.linalg.svdvals(m.double())
        assert small.rank == 4 and not small.dense and small.shape == d.shape
        assert error == pytest.approx(float((s[4:].square().sum() / s.square().sum()).sqrt()), rel=1e-5)
        kept, error = d.truncate(min(shape))
        assert kept.dense and error == 0.0 and torch.equal(kept.delta(), d.delta())


def test_a_dense_delta_of_low_rank_truncates_exactly_to_its_rank():
    """A dense module (stored when the rank exceeds half the smaller side) comes back as an exact LoRA."""
    g = torch.Generator().manual_seed(2)
    low = torch.randn(30, 5, generator=g) @ torch.randn(5, 20, generator=g)
    d = ModuleDelta.from_dense(low)
    assert d.dense and d.rank == 20
    small, error = d.truncate(5)
    assert small.rank == 5 and error < 1e-6
    torch.testing.assert_close(small.delta(), low, rtol=0, atol=1e-4)


def test_zero_delta_and_bad_ranks():
    zero = ModuleDelta(A=torch.zeros(3, 8), B=torch.zeros(5, 3))
    small, error = zero.truncate(1)
    assert error == 0.0 and small.rank == 1 and torch.count_nonzero(small.delta()) == 0
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InvalidConfigError, match="positive integer"):
            zero.truncate(bad)


def test_edit_set_truncate_records_errors_and_keeps_everything_else():
    model, tok = make_tiny_model("llama")
    es = random_set(model, [1, 2], rank=4, seed=3)
    es.name = "cf"
    es.metrics = {"ES": 100.0}
    small = es.truncate(2)
    assert small is not es and small.name == "cf-r2"
    assert {p: d.rank for p, d in small.deltas.items()} == {p: 2 for p in es.deltas}
    assert {p: d.rank for p, d in es.deltas.items()} == {p: 4 for p in es.deltas}  # the original is untouched
    info = small.metrics["truncation"]
    assert info["rank"] == 2 and small.metrics["ES"] == 100.0
    assert info["ranks_before"] == {p: 4 for p in es.deltas} and info["ranks_after"] == {p: 2 for p in es.deltas}
    for p, d in es.deltas.items():
        assert info["relative_error"][p] == pytest.approx(d.truncate(2)[1])
        assert 0 < info["relative_error"][p] < 1
    assert info["max_relative_error"] == max(info["relative_error"].values())
    assert (small.requests, small.fingerprints, small.layouts, small.layers, small.method) == (
        es.requests, es.fingerprints, es.layouts, es.layers, es.method,
    )  # fmt: skip
    assert es.truncate(4).metrics["truncation"]["max_relative_error"] == 0.0


def test_truncated_adapter_is_a_valid_peft_adapter(tmp_path):
    from peft import PeftModel

    model, tok = make_tiny_model("llama")
    hf_knowedit.attach(model, tok)
    small = random_set(model, [1, 3], rank=5, seed=4).truncate(2)
    small.save_pretrained(tmp_path / "r2")
    cfg = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 2 and set(cfg["rank_pattern"].values()) == {2}
    sidecar = json.loads((tmp_path / "r2" / "knowedit_config.json").read_text())
    assert sidecar["metrics"]["truncation"]["rank"] == 2
    back = EditSet.from_pretrained(tmp_path / "r2")
    for p, d in small.deltas.items():
        assert torch.equal(back.deltas[p].A, d.A) and torch.equal(back.deltas[p].B, d.B)

    model.load_edits(str(tmp_path / "r2"))  # fingerprints: the same base model
    ours = logits(model, tok)
    peft_model = PeftModel.from_pretrained(make_tiny_model("llama")[0], str(tmp_path / "r2"))
    torch.testing.assert_close(logits(peft_model, tok), ours, atol=1e-5, rtol=1e-5)


def test_memit_edit_truncated_to_its_rank_is_the_same_edit(one_thread):
    model, tok = make_tiny_model("llama")
    hf_knowedit.attach(model, tok)
    facts = [
        {"prompt": "{} is located in", "subject": s, "target_new": t}
        for s, t in (("The Eiffel Tower", "Rome"), ("The Louvre", "Madrid"), ("Mount Everest", "Japan"))
    ]
    es = model.apply_edits(facts, method="memit", layers=[1, 2], mom2="identity", context_templates=0,
                           v_num_grad_steps=5)  # fmt: skip
    assert {d.rank for d in es.deltas.values()} == {3}
    edited = logits(model, tok, "The Eiffel Tower is located in")
    model.revert_edits()
    same = es.truncate(3)
    assert same.metrics["truncation"]["max_relative_error"] == 0.0
    model.load_edits(same)
    torch.testing.assert_close(logits(model, tok, "The Eiffel Tower is located in"), edited, rtol=0, atol=0)
    model.revert_edits()
    one = es.truncate(1)
    assert 0 < one.metrics["truncation"]["max_relative_error"] < 1
    model.load_edits(one)
    assert not torch.allclose(logits(model, tok, "The Eiffel Tower is located in"), edited)


def test_cli_truncate_and_apply_max_rank(capsys, tmp_path, monkeypatch):
    from hf_knowedit import cli

    model, tok = make_tiny_model("llama")
    random_set(model, [1, 2], rank=4, seed=5).save_pretrained(tmp_path / "a")
    code = main(["truncate", str(tmp_path / "a"), "--rank", "2", "--out", str(tmp_path / "a-r2"), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and set(data["ranks"].values()) == {2} and data["truncation"]["rank"] == 2
    assert all(0 < e < 1 for e in data["truncation"]["relative_error"].values())
    back = EditSet.from_pretrained(tmp_path / "a-r2")
    assert {d.rank for d in back.deltas.values()} == {2}

    monkeypatch.setattr(cli.common, "load_model", lambda args: make_tiny_model("llama"))
    code = main(["apply", str(tmp_path / "a"), "--max-rank", "3", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and set(data["applied"][0]["ranks"].values()) == {3}


def test_cli_truncate_usage_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["truncate", str(tmp_path), "--rank", "2"])
    assert exit_info.value.code == 2 and "--out DIR and/or --push REPO" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["truncate", str(tmp_path), "--rank", "0", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "positive integer" in capsys.readouterr().err
