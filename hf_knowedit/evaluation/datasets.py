"""Benchmark records: CounterFact (full and flat schema) and zsRE, read into one shape.

Schemas (``schema=`` names; auto-detected from the first record when not given):

``"counterfact"``  ROME's CounterFact (``counterfact_500.json``): ``requested_rewrite{prompt, subject,
    target_new{str}, target_true{str}}``, ``paraphrase_prompts``, ``neighborhood_prompts``,
    ``generation_prompts`` (optional, used for fluency).
``"counterfact_flat"``  EasyEdit's flat CounterFact (``counterfact_flat_edit_10000.json``): ``prompt``
    (filled), ``subject``, ``target_new``, ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``,
    ``locality_ground_truth``.
``"zsre"``  zsRE, MEND split (``zsre_eval_1037.json``): ``subject``, ``src``, ``rephrase``, ``answers``,
    ``loc`` (``"nq question: ..."``), ``loc_ans``. Like the MEMIT reference loader, the edit's new target is
    ``answers[0]`` (``zsre_target="answers"``) and the neighbourhood prompt is ``loc + "?"`` with target
    ``loc_ans``; ``zsre_target="alt"`` uses ``alt`` (EasyEdit's choice) instead.

Every problem is an :class:`~hf_knowedit.errors.InvalidDataError` that names the record (index and
``case_id``) and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidDataError, KnowEditError
from ..requests import EditRequest, to_request

SCHEMAS = ("counterfact", "counterfact_flat", "zsre")

#: file names of the shared benchmark data
FILES = {
    "counterfact": "counterfact_500.json",
    "counterfact_flat": "counterfact_flat_edit_10000.json",
    "zsre": "zsre_eval_1037.json",
}


#: schema -> the source field of EvalRecord.target_new / target_true / neighborhood_target (for error messages)
TARGET_FIELDS = {
    "counterfact": {
        "target_new": "requested_rewrite.target_new.str",
        "target_true": "requested_rewrite.target_true.str",
        "neighborhood_target": "requested_rewrite.target_true.str",
    },
    "counterfact_flat": {
        "target_new": "target_new",
        "target_true": "ground_truth",
        "neighborhood_target": "locality_ground_truth",
    },
    "zsre": {"target_new": "answers", "target_true": "-", "neighborhood_target": "loc_ans"},
}
#: schema -> the source field of the rewrite / paraphrase / neighbourhood prompts
PROMPT_FIELDS = {
    "counterfact": {
        "rewrite": "requested_rewrite.prompt",
        "paraphrase": "paraphrase_prompts",
        "neighborhood": "neighborhood_prompts",
        "generation": "generation_prompts",
    },
    "counterfact_flat": {"rewrite": "prompt", "paraphrase": "rephrase_prompt", "neighborhood": "locality_prompt"},
    "zsre": {"rewrite": "src", "paraphrase": "rephrase", "neighborhood": "loc"},
}


@dataclass(frozen=True)
class EvalRecord:
    """One benchmark case in the shape the metrics use.

    Attributes:
        request: the edit (:class:`~hf_knowedit.EditRequest`) the editing protocols apply.
        schema: one of :data:`SCHEMAS`.
        target_new / target_true: the new object and the current one (``None`` for zsRE).
        rewrite_prompts / paraphrase_prompts / neighborhood_prompts: filled prompts.
        neighborhood_target: what the neighbourhood prompts should keep predicting
            (``target_true`` for CounterFact, ``loc_ans`` for zsRE).
        generation_prompts: prompts for the fluency metric (CounterFact full schema only).
        index / case_id: position in the source list and the dataset's id.
        relation_id: CounterFact's Wikidata relation (``requested_rewrite.relation_id``, e.g. ``"P17"``),
            which picks the record's questions in the chat metrics; ``None`` where the schema has none.
    """

    request: EditRequest
    schema: str
    target_new: str
    target_true: str | None
    rewrite_prompts: tuple[str, ...]
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    neighborhood_target: str
    generation_prompts: tuple[str, ...] = ()
    index: int = 0
    case_id: Any = None
    relation_id: str | None = None

    @property
    def where(self) -> str:
        return record_label(self.index, self.case_id)


def record_label(index: int, case_id: Any = None) -> str:
    return f"record {index}" + (f" (case_id {case_id})" if case_id is not None else "")


def detect_schema(record: Any, index: int = 0) -> str:
    """The schema name of one raw record."""
    if isinstance(record, Mapping):
        keys = set(record)
        if "requested_rewrite" in keys:
            return "counterfact"
        if {"src", "loc"} <= keys:
            return "zsre"
        if {"prompt", "ground_truth"} <= keys or {"rephrase_prompt", "locality_prompt"} & keys:
            return "counterfact_flat"
        shown = sorted(map(str, keys))[:8]
    else:
        shown = type(record).__name__
    raise InvalidDataError(
        f"{record_label(index)}: unknown schema (keys {shown}). Expected CounterFact "
        "('requested_rewrite', ...), flat CounterFact ('prompt', 'ground_truth', 'rephrase_prompt', ...) or zsRE "
        f"('src', 'loc', 'answers', ...); or pass schema= one of {SCHEMAS}."
    )


def _get(record: Mapping, path: str, where: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value or value[part] is None:
            raise InvalidDataError(f"{where}: field {path!r} is missing; every record of this schema needs it.")
        value = value[part]
    return value


def _text(record: Mapping, path: str, where: str) -> str:
    value = _get(record, path, where)
    if not isinstance(value, str) or not value.strip():
        raise InvalidDataError(f"{where}: field {path!r} must be a non-empty string, got {value!r}.")
    return value.strip() if not path.endswith("prompt") else value


def _prompts(record: Mapping, path: str, where: str) -> tuple[str, ...]:
    value = _get(record, path, where)
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise InvalidDataError(f"{where}: field {path!r} must be a non-empty list of prompts, got {value!r}.")
    for j, p in enumerate(items):
        if not isinstance(p, str) or not p.strip():
            raise InvalidDataError(f"{where}: field {path!r}[{j}] must be a non-empty string, got {p!r}.")
    return tuple(items)


def _request(raw: Mapping, where: str, field_hint: str) -> EditRequest:
    try:
        return to_request(raw)
    except KnowEditError as err:
        raise InvalidDataError(f"{where}: field {field_hint!r}: {err}") from None


def parse_record(record: Any, index: int = 0, schema: str | None = None, *, zsre_target: str = "answers") -> EvalRecord:
    """One raw record -> :class:`EvalRecord` (validated)."""
    schema = schema or detect_schema(record, index)
    if schema not in SCHEMAS:
        raise InvalidDataError(f"Unknown schema {schema!r}; pass one of {SCHEMAS}.")
    if not isinstance(record, Mapping):
        raise InvalidDataError(f"{record_label(index)}: expected a JSON object, got {type(record).__name__}.")
    case_id = record.get("case_id")
    where = record_label(index, case_id)
    if schema == "counterfact":
        subject = _text(record, "requested_rewrite.subject", where)
        template = _text(record, "requested_rewrite.prompt", where)
        new = _text(record, "requested_rewrite.target_new.str", where)
        true = _text(record, "requested_rewrite.target_true.str", where)
        if "{}" not in template:
            raise InvalidDataError(
                f"{where}: field 'requested_rewrite.prompt' has no '{{}}' for the subject: {template!r}."
            )
        gen = record.get("generation_prompts") or ()
        req = _request(
            {"prompt": template, "subject": subject, "target_new": new, "target_true": true, "case_id": case_id},
            where,
            "requested_rewrite",
        )
        return EvalRecord(
            req,
            schema,
            new,
            true,
            (req.text,),
            _prompts(record, "paraphrase_prompts", where),
            _prompts(record, "neighborhood_prompts", where),
            true,
            _prompts(record, "generation_prompts", where) if gen else (),
            index,
            case_id,
            record["requested_rewrite"].get("relation_id"),
        )
    if schema == "counterfact_flat":
        subject, prompt = _text(record, "subject", where), _text(record, "prompt", where)
        new, true = _text(record, "target_new", where), _text(record, "ground_truth", where)
        loc_true = _text(record, "locality_ground_truth", where)
        req = _request(
            {"prompt": prompt, "subject": subject, "target_new": new, "target_true": true, "case_id": case_id},
            where,
            "prompt",
        )
        return EvalRecord(
            req,
            schema,
            new,
            true,
            (prompt,),
            _prompts(record, "rephrase_prompt", where),
            _prompts(record, "locality_prompt", where),
            loc_true,
            (),
            index,
            case_id,
        )
    # zsRE
    subject, src = _text(record, "subject", where), _text(record, "src", where)
    if zsre_target == "answers":
        answers = _get(record, "answers", where)
        if not isinstance(answers, (list, tuple)) or not answers:
            raise InvalidDataError(f"{where}: field 'answers' must be a non-empty list, got {answers!r}.")
        new = _text({"answers": answers[0]}, "answers", where)
    elif zsre_target == "alt":
        new = _text(record, "alt", where)
    else:
        raise InvalidDataError(f"zsre_target must be 'answers' (MEMIT) or 'alt' (EasyEdit), got {zsre_target!r}.")
    loc = _text(record, "loc", where)
    loc_ans = _text(record, "loc_ans", where)
    req = _request({"prompt": src, "subject": subject, "target_new": new, "case_id": case_id}, where, "src")
    return EvalRecord(
        req, schema, new, None, (src,), _prompts(record, "rephrase", where), (loc + "?",), loc_ans, (), index, case_id
    )


#: where benchmark data is looked for when neither ``data=`` nor ``$HF_KNOWEDIT_DATA`` names a folder
#: (relative to the working directory: the layout of a checkout with the benchmark files beside it)
DEFAULT_DATA_DIR = Path("..") / "shared" / "data"


def data_dir(data: str | os.PathLike | None = None) -> Path:
    """``data``, else ``$HF_KNOWEDIT_DATA``, else ``../shared/data`` when that folder exists.

    Raises :class:`InvalidDataError` when none of them names a folder."""
    if data is None:
        data = os.environ.get("HF_KNOWEDIT_DATA")
    if not data:
        if DEFAULT_DATA_DIR.is_dir():
            return DEFAULT_DATA_DIR
        raise InvalidDataError(
            "No benchmark data folder: pass data=... (or --data), set HF_KNOWEDIT_DATA, or put the files in "
            f"{DEFAULT_DATA_DIR}."
        )
    return Path(data)


def find_data_file(path: str | os.PathLike) -> Path:
    """``path`` itself when it exists; a bare file name (no folder part) that does not exist here is
    looked up in :func:`data_dir`. Returns ``path`` unchanged when it is found nowhere, so the caller
    reports it as missing."""
    p = Path(path).expanduser()
    if p.exists() or p.name != str(path):
        return p
    try:
        candidate = data_dir() / p.name
    except InvalidDataError:
        return p
    return candidate if candidate.exists() else p


def readable_prompt(prompt: str, subject: str) -> str:
    """``prompt`` from the start of the sentence that names ``subject``, for display.

    CounterFact's paraphrase prompts begin with unrelated generated text (``"References\n\nCategory:…
    Cologne is a twin city of"``); scoring uses them whole, as the paper does, and only what is shown is
    cut. The sentence starts after the last ``". "``, ``"? "``, ``"! "`` or newline before the subject's
    first mention, or at the subject itself where what lies between is a wiki category line
    (``"Category:…"``); a prompt without the subject is returned stripped."""
    at = prompt.find(subject)
    if at < 0:
        return prompt.strip()
    head = prompt[:at]
    start = max([head.rfind(mark) + len(mark) for mark in (". ", "? ", "! ", "\n") if mark in head] + [0])
    if "Category:" in prompt[start:at]:
        start = at
    return prompt[start:].strip()


def load_records(
    source: str | os.PathLike | Iterable[Any],
    schema: str | None = None,
    *,
    limit: int | None = None,
    zsre_target: str = "answers",
) -> list[EvalRecord]:
    """Read and validate benchmark records.

    Args:
        source: a JSON file (a list of records), a list of raw records, or a list of :class:`EvalRecord`.
        schema: one of :data:`SCHEMAS`, or ``None`` to detect it from the first record.
        limit: keep only the first ``limit`` records.

    >>> recs = load_records("counterfact_500.json", limit=100)
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise InvalidDataError(f"{path} does not exist; pass a JSON file of benchmark records.")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if not isinstance(raw, list):
            raise InvalidDataError(f"{path} must hold a JSON list of records, got {type(raw).__name__}.")
    else:
        raw = list(source)
    if limit is not None:
        raw = raw[:limit]
    if not raw:
        raise InvalidDataError("No records given.")
    if all(isinstance(r, EvalRecord) for r in raw):
        return list(raw)
    schema = schema or detect_schema(raw[0], 0)
    return [parse_record(r, i, schema, zsre_target=zsre_target) for i, r in enumerate(raw)]


def first_per_fact(records: Sequence[EvalRecord]) -> tuple[list[EvalRecord], list[EvalRecord]]:
    """Each fact's first record, and the later records that repeat a fact (same subject and relation, e.g.
    another new object), both in order: a stream or one batch can only take the first."""
    kept: list[EvalRecord] = []
    repeats: list[EvalRecord] = []
    seen: set = set()
    for r in records:
        (repeats if r.request.relation_key in seen else kept).append(r)
        seen.add(r.request.relation_key)
    return kept, repeats


def check_distinct(records: Sequence[EvalRecord]) -> None:
    """Refuse two records that rewrite the same subject and relation (they cannot be one batch)."""
    kept, repeats = first_per_fact(records)
    if repeats:
        r = repeats[0]
        first = next(k for k in kept if k.request.relation_key == r.request.relation_key)
        raise InvalidDataError(
            f"{r.where}: fields 'subject' and 'prompt' repeat the fact of {first.where} "
            f"({r.request.text!r}); batch protocols need one record per fact: drop one of them."
        )
