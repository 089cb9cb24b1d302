"""Where is the subject, where is the target: token positions from offset mappings.

All positions come from the tokenizer's ``offset_mapping`` (fast tokenizers), never
from decoding and re-joining strings. Token spans are half-open ``(start, end)``
indices into the ids the model actually sees, special tokens (e.g. Llama's BOS)
included.

Which occurrence? A prompt *template* (``"{} is located in"``) marks the subject's
place with ``{}`` and that place is used. In an already filled prompt the **first**
occurrence of the subject is used (the reference ROME code does the same); pass
``occurrence=-1`` for the last one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidRequestError, MissingTokenizerError, SubjectNotFoundError

Span = tuple[int, int]


def _require_fast(tokenizer: Any) -> None:
    if tokenizer is None:
        raise MissingTokenizerError(
            "This call needs a tokenizer: pass tokenizer=... or attach one with hf_knowedit.attach(model, tokenizer)."
        )
    if isinstance(tokenizer, (str, bytes, Path)):
        raise MissingTokenizerError(
            f"tokenizer must be a transformers fast tokenizer object, got the {type(tokenizer).__name__} "
            f"{tokenizer!r}; load it first: AutoTokenizer.from_pretrained({str(tokenizer)!r})."
        )
    if not callable(tokenizer) or not hasattr(tokenizer, "convert_ids_to_tokens"):
        raise MissingTokenizerError(
            f"tokenizer must be a transformers fast tokenizer object (e.g. AutoTokenizer.from_pretrained(name)), "
            f"got {type(tokenizer).__name__}."
        )
    if not getattr(tokenizer, "is_fast", False):
        raise MissingTokenizerError(
            f"{type(tokenizer).__name__} is a slow tokenizer without offset mappings; "
            "load a fast one (AutoTokenizer.from_pretrained(..., use_fast=True))."
        )


def check_text(text: Any, what: str = "text") -> str:
    """``text`` if it is a string a tokenizer can encode; :class:`InvalidRequestError` otherwise (not a
    string, bytes, lone surrogates)."""
    if not isinstance(text, str):
        raise InvalidRequestError(f"The {what} must be a string, got {type(text).__name__}: {repr(text)[:60]}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequestError(
            f"The {what} {repr(text)[:60]} contains U+{ord(text[err.start]):04X}, a lone surrogate that no "
            "tokenizer can encode; pass valid Unicode text."
        ) from None
    return text


def check_length(n_tokens: int, max_positions: int, what: str = "prompt", reserve: int = 0) -> None:
    """Raise :class:`InvalidRequestError` unless ``n_tokens`` (+ ``reserve`` tokens the method adds, such as
    a context-template prefix) fit in the model's ``max_positions``
    (:func:`hf_knowedit.generation.max_positions`).

    >>> check_length(300, 128)
    Traceback (most recent call last):
    InvalidRequestError: The prompt is 300 tokens, the model takes at most 128; shorten it.
    """
    if n_tokens + reserve <= max_positions:
        return
    extra = f" (plus {reserve} for context templates)" if reserve else ""
    room = f"at most {max(0, max_positions - reserve)} tokens" if reserve else f"at most {max_positions}"
    raise InvalidRequestError(
        f"The {what} is {n_tokens} tokens{extra}, the model takes {room}; shorten it"
        + (" or lower context_length / context_templates." if reserve else ".")
    )


def check_request_lengths(tokenizer: Any, requests: Sequence[Any], max_positions: int, reserve: int = 0) -> None:
    """:func:`check_length` for each request's filled prompt followed by its new target (the longest text
    an editing method feeds the model, before any context-template prefix, which ``reserve`` counts).

    ``requests`` are :class:`~hf_knowedit.requests.EditRequest` (anything with ``text`` and ``target_new``).
    Call it before any forward pass: a prompt longer than the position embeddings otherwise fails with an
    ``IndexError`` inside the model (or silently degrades with rotary positions).
    """
    for req in requests:
        prompt_ids, target_ids = split_prompt_target(tokenizer, req.text, req.target_new)
        check_length(
            len(prompt_ids) + len(target_ids), max_positions, f"prompt {repr(req.text)[:60]} with its target", reserve
        )


def subject_char_span(prompt: str, subject: str, occurrence: int = 0) -> Span:
    """Character span of ``subject`` in ``prompt`` (surrounding whitespace of the
    subject is ignored). Raises :class:`SubjectNotFoundError`."""
    needle = subject.strip() if isinstance(subject, str) else ""
    if not needle:
        raise SubjectNotFoundError("The subject is empty; give the entity whose fact you mean, e.g. subject='Paris'.")
    starts, i = [], prompt.find(needle)
    while i != -1:
        starts.append(i)
        i = prompt.find(needle, i + 1)
    if not starts:
        raise SubjectNotFoundError(
            f"Subject {needle!r} does not occur in prompt {prompt!r}; check its spelling and case, "
            "or pass a template with '{}' where the subject goes."
        )
    try:
        start = starts[occurrence]
    except IndexError:
        raise SubjectNotFoundError(
            f"Subject {needle!r} occurs {len(starts)} time(s) in {prompt!r}; occurrence={occurrence} is out of range."
        ) from None
    return start, start + len(needle)


def chars_to_tokens(offsets: Sequence[tuple[int, int]], char_span: Span) -> Span:
    """Tokens whose characters overlap ``char_span`` (zero-width special tokens never do)."""
    cs, ce = char_span
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < ce and e > cs]
    if not hits:
        raise SubjectNotFoundError(f"No token covers characters {cs}..{ce}.")
    return hits[0], hits[-1] + 1


#: the prompt of a tokenizer without a chat template
QA_FORM = "Q: {}\nA:"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer: Any, question: str) -> str:
    """``question`` as one user turn of the tokenizer's chat template, ready for the assistant's answer;
    ``"Q: {question}\\nA:"`` for a tokenizer without a template."""
    if not has_chat_template(tokenizer):
        return QA_FORM.format(question)
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def encode(tokenizer: Any, text: str) -> dict:
    """Tokenize one string the way the model will see it, with offsets."""
    _require_fast(tokenizer)
    check_text(text)
    return tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)


def subject_token_span(tokenizer: Any, prompt: str, subject: str, occurrence: int = 0) -> Span:
    """Token span of ``subject`` in a filled ``prompt`` (see module doc for occurrences).

    >>> subject_token_span(tok, "The Eiffel Tower is in", "Eiffel Tower")
    (1, 4)
    """
    char_span = subject_char_span(prompt, subject, occurrence)
    return chars_to_tokens(encode(tokenizer, prompt)["offset_mapping"], char_span)


def fill_template(template: str, subject: str) -> tuple[str, Span]:
    """Fill the first ``{}`` of ``template``; return the prompt and the subject's char span."""
    if "{}" not in template:
        raise InvalidRequestError(
            f"Prompt {template!r} has no '{{}}' placeholder for the subject; write e.g. '{{}} is located in'."
        )
    head, tail = template.split("{}", 1)
    subject = subject.strip()
    if not subject:
        raise SubjectNotFoundError("The subject is empty; give the entity whose fact you mean.")
    return head + subject + tail.replace("{}", subject), (len(head), len(head) + len(subject))


@dataclass(frozen=True)
class EncodedPrompt:
    """A filled prompt, its ids, and the subject's token span within them."""

    text: str
    input_ids: list[int]
    subject_span: Span

    @property
    def subject_last(self) -> int:
        """Index of the subject's last token (ROME's lookup position)."""
        return self.subject_span[1] - 1


def encode_template(tokenizer: Any, template: str, subject: str, prefix: str = "") -> EncodedPrompt:
    """``prefix + template.format(subject)`` with the subject's token span."""
    text, (cs, ce) = fill_template(template, subject)
    text = prefix + text
    enc = encode(tokenizer, text)
    span = chars_to_tokens(enc["offset_mapping"], (cs + len(prefix), ce + len(prefix)))
    return EncodedPrompt(text, list(enc["input_ids"]), span)


def target_separator(prompt: str) -> str:
    """The text put between a prompt and its target: one space unless the prompt already ends in whitespace."""
    return "" if not prompt or prompt[-1].isspace() else " "


def split_prompt_target(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Ids of ``prompt`` and of ``target`` as they appear in ``prompt + " " + target``.

    The target is tokenized in context (after the separating space), so it matches
    what the model would generate, for byte-level BPE and SentencePiece alike.
    Raises :class:`InvalidRequestError` when the target yields no tokens.
    """
    target = target.strip()
    if not target:
        raise InvalidRequestError(f"Empty target for prompt {prompt!r}; give the object as text, e.g. 'Paris'.")
    full = prompt + target_separator(prompt) + target
    enc = encode(tokenizer, full)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    cut = len(prompt)
    # first token that carries target characters (the separator space may be fused into it)
    first = next((i for i, (s, e) in enumerate(offsets) if e > s and e > cut and full[max(s, cut) : e].strip()), None)
    if first is None:
        raise InvalidRequestError(f"Target {target!r} tokenizes to nothing after prompt {prompt!r}.")
    end = len(ids)
    # drop trailing zero-width special tokens (e.g. an EOS some tokenizers append)
    while end > first and offsets[end - 1][1] <= offsets[end - 1][0]:
        end -= 1
    if end == first:
        raise InvalidRequestError(f"Target {target!r} tokenizes to nothing after prompt {prompt!r}.")
    return ids[:first], ids[first:end]


def pad_id(tokenizer: Any) -> int:
    """The id that fills padded positions: the tokenizer's pad token, else its EOS, else 0.

    Padded positions are always masked out, so the choice never changes a result; it only has
    to be a valid id. Tokenizers without a pad token (GPT-2, GPT-J, Llama base) need no change.
    """
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        if isinstance(value, int):
            return value
    return 0


def pad_batch(
    seqs: Sequence[Sequence[int]], pad: int = 0, padding_side: str = "right", device: Any = None, width: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """``(input_ids, attention_mask, position_ids, offsets)`` of token-id rows padded to one width.

    Rows are padded to the longest row (or to ``width`` if larger). ``offsets[i]`` is the index of
    row ``i``'s first real token. ``position_ids = cumsum(mask) - 1``
    puts every real token at the position it has without padding, so left and right padding give
    the same numbers; right padding also leaves positions unchanged for models that derive them
    themselves.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(width, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    offsets = []
    for i, s in enumerate(seqs):
        start = width - len(s) if padding_side == "left" else 0
        ids[i, start : start + len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, start : start + len(s)] = 1
        offsets.append(start)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), position_ids.to(device), offsets
