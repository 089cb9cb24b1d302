"""One behaviour tester over the whole matrix: every tiny architecture × every editing method that
ships with hf_knowedit (in the spirit of peft's ``tests/testing_common.py``).

For each (architecture, method) one edit is computed with cheap settings (``C = I``, no context
templates, two optimisation steps) and shared by the behaviours below, each checked on fresh
copies of the model:

(a) applying changes exactly the edited modules' weights; ``revert_edits`` gives them back bit-exactly;
(b) hooked (``merge=False``) and merged give the same logits; ``merge_edits`` / ``unmerge_edits``
    switch between the two (weights bit-exact in both modes) and reverting leaves no hook;
(c) ``save_pretrained`` → ``load_edits`` into a fresh identical model gives the edited weights bit-exactly;
(d) inside ``disable_edits()`` the logits are the base model's (merged and hooked);
(e) bad input (a subject not in the prompt, a layer out of range) raises a ``KnowEditError``
    subclass and leaves weights, hooks and active edits as they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import hf_knowedit
from hf_knowedit.architectures import edited_param, get_architecture, mlp_out_path
from hf_knowedit.editset import EditSet
from hf_knowedit.errors import KnowEditError, LayerOutOfRangeError, SubjectNotFoundError
from hf_knowedit.hooks import count_forward_hooks
from hf_knowedit.methods.registry import get_method
from tests.helpers import ROUTED_ONLY_METHODS, assert_untouched, logits, snapshot
from tests.tiny_models import LAYERS, TINY_MODEL_TYPES, TINY_ROUTED_MOE, assert_same, make_tiny_model, weights

pytestmark = pytest.mark.usefixtures("one_thread", "stats_cache")

#: the methods hf_knowedit ships (other test modules register their own test methods)
METHODS = [m for m in hf_knowedit.available_methods() if get_method(m).compute.__module__.startswith("hf_knowedit.")]
#: MoEEdit edits routed experts only (other rows refuse it: tests/test_moeedit.py)
ONLY_ON = {method: TINY_ROUTED_MOE for method in ROUTED_ONLY_METHODS}
CASES = [(arch, method) for arch in TINY_MODEL_TYPES for method in METHODS if arch in ONLY_ON.get(method, (arch,))]
IDS = [f"{arch}-{method}" for arch, method in CASES]

# relation_id: P36's question ("What is the capital of {}?") is a v*/z row with chat_questions (below)
FACT = {
    "prompt": "The capital city of {}",
    "subject": "Italy",
    "target_new": "Paris",
    "target_true": "Rome",
    "relation_id": "P36",
}
PROBE = "The capital city of Italy is"
OTHER = {"prompt": "The official language of {}", "subject": "Japan", "target_new": "German"}

# v_lr absolute: the default rate is relative to the site's RMS, which on random tiny models is ~1e-3, so two
# steps would barely move z (and a post-MLP norm, as OLMo 2's, then passes only that small change on)
# chat_context=1: the chat-form template (here "Q: ... A: {}": the tiny tokenizer has no chat template) on every row;
# chat_questions: the fact's question, "Q: What is the capital of Italy?\nA:" then the target, a row of its own;
# v_position_noise (NAMET): the bare prompt and the essence prompt, shorter than the chat form, get no delta
# mom2_preserve: C = I + 10 · E_p[k kᵀ] over two unrelated sentences (joint, or per expert for MoEEdit)
CHEAP = dict(
    mom2="identity",
    context_templates=0,
    chat_context=1,
    chat_questions=True,
    v_position_noise=True,
    mom2_preserve=["Tokyo is a large city in Japan.", "Water boils at one hundred degrees."],
    v_num_grad_steps=2,
    v_lr=0.5,
)
SETTINGS = {
    "rome": dict(layers=[1]),
    "memit": dict(layers=[1, 2], mom2_update_weight=1e-3),  # small λ with C = I: an update of visible size
    # with C = I every singular value (1) is below the threshold: P = I, the whole space is free; l2 small so
    # that the update is visible through a post-MLP norm (OLMo 2/3) with the chat-form template too
    "alphaedit": dict(layers=[1, 2], nullspace_threshold=2.0, l2=0.1),
    "emmet": dict(layers=[1, 2]),
    "encore": dict(layers=[1, 2], mom2_update_weight=1e-3),
    "rlsedit": dict(layers=[1, 2], mom2_update_weight=1e-3),
    # as AlphaEdit's: C_e = I is below the threshold, P_e = I; a small λ for the tiny models' small keys
    "moeedit": dict(layers=[1, 2], nullspace_threshold=2.0, lambda_reg=1e-3),
}


def settings(method: str) -> dict:
    return {**CHEAP, **SETTINGS.get(method, dict(layers=[1, 2]))}


@dataclass
class Edit:
    """One computed edit of an (architecture, method) pair, shared by the behaviours."""

    es: EditSet
    edited: dict[str, torch.Tensor]  # the model's weights right after apply_edits(merge=True)


_EDITS: dict[tuple[str, str], Edit] = {}


@pytest.fixture(scope="module", autouse=True)
def _forget_edits():
    yield
    _EDITS.clear()


def _apply(arch: str, method: str):
    """A fresh model with the edit applied (merged); records the edit for the other behaviours."""
    model, tok = make_tiny_model(arch)
    before = snapshot(model)
    es = hf_knowedit.apply_edits(model, tok, FACT, method, name="edit", **settings(method))
    _EDITS.setdefault((arch, method), Edit(es, weights(model)))
    return model, tok, es, before


def _edit(arch: str, method: str) -> Edit:
    if (arch, method) not in _EDITS:
        _apply(arch, method)
    return _EDITS[arch, method]


def _assert_edited(edited: torch.Tensor, base: torch.Tensor) -> None:
    """The edit is visible in the logits (so that equalities with or without it are not vacuous)."""
    assert (edited - base).abs().max() > 1e-4, float((edited - base).abs().max())


def test_every_architecture_and_method_is_in_the_matrix():
    assert set(METHODS) >= {"rome", "memit", "alphaedit", "emmet"}
    assert set(METHODS) >= {"moeedit"} and {(arch, "moeedit") for arch in TINY_ROUTED_MOE} <= set(CASES)
    rows = len(TINY_MODEL_TYPES) * (len(METHODS) - len(ONLY_ON)) + sum(map(len, ONLY_ON.values()))
    assert len(CASES) == rows and len(set(CASES)) == len(CASES)


@pytest.mark.parametrize("arch,method", CASES, ids=IDS)
def test_apply_changes_the_edited_weights_and_revert_restores_them(arch, method):
    model, tok, es, before = _apply(arch, method)
    spec = get_architecture(model)
    layers = settings(method)["layers"]
    assert es.method == method and es.layers == layers
    assert set(es.deltas) == {mlp_out_path(spec, layer) for layer in layers}
    after = weights(model)
    changed = {k for k, v in after.items() if not torch.equal(v, before.weights[k])}
    assert changed == {edited_param(path, spec.mlp_out_layout) for path in es.deltas}  # those, and nothing else
    assert [e.name for e in hf_knowedit.list_edits(model)] == ["edit"]
    hf_knowedit.revert_edits(model)
    assert_untouched(model, before)


@pytest.mark.parametrize("arch,method", CASES, ids=IDS)
def test_hooked_and_merged_agree_and_modes_switch(arch, method):
    edit = _edit(arch, method)
    model, tok = make_tiny_model(arch)
    before, base = snapshot(model), logits(model, tok, PROBE)

    hf_knowedit.load_edits(model, edit.es, merge=False, name="edit")
    assert_same(weights(model), before.weights)  # hooked: the weights are the base ones
    assert count_forward_hooks(model) > before.hooks
    assert [e.merged for e in hf_knowedit.list_edits(model)] == [False]
    hooked = logits(model, tok, PROBE)
    _assert_edited(hooked, base)

    hf_knowedit.merge_edits(model)
    assert [e.merged for e in hf_knowedit.list_edits(model)] == [True]
    assert_same(weights(model), edit.edited)  # merged: the weights apply_edits wrote
    merged = logits(model, tok, PROBE)
    torch.testing.assert_close(merged, hooked, rtol=1e-4, atol=1e-5)

    hf_knowedit.unmerge_edits(model)
    assert [e.merged for e in hf_knowedit.list_edits(model)] == [False]
    assert_same(weights(model), before.weights)
    torch.testing.assert_close(logits(model, tok, PROBE), merged, rtol=1e-4, atol=1e-5)

    hf_knowedit.revert_edits(model)
    assert_untouched(model, before)  # no hook left behind


@pytest.mark.parametrize("arch,method", CASES, ids=IDS)
def test_saved_edit_loads_into_a_fresh_model_bit_exactly(arch, method, tmp_path):
    edit = _edit(arch, method)
    edit.es.save_pretrained(tmp_path / "edit")
    model, tok = make_tiny_model(arch)
    loaded = hf_knowedit.load_edits(model, tmp_path / "edit")
    assert loaded.method == method and loaded.layers == edit.es.layers
    assert [e.name for e in hf_knowedit.list_edits(model)] == [loaded.name]
    assert_same(weights(model), edit.edited)


@pytest.mark.parametrize("arch,method", CASES, ids=IDS)
def test_disable_edits_gives_the_base_model(arch, method):
    edit = _edit(arch, method)
    model, tok = make_tiny_model(arch)
    before, base = snapshot(model), logits(model, tok, PROBE)
    for merge in (True, False):
        hf_knowedit.load_edits(model, edit.es, merge=merge, name="edit")
        edited = logits(model, tok, PROBE)
        _assert_edited(edited, base)
        with hf_knowedit.disable_edits(model):
            assert torch.equal(logits(model, tok, PROBE), base), f"merge={merge}"
        torch.testing.assert_close(logits(model, tok, PROBE), edited, rtol=0, atol=0)  # on again afterwards
        hf_knowedit.revert_edits(model)
    assert_untouched(model, before)


@pytest.mark.parametrize("arch,method", CASES, ids=IDS)
def test_bad_input_is_refused_and_leaves_the_model_untouched(arch, method):
    edit = _edit(arch, method)
    model, tok = make_tiny_model(arch)
    hf_knowedit.load_edits(model, edit.es, merge=False, name="edit")  # an active hooked edit stays as it is
    before = snapshot(model)
    layers = settings(method)["layers"]
    bad = [
        (dict(OTHER, prompt="The official language of France"), {}, SubjectNotFoundError),
        (OTHER, dict(layers=layers[:-1] + [LAYERS]), LayerOutOfRangeError),
        (OTHER, dict(layers=layers[:-1] + [-LAYERS - 1]), LayerOutOfRangeError),
    ]
    for request, kwargs, error in bad:
        with pytest.raises(KnowEditError) as info:
            hf_knowedit.apply_edits(model, tok, request, method, **{**settings(method), **kwargs})
        assert isinstance(info.value, error), (request, kwargs, info.value)
        assert_untouched(model, before, edits=False)
        assert [(e.name, e.merged) for e in hf_knowedit.list_edits(model)] == [("edit", False)]
