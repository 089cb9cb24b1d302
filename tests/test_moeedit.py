"""MoEEdit (:mod:`hf_knowedit.methods.moeedit`): the authors' projection and RP-BCD solver transcribed from their
code (``Terence-Gu/MoEEdit``: ``manager.py``, ``optim.py``) against ours, per-expert statistics over the tokens
routed to each expert, the edit landing on its target, the statistics corpus's outputs left exactly as they were,
the typed refusal on rows that are not routed experts, and the authors' settings read by ``from_reference``."""

from __future__ import annotations

import pytest
import torch

import hf_knowedit
from hf_knowedit.architectures import get_architecture, get_module, mlp_out_path
from hf_knowedit.errors import UnsupportedArchitectureError
from hf_knowedit.experts import routed_keys
from hf_knowedit.methods import MoEEditConfig
from hf_knowedit.methods.solvers import alphaedit_factors, expert_nullspace_factors, nullspace_basis
from hf_knowedit.methods.statistics import compute_expert_moments, compute_second_moment
from hf_knowedit.moments import StatsCache
from tests.helpers import assert_untouched, snapshot
from tests.test_scaled_models import REQUEST, block_output, one_layer_target
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread", "stats_cache")

TEXTS = ["The Eiffel Tower is located in Paris.", "Toyota is a car company headquartered in Japan."]


def _random_problem(seed: int = 0, n: int = 5, n_experts: int = 4, inner: int = 6, d: int = 7, top_k: int = 2):
    """Gated keys ``[n, E·I]`` (top-k routing, renormalised weights), residuals and per-expert null-space bases."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, n_experts, inner, generator=g, dtype=torch.float64)
    logits_ = torch.randn(n, n_experts, generator=g, dtype=torch.float64)
    top = logits_.softmax(-1).topk(top_k, dim=-1)
    gating = torch.zeros(n, n_experts, dtype=torch.float64).scatter(
        1, top.indices, top.values / top.values.sum(1, True)
    )
    bases = {}
    for e in range(n_experts):
        x = torch.randn(3, inner, generator=g, dtype=torch.float64)  # rank-3 statistics: a null space of dim 3
        bases[e] = nullspace_basis(x.t() @ x / 3, 1e-9)
    resid = torch.randn(n, d, generator=g, dtype=torch.float64)
    return k, gating, bases, resid


def _authors_rp_bcd(R, gating, values, lam, num_passes, seed=42):
    """A transcription of the authors' ``BlockCoordinateDescent.optimize`` (``optim.py``): ``R`` ``[T, d]`` is
    ``h − z``, ``values[t, j] = P_j k_tj``; returns the per-expert ``Δ_j`` (``[d, I]``); their update is ``Δ_j P_j``."""
    T, n_experts, inner = values.shape
    deltas = [torch.zeros(R.shape[1], inner, dtype=R.dtype) for _ in range(n_experts)]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(num_passes):
        for j in torch.randperm(n_experts, generator=gen).tolist():
            active = gating[:, j] > 0
            if not active.any():
                continue
            S = R.clone()
            for ell in range(n_experts):
                if ell != j:
                    S += gating[:, ell : ell + 1] * (values[:, ell, :] @ deltas[ell].T)
            g_j, v_j, S_j = gating[active, j], values[active, j], S[active]
            B_j = S_j.T @ (g_j[:, None] * v_j)
            M_j = v_j.T @ ((g_j**2)[:, None] * v_j)
            deltas[j] = -B_j @ torch.linalg.inv(M_j + lam * torch.eye(inner, dtype=R.dtype))
    return deltas


def test_the_authors_rp_bcd_converges_to_the_exact_solve():
    k, gating, bases, resid = _random_problem()
    n, n_experts, inner = k.shape
    P = {e: U @ U.T for e, U in bases.items()}
    values = torch.stack([torch.stack([P[j] @ k[t, j] for j in range(n_experts)]) for t in range(n)])
    lam = 1.0
    theirs = _authors_rp_bcd(-resid, gating, values, lam, num_passes=300)  # their R is h − z: ours is z − h
    keys = (gating[:, :, None] * k).reshape(n, -1)  # routed keys g_j k_j
    B, A = expert_nullspace_factors(keys, resid, bases, lam, dtype=torch.float64)
    ours = (B @ A).reshape(-1, n_experts, inner)
    for j in range(n_experts):
        torch.testing.assert_close(ours[:, j], theirs[j] @ P[j], rtol=1e-7, atol=1e-9)
    # a few passes (the authors' 4) are not there yet: the test is not vacuous
    early = _authors_rp_bcd(-resid, gating, values, lam, num_passes=1)
    assert max(float((ours[:, j] - early[j] @ P[j]).abs().max()) for j in range(n_experts)) > 1e-4


def test_the_exact_solve_is_alphaedit_with_a_block_diagonal_projector():
    k, gating, bases, resid = _random_problem(seed=1, n=3)
    keys = (gating[:, :, None] * k).reshape(k.shape[0], -1)
    B, A = expert_nullspace_factors(keys, resid, bases, 0.5, dtype=torch.float64)
    B2, A2 = alphaedit_factors(keys, resid, None, l2=0.5, basis=torch.block_diag(*bases.values()), dtype=torch.float64)
    torch.testing.assert_close(B @ A, B2 @ A2, rtol=1e-9, atol=1e-12)


def test_the_projection_is_the_authors_per_expert_recipe():
    """``manager.py::_compute_projection_from_cov``: ``P = I − U_s U_sᵀ`` over the eigenvectors with eigenvalue
    above ``nullspace_threshold`` (absolute, 2e-2)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64) * torch.logspace(-3, 0, 8, dtype=torch.float64)
    cov = x.T @ x / 40
    S, U = torch.linalg.eigh(cov)
    significant = U[:, S > 2e-2]
    theirs = torch.eye(8, dtype=torch.float64) - significant @ significant.T
    ours = nullspace_basis(cov, MoEEditConfig().nullspace_threshold)
    assert 0 < ours.shape[1] < 8
    torch.testing.assert_close(ours @ ours.T, theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_expert_statistics_are_the_ungated_keys_of_the_tokens_routed_to_each_expert(model_type):
    model, tok = make_tiny_model(model_type)
    experts = get_module(model, mlp_out_path(get_architecture(model), 2))
    moments = compute_expert_moments(model, tok, 2, corpus=TEXTS, n_tokens=10_000, dtype=torch.float64, cache=False)
    assert len(moments) == 4 and all(m.d_in == 48 for m in moments)
    layout = get_architecture(model).mlp_out_layout
    rows = []
    for text in TEXTS:
        with hf_knowedit.hooks.Trace(model, mlp_out_path(get_architecture(model), 2), retain_input=True) as tr:
            with torch.no_grad():
                model(**tok(text, return_tensors="pt"))
        hidden, index, weights = tr.args
        ones = torch.ones_like(weights)  # unit routing weights: each routed expert's un-gated key
        rows.append(routed_keys(experts, hidden, index, ones, layout=layout).detach().double().reshape(-1, 4, 48))
    keys = torch.cat(rows)
    for e, m in enumerate(moments):
        mine = keys[:, e][keys[:, e].ne(0).any(dim=1)]
        assert m.n_tokens == mine.shape[0] > 0
        expected = mine.T @ mine / mine.shape[0]
        torch.testing.assert_close(m.matrix, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_expert_statistics_are_cached_apart_from_the_joint_second_moment(stats_cache):
    model, tok = make_tiny_model("mixtral")
    joint = compute_second_moment(model, tok, 1, corpus=TEXTS, n_tokens=500)
    per_expert = compute_expert_moments(model, tok, 1, corpus=TEXTS, n_tokens=500)
    keys = {joint.key, *(m.key for m in per_expert)}
    assert len(keys) == 5 and len({StatsCache(stats_cache).path(k) for k in keys}) == 5
    assert sorted(p.name for p in stats_cache.glob("*.safetensors")) == sorted(
        StatsCache(stats_cache).path(k).name for k in keys
    )
    fresh, _ = make_tiny_model("mixtral")  # the same weights: the entries come from disk
    again = compute_expert_moments(fresh, tok, 1, corpus=TEXTS, n_tokens=500)
    for a, b in zip(per_expert, again):
        assert a.key == b.key and a.n_tokens == b.n_tokens
        torch.testing.assert_close(a.matrix, b.matrix, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_the_edit_lands_on_its_target_and_reverts_exactly(model_type, monkeypatch):
    model, tok = make_tiny_model(model_type)
    before = snapshot(model)
    z, change = one_layer_target(model, tok, 1, monkeypatch)
    es = hf_knowedit.apply_edits(
        model,
        tok,
        [REQUEST],
        method="moeedit",
        layers=[1],
        config=dict(mom2_corpus=TEXTS, context_templates=0, lambda_reg=1e-6, nullspace_threshold=1e-6),
    )
    assert float((block_output(model, tok, 1) - z[0]).norm() / change.norm()) < 0.01
    path = mlp_out_path(get_architecture(model), 1)
    assert list(es.deltas) == [path] and es.layouts[path] == get_architecture(model).mlp_out_layout
    assert es.stats_key[1].module == f"{path}[*]:ungated"
    hf_knowedit.revert_edits(model, es.name)
    assert_untouched(model, before)


@torch.no_grad()
def _hidden(model, tok, text):
    """Every block's output over ``text``, ``[layers + 1, tokens, d]``."""
    return torch.stack(model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states)[:, 0]


def test_the_statistics_tokens_outputs_are_unchanged(monkeypatch):
    """Each expert's update ``Δ_e P_e`` vanishes on the keys it saw on the statistics corpus, so every block's
    output there (and every later router's input) is as before."""
    model, tok = make_tiny_model("qwen3_moe")
    prompt = REQUEST.prompt.format(REQUEST.subject)
    base = [_hidden(model, tok, text) for text in TEXTS]
    probe = _hidden(model, tok, prompt)
    z, change = one_layer_target(model, tok, 2, monkeypatch)  # z at layer 2, half the hidden norm away
    es = hf_knowedit.apply_edits(
        model,
        tok,
        [REQUEST],
        method="moeedit",
        layers=[1, 2],
        config=dict(
            mom2_corpus=TEXTS, context_templates=0, nullspace_threshold=1e-5, nullspace_relative=True, lambda_reg=1e-6
        ),
    )
    assert float((block_output(model, tok, 2) - z[0]).norm() / change.norm()) < 0.05  # the edit lands
    assert float((_hidden(model, tok, prompt) - probe).norm() / probe.norm()) > 0.05
    for text, before in zip(TEXTS, base):
        assert float((_hidden(model, tok, text) - before).norm() / before.norm()) < 1e-5
    hf_knowedit.revert_edits(model, es.name)
    # without the projections (P_e = I: every eigenvalue below the threshold) the same edit moves that text
    hf_knowedit.apply_edits(
        model,
        tok,
        [REQUEST],
        method="moeedit",
        layers=[1, 2],
        config=dict(mom2_corpus=TEXTS, context_templates=0, nullspace_threshold=1e9, lambda_reg=1e-6),
    )
    assert max(float((_hidden(model, tok, t) - b).norm() / b.norm()) for t, b in zip(TEXTS, base)) > 1e-3


@pytest.mark.parametrize("model_type", ["llama", "qwen2_moe"])
def test_rows_without_routed_experts_are_refused_untouched(model_type):
    model, tok = make_tiny_model(model_type)
    before = snapshot(model)
    with pytest.raises(UnsupportedArchitectureError, match="alphaedit"):
        hf_knowedit.apply_edits(model, tok, [REQUEST], method="moeedit", layers=[1], config=dict(mom2="identity"))
    assert_untouched(model, before)


def test_the_authors_settings_load_through_from_reference():
    """The authors' ``configs/qwen3-30b-a3b.json`` (the fields that matter here)."""
    theirs = {
        "layers": [3, 4, 5, 6, 7],
        "fact_token": "subject_last",
        "lambda_reg": 1,
        "projection_threshold": 0.02,
        "num_experts": 128,
        "num_passes": 4,
        "clamp_norm_factor": 0.75,
        "v_num_grad_steps": 25,
        "v_lr": 0.1,
        "v_loss_layer": 47,
        "v_weight_decay": 0.5,
        "kl_factor": 0.0625,
    }
    ref = MoEEditConfig.from_reference(theirs)
    assert ref.layers == [3, 4, 5, 6, 7]
    c = ref.config
    assert (c.lambda_reg, c.nullspace_threshold, c.context_templates) == (1, 2e-2, 0)
    assert (c.v_lr, c.v_num_grad_steps, c.clamp_norm_factor, c.v_weight_decay) == (0.1, 25, 0.75, 0.5)
    assert "num_passes" in ref.ignored and "projection_threshold" in ref.ignored


@pytest.mark.parametrize("limit, warned", [(0, True), (1 << 30, False)])
def test_a_large_joint_second_moment_of_routed_experts_warns_and_names_moeedit(monkeypatch, caplog, limit, warned):
    """Before the joint ``(E·I)²`` statistics of a routed-experts block above ``JOINT_WARN_BYTES`` are computed, the
    log says their size and MoEEdit's per-expert size; the per-expert pass itself never warns."""
    from hf_knowedit.methods import statistics

    model, tok = make_tiny_model("mixtral")
    monkeypatch.setattr(statistics, "JOINT_WARN_BYTES", limit)
    texts = ["The Eiffel Tower is located in Paris."] * 4
    with caplog.at_level("WARNING", logger="hf_knowedit.methods.statistics"):
        compute_second_moment(model, tok, 1, corpus=texts, n_tokens=16, cache=False)
        compute_expert_moments(model, tok, 1, corpus=texts, n_tokens=16, cache=False)
    said = [r.getMessage() for r in caplog.records if "moeedit" in r.getMessage()]
    assert len(said) == int(warned)
    if warned:
        assert "(4 experts of 48)" in said[0] and "48 x 48" in said[0]
