"""Context templates: short prefixes the model writes itself, so an edit generalises across contexts.

ROME and MEMIT average the key ``k*`` (and optimise the value) over a few prompts that
put a random prefix before the fact: ``"{}"`` (no prefix) plus ``n`` generations such as
``"Therefore, the team decided. {}"``. Three ways to get them (``context_templates`` in every
method config, :func:`template_groups`):

* **an int** ``n`` (default 5): ``n`` prefixes of ``context_length`` (10) *new* tokens, each started
  from a neutral English word (MEMIT's ``"The"``, ``"Therefore"``, ``"Because"``, ``"I"``, ``"You"``,
  cycled), sampled with a fixed seed (top-k 5, as the reference) from the *unedited* model
  (:func:`context_templates`);
* **your own** list of strings with one ``{}`` each (``"{}"`` is put first if it is not there);
* **"reference"**: the reference code's recipe for the method (:data:`RECIPES`). ROME
  (``rome/rome_main.py``): 10 prefixes of 5 tokens and 10 of 10 (``context_template_length_params
  [[5, 10], [10, 10]]``) sampled from the beginning-of-text token. MEMIT, AlphaEdit and EMMET
  (``memit/memit_main.py``): 5 prefixes of 10 tokens, one from each of MEMIT's five words
  (``[[10, 5]]``, ``n_gen // 5`` per word). As in the reference's ``generate_fast``, a length
  counts the start's tokens too (``"The"`` + 9 sampled tokens) and the text is cleaned the
  reference's way (NFKD, ``"\\n\\n"`` → space, braces → spaces, ``". {}"`` appended).
  ``context_template_length_params`` overrides the ``[length, count]`` pairs. The sampling itself
  is ``transformers``' top-k sampling under a fixed seed, so the prefixes are the reference's in
  kind and number, not its exact strings (those depend on its RNG state).

**Groups.** Templates come as groups (:func:`template_groups`): ``[["{}"], generated...]``, one
group per ``[length, count]`` pair of a recipe (the int and list forms have one generated group).
MEMIT-family keys are averaged within each group, then across groups, as the reference's
``compute_ks`` does: with ``[["{}"], five prefixes]`` the bare prompt weighs ½, each prefix ⅒.
ROME averages all templates uniformly (its ``compute_u`` gets a flat list), and the ``z`` / ``v*``
optimisation uses every template once (flat) in both.

**Chat form** (``chat_context`` = ``n`` > 0, any method): users ask instruct models through their chat
template, where the answer starts an assistant turn. :func:`chat_templates` puts the prompt at the start of
the assistant's reply to a generic user turn (:data:`CHAT_TURNS`, cycled), through the tokenizer's chat template
(``"Q: ... A: "`` without one), e.g. ``"<|im_start|>user\nTell me a fact.<|im_end|>\n<|im_start|>assistant\n{}"``.
They form a group of their own, so keys and the v*/z loss see the fact as the model says it in a chat. Cost:
``n`` more prompts per request in the v*/z optimisation and the keys (the chat template's tokens included).
Off by default (the papers' objective).

**Questions** (``chat_questions=True``): the v*/z objective gets one more row per request, the question of its
relation (:func:`request_question`) as a user turn, then the new object as the answer's first words
(:func:`question_template`; ``docs/design.md`` gives the target-form rule). Cost: one row per request that has
a question, in the v*/z steps only.

Generated templates are cached per model in ``get_state(model).history`` (no module-level caches).

>>> context_templates(model, tok, n=5, length=10)
['{}', 'The first time I saw the movie. {}', ...]
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import InvalidConfigError
from ..generation import generate_texts
from ..relations import question_table, relation_of_statement
from ..stack import base_view, get_state
from ..tokens import chat_prompt

logger = logging.getLogger(__name__)

#: the neutral starts of MEMIT's context templates (cycled when ``n`` is larger)
STARTS = ("The", "Therefore", "Because", "I", "You")
_HISTORY_KEY = "context.templates"

#: ``context_templates="reference"``: per recipe, where generation starts and the default
#: ``[length, count]`` pairs (``"bos"``: the tokenizer's beginning-of-text token)
RECIPES: dict[str, tuple[str, tuple[tuple[int, int], ...]]] = {
    "rome": ("bos", ((5, 10), (10, 10))),
    "memit": ("words", ((10, 5),)),
}


def _clean(text: str) -> str:
    """One line without braces (they would break ``str.format``), ending in ``". "``."""
    text = " ".join(text.replace("{", " ").replace("}", " ").split())
    return text + ". "


def context_templates(model: nn.Module, tokenizer: Any, *, n: int = 5, length: int = 10, seed: int = 0) -> list[str]:
    """``["{}"]`` plus ``n`` model-generated prefixes, each ending in ``". {}"``.

    Prefixes start from :data:`STARTS` (cycled), ``length`` sampled tokens each, seeded.
    Cached per model and per ``(n, length, seed)`` in ``get_state(model).history``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidConfigError(f"context_templates: n must be an int >= 0, got {n!r}.")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise InvalidConfigError(f"context_templates: length must be an int >= 1, got {length!r}.")
    cache = get_state(model).history.setdefault(_HISTORY_KEY, {})
    key = (n, length, seed)
    if key not in cache:
        starts = [STARTS[i % len(STARTS)] for i in range(n)]
        with base_view(model):  # templates come from the unedited model (other threads keep the edited one)
            texts = generate_texts(model, tokenizer, starts, max_new_tokens=length, seed=seed) if n else []
        cache[key] = ["{}"] + [_clean(t) + "{}" for t in texts]
        logger.info("Context templates (seed %d): %s", seed, cache[key])
    return list(cache[key])


def _bos_start(tokenizer: Any) -> str:
    """The text whose encoding is exactly the beginning-of-text token (``""`` for tokenizers that add
    it themselves, like Llama's; the token's string for GPT-2's ``<|endoftext|>``); falls back to
    the end-of-text token, then to ``"The"`` (the first ROME release's start) with a log line."""
    for name in ("bos_token", "eos_token"):
        token = getattr(tokenizer, name, None)
        token_id = getattr(tokenizer, f"{name}_id", None)
        if not token or token_id is None:
            continue
        if list(tokenizer("")["input_ids"]) == [token_id]:
            return ""
        if list(tokenizer(token)["input_ids"]) == [token_id]:
            return token
    logger.info("The tokenizer has no beginning-of-text token: reference context templates start from 'The'.")
    return "The"


def _reference_clean(text: str, specials: Sequence[str]) -> str:
    """The reference's cleaning (``generate_fast``: NFKD, ``"\\n\\n"`` → space, special tokens
    dropped; MEMIT: braces → spaces), plus ``". "``."""
    text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    for s in specials:
        if s:
            text = text.replace(s, "")
    return text.replace("{", " ").replace("}", " ") + ". "


def reference_templates(
    model: nn.Module,
    tokenizer: Any,
    recipe: str,
    length_params: Sequence[Sequence[int]] | None = None,
    *,
    seed: int = 0,
) -> list[list[str]]:
    """The reference's context templates for ``recipe`` (``"rome"`` or ``"memit"``, :data:`RECIPES`):
    ``[["{}"], group per [length, count] pair]``, cached per model.

    A ``length`` counts the start's tokens too (the reference's ``max_out_len``); ``"memit"`` samples
    ``count // 5`` prefixes from each of :data:`STARTS`, ``"rome"`` ``count`` from the beginning-of-text
    token. Sampled top-k 5 from the unedited model with a fixed seed.
    """
    if recipe not in RECIPES:
        raise InvalidConfigError(f"Unknown context-template recipe {recipe!r}; choose among {sorted(RECIPES)}.")
    start_kind, default = RECIPES[recipe]
    pairs = [tuple(p) for p in (length_params if length_params is not None else default)]
    cache = get_state(model).history.setdefault(_HISTORY_KEY, {})
    key = ("reference", recipe, tuple(pairs), seed)
    if key not in cache:
        specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if isinstance(t, str)]
        groups: list[list[str]] = [["{}"]]
        with base_view(model):  # templates come from the unedited model (other threads keep the edited one)
            for length, count in pairs:
                if start_kind == "bos":
                    per_start = [(_bos_start(tokenizer), count)]
                else:
                    per_start = [(w, count // len(STARTS)) for w in STARTS]
                texts = []
                for start, k in per_start:
                    if k:  # every text ends at `length` tokens, the start's included
                        new = max(1, length - len(tokenizer(start)["input_ids"]))
                        texts += generate_texts(model, tokenizer, [start] * k, max_new_tokens=new, seed=seed, top_k=5)
                groups.append([_reference_clean(t, specials).lstrip() + "{}" for t in texts])
        cache[key] = groups
        logger.info("Reference context templates (%s, seed %d): %s", recipe, seed, groups)
    return [list(g) for g in cache[key]]


#: the user turns of the chat-form templates (``chat_context``): generic, so that the fact itself is what
#: the assistant's reply is about
CHAT_TURNS = ("Tell me a fact.", "Tell me something you know.", "Say something true.", "What do you know?")


def _reply_head(tokenizer: Any, turn: str) -> str:
    """``turn`` as one user turn, ready for the assistant's reply (:func:`hf_knowedit.tokens.chat_prompt`), without a
    beginning-of-text token the tokenizer adds itself, and with ``"{}"`` written ``"{ }"`` (templates take the prompt
    at their one ``"{}"``)."""
    head = chat_prompt(tokenizer, turn)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and head.startswith(bos) and list(tokenizer("")["input_ids"]) == [getattr(tokenizer, "bos_token_id", None)]:
        head = head[len(bos) :]
    return head.replace("{}", "{ }")


def chat_templates(tokenizer: Any, n: int) -> list[str]:
    """``n`` templates that put the prompt at the start of the assistant's reply to a user turn of
    :data:`CHAT_TURNS` (cycled): ``chat_prompt(tokenizer, turn) + "{}"`` (:func:`hf_knowedit.tokens.chat_prompt`:
    the tokenizer's chat template, or ``"Q: {turn}\\nA: {}"``). A beginning-of-text token the template writes is
    left out where the tokenizer adds it itself (prompts are encoded with special tokens)."""
    out = []
    for i in range(n):
        head = _reply_head(tokenizer, CHAT_TURNS[i % len(CHAT_TURNS)])
        out.append(head + ("" if head.endswith((" ", "\n")) else " ") + "{}")
    return out


#: stands for the subject while a question goes through the chat template (a private-use character)
_SUBJECT = "\ue000"


def question_template(tokenizer: Any, question: str) -> str:
    """``question`` (``"{}"`` where the subject goes) as one user turn ready for the assistant's answer, through the
    tokenizer's chat template (``"Q: ...\\nA:"`` without one), with ``"{}"`` still where the subject goes:
    ``"<|im_start|>user\\nWhere is {} located?<|im_end|>\\n<|im_start|>assistant\\n"``. The answer is written
    after it as the target is after any prompt (:func:`hf_knowedit.tokens.split_prompt_target`): directly after a
    header that ends in whitespace, after one space otherwise (``"A: Rome"``)."""
    return _reply_head(tokenizer, question.replace("{}", _SUBJECT, 1)).replace(_SUBJECT, "{}", 1)


def request_question(request: Any) -> str | None:
    """The edit question of the request's relation (``"Where is {} located?"``) from the chat evaluation's table
    (:func:`hf_knowedit.relations.question_table`): the relation is the request's ``relation_id`` if it
    carries one, else the one whose CounterFact statements include its prompt
    (:func:`~hf_knowedit.relations.relation_of_statement`); ``None`` when no relation, or none with a
    question, is found."""

    relation = getattr(request, "relation_id", None) or relation_of_statement(request.prompt)
    entry = question_table().get(relation) if relation else None
    return entry["question"] if entry and "{}" in entry["question"] else None


def question_templates(tokenizer: Any, requests: Sequence[Any]) -> list[str | None]:
    """Per request, its question as a chat turn ready for the answer (:func:`question_template` of
    :func:`request_question`), or ``None`` (logged once per call, naming the requests) where none is known."""
    questions = [request_question(r) for r in requests]
    missing = [r.text for r, q in zip(requests, questions) if q is None]
    if missing:
        logger.info(
            "chat_questions: no question is known for the relation of %d request(s), which get no question row: %s",
            len(missing),
            missing[:10] + (["..."] if len(missing) > 10 else []),
        )
    return [None if q is None else question_template(tokenizer, q) for q in questions]


def template_groups(model: nn.Module, tokenizer: Any, config: Any) -> list[list[str]]:
    """The context templates ``config`` asks for, as groups: ``[["{}"], ...]`` (see module docstring).

    ``config`` is a method config: ``context_templates`` (int, list or ``"reference"``),
    ``context_length``, ``context_template_length_params`` and the class's ``reference_context``
    recipe (``"rome"`` for ROME, ``"memit"`` for the MEMIT family).
    """
    value = config.context_templates
    if isinstance(value, str):
        recipe = getattr(type(config), "reference_context", "memit")
        groups = reference_templates(model, tokenizer, recipe, getattr(config, "context_template_length_params", None))
    elif isinstance(value, (list, tuple)):
        groups = [["{}"], [t for t in value if t != "{}"]]
    else:
        groups = [["{}"], context_templates(model, tokenizer, n=value, length=config.context_length)[1:]]
    groups.append(chat_templates(tokenizer, getattr(config, "chat_context", 0)))
    return [g for g in groups if g]


def flatten(groups: Sequence[Sequence[str]] | Sequence[str]) -> list[str]:
    """Templates as one flat list (``"{}"`` first), from groups or an already flat list."""
    if all(isinstance(t, str) for t in groups):
        return list(groups)  # type: ignore[arg-type]
    return [t for g in groups for t in g]


def template_reserve(tokenizer: Any, config: Any) -> int:
    """Tokens a context-template prefix may add to a prompt (for the length check before any forward)."""
    chat = chat_templates(tokenizer, min(getattr(config, "chat_context", 0), len(CHAT_TURNS)))
    if getattr(config, "chat_questions", False):  # a question row holds no statement: its turn counts whole
        chat += [question_template(tokenizer, r["question"]) for r in question_table().values()]
    chat_reserve = max((len(tokenizer(t.replace("{}", ""))["input_ids"]) + 1 for t in chat), default=0)
    return max(chat_reserve, _prefix_reserve(tokenizer, config))


def _prefix_reserve(tokenizer: Any, config: Any) -> int:
    value = getattr(config, "context_templates", 0)
    if isinstance(value, str):
        recipe = getattr(type(config), "reference_context", "memit")
        pairs = getattr(config, "context_template_length_params", None) or RECIPES[recipe][1]
        return max(length for length, _ in pairs) + 4
    if isinstance(value, (list, tuple)):
        sizes = [len(tokenizer(t.replace("{}", ""), add_special_tokens=False)["input_ids"]) for t in value]
        return max(sizes, default=0) + 1
    return getattr(config, "context_length", 0) + 4 if value else 0
