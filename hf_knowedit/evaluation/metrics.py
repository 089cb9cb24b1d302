"""The papers' metrics, computed from :class:`~hf_knowedit.evaluation.scoring.TargetScore` objects.

Two families, kept apart because their numbers are **not comparable** (anchors §c.4, EasyEdit#125/#434):

**Probability comparison** (ROME's CounterFact protocol, Meng et al. 2022; MEMIT's zsRE protocol)

* ``ES`` efficacy success: fraction of rewrite prompts where ``P(target_new) > P(target_true)``;
  ``EM`` efficacy magnitude: mean of ``P(target_new) - P(target_true)``.
* ``PS`` / ``PM``: the same over the paraphrase prompts.
* ``NS`` / ``NM``: the reverse (``P(target_true) > P(target_new)``) over the neighbourhood prompts,
  i.e. facts about *other* subjects that must not change.
* ``S``: harmonic mean of ES, PS and NS (MEMIT's ``summarize.py``).
* ``GE``: generation entropy (fluency), see :func:`ngram_entropy`.

  Probabilities: as in ROME's reference ``test_batch_prediction``, a target's score is its **mean
  negative log-probability per token** (the summed NLL of the whole multi-token target, tokenized in
  context after a space, divided by its token count); "P > P" compares these mean NLLs (strictly),
  and the magnitudes use ``P = exp(-mean NLL)``, the per-token geometric-mean probability.
  Per record the success is averaged over that record's prompts, then over records; reported in percent.

* MEMIT's zsRE protocol: ``Efficacy``, ``Paraphrase``, ``Specificity`` = token-level top-1 accuracy of
  the answer under teacher forcing (``src`` / ``rephrase`` -> new answer; ``loc?`` -> ``loc_ans``),
  and ``Score`` = their harmonic mean. (The reference re-tokenizes decoded prefixes; we read the
  arg-max at each answer position of one forward pass, which is what that construction intends.)

**Teacher-forced token accuracy** (EasyEdit's ``rewrite_acc`` / ``rephrase_acc`` / ``locality``)

* ``rewrite_acc``, ``rephrase_acc``: fraction of ``target_new`` tokens that are the arg-max after the prompt
  and the true earlier target tokens.
* ``locality``: fraction of the neighbourhood answer's positions whose arg-max token is *unchanged*
  from the pre-edit model (so it is 100 before any edit by definition).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from statistics import fmean

from .chat import CHAT_METRICS
from .generative import GEN_METRICS
from .scoring import TargetScore

Pair = tuple[TargetScore, TargetScore]  # (score of target_new, score of target_true)

#: metric names per family, in display order
ROME_METRICS = ("S", "ES", "EM", "PS", "PM", "NS", "NM", "GE")
ZSRE_METRICS = ("Score", "Efficacy", "Paraphrase", "Specificity")
TOKEN_ACC_METRICS = ("rewrite_acc", "rephrase_acc", "locality")


def prefers(a: TargetScore, b: TargetScore) -> bool:
    """ROME's comparison: ``a`` is more likely than ``b`` when its mean NLL per token is strictly lower."""
    return a.mean_nll < b.mean_nll


def success_rate(pairs: Sequence[Pair], new_should_win: bool = True) -> float:
    """Fraction of prompts where ``target_new`` beats ``target_true`` (or the reverse), in [0, 1]."""
    return fmean(prefers(n, t) if new_should_win else prefers(t, n) for n, t in pairs)


def magnitude(pairs: Sequence[Pair], new_should_win: bool = True) -> float:
    """Mean of ``P(winner) - P(loser)`` with ``P = exp(-mean NLL)``, in [-1, 1]."""
    sign = 1.0 if new_should_win else -1.0
    return fmean(sign * (n.mean_prob - t.mean_prob) for n, t in pairs)


def counterfact_case(
    rewrite: Sequence[Pair], paraphrase: Sequence[Pair], neighborhood: Sequence[Pair]
) -> dict[str, float]:
    """ROME's per-record numbers (fractions): ES, EM, PS, PM, NS, NM."""
    return {
        "ES": success_rate(rewrite),
        "EM": magnitude(rewrite),
        "PS": success_rate(paraphrase),
        "PM": magnitude(paraphrase),
        "NS": success_rate(neighborhood, new_should_win=False),
        "NM": magnitude(neighborhood, new_should_win=False),
    }


def zsre_case(
    rewrite: Sequence[TargetScore], paraphrase: Sequence[TargetScore], neighborhood: Sequence[TargetScore]
) -> dict[str, float]:
    """MEMIT's per-record zsRE numbers (fractions): token-level top-1 accuracy."""
    return {
        "Efficacy": fmean(s.token_accuracy for s in rewrite),
        "Paraphrase": fmean(s.token_accuracy for s in paraphrase),
        "Specificity": fmean(s.token_accuracy for s in neighborhood),
    }


def agreement(post: TargetScore, pre: TargetScore) -> float:
    """Fraction of positions whose arg-max token is the same before and after an edit."""
    return fmean(a == b for a, b in zip(post.predicted, pre.predicted))


def token_accuracy_case(
    rewrite: Sequence[TargetScore],
    paraphrase: Sequence[TargetScore],
    neighborhood: Sequence[TargetScore],
    neighborhood_pre: Sequence[TargetScore],
) -> dict[str, float]:
    """EasyEdit's per-record numbers (fractions): rewrite_acc, rephrase_acc, locality."""
    return {
        "rewrite_acc": fmean(s.token_accuracy for s in rewrite),
        "rephrase_acc": fmean(s.token_accuracy for s in paraphrase),
        "locality": fmean(agreement(a, b) for a, b in zip(neighborhood, neighborhood_pre)),
    }


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (as ``scipy.stats.hmean`` gives)."""
    values = list(values)
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def aggregate(cases: Sequence[Mapping[str, float | None]]) -> dict[str, float]:
    """Mean of per-record fractions, in percent, plus ``S`` / ``Score`` (harmonic means) where they apply.

    ``GE`` is already on its own scale (100 x bits) and is averaged as is. Missing values (``None``) are skipped.
    """
    keys: list[str] = []
    for c in cases:
        keys += [k for k in c if k not in keys]
    out: dict[str, float] = {}
    for k in keys:
        vals = [c[k] for c in cases if c.get(k) is not None]
        if vals:
            out[k] = fmean(vals) * (1.0 if k == "GE" else 100.0)
    if all(k in out for k in ("ES", "PS", "NS")):
        out["S"] = harmonic_mean([out["ES"], out["PS"], out["NS"]])
    if all(k in out for k in ("Efficacy", "Paraphrase", "Specificity")):
        out["Score"] = harmonic_mean([out["Efficacy"], out["Paraphrase"], out["Specificity"]])
    order = ROME_METRICS + ZSRE_METRICS + GEN_METRICS + CHAT_METRICS + TOKEN_ACC_METRICS
    return {k: out[k] for k in sorted(out, key=lambda k: order.index(k) if k in order else len(order))}


# ----------------------------------------------------------------------------- fluency

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Word tokens: runs of word characters and single punctuation marks (close to NLTK's
    ``word_tokenize``, which ROME uses; NLTK is not a dependency here)."""
    return _WORD.findall(text)


def ngram_entropy_of(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's ``compute_n_gram_entropy``: the arithmetic mean over ``n`` of ``weight_n * H_n``, where
    ``H_n`` is the entropy (bits) of the text's n-gram frequency distribution. With the defaults this is
    ``H_2 / 3 + 2 H_3 / 3``. A text too short for any n-gram has entropy 0."""
    toks = words(text)
    terms = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        terms.append(w * h)
    return fmean(terms)


def ngram_entropy(texts: Sequence[str]) -> float:
    """``GE`` of one record: 100 x the mean :func:`ngram_entropy_of` of its generations (ROME reports
    the summarised value times 100, e.g. 626.6 for unedited GPT-2 XL)."""
    return 100.0 * fmean(ngram_entropy_of(t) for t in texts)
