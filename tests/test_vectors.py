"""Keys k* and the v*/z optimisation: values, batched == serial, fast == full forward, frozen early stops."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from hf_knowedit.architectures import ARCHITECTURES, get_architecture, get_module, layer_path, mlp_out_path
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
    calls = {"block0": 0, "block3": [], "head_rows": []}
    get_module(model, "model.layers.0").register_forward_hook(
        lambda *a: calls.__setitem__("block0", calls["block0"] + 1)
    )
    get_module(model, "model.layers.3").register_forward_hook(lambda m, a, o: calls["block3"].append(hidden(o).shape))
    get_module(model, "lm_head").register_forward_hook(
        lambda m, a, o: calls["head_rows"].append(a[0].shape[:-1].numel())
    )
    kw = dict(templates=TEMPLATES, v_num_grad_steps=5, early_stop=0.0)
    res = optimize_targets(model, tok, REQUESTS[:1], 2, **kw)
    # one recording pass over every position, then 5 steps from the subject's last token on
    enc = [encode_template(tok, t.replace("{}", REQUESTS[0].prompt), REQUESTS[0].subject) for t in TEMPLATES]
    enc.append(encode_template(tok, "{} is a", REQUESTS[0].subject))
    target_len = len(tok(" Paris", add_special_tokens=False)["input_ids"])  # teacher forcing: all but the last
    lengths = [len(e.input_ids) + target_len - 1 for e in enc[:-1]] + [len(enc[-1].input_ids)]
    after_subject = max(n - e.subject_last for n, e in zip(lengths, enc))
    assert calls["block0"] == 1 and len(calls["block3"]) == 6
    assert calls["block3"][0][:2] == (4, max(lengths)) and all(s[:2] == (4, after_subject) for s in calls["block3"][1:])
    assert res.step_work == {
        "full": 4 * max(lengths) * 4,
        "replayed": 4 * max(lengths) * 2,
        "cached": 4 * after_subject * 2,
    }
    assert res.work_left() == pytest.approx(after_subject / max(lengths) / 2)
    n_targets = 3 * 1 + 1  # one target token per rewriting prompt + one essence position
    assert calls["head_rows"] == [n_targets] * 5
    calls.update(block0=0, block3=[], head_rows=[])
    optimize_targets(model, tok, REQUESTS[:1], 2, prefix_cache=False, **kw)
    assert calls["block0"] == 1 and [s[1] for s in calls["block3"]] == [max(lengths)] * 5
    calls.update(block0=0, block3=[], head_rows=[])
    optimize_targets(model, tok, REQUESTS[:1], 2, fast=False, **kw)
    assert calls["block0"] == 5 and calls["head_rows"][0] > n_targets


# model type -> how its steps skip the prefix: each row from its own subject on, every row from the
# earliest subject on (GPT-Neo's local attention; Bloom takes no position ids), or not at all
# (Mistral's sliding-window cache layers)
PREFIX_MODES = {"llama": "rows", "gpt2": "rows", "gpt_neox": "rows", "gemma": "rows", "opt": "rows"}
PREFIX_MODES |= {"gpt_neo": "common", "bloom": "common", "mistral": "off"}
# the hybrid stacks' caches hold recurrent / convolution state: the table turns the prefix cache off
PREFIX_MODES |= {"falcon_h1": "off", "lfm2": "off", "bamba": "off"}
# GPT-OSS: sliding-window cache layers (as Mistral's), beside full-attention ones
PREFIX_MODES |= {"gpt_oss": "off"}


@pytest.mark.parametrize("model_type", list(PREFIX_MODES))
def test_prefix_cache_gives_the_targets_of_every_position(model_type):
    """Steps from the subject's last token on, on cached keys / values of the positions before it, give
    today's v* / z (every position, lower blocks replayed) and the whole model's, batched, chunked and
    serial, and the work they report skipping is the work skipped."""
    model, tok = make_tiny_model(model_type)
    before = snapshot(model)
    n_layers = 4
    for layer, site in ((0, "residual"), (2, "mlp")):
        kw = dict(site=site, templates=TEMPLATES, v_num_grad_steps=6, **FREE)
        cached = optimize_targets(model, tok, REQUESTS, layer, **kw)
        today = optimize_targets(model, tok, REQUESTS, layer, prefix_cache=False, **kw)
        full = optimize_targets(model, tok, REQUESTS, layer, fast=False, **kw)
        chunked = optimize_targets(model, tok, REQUESTS, layer, batch_tokens=40, **kw)
        serial = optimize_targets(model, tok, REQUESTS, layer, batched=False, **kw)
        assert cached.deltas.norm(dim=1).min() > 0
        for other in (today, full, chunked, serial):
            torch.testing.assert_close(other.init, cached.init, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(other.targets, cached.targets, rtol=1e-4, atol=1e-5)
            assert other.steps_taken == cached.steps_taken == [5, 5, 5]
        work = cached.step_work
        assert today.step_work["cached"] == today.step_work["replayed"] == work["replayed"]
        assert work["replayed"] * n_layers == work["full"] * (n_layers - layer)
        mode, one = PREFIX_MODES[model_type], serial.step_work  # serial: "Italy" is the 5th token of "{}"
        assert (work["cached"] < work["replayed"]) == (mode == "rows")  # "Apple" starts "{} was founded by"
        assert (one["cached"] < one["replayed"]) == (mode != "off")
    assert_untouched(model, before)


@pytest.mark.parametrize("model_type", ["falcon_h1", "lfm2", "bamba"])
def test_a_cache_with_recurrent_state_is_never_cut(model_type, monkeypatch, caplog):
    """The hybrid stacks' rows say prefix_cache="off" (logged); a row that asked for the cache anyway would
    still run every position, since their caches are not plain key / value caches (logged too)."""
    model, tok = make_tiny_model(model_type)
    kw = dict(site="mlp", templates=TEMPLATES, v_num_grad_steps=3, **FREE)
    spec = get_architecture(model)
    assert spec.prefix_cache == "off"
    with caplog.at_level(logging.DEBUG, logger="hf_knowedit.methods.targets"):
        off = optimize_targets(model, tok, REQUESTS, 2, **kw)
    assert "prefix_cache='off'" in caplog.text
    caplog.clear()
    monkeypatch.setitem(ARCHITECTURES, model_type, dataclasses.replace(spec, prefix_cache="rows"))
    with caplog.at_level(logging.DEBUG, logger="hf_knowedit.methods.targets"):
        asked = optimize_targets(model, tok, REQUESTS, 2, **kw)
    assert "not a plain DynamicCache" in caplog.text
    for result in (off, asked):
        assert result.step_work["cached"] == result.step_work["replayed"]
    torch.testing.assert_close(asked.targets, off.targets, rtol=0, atol=0)


def test_prefix_cache_gives_the_same_rome_and_memit_updates(monkeypatch):
    """The final updates, not only v* / z: ROME's rank-one factors and MEMIT's layer deltas."""
    import functools

    import hf_knowedit
    from hf_knowedit.methods import memit
    from hf_knowedit.methods.rome import ROMEConfig, rank_one_update
    from hf_knowedit.moments import identity_moment

    model, tok = make_tiny_model("llama")
    config = ROMEConfig(v_num_grad_steps=6, **FREE)
    ones = [
        rank_one_update(model, tok, REQUESTS[1], 1, config, identity_moment(model, 1), TEMPLATES, fast=f)
        for f in (True, False)
    ]
    torch.testing.assert_close(ones[0].A, ones[1].A, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ones[0].B, ones[1].B, rtol=1e-4, atol=1e-5)
    kw = dict(method="memit", layers=[1, 2], mom2="identity", context_templates=0, v_num_grad_steps=6, **FREE)
    cached = hf_knowedit.apply_edits(model, tok, REQUESTS, **kw)
    monkeypatch.setattr(memit, "optimize_targets", functools.partial(optimize_targets, prefix_cache=False))
    today = hf_knowedit.apply_edits(*make_tiny_model("llama"), REQUESTS, **kw)
    assert set(cached.deltas) == set(today.deltas) and len(cached.deltas) == 2
    for path, delta in cached.deltas.items():
        torch.testing.assert_close(delta.delta(), today.deltas[path].delta(), rtol=1e-4, atol=1e-6)


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


def test_prefix_cache_stays_within_its_memory_limit(monkeypatch, caplog):
    """Chunks whose cached prefixes would pass PREFIX_CACHE_BYTES run every position: same targets."""
    from hf_knowedit.methods import targets

    model, tok = make_tiny_model("llama")
    kw = dict(templates=TEMPLATES, v_num_grad_steps=4, batch_tokens=40, **FREE)
    whole = optimize_targets(model, tok, REQUESTS, 2, **kw)
    # the first of three chunks (4 rows, 17 prefix positions; 4 layers x keys and values x 2 heads x 8 dims
    # x 4 bytes) fits, the second (11 positions) no longer does
    first, second = 4 * 17 * 4 * 2 * 2 * 8 * 4, 4 * 11 * 4 * 2 * 2 * 8 * 4
    monkeypatch.setattr(targets, "PREFIX_CACHE_BYTES", first + second // 2)
    with caplog.at_level("INFO", logger="hf_knowedit.methods.targets"):
        limited = optimize_targets(model, tok, REQUESTS, 2, **kw)
    assert "PREFIX_CACHE_BYTES" in caplog.text
    assert whole.step_work["cached"] < limited.step_work["cached"] < limited.step_work["replayed"]
    torch.testing.assert_close(limited.targets, whole.targets, rtol=1e-4, atol=1e-5)
