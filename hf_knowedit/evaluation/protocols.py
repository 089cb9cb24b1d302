"""Editing protocols: when edits are applied, when the model is scored, what is reverted.

* ``"single"`` (ROME's CounterFact protocol): for each record, edit, score that record, revert, next.
* ``"batch"`` (MEMIT's): edit all records in one call, score all, revert.
* ``"sequential"`` (AlphaEdit's): edit in consecutive batches of ``batch_size`` without reverting;
  score all records after the last batch, and, every ``curve_every`` batches, the records edited so far
  (the curve of metrics against the number of edits).

Every protocol first scores the unedited model on all records ("pre"), so each result holds pre-edit
and post-edit numbers side by side. Edits go through :func:`hf_knowedit.editing.apply_edits` under
names starting with ``"eval-"`` and are reverted with :func:`hf_knowedit.stack.revert_edits` (bit-exact).
Like ``revert_edits``, the evaluation leaves method history (``model._hf_knowedit.history``: caches such as
context templates, and state such as AlphaEdit's accumulated keys) to the methods: reset it yourself
(e.g. ``hf_knowedit.alphaedit.reset_history(model)``) where edits must start from a clean history.

An edit that raises a :class:`~hf_knowedit.errors.KnowEditError` (singular system, non-finite update, ...)
counts as a failed edit: the model is unchanged, so its records are scored as they are (an edit that
changed nothing gets the unedited model's numbers, never success by default), and the error is listed in
``EvalResult.failed``. Pass ``on_error="raise"`` to stop instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub.utils import tqdm
from torch import nn

from ..editing import apply_edits, get_method
from ..errors import InvalidConfigError, InvalidDataError, KnowEditError
from ..generation import generate_texts
from ..stack import revert_edits
from . import chat as C
from . import generative as G
from . import metrics as M
from .datasets import PROMPT_FIELDS, TARGET_FIELDS, EvalRecord, check_distinct
from .scoring import Encoded, TargetScore, score_encoded, split_prompt_target

logger = logging.getLogger(__name__)

PROTOCOLS = ("single", "batch", "sequential")
GROUPS = ("rewrite", "paraphrase", "neighborhood")


@dataclass
class EncodedRecord:
    """A record's scoring pairs, tokenized once. ``slots[group]`` lists, per prompt, the indices in
    ``pairs`` of (target_new, the target that should keep winning) — ``None`` where a schema has none."""

    record: EvalRecord
    pairs: list[Encoded]
    slots: dict[str, list[tuple[int | None, int | None]]]


RecordScores = dict[str, list[tuple[TargetScore | None, TargetScore | None]]]


def encode_record(tokenizer: Any, rec: EvalRecord) -> EncodedRecord:
    """Tokenize every (prompt, target) pair of ``rec``; typed errors name the record and field."""
    pairs: list[Encoded] = []

    def add(prompt: str, target: str | None, group: str, which: str, j: int) -> int | None:
        if target is None:
            return None
        try:
            pairs.append(split_prompt_target(tokenizer, prompt, target))
        except KnowEditError as err:
            field = TARGET_FIELDS[rec.schema][which]
            raise InvalidDataError(
                f"{rec.where}: field {field!r} ({target!r}) cannot be scored after "
                f"{PROMPT_FIELDS[rec.schema][group]}[{j}]: {err}"
            ) from None
        if not pairs[-1][0]:
            raise InvalidDataError(
                f"{rec.where}: field {PROMPT_FIELDS[rec.schema][group]!r}[{j}] gives no "
                f"prompt tokens before the target; use a non-empty prompt."
            )
        return len(pairs) - 1

    slots: dict[str, list[tuple[int | None, int | None]]] = {}
    for group, prompts in (("rewrite", rec.rewrite_prompts), ("paraphrase", rec.paraphrase_prompts)):
        slots[group] = [
            (add(p, rec.target_new, group, "target_new", j), add(p, rec.target_true, group, "target_true", j))
            for j, p in enumerate(prompts)
        ]
    slots["neighborhood"] = [
        (
            add(p, rec.target_new if rec.target_true is not None else None, "neighborhood", "target_new", j),
            add(p, rec.neighborhood_target, "neighborhood", "neighborhood_target", j),
        )
        for j, p in enumerate(rec.neighborhood_prompts)
    ]
    return EncodedRecord(rec, pairs, slots)


def score_records(
    model: nn.Module, tokenizer: Any, encoded: Sequence[EncodedRecord], *, batch_size: int = 32
) -> list[RecordScores]:
    """Score all pairs of all records in shared batches; regroup per record."""
    flat = [p for e in encoded for p in e.pairs]
    scores = score_encoded(model, flat, tokenizer=tokenizer, batch_size=batch_size)
    out, k = [], 0
    for e in encoded:
        mine = scores[k : k + len(e.pairs)]
        k += len(e.pairs)
        out.append(
            {
                g: [(None if a is None else mine[a], None if b is None else mine[b]) for a, b in e.slots[g]]
                for g in GROUPS
            }
        )
    return out


def case_metrics(rec: EvalRecord, post: RecordScores, pre: RecordScores, ge: float | None = None) -> dict[str, float]:
    """All per-record metrics (fractions; GE as is) of one family set: ROME's (CounterFact) or MEMIT's zsRE,
    plus the teacher-forced token-accuracy family."""
    new = {g: [n for n, _ in post[g]] for g in GROUPS}
    keep = {g: [k for _, k in post[g]] for g in GROUPS}
    out: dict[str, float] = {}
    if rec.target_true is not None:
        out.update(M.counterfact_case(post["rewrite"], post["paraphrase"], post["neighborhood"]))
    else:
        out.update(M.zsre_case(new["rewrite"], new["paraphrase"], keep["neighborhood"]))
    out.update(
        M.token_accuracy_case(
            new["rewrite"], new["paraphrase"], keep["neighborhood"], [k for _, k in pre["neighborhood"]]
        )
    )
    if ge is not None:
        out["GE"] = ge
    return out


@dataclass
class Scorer:
    """Scores records on the model as it is now (see :func:`score_records`), plus fluency, the generation
    metrics (:mod:`.generative`) and the chat metrics (:mod:`.chat`), each generated for many records in one
    batched call. With ``chat``, every record's questions are built (and checked) when the scorer is made."""

    model: nn.Module
    tokenizer: Any
    encoded: list[EncodedRecord]
    batch_size: int = 32
    fluency: bool = True
    seed: int | None = 0
    max_new_tokens: int = 90
    generation: bool = False
    gen_max_new_tokens: int = 20
    prefix_tokens: int = 50
    gen_batch_size: int = 64
    chat: bool = False
    chat_max_new_tokens: int = 32
    chat_known: Sequence[C.KnownFact] = ()
    chat_keep_n: int = 2
    chat_probes: list[dict[str, list[C.Probe]]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.chat:
            self.chat_probes = [C.record_probes(e.record, self.chat_known, self.chat_keep_n) for e in self.encoded]

    def scores(self, idx: Sequence[int]) -> list[RecordScores]:
        return score_records(self.model, self.tokenizer, [self.encoded[i] for i in idx], batch_size=self.batch_size)

    def ge(self, i: int) -> float | None:
        return self.ge_many([i])[0]

    def ge_many(self, idx: Sequence[int]) -> list[float | None]:
        """GE of each record; every generation prompt samples with its own seed (``seed + record index``, and
        the prompt's position), so a record's number does not depend on the records batched with it."""
        recs = [self.encoded[i].record for i in idx]
        if not self.fluency:
            return [None] * len(recs)
        prompts = [p for r in recs for p in r.generation_prompts]
        seeds = None
        if self.seed is not None:
            seeds = [(self.seed + r.index) * 1000 + j for r in recs for j in range(len(r.generation_prompts))]
        texts = generate_texts(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=self.max_new_tokens,
            seed=None,
            row_seeds=seeds,
            batch_size=self.gen_batch_size,
        )
        out: list[float | None] = []
        for r in recs:
            mine, texts = texts[: len(r.generation_prompts)], texts[len(r.generation_prompts) :]
            out.append(M.ngram_entropy(mine) if mine else None)
        return out

    def gen_prompts(self, rec: EvalRecord) -> dict[str, list[str]]:
        """The prompts each generation metric continues, per group (see :mod:`.generative`)."""
        neg = G.negate(rec.rewrite_prompts[0], rec.request.subject)
        prefix = G.random_prefix(self.tokenizer, (self.seed or 0) + rec.index, self.prefix_tokens)
        return {
            "rewrite": list(rec.rewrite_prompts),
            "paraphrase": list(rec.paraphrase_prompts),
            "neighborhood": list(rec.neighborhood_prompts),
            "prefixed": [prefix + p for p in rec.rewrite_prompts] if self.prefix_tokens else [],
            "negated": [] if neg is None else [neg],
        }

    def gen(self, idx: Sequence[int]) -> list[dict[str, float] | None]:
        """Generation metrics of each record (fractions), all prompts of all records greedily in one call."""
        if not self.generation:
            return [None] * len(idx)
        recs = [self.encoded[i].record for i in idx]
        groups = [self.gen_prompts(r) for r in recs]
        prompts = [p for g in groups for ps in g.values() for p in ps]
        texts = generate_texts(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=self.gen_max_new_tokens,
            seed=None,
            batch_size=self.gen_batch_size,
        )
        cuts = iter(G.cut_at_boundary(t[len(p) :]) for p, t in zip(prompts, texts))
        out: list[dict[str, float] | None] = []
        for r, g in zip(recs, groups):
            c = {k: [next(cuts) for _ in ps] for k, ps in g.items()}
            out.append(
                G.generation_case(
                    c["rewrite"],
                    c["paraphrase"],
                    c["neighborhood"],
                    c["prefixed"],
                    c["negated"],
                    r.target_new,
                    r.neighborhood_target,
                )
            )
        return out

    def chat_metrics(self, idx: Sequence[int]) -> list[dict[str, float] | None]:
        """Chat metrics of each record (fractions): every question of every record answered greedily in one
        call, through the chat template where the tokenizer has one (:mod:`.chat`)."""
        if not self.chat:
            return [None] * len(idx)
        probes = [self.chat_probes[i] for i in idx]
        questions = [p.question for g in probes for group in C.GROUPS for p in g[group]]
        answers = iter(
            C.ask(self.model, self.tokenizer, questions, max_new_tokens=self.chat_max_new_tokens,
                  batch_size=self.gen_batch_size)
        )  # fmt: skip
        return [
            C.chat_case(
                g, {group: [next(answers) for _ in g[group]] for group in C.GROUPS}, self.encoded[i].record.target_new
            )
            for i, g in zip(idx, probes)
        ]

    def cases(
        self, idx: Sequence[int], pre: Sequence[RecordScores] | None = None, now: Sequence[RecordScores] | None = None
    ) -> list[dict[str, float]]:
        """All per-record metrics of records ``idx`` on the model as it is now; ``pre`` holds the unedited
        scores of all records (``None``: the model is the unedited one); ``now``: scores already computed."""
        now = self.scores(idx) if now is None else now
        ges, gens, chats = self.ge_many(idx), self.gen(idx), self.chat_metrics(idx)
        out = []
        for k, i in enumerate(idx):
            case = case_metrics(self.encoded[i].record, now[k], now[k] if pre is None else pre[i], ges[k])
            out.append({**case, **(gens[k] or {}), **(chats[k] or {})})
        return out


def run_protocol(
    model: nn.Module,
    tokenizer: Any,
    scorer: Scorer,
    *,
    method: str | None,
    protocol: str,
    batch_size: int = 1,
    curve_every: int | None = None,
    on_error: str = "record",
    edit_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run one protocol; returns the pieces of an :class:`~hf_knowedit.evaluation.results.EvalResult`."""
    if protocol not in PROTOCOLS:
        raise InvalidConfigError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}.")
    if on_error not in ("record", "raise"):
        raise InvalidConfigError(f"on_error must be 'record' or 'raise', got {on_error!r}.")
    if method is not None:
        get_method(method)  # unknown names fail before any work
    if protocol == "sequential" and (not isinstance(batch_size, int) or batch_size < 1):
        raise InvalidConfigError(f"batch_size must be a positive int for the sequential protocol, got {batch_size!r}.")
    if curve_every is not None and (not isinstance(curve_every, int) or curve_every < 1):
        raise InvalidConfigError(f"curve_every must be None or a positive int, got {curve_every!r}.")
    records = [e.record for e in scorer.encoded]
    if method is not None and protocol != "single":
        check_distinct(records)
    edit_kwargs = dict(edit_kwargs or {})
    n = len(records)
    timing = {"pre_s": 0.0, "edit_s": 0.0, "post_s": 0.0}

    t0 = time.perf_counter()
    pre = scorer.scores(range(n))
    pre_cases = scorer.cases(range(n), now=pre)
    timing["pre_s"] = time.perf_counter() - t0
    out: dict[str, Any] = {"pre_cases": pre_cases, "post_cases": None, "curve": [], "failed": [], "timing": timing}
    if method is None:
        return out

    applied: list[str] = []

    def edit(idx: Sequence[int], name: str) -> bool:
        t = time.perf_counter()
        try:
            es = apply_edits(
                model, tokenizer, [records[i].request for i in idx], method=method, name=name, **edit_kwargs
            )
            applied.append(es.name)
            return True
        except KnowEditError as err:
            if on_error == "raise":
                raise
            where = ", ".join(records[i].where for i in idx[:3]) + (" ..." if len(idx) > 3 else "")
            logger.warning("Edit of %s failed (%s: %s); counted as failed.", where, type(err).__name__, err)
            out["failed"].append(
                {
                    "records": list(idx),
                    "case_ids": [records[i].case_id for i in idx],
                    "error": f"{type(err).__name__}: {err}",
                }
            )
            return False
        finally:
            timing["edit_s"] += time.perf_counter() - t

    def score(idx: Sequence[int]) -> list[dict[str, float]]:
        t = time.perf_counter()
        cases = scorer.cases(list(idx), pre)
        timing["post_s"] += time.perf_counter() - t
        return cases

    def revert_all() -> None:
        for name in reversed(applied):
            revert_edits(model, name)
        applied.clear()

    try:
        if protocol == "single":
            post_cases = []
            for i in tqdm(range(n), desc="single edits", disable=not progress):
                if edit([i], f"eval-single-{i}"):
                    post_cases.extend(score([i]))
                    revert_all()
                else:
                    post_cases.append(pre_cases[i])
            out["post_cases"] = post_cases
        elif protocol == "batch":
            edit(list(range(n)), "eval-batch")
            out["post_cases"] = score(range(n))
        else:
            chunks = [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]
            done: list[int] = []
            for step, chunk in enumerate(tqdm(chunks, desc="sequential batches", disable=not progress), 1):
                edit(chunk, f"eval-seq-{step}")
                done += chunk
                last = step == len(chunks)
                if curve_every and (step % curve_every == 0 or last):
                    cases = score(done)
                    out["curve"].append({"n_edits": len(done), **M.aggregate(cases)})
                    if last:
                        out["post_cases"] = cases
            if out["post_cases"] is None:
                out["post_cases"] = score(range(n))
    finally:
        revert_all()
    return out
