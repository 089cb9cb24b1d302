"""Scoped hooks: retain, edit, stop, always removed."""

import pytest
import torch

from hf_knowedit.architectures import get_architecture, layer_path, mlp_out_path
from hf_knowedit.hooks import Trace, TraceDict, count_forward_hooks, hidden
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model("llama")


def test_retain_input_output_and_removal(tiny):
    model, tok = tiny
    spec = get_architecture(model)
    ids = tok("Angola is located in", return_tensors="pt")
    paths = [mlp_out_path(spec, 0), mlp_out_path(spec, 1)]
    with TraceDict(model, paths, retain_input=True) as td:
        model(**ids)
    assert count_forward_hooks(model) == 0
    for p in paths:
        assert td[p].input.shape[-1] == model.config.intermediate_size
        assert td[p].output.shape[-1] == model.config.hidden_size


def test_edit_output_changes_logits(tiny):
    model, tok = tiny
    spec = get_architecture(model)
    ids = tok("Angola is located in", return_tensors="pt")
    with torch.no_grad():
        clean = model(**ids).logits
        with Trace(model, mlp_out_path(spec, 1), edit_output=lambda out, name: out + 1.0):
            edited = model(**ids).logits
        again = model(**ids).logits
    assert not torch.allclose(clean, edited)
    assert torch.equal(clean, again)


def test_stop_ends_forward_early_and_hooks_removed_after_exception(tiny):
    model, tok = tiny
    spec = get_architecture(model)
    ids = tok("Angola is located in", return_tensors="pt")
    seen = []
    with Trace(model, layer_path(spec, 1), retain_output=False, edit_output=lambda o, n: seen.append(n) or o):
        with Trace(model, layer_path(spec, 0), stop=True) as t:
            model(**ids)
    assert hidden(t.output).shape[-1] == model.config.hidden_size
    assert seen == []  # layer 1 never ran
    with pytest.raises(RuntimeError):
        with Trace(model, layer_path(spec, 0), edit_output=lambda o, n: (_ for _ in ()).throw(RuntimeError("x"))):
            model(**ids)
    assert count_forward_hooks(model) == 0


def test_a_trace_being_registered_does_not_break_another_threads_forward():
    """torch adds a ``with_kwargs`` hook to ``_forward_hooks`` before it flags it; a forward in another thread
    between the two calls it as ``(module, args, output)``. The gap is recreated by removing the flag."""
    import threading

    layer = torch.nn.Linear(4, 4)
    with Trace(layer, layer) as tr:
        flag = layer._forward_hooks_with_kwargs.pop(tr._handle.id)
        errors, outputs = [], []

        def other():
            try:
                outputs.append(layer(torch.ones(1, 4)))
            except Exception as err:  # noqa: BLE001 - the assertion reports it
                errors.append(err)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        layer._forward_hooks_with_kwargs[tr._handle.id] = flag
    assert not errors and torch.equal(outputs[0], torch.ones(1, 4) @ layer.weight.t() + layer.bias)
    assert tr.output is None  # the other thread's forward was not traced
