"""The public tracing functions: :func:`trace_fact` (one fact), :func:`trace_facts` (the average
indirect effect over many) and :func:`suggest_layers` (where to edit)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from huggingface_hub.utils import tqdm
from torch import nn

from ..architectures import model_device, num_layers
from ..errors import InvalidRequestError, KnowEditError, TraceError
from ..hooks import frozen
from ..stack import get_state, locked
from ..tokens import encode, split_prompt_target, subject_token_span
from .config import TraceConfig, check_kinds, check_positive_int
from .corruption import embedding_noise_level
from .engine import CausalTracer
from .results import TraceResult, TraceSummary

_SUMMARY_KEY = "tracing.summary"


@locked
def trace_fact(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    subject: str,
    *,
    target: str | None = None,
    positions: Iterable[int] | None = None,
    config: TraceConfig | None = None,
    **options: Any,
) -> TraceResult:
    """Causal trace of one fact (ROME, Meng et al. 2022): which hidden states, MLP and attention outputs
    carry it. See the module docstring for the protocol and what is computed.

    Args:
        prompt: the filled prompt, e.g. ``"The Eiffel Tower is located in"``.
        subject: the entity in ``prompt`` whose tokens are corrupted (first occurrence).
        target: trace ``p(target)`` instead of the clean top next token (multi-token: teacher forced).
        positions: token indices to trace (default all); other rows of ``scores`` are NaN.
            In hybrid stacks an ``"attn"`` cell restores the attention outputs of the blocks of its window
            that have attention; a cell whose window has none is NaN.
        config: a :class:`~hf_knowedit.tracing.TraceConfig`; ``**options`` set its fields by keyword
            (``kinds``, ``samples``, ``noise``, ``window``, ``corruption``, ``seed``, ``rng``, ``subjects``,
            ``memory_mb``, ``reuse_lower_layers``, ``progress``). ``subjects`` sets the entities whose
            embedding spread gives ``noise="auto"`` (pass the traced facts' subjects, as the paper does);
            ``rng="reference"`` draws the reference's exact noise (:class:`TraceConfig`).

    Raises:
        SubjectNotFoundError: the subject is not in the prompt.
        TraceError: ``samples < 1``, ``window < 1``, unknown kind, a target that tokenizes to nothing, ...
    """
    cfg = TraceConfig.of(config, **options)
    kinds = cfg.kinds
    tracer = CausalTracer(model, tokenizer, prompt, subject, target=target, config=cfg)
    T, L = tracer.n_tokens, tracer.n_layers
    if positions is None:
        rows = list(range(T))
    else:
        rows = sorted({int(t) for t in positions})
        if not rows or rows[0] < -T or rows[-1] >= T:
            raise TraceError(f"positions must be token indices in [0, {T}), got {positions!r}.")
        rows = sorted({t % T for t in rows})
    s0 = tracer.subject_range[0]
    scores = {k: torch.full((T, L), float("nan")) for k in kinds}
    jobs, where = [], []
    for kind in kinds:
        windows = {l: [l] if kind == "hidden" else cfg.window_layers(l, L) for l in range(L)}
        if kind == "attn":  # a hybrid stack's window without attention restores nothing: its cells stay NaN
            windows = {l: [j for j in w if j in tracer.attention_layers] for l, w in windows.items()}
            windows = {l: w for l, w in windows.items() if w}
        for t in rows:
            for l, layers in windows.items():
                if t < s0:  # before the corruption: clean == corrupted there, restoring is a no-op
                    scores[kind][t, l] = tracer.corrupted_prob
                else:
                    jobs.append([(kind, j, t) for j in layers])
                    where.append((kind, t, l))
    if jobs:
        for (kind, t, l), p in zip(where, tracer.score(jobs).tolist()):
            scores[kind][t, l] = p
    settings = cfg.settings(noise=tracer.noise, target=target, **tracer.corruption.settings())
    return TraceResult(
        scores=scores,
        clean_prob=tracer.clean_prob,
        corrupted_prob=tracer.corrupted_prob,
        tokens=[tokenizer.decode([i]) for i in tracer.input_ids],
        input_ids=list(tracer.input_ids),
        subject_range=tuple(tracer.subject_range),
        answer=tokenizer.decode(tracer.answer_ids),
        answer_ids=list(tracer.answer_ids),
        prompt=prompt,
        subject=subject,
        settings=settings,
    )


# -----------------------------------------------------------------------------
# many facts


def _fact_fields(fact: Any) -> tuple[str, str, str | None]:
    if isinstance(fact, Mapping):
        prompt = fact.get("prompt")
        if prompt is None and "template" in fact and "subject" in fact:
            prompt = fact["template"].replace("{}", fact["subject"])
        subject, attribute = fact.get("subject"), fact.get("attribute")
    elif isinstance(fact, (tuple, list)) and len(fact) in (2, 3):
        prompt, subject, attribute = (tuple(fact) + (None,))[:3]
    else:
        prompt = subject = attribute = None
    if not isinstance(prompt, str) or not isinstance(subject, str):
        raise TraceError(
            f"A fact needs 'prompt' and 'subject' strings (known_1000.json records work, or "
            f"(prompt, subject[, attribute]) tuples); got {fact!r}."
        )
    return prompt, subject, attribute


def _knows(model: nn.Module, tokenizer: Any, prompt: str, attribute: str, rule: bool | str) -> bool:
    """Whether the model predicts ``attribute`` after ``prompt`` (see :func:`trace_facts`' ``require_correct``)."""
    device = model_device(model)
    if rule == "reference":
        ids = list(encode(tokenizer, prompt)["input_ids"])
    else:
        try:
            prompt_ids, want = split_prompt_target(tokenizer, prompt, attribute)
        except InvalidRequestError:
            return False
        ids = prompt_ids + want[:-1]
    with torch.no_grad(), frozen(model, params=False):
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0]
    if rule == "reference":
        return tokenizer.decode([int(logits[-1].argmax())]).strip() == attribute
    greedy = logits[len(prompt_ids) - 1 :].argmax(-1).tolist()  # the argmax after each prefix of the attribute
    return greedy == want


@locked
def trace_facts(
    model: nn.Module,
    tokenizer: Any,
    facts: Sequence[Any],
    *,
    require_correct: bool = True,
    keep_results: bool = False,
    config: TraceConfig | None = None,
    **options: Any,
) -> TraceSummary:
    """Trace many facts and average the indirect effects at the last subject token and the last token.

    ``facts``: ``known_1000.json`` records (``prompt``, ``subject``, ``attribute``) or ``(prompt, subject[,
    attribute])`` tuples. Facts the model does not know are skipped (facts without an attribute are
    always traced):

    * ``require_correct=True`` (default): the model's greedy continuation of the prompt must be the whole
      attribute, token for token (``attribute`` tokenized after the prompt; checked in one teacher-forced
      pass: every next-token argmax along the attribute is the attribute's token). A fact whose first
      token is right but a later one is not is skipped.
    * ``require_correct="reference"``: the reference's exact test (``experiments/causal_trace.py``
      ``calculate_hidden_flow(expect=attribute)``): the top-1 next token, decoded and stripped, must equal
      the attribute string, so an attribute of more than one token is always skipped.
    * ``require_correct=False``: every fact is traced.

    Only the two positions of Figure 2 are traced. ``subjects`` defaults to the facts' own subjects for the
    noise level, as in the paper. The summary is also kept on the model so that ``suggest_layers(model)``
    can reuse it.
    """
    if not (isinstance(require_correct, bool) or require_correct == "reference"):
        raise TraceError(f"require_correct must be True, False or 'reference', got {require_correct!r}.")
    cfg = TraceConfig.of(config, **options)
    kinds = cfg.kinds
    parsed = [_fact_fields(f) for f in facts]
    if not parsed:
        raise TraceError("facts is empty: pass e.g. the records of known_1000.json.")
    reference = cfg.rng == "reference"
    if cfg.subjects is None:  # the reference counts a subject once per fact (collect_embedding_std)
        subjects = [s for _, s, _ in parsed]
        cfg = TraceConfig.of(cfg, subjects=subjects if reference else list(dict.fromkeys(subjects)))
    if cfg.corruption == "gaussian" and cfg.noise == "auto":  # measured once for all facts
        cfg = TraceConfig.of(cfg, noise=embedding_noise_level(model, tokenizer, cfg.subjects, reference=reference))
    sums = {p: {k: torch.zeros(num_layers(model)) for k in kinds} for p in ("last_subject", "last")}
    results, skipped, clean, corrupted = [], 0, [], []
    for prompt, subject, attribute in tqdm(parsed, desc="tracing facts", disable=cfg.progress is False):
        known = attribute is None or not require_correct or _knows(model, tokenizer, prompt, attribute, require_correct)
        if not known:
            skipped += 1
            continue
        try:
            span_end = subject_token_span(tokenizer, prompt, subject)[1]
        except KnowEditError:
            skipped += 1
            continue
        r = trace_fact(model, tokenizer, prompt, subject, positions=[span_end - 1, -1], config=cfg, progress=False)
        for k in kinds:
            sums["last_subject"][k] += r.indirect_effect(k)[r.last_subject_token]
            sums["last"][k] += r.indirect_effect(k)[-1]
        clean.append(r.clean_prob)
        corrupted.append(r.corrupted_prob)
        if keep_results:
            results.append(r)
    n = len(clean)
    if n == 0:
        raise TraceError(
            f"None of the {len(parsed)} facts could be traced (all skipped: the model does not predict "
            "their attribute); pass require_correct=False or facts the model knows."
        )
    aie = {p: {k: v / n for k, v in d.items()} for p, d in sums.items()}
    summary = TraceSummary(
        aie=aie,
        n_facts=n,
        n_skipped=skipped,
        mean_clean=sum(clean) / n,
        mean_corrupted=sum(corrupted) / n,
        results=results,
        settings=cfg.settings(),
    )
    get_state(model).history[_SUMMARY_KEY] = summary
    return summary


def suggest_layers(
    trace: TraceSummary | TraceResult | Sequence[TraceResult] | nn.Module,
    *,
    kind: str = "mlp",
    count: int = 1,
) -> list[int]:
    """Where the indirect effect of ``kind`` (default the MLP) at the last subject token peaks.

    ``count=1`` gives the peak layer (ROME's single edited layer); ``count > 1`` the ``count`` consecutive
    layers with the largest summed effect (MEMIT's range). ``trace`` is a :class:`TraceSummary`, one or
    more :class:`TraceResult` (averaged), or a model on which :func:`trace_facts` has run.
    """
    kind = check_kinds(kind)[0]
    count = check_positive_int("count", count)
    if isinstance(trace, nn.Module):
        state = get_state(trace, create=False)
        summary = state.history.get(_SUMMARY_KEY) if state is not None else None
        if summary is None:
            raise TraceError(
                "No causal-tracing summary on this model: run hf_knowedit.trace_facts(model, tokenizer, "
                "facts) first (e.g. 100 records of known_1000.json the model predicts correctly)."
            )
        trace = summary
    if isinstance(trace, TraceResult):
        trace = [trace]
    if isinstance(trace, TraceSummary):
        effect = trace.aie["last_subject"].get(kind)
    else:
        trace = list(trace)
        if not trace or not all(isinstance(r, TraceResult) for r in trace):
            raise TraceError("suggest_layers needs a TraceSummary, TraceResult(s), or a model traced by trace_facts.")
        effect = (
            torch.stack([r.indirect_effect(kind)[r.last_subject_token] for r in trace]).mean(0)
            if all(kind in r.scores for r in trace)
            else None
        )
    if effect is None or torch.isnan(effect).all():
        raise TraceError(f"The trace has no {kind!r} scores at the last subject token; trace with kinds=({kind!r},).")
    effect = torch.nan_to_num(effect.float(), nan=float("-inf"))
    count = min(count, effect.numel())
    sums = effect.unfold(0, count, 1).sum(-1)
    start = int(sums.argmax())
    return list(range(start, start + count))
