"""Editing mixture-of-experts blocks (:mod:`hf_knowedit.experts`, the table's MoE rows) beyond the behaviour
matrix: the routed key is what the experts compute on, its second moment is taken over tokens as they are
routed, one-layer MEMIT lands a block's output on its target through the routed experts (``mlp_out_layout=
"experts"``) and through a gated shared expert (``mlp_out_gate``), ROME rewrites the routed experts, and an
edit leaves the routing of its own layer and the layers before it exactly as it was."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hf_knowedit
from hf_knowedit import ROMEConfig
from hf_knowedit.architectures import (
    ARCHITECTURES,
    EXPERT_LAYOUTS,
    get_architecture,
    get_module,
    mlp_out_path,
    to_param,
)
from hf_knowedit.errors import UnsupportedArchitectureError
from hf_knowedit.evaluation.routing import routing_change, routing_snapshot
from hf_knowedit.experts import module_key, routed_keys
from hf_knowedit.hooks import Trace, module_hook
from hf_knowedit.methods.keys import output_at_subject
from hf_knowedit.methods.rome import rank_one_update
from hf_knowedit.methods.statistics import compute_second_moment, second_moment_for
from hf_knowedit.requests import EditRequest
from tests.test_scaled_models import memit_miss, one_layer_target
from tests.tiny_models import TINY_ROUTED_MOE, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread", "stats_cache")

TEXTS = ["The Eiffel Tower is located in Paris.", "Toyota is a car company headquartered in Japan."]


def _routed_inputs(model, layer, text, tok):
    spec = get_architecture(model)
    with Trace(model, mlp_out_path(spec, layer), retain_input=True, retain_output=True) as tr, torch.no_grad():
        model(**tok(text, return_tensors="pt"))
    return tr


def test_routed_keys_are_zero_outside_the_routed_experts_and_weighted_inside():
    model, tok = make_tiny_model("mixtral")
    experts = get_module(model, mlp_out_path(get_architecture(model), 1))
    tr = _routed_inputs(model, 1, TEXTS[0], tok)
    hidden, index, weights = tr.args
    keys = routed_keys(experts, hidden, index, weights).reshape(hidden.shape[0], 4, -1)
    for t in range(hidden.shape[0]):
        for e in range(4):
            gate, up = torch.nn.functional.linear(hidden[t], experts.gate_up_proj[e]).chunk(2)
            own = experts.act_fn(gate) * up
            routed = (index[t] == e).nonzero()
            want = weights[t, routed[0, 0]] * own if len(routed) else torch.zeros_like(own)
            torch.testing.assert_close(keys[t, e], want.float(), rtol=1e-5, atol=1e-7)


def test_routed_keys_of_transposed_experts_with_biases_are_gpt_oss_clamped_swiglu():
    """GPT-OSS (``experts_t``): ``k_e = (clamp(u, ±L) + 1) · g · σ(α g)``, ``g = min(x G_e + c_e, L)`` on the even
    columns of ``gate_up_proj [E, d, 2I]`` plus its bias, ``u`` on the odd ones."""
    model, tok = make_tiny_model("gpt_oss")
    experts = get_module(model, mlp_out_path(get_architecture(model), 1))
    hidden, index, weights = _routed_inputs(model, 1, TEXTS[0], tok).args
    keys = module_key("experts_t", experts, (hidden, index, weights)).reshape(hidden.shape[0], 4, -1)
    alpha, limit = model.config.swiglu_alpha, model.config.swiglu_limit
    assert experts.gate_up_proj_bias.abs().min() > 0
    for t in range(hidden.shape[0]):
        for e in range(4):
            proj = hidden[t] @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
            gate, up = proj[0::2].clamp(max=limit), proj[1::2].clamp(-limit, limit)
            own = (up + 1) * gate * torch.sigmoid(alpha * gate)
            routed = (index[t] == e).nonzero()
            want = weights[t, routed[0, 0]] * own if len(routed) else torch.zeros_like(own)
            torch.testing.assert_close(keys[t, e], want.float(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_rome_writes_v_star_at_the_routed_key(model_type):
    """One template, so ``k*`` is the prompt's routed key: after r-ROME's update the experts output ``v*`` at the
    subject's last token. GPT-OSS's output there also holds its experts' down biases ``Σ g_e b_e``, which the
    update must leave out of ``Λ = (v* − W κ − Σ g_e b_e) / (uᵀ κ)``."""
    model, tok = make_tiny_model(model_type)
    spec = get_architecture(model)
    path = mlp_out_path(spec, 1)
    config = ROMEConfig(mom2="identity", v_weight_decay=0.0, clamp_norm_factor=1e4)
    request = EditRequest("{} is located in", "Eiffel Tower", "Rome", "Paris")
    update = rank_one_update(model, tok, request, 1, config, second_moment_for(model, tok, 1, config), ["{}"])
    hook = module_hook(model, path, spec.mlp_out_layout, [(update.B, update.A)])
    handle = get_module(model, path).register_forward_hook(hook)
    try:
        out = output_at_subject(model, tok, [request], path)[0]
    finally:
        handle.remove()
    assert (update.v_star - output_at_subject(model, tok, [request], path)[0]).norm() > 0.01
    torch.testing.assert_close(out, update.v_star, rtol=1e-4, atol=1e-5)


def test_an_experts_module_called_with_keywords_is_refused():
    model, _ = make_tiny_model("mixtral")
    experts = get_module(model, mlp_out_path(get_architecture(model), 1))
    with pytest.raises(UnsupportedArchitectureError, match="positionally"):
        module_key("experts", experts, (torch.zeros(2, 32),))


def test_the_second_moment_of_routed_experts_is_over_tokens_as_routed():
    model, tok = make_tiny_model("qwen3_moe")
    experts = get_module(model, mlp_out_path(get_architecture(model), 2))
    moment = compute_second_moment(model, tok, 2, corpus=TEXTS, n_tokens=10_000, dtype=torch.float64, cache=False)
    rows = []
    for text in TEXTS:
        tr = _routed_inputs(model, 2, text, tok)
        rows.append(routed_keys(experts, *tr.args).double())
    keys = torch.cat(rows)
    assert moment.n_tokens == keys.shape[0]
    torch.testing.assert_close(moment.matrix.double(), keys.T @ keys / keys.shape[0], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_one_layer_memit_through_routed_experts_lands_on_its_target(model_type, monkeypatch):
    """The routed experts add ``Σ g_e W_e k_e = W κ`` at the subject's last token: a MEMIT update of ``W``
    on the key ``κ`` moves the block output to ``z`` (the routing of that layer does not move)."""
    model, tok = make_tiny_model(model_type)
    z, change = one_layer_target(model, tok, 1, monkeypatch)
    assert memit_miss(model, tok, 1, z, change) < 0.01


def test_one_layer_memit_through_a_gated_shared_expert_lands_on_its_target(monkeypatch):
    """Qwen2-MoE adds ``sigmoid(gate(x)) · shared_expert(x)``: MEMIT divides its target by that gate."""
    model, tok = make_tiny_model("qwen2_moe")
    spec = get_architecture(model)
    assert spec.mlp_out_gate is not None
    z, change = one_layer_target(model, tok, 1, monkeypatch)
    assert memit_miss(model, tok, 1, z, change) < 0.01
    # without the table's gate the block moves only by the gate's share (a sigmoid: well short of the target)
    monkeypatch.setitem(ARCHITECTURES, "qwen2_moe", dataclasses.replace(spec, mlp_out_gate=None))
    assert memit_miss(model, tok, 1, z, change) > 0.1


@pytest.mark.parametrize("model_type", TINY_ROUTED_MOE)
def test_rome_rewrites_only_the_routed_experts_and_keeps_the_routing_up_to_its_layer(model_type):
    model, tok = make_tiny_model(model_type)
    spec = get_architecture(model)
    down_proj = get_module(model, mlp_out_path(spec, 1)).down_proj.detach().clone()
    before = routing_snapshot(model, tok, TEXTS)
    request = EditRequest("{} is located in", "Eiffel Tower", "Rome", "Paris")
    es = hf_knowedit.apply_edits(
        model, tok, [request], method="rome", layers=[1], config=dict(mom2="identity", context_templates=0)
    )
    path = mlp_out_path(spec, 1)
    assert list(es.deltas) == [path] and es.layouts[path] == spec.mlp_out_layout in EXPERT_LAYOUTS
    d = es.deltas[path]
    assert d.rank == 1 and d.shape == (32, 4 * 48)
    # the update lives in the experts the subject's last token is routed to (one prompt, identity statistics)
    per_expert = d.delta().reshape(32, 4, 48).norm(dim=(0, 2))
    assert int((per_expert > 0).sum()) == model.config.num_experts_per_tok
    # the update is the change of the experts' down_proj, in the parameter's own arrangement; nothing else moved
    delta = to_param(d.delta(), spec.mlp_out_layout, get_module(model, path).down_proj.shape)
    hf_knowedit.merge_edits(model)
    torch.testing.assert_close(get_module(model, path).down_proj - delta, down_proj, rtol=0, atol=1e-6)
    after = routing_snapshot(model, tok, TEXTS)
    change = routing_change(before, after)
    assert change.per_layer[0] == change.per_layer[1] == 0.0  # routers and their inputs up to layer 1 unchanged
    hf_knowedit.revert_edits(model)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_a_deep_copy_of_a_hooked_routed_experts_edit_reads_its_own_experts(model_type):
    """The hook of a routed-experts edit set computes keys with the experts' ``gate_up_proj``; in a deep copy it
    must read the copy's parameters, so that the copy is independent of the original."""
    import copy

    model, tok = make_tiny_model(model_type)
    request = EditRequest("{} is located in", "Eiffel Tower", "Rome", "Paris")
    hf_knowedit.apply_edits(
        model,
        tok,
        [request],
        method="rome",
        layers=[1],
        config=dict(mom2="identity", context_templates=0),
        merge=False,
    )
    twin = copy.deepcopy(model)
    ids = tok(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        edited = twin(**ids).logits
        experts = get_module(model, mlp_out_path(get_architecture(model), 1))
        experts.gate_up_proj.mul_(0.5)  # the original's experts change; the copy's must not notice
        assert torch.equal(twin(**ids).logits, edited)
