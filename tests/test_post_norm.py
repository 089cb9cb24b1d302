"""MEMIT-family updates through a norm on the MLP output (Gemma 2/3, OLMo 2/3, EXAONE 4).

The architecture table names the norm (``mlp_post_norm``); ``memit.through_post_norm`` maps a wanted change
of the norm's output back to a change of its input, with the gain and epsilon the table reads from the module.
Checked against the norms as transformers writes them (epsilon 1e-3, inputs of mean square below and above 1),
and end to end: a one-layer MEMIT edit with a fixed, known target ``z`` moves the block output to ``z``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hf_knowedit
from hf_knowedit.architectures import (
    ARCHITECTURES,
    get_architecture,
    layer_path,
    mlp_out_path,
    mlp_post_norm_gain_eps,
    mlp_post_norm_path,
)
from hf_knowedit.errors import UnsupportedArchitectureError
from hf_knowedit.methods import memit
from hf_knowedit.requests import EditRequest
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


EPS = 1e-3  # not the models' 1e-6: a guessed epsilon would miss


def written_norm(x, weight, model_type, eps=EPS):
    """The post-MLP RMS norm as transformers writes it: Gemma 2/3 ``x / sqrt(mean(x²) + eps) · (1 + w)``,
    OLMo 2/3 and EXAONE 4 ``w · x / sqrt(mean(x²) + eps)``."""
    gain = 1 + weight if model_type.startswith("gemma") else weight
    return gain * x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def post_norm(model_type, seed=0, weight=None):
    """A tiny model's post-MLP norm of block 0 with epsilon ``EPS`` and a random weight, its weight, and the
    gain and epsilon the architecture table reads from it."""
    model, _ = make_tiny_model(model_type)
    spec = get_architecture(model)
    norm = model.get_submodule(mlp_post_norm_path(spec, 0))
    setattr(norm, spec.mlp_post_norm_eps, EPS)
    if weight is None:
        weight = 0.3 * torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(seed))
        weight = weight if model_type.startswith("gemma") else 1 + weight
    with torch.no_grad():
        norm.weight.copy_(weight)
    gain, eps = mlp_post_norm_gain_eps(model, spec, 0)
    return norm, weight.double(), gain, eps


def rows_at(ms, n, d, seed):
    """``n`` random rows of mean square ``ms`` each, float64."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x * (ms / x.pow(2).mean(dim=1, keepdim=True)).sqrt()


def test_the_table_names_the_post_mlp_norm_of_exactly_the_post_norm_families():
    with_norm = sorted(t for t, spec in ARCHITECTURES.items() if spec.mlp_post_norm is not None)
    assert with_norm == ["exaone4", "gemma2", "gemma3", "gemma3_text", "glm4", "olmo2", "olmo3"]


@pytest.mark.parametrize("model_type", ["exaone4", "gemma2", "gemma3", "gemma3_text", "glm4", "olmo2", "olmo3"])
def test_the_table_reads_the_gain_and_epsilon_of_each_post_norm_family(model_type):
    norm, weight, gain, eps = post_norm(model_type)
    assert eps == EPS
    assert torch.allclose(gain, 1 + weight if model_type.startswith("gemma") else weight)
    x = rows_at(0.01, 3, weight.numel(), seed=1)
    with torch.no_grad():
        assert torch.allclose(norm(x.float()).double(), written_norm(x, weight, model_type), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["gemma3_text", "olmo2"])
@pytest.mark.parametrize("ms", [0.01, 100.0])  # eps / mean(x²) = 0.1 and 1e-5
def test_an_output_of_an_input_of_the_same_scale_is_reached_exactly(model_type, ms):
    norm, weight, gain, eps = post_norm(model_type)
    d = weight.numel()
    x, x1 = rows_at(ms, 4, d, seed=2), rows_at(ms, 4, d, seed=3)
    wanted = written_norm(x1, weight, model_type) - written_norm(x, weight, model_type)
    delta = memit.through_post_norm(norm, gain, eps, x.float(), wanted.float()).double()
    # the norm is one-to-one at a given input scale: the only such input is x1
    assert torch.allclose(x + delta, x1, rtol=1e-5, atol=1e-5 * ms**0.5)


@pytest.mark.parametrize("model_type", ["gemma3_text", "olmo2"])
@pytest.mark.parametrize("ms", [0.01, 100.0])
@pytest.mark.parametrize("size", [0.5, 1.5])  # a target the norm gives only at a smaller input scale, or never
def test_a_target_of_another_size_is_brought_to_the_nearest_output_at_the_inputs_scale(model_type, ms, size):
    norm, weight, gain, eps = post_norm(model_type)
    d = weight.numel()
    x = rows_at(ms, 3, d, seed=4)
    target = size * written_norm(rows_at(ms, 3, d, seed=5), weight, model_type)
    wanted = target - written_norm(x, weight, model_type)
    new = x + memit.through_post_norm(norm, gain, eps, x.float(), wanted.float()).double()
    # the input keeps its scale: a smaller target is not reached by cancelling the MLP output to ~sqrt(eps)
    assert torch.allclose(new.pow(2).mean(dim=1), x.pow(2).mean(dim=1), rtol=1e-5)
    new = new * (ms / new.pow(2).mean(dim=1, keepdim=True)).sqrt()
    best = (written_norm(new, weight, model_type) - target).norm(dim=1)
    tol = 1e-5 * target.norm(dim=1)
    # no output of an input of that scale is closer: random inputs and small moves around the answer
    g = torch.Generator().manual_seed(6)
    for _ in range(100):
        for other in (rows_at(ms, 3, d, seed=int(torch.randint(1 << 30, (1,), generator=g))), new):
            other = other + 0.01 * ms**0.5 * torch.randn(other.shape, generator=g, dtype=torch.float64)
            other = other * (ms / other.pow(2).mean(dim=1, keepdim=True)).sqrt()
            assert bool(((written_norm(other, weight, model_type) - target).norm(dim=1) >= best - tol).all())


def test_a_tiny_gain_does_not_decide_the_direction_of_an_unreachable_output():
    weight = 0.3 * torch.randn(32, generator=torch.Generator().manual_seed(1))
    weight[3] = -0.999  # a gain of 0.001: dividing the target by it would let one coordinate decide
    norm, weight, gain, eps = post_norm("gemma3_text", weight=weight)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 32, generator=g, dtype=torch.float64)
    # twice the output plus noise: out of the norm's reach at any input scale
    wanted = written_norm(x, weight, "gemma3_text") + 0.3 * torch.randn(3, 32, generator=g, dtype=torch.float64)
    target = written_norm(x, weight, "gemma3_text") + wanted
    new = x + memit.through_post_norm(norm, gain, eps, x, wanted).double()
    best = (written_norm(new, weight, "gemma3_text") - target).norm(dim=1)
    for _ in range(200):
        other = torch.randn(3, 32, generator=g, dtype=torch.float64)
        assert bool(((written_norm(other, weight, "gemma3_text") - target).norm(dim=1) >= best - 1e-5).all())


def test_a_norm_that_is_not_an_rms_norm_is_refused():
    layer_norm = torch.nn.LayerNorm(8)
    with pytest.raises(UnsupportedArchitectureError, match="does not compute"):
        memit.through_post_norm(layer_norm, torch.ones(8), 1e-5, torch.randn(2, 8) + 3.0, torch.randn(2, 8))


def test_a_table_row_that_misdescribes_the_norm_is_refused(monkeypatch):
    model, _ = make_tiny_model("gemma3_text")
    arch = get_architecture(model)
    monkeypatch.setitem(ARCHITECTURES, "gemma3_text", dataclasses.replace(arch, mlp_post_norm_eps="epsilon"))
    with pytest.raises(UnsupportedArchitectureError, match="mlp_post_norm_eps"):
        mlp_post_norm_gain_eps(model, get_architecture(model), 0)
    # OLMo's gain convention (weight) for Gemma's norm (1 + weight): caught on the norm's own output
    monkeypatch.setitem(ARCHITECTURES, "gemma3_text", dataclasses.replace(arch, mlp_post_norm_gain_offset=0.0))
    norm = model.get_submodule(mlp_post_norm_path(arch, 0))
    gain, eps = mlp_post_norm_gain_eps(model, get_architecture(model), 0)
    x = torch.randn(2, gain.numel())
    with pytest.raises(UnsupportedArchitectureError, match="mlp_post_norm_gain_offset"):
        memit.through_post_norm(norm, gain, eps, x, torch.zeros_like(x))


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
