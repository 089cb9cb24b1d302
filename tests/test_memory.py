"""The memory model's formulas (``hf_knowedit.methods.memory``) and the budgets reaching the code."""

from __future__ import annotations

import pytest
import torch

import hf_knowedit.methods.statistics as stats
from hf_knowedit.methods import memory
from hf_knowedit.methods.rome import ROMEConfig
from tests.test_stats import CORPUS
from tests.tiny_models import HEADS, HIDDEN, INNER, LAYERS, make_tiny_model


def test_statistics_of_a_llama_3_8b_down_proj_fit_in_float32():
    """d_in 14,336 (Llama-3-8B's down_proj), d_model 4,096, 32 heads, 4,096 tokens of 512 per row."""
    got = memory.statistics_bytes(14336, 4096, 14336, 32, 4096, 512, s=2, s_C=4)
    assert got["C"] == 4 * 14336**2 == 822_083_584  # 784 MiB
    assert got["keys"] == (2 * 2 + 4) * 4096 * 14336
    assert got["forward"] == 2 * (4 * 4096 * 4096 + 3 * 4096 * 14336 + 2 * 32 * 4096 * 512)
    assert got["total"] == got["C"] + got["keys"] + got["forward"] < 2 * 2**30  # under 2 GiB
    assert memory.statistics_bytes(14336, 4096, 14336, 32, 4096, 512, s=2, s_C=8)["C"] == 8 * 14336**2


def test_solve_and_target_terms():
    assert memory.solve_bytes(100, 30, 7)["total"] == 3 * 8 * 100**2 + 8 * 7 * (2 * 100 + 30)
    assert memory.solve_bytes(100, 30, 7, "rome")["total"] == 4 * 8 * 100**2 + 8 * (2 * 100 + 30)
    assert memory.solve_bytes(100, 30, 7, "emmet")["total"] == 2 * 8 * 100**2 + 2 * 8 * 49 + 8 * 7 * 230
    got = memory.targets_bytes(32, 96, 4, 512, tokens=50, longest=10, layers_above=3, rows=20, s=4, kv=70)
    block = 4 * 50 * (10 * 32 + 4 * 96)
    assert got["saved"] == 3 * block and got["backward"] == block and got["prefix cache"] == 3 * 4 * 70
    assert got["logits"] == 12 * 20 * 512 and got["delta"] == 16 * 20 * 32
    eager = memory.targets_bytes(32, 96, 4, 512, tokens=50, longest=10, layers_above=3, rows=20, s=4, eager=True)
    assert eager["saved"] - got["saved"] == 3 * 2 * 4 * 4 * 50 * 10  # scores and probabilities per block
    sdpa = memory.statistics_bytes(100, 32, 96, 4, 50, 10, eager=False)["forward"]
    assert memory.statistics_bytes(100, 32, 96, 4, 50, 10)["forward"] - sdpa == 4 * 2 * 4 * 50 * 10


def test_model_shape_reads_the_tiny_llama():
    model, _ = make_tiny_model("llama")
    shape = memory.model_shape(model, 1)
    assert shape == {
        "d_in": INNER, "d_out": HIDDEN, "d_model": HIDDEN, "d_ff": INNER, "heads": HEADS, "vocab": 512,
        "layers_above": LAYERS - 1, "s": 4, "eager": model.config._attn_implementation == "eager",
    }  # fmt: skip


@pytest.mark.usefixtures("stats_cache")
def test_mom2_batch_tokens_is_the_statistics_budget(monkeypatch):
    seen = []
    real = stats._by_length

    def spy(rows, batch_tokens):
        for batch in real(rows, batch_tokens):
            seen.append((batch_tokens, max(map(len, batch)) * len(batch)))
            yield batch

    monkeypatch.setattr(stats, "_by_length", spy)
    model, tok = make_tiny_model("llama")
    stats.second_moment_for(model, tok, 1, ROMEConfig(mom2_corpus=CORPUS, mom2_n_tokens=300, mom2_batch_tokens=40))
    assert seen and all(budget == 40 for budget, _ in seen)
    assert max(padded for _, padded in seen) <= 40  # every corpus row is shorter than the budget


def test_measure_peak_counts_what_a_step_holds_at_once():
    def step():
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 8 MB held
        del a
        c = b + 1  # 8 MB again, not 12
        return float(c[0, 0])

    assert 8_000_000 <= memory.measure_peak(step) < 8_000_100  # the scalar read allocates a few bytes


@pytest.mark.parametrize("cached", [True, False])
def test_targets_model_bounds_the_measured_v_star_step(cached):
    """The predicted bytes of one v* optimisation on the tiny Llama are within 20 % of the peak the
    profiler measures (SmolLM2: within 6 %, ``docs/results/memory_smollm2.md``)."""
    from hf_knowedit.methods.targets import optimize_targets
    from hf_knowedit.requests import to_request
    from tests.helpers import CAPITAL_FACT

    model, tok = make_tiny_model("llama")
    reqs = [to_request(CAPITAL_FACT), to_request({**CAPITAL_FACT, "subject": "The city of Rome"})]
    predicted = memory.targets_bytes_for(model, tok, reqs, 1, prefix_cache=cached)
    measured = memory.measure_peak(
        lambda: optimize_targets(model, tok, reqs, 1, ROMEConfig(v_num_grad_steps=2), prefix_cache=cached)
    )
    assert (predicted["prefix cache"] > 0) == cached
    assert 0.8 * measured <= predicted["total"] <= 1.2 * measured  # 0.94 and 1.01 at this commit


def test_rlsedit_update_and_state_are_in_the_model():
    """RLSEdit's update of one layer's ``P`` allocates what ``solve_bytes(..., "rlsedit")`` says (within 20 %)
    on top of ``P``, the prior ``(λC)⁻¹`` no more, and the history holds ``state_bytes(...)["kept"]``."""
    from hf_knowedit.methods import rlsedit
    from hf_knowedit.methods.solvers import prior_inverse
    from hf_knowedit.moments import SecondMoment, StatsKey

    d_in, d_out, n = 400, 64, 8
    g = torch.Generator().manual_seed(0)
    X = torch.randn(d_in, 4 * d_in, generator=g, dtype=torch.float64)
    moment = SecondMoment(X @ X.t() / X.shape[1], X.shape[1], StatsKey("m", 0, "mlp", "corpus", 1, "float64"))
    moment.cholesky()  # cached before the measure, as after the statistics pass
    keys, resid = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
    predicted = memory.solve_bytes(d_in, d_out, n, "rlsedit")
    P = prior_inverse(moment, 3.0)
    for step in (lambda: rlsedit.rls_update(keys, resid, P), lambda: prior_inverse(moment, 3.0)):
        measured = memory.measure_peak(step)
        assert 0.8 * measured <= predicted["total"] <= 1.2 * measured, (measured, predicted)
    assert memory.state_bytes(d_in, 3) == {
        "kept": 3 * 8 * d_in**2,
        "during a call": 3 * 8 * d_in**2,
        "total": 48 * d_in**2,
    }
    assert memory.state_bytes(d_in, 3, "memit") == {"total": 0}
    assert memory.state_bytes(d_in, 3, "encore")["total"] == 48 * d_in**2


def test_the_rlsedit_history_holds_the_state_the_model_predicts():
    import hf_knowedit
    from hf_knowedit.methods import rlsedit
    from hf_knowedit.stack import get_state
    from tests.test_memit import FAST, facts

    model, tok = make_tiny_model("llama")
    hf_knowedit.apply_edits(
        model, tok, facts(2), method="rlsedit", layers=[1, 2], v_num_grad_steps=2, context_templates=0, **FAST
    )
    P = get_state(model).history[rlsedit.HISTORY_KEY].P
    assert sum(p.numel() * p.element_size() for p in P.values()) == memory.state_bytes(INNER, 2)["kept"]


@pytest.mark.parametrize("method", ["alphaedit", "encore"])
def test_the_key_histories_hold_the_state_the_model_predicts(method):
    """AlphaEdit's and ENCORE's ``Σ K_p K_pᵀ`` per layer (and AlphaEdit's cached null-space bases) are what
    ``state_bytes(..., method)["kept"]`` (+ ``"null-space basis"``) says."""
    import hf_knowedit
    from hf_knowedit.stack import get_state
    from tests.test_memit import FAST, facts

    model, tok = make_tiny_model("llama")
    fast = {k: v for k, v in FAST.items() if k != "mom2_update_weight"}  # AlphaEdit has no λ
    hf_knowedit.apply_edits(
        model, tok, facts(2), method=method, layers=[1, 2], v_num_grad_steps=2, context_templates=0, **fast
    )
    history = get_state(model).history[method]
    kept = sum(p.numel() * p.element_size() for p in history.prior.values())
    predicted = memory.state_bytes(INNER, 2, method)
    assert kept == predicted["kept"]
    if method == "alphaedit":
        bases = list(history.projectors.values())
        assert len(bases) == 2
        rank = bases[0].shape[1]
        assert all(b.shape == (INNER, rank) for b in bases)
        basis_bytes = sum(b.numel() * b.element_size() for b in bases)
        assert basis_bytes == memory.state_bytes(INNER, 2, method, null_rank=rank)["null-space basis"]
        assert basis_bytes <= predicted["null-space basis"]  # the worst case, r = d_in
    else:
        assert "null-space basis" not in predicted


def test_moeedit_solve_and_statistics_are_linear_in_the_experts():
    """MoEEdit's solve of one layer (every expert's null-space basis, then the ridge in the edits) allocates
    what ``solve_bytes(I, d, n, "moeedit", experts=E)`` says (within 20 %, worst case: every direction of
    every expert is null); its statistics are ``E`` blocks of ``I²``, not the joint ``(E·I)²``."""
    from hf_knowedit.methods.solvers import expert_nullspace_factors, nullspace_basis

    E, inner, d_out, n = 4, 300, 64, 8
    g = torch.Generator().manual_seed(0)
    moments = [1e-3 * torch.eye(inner) for _ in range(E)]  # every eigenvalue below the threshold: r_e = I
    keys, resid = torch.randn(n, E * inner, generator=g), torch.randn(n, d_out, generator=g)

    def step():
        bases = {e: nullspace_basis(C, 2e-2).float() for e, C in enumerate(moments)}
        return expert_nullspace_factors(keys, resid, bases, 1.0)

    predicted = memory.solve_bytes(inner, d_out, n, "moeedit", experts=E)
    measured = memory.measure_peak(step)
    assert 0.8 * measured <= predicted["total"] <= 1.2 * measured, (measured, predicted)
    assert memory.statistics_bytes(768, 2048, 768, 32, 4096, 512, experts=128)["C"] == 4 * 128 * 768**2
    assert memory.statistics_bytes(768 * 128, 2048, 768, 32, 4096, 512)["C"] == 4 * (128 * 768) ** 2
