"""Chat metrics (:mod:`hf_knowedit.evaluation.chat`): the question table covers CounterFact, the matching
rules on hand-made answers, the prompt through a chat template or ``Q:/A:``, answers that stop at the end of
the turn, and ``evaluate(chat=True)`` before and after an edit on crafted and tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import hf_knowedit
from hf_knowedit.errors import InvalidDataError
from hf_knowedit.evaluation import chat as C
from hf_knowedit.evaluation.datasets import load_records
from hf_knowedit.evaluation.protocols import Scorer, encode_record
from hf_knowedit.generation import generate_texts

from .helpers import assert_untouched, snapshot
from .test_evaluation import cf_record
from .test_generation_metrics import chain_lm
from .tiny_models import EOS_ID, make_tiny_model, make_tiny_tokenizer

#: a template that ends the prompt with " is", so a crafted bigram model answers from that token
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} says {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}The answer is{% endif %}"
)


def templated(tok):
    """A copy of the shared (read-only) tiny tokenizer with :data:`TEMPLATE` as its chat template."""
    tok = copy.deepcopy(tok)
    tok.chat_template = TEMPLATE
    return tok


def with_relation(record: dict, relation_id: str) -> dict:
    record = json.loads(json.dumps(record))
    record["requested_rewrite"]["relation_id"] = relation_id
    return record


# ----------------------------------------------------------------------------- the question table


def test_question_table_covers_every_counterfact_relation(data_path):
    records = json.loads((data_path / "counterfact_500.json").read_text())
    table = C.question_table()
    relations = {r["requested_rewrite"]["relation_id"] for r in records}
    assert len(relations) == 34 and relations <= set(table)
    for rel, entry in table.items():
        for form in ("question", "paraphrase"):
            q = entry[form]
            assert q.count("{}") == 1 and q.endswith("?") and q != entry["statements"][0], (rel, form)
        assert entry["question"] != entry["paraphrase"]
    header = json.loads(C.QUESTIONS_FILE.read_text())["provenance"]
    assert "CounterFact" in header and "Meng et al. 2022" in header


def test_every_neighbour_prompt_of_counterfact_500_gets_its_subject(data_path):
    records = load_records(data_path / "counterfact_500.json")
    for rec in records:
        probes = C.record_probes(rec)
        assert len(probes["neighborhood"]) == len(rec.neighborhood_prompts), rec.where
        for prompt, probe in zip(rec.neighborhood_prompts, probes["neighborhood"]):
            assert probe.subject and probe.subject in prompt and probe.answer == rec.target_true
            assert probe.question == C.question_table()[rec.relation_id]["question"].format(probe.subject)


@pytest.mark.parametrize(
    ("prompt", "relation", "subject"),
    [
        ("South Africa is a part of the continent of", "P30", "South Africa"),
        ("Ghana is in", "P30", "Ghana"),
        ("Ełk, which is located in", "P17", "Ełk"),  # not "Ełk, which" from "{} is located in"
        ("Where is Villa des Dunes? It is located in", "P276", "Villa des Dunes"),
        ("Quentin Tarantino, who works as", "P106", "Quentin Tarantino"),
        ("Chicago's owner", "P127", "Chicago"),  # "{}'s owner" beats "{} owner"
        ("Madrid is the capital of", "P17", None),  # no statement of the relation
    ],
)
def test_neighbour_subject_takes_the_longest_matching_template(prompt, relation, subject):
    assert C.neighbour_subject(prompt, relation) == subject


# ----------------------------------------------------------------------------- matching rules


@pytest.mark.parametrize(
    ("answer", "obj", "subject"),
    [
        ("The answer is Paris.", "Paris", None),
        ("paris", "Paris", None),  # case
        ("It is in the Netherlands", "Netherlands", None),  # articles
        ("Netherlands", "the Netherlands", None),
        ("United States of America", "United States", None),  # the object's words as a run
        ("Saint-Étienne, of course", "Saint-Étienne", None),
        ("The Porsche 911 is made by Porsche.", "Porsche", "Porsche 911"),  # named after the subject is removed
        ("Paris Saint-Germain", "Paris Saint-Germain", "Paris"),  # the object contains the subject: kept
    ],
)
def test_answers_that_name_the_object(answer, obj, subject):
    assert C.names(answer, obj, subject=subject)


@pytest.mark.parametrize(
    ("answer", "obj", "subject"),
    [
        ("He was a Parisian.", "Paris", None),  # whole words only
        ("Romeo and Juliet", "Rome", None),
        ("the United States", "United States of America", None),  # no invented aliases
        ("USA", "United States", None),
        ("New Yorker", "New York", None),
        ("York", "New York", None),
        ("The Porsche 911", "Porsche", "Porsche 911"),  # only the subject repeated
        ("", "Paris", None),
        ("Paris", "", None),  # an empty object never matches
        ("French", "France", None),
    ],
)
def test_answers_that_do_not_name_the_object(answer, obj, subject):
    assert not C.names(answer, obj, subject=subject)


def test_aliases_are_matched_by_the_same_rules():
    assert C.names("the United States", "United States of America", aliases=("United States", "USA"))
    assert C.names("It is the USA.", "United States of America", aliases=("USA",))
    assert not C.names("the USAF", "United States of America", aliases=("USA",))


def test_chat_case_neighbours_must_name_their_own_object_and_not_the_new_one():
    probe = C.Probe("Where is the Louvre?", "The Louvre", "Paris")
    probes = {"rewrite": [], "paraphrase": [], "neighborhood": [probe] * 3, "keep": []}
    answers = {"rewrite": [], "paraphrase": [], "neighborhood": ["Paris", "Paris or Rome", "Rome"], "keep": []}
    got = C.chat_case(probes, answers, "Rome")
    assert got == {"chat_NS": pytest.approx(1 / 3)}  # groups without questions give no value


# ----------------------------------------------------------------------------- prompts and answers


def test_prompt_through_the_chat_template_and_q_a_without_one():
    tok = make_tiny_tokenizer(False)
    assert not C.has_chat_template(tok)
    assert C.chat_prompt(tok, "Where is Rome?") == "Q: Where is Rome?\nA:"
    assert C.chat_prompt(templated(tok), "Where is Rome?") == "user says Where is Rome?\nThe answer is"
    assert C.answer_of(" Rome.\nQ: next", chat=False) == "Rome."
    assert C.answer_of(" Rome.\nAnd more", chat=True) == "Rome.\nAnd more"


def test_answers_stop_at_the_first_stop_token():
    tok = make_tiny_tokenizer(False)
    model = chain_lm(tok, {" in": " Rome", " Rome": " Paris", " Paris": ".", " of": " Japan", " Japan": " Rome"})
    assert C.stop_ids(model, tok) == [EOS_ID]
    prompt, (paris,) = "The Eiffel Tower is located in", tok(" Paris")["input_ids"]
    later = "The capital of"  # batched with a row that stops later: each row ends at its own stop
    got = generate_texts(model, tok, [prompt, later], max_new_tokens=4, seed=None, stop_ids=[paris])
    assert got == [prompt + " Rome", later + " Japan Rome"]
    assert generate_texts(model, tok, [prompt], max_new_tokens=3, seed=None, stop_ids=[EOS_ID, paris]) == [
        prompt + " Rome"
    ]
    # without stop tokens every row runs its full length, as before
    assert generate_texts(model, tok, [prompt], max_new_tokens=3, seed=None) == [prompt + " Rome Paris."]


def test_ask_answers_in_either_form_and_stops_at_the_end_of_the_turn():
    tok = make_tiny_tokenizer(False)
    model = chain_lm(tok, {":": " Rome", " is": " Paris", " Rome": ".", " Paris": ".", ".": " Rome"})
    model.generation_config.eos_token_id = [EOS_ID, *tok(".")["input_ids"]]  # "." ends the turn
    questions = ["Where is the Eiffel Tower?", "Where is the Louvre?", "Where is Toyota based?"]
    # "Q: ...\nA:" ends in ":" -> " Rome", then "." stops it; the template ends in " is" -> " Paris"
    assert C.ask(model, tok, questions, max_new_tokens=6) == ["Rome"] * 3
    assert C.ask(model, templated(tok), questions, max_new_tokens=6) == ["Paris"] * 3
    assert C.ask(model, tok, questions, max_new_tokens=6, batch_size=1) == ["Rome"] * 3
    model.generation_config.eos_token_id = [EOS_ID]  # no end of turn: the answer runs its full length
    assert C.ask(model, tok, questions[:1], max_new_tokens=4) == ["Rome. Rome."]


# ----------------------------------------------------------------------------- evaluate(chat=True)

KNOWN = [
    {"subject": "Toyota", "attribute": "Rome", "relation_id": "P17"},
    {"subject": "Berlin", "attribute": "Japan", "relation_id": "P17"},
]


def test_crafted_lm_gives_known_chat_metrics_in_both_forms():
    tok = make_tiny_tokenizer(False)
    # "Q: ...\nA:" ends in ":" -> " Rome"; the template ends in " is" -> " Paris"; both then end the turn with
    # ".", the model's end-of-turn token (in its generation config, as chat models list theirs), after which
    # the chain would go on: an answer that did not stop there would name both cities
    model = chain_lm(tok, {":": " Rome", " is": " Paris", " Rome": ".", " Paris": ".", ".": " Rome"})
    model.generation_config.eos_token_id = [EOS_ID, *tok(".")["input_ids"]]
    (paris,), (rome,) = tok(" Paris")["input_ids"], tok(" Rome")["input_ids"]
    with torch.no_grad():  # second choice after " Paris": a generation that never stops says " Rome" next
        model.lm_head.weight[rome, paris] = 5.0 / len(tok) ** 0.5
    rec = with_relation(
        cf_record(
            paraphrases=("The Eiffel Tower is in",),
            neighborhood=("The Louvre is located in", "Marie Curie worked in"),  # the second is no P276 statement
        ),
        "P276",
    )
    kw = dict(fluency=False, chat=True, chat_known=KNOWN, progress=False)
    qa = hf_knowedit.evaluate(model, tok, [rec], **kw)
    # every answer is "Rome": the new object, not the Louvre's Paris; one known question of two
    assert {k: qa.pre[k] for k in C.CHAT_METRICS} == {
        "chat_ES": 100.0,
        "chat_PS": 100.0,
        "chat_NS": 0.0,
        "chat_keep": 50.0,
    }
    assert qa.settings["chat_form"] == "Q: ... A:" and "| chat_ES | chat (questions) | 100.0 |" in qa.to_markdown()

    templ = hf_knowedit.evaluate(model, templated(tok), [rec], **kw)
    # every answer is "Paris" (and only Paris: the answer ended at the end of turn)
    assert {k: templ.pre[k] for k in C.CHAT_METRICS} == {
        "chat_ES": 0.0,
        "chat_PS": 0.0,
        "chat_NS": 100.0,
        "chat_keep": 0.0,
    }
    assert templ.settings["chat_form"] == "chat template"


def test_chat_metrics_before_and_after_editing_come_from_the_edited_model():
    from .test_evaluation import _harm  # noqa: F401  (registers the evaltest-* methods)

    model, tok = make_tiny_model("llama")
    before = snapshot(model)
    records = [
        with_relation(cf_record(neighborhood=("The Louvre is located in",)), "P276"),
        with_relation(cf_record("Berlin", "{} is located in", "Spain", "Germany", 1, ("Berlin is in",)), "P17"),
    ]
    kw = dict(fluency=False, chat=True, chat_known=KNOWN, chat_max_new_tokens=4, progress=False)
    res = hf_knowedit.evaluate(model, tok, records, method="evaltest-harm", **kw)
    for side in (res.pre, res.post):
        assert set(C.CHAT_METRICS) <= set(side)
    assert res.settings["chat_keep_n"] == 2
    rec = load_records(records)[0]
    es = hf_knowedit.apply_edits(model, tok, [rec.request], method="evaltest-harm")
    known = C.load_known_facts(KNOWN)
    scorer = Scorer(model, tok, [encode_record(tok, rec)], chat=True, chat_known=known, chat_max_new_tokens=4)
    want = scorer.chat_metrics([0])[0]
    hf_knowedit.revert_edits(model, es.name)
    assert {k: v for k, v in res.records[0]["post"].items() if k in C.CHAT_METRICS} == want
    assert {k: v for k, v in res.records[0]["pre"].items() if k in C.CHAT_METRICS} == scorer.chat_metrics([0])[0]
    assert_untouched(model, before)


def test_bad_input_is_refused_before_anything_is_generated(tmp_path, monkeypatch):
    model, tok = make_tiny_model("llama")
    kw = dict(fluency=False, chat=True, chat_known=None, progress=False)
    with pytest.raises(InvalidDataError, match=r"record 0 \(case_id 0\).*'requested_rewrite.relation_id' is 'P9999'"):
        hf_knowedit.evaluate(model, tok, [with_relation(cf_record(), "P9999")], method="evaltest-harm", **kw)
    with pytest.raises(InvalidDataError, match="relation_id' is None"):
        hf_knowedit.evaluate(model, tok, [cf_record()], **kw)
    monkeypatch.setenv("HF_KNOWEDIT_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidDataError, match="chat_known=None"):
        hf_knowedit.evaluate(model, tok, [with_relation(cf_record(), "P17")], fluency=False, chat=True)


def test_zsre_records_are_asked_their_own_questions():
    rec = load_records(
        [
            {
                "subject": "Call the Doctor",
                "src": "What artist created Call the Doctor?",
                "rephrase": "Which artist created Call the Doctor?",
                "answers": ["Sleater-Kinney"],
                "loc": "nq question: who sang nice day for a white wedding",
                "loc_ans": "Billy Idol",
            }
        ]
    )[0]
    probes = C.record_probes(rec, C.load_known_facts(KNOWN), 1)
    assert [p.question for p in probes["rewrite"] + probes["paraphrase"]] == [
        "What artist created Call the Doctor?",
        "Which artist created Call the Doctor?",
    ]
    assert probes["neighborhood"] == [C.Probe("who sang nice day for a white wedding?", None, "Billy Idol")]
    assert probes["keep"] == [C.Probe("In which country is Toyota located?", "Toyota", "Rome")]


FLAT = {
    "prompt": "Danielle Darrieux was born in",
    "subject": "Danielle Darrieux",
    "target_new": "London",
    "ground_truth": "Paris",
    "rephrase_prompt": "Danielle Darrieux, who was born in",
    "locality_prompt": "Michel Rocard was born in",
    "locality_ground_truth": "Courbevoie",
}


def test_a_statement_template_names_its_relation_only_when_one_relation_has_it():
    assert C.relation_of_statement("{} was born in") == "P19"
    assert C.relation_of_statement(" {} was born in ") == "P19"
    assert C.relation_of_statement("{} is located in") is None  # P17's, P30's and P276's
    assert C.relation_of_statement("{} likes cheese") is None


def test_flat_counterfact_records_are_asked_their_relations_questions():
    rec = load_records([FLAT])[0]
    rel = C.question_table()["P19"]
    probes = C.record_probes(rec)
    assert [p.question for p in probes["rewrite"]] == [rel["question"].format("Danielle Darrieux")]
    assert [p.question for p in probes["paraphrase"]] == [rel["paraphrase"].format("Danielle Darrieux")]
    assert [(p.question, p.answer) for p in probes["neighborhood"]] == [
        (rel["question"].format("Michel Rocard"), "Courbevoie")
    ]


def test_a_flat_record_of_no_single_relation_gets_only_its_unrelated_questions():
    ambiguous = dict(FLAT, prompt="Danielle Darrieux is located in", locality_prompt="Paris is located in")
    known = [C.KnownFact("Toyota", "Japan", "P17")]
    probes = C.record_probes(load_records([ambiguous])[0], known, n_keep=1)
    assert probes["rewrite"] == probes["paraphrase"] == probes["neighborhood"] == []
    assert [p.subject for p in probes["keep"]] == ["Toyota"]
    assert C.chat_case(probes, {g: ["Japan"] * len(probes[g]) for g in C.GROUPS}, "London") == {"chat_keep": 1.0}


def test_evaluate_asks_flat_records_in_chat_form():
    model, tok = make_tiny_model("llama")
    res = hf_knowedit.evaluate(model, tok, [FLAT], fluency=False, chat=True, chat_known=None, progress=False)
    assert {"chat_ES", "chat_PS", "chat_NS"} <= set(res.records[0]["pre"])
