"""The chat-form context templates (``chat_context``, :func:`hf_knowedit.methods.context.chat_templates`): the
prompt at the start of an assistant's reply, in the v*/z objective and the keys of every method."""

from __future__ import annotations

import copy

import pytest

import hf_knowedit
from hf_knowedit.errors import InvalidConfigError
from hf_knowedit.methods import memit, rome
from hf_knowedit.methods.context import CHAT_TURNS, chat_templates, template_groups
from hf_knowedit.methods.memit import MEMITConfig
from hf_knowedit.requests import EditRequest
from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread", "stats_cache")

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} says {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant says {% endif %}"
)
REQUEST = EditRequest("{} is located in", "Eiffel Tower", "Rome", "Paris")


def templated(tok, template=TEMPLATE):
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return tok


def test_chat_templates_put_the_prompt_where_the_assistant_answers():
    tok = templated(make_tiny_tokenizer(False))
    got = chat_templates(tok, 5)
    assert got[0] == "user says Tell me a fact.\nassistant says {}"
    assert [t.split("says ")[1].split("\n")[0] for t in got] == [*CHAT_TURNS, CHAT_TURNS[0]]  # cycled
    assert all(t.count("{}") == 1 and t.endswith("{}") for t in got)
    assert chat_templates(tok, 0) == []


def test_without_a_chat_template_the_form_is_q_and_a():
    assert chat_templates(make_tiny_tokenizer(False), 1) == ["Q: Tell me a fact.\nA: {}"]


def test_a_beginning_of_text_token_the_tokenizer_adds_itself_is_not_written_twice():
    tok = make_tiny_tokenizer(True)  # prepends <|bos|> when encoding
    with_bos = templated(tok, "{{ bos_token }}" + TEMPLATE)
    (template,) = chat_templates(with_bos, 1)
    assert not template.startswith(tok.bos_token)
    ids = tok(template.replace("{}", "Rome"))["input_ids"]
    assert ids.count(tok.bos_token_id) == 1


def test_chat_context_adds_its_own_group_and_is_validated():
    model, tok = make_tiny_model("llama")
    tok = templated(tok)
    base = template_groups(model, tok, MEMITConfig(context_templates=0))
    assert base == [["{}"]]
    assert template_groups(model, tok, MEMITConfig(context_templates=0, chat_context=2)) == [
        ["{}"],
        chat_templates(tok, 2),
    ]
    with pytest.raises(InvalidConfigError, match="chat_context"):
        MEMITConfig(chat_context=-1)


@pytest.mark.parametrize("module,method", [(rome, "rome"), (memit, "memit")])
def test_the_target_objective_sees_the_chat_form(module, method, monkeypatch):
    model, tok = make_tiny_model("llama")
    tok = templated(tok)
    seen = []
    real = module.optimize_targets

    def spy(*args, **kwargs):
        seen.append(list(kwargs["templates"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "optimize_targets", spy)
    config = dict(context_templates=0, chat_context=1, mom2="identity", v_num_grad_steps=2)
    hf_knowedit.apply_edits(model, tok, [REQUEST], method=method, layers=[1], config=config)
    assert seen and all(t == ["{}", *chat_templates(tok, 1)] for t in seen)
    hf_knowedit.revert_edits(model)
