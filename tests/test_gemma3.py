"""The second bundled family, Gemma-3-270M (``gemma3_text``, 18 layers): ROME on 10 CounterFact records
reaches efficacy >= 90 % with NS within 10 points of the unedited model, with the library's default layer
and strengths (statistics and context templates cut for the slow-test budget; measured 80 -> 70, at the
bound), and MEMIT on 20 in one call does too once its residual is mapped through Gemma's
``post_feedforward_layernorm`` (``memit.through_post_norm``; measured ES 25 -> 100, PS 25 -> 90, NS 76.5 -> 75;
without the mapping ES 75 and NS -> 50)."""

from __future__ import annotations

import json
import logging

import pytest

import hf_knowedit
from hf_knowedit.evaluation import score_targets
from tests.tiny_models import assert_same, weights

logger = logging.getLogger(__name__)


def wins(model, tok, records) -> list[dict[str, list[bool]]]:
    """Per record, whether target_new beats target_true (mean NLL per token) on the rewrite prompt,
    the paraphrases and the neighbourhood prompts (ROME's ES / PS / NS comparisons)."""
    pairs, spans = [], []
    for r in records:
        rw = r["requested_rewrite"]
        new, true = rw["target_new"]["str"], rw["target_true"]["str"]
        groups = [[rw["prompt"].format(rw["subject"])], r["paraphrase_prompts"], r["neighborhood_prompts"]]
        spans.append([len(g) for g in groups])
        pairs += [(p, t) for g in groups for p in g for t in (new, true)]
    nll = [s.mean_nll for s in score_targets(model, tok, pairs)]
    out, i = [], 0
    for sizes in spans:
        got = {}
        for name, size in zip(("ES", "PS", "NS"), sizes):
            got[name] = [nll[2 * j] < nll[2 * j + 1] for j in range(i, i + size)]
            i += size
        out.append(got)
    return out


def rates(per_record) -> dict[str, float]:
    """ES / PS: percent of comparisons won by target_new; NS: percent won by target_true."""
    mean = {k: 100 * sum(sum(w[k]) / len(w[k]) for w in per_record) / len(per_record) for k in ("ES", "PS", "NS")}
    mean["NS"] = 100 - mean["NS"]
    return mean


@pytest.fixture(scope="module")
def cases(data_path):
    return json.loads((data_path / "counterfact_500.json").read_text())


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread", "stats_cache")
def test_gemma3_rome_ten_records_one_at_a_time(gemma3, cases, stats_corpus):
    model, tok = gemma3
    records = cases[:10]
    config = hf_knowedit.ROMEConfig(mom2_corpus=stats_corpus, mom2_n_tokens=5_000, context_templates=0)
    base = weights(model)
    before, after = [], []
    for record in records:
        before += wins(model, tok, [record])
        es = hf_knowedit.apply_edits(model, tok, record, "rome", config=config)
        after += wins(model, tok, [record])
        hf_knowedit.revert_edits(model)
    assert_same(weights(model), base)
    pre, post = rates(before), rates(after)
    logger.warning("Gemma-3-270M ROME (layer %s), 10 records: %s -> %s", es.layers, pre, post)
    assert post["ES"] >= 90, post
    assert post["NS"] >= pre["NS"] - 10, (pre, post)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread", "stats_cache")
def test_gemma3_memit_twenty_records_in_one_call(gemma3, cases, stats_corpus):
    model, tok = gemma3
    records = cases[:20]
    config = hf_knowedit.MEMITConfig(mom2_corpus=stats_corpus, mom2_n_tokens=10_000, context_templates=0)
    base = weights(model)
    pre = rates(wins(model, tok, records))
    es = hf_knowedit.apply_edits(model, tok, records, "memit", config=config)
    post = rates(wins(model, tok, records))
    hf_knowedit.revert_edits(model)
    assert_same(weights(model), base)
    logger.warning("Gemma-3-270M MEMIT (layers %s), 20 records in one call: %s -> %s", es.layers, pre, post)
    assert post["ES"] >= 90, post
    assert post["NS"] >= pre["NS"] - 10, (pre, post)
