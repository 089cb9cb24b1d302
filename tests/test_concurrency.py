"""Safety of the edit stack under threads, interrupts and copies: the forward gate after an interrupted
forward, hooked sets reached by several threads at once, base-model passes that other threads never see,
``generate`` never straddling a switch, and models with hf_knowedit state under ``copy`` and ``pickle``.

Every test that could hang on a regression runs its waiting side in a daemon thread joined with a timeout.
"""

from __future__ import annotations

import threading

import pytest
import torch

import hf_knowedit
from hf_knowedit import stack
from tests.test_transactions import random_set
from tests.tiny_models import make_tiny_model

IDS = torch.tensor([[1, 5, 9, 13, 2, 7]])
#: seconds a switch may take here before the test calls it stuck (it takes milliseconds)
STUCK = 15.0


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.clone()


def in_thread(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` in a daemon thread; True if it finished within :data:`STUCK` seconds
    (its error, if any, is raised here)."""
    errors = []

    def run():
        try:
            fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(STUCK)
    if errors:
        raise errors[0]
    return not thread.is_alive()


# -----------------------------------------------------------------------------
# A. an interrupted forward leaves no reader behind


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_a_switch_after_an_interrupted_forward_does_not_wait_forever(interrupt):
    """torch runs ``always_call`` hooks for ``Exception`` only: a Ctrl-C inside a forward skipped the gate's
    exit, and the next switch from another thread waited for that forward for ever, holding the model lock."""
    model, tok = make_tiny_model("llama")
    hf_knowedit.attach(model, tok)

    def stop(module, args, output):
        raise interrupt

    handle = model.model.layers[1].register_forward_hook(stop)
    with pytest.raises(interrupt):
        logits(model)
    handle.remove()
    assert in_thread(stack.push_edit_set, model, random_set(model, 1), merge=True, name="a"), "the switch hung"
    assert [e.name for e in hf_knowedit.list_edits(model)] == ["a"]


def test_an_interrupted_forward_in_a_thread_that_lives_on_does_not_block_switches():
    """The same from a serving thread that catches the interrupt and stays alive (idle)."""
    model, tok = make_tiny_model("llama")
    hf_knowedit.attach(model, tok)
    interrupted, release = threading.Event(), threading.Event()

    def stop(module, args, output):
        if threading.current_thread() is not threading.main_thread():
            raise KeyboardInterrupt

    def serve():
        try:
            logits(model)
        except KeyboardInterrupt:
            interrupted.set()
        release.wait(STUCK)

    handle = model.model.layers[1].register_forward_hook(stop)
    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        assert interrupted.wait(STUCK)
        handle.remove()
        assert in_thread(stack.push_edit_set, model, random_set(model, 1), merge=True, name="a"), "the switch hung"
    finally:
        release.set()
        server.join(STUCK)


# -----------------------------------------------------------------------------
# B. a hooked set's first forward on a device, from two threads at once


def test_two_first_forwards_at_once_apply_a_hooked_set_once(monkeypatch):
    """Both threads found no factors on the device and both added their copies: the set acted twice,
    for good. Here both are held at the copy until the other has arrived there too."""
    model, tok = make_tiny_model("llama")
    hf_knowedit.attach(model, tok)
    es = stack.push_edit_set(model, random_set(model, 1), merge=False, name="a")
    watched = next(iter(es.deltas.values())).B
    arrived = {"n": 0}
    both = threading.Condition()
    real_to = torch.Tensor.to

    def rendezvous_to(self, *args, **kwargs):
        if self is watched and threading.current_thread().name.startswith("first-forward"):
            with both:  # hold until the other thread copies too (or give up after a while)
                arrived["n"] += 1
                both.notify_all()
                both.wait_for(lambda: arrived["n"] >= 2, timeout=5.0)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", rendezvous_to)
    outs = [None, None]

    def forward(i):
        outs[i] = logits(model)

    threads = [threading.Thread(target=forward, args=(i,), name=f"first-forward-{i}", daemon=True) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(STUCK)
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    assert arrived["n"] == 2  # the interleaving happened
    after = logits(model)
    hf_knowedit.merge_edits(model)
    merged = logits(model)
    for out in (*outs, after):
        torch.testing.assert_close(out, merged, rtol=1e-4, atol=1e-5)
