"""Keys k* and the v*/z optimisation: values, batched == serial, fast == full forward, frozen early stops."""

from __future__ import annotations

import pytest
import torch

from hf_knowedit.architectures import get_architecture, get_module, layer_path, mlp_out_path
from hf_knowedit.errors import InvalidConfigError, LayerOutOfRangeError
from hf_knowedit.hooks import Trace, hidden
from hf_knowedit.methods.keys import compute_keys
from hf_knowedit.methods.targets import optimize_targets
from hf_knowedit.requests import EditRequest
from hf_knowedit.tokens import encode_template
from tests.helpers import assert_untouched, snapshot
from tests.tiny_models import make_tiny_model

REQUESTS = [
    EditRequest("The capital city of {}", "Italy", "Paris"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
    EditRequest("{} was founded by", "Apple", "Bill Gates"),
]
TEMPLATES = ["{}", "The world is big. {}", "Who is the author? {}"]
# tiny random models have MLP outputs of norm ~0.01, which makes the reference regulariser
# (||δ|| / ||init||², clamp 4 ||init||) freeze δ; these settings let δ move
FREE = dict(v_weight_decay=0.0, clamp_norm_factor=1e4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_keys_are_module_inputs_at_the_subject_last_token(model_type):
    model, tok = make_tiny_model(model_type)
    path = mlp_out_path(get_architecture(model), 2)
    keys = compute_keys(model, tok, REQUESTS, 2, TEMPLATES, average=False)
    assert keys.shape == (3, 3, 96)
    for i, req in enumerate(REQUESTS):
        for j, t in enumerate(TEMPLATES):
            enc = encode_template(tok, t.replace("{}", req.prompt), req.subject)
            with torch.no_grad(), Trace(model, path, retain_input=True) as tr:
                model(input_ids=torch.tensor([enc.input_ids]))
            expected = tr.input.reshape(len(enc.input_ids), -1)[enc.subject_last]
            torch.testing.assert_close(keys[i, j], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compute_keys(model, tok, REQUESTS, 2, TEMPLATES), keys.mean(1))


@pytest.mark.parametrize(
    "model_type,site",
    [("llama", "mlp"), ("gpt2", "mlp"), ("opt", "mlp"), ("gemma2", "residual"), ("falcon", "residual")],
)
def test_batched_serial_chunked_and_full_forward_agree(model_type, site):
    model, tok = make_tiny_model(model_type)
    before = snapshot(model)
    kw = dict(site=site, templates=TEMPLATES, v_num_grad_steps=6, **FREE)
    batched = optimize_targets(model, tok, REQUESTS, 2, **kw)
    serial = optimize_targets(model, tok, REQUESTS, 2, batched=False, **kw)
    chunked = optimize_targets(model, tok, REQUESTS, 2, batch_tokens=40, **kw)
    full = optimize_targets(model, tok, REQUESTS, 2, fast=False, **kw)
    assert batched.targets.shape == (3, 32) and batched.deltas.norm(dim=1).min() > 0
    for other in (serial, chunked, full):
        torch.testing.assert_close(other.init, batched.init, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other.targets, batched.targets, rtol=1e-4, atol=1e-5)
        assert other.steps_taken == batched.steps_taken == [5, 5, 5]
    assert batched.losses[0] < optimize_targets(model, tok, REQUESTS[:1], 2, **dict(kw, v_num_grad_steps=1)).losses[0]
    # the model is exactly as before: weights, hooks, blocks
    assert_untouched(model, before)


def test_init_is_the_unedited_site_value():
    model, tok = make_tiny_model("llama")
    req = REQUESTS[1]
    enc = encode_template(tok, req.prompt, req.subject)
    for site, path in (
        ("mlp", mlp_out_path(get_architecture(model), 1)),
        ("residual", layer_path(get_architecture(model), 1)),
    ):
        res = optimize_targets(model, tok, [req], 1, site=site, templates=TEMPLATES, v_num_grad_steps=1)
        with torch.no_grad(), Trace(model, path) as tr:
            model(input_ids=torch.tensor([enc.input_ids]))
        torch.testing.assert_close(res.init[0], hidden(tr.output)[0, enc.subject_last], rtol=1e-5, atol=1e-6)
        assert torch.equal(res.targets, res.init)  # one pass, no update


def test_fast_path_runs_lower_blocks_once():
    model, tok = make_tiny_model("llama")
    calls = {"block0": 0, "block3": 0, "head_rows": []}
    get_module(model, "model.layers.0").register_forward_hook(
        lambda *a: calls.__setitem__("block0", calls["block0"] + 1)
    )
    get_module(model, "model.layers.3").register_forward_hook(
        lambda *a: calls.__setitem__("block3", calls["block3"] + 1)
    )
    get_module(model, "lm_head").register_forward_hook(
        lambda m, a, o: calls["head_rows"].append(a[0].shape[:-1].numel())
    )
    optimize_targets(model, tok, REQUESTS[:1], 2, templates=TEMPLATES, v_num_grad_steps=5, early_stop=0.0)
    assert calls["block0"] == 1 and calls["block3"] == 5
    n_targets = 3 * 1 + 1  # one target token per rewriting prompt + one essence position
    assert calls["head_rows"] == [n_targets] * 5
    calls.update(block0=0, block3=0, head_rows=[])
    optimize_targets(model, tok, REQUESTS[:1], 2, templates=TEMPLATES, v_num_grad_steps=5, early_stop=0.0, fast=False)
    assert calls["block0"] == 5 and calls["head_rows"][0] > n_targets


def test_early_stopped_requests_are_frozen_exactly():
    model, tok = make_tiny_model("llama")
    kw = dict(templates=TEMPLATES, v_num_grad_steps=12, **FREE)
    trace = []
    optimize_targets(model, tok, REQUESTS, 2, early_stop=0.0, progress=lambda it, l: trace.append(l.tolist()), **kw)
    # a threshold some requests cross before others
    per_request = list(zip(*trace))
    threshold = sorted(min(losses) for losses in per_request)[1] + 1e-4
    batched = optimize_targets(model, tok, REQUESTS, 2, early_stop=threshold, **kw)
    serial = optimize_targets(model, tok, REQUESTS, 2, early_stop=threshold, batched=False, **kw)
    assert batched.steps_taken == serial.steps_taken and len(set(batched.steps_taken)) > 1
    assert min(batched.steps_taken) < 11
    torch.testing.assert_close(batched.targets, serial.targets, rtol=1e-4, atol=1e-5)
    for i, steps in enumerate(batched.steps_taken):
        if steps < 11:
            assert batched.losses[i] < threshold


def test_bad_arguments():
    model, tok = make_tiny_model("llama")
    with pytest.raises(InvalidConfigError):
        optimize_targets(model, tok, REQUESTS, 1, site="attention", templates=TEMPLATES)
    with pytest.raises(InvalidConfigError):
        optimize_targets(model, tok, REQUESTS, 1, v_num_grad_steps=0, templates=TEMPLATES)
    with pytest.raises(InvalidConfigError):
        compute_keys(model, tok, REQUESTS, 1, [])
    with pytest.raises(LayerOutOfRangeError):
        optimize_targets(model, tok, REQUESTS, 4, templates=TEMPLATES)
    with pytest.raises(LayerOutOfRangeError):
        compute_keys(model, tok, REQUESTS, -1, TEMPLATES)


@pytest.mark.parametrize("model_type,site", [("llama", "mlp"), ("gpt2", "residual"), ("opt", "mlp")])
def test_reported_loss_is_the_objective_computed_by_hand(model_type, site, monkeypatch):
    """The loss optimize_targets reports equals the v*/z objective computed independently
    (tests/oracles.py: full forwards, δ added by a forward hook), at δ = 0 and at a fixed δ per request;
    with the KL and weight-decay terms off, on their own and together (the decay term dwarfs the others
    on tiny models, so each term is checked where it matters)."""
    import hf_knowedit.methods.targets as targets
    from tests.oracles import target_loss

    model, tok = make_tiny_model(model_type)
    requests = [EditRequest("The capital city of {}", "Italy", "Paris and Rome"), REQUESTS[1]]
    templates = TEMPLATES[:2]
    layer = 1
    assert len(tok(" Paris and Rome", add_special_tokens=False)["input_ids"]) > 1  # token averaging matters
    g = torch.Generator().manual_seed(0)
    fixed = torch.randn(len(requests), model.config.hidden_size, generator=g) * 0.5

    def set_delta(delta, grad, m, v, t, rows, lr, *args, **kwargs):  # the "Adam step" moves δ to `fixed`
        delta[rows] = fixed[rows]

    monkeypatch.setattr(targets, "_adam", set_delta)
    for kl_factor, weight_decay in ((0.0, 0.0), (50.0, 0.0), (0.7, 0.3)):
        kw = dict(
            site=site,
            templates=templates,
            kl_factor=kl_factor,
            v_weight_decay=weight_decay,
            early_stop=0.0,
            clamp_norm_factor=1e6,
        )
        for fast in (True, False):
            at_zero = targets.optimize_targets(model, tok, requests, layer, v_num_grad_steps=1, fast=fast, **kw)
            at_fixed = targets.optimize_targets(model, tok, requests, layer, v_num_grad_steps=2, fast=fast, **kw)
            torch.testing.assert_close(at_fixed.deltas, fixed)
            for i, r in enumerate(requests):
                args = (model, tok, r.prompt, r.subject, r.target_new, layer, site, templates)
                zero = target_loss(*args, torch.zeros_like(fixed[i]), kl_factor=kl_factor, weight_decay=weight_decay)
                want = target_loss(*args, fixed[i], kl_factor=kl_factor, weight_decay=weight_decay)
                assert zero["kl"] == pytest.approx(0.0, abs=1e-7) and zero["decay"] == 0.0
                assert want["kl"] > 1e-3 and abs(want["nll"] - zero["nll"]) > 1e-3  # δ moves every term
                where = dict(kl_factor=kl_factor, weight_decay=weight_decay, fast=fast, subject=r.subject)
                assert at_zero.losses[i] == pytest.approx(zero["loss"], rel=1e-5), where
                assert at_fixed.losses[i] == pytest.approx(want["loss"], rel=1e-5), (where, want)
