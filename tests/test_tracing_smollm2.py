"""Causal tracing on the bundled SmolLM2-135M-Instruct with facts it knows (known_1000.json)."""

import json

import pytest
import torch

from hf_knowedit.tokens import split_prompt_target
from hf_knowedit.tracing import TraceResult, suggest_layers, trace_fact, trace_facts
from tests.helpers import assert_untouched, snapshot

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def known(smollm2, data_path):
    """A few known_1000 facts whose attribute SmolLM2 predicts as its top-1 next token."""
    model, tok = smollm2
    records = json.loads((data_path / "known_1000.json").read_text())
    good = []
    with torch.no_grad():
        for r in records[:200]:
            first = split_prompt_target(tok, r["prompt"], r["attribute"])[1][0]
            logits = model(input_ids=torch.tensor([tok(r["prompt"])["input_ids"]]), use_cache=False).logits
            if int(logits[0, -1].argmax()) == first:
                good.append(r)
            if len(good) == 3:
                break
    assert len(good) == 3, "SmolLM2 should know a few of the first 200 known facts"
    return good


def test_known_fact_traced_and_plotted(smollm2, known, tmp_path):
    model, tok = smollm2
    before = snapshot(model)
    fact = known[0]
    r = trace_fact(model, tok, fact["prompt"], fact["subject"], samples=3, kinds=("hidden", "mlp"), positions=None)
    assert isinstance(r, TraceResult)
    assert r.answer.strip() and fact["attribute"].startswith(r.answer.strip())
    assert r.clean_prob > 0.1 and r.clean_prob > 2 * r.corrupted_prob
    # restoring the last layer's hidden state at the last token gives the clean probability back
    assert abs(r.scores["hidden"][-1, -1].item() - r.clean_prob) < 1e-3
    r.plot(tmp_path / "trace.png")
    assert (tmp_path / "trace.png").stat().st_size > 5000
    assert_untouched(model, before)


def test_trace_facts_on_known_facts(smollm2, known):
    model, tok = smollm2
    summary = trace_facts(model, tok, known, kinds=("mlp",), samples=2, window=10, progress=False)
    assert summary.n_facts == len(known) and summary.n_skipped == 0
    assert summary.mean_clean > summary.mean_corrupted
    effect = summary.aie["last_subject"]["mlp"]
    assert effect.shape == (30,) and effect.max() > 0
    assert suggest_layers(summary) == [int(effect.argmax())]
