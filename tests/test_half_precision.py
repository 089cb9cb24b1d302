"""fp16 / bf16 models: statistics, keys, targets and solves in float32 / float64, results cast back.

Each check is against a float64 transcription computed here from the model's (half-precision)
weights and the vectors the method reports, not against the library's helpers.
"""

from __future__ import annotations

import pytest
import torch

import hf_knowedit
from tests.helpers import CAPITAL_FACT, DENSE_METHODS, TINY_METHOD_SETTINGS
from tests.tiny_models import make_tiny_model, weights

pytestmark = pytest.mark.usefixtures("one_thread", "stats_cache")

DTYPES = [torch.float16, torch.bfloat16]
IDS = ["fp16", "bf16"]
METHODS = DENSE_METHODS
FACT = CAPITAL_FACT
CHEAP = dict(mom2="identity", context_templates=0, v_num_grad_steps=3)
SETTINGS = TINY_METHOD_SETTINGS
CORPUS = [
    "The Eiffel Tower is located in Paris, the capital of France.",
    "Berlin is the capital of Germany, and the people of Germany speak German.",
    "Apple was founded by Steve Jobs. Microsoft was founded by Bill Gates.",
] * 3


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_rome_solves_for_lambda_in_float64(dtype):
    """Λ = (v* − W k*) / (uᵀ k*) with W k* in float64 from the half-precision weight (in the model's
    dtype W k* is off by ~0.4 % in bf16, far above this tolerance)."""
    from hf_knowedit.methods.rome import ROMEConfig, rank_one_update
    from hf_knowedit.methods.statistics import second_moment_for
    from hf_knowedit.requests import to_request

    model, tok = make_tiny_model("llama", dtype=dtype)
    config = ROMEConfig(**CHEAP)
    update = rank_one_update(model, tok, to_request(FACT), 2, config, second_moment_for(model, tok, 2, config), ["{}"])
    W = model.model.layers[2].mlp.down_proj.weight.detach().double()
    k, u, v = update.k_star.double(), update.A[0].double(), update.v_star.double()
    want = (v - W @ k) / (u @ k)
    assert update.B.dtype == torch.float32
    assert torch.allclose(update.B[:, 0].double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    wrong = (v - (W.to(dtype) @ k.to(dtype)).double()) / (u @ k)  # W k in the model's dtype
    assert not torch.allclose(wrong, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_statistics_of_a_half_precision_model_accumulate_in_float32(dtype):
    from hf_knowedit.methods.statistics import compute_second_moment

    model, tok = make_tiny_model("llama", dtype=dtype)
    got = compute_second_moment(model, tok, 1, corpus=CORPUS, n_tokens=120, cache=False)
    assert got.matrix.dtype == torch.float32
    keys, left = [], 120
    hook = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, o: keys.append(a[0][0]))
    with torch.no_grad():
        for text in CORPUS:
            ids = tok(text)["input_ids"][:left]
            if ids:
                model(input_ids=torch.tensor([ids]))
                left -= len(ids)
    hook.remove()
    k = torch.cat(keys).double()
    assert k.shape[0] == 120
    assert torch.allclose(got.matrix.double(), k.t() @ k / 120, rtol=1e-5, atol=1e-6 * float((k.t() @ k).abs().max()))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_a_half_precision_model_merges_in_float32_and_reverts_exactly(method, dtype):
    model, tok = make_tiny_model("llama", dtype=dtype)
    base = weights(model)
    config = {**CHEAP, **SETTINGS[method]}
    layers = config.pop("layers")
    es = hf_knowedit.apply_edits(model, tok, [FACT], method=method, layers=layers, config=config)
    for path, d in es.deltas.items():
        assert d.A.dtype == d.B.dtype == torch.float32 and d.is_finite()
        W0 = base[f"{path}.weight"]
        want = (W0.float() + d.B.float() @ d.A.float()).to(dtype)  # cast(float32(W) + ΔW)
        got = model.get_submodule(path).weight
        assert got.dtype == dtype
        assert torch.equal(got, want), path
        assert not torch.equal(got, W0)
    hf_knowedit.revert_edits(model)
    for k, v in weights(model).items():
        assert torch.equal(v, base[k]), k


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("method", ["rome", "memit"])
@pytest.mark.parametrize("model_type", ["falcon_h1", "lfm2", "bamba"])
def test_hybrid_stacks_in_half_precision_merge_in_float32_and_revert_exactly(model_type, method, dtype):
    """The hybrid stacks (Mamba2 / convolution blocks beside attention) take the same path as the dense models."""
    model, tok = make_tiny_model(model_type, dtype=dtype)
    base = weights(model)
    config = {**CHEAP, **SETTINGS[method]}
    layers = config.pop("layers")
    es = hf_knowedit.apply_edits(model, tok, [FACT], method=method, layers=layers, config=config)
    for path, d in es.deltas.items():
        assert d.A.dtype == d.B.dtype == torch.float32 and d.is_finite()
        want = (base[f"{path}.weight"].float() + d.B.float() @ d.A.float()).to(dtype)
        got = model.get_submodule(path).weight
        assert got.dtype == dtype and torch.equal(got, want) and not torch.equal(got, base[f"{path}.weight"]), path
    hf_knowedit.revert_edits(model)
    for k, v in weights(model).items():
        assert torch.equal(v, base[k]), k
