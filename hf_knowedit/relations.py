"""CounterFact's relations as questions: the table ``evaluation/data/relation_questions.json`` (one edit question,
one paraphrase question and the CounterFact statement templates per ``relation_id``), read by the chat evaluation
(:mod:`hf_knowedit.evaluation.chat`) and by the edit methods' question rows (``chat_questions``,
:mod:`hf_knowedit.methods.context`). It lives here, below both, so neither imports the other."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

__all__ = ["QUESTIONS_FILE", "question_table", "relation_of_statement"]

#: the question table shipped with the package
QUESTIONS_FILE = Path(__file__).parent / "evaluation" / "data" / "relation_questions.json"


@functools.cache
def question_table() -> dict[str, dict[str, Any]]:
    """``relation_id -> {"relation", "question", "paraphrase", "statements"}`` (templates with ``{}``)."""
    with open(QUESTIONS_FILE, encoding="utf-8") as f:
        return json.load(f)["relations"]


@functools.cache
def _statement_relations() -> dict[str, frozenset[str]]:
    table: dict[str, set[str]] = {}
    for relation_id, rel in question_table().items():
        for template in rel["statements"]:
            table.setdefault(template, set()).add(relation_id)
    return {t: frozenset(r) for t, r in table.items()}


def relation_of_statement(template: str) -> str | None:
    """The ``relation_id`` whose CounterFact statement templates include ``template`` (a prompt with ``{}`` for
    the subject), when exactly one relation's do; ``None`` when none or several do."""
    found = _statement_relations().get(template.strip(), frozenset())
    return next(iter(found)) if len(found) == 1 else None
