"""MEMIT-family updates through a norm on the MLP output (Gemma 2/3, OLMo 2/3, EXAONE 4).

The architecture table names the norm (``mlp_post_norm``); ``memit.through_post_norm`` maps a wanted change
of the norm's output back to a change of its input. Checked against an RMS norm written out here, and end to
end: a one-layer MEMIT edit with a fixed, known target ``z`` moves the block output to ``z``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hf_knowedit
from hf_knowedit.architectures import ARCHITECTURES, get_architecture, layer_path, mlp_out_path
from hf_knowedit.errors import UnsupportedArchitectureError
from hf_knowedit.methods import memit
from hf_knowedit.requests import EditRequest
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def rms_norm(x, weight, eps=1e-6):
    """Gemma's RMS norm, written out: ``x / sqrt(mean(x²) + eps) · (1 + w)``."""
    return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * (1 + weight)


def test_the_table_names_the_post_mlp_norm_of_exactly_the_post_norm_families():
    with_norm = sorted(t for t, spec in ARCHITECTURES.items() if spec.mlp_post_norm is not None)
    assert with_norm == ["exaone4", "gemma2", "gemma3_text", "olmo2", "olmo3"]


@pytest.mark.parametrize("scale", [0.3, 1.0, 100.0])
def test_through_post_norm_reaches_a_reachable_output_change(scale):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(32, generator=g) * 0.3
    x = torch.randn(4, 32, generator=g) * scale
    wanted = rms_norm(x + 0.3 * scale * torch.randn(4, 32, generator=g), weight) - rms_norm(x, weight)

    def norm(t):
        return rms_norm(t, weight)

    delta = memit.through_post_norm(norm, x, wanted)
    assert torch.allclose(rms_norm(x + delta, weight), rms_norm(x, weight) + wanted, atol=1e-4 * wanted.abs().max())
    # the new input stays at the old one's scale (within the factor 2 the exact branch allows)
    assert bool(((x + delta).norm(dim=1) <= 2 * x.norm(dim=1) * (1 + 1e-6)).all())


def test_through_post_norm_brings_an_unreachable_change_to_the_nearest_output():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(16, generator=g) * 0.3
    weight[3] = -0.999  # a gain of 0.001: dividing the target by it would let one coordinate decide
    x = torch.randn(3, 16, generator=g, dtype=torch.float64)
    # twice the output plus noise: out of the norm's reach at any input scale
    wanted = rms_norm(x, weight) + 0.3 * torch.randn(3, 16, generator=g, dtype=torch.float64)
    target = rms_norm(x, weight) + wanted
    delta = memit.through_post_norm(lambda t: rms_norm(t, weight), x, wanted).double()
    reached = rms_norm(x + delta, weight)
    assert torch.allclose((x + delta).norm(dim=1), x.norm(dim=1), rtol=1e-5)  # input scale kept
    best = (reached - target).norm(dim=1)
    # no output of the norm is closer: random inputs and small moves around the answer
    for _ in range(200):
        other = torch.randn(3, 16, generator=g, dtype=torch.float64)
        assert bool(((rms_norm(other, weight) - target).norm(dim=1) >= best - 1e-6).all())
        near = x + delta + 0.01 * torch.randn(3, 16, generator=g, dtype=torch.float64)
        assert bool(((rms_norm(near, weight) - target).norm(dim=1) >= best - 1e-6).all())


def test_a_norm_that_is_not_an_rms_norm_is_refused():
    layer_norm = torch.nn.LayerNorm(8)
    with pytest.raises(UnsupportedArchitectureError, match="not an RMS norm"):
        memit.through_post_norm(layer_norm, torch.randn(2, 8) + 3.0, torch.randn(2, 8))


def test_one_layer_memit_moves_a_gemma3_block_output_to_its_target(monkeypatch):
    model, tok = make_tiny_model("gemma3_text")
    arch = get_architecture(model)
    layer = 1
    with torch.no_grad():  # MLP outputs at a real model's scale (random init: RMS ~1e-3, where the norm's eps rules)
        model.get_submodule(mlp_out_path(arch, layer)).weight.mul_(100.0)
    request = EditRequest("{} is located in", "Paris", "Rome", "France")
    h0 = memit.block_output_at_subject(model, tok, [request], layer)
    # a reachable change: what another MLP output would write (the norm's outputs all have the same rms)
    x0 = memit.output_at_subject(model, tok, [request], mlp_out_path(arch, layer))
    norm = model.get_submodule(f"{layer_path(arch, layer)}.post_feedforward_layernorm")
    x1 = x0 + 0.5 * x0.norm() / x0.shape[1] ** 0.5 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        change = norm(x1) - norm(x0)
    z = h0 + change
    monkeypatch.setattr(memit, "optimize_z", lambda ctx, requests, layer, templates: z.clone())

    def block_output_after_edit():
        es = hf_knowedit.apply_edits(
            model,
            tok,
            [request],
            method="memit",
            layers=[layer],
            config=dict(mom2="identity", mom2_update_weight=1e-6, context_templates=0),
        )
        captured = {}
        handle = model.get_submodule(layer_path(arch, layer)).register_forward_hook(
            lambda m, i, o: captured.setdefault("h", (o[0] if isinstance(o, tuple) else o).detach())
        )
        ids = tok(request.prompt.format(request.subject), return_tensors="pt").input_ids
        subject_last = len(tok(request.prompt.format(request.subject)[: len("Paris")]).input_ids) - 1
        try:
            model(input_ids=ids)
        finally:
            handle.remove()
            hf_knowedit.revert_edits(model, es.name)
        return captured["h"][0, subject_last]

    # with the table's norm: the block output lands on z
    reached = block_output_after_edit()
    assert float((reached - z[0]).norm() / change.norm()) < 0.05
    # without it (the norm's input receives the block-output change as is): far off
    monkeypatch.setitem(ARCHITECTURES, "gemma3_text", dataclasses.replace(arch, mlp_post_norm=None))
    missed = block_output_after_edit()
    assert float((missed - z[0]).norm() / change.norm()) > 0.3
