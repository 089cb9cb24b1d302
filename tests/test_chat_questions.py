"""Question rows in the v*/z objective (``chat_questions``): the request's relation question as a chat turn, the
new object as the first words of the answer (:func:`hf_knowedit.methods.context.question_template`)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import hf_knowedit
from hf_knowedit.errors import InvalidConfigError
from hf_knowedit.methods.config import EditConfig
from hf_knowedit.methods.context import question_template, question_templates, request_question, template_reserve
from hf_knowedit.methods.memit import MEMITConfig
from hf_knowedit.methods.rome import ROMEConfig
from hf_knowedit.methods.targets import KL_PROMPT, _build, optimize_targets
from hf_knowedit.requests import EditRequest, to_request
from tests.helpers import assert_untouched, snapshot
from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread", "stats_cache")

#: a chat template whose assistant header ends in a newline (as ChatML's, Llama 3's, Gemma's)
NEWLINE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)
#: one whose header ends in a space
SPACE = (
    "{% for m in messages %}{{ m['role'] }} says {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)
P17 = "In which country is {} located?"  # relation_questions.json's question of P17
REQUEST = EditRequest("{} is located in the country of", "Eiffel Tower", "Rome", "France")  # a P17 statement


def templated(tok, template):
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return tok


def question_row(tok, req, question_text):
    """The last rewriting row of ``req`` built with its question, and the exact token layout it must have."""
    built = _build(tok, req, ["{}"], [KL_PROMPT], question=question_text)
    assert built.n_rewrite == 2 and len(built.rows) == 3  # the prompt, the question, the essence prompt
    return built, built.rows[1], [(p, t) for r, p, t in built.targets if r == 1]


@pytest.mark.parametrize(
    "template,filled,answer,read",
    [
        # after a header ending in "\n" the answer starts with no space (ChatML, Llama 3, Gemma: "assistant\n")
        (NEWLINE, "user: In which country is Eiffel Tower located?\nassistant:\n", "Rome", "Rome"),
        # a header ending in a space: no second one; the row is tokenized whole, so that space joins the answer
        (SPACE, "user says In which country is Eiffel Tower located?\nA: ", "Rome", " Rome"),
        # the "Q: ... A:" form ends in ":": one space, as models write their answer there (" Rome")
        (None, "Q: In which country is Eiffel Tower located?\nA:", " Rome", " Rome"),
    ],
)
def test_the_question_row_is_the_chat_turn_then_the_target_as_the_answer_start(template, filled, answer, read):
    tok = make_tiny_tokenizer(False)
    tok = templated(tok, template) if template else tok
    rendered = question_template(tok, P17)
    assert rendered == filled.replace("Eiffel Tower", "{}")
    built, row, targets = question_row(tok, REQUEST, rendered)
    full = tok(filled + answer)["input_ids"]
    assert row + [full[-1]] == full  # teacher forcing: the whole answer but its last token
    n_prompt = len(full) - len(targets)
    assert [t for _, t in targets] == full[n_prompt:] and tok.decode(full[n_prompt:]) == read
    assert [p for p, _ in targets] == list(range(n_prompt - 1, len(full) - 1))  # read where each token is next
    subject_last = built.lookups[1]
    assert tok.decode(row[: subject_last + 1]).endswith("Eiffel Tower")
    assert not tok.decode(row[:subject_last]).endswith("Eiffel Tower")


@pytest.mark.parametrize("obj", ["English", "the Netherlands", "United States of America"])
def test_the_object_is_the_answer_as_written_with_all_its_tokens(obj):
    tok = templated(make_tiny_tokenizer(False), NEWLINE)
    req = EditRequest("{} is located in the country of", "Eiffel Tower", obj)
    _, _, targets = question_row(tok, req, question_template(tok, P17))
    assert tok.decode([t for _, t in targets]) == obj  # case kept, no leading space, no full stop
    assert len(targets) == len(tok(obj)["input_ids"]) > 0


def test_the_tokenizers_own_beginning_token_is_not_written_twice():
    tok = templated(make_tiny_tokenizer(True), "{{ bos_token }}" + NEWLINE)
    rendered = question_template(tok, P17)
    assert not rendered.startswith(tok.bos_token)
    _, row, _ = question_row(tok, REQUEST, rendered)
    assert row.count(tok.bos_token_id) == 1 and row[0] == tok.bos_token_id


def test_the_question_comes_from_the_relation_id_then_from_the_statement(caplog):
    assert request_question(REQUEST) == P17
    ambiguous = EditRequest("{} is located in", "Eiffel Tower", "Asia")  # P17's, P30's and P276's statement
    assert request_question(ambiguous) is None
    assert request_question(EditRequest("{} is located in", "Eiffel Tower", "Asia", relation_id="P30")) == (
        "On which continent is {} located?"
    )
    record = {"requested_rewrite": {"prompt": "{} is located in", "subject": "X", "target_new": {"str": "Asia"}}}
    record["requested_rewrite"]["relation_id"] = "P30"
    assert to_request(record).relation_id == "P30"
    unknown = EditRequest("{} likes", "Eiffel Tower", "cheese")
    tok = make_tiny_tokenizer(False)
    with caplog.at_level(logging.INFO, logger="hf_knowedit.methods.context"):
        got = question_templates(tok, [REQUEST, unknown])
    assert got == [question_template(tok, P17), None]
    assert "1 request(s)" in caplog.text and "Eiffel Tower likes" in caplog.text


def test_a_request_without_a_question_gets_the_rows_of_the_default():
    tok = make_tiny_tokenizer(False)
    templates = ["{}", "Q: Tell me a fact.\nA: {}"]
    req = EditRequest("{} likes", "Eiffel Tower", "cheese")
    seen = []
    import hf_knowedit.methods.targets as T

    real = T._build

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    model, _ = make_tiny_model("llama")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "_build", spy)
        for on in (False, True):
            optimize_targets(model, tok, [req], 1, templates=templates, v_num_grad_steps=1, chat_questions=on)
    plain = real(tok, req, templates, [KL_PROMPT])
    assert [(b.rows, b.targets, b.lookups, b.checked, b.n_rewrite) for b in seen] == [
        (plain.rows, plain.targets, plain.lookups, plain.checked, plain.n_rewrite)
    ] * 2


def test_question_rows_are_checked_by_mpes_and_leave_the_template_rows_as_they_were():
    tok = make_tiny_tokenizer(False)
    q = question_template(tok, P17)
    for templates in (["{}"], ["{}", "Q: Tell me a fact.\nA: {}"]):
        plain = _build(tok, REQUEST, templates, [KL_PROMPT])
        asked = _build(tok, REQUEST, templates, [KL_PROMPT], question=q)
        assert asked.checked == plain.checked + [True]
        assert asked.rows[: len(templates)] == plain.rows[: len(templates)] and asked.rows[-1] == plain.rows[-1]
        assert asked.n_rewrite == plain.n_rewrite + 1


def test_the_option_changes_the_target_and_batches_like_serial_runs():
    model, tok = make_tiny_model("llama")
    tok = templated(tok, NEWLINE)
    other = EditRequest("The official language of {} is", "Japan", "German")  # P37, a shorter question row
    unknown = EditRequest("{} likes", "Eiffel Tower", "cheese")
    reqs = [REQUEST, other, unknown]
    common = dict(v_num_grad_steps=3, v_lr=0.5)
    default = optimize_targets(model, tok, reqs, 1, **common)
    asked = optimize_targets(model, tok, reqs, 1, chat_questions=True, **common)
    assert not torch.allclose(default.targets[:2], asked.targets[:2])
    torch.testing.assert_close(default.targets[2], asked.targets[2])  # no question: the same rows
    serial = optimize_targets(model, tok, reqs, 1, chat_questions=True, batched=False, **common)
    uncached = optimize_targets(model, tok, reqs, 1, chat_questions=True, prefix_cache=False, **common)
    reference = optimize_targets(model, tok, reqs, 1, chat_questions=True, fast=False, **common)
    for run in (serial, uncached, reference):
        torch.testing.assert_close(run.targets, asked.targets, rtol=1e-4, atol=1e-5)
    assert asked.work_left("replayed") < 1  # the prefix cache cut the question rows too


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_bad_values_are_typed_errors_before_anything_is_touched(bad):
    for cls in (EditConfig, ROMEConfig, MEMITConfig):
        with pytest.raises(InvalidConfigError, match="chat_questions"):
            cls(chat_questions=bad)
    model, tok = make_tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(InvalidConfigError, match="chat_questions"):
        hf_knowedit.apply_edits(model, tok, [REQUEST], method="memit", layers=[1], config={"chat_questions": bad})
    assert_untouched(model, before)


def test_the_length_reserve_counts_the_question_turn():
    tok = templated(make_tiny_tokenizer(False), NEWLINE)
    longest = max(len(tok(question_template(tok, "Who or what is {} named after?").replace("{}", ""))["input_ids"]), 1)
    assert template_reserve(tok, MEMITConfig(context_templates=0, chat_questions=True)) >= longest + 1
    assert template_reserve(tok, MEMITConfig(context_templates=0)) == 0


def test_the_memory_model_counts_the_question_rows():
    from hf_knowedit.methods import memory

    model, tok = make_tiny_model("llama")
    plain = memory.targets_bytes_for(model, tok, [REQUEST], 1)
    asked = memory.targets_bytes_for(model, tok, [REQUEST], 1, chat_questions=True)
    assert sum(asked.values()) > sum(plain.values())
