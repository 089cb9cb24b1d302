"""Generation metrics (WILD-style exact match / contains, random prefix, negation) on a crafted Llama whose
greedy continuations are known in advance, their string rules on hand-made cases, and batched fluency
and generation equal to record-by-record."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_knowedit
from hf_knowedit.errors import InvalidConfigError
from hf_knowedit.evaluation import generative as G
from hf_knowedit.evaluation.datasets import load_records
from hf_knowedit.evaluation.protocols import Scorer, encode_record
from hf_knowedit.generation import generate_texts

from .helpers import assert_untouched, snapshot
from .test_evaluation import cf_record, cf_records
from .tiny_models import make_tiny_model, make_tiny_tokenizer


def chain_lm(tok, links: dict[str, str]) -> LlamaForCausalLM:
    """A one-layer Llama that is a bigram table: hidden size = vocabulary, identity embeddings, attention and
    MLP outputs zero, so the final RMSNorm gives ``sqrt(V) e_token`` and ``lm_head[nxt, cur] = 10 / sqrt(V)``
    makes ``nxt`` the greedy successor of ``cur`` (tokens without a link are followed by the pad token, which
    decodes to nothing)."""
    v = len(tok)
    cfg = LlamaConfig(
        vocab_size=v,
        hidden_size=v,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(v))
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for cur, nxt in links.items():
            (a,), (b,) = tok(cur)["input_ids"], tok(nxt)["input_ids"]
            model.lm_head.weight[b, a] = 10.0 / v**0.5
    return model


def test_string_rules():
    assert G.cut_at_boundary(" Rome. And then") == "Rome"
    assert G.cut_at_boundary(" Paris, France\nNext line") == "Paris, France"
    assert G.cut_at_boundary(" St.Louis is big! Yes") == "St.Louis is big"  # '.' inside a word is no sentence end
    assert G.cut_at_boundary(" no end at all") == "no end at all"
    assert G.normalize("The  Rome, Italy!") == ["rome", "italy"]
    assert G.starts_with("the Rome of old", "Rome") and not G.starts_with("Romeo and Juliet", "Rome")
    assert G.starts_with("New York City", "New York") and not G.starts_with("York", "New York")
    assert G.contains("it is in Rome now", "Rome") and not G.contains("Romeo", "Rome") and not G.contains("x", "")
    assert G.negate("The Eiffel Tower is located in", "The Eiffel Tower") == "The Eiffel Tower is not located in"
    assert G.negate("This is what Tom was born in", "Tom") == "This is what Tom was not born in"  # after the subject
    assert G.negate("Lionel Messi plays for", "Lionel Messi") is None


@pytest.mark.parametrize(
    ("continuation", "answer"),
    [
        (" St. Petersburg, on the Neva. It is", "St. Petersburg"),
        (" Mr. Bean. Then", "Mr. Bean"),
        (" J. K. Rowling. She", "J. K. Rowling"),
        (" the U.S. Army and Navy. Both", "U.S. Army and Navy"),
        (" Washington, D.C. in 1800", "Washington, D.C. in 1800"),
        (" 3.5 million people. Most", "3.5 million people"),
        (" Mt. Everest", "Mt. Everest"),
        (" e.g. Paris", "e.g. Paris"),
    ],
)
def test_abbreviations_initials_and_numbers_do_not_end_the_answer(continuation, answer):
    cut = G.cut_at_boundary(continuation)
    assert G.starts_with(cut, answer) and G.contains(cut, answer.split()[-1])


@pytest.mark.parametrize(
    ("continuation", "cut"),
    [
        (" Paris. London is", "Paris"),
        (" Rome. St. Peter's is there", "Rome"),
        (" in 1990. He left", "in 1990"),
        (" the ship Mr. Jones sailed. Later", "the ship Mr. Jones sailed"),
        (" Italy! Yes", "Italy"),
        (" Italy? No", "Italy"),
        (" Italy\nFrance", "Italy"),
        (" the U.S.\nNext", "the U.S."),
        (" over. Done", "over"),
    ],
)
def test_sentence_ends_still_end_the_answer(continuation, cut):
    assert G.cut_at_boundary(continuation) == cut
    assert not G.contains(G.cut_at_boundary(" Paris. London is"), "London")


def test_negation_counts_only_where_the_edit_took_and_the_model_said_something():
    case = dict(paraphrase=["Rome"], neighborhood=["Paris"], prefixed=[], target_new="Rome", neighborhood_target="x")
    took = G.generation_case(["Rome"], negated=["Paris, surely"], **case)
    assert took["gen_ES"] == 1.0 and took["gen_ES_neg"] == 1.0
    assert G.generation_case(["Rome"], negated=["Rome, of course"], **case)["gen_ES_neg"] == 0.0
    # an unedited model (the rewrite prompt does not say Rome) and an empty continuation give no value
    assert "gen_ES_neg" not in G.generation_case(["Paris"], negated=["Paris"], **case)
    assert "gen_ES_neg" not in G.generation_case(["Rome"], negated=[""], **case)
    assert "gen_ES_neg" not in G.generation_case(["Rome"], negated=[" ."], **case)
    assert "gen_ES_neg" not in G.generation_case(["Rome"], negated=[], **case)


def test_random_prefix_is_seeded_unrelated_and_long_enough():
    tok = make_tiny_tokenizer(False)
    a, b = G.random_prefix(tok, 3, 50), G.random_prefix(tok, 4, 50)
    assert a == G.random_prefix(tok, 3, 50) and a != b
    sentences = [s + "." for s in a.strip().split(". ") if s]
    sentences[-1] = sentences[-1][:-1]  # the last keeps its own period
    assert all(s in G.FILLER for s in sentences)
    n = len(tok(a, add_special_tokens=False)["input_ids"])
    assert n >= 50 and n - len(tok(sentences[-1] + " ", add_special_tokens=False)["input_ids"]) < 50


def test_crafted_lm_gives_known_generation_metrics():
    tok = make_tiny_tokenizer(False)
    # " in" -> " Rome." ; " of" -> " Paris, Rome." ; " is" -> " Paris, Rome."
    links = {" in": " Rome", " Rome": ".", ".": " A", " of": " Paris", " Paris": ",", ",": " Rome", " is": " Paris"}
    model = chain_lm(tok, links)
    assert generate_texts(model, tok, ["The Eiffel Tower is located in"], max_new_tokens=4, seed=None) == [
        "The Eiffel Tower is located in Rome. A"
    ]
    rec = cf_record(
        paraphrases=("The Eiffel Tower is in the city of", "Where is The Eiffel Tower? It is in"),
        neighborhood=("The capital of France is", "Marie Curie worked in"),
    )
    res = hf_knowedit.evaluate(model, tok, [rec], fluency=False, generation=True, progress=False)
    expected = {
        "gen_ES": 100.0,  # "Rome"
        "gen_PS": 50.0,  # "Paris, Rome" (no), "Rome" (yes)
        "gen_NS": 50.0,  # neighbours must say Paris: "Paris, Rome" (yes), "Rome" (no)
        "gen_ES_in": 100.0,
        "gen_PS_in": 100.0,  # both contain Rome
        "gen_NS_in": 50.0,
        "gen_ES_prefix": 100.0,  # the prefix ends in " in" too
        "gen_ES_neg": 0.0,  # "... is not located in" -> "Rome": asserted after "not"
    }
    assert {k: res.pre[k] for k in expected} == expected
    table = res.to_markdown()
    assert "| gen_ES | generation (WILD) | 100.0 |" in table and "| ES | paper |" in table

    # the same record with Paris as the new target: every answer flips except the neighbours'
    flipped = cf_record(
        new="Paris",
        true="Rome",
        paraphrases=rec["paraphrase_prompts"],
        neighborhood=rec["neighborhood_prompts"],
    )
    got = hf_knowedit.evaluate(model, tok, [flipped], fluency=False, generation=True, progress=False).pre
    assert (got["gen_ES"], got["gen_PS"], got["gen_ES_in"], got["gen_PS_in"]) == (0.0, 50.0, 0.0, 50.0)
    assert (got["gen_NS"], got["gen_NS_in"]) == (50.0, 100.0)  # neighbours must now say Rome
    # the rewrite prompt does not say Paris, so not saying it after "not" shows nothing: no gen_ES_neg
    assert "gen_ES_neg" not in got


def test_generation_prompts_and_records_without_negation():
    tok = make_tiny_tokenizer(False)
    model = chain_lm(tok, {})
    rec = load_records([cf_record("Lionel Messi", "{} plays soccer for", "Italy", "Argentina")])[0]
    scorer = Scorer(model, tok, [encode_record(tok, rec)], generation=True, seed=7)
    prompts = scorer.gen_prompts(rec)
    assert prompts["negated"] == [] and prompts["prefixed"] == [G.random_prefix(tok, 7, 50) + rec.rewrite_prompts[0]]
    case = scorer.gen([0])[0]
    assert "gen_ES_neg" not in case and case["gen_ES"] == 0.0  # empty continuations match nothing


def test_batched_fluency_and_generation_equal_record_by_record():
    model, tok = make_tiny_model("llama")
    recs = load_records(cf_records())
    scorer = Scorer(model, tok, [encode_record(tok, r) for r in recs], generation=True, max_new_tokens=8)
    scorer.gen_max_new_tokens = 6
    before = snapshot(model)
    batched = scorer.ge_many(range(len(recs)))
    assert batched == [scorer.ge_many([i])[0] for i in range(len(recs))]
    assert len(set(batched)) > 1  # records really differ
    # per-record = sampling each record's prompts alone with its own seeds, in a batch of one
    rec = recs[2]
    alone = [
        generate_texts(model, tok, [p], max_new_tokens=8, seed=None, row_seeds=[(0 + rec.index) * 1000 + j])[0]
        for j, p in enumerate(rec.generation_prompts)
    ]
    assert batched[2] == hf_knowedit.evaluation.metrics.ngram_entropy(alone)
    gens = scorer.gen(range(len(recs)))
    assert gens == [scorer.gen([i])[0] for i in range(len(recs))]
    assert_untouched(model, before)


def test_row_seeds_checked():
    model, tok = make_tiny_model("llama")
    with pytest.raises(InvalidConfigError, match="one seed per prompt"):
        generate_texts(model, tok, ["a", "b"], max_new_tokens=2, row_seeds=[1])


@pytest.mark.parametrize("protocol", ["single", "sequential"])
def test_generation_metrics_after_editing_come_from_the_edited_model(protocol):
    from .test_evaluation import _harm, _zero  # noqa: F401  (registers the evaltest-* methods)

    model, tok = make_tiny_model("llama")
    before = snapshot(model)
    kw = dict(protocol=protocol, batch_size=2, fluency=False, generation=True, gen_max_new_tokens=5, progress=False)
    same = hf_knowedit.evaluate(model, tok, cf_records()[:3], method="evaltest-zero", **kw)
    assert {k: same.post[k] for k in G.GEN_METRICS if k in same.pre} == {
        k: same.pre[k] for k in G.GEN_METRICS if k in same.pre
    }
    harmed = hf_knowedit.evaluate(model, tok, cf_records()[:3], method="evaltest-harm", **kw)
    # per record, the post-edit generations are those of the model with the harmful set active
    rec = load_records(cf_records()[:3])[0]
    es = hf_knowedit.apply_edits(model, tok, [rec.request], method="evaltest-harm")
    scorer = Scorer(model, tok, [encode_record(tok, rec)], generation=True, gen_max_new_tokens=5)
    want = scorer.gen([0])[0]
    hf_knowedit.revert_edits(model, es.name)
    got = {k: v for k, v in harmed.records[0]["post"].items() if k in G.GEN_METRICS}
    if protocol == "single":
        assert got == want
    assert set(got) == set(want) and "gen_ES" in harmed.post
    assert_untouched(model, before)
