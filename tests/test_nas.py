"""NAS (methods/nas.py) against a plain-torch transcription of the authors' formulas (SasyaTitech/NAS:
``NAS/compute_z.py`` and ``util/vstar_stats.py``): v* = v0 + δ, its upper-trimmed reference mean, the 2x drop
rule, z = (h − v0) + v*; the reference norm is measured once, on the original model."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import hf_knowedit
from hf_knowedit.architectures import get_architecture, get_module, layer_path
from hf_knowedit.errors import InvalidConfigError
from hf_knowedit.methods import nas
from hf_knowedit.methods.memit import MEMITConfig, block_output_at_subject, optimize_z
from hf_knowedit.methods.targets import optimize_targets
from hf_knowedit.stack import get_state
from hf_knowedit.tokens import encode_template

from .test_memit import FAST, context, facts, tiny

pytestmark = pytest.mark.usefixtures("one_thread", "stats_cache")

# -----------------------------------------------------------------------------
# the authors' formulas, transcribed


def authors_z(h: torch.Tensor, v0: torch.Tensor, delta: torch.Tensor, mean_norm: float) -> torch.Tensor:
    """One request's target as ``compute_z`` forms it after the optimisation."""
    res_pre_mlp = h - v0
    v_star = delta + v0
    if mean_norm > 0 and v_star.norm().item() > 2 * mean_norm:
        v_star = v0  # skipping delta
    elif mean_norm > 0:  # scale_vector_to_norm
        denom = v_star.norm() + 1e-10
        if denom > 1e-10:
            v_star = v_star * (float(mean_norm) / denom)
    return res_pre_mlp + v_star


def authors_trimmed_mean(values, upper_quantile=0.95) -> float:
    """``_upper_trimmed_mean``: sort, drop the ⌊(1 − q) n⌋ largest, mean of the rest."""
    arr = np.sort(np.asarray(list(values), dtype=np.float64))
    drop = int(np.floor((1.0 - upper_quantile) * arr.size))
    return float(arr.mean()) if drop <= 0 else float(arr[:-drop].mean())


# -----------------------------------------------------------------------------
# the formulas


def test_anchored_targets_are_the_authors_z_including_the_drop_rule():
    g = torch.Generator().manual_seed(0)
    n, d = 6, 16
    h, v0 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    spread = torch.linspace(0.1, 3.0, n, dtype=torch.float64)[:, None]
    delta = torch.randn(n, d, generator=g, dtype=torch.float64) * spread
    norms = (v0 + delta).norm(dim=1)
    ref = float(norms.median()) / 1.5  # some rows above 2ν, some below
    z, dropped = nas.anchored_targets(h + delta, h, v0, ref)
    want = torch.stack([authors_z(h[i], v0[i], delta[i], ref) for i in range(n)])
    assert torch.allclose(z, want, rtol=1e-9, atol=1e-9)
    assert dropped.tolist() == (norms > 2 * ref).tolist()
    assert 0 < int(dropped.sum()) < n  # both branches ran
    assert torch.allclose(z[dropped], h[dropped])  # dropped: z = h − v0 + v0
    kept = ~dropped
    assert torch.allclose((z - h + v0)[kept].norm(dim=1), torch.full((int(kept.sum()),), ref, dtype=torch.float64))
    # ν <= 0: z as optimised (the authors' guard)
    z0, dropped0 = nas.anchored_targets(h + delta, h, v0, 0.0)
    assert torch.equal(z0, h + delta) and not dropped0.any()


@pytest.mark.parametrize("n", [1, 5, 19, 20, 21, 1000])
def test_trimmed_mean_is_the_authors(n):
    values = torch.rand(n, generator=torch.Generator().manual_seed(n)).mul(10).tolist()
    assert nas.trimmed_mean(values) == pytest.approx(authors_trimmed_mean(values), rel=1e-12)
    if n >= 20:
        assert nas.trimmed_mean(values) < float(np.mean(values))  # the largest are left out
    with pytest.raises(ValueError):
        nas.trimmed_mean([1.0, math.nan])


# -----------------------------------------------------------------------------
# on tiny models


@pytest.mark.parametrize(
    "model_type, pre_mlp",
    [
        ("llama", "post_attention_layernorm"),
        ("gemma3_text", "pre_feedforward_layernorm"),
        ("opt", "final_layer_norm"),
        ("granite", "post_attention_layernorm"),  # v0: the MLP output times residual_multiplier
        ("falcon_h1", "pre_ff_layernorm"),  # v0: down_proj's output times mlp_multipliers[1]
        ("lfm2", "ffn_norm"),
        ("bamba", "pre_ff_layernorm"),
    ],
)
def test_v0_is_what_the_mlp_adds_to_the_residual_stream(model_type, pre_mlp):
    """``h − v0`` is the residual stream before the MLP: the input of the MLP's pre-norm (Gemma: v0 after the
    post-MLP norm; OPT: fc2's flattened output)."""
    model, tok = tiny(model_type)
    reqs = context(model, tok, facts(3)).requests
    layer = 2
    h = block_output_at_subject(model, tok, reqs, layer)
    v0 = nas.mlp_values(model, tok, reqs, layer)
    norm = get_module(model, f"{layer_path(get_architecture(model), layer)}.{pre_mlp}")
    stream = []
    for r in reqs:
        enc = encode_template(tok, r.prompt, r.subject)
        seen = {}
        handle = norm.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0].detach()))
        with torch.no_grad():
            model(input_ids=torch.tensor([enc.input_ids]))
        handle.remove()
        x = seen["x"].reshape(1, len(enc.input_ids), -1)
        stream.append(x[0, enc.subject_last].float())
    assert torch.allclose(h - v0, torch.stack(stream), atol=1e-5)


def test_nas_z_is_the_authors_formula_with_the_reference_of_the_first_call():
    model, tok = tiny("llama")
    reqs = facts(4)
    ctx = context(model, tok, reqs, nas=True)
    got = optimize_z(ctx, ctx.requests, 2, ["{}"])
    # the authors' pieces, computed independently: δ from the plain z optimisation, h, v0, ν
    plain = optimize_z(context(model, tok, reqs), ctx.requests, 2, ["{}"])
    h = block_output_at_subject(model, tok, ctx.requests, 2)
    v0 = nas.mlp_values(model, tok, ctx.requests, 2)
    delta = plain.double() - h.double()
    ref = authors_trimmed_mean((v0.double() + delta).norm(dim=1).tolist())  # first call: its own requests
    assert list(get_state(model).history[nas._MEM_KEY].values()) == [pytest.approx(ref, rel=1e-5)]
    want = torch.stack([authors_z(h[i].double(), v0[i].double(), delta[i], ref) for i in range(len(reqs))])
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # it really changed z


def test_the_drop_rule_leaves_h_for_requests_above_twice_the_reference():
    model, tok = tiny("llama")
    reqs = facts(4)
    ctx = context(model, tok, reqs, nas=True)
    plain = optimize_z(context(model, tok, reqs), ctx.requests, 2, ["{}"])
    h = block_output_at_subject(model, tok, ctx.requests, 2)
    v0 = nas.mlp_values(model, tok, ctx.requests, 2)
    norms = (v0 + plain - h).norm(dim=1).double()
    low, high = sorted(norms.tolist())[-2:]
    ref = (low + high) / 4  # only the largest ‖v*‖ is above 2ν
    memory = get_state(model).history.setdefault(nas._MEM_KEY, {})
    memory[nas.reference_key(model, 2, ctx.config, ctx.config.nas_reference_size)] = ref  # a fixed ν
    got = optimize_z(ctx, ctx.requests, 2, ["{}"])
    top = int(norms.argmax())
    assert torch.allclose(got[top], h[top], atol=1e-5)  # δ dropped: z = h
    for i in range(len(reqs)):
        if i != top:
            assert float((got[i] - h[i] + v0[i]).norm()) == pytest.approx(ref, rel=1e-5)


def test_the_reference_is_measured_once_on_the_original_model(monkeypatch):
    model, tok = tiny("llama")
    original = copy.deepcopy(model)
    earlier, reqs = facts(3, offset=6), facts(5)
    cfg = MEMITConfig(**FAST, nas=True)
    want = nas.reference_norm(original, tok, context(original, tok, reqs).requests, 3, cfg)

    hf_knowedit.apply_edits(model, tok, earlier, method="memit", layers=[2, 3], **FAST)  # merged, not NAS
    edited = context(model, tok, reqs)
    assert not torch.allclose(  # the edit changed what ν is measured from
        block_output_at_subject(model, tok, edited.requests, 3),
        block_output_at_subject(original, tok, edited.requests, 3),
    )
    calls = []
    monkeypatch.setattr(nas, "optimize_targets", lambda *a, **k: calls.append(1) or optimize_targets(*a, **k))
    hf_knowedit.apply_edits(model, tok, reqs, method="memit", layers=[2, 3], nas=True, **FAST)
    memory = get_state(model).history[nas._MEM_KEY]
    assert list(memory.values()) == [pytest.approx(want, rel=1e-6)]
    assert len(calls) == 1
    # a later NAS call (another batch, the model edited twice now) reuses ν
    es = hf_knowedit.apply_edits(
        model,
        tok,
        facts(3, offset=12),
        method="alphaedit",
        layers=[2, 3],
        nas=True,
        **{k: v for k, v in FAST.items() if k != "mom2_update_weight"},
    )
    assert len(calls) == 1 and list(memory.values()) == [pytest.approx(want, rel=1e-6)]
    assert es.config["nas"] is True


def test_nas_and_z_to_hidden_norm_exclude_each_other():
    with pytest.raises(InvalidConfigError, match="choose one"):
        MEMITConfig(nas=True, z_to_hidden_norm=True)
    with pytest.raises(InvalidConfigError):
        MEMITConfig(nas_reference_size=0)
