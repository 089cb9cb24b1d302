"""Models that scale their logits and residuals (Granite: ``logits_scaling``, ``residual_multiplier``,
``embedding_multiplier``; Command-R: ``logit_scale``; Falcon-H1: ``lm_head_multiplier``, ``mlp_multipliers``,
``embedding_multiplier`` and the multipliers inside its attention and Mamba2 mixers), beyond the table-wide checks of
``tests/test_architectures.py`` (``lm_logits`` against the model's logits, ``residual_scale`` against a
block's output): what the MEMIT family writes into ``mlp_out`` lands on its target, and causal tracing
corrupts the subject as much as on an unscaled model."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import hf_knowedit
from hf_knowedit.architectures import ARCHITECTURES, get_architecture, layer_path, lm_logits, residual_scale
from hf_knowedit.methods import memit
from hf_knowedit.requests import EditRequest
from hf_knowedit.tracing import trace_fact
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread", "stats_cache")

REQUEST = EditRequest("{} is located in", "Paris", "Rome", "France")


def block_output(model, tok, layer):
    """Block ``layer``'s output at the subject's last token of :data:`REQUEST`'s prompt."""
    spec = get_architecture(model)
    captured = {}

    def keep(module, args, output):  # returns None: the block's output is left as it is (a tuple or not)
        captured.setdefault("h", (output[0] if isinstance(output, tuple) else output).detach())

    handle = model.get_submodule(layer_path(spec, layer)).register_forward_hook(keep)
    text = REQUEST.prompt.format(REQUEST.subject)
    subject_last = len(tok(text[: len(REQUEST.subject)]).input_ids) - 1
    try:
        with torch.no_grad():
            model(**tok(text, return_tensors="pt"))
    finally:
        handle.remove()
    return captured["h"][0, subject_last]


def one_layer_target(model, tok, layer: int, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """A target ``z`` for block ``layer``'s output at :data:`REQUEST`'s subject, half its norm away, that MEMIT's
    z step is made to return; returns ``(z, change)``."""
    h0 = memit.block_output_at_subject(model, tok, [REQUEST], layer)
    change = 0.5 * h0.norm() * torch.randn(h0.shape, generator=torch.Generator().manual_seed(1)) / h0.shape[1] ** 0.5
    z = h0 + change
    monkeypatch.setattr(memit, "optimize_z", lambda ctx, requests, layer, templates: z.clone())
    return z, change


def memit_miss(model, tok, layer: int, z: torch.Tensor, change: torch.Tensor) -> float:
    """How far (relative to ``change``) a one-layer MEMIT edit of :data:`REQUEST` (C = I, tiny λ, so the key's
    target is met) leaves block ``layer``'s output from ``z``; the edit is reverted."""
    es = hf_knowedit.apply_edits(
        model,
        tok,
        [REQUEST],
        method="memit",
        layers=[layer],
        config=dict(mom2="identity", mom2_update_weight=1e-6, context_templates=0),
    )
    try:
        return float((block_output(model, tok, layer) - z[0]).norm() / change.norm())
    finally:
        hf_knowedit.revert_edits(model, es.name)


@pytest.mark.parametrize("model_type", ["granite", "falcon_h1"])
def test_one_layer_memit_moves_a_scaled_block_output_to_its_target(model_type, monkeypatch):
    """The block adds ``m · ΔW k`` to the stream, so MEMIT writes ``R / m`` (Granite: ``m = residual_multiplier``;
    Falcon-H1: its MLP's down multiplier ``mlp_multipliers[1]``)."""
    model, tok = make_tiny_model(model_type)
    spec = get_architecture(model)
    assert residual_scale(model, spec) == 0.5
    assert (model.config.residual_multiplier if model_type == "granite" else model.config.mlp_multipliers[1]) == 0.5
    z, change = one_layer_target(model, tok, 1, monkeypatch)
    assert memit_miss(model, tok, 1, z, change) < 0.01
    # without the table's residual_multiplier the block moves only half way
    monkeypatch.setitem(ARCHITECTURES, model_type, dataclasses.replace(spec, residual_multiplier=None))
    assert memit_miss(model, tok, 1, z, change) > 0.4


def test_falcon_h1_logits_are_its_head_times_lm_head_multiplier():
    """``lm_logits`` of the backbone's output is Falcon-H1's own logits (its head times ``lm_head_multiplier``, 1/4
    here); the multipliers inside the blocks (attention, Mamba2, the MLP's gate) need no column: they act inside
    modules the library never rewrites, before ``mlp_out``'s input (the key) or inside the token mixers."""
    model, tok = make_tiny_model("falcon_h1")
    spec = get_architecture(model)
    assert model.config.lm_head_multiplier == 0.25 and spec.logit_scale == "lm_head_multiplier"
    ids = tok("The Eiffel Tower is located in", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        hidden = model.model(input_ids=ids)[0]
        torch.testing.assert_close(lm_logits(model, spec, hidden), logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.lm_head(hidden) * 0.25, logits, rtol=1e-5, atol=1e-6)
        unscaled = dataclasses.replace(spec, logit_scale=None)
        assert not torch.allclose(lm_logits(model, unscaled, hidden), logits, atol=1e-4)


@pytest.mark.parametrize("model_type", ["granite", "falcon_h1"])
def test_tracing_corrupts_as_if_the_embedding_multiplier_were_in_the_weights(model_type):
    """The noise std is measured on the embedding module's output and the noise added there; Granite and
    Falcon-H1 scale both by ``embedding_multiplier`` afterwards. So a trace of the model equals the trace of the
    same model with the multiplier moved into the embedding weights (multiplier 1): nothing to correct for."""
    scaled, tok = make_tiny_model(model_type)
    folded, _ = make_tiny_model(model_type)
    m = scaled.config.embedding_multiplier
    assert m == 3.0
    with torch.no_grad():
        folded.model.embed_tokens.weight.mul_(m)
    folded.config.embedding_multiplier = folded.model.embedding_multiplier = 1.0
    options = dict(kinds="hidden", samples=2, positions=[-1], subjects=["Paris", "Rome", "Japan"])
    a = trace_fact(scaled, tok, "The Eiffel Tower is located in the city of", "Eiffel Tower", **options)
    b = trace_fact(folded, tok, "The Eiffel Tower is located in the city of", "Eiffel Tower", **options)
    assert math.isclose(a.settings["noise"] * m, b.settings["noise"], rel_tol=1e-5)
    assert math.isclose(a.clean_prob, b.clean_prob, rel_tol=1e-5)
    assert math.isclose(a.corrupted_prob, b.corrupted_prob, rel_tol=1e-4)
    assert a.clean_prob != a.corrupted_prob
    torch.testing.assert_close(a.scores["hidden"], b.scores["hidden"], rtol=1e-4, atol=1e-7, equal_nan=True)
