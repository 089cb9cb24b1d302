"""``evaluate`` over several processes (``accelerate launch --num_processes N``): records sharded, results gathered.

Under the ``single`` protocol every record is edited and reverted on its own, so each process can
take every N-th record (``records[rank::N]``) and the gathered per-record numbers are those one
process would compute: the records keep their global ``index`` (which also seeds their fluency
samples), the aggregates are recomputed from all of them with the same
:func:`~hf_knowedit.evaluation.metrics.aggregate`. Every process returns the same result.

    # accelerate launch --num_processes 2 eval.py
    result = evaluate_sharded(model, tok, "counterfact_500.json", method="rome", fluency=False)

The ``sequential`` protocol's edits depend on all earlier ones, so it cannot be split this way.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import InvalidConfigError
from ..methods.statistics import process_group
from .datasets import load_records
from .metrics import aggregate
from .results import EvalResult

__all__ = ["evaluate_sharded", "merge_results"]


def merge_results(parts: list[EvalResult]) -> EvalResult:
    """One :class:`EvalResult` from the results of disjoint shards of the records (``single`` protocol)."""
    first = parts[0]
    records = sorted((r for p in parts for r in p.records), key=lambda r: r["index"])
    post = None if first.post is None else aggregate([r["post"] for r in records])
    return EvalResult(
        method=first.method,
        protocol=first.protocol,
        schema=first.schema,
        n_records=sum(p.n_records for p in parts),
        pre=aggregate([r["pre"] for r in records]),
        post=post,
        records=records,
        failed=[f for p in parts for f in p.failed],
        settings={**first.settings, "processes": len(parts)},
        timing={k: max(p.timing.get(k, 0.0) for p in parts) for k in first.timing},
    )


def evaluate_sharded(model: nn.Module, tokenizer: Any, records: Any, **kwargs: Any) -> EvalResult:
    """:func:`hf_knowedit.evaluate` with the records split across the launched processes and the results
    gathered (see the module docstring); one process: plain ``evaluate``. Keyword arguments are
    ``evaluate``'s; ``schema``, ``limit`` and ``zsre_target`` select the records as there."""
    import torch.distributed as dist

    from . import evaluate

    if kwargs.get("protocol", "single") != "single":
        raise InvalidConfigError(
            "evaluate_sharded splits records across processes, which only the 'single' protocol allows "
            "(each record edited and reverted on its own); run the sequential protocol in one process."
        )
    recs = load_records(
        records, kwargs.pop("schema", None), limit=kwargs.pop("limit", None),
        zsre_target=kwargs.pop("zsre_target", "answers"),
    )  # fmt: skip
    rank, world = process_group()
    if world == 1:
        return evaluate(model, tokenizer, recs, **kwargs)
    if len(recs) < world:
        raise InvalidConfigError(f"{len(recs)} records cannot be split over {world} processes; give at least {world}.")
    mine = evaluate(model, tokenizer, recs[rank::world], **kwargs)
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    return merge_results(parts)
