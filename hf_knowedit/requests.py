"""Edit requests: ``(subject, relation, object) -> (subject, relation, new object)``.

One place normalises every accepted form into :class:`EditRequest`:

* ``EditRequest(prompt="{} is located in", subject="Angola", target_new="Antarctica")``
* plain dicts with those keys (``target_new`` / ``target_true`` may be strings or
  ``{"str": ...}`` dicts),
* CounterFact records as they are (``{"requested_rewrite": {...}, "paraphrase_prompts": [...], ...}``),
* EasyEdit's flat CounterFact records (``{"prompt": "...filled...", "subject", "target_new", "ground_truth", ...}``).

Normalisation is visible here and nowhere else: surrounding whitespace is stripped from
subject and targets (the separating space before a target is added at tokenization,
see :func:`hf_knowedit.tokens.target_separator`), and a filled prompt gets its subject
replaced by ``{}`` (first occurrence).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .errors import EditConflictError, InvalidRequestError, SubjectNotFoundError


@dataclass(frozen=True)
class EditRequest:
    """One fact to rewrite.

    Args:
        prompt: the relation as a template with ``{}`` where the subject goes.
        subject: the entity, e.g. ``"Angola"``.
        target_new: the new object, e.g. ``"Antarctica"``.
        target_true: the current object, if known (used for conflicts and evaluation).
        paraphrases / neighborhood: optional evaluation prompts carried along (filled strings).
        case_id: optional identifier from a dataset.
        relation_id: optional relation identifier, e.g. CounterFact's Wikidata ``"P17"`` (read from
            ``requested_rewrite.relation_id`` or a dict's ``relation_id``); ``chat_questions`` asks the
            relation's question by it.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[str, ...] = ()
    case_id: Any | None = None
    relation_id: str | None = None

    @property
    def text(self) -> str:
        """The filled prompt."""
        return self.prompt.replace("{}", self.subject, 1)

    @property
    def relation_key(self) -> tuple[str, str]:
        """What two requests must share to rewrite the same fact: (subject, relation template)."""
        return (self.subject.casefold(), self.prompt.strip().casefold())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["paraphrases"], d["neighborhood"] = list(self.paraphrases), list(self.neighborhood)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EditRequest:
        return to_request(d)


#: the example shown in messages about a field
_EXAMPLES = {
    "prompt": "prompt='{} is located in'",
    "subject": "subject='Angola'",
    "target_new": "target_new='Antarctica'",
    "target_true": "target_true='Africa' (or None)",
    "paraphrases": "paraphrases=['Angola lies in']",
    "neighborhood": "neighborhood=['Kenya is located in']",
    "relation_id": "relation_id='P30' (or None)",
}


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_text(value: Any, field: str) -> str:
    """``value`` if it is a string any tokenizer can encode, else :class:`InvalidRequestError`."""
    if not isinstance(value, str):
        what = "bytes (decode them first)" if isinstance(value, (bytes, bytearray)) else type(value).__name__
        raise InvalidRequestError(
            f"The request's {field} must be a string, got {what}: {_show(value)}; pass e.g. {_EXAMPLES[field]}."
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = value[err.start]
        raise InvalidRequestError(
            f"The request's {field} {_show(value)} contains U+{ord(bad):04X} at position {err.start}, a lone "
            "surrogate that is not valid Unicode text and that no tokenizer can encode; pass valid text."
        ) from None
    return value


def _required(value: Any, field: str) -> str:
    if value is None:
        raise InvalidRequestError(f"The request has no {field}; pass e.g. {_EXAMPLES[field]}.")
    return _check_text(value, field)


def _text(value: Any, field: str, required: bool = True) -> str | None:
    """A target field as text: a string, or CounterFact's ``{"str": ...}`` dict; stripped."""
    if isinstance(value, Mapping):
        value = value.get("str")
    if value is None and not required:
        return None
    return _required(value, field).strip()


def _prompts(value: Any, field: str) -> tuple[str, ...]:
    """Evaluation prompts: one string, or a list / tuple of strings (``None`` or empty: none)."""
    if value is None or (isinstance(value, str) and not value):
        return ()
    if isinstance(value, str):
        return (_check_text(value, field),)
    if not isinstance(value, (list, tuple)):
        raise InvalidRequestError(
            f"The request's {field} must be a list of strings, got {type(value).__name__}: {_show(value)}; "
            f"pass e.g. {_EXAMPLES[field]}."
        )
    return tuple(_check_text(v, field) for v in value)


def _case_id(value: Any) -> Any:
    if value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise InvalidRequestError(
        f"The request's case_id must be a string, an int or None, got {type(value).__name__}: {_show(value)}."
    )


def _templatize(prompt: str, subject: str) -> str:
    if "{}" in prompt or not subject:
        return prompt
    i = prompt.find(subject)
    if i < 0:
        raise SubjectNotFoundError(
            f"Subject {subject!r} does not occur in prompt {prompt!r}; use a template with '{{}}'."
        )
    return prompt[:i] + "{}" + prompt[i + len(subject) :]


def _first(item: Mapping, *keys: str) -> Any:
    """The value of the first of ``keys`` in ``item`` that is set and not empty."""
    for key in keys:
        value = item.get(key)
        if value is not None and not (isinstance(value, (str, list, tuple)) and not value):
            return value
    return None


def to_request(item: Any) -> EditRequest:
    """Normalise one request (see module doc for the accepted forms); validates it.

    Raises :class:`InvalidRequestError` (naming the field) for fields of the wrong type (a subject that
    is not a string, ``prompt=None``, bytes, text with lone surrogates, ...) and for malformed values.
    """
    if isinstance(item, EditRequest):
        fields = dict(
            prompt=item.prompt,
            subject=item.subject,
            target_new=item.target_new,
            target_true=item.target_true,
            paraphrases=item.paraphrases,
            neighborhood=item.neighborhood,
            case_id=item.case_id,
            relation_id=item.relation_id,
        )
    elif isinstance(item, Mapping):
        if "requested_rewrite" in item:  # CounterFact, full schema
            rw = item["requested_rewrite"]
            if not isinstance(rw, Mapping):
                raise InvalidRequestError(
                    f"requested_rewrite must be a dict with prompt/subject/target_new, got "
                    f"{type(rw).__name__}: {_show(rw)}."
                )
            fields = dict(
                prompt=rw.get("prompt"),
                subject=rw.get("subject"),
                target_new=rw.get("target_new"),
                target_true=rw.get("target_true"),
                paraphrases=item.get("paraphrase_prompts"),
                neighborhood=item.get("neighborhood_prompts"),
                case_id=item.get("case_id"),
                relation_id=rw.get("relation_id"),
            )
        else:  # our own keys, or EasyEdit's flat records
            fields = dict(
                prompt=item.get("prompt"),
                subject=item.get("subject"),
                target_new=item.get("target_new"),
                target_true=item["target_true"] if "target_true" in item else item.get("ground_truth"),
                paraphrases=_first(item, "rephrase_prompt", "paraphrases"),
                neighborhood=_first(item, "locality_prompt", "neighborhood"),
                case_id=item.get("case_id"),
                relation_id=item.get("relation_id"),
            )
    else:
        raise InvalidRequestError(
            f"Cannot read an edit request from {type(item).__name__}; pass hf_knowedit.EditRequest(...), "
            "a dict with prompt/subject/target_new, or a CounterFact record."
        )
    subject = _text(fields["subject"], "subject")
    prompt = _required(fields["prompt"], "prompt")
    if not isinstance(item, EditRequest):  # a dict may carry a filled prompt
        prompt = _templatize(prompt, subject)
    req = EditRequest(
        prompt,
        subject,
        _text(fields["target_new"], "target_new"),
        _text(fields["target_true"], "target_true", required=False),
        _prompts(fields["paraphrases"], "paraphrases"),
        _prompts(fields["neighborhood"], "neighborhood"),
        _case_id(fields["case_id"]),
        _text(fields["relation_id"], "relation_id", required=False) or None,
    )
    validate(req)
    return req


def validate(req: EditRequest) -> None:
    """Raise a typed error for a malformed request."""
    if not isinstance(req.prompt, str) or "{}" not in req.prompt:
        raise InvalidRequestError(
            f"Prompt {_show(req.prompt)} has no '{{}}' placeholder for the subject; write e.g. '{{}} is located in'."
        )
    if req.prompt.count("{}") > 1:
        raise InvalidRequestError(
            f"Prompt {_show(req.prompt)} has {req.prompt.count('{}')} '{{}}' placeholders; use exactly one, where "
            "the subject goes (e.g. '{} is located in')."
        )
    if not isinstance(req.subject, str) or not req.subject:
        raise SubjectNotFoundError("The subject is empty; give the entity whose fact you mean, e.g. subject='Angola'.")
    if not isinstance(req.target_new, str) or not req.target_new:
        raise InvalidRequestError(f"Empty target_new for {req.text!r}; give the new object as text.")
    if req.target_true is not None and req.target_new.casefold() == req.target_true.casefold():
        raise InvalidRequestError(
            f"target_new equals target_true ({req.target_new!r}) for {req.text!r}: there is nothing to edit."
        )


def normalize_requests(requests: Any) -> list[EditRequest]:
    """A list of validated :class:`EditRequest` from one request or an iterable of them.

    Exact duplicates inside the batch are an error, and so are two requests that send the
    same subject and relation to different targets (:class:`EditConflictError`).
    """
    if isinstance(requests, (EditRequest, Mapping)):
        requests = [requests]
    if not isinstance(requests, Iterable) or isinstance(requests, (str, bytes)):
        raise InvalidRequestError("requests must be an EditRequest, a dict, or a list of them.")
    out = [to_request(r) for r in requests]
    if not out:
        raise InvalidRequestError("No edit requests given: pass at least one.")
    seen: dict = {}
    for r in out:
        prev = seen.get(r.relation_key)
        if prev is not None:
            what = "twice" if prev.target_new == r.target_new else f"to both {prev.target_new!r} and {r.target_new!r}"
            raise EditConflictError(f"The batch rewrites {r.text!r} {what}; keep one request per subject and relation.")
        seen[r.relation_key] = r
    return out
