"""Evaluation: metrics on hand-made scores and crafted logits, padding-side invariance,
multi-token targets, protocols (failed edits count as failed), typed errors for bad records."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, normalizers
from torch import nn
from transformers import PreTrainedTokenizerFast

import hf_knowedit
from hf_knowedit.architectures import mlp_out_dims, mlp_out_path, num_layers
from hf_knowedit.deltas import ModuleDelta
from hf_knowedit.errors import InvalidConfigError, InvalidDataError, SingularSystemError, UnknownMethodError
from hf_knowedit.evaluation import metrics as M
from hf_knowedit.evaluation import protocols
from hf_knowedit.evaluation.datasets import detect_schema, first_per_fact, load_records
from hf_knowedit.evaluation.scoring import TargetScore, score_targets
from hf_knowedit.generation import generate_texts
from hf_knowedit.methods.registry import MethodResult, register_method
from hf_knowedit.tokens import split_prompt_target

from .helpers import assert_untouched, snapshot
from .tiny_models import make_tiny_model, make_tiny_tokenizer


def ts(*logprobs: float, hits=None) -> TargetScore:
    n = len(logprobs)
    target = tuple(range(10, 10 + n))
    pred = target if hits is None else tuple(t if h else -1 for t, h in zip(target, hits))
    return TargetScore(tuple(logprobs), pred, target)


def cf_record(
    subject="The Eiffel Tower",
    prompt="{} is located in",
    new="Rome",
    true="Paris",
    case_id=0,
    paraphrases=("Where was she born? The Eiffel Tower is in the city of",),
    neighborhood=("The Louvre is a museum in", "Marie Curie worked in"),
) -> dict:
    return {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": prompt,
            "subject": subject,
            "target_new": {"str": new},
            "target_true": {"str": true},
        },
        "paraphrase_prompts": list(paraphrases),
        "neighborhood_prompts": list(neighborhood),
        "generation_prompts": [f"{subject} is", f"People in {subject} speak"],
    }


def cf_records() -> list:
    return [
        cf_record(),
        cf_record(
            "Berlin",
            "{} is the capital of",
            "Spain",
            "Germany",
            1,
            ("Berlin is the capital city of",),
            ("Madrid is the capital of",),
        ),
        cf_record(
            "Toyota",
            "{} is headquartered in",
            "England",
            "Japan",
            2,
            ("The car company Toyota is in",),
            ("Apple was founded in",),
        ),
        cf_record(
            "Lionel Messi",
            "{} plays soccer for",
            "Italy",
            "Argentina",
            3,
            ("Lionel Messi is a player for",),
            ("Michael Jordan plays for",),
        ),
        cf_record(
            "The Colosseum", "{} is in", "Germany", "France", 4, ("The Colosseum is located in",), ("The Prado is in",)
        ),
    ]


# ----------------------------------------------------------------------------- metrics on hand-made scores


def test_rome_metrics_compare_mean_nll_per_token():
    # target_new: 3 tokens of log p = -1 (sum -3, mean -1); target_true: 1 token of -2 (sum -2, mean -2).
    # ROME's reference compares mean NLL per token, so new wins although its summed probability is lower.
    new, true = ts(-1.0, -1.0, -1.0), ts(-2.0)
    assert new.mean_nll == pytest.approx(1.0) and true.mean_nll == pytest.approx(2.0)
    assert new.sum_logprob < true.sum_logprob
    case = M.counterfact_case([(new, true)], [(new, true), (true, new)], [(new, true), (true, new), (true, new)])
    assert case["ES"] == 1.0
    assert case["EM"] == pytest.approx(math.exp(-1) - math.exp(-2))
    assert case["PS"] == 0.5 and case["PM"] == pytest.approx(0.0)
    assert case["NS"] == pytest.approx(2 / 3)  # true (2nd in pair) must win: pairs 2 and 3 have true=new-score
    assert case["NM"] == pytest.approx((math.exp(-1) - math.exp(-2)) / 3)


def test_ties_are_not_success():
    a, b = ts(-1.0), ts(-1.0)
    assert M.success_rate([(a, b)]) == 0.0 and M.success_rate([(a, b)], new_should_win=False) == 0.0


def test_aggregate_percent_and_harmonic_mean():
    cases = [{"ES": 1.0, "PS": 0.5, "NS": 0.5, "GE": 600.0}, {"ES": 0.0, "PS": 0.5, "NS": 1.0, "GE": 500.0}]
    out = M.aggregate(cases)
    assert out["ES"] == 50.0 and out["PS"] == 50.0 and out["NS"] == 75.0 and out["GE"] == 550.0
    assert out["S"] == pytest.approx(3 / (1 / 50 + 1 / 50 + 1 / 75))
    assert M.harmonic_mean([0.0, 80.0, 90.0]) == 0.0
    z = M.aggregate([{"Efficacy": 0.967, "Paraphrase": 0.897, "Specificity": 0.266}])
    assert z["Score"] == pytest.approx(50.78, abs=0.01)  # MEMIT Table: 96.7 / 89.7 / 26.6 -> 50.7


def test_zsre_and_token_accuracy_family():
    full, half = ts(-1.0, -1.0), ts(-1.0, -1.0, hits=(True, False))
    z = M.zsre_case([full], [half], [half, full])
    assert z == {"Efficacy": 1.0, "Paraphrase": 0.5, "Specificity": 0.75}
    post = TargetScore((-1.0, -1.0), (5, 6), (5, 9))
    pre = TargetScore((-1.0, -1.0), (5, 7), (5, 9))
    e = M.token_accuracy_case([full], [half], [post], [pre])
    assert e == {"rewrite_acc": 1.0, "rephrase_acc": 0.5, "locality": 0.5}


def test_ngram_entropy_reference_definition():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit;
    # ROME: mean(2/3 * H2, 4/3 * H3)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert M.ngram_entropy_of("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert M.ngram_entropy_of("word") == 0.0
    assert M.ngram_entropy(["a b a b", "word"]) == pytest.approx(100 * (2 / 3 * h2 + 4 / 3) / 4)
    assert M.words("Paris, France.") == ["Paris", ",", "France", "."]


# ----------------------------------------------------------------------------- crafted logits


class BigramLM(nn.Module):
    """A fake causal LM (no architecture-table row) whose next-token logits depend only on the current
    token: ``logits[t] = table[input_ids[t]]``. Positions and masks cannot matter, so the expected numbers
    follow from the table alone."""

    def __init__(self, vocab: int):
        super().__init__()
        self.config = SimpleNamespace(model_type="bigram-test")
        self.table = nn.Parameter(torch.zeros(vocab, vocab), requires_grad=False)
        self.boost: dict = {}

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        logits = self.table[input_ids].clone()
        for (prev, nxt), value in self.boost.items():
            logits[..., nxt] += (input_ids == prev).float() * value
        return SimpleNamespace(logits=logits)


def test_crafted_logits_give_known_counterfact_numbers():
    tok = make_tiny_tokenizer(False)
    rec = cf_record(neighborhood=("The Louvre is a museum in", "The capital of France is"))
    model = BigramLM(len(tok))

    def last(prompt):
        return split_prompt_target(tok, prompt, "Rome")[0][-1]

    rome = split_prompt_target(tok, "The Eiffel Tower is located in", "Rome")[1]
    paris = split_prompt_target(tok, "The Eiffel Tower is located in", "Paris")[1]
    assert len(rome) == len(paris) == 1
    ends = [
        last(p)
        for p in ("The Eiffel Tower is located in", rec["paraphrase_prompts"][0], rec["neighborhood_prompts"][1])
    ]
    assert len(set(ends)) == 3 and last(rec["neighborhood_prompts"][0]) == ends[0]
    model.table.data[ends[0], rome[0]] = 10.0  # after " in": new wins (rewrite prompt, 1st neighbour)
    model.table.data[ends[1], paris[0]] = 10.0  # after " of": true wins (paraphrase)
    model.table.data[ends[2], paris[0]] = 10.0  # after " is": true wins (2nd neighbour)
    res = hf_knowedit.evaluate(model, tok, [rec], fluency=False, progress=False)
    v = len(tok)
    p_hi, p_lo = math.exp(10) / (math.exp(10) + v - 1), 1 / (math.exp(10) + v - 1)
    assert res.pre["ES"] == 100.0 and res.pre["EM"] == pytest.approx(100 * (p_hi - p_lo), rel=1e-4)
    assert res.pre["PS"] == 0.0 and res.pre["PM"] == pytest.approx(100 * (p_lo - p_hi), rel=1e-4)
    assert res.pre["NS"] == 50.0 and res.pre["NM"] == pytest.approx(0.0, abs=1e-4)  # float32 softmax, in percent
    assert res.pre["S"] == 0.0  # harmonic mean with PS = 0
    assert res.pre["rewrite_acc"] == 100.0 and res.pre["rephrase_acc"] == 0.0 and res.pre["locality"] == 100.0
    assert res.post is None


def test_protocol_with_an_edit_that_works(monkeypatch):
    """Edits simulated on the bigram model: the 'edit' boosts target_new after the rewrite prompt."""
    tok = make_tiny_tokenizer(False)
    recs = cf_records()[:3]
    model = BigramLM(len(tok))
    applied = []

    def fake_apply(m, t, requests, method, name=None, **kw):
        for r in requests:
            p, tgt = split_prompt_target(t, r.text, r.target_new)
            chain = [p[-1]] + list(tgt)
            for prev, nxt in zip(chain, chain[1:]):
                m.boost[(prev, nxt)] = 50.0
        applied.append(name)
        return SimpleNamespace(name=name)

    def fake_revert(m, name=None):
        m.boost.clear()
        return [name]

    monkeypatch.setattr(protocols, "apply_edits", fake_apply)
    monkeypatch.setattr(protocols, "revert_edits", fake_revert)
    monkeypatch.setattr(protocols, "get_method", lambda name: None)
    res = hf_knowedit.evaluate(model, tok, recs, method="fake", fluency=False, progress=False)
    assert res.post["ES"] == 100.0 and res.pre["ES"] < 100.0
    assert res.post["rewrite_acc"] == 100.0
    assert applied == ["eval-single-0", "eval-single-1", "eval-single-2"] and not model.boost
    seq = hf_knowedit.evaluate(
        model,
        tok,
        cf_records(),
        method="fake",
        protocol="sequential",
        batch_size=2,
        curve_every=1,
        fluency=False,
        progress=False,
    )
    assert [p["n_edits"] for p in seq.curve] == [2, 4, 5]
    assert all(p["ES"] == 100.0 for p in seq.curve) and seq.post["ES"] == 100.0
    assert seq.records[4]["post"]["ES"] == 1.0 and seq.records[4]["pre"]["ES"] == 0.0
    assert not model.boost


# ----------------------------------------------------------------------------- scoring on tiny real models


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bloom", "gemma2"])
def test_padding_side_invariance(model_type):
    model, tok = make_tiny_model(model_type)
    pairs = [
        ("The Eiffel Tower is located in", "Paris"),
        ("Who", "Germany and the world"),
        ("Berlin is the capital of", "the United States of America"),
        ("The", "Rome"),
    ]
    left = score_targets(model, tok, pairs, padding_side="left")
    right = score_targets(model, tok, pairs, padding_side="right")
    alone = [score_targets(model, tok, [p])[0] for p in pairs]
    for a, b, c in zip(left, right, alone):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(c.logprobs), atol=1e-5, rtol=0)
        assert a.predicted == b.predicted == c.predicted


def test_padding_side_invariance_through_evaluate():
    model, tok = make_tiny_model("llama")
    recs = cf_records()
    out = []
    for side in ("left", "right"):
        t = copy.deepcopy(tok)
        t.padding_side = side
        out.append(hf_knowedit.evaluate(model, t, recs, fluency=False, progress=False, score_batch_size=4))
    for k, v in out[0].pre.items():
        assert out[1].pre[k] == pytest.approx(v, abs=1e-5)


def test_multi_token_target_matches_full_forward():
    model, tok = make_tiny_model("llama")
    prompt, target = "The Eiffel Tower is located in", "Germany and the world"
    s = score_targets(model, tok, [(prompt, target), ("Who", "Rome")])[0]
    p_ids, t_ids = split_prompt_target(tok, prompt, target)
    assert s.n_tokens == len(t_ids) > 2
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p_ids + t_ids])).logits[0].float(), -1)
    ref = [logp[len(p_ids) + j - 1, t].item() for j, t in enumerate(t_ids)]
    assert s.logprobs == pytest.approx(ref, abs=1e-5)
    assert s.predicted == tuple(logp[len(p_ids) - 1 : len(p_ids) + len(t_ids) - 1].argmax(-1).tolist())
    assert s.mean_nll == pytest.approx(-sum(ref) / len(ref), abs=1e-5)


def test_generation_is_seeded_and_leaves_rng_alone():
    model, tok = make_tiny_model("llama")
    prompts = ["The Eiffel Tower is", "Berlin is"]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate_texts(model, tok, prompts, max_new_tokens=8, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == generate_texts(model, tok, prompts, max_new_tokens=8, seed=1)
    assert all(t.startswith(p) for t, p in zip(a, prompts)) and all(len(t) > len(p) for t, p in zip(a, prompts))
    g = generate_texts(model, tok, prompts, max_new_tokens=8, seed=None)
    assert g == generate_texts(model, tok, prompts, max_new_tokens=8, seed=None)


def test_fluency_and_schemas_on_tiny_model():
    model, tok = make_tiny_model("llama")
    res = hf_knowedit.evaluate(model, tok, cf_records()[:2], max_new_tokens=6, progress=False)
    assert res.pre["GE"] > 0 and set(M.ROME_METRICS) <= set(res.pre)
    flat = [
        {
            "case_id": 0,
            "prompt": "The mother tongue of Thomas Mann is",
            "subject": "Thomas Mann",
            "target_new": "English",
            "ground_truth": "German",
            "rephrase_prompt": "Thomas Mann speaks",
            "locality_prompt": "Albert Einstein speaks",
            "locality_ground_truth": "German",
        }
    ]
    rf = hf_knowedit.evaluate(model, tok, flat, progress=False)
    assert rf.schema == "counterfact_flat" and "GE" not in rf.pre and {"ES", "PS", "NS", "S"} <= set(rf.pre)
    zs = [
        {
            "subject": "Barack Obama",
            "src": "Where was Barack Obama born?",
            "rephrase": "Barack Obama was born in?",
            "answers": ["Hawaii"],
            "alt": "Japan",
            "loc": "nq question: who is the author of this book",
            "loc_ans": "William Shakespeare",
        }
    ]
    rz = hf_knowedit.evaluate(model, tok, zs, progress=False)
    assert rz.schema == "zsre" and set(M.ZSRE_METRICS + M.TOKEN_ACC_METRICS) <= set(rz.pre) and "ES" not in rz.pre
    assert load_records(zs, zsre_target="alt")[0].target_new == "Japan"


# ----------------------------------------------------------------------------- protocols with real edits


def _zero(ctx):
    spec, layer = ctx.arch, num_layers(ctx.model) - 1
    d_in, d_out = mlp_out_dims(ctx.model, spec, layer)
    return MethodResult({mlp_out_path(spec, layer): ModuleDelta(torch.zeros(1, d_in), torch.zeros(d_out, 1))}, [layer])


def _harm(ctx):
    spec = ctx.arch
    gen = torch.Generator().manual_seed(len(ctx.requests))
    deltas = {}
    for layer in range(num_layers(ctx.model)):
        d_in, d_out = mlp_out_dims(ctx.model, spec, layer)
        deltas[mlp_out_path(spec, layer)] = ModuleDelta(
            torch.randn(2, d_in, generator=gen), 5 * torch.randn(d_out, 2, generator=gen)
        )
    return MethodResult(deltas, list(range(num_layers(ctx.model))))


def _boom(ctx):
    raise SingularSystemError("test: singular")


class _Cfg:  # a config dataclass with no fields
    pass


import dataclasses  # noqa: E402

_Cfg = dataclasses.dataclass(_Cfg)
for _name, _fn in (("evaltest-zero", _zero), ("evaltest-harm", _harm), ("evaltest-boom", _boom)):
    register_method(_name, _fn, _Cfg, overwrite=True)


def test_zero_delta_edit_counts_as_failed_and_model_is_restored():
    model, tok = make_tiny_model("llama")
    before = snapshot(model)
    res = hf_knowedit.evaluate(model, tok, cf_records(), method="evaltest-zero", fluency=False, progress=False)
    assert res.post == pytest.approx(res.pre, abs=1e-6)  # nothing changed: no success is invented
    assert res.post["ES"] < 100.0 and not res.failed
    assert_untouched(model, before)


@pytest.mark.parametrize("protocol", ["single", "batch", "sequential"])
def test_harmful_edit_is_measured_and_reverted(protocol):
    model, tok = make_tiny_model("gpt2")
    before = snapshot(model)
    res = hf_knowedit.evaluate(
        model,
        tok,
        cf_records(),
        method="evaltest-harm",
        protocol=protocol,
        batch_size=2,
        curve_every=1,
        fluency=False,
        progress=False,
    )
    assert res.post != res.pre and res.post["locality"] < 100.0
    assert res.pre["locality"] == 100.0
    if protocol == "sequential":
        assert [p["n_edits"] for p in res.curve] == [2, 4, 5]
    assert_untouched(model, before)


def test_edit_that_raises_counts_as_failed():
    model, tok = make_tiny_model("llama")
    res = hf_knowedit.evaluate(model, tok, cf_records()[:2], method="evaltest-boom", fluency=False, progress=False)
    assert len(res.failed) == 2 and "SingularSystemError" in res.failed[0]["error"]
    assert res.post == res.pre
    assert "2 failed edit(s)" in res.to_markdown()
    with pytest.raises(SingularSystemError):
        hf_knowedit.evaluate(
            model, tok, cf_records()[:1], method="evaltest-boom", on_error="raise", fluency=False, progress=False
        )


# ----------------------------------------------------------------------------- results


def test_result_dict_markdown_and_plot(tmp_path):
    model, tok = make_tiny_model("gpt2")
    res = hf_knowedit.evaluate(
        model,
        tok,
        cf_records(),
        method="evaltest-harm",
        protocol="sequential",
        batch_size=2,
        curve_every=1,
        fluency=False,
        progress=False,
    )
    d = json.loads(json.dumps(res.to_dict()))
    assert d["pre"] == res.pre and d["protocol"] == "sequential" and len(d["records"]) == 5
    md = res.to_markdown()
    assert "| ES | paper |" in md and "| locality | token accuracy (EasyEdit) |" in md and "| edits |" in md
    fig = res.plot(path=tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert len(fig.axes[0].lines) >= 3
    import matplotlib.pyplot as plt

    plt.close(fig)


# ----------------------------------------------------------------------------- bad input


def test_bad_records_raise_typed_errors_naming_record_and_field():
    model, tok = make_tiny_model("llama")
    bad = cf_records()
    del bad[2]["requested_rewrite"]["target_true"]
    with pytest.raises(InvalidDataError, match=r"record 2 \(case_id 2\).*requested_rewrite\.target_true\.str"):
        hf_knowedit.evaluate(model, tok, bad, method="evaltest-harm", progress=False)
    empty = cf_records()
    empty[1]["paraphrase_prompts"] = []
    with pytest.raises(InvalidDataError, match=r"record 1 .*paraphrase_prompts"):
        load_records(empty)
    with pytest.raises(InvalidDataError, match=r"record 0.*unknown schema"):
        load_records([{"question": "?", "answer": "!"}])
    with pytest.raises(InvalidDataError, match="Unknown schema"):
        load_records(cf_records(), schema="squad")
    with pytest.raises(InvalidDataError, match=r"record 0: field 'src' is missing"):
        load_records([{"subject": "x"}], schema="zsre")
    flat = {
        "case_id": 7,
        "prompt": "Paris is in",
        "subject": "Paris",
        "target_new": "Spain",
        "ground_truth": "France",
        "rephrase_prompt": "Paris lies in",
        "locality_prompt": "Rome is in",
    }
    with pytest.raises(InvalidDataError, match=r"record 0 \(case_id 7\).*locality_ground_truth"):
        load_records([flat])
    assert detect_schema(flat) == "counterfact_flat"
    assert hf_knowedit.list_edits(model) == []


def test_target_that_tokenizes_to_nothing():
    base = make_tiny_tokenizer(False)
    raw = Tokenizer.from_str(base.backend_tokenizer.to_str())
    raw.normalizer = normalizers.Replace("#", "")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|eos|>", pad_token="<|pad|>")
    model, _ = make_tiny_model("gpt2")
    recs = cf_records()[:2]
    recs[1]["requested_rewrite"]["target_new"]["str"] = "###"
    with pytest.raises(InvalidDataError, match=r"record 1 \(case_id 1\).*requested_rewrite\.target_new\.str"):
        hf_knowedit.evaluate(model, tok, recs, method="evaltest-harm", progress=False)


def test_bad_arguments_and_duplicate_facts_leave_model_untouched():
    model, tok = make_tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(InvalidConfigError):
        hf_knowedit.evaluate(model, tok, cf_records(), protocol="parallel")
    with pytest.raises(UnknownMethodError):
        hf_knowedit.evaluate(model, tok, cf_records(), method="no-such-method", fluency=False, progress=False)
    dup = cf_records()[:2] + [cf_record(new="Madrid", case_id=9)]
    with pytest.raises(InvalidDataError, match=r"record 2 \(case_id 9\).*repeat.*record 0"):
        hf_knowedit.evaluate(model, tok, dup, method="evaltest-harm", protocol="batch", fluency=False, progress=False)
    assert_untouched(model, before)


def test_first_per_fact_keeps_each_facts_first_record_in_order():
    recs = cf_records() + [cf_record(new="Madrid", case_id=9), cf_record(prompt="{} stands in", case_id=10)]
    kept, repeats = first_per_fact(load_records(recs))
    assert [r.case_id for r in kept] == [r["case_id"] for r in cf_records()] + [10]  # another relation is kept
    assert [(r.index, r.case_id) for r in repeats] == [(len(cf_records()), 9)]


@pytest.mark.parametrize(
    "prompt, subject, shown",
    [
        (
            "References\n\nCategory:Populated places in the Moses Kotane Local Municipality Cologne is a twin city of",
            "Cologne",
            "Cologne is a twin city of",
        ),
        (
            'Agent who was first seen in "Puppy Unplugged". What is the twin city of Cologne? It is',
            "Cologne",
            "What is the twin city of Cologne? It is",
        ),
        (
            "1900)\n March 4\n Richard Manuel (b. Institut Polaire, created in",
            "Institut Polaire",
            "Institut Polaire, created in",
        ),
        ("Palgrave Macmillan, 2013. Shanghai is a twin city of", "Shanghai", "Shanghai is a twin city of"),
        (  # a wiki category line is never part of the sentence: it starts at the subject
            "References \n\nCategory:Populated places in Torbat-e Jam County Norway's capital is",
            "Norway",
            "Norway's capital is",
        ),
        (
            "players\nCategory:Association football midfielders Norway, which has the capital city",
            "Norway",
            "Norway, which has the capital city",
        ),
        ("  The Eiffel Tower is in", "Eiffel Tower", "The Eiffel Tower is in"),
        ("The Eiffel Tower, a landmark, stands in", "Eiffel Tower", "The Eiffel Tower, a landmark, stands in"),
        ("  no subject here ", "Paris", "no subject here"),
    ],
)
def test_readable_prompt_starts_at_the_sentence_naming_the_subject(prompt, subject, shown):
    from hf_knowedit.evaluation.datasets import readable_prompt

    assert readable_prompt(prompt, subject) == shown
