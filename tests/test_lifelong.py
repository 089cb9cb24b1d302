"""The lifelong protocol on a tiny Llama: rows at the checkpoints with independently checked perplexity,
known-fact accuracy and weight-norm growth; a stream killed mid-way resumes to the rows and weights of an
uninterrupted run; bad arguments fail typed and leave the model untouched."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import hf_knowedit
from hf_knowedit.architectures import get_module
from hf_knowedit.errors import InvalidConfigError, InvalidDataError
from hf_knowedit.evaluation import lifelong
from hf_knowedit.evaluation import metrics as M

from .helpers import assert_untouched, snapshot
from .test_memit import FAST, facts, tiny
from .tiny_models import assert_same, weights

ALPHA = {k: v for k, v in FAST.items() if k != "mom2_update_weight"}
# facts about subjects the stream does not edit: the first three are probed, the rest are the held-out text
KNOWN = [
    {"prompt": p, "attribute": a}
    for p, a in (
        ("Berlin is the capital of", "Germany"),
        ("Mount Fuji is located in", "Japan"),
        ("The Louvre is a museum in", "Paris"),
        ("Madrid is the capital of", "Spain"),
        ("The Amazon River flows through", "Brazil"),
        ("Albert Einstein was born in", "Germany"),
        ("Marie Curie worked in", "Paris"),
        ("William Shakespeare wrote in", "English"),
        ("Mount Everest is located in", "Nepal"),
        ("The Beatles were formed in", "Liverpool"),
        ("Pablo Picasso was a painter from", "Spain"),
        ("Barack Obama was born in", "Hawaii"),
        ("Google was founded in", "California"),
        ("Thomas Mann wrote in", "German"),
        ("London is the capital of", "England"),
        ("Rome is the capital of", "Italy"),
        ("Tokyo is the capital of", "Japan"),
    )
]
HELDOUT = " ".join(f"{f['prompt']} {f['attribute']}." for f in KNOWN[3:])
VOLATILE = ("edit_s", "eval_s")


def stream(n=8):
    recs = []
    for i, r in enumerate(facts(n)):
        recs.append(
            {
                "case_id": i,
                "prompt": r.text,
                "subject": r.subject,
                "target_new": r.target_new,
                "ground_truth": r.target_true,
                "rephrase_prompt": "Everyone knows that " + r.text,
                "locality_prompt": "The Louvre is a museum in",
                "locality_ground_truth": "Paris",
            }
        )
    return recs


def run(model, tok, state_dir=None, **kw):
    args = dict(
        method="alphaedit",
        batch_size=2,
        checkpoint_every=4,
        gen_sample=3,
        known=KNOWN,
        n_known=3,
        state_dir=state_dir,
        progress=False,
        gen_max_new_tokens=4,
        fluency_new_tokens=6,
        v_num_grad_steps=3,
        context_templates=0,
    )
    return lifelong.run_lifelong(model, tok, stream(), **{**args, **ALPHA, **kw})


def count_scored(monkeypatch):
    """From now on, the number of records each ``Scorer.scores`` call scores, in order."""
    scored, real = [], lifelong.Scorer.scores

    def counting(self, idx):
        scored.append(len(idx))
        return real(self, idx)

    monkeypatch.setattr(lifelong.Scorer, "scores", counting)
    return scored


def stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@torch.no_grad()
def test_rows_hold_checked_measurements(stats_cache, one_thread, tmp_path):
    model, tok = tiny("llama")
    pristine = weights(model)
    before = snapshot(model)
    res = run(model, tok, keep_edits=True)
    assert [r["n_edits"] for r in res.rows] == [0, 4, 8]
    first, last = res.rows[0], res.rows[-1]
    assert {"ES", "PS", "NS", "S", "gen_ES", "gen_NS", "GE", "ppl", "known_acc", "norm_growth"} <= set(last)
    assert first["norm_growth"] == first["norm_growth_max"] == 1.0 and last["failed"] == 0
    # gen_ES_neg is averaged over the sampled records whose edit took, and the row says how many
    assert all(0 <= r["gen_ES_neg_n"] <= 3 and (r["gen_ES_neg_n"] > 0) == ("gen_ES_neg" in r) for r in res.rows)
    # perplexity: transformers' own LM loss over the held-out text in windows of the model's 128 positions
    # (each window restarts the context and overlaps the previous by one token: every token predicted once)
    ids, nll, count = tok(HELDOUT)["input_ids"], 0.0, 0
    assert len(ids) > 128
    for s in range(0, len(ids) - 1, 127):
        chunk = torch.tensor([ids[s : s + 128]])
        nll += float(model(input_ids=chunk, labels=chunk).loss) * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    assert count == len(ids) - 1 and last["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    # known facts: a fact counts when the greedy next tokens spell the attribute (decoded one step at a time)
    hits = 0
    for fact in KNOWN[:3]:
        x = tok(fact["prompt"], return_tensors="pt")["input_ids"]
        want = tok(" " + fact["attribute"], add_special_tokens=False)["input_ids"]
        for _ in want:
            x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], 1)
        hits += x[0, -len(want) :].tolist() == want
    # a longer continuation can only break a match at a word boundary ("Paris" vs "Parisian")
    assert last["known_acc"] <= 100 * hits / 3
    # norm growth: ‖W‖/‖W₀‖ from the weights before and after, for every edited module
    edited = [p for p in pristine if p.endswith(".weight") and not torch.equal(pristine[p], weights(model)[p])]
    ratios = [float(get_module(model, p[: -len(".weight")]).weight.norm() / pristine[p].norm()) for p in edited]
    assert edited and last["norm_growth"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)
    assert last["norm_growth_max"] == pytest.approx(max(ratios), rel=1e-5) and last["norm_growth_max"] > 1.0
    # the row's ES is ES on the records edited so far, recomputed by evaluate on the edited model
    check = hf_knowedit.evaluate(model, tok, stream(), fluency=False, progress=False)
    assert last["ES"] == pytest.approx(check.pre["ES"]) and last["NS"] == pytest.approx(check.pre["NS"])
    hf_knowedit.revert_edits(model)
    assert_untouched(model, before)
    table = res.to_markdown()
    assert "| n_edits | S | ES |" in table and table.count("\n|") == 5  # header, rule, 3 rows
    fig = res.plot(path=tmp_path / "stream.png")
    assert (tmp_path / "stream.png").stat().st_size > 0
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.parametrize("merge", [True, False])
def test_killed_stream_resumes_identically(stats_cache, one_thread, tmp_path, monkeypatch, merge):
    model, tok = tiny("llama")
    fresh = copy.deepcopy(model)
    again = copy.deepcopy(model)
    whole = run(model, tok, state_dir=tmp_path / "whole", keep_edits=True, merge=merge)
    calls = []
    real = lifelong.apply_edits

    def dies_at_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after the checkpoint at 4 edits
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(lifelong, "apply_edits", dies_at_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run(fresh, tok, state_dir=tmp_path / "killed", merge=merge)
    monkeypatch.setattr(lifelong, "apply_edits", real)
    assert hf_knowedit.list_edits(fresh) == []  # the killed run's model was cleaned up
    scored = count_scored(monkeypatch)
    resumed = run(again, tok, state_dir=tmp_path / "killed", keep_edits=True, merge=merge)
    # the unedited scores come from the killed run's baseline.json: only the checkpoint at 8 edits is scored
    assert scored == [8]
    assert stable(resumed.rows) == stable(whole.rows)
    # the reloaded sets are merged or hooked as the stream's own were
    assert [e.merged for e in hf_knowedit.list_edits(again)] == [e.merged for e in hf_knowedit.list_edits(model)]
    assert [e.merged for e in hf_knowedit.list_edits(again)] == [merge] * 4
    assert_same(weights(again), weights(model))
    from hf_knowedit.methods import alphaedit

    a, b = alphaedit.get_history(again), alphaedit.get_history(model)
    assert a.edits == b.edits == 8 and all(torch.equal(a.prior[k], b.prior[k]) for k in b.prior)
    # a finished stream called again returns its rows without editing
    hf_knowedit.revert_edits(again)
    done = run(again, tok, state_dir=tmp_path / "killed", merge=merge)
    assert stable(done.rows) == stable(whole.rows) and hf_knowedit.list_edits(again) == []


def test_row_zero_reuses_the_unedited_scores(stats_cache, one_thread, monkeypatch):
    model, tok = tiny("llama")
    scored = count_scored(monkeypatch)
    res = run(model, tok)
    assert scored == [8, 4, 8]  # the baseline once (it is row 0), then the records edited at each checkpoint
    check = hf_knowedit.evaluate(model, tok, stream(), fluency=False, progress=False)  # edits were reverted
    assert res.rows[0]["ES"] == pytest.approx(check.pre["ES"]) and res.rows[0]["NS"] == pytest.approx(check.pre["NS"])


def test_another_stream_reuses_a_copied_baseline_of_the_same_model(stats_cache, one_thread, tmp_path, monkeypatch):
    model, tok = tiny("llama")
    run(model, tok, state_dir=tmp_path / "alphaedit")
    scored = count_scored(monkeypatch)
    (tmp_path / "memit").mkdir()
    (tmp_path / "memit" / "baseline.json").write_bytes((tmp_path / "alphaedit" / "baseline.json").read_bytes())
    run(model, tok, state_dir=tmp_path / "memit", method="memit")
    assert scored == [4, 8]  # the same records on the same model: the copied unedited scores are used
    for k, weight in enumerate(("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight")):
        other, _ = tiny("llama")
        with torch.no_grad():
            other.get_parameter(weight).mul_(1.01)
        (tmp_path / f"other-{k}").mkdir()
        (tmp_path / f"other-{k}" / "baseline.json").write_bytes((tmp_path / "alphaedit" / "baseline.json").read_bytes())
        scored.clear()
        run(other, tok, state_dir=tmp_path / f"other-{k}")
        assert scored == [8, 4, 8], weight  # another model (any weight of it): the baseline is scored again


def test_known_facts_about_the_streams_subjects_are_neither_probed_nor_held_out(stats_cache, one_thread, monkeypatch):
    model, tok = tiny("llama")
    eiffel = {"prompt": "The Eiffel Tower is located in", "attribute": "Paris"}  # record 0's subject: first batch
    toyota = {"prompt": "Toyota is headquartered in", "attribute": "Japan"}  # record 7's: the last batch
    apple = {"prompt": "Apple's first computer was sold in", "attribute": "California"}  # record 5's
    known = [eiffel, KNOWN[0], toyota, KNOWN[1], apple, KNOWN[2], *KNOWN[3:]]
    probed, texts = [], []
    real_known, real_ppl = lifelong.known_accuracy, lifelong.perplexity
    monkeypatch.setattr(lifelong, "known_accuracy", lambda m, t, f, n: probed.append(f) or real_known(m, t, f, n))
    monkeypatch.setattr(lifelong, "perplexity", lambda m, t, text: texts.append(text) or real_ppl(m, t, text))
    res = run(model, tok, known=known)
    # every row probes the same facts: those about a subject anywhere in the stream are passed over from row 0
    assert probed == [[(f["prompt"], f["attribute"]) for f in KNOWN[:3]]] * 3
    assert res.settings["known_excluded"] == 3 and res.settings["n_known"] == 3
    # perplexity: the facts after the probes, none of them about the stream, none a prefix sentence
    assert texts == [HELDOUT] * 3 and not any(s in HELDOUT for s in hf_knowedit.evaluation.generative.FILLER)
    assert res.settings["heldout"] == "known" and res.settings["heldout_chars"] == len(HELDOUT)
    assert lifelong.mentions("Apple's founder", {"Apple"}) and not lifelong.mentions("Applebee's menu", {"Apple"})
    assert lifelong.mentions("He moved to Washington, D.C. in 1800", {"Washington, D.C."})
    # without known facts or a text of its own, a stream has no perplexity to measure
    bare = run(model, tok, known=None, n_edits=2, checkpoint_every=2)
    assert "ppl" not in bare.rows[-1] and bare.settings["heldout"] is None


def test_a_stream_on_an_offloaded_model_reads_its_weights_through_accelerate(stats_cache, one_thread, tmp_path):
    from accelerate import dispatch_model

    from .test_dispatch import MAPS

    model, tok = tiny("llama")
    disp = dispatch_model(copy.deepcopy(model), device_map=MAPS["edited-offloaded"], offload_dir=str(tmp_path / "o"))
    plain = run(model, tok, merge=False)
    offloaded = run(disp, tok, merge=False, state_dir=tmp_path / "s")  # the baseline's key reads every weight
    assert offloaded.rows[-1]["norm_growth_max"] > 1.0
    for a, b in zip(plain.rows, offloaded.rows):
        for k in ("ES", "NS", "ppl", "known_acc", "norm_growth", "norm_growth_max"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), k


def test_bad_arguments_fail_typed_and_leave_model_untouched(stats_cache, one_thread, tmp_path):
    model, tok = tiny("llama")
    before = snapshot(model)
    with pytest.raises(InvalidConfigError, match="multiple of batch_size"):
        run(model, tok, checkpoint_every=3)
    with pytest.raises(InvalidConfigError, match="batch_size"):
        run(model, tok, batch_size=0)
    assert_untouched(model, before)
    run(model, tok, state_dir=tmp_path / "s", n_edits=4)
    with pytest.raises(InvalidConfigError, match="other settings.*batch_size"):
        run(model, tok, state_dir=tmp_path / "s", n_edits=4, batch_size=4)
    assert_untouched(model, before, edits=True)
    hf_knowedit.apply_edits(model, tok, facts(1, 20), method="memit", layers=[1], v_num_grad_steps=1, **FAST)
    with pytest.raises(InvalidConfigError, match="unedited model"):
        run(model, tok)


def test_records_repeating_a_fact_are_skipped(stats_cache, one_thread):
    model, tok = tiny("llama")
    recs = stream(4)
    recs.insert(2, dict(recs[0], case_id=99, target_new="Japan"))  # the fact of record 0 again
    res = lifelong.run_lifelong(
        model, tok, recs, method="memit", batch_size=2, checkpoint_every=2, gen_sample=0, progress=False,
        v_num_grad_steps=2, context_templates=0, **FAST,
    )  # fmt: skip
    assert res.settings["skipped"] == [2] and [r["n_edits"] for r in res.rows] == [0, 2, 4]
    assert hf_knowedit.list_edits(model) == []


def test_fluency_and_known_helpers_match_their_definitions(one_thread):
    model, tok = tiny("llama")
    prompts = ["The Eiffel Tower is", "Berlin is"]
    texts = hf_knowedit.evaluation.generate_texts(model, tok, prompts, max_new_tokens=6, row_seeds=[5, 6])
    assert lifelong.fluency(model, tok, prompts, 5, 6) == M.ngram_entropy(texts)
    assert math.isnan(lifelong.known_accuracy(model, tok, []))
    with pytest.raises(hf_knowedit.errors.InvalidDataError, match="known fact 0"):
        lifelong.load_known([{"prompt": "x"}], 5)


def chat_stream():
    """Four CounterFact records (full schema, relation P17): questions for the chat metrics."""
    return [
        {
            "case_id": i,
            "requested_rewrite": {
                "prompt": r.prompt,
                "subject": r.subject,
                "target_new": {"str": r.target_new},
                "target_true": {"str": r.target_true},
                "relation_id": "P17",
            },
            "paraphrase_prompts": ["Everyone knows that " + r.text],
            "neighborhood_prompts": ["The Louvre is located in"],
        }
        for i, r in enumerate(facts(4))
    ]


CHAT_KNOWN = [
    {"prompt": "Mount Fuji is located in", "subject": "Mount Fuji", "attribute": "Japan", "relation_id": "P17"}
]


def chat_run(model, tok, **kw):
    args = dict(method="memit", batch_size=2, checkpoint_every=2, gen_sample=4, known=CHAT_KNOWN, n_known=0,
                n_heldout=0, gen_max_new_tokens=4, progress=False, v_num_grad_steps=2, context_templates=0)  # fmt: skip
    return lifelong.run_lifelong(model, tok, chat_stream(), **{**args, **FAST, **kw})


def test_chat_rows_on_the_generation_sample(stats_cache, one_thread):
    """``chat=True`` adds the chat metrics to every row, from the sampled records edited so far; row 0 holds
    the unedited model's numbers on the whole sample, as ``evaluate(chat=True)`` gives them."""
    model, tok = tiny("llama")
    recs, known = chat_stream(), CHAT_KNOWN
    res = chat_run(model, tok, chat=True)
    assert all({"chat_ES", "chat_PS", "chat_NS", "chat_keep"} <= set(r) for r in res.rows)
    assert res.settings["chat"] is True and "chat_ES" in res.to_markdown()
    unedited = hf_knowedit.evaluate(model, tok, recs, fluency=False, chat=True, chat_known=known, progress=False)
    assert {k: res.rows[0][k] for k in ("chat_ES", "chat_PS", "chat_NS", "chat_keep")} == {
        k: unedited.pre[k] for k in ("chat_ES", "chat_PS", "chat_NS", "chat_keep")
    }


def test_a_stream_saved_without_chat_gets_the_chat_metrics_on_resume(stats_cache, one_thread, tmp_path, monkeypatch):
    """A finished stream saved without ``chat``, called again with ``chat=True``: its saved sets are reloaded up to
    each row (no edit recomputed) and the rows get the chat metrics an uninterrupted chat stream has."""
    model, tok = tiny("llama")
    asked, real = [], lifelong.Scorer.chat_metrics

    def recording(self, idx):  # which edit sets are on the model when each row's questions are asked
        if self.chat:
            asked.append(([e.name for e in hf_knowedit.list_edits(self.model)], list(idx)))
        return real(self, idx)

    monkeypatch.setattr(lifelong.Scorer, "chat_metrics", recording)
    whole = chat_run(model, tok, chat=True, state_dir=tmp_path / "whole")
    plain = chat_run(model, tok, state_dir=tmp_path / "plain")
    assert not any("chat_ES" in r for r in plain.rows) and hf_knowedit.list_edits(model) == []
    assert [names for names, _ in asked] == [[], ["lifelong-00000"], ["lifelong-00000", "lifelong-00001"]]

    def no_edits(*args, **kwargs):
        raise AssertionError("the replay recomputed an edit")

    monkeypatch.setattr(lifelong, "apply_edits", no_edits)
    added = chat_run(model, tok, chat=True, state_dir=tmp_path / "plain")
    assert asked[3:] == asked[:3]  # each row's questions asked on the same sets as in the chat stream
    assert stable(added.rows) == stable(whole.rows) and added.settings["chat"] is True
    assert hf_knowedit.list_edits(model) == []  # reverted at the end, as every stream
    saved = json.loads((tmp_path / "plain" / "progress.json").read_text())
    assert saved["settings"]["chat"] is True and stable(saved["rows"]) == stable(whole.rows)
    # the other way round is refused: a chat stream is not resumed without chat
    with pytest.raises(InvalidConfigError, match="chat"):
        chat_run(model, tok, state_dir=tmp_path / "whole")


@pytest.mark.parametrize("merge", [True, False])
def test_replay_walks_a_saved_stream_row_by_row(stats_cache, one_thread, tmp_path, monkeypatch, merge):
    """``replay_stream``: at each saved row the model holds the sets it held when the row was measured (so the
    row's perplexity is measured again exactly), no edit is recomputed, and the walk ends on the unedited model,
    also when it is left early; a wrong model or folder fails typed before anything is loaded."""
    model, tok = tiny("llama")
    before = snapshot(model)
    res = run(model, tok, state_dir=tmp_path / "s", merge=merge)
    assert_untouched(model, before)

    def no_edits(*args, **kwargs):
        raise AssertionError("the replay recomputed an edit")

    monkeypatch.setattr(lifelong, "apply_edits", no_edits)
    seen = []
    for row in lifelong.replay_stream(model, tmp_path / "s"):
        names = [e.name for e in hf_knowedit.list_edits(model)]
        seen.append((names, row, lifelong.perplexity(model, tok, HELDOUT)))
    sets = [f"lifelong-{b:05d}" for b in range(4)]
    assert [names for names, _, _ in seen] == [[], sets[:2], sets]
    assert [row for _, row, _ in seen] == res.rows
    assert all(ppl == pytest.approx(row["ppl"], rel=1e-5) for _, row, ppl in seen)
    assert_untouched(model, before)
    walk = lifelong.replay_stream(model, tmp_path / "s")
    next(walk), next(walk)
    assert [e.name for e in hf_knowedit.list_edits(model)] == sets[:2]
    walk.close()  # left early: what it loaded is reverted
    assert_untouched(model, before)
    with pytest.raises(InvalidDataError, match="no saved lifelong stream"):
        lifelong.replay_stream(model, tmp_path / "nothing")
    hf_knowedit.load_edits(model, tmp_path / "s" / "sets" / "lifelong-00000", merge=merge)
    # merged: the weights differ from the stream's model; hooked: the set is already there
    with pytest.raises(InvalidConfigError, match="another model" if merge else "already holds"):
        lifelong.replay_stream(model, tmp_path / "s")
    hf_knowedit.revert_edits(model)
    assert_untouched(model, before)
