"""Edit sets on a model: merge, hook, unmerge, disable, revert (bit-exact), conflicts, safety."""

import pytest
import torch

import hf_knowedit
from hf_knowedit.architectures import get_architecture, get_module, mlp_out_dims, mlp_out_path
from hf_knowedit.deltas import ModuleDelta, fingerprint
from hf_knowedit.editset import EditSet
from hf_knowedit.errors import (
    BaseModelMismatchError,
    EditConflictError,
    EditSetNotFoundError,
    KnowEditError,
    NonFiniteUpdateError,
)
from hf_knowedit.hooks import count_forward_hooks
from hf_knowedit.requests import EditRequest
from hf_knowedit.stack import push_edit_set
from tests.helpers import assert_untouched, logits, snapshot
from tests.tiny_models import assert_same, make_tiny_model, weights


def random_set(model, layers, rank=2, seed=0, scale=0.5, subject="Angola", target="Antarctica"):
    spec = get_architecture(model)
    g = torch.Generator().manual_seed(seed)
    deltas, fps, layouts = {}, {}, {}
    for layer in layers:
        path = mlp_out_path(spec, layer)
        d_in, d_out = mlp_out_dims(model, spec, layer)
        deltas[path] = ModuleDelta(
            A=torch.randn(rank, d_in, generator=g) * scale, B=torch.randn(d_out, rank, generator=g) * scale
        )
        fps[path] = fingerprint(get_module(model, path).weight)
        layouts[path] = spec.mlp_out_layout
    req = EditRequest("{} is located in", subject, target, "Africa")
    return EditSet(deltas=deltas, requests=[req], method="test", layers=list(layers), fingerprints=fps, layouts=layouts)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])  # Conv1D and Linear layouts
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stacked_revert_is_bit_exact(model_type, dtype):
    model, tok = make_tiny_model(model_type, dtype=dtype)
    hf_knowedit.attach(model, tok)
    w0 = weights(model)
    a = push_edit_set(model, random_set(model, [1, 2], seed=1), name="a")
    w1 = weights(model)
    push_edit_set(model, random_set(model, [2, 3], seed=2, subject="Bob"), name="b")
    push_edit_set(model, random_set(model, [1], seed=3, subject="Carl"), name="c")
    assert [e.name for e in model.list_edits()] == ["a", "b", "c"]
    model.revert_edits("c")
    model.revert_edits("b")
    assert_same(weights(model), w1)
    assert a.name == "a"
    model.revert_edits()
    assert_same(weights(model), w0)
    assert model.list_edits() == []


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_hook_mode_matches_merged_and_leaves_weights(model_type):
    model, tok = make_tiny_model(model_type)
    hf_knowedit.attach(model, tok)
    w0, base = weights(model), logits(model, tok)
    push_edit_set(model, random_set(model, [1, 2]), name="e", merge=True)
    merged = logits(model, tok)
    assert not torch.allclose(base, merged, atol=1e-4)
    model.unmerge_edits()
    assert_same(weights(model), w0)
    hooked = logits(model, tok)
    torch.testing.assert_close(hooked, merged, atol=1e-4, rtol=1e-4)
    with model.disable_edits():
        assert torch.equal(logits(model, tok), base)
    torch.testing.assert_close(logits(model, tok), merged, atol=1e-4, rtol=1e-4)
    model.merge_edits()
    assert count_forward_hooks(model) == 0
    torch.testing.assert_close(logits(model, tok), merged, atol=1e-5, rtol=1e-5)
    with model.disable_edits():
        assert_same(weights(model), w0)
    model.revert_edits()
    assert_same(weights(model), w0)


def test_merge_false_then_revert_removes_hooks():
    model, tok = make_tiny_model("llama")
    hf_knowedit.attach(model, tok)
    w0 = weights(model)
    push_edit_set(model, random_set(model, [0, 3]), merge=False)
    assert count_forward_hooks(model) == 2
    assert_same(weights(model), w0)
    model.revert_edits()
    assert count_forward_hooks(model) == 0


def test_conflicts_and_names():
    model, tok = make_tiny_model("llama")
    hf_knowedit.attach(model, tok)
    push_edit_set(model, random_set(model, [1]), name="first")
    w1 = weights(model)
    with pytest.raises(EditConflictError, match="allow_conflicts"):
        push_edit_set(model, random_set(model, [2], target="Europe"))
    with pytest.raises(KnowEditError, match="already active"):
        push_edit_set(model, random_set(model, [2], subject="Zed"), name="first")
    assert_same(weights(model), w1)
    push_edit_set(model, random_set(model, [2], target="Europe"), allow_conflicts=True)
    with pytest.raises(EditSetNotFoundError, match="first"):
        model.revert_edits("nope")
    model.revert_edits()


def test_non_finite_and_mismatch_leave_model_untouched():
    model, tok = make_tiny_model("llama")
    hf_knowedit.attach(model, tok)
    before = snapshot(model)
    bad = random_set(model, [1, 2])
    bad.deltas[next(iter(bad.deltas))].A[0, 0] = float("nan")
    with pytest.raises(NonFiniteUpdateError):
        push_edit_set(model, bad)
    other = random_set(model, [1, 2])
    for fp in other.fingerprints.values():
        fp["sha256"], fp["sketch"] = "0" * 64, [x + 1.0 for x in fp["sketch"]]
    with pytest.raises(BaseModelMismatchError, match="force=True"):
        push_edit_set(model, other)
    assert_untouched(model, before)
    push_edit_set(model, other, force=True)
    model.revert_edits()
    assert_untouched(model, before)


def test_dense_delta_is_exact():
    delta = torch.randn(5, 3, dtype=torch.float64)
    for d in (delta, delta.t().contiguous()):
        m = ModuleDelta.from_dense(d)
        assert m.dense and m.rank == min(d.shape)
        torch.testing.assert_close(m.delta().double(), d.float().double())
    lowrank = ModuleDelta.from_factors(torch.randn(6, 1), torch.randn(1, 4))
    assert not lowrank.dense and lowrank.rank == 1
    assert ModuleDelta.from_factors(torch.randn(6, 3), torch.randn(3, 4)).dense
