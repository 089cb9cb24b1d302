"""Safety of the edit stack under threads, interrupts and copies: the forward gate after an interrupted
forward, hooked sets reached by several threads at once, base-model passes that other threads never see,
``generate`` never straddling a switch, and models with hf_knowedit state under ``copy`` and ``pickle``.

Every test that could hang on a regression runs its waiting side in a daemon thread joined with a timeout.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch
from accelerate import dispatch_model
from transformers import LogitsProcessor, LogitsProcessorList

import hf_knowedit
from hf_knowedit import stack
from hf_knowedit.errors import NotPicklableError
from hf_knowedit.hooks import count_forward_hooks
from hf_knowedit.methods import context, statistics
from tests.test_dispatch import MAPS
from tests.test_transactions import PATHS, random_set
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


# -----------------------------------------------------------------------------
# C. hf_knowedit's base-model passes are private to their thread; generate never straddles a switch


def _edited_model():
    """A tiny model with a merged set (layers 1, 2) and a hooked one (layer 2), and its logits."""
    model, tok = make_tiny_model("llama")
    hf_knowedit.attach(model, tok)
    stack.push_edit_set(model, random_set(model, 1, scale=0.3), merge=True, name="merged")
    stack.push_edit_set(model, random_set(model, 2, paths=PATHS[1:], scale=0.3), merge=False, name="hooked")
    return model, tok, logits(model)


def _seen_from_another_thread(model, seen):
    """A forward in another thread, now (while this thread is inside a pass); its logits go to ``seen``."""
    assert in_thread(lambda: seen.append(logits(model))), "the other thread's forward hung"


def test_the_statistics_pass_runs_the_base_model_for_its_own_thread_only(monkeypatch):
    """The pass ran under disable_edits: for its whole length every serving thread got the unedited model."""
    model, tok, edited = _edited_model()
    fresh, _ = make_tiny_model("llama")
    corpus = ("Paris is the capital of France. The cat sat on the mat. " * 20).split(". ")
    stats = dict(corpus=corpus, n_tokens=200, cache=False, batch_tokens=64)
    seen = []
    real = statistics.add_outer_blocks

    def add_and_look(*args):
        _seen_from_another_thread(model, seen)
        return real(*args)

    monkeypatch.setattr(statistics, "add_outer_blocks", add_and_look)
    c = statistics.compute_second_moment(model, tok, 3, **stats)
    monkeypatch.setattr(statistics, "add_outer_blocks", real)
    assert seen and all(torch.equal(s, edited) for s in seen)
    expected = statistics.compute_second_moment(fresh, tok, 3, **stats)
    assert torch.equal(c.matrix, expected.matrix)  # exactly the unedited model's statistics
    assert torch.equal(logits(model), edited)


def test_context_templates_come_from_the_base_model_for_their_own_thread_only(monkeypatch):
    model, tok, edited = _edited_model()
    fresh, _ = make_tiny_model("llama")
    seen = []
    real = context.generate_texts

    def look_and_generate(*args, **kwargs):
        _seen_from_another_thread(model, seen)
        return real(*args, **kwargs)

    monkeypatch.setattr(context, "generate_texts", look_and_generate)
    templates = context.context_templates(model, tok, n=3, length=6)
    reference = context.reference_templates(model, tok, "memit", [[6, 5]])
    monkeypatch.setattr(context, "generate_texts", real)
    assert seen and all(torch.equal(s, edited) for s in seen)
    assert templates == context.context_templates(fresh, tok, n=3, length=6)
    assert reference == context.reference_templates(fresh, tok, "memit", [[6, 5]])


def test_base_view_outputs_equal_disable_edits_bit_for_bit():
    model, _, edited = _edited_model()
    hooks = count_forward_hooks(model)
    with model.disable_edits():
        base = logits(model)
    with stack.base_view(model):
        assert torch.equal(logits(model), base)
        assert torch.equal(in_thread_logits(model), edited)
    assert torch.equal(logits(model), edited)
    assert count_forward_hooks(model) == hooks  # base_view's own are gone


@pytest.mark.parametrize("map_name", ["edited-offloaded", "split"])
def test_base_view_on_a_dispatched_model_reads_offloaded_weights(map_name, tmp_path):
    """Offloaded modules are on ``meta`` between forwards: the pristine weight comes from the stack's copy and
    the other parameters from what accelerate loads."""
    model, _ = make_tiny_model("llama")
    disp = dispatch_model(copy.deepcopy(model), device_map=MAPS[map_name], offload_dir=str(tmp_path))
    stack.push_edit_set(disp, random_set(disp, 1, scale=0.3), merge=True, name="merged")
    stack.push_edit_set(disp, random_set(disp, 2, paths=PATHS[1:], scale=0.3), merge=False, name="hooked")
    with stack.disable_edits(disp):
        base = logits(disp)
    with stack.base_view(disp):
        assert torch.equal(logits(disp), base)
    assert torch.equal(base, logits(model)) and not torch.equal(logits(disp), base)


def in_thread_logits(model):
    out = []
    assert in_thread(lambda: out.append(logits(model)))
    return out[0]


class _SwitchMidway(LogitsProcessor):
    """At the first generation step, start an edit in another thread and give it time to finish."""

    def __init__(self, model):
        self.model, self.switcher = model, None

    def __call__(self, input_ids, scores):
        if self.switcher is None:
            es = random_set(self.model, 7, scale=0.3)
            self.switcher = threading.Thread(
                target=stack.push_edit_set, args=(self.model, es), kwargs={"name": "midway"}, daemon=True
            )
            self.switcher.start()
            self.switcher.join(2.0)  # done at once if nothing holds it back; else it waits for this generate
        return scores


def test_one_generate_call_never_straddles_a_switch():
    """Before, an edit could land between two tokens of one generate: the KV cache from the old weights,
    later tokens from the new. Now a switch waits for generate calls in flight."""
    model, tok = make_tiny_model("llama")
    hf_knowedit.attach(model, tok)
    fresh, _ = make_tiny_model("llama")
    options = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    options.update(output_scores=True, return_dict_in_generate=True)
    probe = _SwitchMidway(model)
    with torch.no_grad():
        out = model.generate(input_ids=IDS, logits_processor=LogitsProcessorList([probe]), **options)
        want = fresh.generate(input_ids=IDS, **options)
    probe.switcher.join(STUCK)
    assert [e.name for e in hf_knowedit.list_edits(model)] == ["midway"]  # the edit happened, after
    assert torch.equal(out.sequences, want.sequences)
    for got, expected in zip(out.scores, want.scores):
        torch.testing.assert_close(got, expected)


# -----------------------------------------------------------------------------
# D. copies and pickles of a model with hf_knowedit state


def test_a_deep_copy_is_an_independent_model_with_its_own_state():
    model, tok, edited = _edited_model()
    base = make_tiny_model("llama")[0]
    twin = copy.deepcopy(model)
    mine, its = stack.get_state(model), stack.get_state(twin)
    assert its is not mine and its.lock is not mine.lock and its.gate is not mine.gate
    assert [(e.name, e.merged) for e in hf_knowedit.list_edits(twin)] == [("merged", True), ("hooked", False)]
    assert torch.equal(logits(twin), edited) and count_forward_hooks(twin) == count_forward_hooks(model)
    with model.disable_edits():  # the original's state does not reach the copy's hooked set
        assert torch.equal(logits(twin), edited)
    twin.revert_edits()  # the copy reverts to the pristine weights, the original keeps its edits
    assert all(torch.equal(v, w) for v, w in zip(twin.state_dict().values(), base.state_dict().values()))
    assert torch.equal(logits(twin), logits(base)) and count_forward_hooks(twin) == 0
    assert torch.equal(logits(model), edited) and len(hf_knowedit.list_edits(model)) == 2
    assert twin.generate.__self__ is twin and twin.list_edits.__self__ is twin  # methods bound to the copy
    with its.gate.switching():  # the copy's switch holds back the copy's forwards, not the original's
        assert in_thread(logits, model)


@pytest.mark.parametrize("attached", [True, False])
def test_pickling_a_model_with_state_says_what_to_do(attached):
    model, tok = make_tiny_model("llama")
    if attached:
        hf_knowedit.attach(model, tok)
    stack.push_edit_set(model, random_set(model, 1), merge=False, name="a")
    for dump in (pickle.dumps, lambda m: torch.save(m, io.BytesIO())):
        with pytest.raises(NotPicklableError, match="detach"):
            dump(model)
    hf_knowedit.revert_edits(model)
    hf_knowedit.detach(model)
    again = pickle.loads(pickle.dumps(model))  # without state it pickles as any model
    assert torch.equal(logits(again), logits(model))
