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
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[str, ...] = ()
    case_id: Any | None = None

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


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = value.get("str")
    return value.strip() if isinstance(value, str) else value


def _templatize(prompt: str, subject: str) -> str:
    if "{}" in prompt:
        return prompt
    i = prompt.find(subject)
    if i < 0:
        raise SubjectNotFoundError(
            f"Subject {subject!r} does not occur in prompt {prompt!r}; use a template with '{{}}'."
        )
    return prompt[:i] + "{}" + prompt[i + len(subject) :]


def to_request(item: Any) -> EditRequest:
    """Normalise one request (see module doc for the accepted forms); validates it."""
    if isinstance(item, EditRequest):
        req = item
    elif isinstance(item, Mapping):
        if "requested_rewrite" in item:  # CounterFact, full schema
            rw = item["requested_rewrite"]
            req = EditRequest(
                prompt=rw.get("prompt", ""),
                subject=_text(rw.get("subject")) or "",
                target_new=_text(rw.get("target_new")) or "",
                target_true=_text(rw.get("target_true")),
                paraphrases=tuple(item.get("paraphrase_prompts", ())),
                neighborhood=tuple(item.get("neighborhood_prompts", ())),
                case_id=item.get("case_id"),
            )
        else:  # our own keys, or EasyEdit's flat records
            subject = _text(item.get("subject")) or ""
            rephrase = item.get("rephrase_prompt") or item.get("paraphrases") or ()
            locality = item.get("locality_prompt") or item.get("neighborhood") or ()
            req = EditRequest(
                prompt=_templatize(item.get("prompt", ""), subject) if subject else item.get("prompt", ""),
                subject=subject,
                target_new=_text(item.get("target_new")) or "",
                target_true=_text(item.get("target_true", item.get("ground_truth"))),
                paraphrases=tuple([rephrase] if isinstance(rephrase, str) else rephrase),
                neighborhood=tuple([locality] if isinstance(locality, str) else locality),
                case_id=item.get("case_id"),
            )
    else:
        raise InvalidRequestError(
            f"Cannot read an edit request from {type(item).__name__}; pass hf_knowedit.EditRequest(...), "
            "a dict with prompt/subject/target_new, or a CounterFact record."
        )
    req = EditRequest(
        req.prompt,
        req.subject.strip(),
        req.target_new.strip(),
        req.target_true.strip() if req.target_true else req.target_true,
        tuple(req.paraphrases),
        tuple(req.neighborhood),
        req.case_id,
    )
    validate(req)
    return req


def validate(req: EditRequest) -> None:
    """Raise a typed error for a malformed request."""
    if not isinstance(req.prompt, str) or "{}" not in req.prompt:
        raise InvalidRequestError(
            f"Prompt {req.prompt!r} has no '{{}}' placeholder for the subject; write e.g. '{{}} is located in'."
        )
    if not req.subject:
        raise SubjectNotFoundError("The subject is empty; give the entity whose fact you mean, e.g. subject='Angola'.")
    if not req.target_new:
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
