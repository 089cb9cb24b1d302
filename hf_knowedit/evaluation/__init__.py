"""Evaluation: the papers' knowledge-editing metrics in one call.

    >>> import hf_knowedit
    >>> records = hf_knowedit.load_records("counterfact_500.json", limit=100)
    >>> result = hf_knowedit.evaluate(model, tok, records)                        # unedited model
    >>> result = hf_knowedit.evaluate(model, tok, records, method="rome")         # ROME, one edit at a time
    >>> result = hf_knowedit.evaluate(model, tok, records, method="memit", protocol="batch")
    >>> result = hf_knowedit.evaluate(model, tok, records, method="alphaedit", protocol="sequential",
    ...                               batch_size=10, curve_every=1)
    >>> table = result.to_markdown(); result.to_dict(); result.plot()

Metrics (see :mod:`hf_knowedit.evaluation.metrics` for the exact definitions):

* CounterFact (full or flat schema), ROME's protocol: ``S, ES, EM, PS, PM, NS, NM`` and ``GE`` (fluency);
  probabilities of whole multi-token targets as mean NLL per token, as in ROME's reference code.
* zsRE, MEMIT's protocol: ``Score, Efficacy, Paraphrase, Specificity`` (token-level top-1 accuracy).
* Both datasets, generation (``generation=True``, :mod:`.generative`): greedy continuations with no
  teacher forcing, exact match / contains (``gen_ES, gen_PS, gen_NS, gen_ES_in, ...``), under a random
  50-token prefix (``gen_ES_prefix``) and negation (``gen_ES_neg``).
* Both datasets, questions (``chat=True``, :mod:`.chat`): the edit, its paraphrase and its neighbours asked
  as questions through the model's chat template (``Q: ... A:`` without one), greedy answers matched by
  written-down rules: ``chat_ES, chat_PS, chat_NS, chat_keep``.
* Both datasets, the *other* family: EasyEdit's teacher-forced ``rewrite_acc, rephrase_acc, locality``.

Modules: :mod:`.scoring` (batched, padding-side-exact target scoring), :mod:`.datasets` (loaders),
:mod:`.metrics`, :mod:`.protocols` (single / batch / sequential), :mod:`.results` (:class:`EvalResult`).
Lifelong streams (checkpoint rows, resumable): :mod:`.lifelong` (:func:`run_lifelong`; :func:`replay_stream` walks a
saved one).
The guide is ``docs/evaluation.md``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from torch import nn

from ..errors import InvalidConfigError
from ..generation import generate_texts
from . import chat as chat_forms
from . import generative, metrics
from .datasets import SCHEMAS, EvalRecord, load_records
from .lifelong import LifelongResult, plot_lifelong, replay_stream, run_lifelong
from .metrics import aggregate
from .protocols import PROTOCOLS, Scorer, encode_record, run_protocol
from .results import EvalResult
from .scoring import TargetScore, score_targets


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    records: str | Iterable[Any],
    *,
    method: str | None = None,
    protocol: str = "single",
    schema: str | None = None,
    limit: int | None = None,
    batch_size: int = 10,
    curve_every: int | None = None,
    fluency: bool = True,
    generation: bool = False,
    gen_max_new_tokens: int = 20,
    prefix_tokens: int = 50,
    chat: bool = False,
    chat_max_new_tokens: int = 32,
    chat_known: Any = "known_1000.json",
    chat_keep_n: int = 2,
    seed: int | None = 0,
    max_new_tokens: int = 90,
    score_batch_size: int = 32,
    on_error: str = "record",
    zsre_target: str = "answers",
    progress: bool = True,
    **edit_kwargs: Any,
) -> EvalResult:
    """Score ``model`` on benchmark records, before and (with ``method``) after editing.

    Args:
        records: a JSON file, a list of raw CounterFact / flat CounterFact / zsRE records, or
            :class:`EvalRecord` objects (:func:`load_records`).
        method: ``None`` (score the model as it is), or a registered editing method (``"rome"``, ``"memit"``, ...).
        protocol: ``"single"`` (edit, score, revert, next), ``"batch"`` (edit all, score all) or
            ``"sequential"`` (consecutive batches of ``batch_size`` edits, scored after the last one).
        schema: ``"counterfact"``, ``"counterfact_flat"`` or ``"zsre"``; ``None`` detects it.
        limit: use only the first ``limit`` records.
        batch_size: edits per batch in the sequential protocol.
        curve_every: sequential protocol: also score the records edited so far every this many batches.
        fluency: compute ``GE`` from ``generation_prompts`` (CounterFact full schema; ~10 generations per record).
        generation: also compute the generation metrics (:mod:`.generative`: greedy continuations cut at a
            natural boundary, exact match / contains, under a random prefix and negation), family
            "generation (WILD)".
        gen_max_new_tokens: tokens generated per prompt for the generation metrics (fixed, never the target's length).
        prefix_tokens: length of the random context prefix of ``gen_ES_prefix`` (0: no prefix metric).
        chat: also compute the chat metrics (:mod:`.chat`: ``chat_ES, chat_PS, chat_NS, chat_keep``), family
            "chat (questions)"; CounterFact (full schema, by ``relation_id``) and zsRE records.
        chat_max_new_tokens: most tokens of one answer (it stops earlier at the end of the turn).
        chat_known: the unrelated known questions of ``chat_keep``: ``known_1000.json`` (a path, or a bare
            name looked up in the benchmark data folder) or its list of facts; ``None`` leaves ``chat_keep`` out.
        chat_keep_n: known questions per record.
        seed: seed of the top-5 sampling used for ``GE`` (per record ``seed + index``); ``None`` = greedy.
        max_new_tokens: tokens generated per generation prompt.
        score_batch_size: sequences per forward pass when scoring.
        on_error: ``"record"`` (a failed edit counts as failed, see :mod:`.protocols`) or ``"raise"``.
        zsre_target: ``"answers"`` (MEMIT: edit to ``answers[0]``) or ``"alt"`` (EasyEdit).
        **edit_kwargs: passed to :func:`hf_knowedit.apply_edits` (``config=``, ``layers=``, method options).

    Returns an :class:`EvalResult`; the model is left as it was (edits reverted; method history is left
    to the methods, see :mod:`.protocols`).
    Bad records raise :class:`~hf_knowedit.errors.InvalidDataError` naming the record and field, before
    anything is edited.
    """
    if protocol not in PROTOCOLS:
        raise InvalidConfigError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}.")
    start = time.perf_counter()
    recs = load_records(records, schema, limit=limit, zsre_target=zsre_target)
    known = chat_forms.load_known_facts(chat_known) if chat and chat_known is not None and chat_keep_n else []
    encoded = [encode_record(tokenizer, r) for r in recs]
    scorer = Scorer(
        model,
        tokenizer,
        encoded,
        batch_size=score_batch_size,
        fluency=fluency,
        seed=seed,
        max_new_tokens=max_new_tokens,
        generation=generation,
        gen_max_new_tokens=gen_max_new_tokens,
        prefix_tokens=prefix_tokens,
        chat=chat,
        chat_max_new_tokens=chat_max_new_tokens,
        chat_known=known,
        chat_keep_n=chat_keep_n,
    )
    parts = run_protocol(
        model,
        tokenizer,
        scorer,
        method=method,
        protocol=protocol,
        batch_size=batch_size,
        curve_every=curve_every,
        on_error=on_error,
        edit_kwargs=edit_kwargs,
        progress=progress,
    )
    post_cases = parts["post_cases"]
    per_record = [
        {
            "index": r.index,
            "case_id": r.case_id,
            "pre": parts["pre_cases"][i],
            "post": None if post_cases is None else post_cases[i],
        }
        for i, r in enumerate(recs)
    ]
    timing = dict(parts["timing"], total_s=time.perf_counter() - start)
    settings = {
        "seed": seed,
        "fluency": fluency,
        "generation": generation,
        "gen_max_new_tokens": gen_max_new_tokens,
        "prefix_tokens": prefix_tokens,
        "chat": chat,
        "max_new_tokens": max_new_tokens,
        "score_batch_size": score_batch_size,
        "padding_side": getattr(tokenizer, "padding_side", None),
        "edit_kwargs": {k: repr(v) for k, v in edit_kwargs.items()},
    }
    if chat:
        settings.update(
            chat_form="chat template" if chat_forms.has_chat_template(tokenizer) else "Q: ... A:",
            chat_max_new_tokens=chat_max_new_tokens,
            chat_known=chat_known if chat_known is None or isinstance(chat_known, str) else repr(type(chat_known)),
            chat_keep_n=chat_keep_n if known else 0,
        )
    if protocol == "sequential":
        settings.update(batch_size=batch_size, curve_every=curve_every)
    return EvalResult(
        method=method,
        protocol=protocol,
        schema=recs[0].schema,
        n_records=len(recs),
        pre=aggregate(parts["pre_cases"]),
        post=None if post_cases is None else aggregate(post_cases),
        curve=parts["curve"],
        records=per_record,
        failed=parts["failed"],
        settings=settings,
        timing=timing,
    )


__all__ = [
    "EvalRecord",
    "EvalResult",
    "LifelongResult",
    "PROTOCOLS",
    "SCHEMAS",
    "TargetScore",
    "aggregate",
    "evaluate",
    "generate_texts",
    "generative",
    "load_records",
    "metrics",
    "plot_lifelong",
    "replay_stream",
    "run_lifelong",
    "score_targets",
]
