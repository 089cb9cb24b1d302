"""Lifelong methods against transcriptions of their papers' formulas (NAS: ``test_nas.py``): the z-to-‖h‖
rescaling (``z_to_hidden_norm``), ENCORE's norm-constrained closed form and its most-probable early stopping
(MPES); sequential ENCORE keeps exact adapters (low rank with the paper's increment penalty; dense once the
pull-back towards the original weight brings earlier edits into the update)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hf_knowedit
from hf_knowedit.architectures import get_architecture, get_module, layer_path, mlp_out_path
from hf_knowedit.errors import InvalidConfigError
from hf_knowedit.hooks import hidden, replace_hidden
from hf_knowedit.methods import encore, rlsedit
from hf_knowedit.methods.encore import ENCOREConfig, encore_update
from hf_knowedit.methods.memit import block_output_at_subject, optimize_z
from hf_knowedit.methods.targets import optimize_targets
from hf_knowedit.tokens import encode_template, split_prompt_target

from .test_memit import FAST, context, facts, tiny
from .tiny_models import weights

pytestmark = pytest.mark.usefixtures("one_thread", "stats_cache")


def test_z_to_hidden_norm_rescales_each_z_to_the_norm_of_its_hidden_state():
    model, tok = tiny("llama")
    reqs = facts(3)
    plain = optimize_z(context(model, tok, reqs), reqs, 2, ["{}"])
    anchored = optimize_z(context(model, tok, reqs, z_to_hidden_norm=True), reqs, 2, ["{}"])
    h = block_output_at_subject(model, tok, reqs, 2)  # the hidden state z starts from (plain prompt)
    for z, a, hh in zip(plain, anchored, h):
        want = z.double() * (hh.double().norm() / z.double().norm())  # z · ‖h‖ / ‖z‖
        assert torch.allclose(a.double(), want, rtol=1e-5, atol=1e-6)
        assert float(z.norm()) != pytest.approx(float(hh.norm()), rel=1e-3)  # it really rescaled
    es = hf_knowedit.apply_edits(
        model,
        tok,
        reqs,
        method="alphaedit",
        z_to_hidden_norm=True,
        layers=[1, 2],
        v_num_grad_steps=3,
        **{k: v for k, v in FAST.items() if k != "mom2_update_weight"},
    )
    assert es.config["z_to_hidden_norm"] is True


def test_encore_update_is_the_papers_closed_form_and_its_minimum():
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out = 3, 8, 5
    keys, resid = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
    X = torch.randn(d_in, 50, generator=g)
    cov = X @ X.t() / 50
    W0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    W = W0 + 0.3 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    lam, alpha = 2.0, 0.7
    B, A = encore_update(keys, resid, cov, lam, alpha, (W - W0).float())
    got = B.double() @ A.double()
    K, R, C = keys.double().t(), resid.double().t(), cov.double()
    want = (R @ K.t() - alpha * (W - W0)) @ torch.linalg.inv(lam * C + K @ K.t() + alpha * torch.eye(d_in))
    assert torch.allclose(got, want, atol=1e-5)

    # it minimises λ‖ΔW K₀‖² + ‖(W+ΔW)K − V‖² + α‖W+ΔW−W₀‖² (with K₀K₀ᵀ = C·50/50 and V = W K + R)
    V = W @ K + R

    def loss(dW):
        return (
            lam * ((dW @ X.double()) ** 2).sum() / 50
            + ((W + dW) @ K - V).pow(2).sum()
            + alpha * (W + dW - W0).pow(2).sum()
        )

    best = loss(want)
    for _ in range(5):
        assert loss(want + 1e-3 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)) > best
    # no earlier edits: MEMIT's factors with α added to the ridge, rank n
    B0, A0 = encore_update(keys, resid, cov, lam, alpha, torch.zeros(d_out, d_in))
    assert A0.shape == (n, d_in)
    assert torch.allclose(
        B0.double() @ A0.double(),
        R @ K.t() @ torch.linalg.inv(lam * C + K @ K.t() + alpha * torch.eye(d_in)),
        atol=1e-5,
    )


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # Linear and Conv1D weights
def test_sequential_encore_anchored_at_the_original_pulls_back_the_drift_and_stays_exact(model_type, monkeypatch):
    model, tok = tiny(model_type)
    spec = get_architecture(model)
    pristine = weights(model)
    seen = []
    real = encore.encore_update

    def spy(keys, resid, cov, lam, alpha, drift, **kwargs):
        seen.append(drift.clone())
        return real(keys, resid, cov, lam, alpha, drift, **kwargs)

    monkeypatch.setattr(encore, "encore_update", spy)
    opts = dict(layers=[1, 2], v_num_grad_steps=3, context_templates=0, norm_anchor="original", **FAST)
    first = hf_knowedit.apply_edits(model, tok, facts(2), method="encore", **opts)
    assert all(not bool(d.any()) for d in seen) and not any(d.dense for d in first.deltas.values())
    after_first = weights(model)
    seen.clear()
    second = hf_knowedit.apply_edits(model, tok, facts(2, 4), method="encore", **opts)
    path = mlp_out_path(spec, 1) + ".weight"
    drift = after_first[path] - pristine[path]
    if spec.mlp_out_layout == "conv1d":
        drift = drift.t()
    assert torch.allclose(seen[0], drift, atol=1e-6) and bool(drift.any())
    assert all(d.dense for d in second.deltas.values())
    # exact: the merged weight is the pristine one plus both sets' deltas, and revert is bit-exact
    merged = get_module(model, path[: -len(".weight")]).weight.double()
    summed = sum(es.deltas[path[: -len(".weight")]].delta().double() for es in (first, second))
    if spec.mlp_out_layout == "conv1d":
        summed = summed.t()
    assert torch.allclose(merged, pristine[path].double() + summed, atol=1e-5)
    hf_knowedit.revert_edits(model)
    assert all(torch.equal(weights(model)[k], v) for k, v in pristine.items())


def test_sequential_encore_by_default_penalises_only_the_increment(monkeypatch):
    """The paper's norm term ‖Ŵ − W₀‖² with W₀ the weight before the call: no drift enters the solve, every
    call is MEMIT with α on the ridge, stored as rank-n factors, and the stream reverts bit-exactly."""
    model, tok = tiny("llama")
    pristine = weights(model)
    seen = []
    real = encore.encore_update

    def spy(keys, resid, cov, lam, alpha, drift, **kwargs):
        seen.append(drift)
        return real(keys, resid, cov, lam, alpha, drift, **kwargs)

    monkeypatch.setattr(encore, "encore_update", spy)
    opts = dict(layers=[1, 2], v_num_grad_steps=3, context_templates=0, **FAST)
    sets = [hf_knowedit.apply_edits(model, tok, facts(2, i), method="encore", **opts) for i in (0, 2)]
    assert sets[1].config["norm_anchor"] == "previous"
    assert len(seen) == 4 and all(d is None for d in seen)  # two layers, two calls
    assert all(not d.dense and d.rank <= 2 for es in sets for d in es.deltas.values())
    assert any(not torch.equal(weights(model)[k], v) for k, v in pristine.items())
    hf_knowedit.revert_edits(model)
    assert all(torch.equal(weights(model)[k], v) for k, v in pristine.items())
    with pytest.raises(InvalidConfigError, match="norm_anchor"):
        hf_knowedit.apply_edits(model, tok, facts(1), method="encore", norm_anchor="pristine", **opts)


def test_mpes_stops_when_the_new_object_is_the_arg_max():
    model, tok = tiny("llama")
    reqs = facts(3)
    layer = 2
    common = dict(site="residual", templates=["{}"], v_num_grad_steps=15, early_stop=0.0, v_lr=0.5)
    cfg = ENCOREConfig(**{k: v for k, v in FAST.items() if k in ("v_weight_decay", "clamp_norm_factor")})
    full = optimize_targets(model, tok, reqs, layer, cfg, most_probable_stop=False, **common)
    mpes = optimize_targets(model, tok, reqs, layer, cfg, **common)
    assert all(s < 14 for s in mpes.steps_taken) and all(s == 14 for s in full.steps_taken)
    spec = get_architecture(model)
    for r, z, init, steps in zip(reqs, mpes.targets, mpes.init, mpes.steps_taken):
        enc = encode_template(tok, r.prompt, r.subject)
        prompt_ids, target_ids = split_prompt_target(tok, enc.text, r.target_new)

        def top(delta):
            def add(module, args, output):
                h = hidden(output).clone()
                h[0, enc.subject_last] += delta
                return replace_hidden(output, h)

            handle = get_module(model, layer_path(spec, layer)).register_forward_hook(add)
            try:
                with torch.no_grad():
                    return int(model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].argmax())
            finally:
                handle.remove()

        assert len(target_ids) == 1 and top(z - init) == target_ids[0]  # stopped: the new object is top-1
        assert top(torch.zeros_like(init)) != target_ids[0] or steps == 0


def test_rls_update_is_the_least_squares_solution_of_the_whole_stream():
    g = torch.Generator().manual_seed(1)
    d_in, d_out, lam = 7, 4, 1.5
    X = torch.randn(d_in, 40, generator=g, dtype=torch.float64)
    C = X @ X.t() / 40
    K1, K2 = (
        torch.randn(d_in, 2, generator=g, dtype=torch.float64),
        torch.randn(d_in, 3, generator=g, dtype=torch.float64),
    )
    R1, R2 = (
        torch.randn(d_out, 2, generator=g, dtype=torch.float64),
        torch.randn(d_out, 3, generator=g, dtype=torch.float64),
    )
    P0 = torch.linalg.inv(lam * C)
    (B1, A1), P1 = rlsedit.rls_update(K1.t().float(), R1.t().float(), P0)
    (B2, A2), P2 = rlsedit.rls_update(K2.t().float(), R2.t().float(), P1)
    K1, K2, R1, R2 = (t.float().double() for t in (K1, K2, R1, R2))  # the float32 inputs the update saw
    assert torch.allclose(B1.double() @ A1.double(), R1 @ K1.t() @ torch.linalg.inv(lam * C + K1 @ K1.t()), atol=1e-5)
    both = lam * C + K1 @ K1.t() + K2 @ K2.t()
    assert torch.allclose(B2.double() @ A2.double(), R2 @ K2.t() @ torch.linalg.inv(both), atol=1e-5)
    assert torch.allclose(P2, torch.linalg.inv(both), atol=1e-9) and A2.shape == (3, d_in)


def test_sequential_rlsedit_carries_p_through_the_history(monkeypatch):
    model, tok = tiny("llama")
    calls = []
    real = rlsedit.rls_update

    def spy(keys, resid, P):
        out = real(keys, resid, P)
        calls.append((keys.double(), P.clone(), out[1].clone()))
        return out

    monkeypatch.setattr(rlsedit, "rls_update", spy)
    opts = dict(layers=[2], v_num_grad_steps=3, context_templates=0, **FAST)
    first = hf_knowedit.apply_edits(model, tok, facts(2), method="rlsedit", **opts)
    second = hf_knowedit.apply_edits(model, tok, facts(2, 4), method="rlsedit", **opts)
    (k1, p0, p1), (k2, p1_in, p2) = calls
    assert torch.equal(p1_in, p1)  # the second batch starts from the first one's P
    want = torch.linalg.inv(torch.linalg.inv(p0) + k1.t() @ k1 + k2.t() @ k2)
    assert torch.allclose(p2, want, rtol=1e-6, atol=1e-9 * float(want.abs().max()))
    history = hf_knowedit.stack.get_state(model).history[rlsedit.HISTORY_KEY]
    assert history.edits == 4 and all(torch.equal(v, p2) for v in history.P.values())
    assert not any(d.dense for es in (first, second) for d in es.deltas.values())  # rank n each
    rlsedit.reset_history(model)
    assert rlsedit.HISTORY_KEY not in hf_knowedit.stack.get_state(model).history


@pytest.mark.parametrize("method", ["memit", "rlsedit"])
def test_a_singular_second_moment_raises_and_leaves_the_model_as_it_was(method, monkeypatch):
    """RLSEdit's prior ``(λC)⁻¹`` goes through C's checked factor: on a C of half rank it raises
    :class:`SingularSystemError` as MEMIT does, instead of inverting rounding noise into a huge ``ΔW``."""
    from hf_knowedit.errors import SingularSystemError
    from hf_knowedit.methods import memit
    from hf_knowedit.moments import SecondMoment, identity_moment

    model, tok = tiny("llama")

    def singular(model, tokenizer, layer, config):
        eye = identity_moment(model, layer)
        X = torch.randn(eye.d_in, eye.d_in // 2, generator=torch.Generator().manual_seed(layer), dtype=torch.float64)
        return SecondMoment(X @ X.t() / X.shape[1], X.shape[1], dataclasses.replace(eye.key, corpus="half rank"))

    monkeypatch.setattr(memit, "second_moment_for", singular)
    before = weights(model)
    with pytest.raises(SingularSystemError):
        hf_knowedit.apply_edits(
            model, tok, facts(2), method=method, layers=[2], v_num_grad_steps=2, context_templates=0
        )
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert rlsedit.HISTORY_KEY not in hf_knowedit.stack.get_state(model).history
