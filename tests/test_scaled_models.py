"""Models that scale their logits and residuals (Granite: ``logits_scaling``, ``residual_multiplier``,
``embedding_multiplier``; Command-R: ``logit_scale``), beyond the table-wide checks of
``tests/test_architectures.py`` (``lm_logits`` against the model's logits, ``residual_scale`` against a
block's output): what the MEMIT family writes into ``mlp_out`` lands on its target, and causal tracing
corrupts the subject as much as on an unscaled model."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import hf_knowedit
from hf_knowedit.architectures import ARCHITECTURES, get_architecture, layer_path
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
    handle = model.get_submodule(layer_path(spec, layer)).register_forward_hook(
        lambda m, i, o: captured.setdefault("h", (o[0] if isinstance(o, tuple) else o).detach())
    )
    text = REQUEST.prompt.format(REQUEST.subject)
    subject_last = len(tok(text[: len(REQUEST.subject)]).input_ids) - 1
    try:
        with torch.no_grad():
            model(**tok(text, return_tensors="pt"))
    finally:
        handle.remove()
    return captured["h"][0, subject_last]


def test_one_layer_memit_moves_a_granite_block_output_to_its_target(monkeypatch):
    """The block adds ``residual_multiplier · ΔW k`` to the stream, so MEMIT writes ``R / residual_multiplier``."""
    model, tok = make_tiny_model("granite")
    spec = get_architecture(model)
    assert model.config.residual_multiplier == 0.5
    layer = 1
    h0 = memit.block_output_at_subject(model, tok, [REQUEST], layer)
    change = 0.5 * h0.norm() * torch.randn(h0.shape, generator=torch.Generator().manual_seed(1)) / h0.shape[1] ** 0.5
    z = h0 + change
    monkeypatch.setattr(memit, "optimize_z", lambda ctx, requests, layer, templates: z.clone())

    def reached():
        es = hf_knowedit.apply_edits(
            model,
            tok,
            [REQUEST],
            method="memit",
            layers=[layer],
            config=dict(mom2="identity", mom2_update_weight=1e-6, context_templates=0),
        )
        try:
            return block_output(model, tok, layer)
        finally:
            hf_knowedit.revert_edits(model, es.name)

    assert float((reached() - z[0]).norm() / change.norm()) < 0.01
    # without the table's residual_multiplier the block moves only half way
    monkeypatch.setitem(ARCHITECTURES, "granite", dataclasses.replace(spec, residual_multiplier=None))
    assert float((reached() - z[0]).norm() / change.norm()) > 0.4


def test_tracing_corrupts_granite_as_if_its_embedding_multiplier_were_in_the_weights():
    """The noise std is measured on the embedding module's output and the noise added there; Granite scales
    both by ``embedding_multiplier`` afterwards. So a trace of the model equals the trace of the same model
    with the multiplier moved into the embedding weights (multiplier 1): nothing to correct for."""
    scaled, tok = make_tiny_model("granite")
    folded, _ = make_tiny_model("granite")
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
