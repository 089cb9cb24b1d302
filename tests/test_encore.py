"""ENCORE against transcriptions of its authors' code (SasyaTitech/NAS ``baselines/encore``):

* ``encore_main.execute_encore``: each layer solves with ``Σ K_p K_pᵀ`` of the earlier batches
  (``SEQ_CACHE``, ``add_prev_edits``) added to ``λC + η I``;
* ``compute_z``: MPES by ``prob_cutoff`` (count the steps at which the new object is top-1 at every
  rewriting prompt but the bare one; or a mean-probability threshold);
* ``hparams/ENCORE/{gpt2-xl,Llama3-8B}.json`` through ``ENCOREConfig.from_reference``.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

import hf_knowedit
from hf_knowedit.architectures import get_architecture, get_module, layer_path, mlp_out_path
from hf_knowedit.errors import InvalidConfigError, KnowEditError
from hf_knowedit.hooks import hidden, replace_hidden
from hf_knowedit.methods import encore
from hf_knowedit.methods import targets as targets_module
from hf_knowedit.methods.encore import ENCOREConfig
from hf_knowedit.methods.keys import prefixed
from hf_knowedit.methods.targets import optimize_targets
from hf_knowedit.tokens import encode_template, split_prompt_target

from .test_memit import FAST, facts, tiny

pytestmark = pytest.mark.usefixtures("one_thread", "stats_cache")

LAYERS = [1, 2]
OPTS = dict(layers=LAYERS, v_num_grad_steps=3, context_templates=0, **FAST)


# -----------------------------------------------------------------------------
# transcriptions of the authors' code


def authors_layer_update(layer_ks, targets, cov, mom2_update_weight, update_norm_lambda, seq_cache):
    """``execute_encore``'s update of one layer, transcribed (``layer_ks [d_in, n]``, ``targets [d_out, n]``
    already divided by the layers left; ``seq_cache`` = ``SEQ_CACHE[layer]`` before this call, or None)."""
    layer_ks, targets, cov = layer_ks.double(), targets.double(), cov.double()
    if mom2_update_weight != 1:
        cov = cov * mom2_update_weight
    if update_norm_lambda != 0:
        cov = cov + update_norm_lambda * torch.eye(cov.shape[0], dtype=cov.dtype)
    if seq_cache is not None:  # add_prev_edits
        cov = cov + seq_cache
    adj_k = torch.linalg.solve(cov + layer_ks @ layer_ks.T, layer_ks)
    return targets @ adj_k.T


def authors_stop_step(correct, probs, prob_cutoff, n_steps):
    """``compute_z``'s loop, transcribed: the step at which it breaks (= Adam steps taken). ``correct[it][j]``:
    the new object is the arg-max at rewriting prompt ``j`` after ``it`` steps (prompt 0 is the bare ``"{}"``
    one); ``probs[it][j]``: its probability there. ``loss < 5e-2`` is left out (``early_stop=0`` here)."""
    correct_counter = 0
    for it in range(n_steps):
        num_correct = sum(correct[it][1:])  # prompt_prob = log_probs[1:]: the bare prompt is not checked
        if prob_cutoff < 0 and num_correct == len(correct[it]) - 1:
            correct_counter += 1
            if correct_counter == abs(prob_cutoff):
                return it
        if prob_cutoff > 0 and sum(probs[it]) / len(probs[it]) > prob_cutoff:
            return it
        if it == n_steps - 1:
            return it


def spy_solver(monkeypatch):
    """Record every ``encore_update`` call's arguments (per layer, in call order)."""
    calls = []
    real = encore.encore_update

    def spy(keys, resid, cov, lam, alpha, drift, *args, **kwargs):
        calls.append(dict(keys=keys.clone(), resid=resid.clone(), cov=cov.clone(), lam=lam, alpha=alpha))
        return real(keys, resid, cov, lam, alpha, drift, *args, **kwargs)

    monkeypatch.setattr(encore, "encore_update", spy)
    return calls


def delta_of(es, model, layer):
    return es.deltas[mlp_out_path(get_architecture(model), layer)].delta().double()


# -----------------------------------------------------------------------------
# the closed form with the earlier batches' keys


def test_second_call_solves_with_the_first_calls_keys(monkeypatch):
    model, tok = tiny("llama")
    calls = spy_solver(monkeypatch)
    first = hf_knowedit.apply_edits(model, tok, facts(2), method="encore", **OPTS)
    second = hf_knowedit.apply_edits(model, tok, facts(2, 2), method="encore", **OPTS)
    assert len(calls) == 4
    seq_cache = {}
    for es, layer_calls in ((first, calls[:2]), (second, calls[2:])):
        for layer, c in zip(LAYERS, layer_calls):
            # α is relative: norm_weight · λ · tr(C) / d_in (the authors' update_norm_lambda is absolute)
            assert c["alpha"] == pytest.approx(0.1 * c["lam"] * float(torch.diagonal(c["cov"].double()).mean()))
            K, R = c["keys"].t(), c["resid"].t()
            want = authors_layer_update(K, R, c["cov"], c["lam"], c["alpha"], seq_cache.get(layer))
            assert torch.allclose(delta_of(es, model, layer), want, atol=1e-5, rtol=1e-4)
            if es is second:  # the first batch's keys really changed the update
                alone = authors_layer_update(K, R, c["cov"], c["lam"], c["alpha"], None)
                assert (want - alone).norm() > 0.05 * want.norm()
        for layer, c in zip(LAYERS, layer_calls):  # SEQ_CACHE[layer] += layer_ks @ layer_ks.T
            K = c["keys"].double().t()
            seq_cache[layer] = seq_cache.get(layer, 0) + K @ K.T
    assert encore.history_size(model) == 4
    for layer, c in zip(LAYERS, calls[2:]):  # each set carries its own keys
        torch.testing.assert_close(second.state[f"encore.keys.{layer}"], c["keys"].float())
        torch.testing.assert_close(encore.get_history(model).prior[layer], seq_cache[layer])


def test_without_add_prev_edits_each_call_stands_alone_but_the_keys_are_kept(monkeypatch):
    model, tok = tiny("llama")
    calls = spy_solver(monkeypatch)
    hf_knowedit.apply_edits(model, tok, facts(2), method="encore", add_prev_edits=False, **OPTS)
    second = hf_knowedit.apply_edits(model, tok, facts(2, 2), method="encore", add_prev_edits=False, **OPTS)
    for layer, c in zip(LAYERS, calls[2:]):
        want = authors_layer_update(c["keys"].t(), c["resid"].t(), c["cov"], c["lam"], c["alpha"], None)
        assert torch.allclose(delta_of(second, model, layer), want, atol=1e-5, rtol=1e-4)
    assert encore.history_size(model) == 4  # the authors' cache grows either way


def test_each_chunk_of_a_call_counts_as_an_earlier_batch_for_the_next(monkeypatch):
    model, tok = tiny("llama")
    calls = spy_solver(monkeypatch)
    es = hf_knowedit.apply_edits(model, tok, facts(4), method="encore", chunk=True, max_batch=2, **OPTS)
    assert len(calls) == 4  # two chunks, two layers
    for layer, first, c in zip(LAYERS, calls[:2], calls[2:]):
        K1 = first["keys"].double().t()
        want = authors_layer_update(c["keys"].t(), c["resid"].t(), c["cov"], c["lam"], c["alpha"], K1 @ K1.T)
        # ΔW of the set = chunk 1's update + chunk 2's
        first_update = authors_layer_update(K1, first["resid"].t(), first["cov"], first["lam"], first["alpha"], None)
        assert torch.allclose(delta_of(es, model, layer), first_update + want, atol=1e-5, rtol=1e-4)
    assert encore.history_size(model) == 4


def test_absolute_update_norm_lambda_is_the_authors_eta(monkeypatch):
    model, tok = tiny("llama")
    calls = spy_solver(monkeypatch)
    es = hf_knowedit.apply_edits(model, tok, facts(2), method="encore", update_norm_lambda=0.5, **OPTS)
    for layer, c in zip(LAYERS, calls):
        assert c["alpha"] == 0.5 and c["lam"] == FAST["mom2_update_weight"]
        want = authors_layer_update(c["keys"].t(), c["resid"].t(), c["cov"], c["lam"], 0.5, None)
        assert torch.allclose(delta_of(es, model, layer), want, atol=1e-5, rtol=1e-4)


def test_history_is_committed_with_the_set_kept_on_revert_and_reset_explicitly(monkeypatch, tmp_path):
    """As AlphaEdit's history: grows only when the set becomes active, survives revert, restores from saved
    sets, and reset_history starts a new stream."""
    model, tok = tiny("llama")
    hf_knowedit.attach(model, tok)
    first = model.apply_edits(facts(2), method="encore", name="b1", **OPTS)
    prior1 = {l: p.clone() for l, p in encore.get_history(model).prior.items()}
    with pytest.raises(KnowEditError, match="already active"):  # fails after computing: history untouched
        model.apply_edits(facts(2, 2), method="encore", name="b1", **OPTS)
    assert encore.history_size(model) == 2
    assert all(torch.equal(encore.get_history(model).prior[l], prior1[l]) for l in LAYERS)

    hf_knowedit.revert_edits(model)  # the keys stay: later batches still keep clear of them
    calls = spy_solver(monkeypatch)
    second = model.apply_edits(facts(2, 2), method="encore", name="b2", **OPTS)
    for layer, c in zip(LAYERS, calls):
        want = authors_layer_update(c["keys"].t(), c["resid"].t(), c["cov"], c["lam"], c["alpha"], prior1[layer])
        assert torch.allclose(delta_of(second, model, layer), want, atol=1e-5, rtol=1e-4)
    assert encore.history_size(model) == 4

    first.save_pretrained(tmp_path / "b1")
    second.save_pretrained(tmp_path / "b2")
    fresh, _ = tiny("llama")
    loaded = [hf_knowedit.EditSet.from_pretrained(tmp_path / d) for d in ("b1", "b2")]
    assert encore.restore_history(fresh, loaded) == 4
    for layer in LAYERS:
        torch.testing.assert_close(encore.get_history(fresh).prior[layer], encore.get_history(model).prior[layer])

    encore.reset_history(model)
    assert encore.history_size(model) == 0 and not encore.get_history(model).prior
    calls.clear()
    third = model.apply_edits(facts(2, 4), method="encore", name="b3", **OPTS)
    for layer, c in zip(LAYERS, calls):
        want = authors_layer_update(c["keys"].t(), c["resid"].t(), c["cov"], c["lam"], c["alpha"], None)
        assert torch.allclose(delta_of(third, model, layer), want, atol=1e-5, rtol=1e-4)


# -----------------------------------------------------------------------------
# MPES


TEMPLATES = ["{}", "Alpha beta. {}", "The gamma. {}", "I said. {}"]
MPES = dict(site="residual", templates=TEMPLATES, v_num_grad_steps=15, early_stop=0.0, v_lr=0.002)


def per_step_status(model, tok, reqs, layer, deltas):
    """``correct[i][it][j]`` and ``probs[i][it][j]`` for request ``i``, the ``δ`` of pass ``it`` and template
    ``j``, from plain forward passes with ``δ`` added at the subject's last token of block ``layer``."""
    spec = get_architecture(model)
    correct, probs = [], []
    for i, r in enumerate(reqs):
        c_i, p_i = [], []
        for delta in deltas:
            c_it, p_it = [], []
            for t in TEMPLATES:
                enc = encode_template(tok, prefixed(t, r), r.subject)
                prompt_ids, target_ids = split_prompt_target(tok, enc.text, r.target_new)
                assert len(target_ids) == 1

                def add(module, args, output, d=delta[i], at=enc.subject_last):
                    h = hidden(output).clone()
                    h[0, at] += d
                    return replace_hidden(output, h)

                handle = get_module(model, layer_path(spec, layer)).register_forward_hook(add)
                try:
                    with torch.no_grad():
                        logits = model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].double()
                finally:
                    handle.remove()
                c_it.append(int(logits.argmax()) == target_ids[0])
                p_it.append(float(torch.softmax(logits, -1)[target_ids[0]]))
            c_i.append(c_it)
            p_i.append(p_it)
        correct.append(c_i)
        probs.append(p_i)
    return correct, probs


@pytest.mark.parametrize("prob_cutoff", [None, -1, -3, 0.05])
def test_mpes_stops_where_the_authors_loop_breaks(prob_cutoff, monkeypatch):
    model, tok = tiny("llama")
    reqs, layer = facts(6), 2
    seen = []  # δ at every forward pass (one chunk: all requests)
    real = targets_module._Chunk.loss

    def record(self, delta, *args, **kwargs):
        seen.append(delta.detach().clone())
        return real(self, delta, *args, **kwargs)

    monkeypatch.setattr(targets_module._Chunk, "loss", record)
    given = {} if prob_cutoff is None else {"prob_cutoff": prob_cutoff}
    cfg = ENCOREConfig(v_weight_decay=1e-3, clamp_norm_factor=4.0, **given)
    prob_cutoff = -2 if prob_cutoff is None else prob_cutoff  # the default: the authors' Llama-3-8B setting
    res = optimize_targets(model, tok, reqs, layer, cfg, **MPES)
    correct, probs = per_step_status(model, tok, reqs, layer, seen)
    n = MPES["v_num_grad_steps"]
    for i in range(len(reqs)):
        pad = n - len(correct[i])  # passes not run (every request had stopped): never a stop
        want = authors_stop_step(
            correct[i] + [[False] * len(TEMPLATES)] * pad, probs[i] + [[0.0] * len(TEMPLATES)] * pad, prob_cutoff, n
        )
        assert res.steps_taken[i] == want, (i, correct[i])
    assert any(s < n - 1 for s in res.steps_taken)  # the rule did stop some requests early
    if prob_cutoff < 0:  # checking the bare prompt too would stop some request elsewhere
        with_bare = [
            authors_stop_step([[all(c)] * 2 for c in correct[i]], probs[i], prob_cutoff, len(correct[i]))
            for i in range(len(reqs))
        ]
        assert with_bare != res.steps_taken
    assert cfg.most_probable_stop and cfg.prob_cutoff == prob_cutoff


def test_mpes_counts_steps_past_the_first_top1():
    model, tok = tiny("llama")
    reqs = facts(6)
    steps = {
        c: optimize_targets(
            model, tok, reqs, 2, ENCOREConfig(v_weight_decay=1e-3, clamp_norm_factor=4.0, prob_cutoff=c), **MPES
        ).steps_taken
        for c in (-1, -2, -3)
    }
    assert all(a < b < c for a, b, c in zip(steps[-1], steps[-2], steps[-3]) if c < MPES["v_num_grad_steps"] - 1)
    assert any(a < b for a, b in zip(steps[-1], steps[-2]))


def test_prob_cutoff_is_validated():
    for bad in (0, -1.5, 1.0, 2, True, "-2", float("nan"), float("-inf")):
        with pytest.raises(InvalidConfigError, match="prob_cutoff"):
            ENCOREConfig(prob_cutoff=bad)
    assert ENCOREConfig(prob_cutoff=-4.0).prob_cutoff == -4.0 and ENCOREConfig(prob_cutoff=0.9).prob_cutoff == 0.9


# -----------------------------------------------------------------------------
# from_reference: the authors' hparams/ENCORE files (transcribed)

ENCORE_GPT2_XL_JSON = """{
    "model_name": "gpt2-xl",
    "layers": [13,14,15,16,17],
    "clamp_norm_factor": 0.75,
    "layer_selection": "all",
    "fact_token": "subject_last",
    "v_num_grad_steps": 20,
    "v_lr": 5e-1,
    "v_loss_layer": 47,
    "v_weight_decay": 0.5,
    "kl_factor": 0.0625,
    "mom2_adjustment": true,
    "mom2_update_weight": 20000,
    "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj",
    "layer_module_tmp": "transformer.h.{}",
    "mlp_module_tmp": "transformer.h.{}.mlp",
    "attn_module_tmp": "transformer.h.{}.attn",
    "ln_f_module": "transformer.ln_f",
    "lm_head_module": "transformer.wte",
    "mom2_dataset": "wikipedia",
    "mom2_n_samples": 100000,
    "mom2_dtype": "float32",
    "calculate_objective_value": false,
    "add_prev_edits": true,
    "update_norm_lambda": 10,
    "emmet_lambda": 0.1,
    "prob_cutoff":-4,
    "norm_control":0,
    "dynamic_multiplier": 5,
    "random_vector_preservation": false
}"""
ENCORE_LLAMA3_8B = dict(
    json.loads(ENCORE_GPT2_XL_JSON),
    model_name="Llama3-8B",
    layers=[4, 5, 6, 7, 8],
    v_num_grad_steps=25,
    v_loss_layer=31,
    mom2_update_weight=15000,
    rewrite_module_tmp="model.layers.{}.mlp.down_proj",
    update_norm_lambda=20,
    prob_cutoff=-2,
)


def test_from_reference_reads_the_authors_encore_files():
    ref = ENCOREConfig.from_reference(ENCORE_GPT2_XL_JSON)
    c = ref.config
    assert ref.layers == [13, 14, 15, 16, 17]
    assert (c.v_num_grad_steps, c.v_lr, c.v_weight_decay, c.kl_factor) == (20, 0.5, 0.5, 0.0625)
    assert c.clamp_norm_factor == 0.75
    assert (c.mom2, c.mom2_update_weight, c.mom2_dtype) == ("corpus", 20000, "float32")
    assert (c.add_prev_edits, c.update_norm_lambda, c.prob_cutoff, c.most_probable_stop) == (True, 10, -4, True)
    assert "no counterpart" in ref.ignored["emmet_lambda"]  # the reference ENCORE update does not read it
    assert {"norm_control", "dynamic_multiplier", "random_vector_preservation", "calculate_objective_value"} <= set(
        ref.ignored
    )
    assert {"prob_cutoff", "add_prev_edits", "update_norm_lambda"} <= set(ref.mapped)

    ref = ENCOREConfig.from_reference(ENCORE_LLAMA3_8B)
    c = ref.config
    assert ref.layers == [4, 5, 6, 7, 8]
    assert (c.v_num_grad_steps, c.mom2_update_weight, c.update_norm_lambda, c.prob_cutoff) == (25, 15000, 20, -2)

    off = ENCOREConfig.from_reference(dict(ENCORE_LLAMA3_8B, prob_cutoff=0)).config  # 0: no MPES
    assert off.most_probable_stop is False
    assert ENCOREConfig.from_reference(dict(ENCORE_LLAMA3_8B, add_prev_edits=False)).config.add_prev_edits is False


def test_a_reference_encore_config_edits_a_model():
    model, tok = tiny("llama")
    ref = ENCOREConfig.from_reference(ENCORE_LLAMA3_8B, mom2="identity", v_num_grad_steps=2, context_templates=0)
    es = hf_knowedit.apply_edits(model, tok, facts(1), "encore", config=ref.config, layers=LAYERS)
    assert es.config["update_norm_lambda"] == 20 and es.config["prob_cutoff"] == -2
    hf_knowedit.revert_edits(model)


def test_requests_mpes_stopped_are_not_warned_about(monkeypatch, caplog):
    """MPES stops above ``early_stop`` on purpose (the new object is top-1): no "will likely not take"
    warning for those requests, while one that ran out of steps is still named."""
    model, tok = tiny("llama")
    reqs = facts(3)

    def first_only(top1_steps, mean_prob, prob_cutoff):  # MPES stops request 0 at once, never the others
        return torch.arange(len(top1_steps)) == 0

    monkeypatch.setattr(targets_module, "mpes_stop", first_only)
    cfg = ENCOREConfig(v_weight_decay=1e-3, clamp_norm_factor=4.0)
    with caplog.at_level(logging.WARNING, logger="hf_knowedit.methods.targets"):
        optimize_targets(model, tok, reqs, 2, cfg, **{**MPES, "v_num_grad_steps": 2, "early_stop": 1e-9})
    warned = [r.getMessage() for r in caplog.records if "will likely not take" in r.getMessage()]
    assert not any(repr(reqs[0].text) in w for w in warned)
    assert any(repr(reqs[1].text) in w for w in warned)
