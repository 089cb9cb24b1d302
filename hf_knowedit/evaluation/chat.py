"""Question and chat forms: does the edit hold when the model is *asked*, not prompted to complete a sentence?

Every record is turned into questions:

* **CounterFact**: one hand-written question and one paraphrase question per ``relation_id``
  (``data/relation_questions.json``, written for hf_knowedit from CounterFact's relation templates;
  :func:`question_table`). The edit's question is ``question`` about the subject, the paraphrase is
  ``paraphrase`` about it; each neighbourhood prompt becomes ``question`` about *its* subject, found by
  matching the prompt against the relation's CounterFact statement templates (``statements``, the
  longest template that matches wins: :func:`neighbour_subject`; a prompt that matches none is left out).
* **flat CounterFact** (``counterfact_flat``, no ``relation_id``): the relation is the one whose statement
  templates include the record's prompt (subject as ``{}``), when exactly one relation's do
  (:func:`relation_of_statement`); then as CounterFact, the neighbour from ``locality_prompt``. A record whose
  prompt is no relation's statement, or several relations' (``"{} is located in"`` is P17's, P30's and P276's),
  gets no edit, paraphrase or neighbour question (about 21 % of the first 1,000 records of
  ``counterfact_flat_edit_10000.json``); its unrelated known questions are asked all the same.
* **zsRE**: its own questions (``src``, ``rephrase``; the neighbour is ``loc`` without ``"nq question: "``).
* Unrelated known questions (``chat_keep``): ``known_1000.json`` facts (ROME's facts GPT-2 XL knew), asked
  with their relation's question; record ``i`` takes ``n_keep`` of them, from position ``i * n_keep``
  onwards (cyclically), passing over facts about the record's own subject.

Each question is asked through the tokenizer's chat template when it has one (one user turn,
``add_generation_prompt=True``) and as ``"Q: {question}\\nA:"`` otherwise (:func:`chat_prompt`); answers are
greedy, at most ``max_new_tokens`` tokens, stopped at the end of the turn (:func:`stop_ids`). A chat answer
is the whole turn; a ``Q:/A:`` answer is its first line.

Metrics (per record a fraction over its questions; :func:`~.metrics.aggregate` reports percent):

* ``chat_ES``: the answer to the edit's question :func:`names` ``target_new``;
* ``chat_PS``: the same for the paraphrase question(s);
* ``chat_NS``: a neighbour's answer names its own object (``target_true``; zsRE ``loc_ans``) and not ``target_new``;
* ``chat_keep``: the answer to an unrelated known question names its known object (pre and post side by
  side show whether it is answered as before).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

from ..errors import InvalidConfigError, InvalidDataError
from ..generation import generate_texts
from ..relations import QUESTIONS_FILE, question_table, relation_of_statement  # noqa: F401  (part of this API)
from ..tokens import QA_FORM, chat_prompt, has_chat_template  # noqa: F401  (part of this module's API)
from . import generative as G
from .datasets import EvalRecord, find_data_file

#: metric names, in display order
CHAT_METRICS = ("chat_ES", "chat_PS", "chat_NS", "chat_keep")
#: the question groups of a record, in the order of :data:`CHAT_METRICS`
GROUPS = ("rewrite", "paraphrase", "neighborhood", "keep")

_ZSRE_LOC_PREFIX = "nq question: "


def _relation(relation_id: str | None, where: str, field: str) -> dict[str, Any]:
    table = question_table()
    if relation_id not in table:
        raise InvalidDataError(
            f"{where}: field {field!r} is {relation_id!r}, which has no question in {QUESTIONS_FILE.name} "
            f"(known: {', '.join(table)}); add one there or evaluate without chat."
        )
    return table[relation_id]


def neighbour_subject(prompt: str, relation_id: str) -> str | None:
    """The subject of a CounterFact neighbourhood prompt: what ``{}`` stands for in the longest of the
    relation's statement templates that matches the whole prompt; ``None`` when none matches."""
    for template in sorted(question_table()[relation_id]["statements"], key=len, reverse=True):
        m = re.fullmatch(re.escape(template).replace(r"\{\}", "(.+)"), prompt.strip())
        if m:
            return m.group(1).strip()
    return None


def _runs(words: list[str], run: list[str]) -> list[int]:
    return [i for i in range(len(words) - len(run) + 1) if run and words[i : i + len(run)] == run]


def names(answer: str, obj: str, *, subject: str | None = None, aliases: Sequence[str] = ()) -> bool:
    """Whether ``answer`` names ``obj`` (or one of its ``aliases``). The rules:

    1. both are normalised as SQuAD does (:func:`~.generative.normalize`): lower case, punctuation
       removed, the articles *a*, *an*, *the* dropped wherever they stand, split into words;
    2. mentions of the question's ``subject`` are removed from the answer first (an answer that repeats
       "Porsche 911" does not thereby name "Porsche"), unless the object itself contains the subject;
    3. the object matches when its words occur in the answer as a contiguous run of **whole words**:
       "Rome" is not named by "Romeo", "Paris" not by "Parisian";
    4. no aliases are invented: without ``aliases`` the object's whole name must appear
       ("the United States" does not name "United States of America"; "United States of America" does
       name "United States"). CounterFact gives no aliases, so its objects are matched by their string.
    """
    words = G.normalize(answer)
    subj = G.normalize(subject or "")
    candidates = [G.normalize(o) for o in (obj, *aliases)]
    if subj and not any(_runs(c, subj) for c in candidates):
        at = _runs(words, subj)
        drop = {i + k for i in at for k in range(len(subj))}
        words = [w for i, w in enumerate(words) if i not in drop]
    return any(_runs(words, c) for c in candidates if c)


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS and the model's generation-config EOS tokens
    (chat models list their end-of-turn token there)."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return ids


def answer_of(continuation: str, chat: bool) -> str:
    """The answer in a generated continuation: the whole turn in chat form, the first line in ``Q:/A:`` form."""
    text = continuation.strip()
    return text if chat else text.split("\n", 1)[0].strip()


def ask(model: Any, tokenizer: Any, questions: Sequence[str], *, max_new_tokens: int = 32,
        batch_size: int = 64) -> list[str]:  # fmt: skip
    """The model's greedy answer to each question, asked as one user turn through the chat template
    (:func:`chat_prompt`; ``Q: … A:`` without one), stopped at the end of the turn (:func:`stop_ids`) and cut
    by :func:`answer_of`; answers do not depend on ``batch_size``."""
    prompts = [chat_prompt(tokenizer, q) for q in questions]
    templated = has_chat_template(tokenizer)
    texts = generate_texts(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        seed=None,
        batch_size=batch_size,
        stop_ids=stop_ids(model, tokenizer),
        add_special_tokens=not templated,  # a rendered template carries its own special tokens
    )
    return [answer_of(t[len(p) :], templated) for p, t in zip(prompts, texts)]


# ----------------------------------------------------------------------------- questions of a record


@dataclass(frozen=True)
class Probe:
    """One question, the subject it asks about (removed before matching) and the object that answers it."""

    question: str
    subject: str | None
    answer: str


@dataclass(frozen=True)
class KnownFact:
    subject: str
    attribute: str
    relation_id: str


def load_known_facts(source: Any = "known_1000.json") -> list[KnownFact]:
    """Facts of ``known_1000.json`` (a path, a bare file name looked up in the benchmark data folder, or a
    list of dicts with ``subject``, ``attribute``, ``relation_id``) whose relation has a question."""
    if isinstance(source, (str, os.PathLike)):
        path = find_data_file(source)
        if not path.exists():
            raise InvalidDataError(
                f"{source} not found for chat_keep's known questions; pass chat_known= a path to known_1000.json, "
                "set HF_KNOWEDIT_DATA to its folder, or chat_known=None to leave chat_keep out."
            )
        with open(path, encoding="utf-8") as f:
            source = json.load(f)
    facts = []
    for i, r in enumerate(list(source)):
        fields = ("subject", "attribute", "relation_id")
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) and r[k].strip() for k in fields):
            raise InvalidDataError(f"known fact {i}: needs string fields {fields}, got {r!r}.")
        if r["relation_id"] in question_table():
            facts.append(KnownFact(r["subject"].strip(), r["attribute"].strip(), r["relation_id"]))
    return facts


def record_probes(rec: EvalRecord, known: Sequence[KnownFact] = (), n_keep: int = 0) -> dict[str, list[Probe]]:
    """The questions of one record, per metric group (see the module docstring); typed errors name the
    record and field before anything is generated."""
    subject = rec.request.subject
    relation_id = relation_of_statement(rec.request.prompt) if rec.schema == "counterfact_flat" else rec.relation_id
    if rec.schema == "counterfact_flat" and relation_id is None:  # its relation is not known: no such questions
        out: dict[str, list[Probe]] = {"rewrite": [], "paraphrase": [], "neighborhood": []}
    elif rec.schema in ("counterfact", "counterfact_flat"):
        rel = _relation(relation_id, rec.where, "requested_rewrite.relation_id")
        neighbours = []
        for p in rec.neighborhood_prompts:
            s = neighbour_subject(p, relation_id)
            if s is not None:
                neighbours.append(Probe(rel["question"].format(s), s, rec.neighborhood_target))
        out = {
            "rewrite": [Probe(rel["question"].format(subject), subject, rec.target_new)],
            "paraphrase": [Probe(rel["paraphrase"].format(subject), subject, rec.target_new)],
            "neighborhood": neighbours,
        }
    elif rec.schema == "zsre":
        out = {
            "rewrite": [Probe(q, subject, rec.target_new) for q in rec.rewrite_prompts],
            "paraphrase": [Probe(q, subject, rec.target_new) for q in rec.paraphrase_prompts],
            "neighborhood": [
                Probe(q.removeprefix(_ZSRE_LOC_PREFIX).strip(), None, rec.neighborhood_target)
                for q in rec.neighborhood_prompts
            ],
        }
    else:
        raise InvalidConfigError(
            f"chat metrics need CounterFact records (a relation_id, or a flat record's statement) or zsRE's "
            f"questions; the {rec.schema!r} schema has neither. Evaluate CounterFact or zsRE records, or leave chat "
            "off."
        )
    keep: list[Probe] = []
    if known and n_keep:
        others = [f for f in known if f.subject != subject]
        start = rec.index * n_keep
        for j in range(min(n_keep, len(others))):
            f = others[(start + j) % len(others)]
            keep.append(Probe(question_table()[f.relation_id]["question"].format(f.subject), f.subject, f.attribute))
    out["keep"] = keep
    return out


def chat_case(probes: dict[str, list[Probe]], answers: dict[str, list[str]], target_new: str) -> dict[str, float]:
    """One record's chat metrics (fractions) from its answers, group by group as in ``probes``;
    a group without questions gives no value."""

    def share(group: str, ok) -> dict[str, float]:
        pairs = list(zip(probes[group], answers[group]))
        return {CHAT_METRICS[GROUPS.index(group)]: fmean(ok(p, a) for p, a in pairs)} if pairs else {}

    def new(p: Probe, a: str) -> bool:
        return names(a, target_new, subject=p.subject)

    def own(p: Probe, a: str) -> bool:
        return names(a, p.answer, subject=p.subject)

    return {
        **share("rewrite", new),
        **share("paraphrase", new),
        **share("neighborhood", lambda p, a: own(p, a) and not new(p, a)),
        **share("keep", own),
    }
