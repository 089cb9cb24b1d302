"""Every change of edit state happens whole or not at all, whatever fails and wherever (hf_knowedit.stack).

A fault is injected at the k-th call, for every k, of what an operation calls that can fail: tensor
allocations, weight writes, hook registration and hook removal. The fault is an out-of-memory error,
or a ``BaseException`` such as a SIGTERM / SIGALRM handler raises (or a timeout library raises into a
thread). After each failed call: the error propagates; weights, forward hooks (and their order),
forward output, pristine copies, the edit stack and AlphaEdit's history are exactly as before; the
model is not left disabled. Afterwards the same operation, unfaulted, gives what it gives on a model
that never saw a fault.
"""

from __future__ import annotations

import contextlib
import signal

import pytest
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

import hf_knowedit
from hf_knowedit import stack
from hf_knowedit.deltas import ModuleDelta
from hf_knowedit.methods.alphaedit import HISTORY_KEY
from tests.test_transactions import ALPHA, FACT, PATHS, random_set
from tests.tiny_models import make_tiny_model, weights

pytestmark = pytest.mark.usefixtures("one_thread", "stats_cache")

IDS = torch.tensor([[1, 5, 9, 13, 2, 7]])
OTHER = dict(FACT, subject="Spain", target_new="Mars")

#: what the library calls that can fail: allocations, weight writes, hook registration and removal
FAULT_POINTS = [
    (torch.Tensor, "clone"),
    (torch.Tensor, "float"),
    (torch.Tensor, "to"),
    (torch.Tensor, "copy_"),
    (ModuleDelta, "delta"),
    (torch, "isfinite"),
    (stack, "LowRankHook"),
    (stack, "write_tensor"),
    (nn.Module, "register_forward_hook"),
    (RemovableHandle, "remove"),
]


class Alarm(BaseException):
    """What a signal handler that raises (SIGTERM, SIGALRM) or an exception raised into a thread looks like."""


def oom(message: str) -> BaseException:
    return torch.OutOfMemoryError(message)


class Faults:
    """Wraps every fault point; while :meth:`armed`, counts calls and raises at call number ``fail_at``."""

    def __init__(self, monkeypatch, error) -> None:
        self.calls, self.fail_at, self.error, self._armed = 0, None, error, False
        for owner, name in FAULT_POINTS:
            real = getattr(owner, name)

            def wrapped(*args, _real=real, **kwargs):
                if self._armed:
                    self.calls += 1
                    if self.calls == self.fail_at:
                        raise self.error("injected fault")
                return _real(*args, **kwargs)

            monkeypatch.setattr(owner, name, wrapped)

    @contextlib.contextmanager
    def armed(self):
        self._armed = True
        try:
            yield
        finally:
            self._armed = False


def build():
    """A model with an AlphaEdit set (merged, with history), and random sets: two hooked on one module
    (their hooks' order matters), one merged on a module with hooks."""
    model, tok = make_tiny_model("llama")
    hf_knowedit.attach(model, tok)
    model.apply_edits(FACT, "alphaedit", layers=[1, 2], name="alpha", **ALPHA)
    stack.push_edit_set(model, random_set(model, 1), merge=False, name="hooked")
    stack.push_edit_set(model, random_set(model, 2, paths=PATHS[:1]), merge=False, name="hooked-too")
    stack.push_edit_set(model, random_set(model, 3, paths=PATHS[1:]), merge=True, name="merged")
    return model, tok


def observe(model):
    """Everything a failed call must leave exactly as it was."""
    state = stack.get_state(model)
    with torch.no_grad():
        out = model(input_ids=IDS).logits.clone()
    return {
        "weights": weights(model),
        "logits": out,
        "edits": hf_knowedit.list_edits(model),
        "sets": [(n, a.merged, id(a.edit_set), list(a.hooks)) for n, a in state.sets.items()],
        "hooks": {n: list(m._forward_hooks) for n, m in model.named_modules() if m._forward_hooks},
        "base": {p: t.clone() for p, t in state.base.items()},
        "history": (state.history.get(HISTORY_KEY), state.history[HISTORY_KEY].edits),
        "disabled": state.disabled,
    }


def assert_same(now, before):
    assert now["edits"] == before["edits"] and now["sets"] == before["sets"]
    assert now["hooks"] == before["hooks"], "hooks added, lost or reordered"
    assert now["history"][0] is before["history"][0] and now["history"][1] == before["history"][1]
    assert now["disabled"] == before["disabled"] == 0
    for key in ("weights", "base"):
        assert now[key].keys() == before[key].keys()
        assert all(torch.equal(now[key][k], v) for k, v in before[key].items()), key
    assert torch.equal(now["logits"], before["logits"])


def _disable_enter(model, tok, faults):
    block = hf_knowedit.disable_edits(model)
    with faults.armed():
        block.__enter__()
    block.__exit__(None, None, None)


def _disable_exit(model, tok, faults):
    block = hf_knowedit.disable_edits(model)
    block.__enter__()
    with faults.armed():
        block.__exit__(None, None, None)


def _armed(call):
    def op(model, tok, faults):
        with faults.armed():
            call(model, tok)

    return op


OPS = {
    # the whole call: the method's statistics pass runs inside disable_edits, and its commit updates the history
    "apply_edits": _armed(lambda m, tok: m.apply_edits(OTHER, "alphaedit", layers=[1, 2], **ALPHA)),
    "load_edits": _armed(lambda m, tok: m.load_edits(random_set(m, 4), name="loaded")),
    "load_edits_hooked": _armed(lambda m, tok: m.load_edits(random_set(m, 4), name="loaded", merge=False)),
    "revert_edits": _armed(lambda m, tok: m.revert_edits()),
    "revert_one_hooked": _armed(lambda m, tok: m.revert_edits("hooked")),
    "merge_edits": _armed(lambda m, tok: m.merge_edits()),
    "unmerge_edits": _armed(lambda m, tok: m.unmerge_edits()),
    "disable_edits_enter": _disable_enter,
    "disable_edits_exit": _disable_exit,
    "merge_and_unload": _armed(lambda m, tok: m.merge_and_unload()),
}


@pytest.mark.parametrize("error", [oom, Alarm], ids=["out-of-memory", "raising-handler"])
@pytest.mark.parametrize("op", list(OPS))
def test_a_fault_anywhere_in_an_operation_changes_nothing(op, error, monkeypatch):
    faults = Faults(monkeypatch, error)
    clean, tok = build()
    OPS[op](clean, tok, faults)  # counts the calls an unfaulted run makes
    calls = faults.calls
    assert calls > 0, f"{op} made no call a fault could hit"
    model, tok = build()
    before = observe(model)
    k = 0
    while True:  # fault at call 1, 2, ... until the call completes (a cache a failed try filled may save calls)
        k += 1
        faults.calls, faults.fail_at = 0, k
        try:
            OPS[op](model, tok, faults)
        except BaseException as err:
            assert isinstance(err, torch.OutOfMemoryError if error is oom else error), err
            assert_same(observe(model), before)
            continue
        assert faults.calls < k, f"the fault at call {k} was swallowed"
        break  # not stuck: the same call, unfaulted, works
    assert k > calls // 2, (k, calls)
    after, expected = observe(model), observe(clean)
    assert [e.to_dict() for e in after["edits"]] == [e.to_dict() for e in expected["edits"]]
    assert all(torch.equal(after["weights"][k], v) for k, v in expected["weights"].items())
    assert torch.equal(after["logits"], expected["logits"])
    assert after["history"][1] == expected["history"][1]


def test_a_signal_handler_that_raises_mid_switch_waits_for_the_switch(monkeypatch):
    """A SIGALRM handler raising while weights are written (as a timeout would): the switch completes,
    then the handler runs and its exception propagates; the stack is never left halfway."""
    model, _ = build()
    base, _ = make_tiny_model("llama")
    real, fired = stack.write_tensor, []

    def write_and_signal(*args, **kwargs):
        real(*args, **kwargs)
        if not fired:
            fired.append(True)
            signal.raise_signal(signal.SIGALRM)  # the handler runs at the next bytecode, mid-switch

    def handler(signum, frame):
        raise Alarm("timeout")

    previous = signal.signal(signal.SIGALRM, handler)
    monkeypatch.setattr(stack, "write_tensor", write_and_signal)
    try:
        with pytest.raises(Alarm):
            hf_knowedit.revert_edits(model)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert fired and hf_knowedit.list_edits(model) == []  # the switch completed
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in weights(model).items())
    assert not stack.get_state(model).base and not any(m._forward_hooks for m in model.modules() if m is not model)
