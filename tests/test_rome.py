"""ROME / r-ROME through ``apply_edits`` on tiny models: the edit works, hook == merged, revert is
bit-exact, statistics are cached, and every bad input is refused with the weights untouched."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hf_knowedit
from hf_knowedit import ROMEConfig
from hf_knowedit.architectures import get_architecture, get_module, mlp_out_path
from hf_knowedit.errors import (
    EditConflictError,
    InvalidConfigError,
    InvalidRequestError,
    LayerOutOfRangeError,
    NonFiniteUpdateError,
    StatisticsMismatchError,
    SubjectNotFoundError,
    TraceError,
    UnknownMethodError,
)
from hf_knowedit.methods.statistics import compute_second_moment
from hf_knowedit.moments import StatsCache
from tests.helpers import assert_untouched, logprob, snapshot
from tests.tiny_models import _CORPUS, make_tiny_model

CORPUS = [line for line in _CORPUS.splitlines() if line.strip()]
FACT = {"prompt": "The capital city of {}", "subject": "Italy", "target_new": "Paris", "target_true": "Rome"}
OTHER = {"prompt": "The official language of {}", "subject": "Japan", "target_new": "German", "target_true": "Japanese"}
# Tiny random models have MLP outputs of norm ~0.01, so the reference regulariser (||δ|| / ||v_init||²,
# clamp at 4 ||v_init||) pins v* to v_init; everything else is the reference default.
TINY = dict(v_weight_decay=0.0, clamp_norm_factor=1e4, context_templates=2, mom2_corpus=CORPUS, mom2_n_tokens=600)


pytestmark = pytest.mark.usefixtures("one_thread", "stats_cache")


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "opt", "falcon", "gemma2", "bloom"])
def test_edit_prefers_new_target_and_reverts_exactly(model_type):
    model, tok = make_tiny_model(model_type)
    before = snapshot(model)
    text = "The capital city of Italy"
    es = hf_knowedit.apply_edits(model, tok, FACT, "rome", layers=[1], **TINY)
    assert logprob(model, tok, text, "Paris") > logprob(model, tok, text, "Rome")
    path = mlp_out_path(get_architecture(model), 1)
    assert list(es.deltas) == [path] and es.deltas[path].rank == 1 and es.layers == [1]
    assert es.method == "rome" and es.config["original_implementation"] is False
    assert es.stats_key is not None and es.stats_key.layer == 1 and es.stats_key.corpus.startswith("texts:")
    hf_knowedit.revert_edits(model)
    assert_untouched(model, before)


def test_update_writes_v_star_for_k_star():
    """r-ROME: Ŵ k* = v* exactly (up to float32), and Ŵ = W + Λ uᵀ with unit u."""
    from hf_knowedit.methods.context import context_templates
    from hf_knowedit.methods.rome import rank_one_update
    from hf_knowedit.methods.statistics import second_moment_for as second_moment
    from hf_knowedit.requests import to_request

    model, tok = make_tiny_model("llama")
    config = ROMEConfig(**TINY)
    templates = context_templates(model, tok, n=2)
    update = rank_one_update(model, tok, to_request(FACT), 1, config, second_moment(model, tok, 1, config), templates)
    assert update.A.shape == (1, 96) and update.B.shape == (32, 1)
    torch.testing.assert_close(update.A.norm(), torch.tensor(1.0))
    module = get_module(model, mlp_out_path(get_architecture(model), 1))
    with torch.no_grad():
        new = module(update.k_star.unsqueeze(0))[0] + (update.B @ (update.A @ update.k_star))
    torch.testing.assert_close(new, update.v_star, rtol=1e-4, atol=1e-5)


def test_original_implementation_uses_the_bare_prompt_key():
    model, tok = make_tiny_model("llama")
    r_rome = hf_knowedit.apply_edits(model, tok, FACT, "rome", layers=[1], **TINY)
    hf_knowedit.revert_edits(model)
    rome = hf_knowedit.apply_edits(model, tok, FACT, "rome", layers=[1], original_implementation=True, **TINY)
    path = next(iter(rome.deltas))
    assert torch.equal(rome.deltas[path].A, r_rome.deltas[path].A)  # same u = C⁻¹k*
    assert not torch.allclose(rome.deltas[path].B, r_rome.deltas[path].B)  # other Λ
    text = "The capital city of Italy"
    assert logprob(model, tok, text, "Paris") > logprob(model, tok, text, "Rome")
    hf_knowedit.revert_edits(model)


def test_hooked_equals_merged_and_modes_switch():
    model, tok = make_tiny_model("llama")
    ids = torch.tensor([tok("The capital city of Italy is a city")["input_ids"]])
    es = hf_knowedit.apply_edits(model, tok, FACT, "rome", layers=[1], merge=False, **TINY)
    with torch.no_grad():
        hooked = model(input_ids=ids).logits
        hf_knowedit.merge_edits(model)
        merged = model(input_ids=ids).logits
        hf_knowedit.unmerge_edits(model)
        again = model(input_ids=ids).logits
        with hf_knowedit.disable_edits(model):
            base = model(input_ids=ids).logits
    torch.testing.assert_close(hooked, merged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, merged, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base, merged)
    assert hf_knowedit.list_edits(model)[0].name == es.name
    hf_knowedit.revert_edits(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_sets_revert_bit_exactly(dtype):
    model, tok = make_tiny_model("llama", dtype=dtype)
    before = snapshot(model)
    first = hf_knowedit.apply_edits(model, tok, FACT, "rome", layers=[1], name="first", **TINY)
    hf_knowedit.apply_edits(model, tok, OTHER, "rome", layers=[1], name="second", **TINY)
    hf_knowedit.apply_edits(
        model, tok, dict(OTHER, subject="Spain", target_true="Spanish"), "rome", layers=[2], merge=False, **TINY
    )
    assert [e.name for e in hf_knowedit.list_edits(model)] == ["first", "second", "rome-1"]
    path = next(iter(first.deltas))
    assert not torch.equal(model.state_dict()[path + ".weight"], before.weights[path + ".weight"])
    hf_knowedit.revert_edits(model, "first")
    hf_knowedit.revert_edits(model)
    assert_untouched(model, before)


def test_several_requests_are_edited_one_after_another():
    model, tok = make_tiny_model("llama")
    es = hf_knowedit.apply_edits(model, tok, [FACT, OTHER], "rome", layers=[1], **TINY)
    assert es.deltas[next(iter(es.deltas))].rank == 2 and len(es) == 2
    assert logprob(model, tok, "The capital city of Italy", "Paris") > logprob(
        model, tok, "The capital city of Italy", "Rome"
    )
    assert logprob(model, tok, "The official language of Japan", "German") > logprob(
        model, tok, "The official language of Japan", "Japanese"
    )
    hf_knowedit.revert_edits(model)


def test_statistics_are_computed_once_and_identity_is_labelled(stats_cache):
    model, tok = make_tiny_model("llama")
    es = hf_knowedit.apply_edits(model, tok, FACT, "rome", layers=[1], **TINY)
    files = list(stats_cache.glob("*.safetensors"))
    assert len(files) == 1 and StatsCache().path(es.stats_key) == files[0]
    hf_knowedit.revert_edits(model)
    # a fresh copy of the same weights: statistics come from disk, no forward pass
    fresh, _ = make_tiny_model("llama")
    calls = []
    get_module(fresh, "model.layers.0").register_forward_hook(lambda *a: calls.append(1))
    sm = compute_second_moment(fresh, tok, 1, corpus=CORPUS, n_tokens=600)
    assert sm.key == es.stats_key and calls == []
    eye = hf_knowedit.apply_edits(model, tok, FACT, "rome", layers=[1], mom2="identity", **TINY)
    assert eye.stats_key.corpus == "identity" and eye.config["mom2"] == "identity"
    assert len(list(stats_cache.glob("*.safetensors"))) == 1
    hf_knowedit.revert_edits(model)


def test_layers_default_and_auto():
    from hf_knowedit.methods.rome import default_layer

    model, tok = make_tiny_model("llama")
    assert default_layer(model) == 1  # round(0.2 * 3)
    es = hf_knowedit.apply_edits(model, tok, FACT, "rome", **TINY)
    assert es.layers == [default_layer(model)]
    hf_knowedit.revert_edits(model)
    before = snapshot(model)
    with pytest.raises(TraceError):  # "auto" needs a causal trace first
        hf_knowedit.apply_edits(model, tok, FACT, "rome", layers="auto", **TINY)
    with pytest.raises(LayerOutOfRangeError):
        hf_knowedit.apply_edits(model, tok, FACT, "rome", layers=[1, 2], **TINY)
    assert_untouched(model, before)


def test_conflicting_edit_is_reported():
    model, tok = make_tiny_model("llama")
    hf_knowedit.apply_edits(model, tok, FACT, "rome", layers=[1], **TINY)
    with pytest.raises(EditConflictError):
        hf_knowedit.apply_edits(model, tok, dict(FACT, target_new="Berlin"), "rome", layers=[1], **TINY)
    assert len(hf_knowedit.list_edits(model)) == 1
    hf_knowedit.apply_edits(
        model, tok, dict(FACT, target_new="Berlin"), "rome", layers=[1], allow_conflicts=True, **TINY
    )
    assert len(hf_knowedit.list_edits(model)) == 2
    hf_knowedit.revert_edits(model)


@pytest.mark.parametrize(
    "field,value",
    [
        ("v_num_grad_steps", 0),
        ("v_lr", 0.0),
        ("v_lr", float("nan")),
        ("kl_factor", -1.0),
        ("v_weight_decay", -0.1),
        ("clamp_norm_factor", 0),
        ("early_stop", -1),
        ("original_implementation", "yes"),
        ("context_templates", -1),
        ("context_length", 0),
        ("mom2", "diagonal"),
        ("mom2_n_tokens", 0),
        ("mom2_dtype", "float16"),
        ("mom2_corpus", "a single string"),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(InvalidConfigError, match=f"ROMEConfig.{field}"):
        ROMEConfig(**{field: value})
    defaults = ROMEConfig()
    assert (
        defaults.v_num_grad_steps,
        defaults.v_lr,
        defaults.v_lr_relative,
        defaults.kl_factor,
        defaults.v_weight_decay,
        defaults.clamp_norm_factor,
        defaults.early_stop,
    ) == (20, None, 0.5, 0.0625, 0.5, 4.0, 0.05)  # v_lr None: 0.5 · RMS of the site (test_bundled.py)
    assert all("help" in f.metadata for f in dataclasses.fields(ROMEConfig))


def test_old_field_names_still_work_for_one_release_with_a_warning():
    with pytest.warns(FutureWarning, match="v_num_grad_steps"):
        cfg = ROMEConfig(steps=3)
    assert cfg.v_num_grad_steps == 3
    with pytest.warns(FutureWarning, match="clamp_norm_factor"):
        assert cfg.clamp_factor == cfg.clamp_norm_factor == 4.0
    with pytest.raises(InvalidConfigError, match="v_lr only"):
        ROMEConfig(lr=0.1, v_lr=0.2)


BAD = [
    ("subject not in the prompt", dict(FACT, prompt="The capital city of France"), {}, SubjectNotFoundError),
    ("empty subject", dict(FACT, subject=" "), {}, SubjectNotFoundError),
    ("empty target", dict(FACT, target_new="  "), {}, InvalidRequestError),
    ("new equals true", dict(FACT, target_new="Rome"), {}, InvalidRequestError),
    ("unknown method", FACT, {"method": "rome2"}, UnknownMethodError),
    ("layer out of range", FACT, {"layers": [4]}, LayerOutOfRangeError),
    ("unknown option", FACT, {"learning_rate": 1.0}, InvalidConfigError),
]


@pytest.mark.parametrize("label,request_,kwargs,error", BAD, ids=[b[0] for b in BAD])
def test_bad_input_leaves_the_model_untouched(label, request_, kwargs, error):
    model, tok = make_tiny_model("llama")
    before = snapshot(model)
    kwargs = {"method": "rome", "layers": [1], **TINY, **kwargs}
    with pytest.raises(error):
        hf_knowedit.apply_edits(model, tok, request_, **kwargs)
    assert_untouched(model, before)


def test_prompt_without_placeholder_is_refused():
    model, tok = make_tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(InvalidRequestError, match="placeholder"):
        hf_knowedit.apply_edits(
            model, tok, hf_knowedit.EditRequest("No subject here", "Italy", "Paris"), "rome", layers=[1], **TINY
        )
    assert_untouched(model, before)


def test_statistics_file_for_another_layer_is_refused():
    model, tok = make_tiny_model("llama")
    cache = StatsCache()
    wrong = compute_second_moment(model, tok, 2, corpus=CORPUS, n_tokens=600)
    fresh, _ = make_tiny_model("llama")
    right_key = compute_second_moment(fresh, tok, 1, corpus=CORPUS, n_tokens=600, cache=False).key
    cache.path(right_key).write_bytes(cache.path(wrong.key).read_bytes())
    other, _ = make_tiny_model("llama")
    before = snapshot(other)
    with pytest.raises(StatisticsMismatchError, match="layer"):
        hf_knowedit.apply_edits(other, tok, FACT, "rome", layers=[1], **TINY)
    assert_untouched(other, before)


def test_non_finite_update_is_refused(monkeypatch):
    import hf_knowedit.methods.rome as rome

    real = rome.optimize_targets

    def broken(*args, **kwargs):
        res = real(*args, **kwargs)
        res.targets[:] = float("nan")
        return res

    monkeypatch.setattr(rome, "optimize_targets", broken)
    model, tok = make_tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(NonFiniteUpdateError):
        hf_knowedit.apply_edits(model, tok, [FACT, OTHER], "rome", layers=[1], **TINY)
    assert_untouched(model, before)
