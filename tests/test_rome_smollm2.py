"""ROME on the real bundled model: 10 CounterFact records, one edit at a time, reverted in between."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import hf_knowedit
from hf_knowedit import ROMEConfig
from hf_knowedit.tokens import split_prompt_target

logger = logging.getLogger(__name__)


def mean_logprob(model, tok, pairs):
    """Mean token log-probability of each (prompt, target), ROME's comparison (right-padded batch)."""
    enc = [split_prompt_target(tok, p, t) for p, t in pairs]
    width = max(len(p) + len(t) for p, t in enc)
    ids = torch.zeros(len(enc), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, (p, t) in enumerate(enc):
        ids[j, : len(p) + len(t)] = torch.tensor(p + t)
        mask[j, : len(p) + len(t)] = 1
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    return [float(logp[j, torch.arange(len(p) - 1, len(p) + len(t) - 1), torch.tensor(t)].mean())
            for j, (p, t) in enumerate(enc)]


def scores(model, tok, record):
    rw = record["requested_rewrite"]
    new, true = rw["target_new"]["str"], rw["target_true"]["str"]
    prompts = [rw["prompt"].format(rw["subject"])] + record["paraphrase_prompts"] + record["neighborhood_prompts"]
    lp = mean_logprob(model, tok, [(p, t) for p in prompts for t in (new, true)])
    wins = [lp[2 * i] > lp[2 * i + 1] for i in range(len(prompts))]
    return {"ES": wins[0], "PS": sum(wins[1:3]) / 2, "NS": sum(not w for w in wins[3:]) / len(wins[3:])}


@pytest.fixture
def one_thread():
    """Two OpenMP threads on a shared 2-core machine spin against other jobs; one is steadier."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_ten_counterfact_edits_one_at_a_time(smollm2, data_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KNOWEDIT_STATS_CACHE", str(tmp_path))
    model, tok = smollm2
    records = json.loads((data_path / "counterfact_500.json").read_text())
    cases = records[:10]
    # statistics corpus: text of *other* records (no dataset download in CI), 5k tokens; two context
    # templates instead of five keep ten edits within the slow-test budget (a CPU edit costs ~20 forward
    # and backward passes through the upper 24 layers)
    corpus = [p for r in records[100:] for p in r["attribute_prompts"] + r["generation_prompts"]]
    config = ROMEConfig(mom2_corpus=corpus, mom2_n_tokens=5_000, context_templates=2)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}

    before, after = [], []
    for record in cases:
        before.append(scores(model, tok, record))
        hf_knowedit.apply_edits(model, tok, record, "rome", config=config)
        after.append(scores(model, tok, record))
        hf_knowedit.revert_edits(model)
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in base.items())  # every revert bit-exact

    mean = {k: (100 * sum(s[k] for s in before) / 10, 100 * sum(s[k] for s in after) / 10) for k in ("ES", "PS", "NS")}
    logger.warning("SmolLM2 ROME, 10 records (unedited -> edited): %s", mean)
    assert all(s["ES"] for s in after), after  # efficacy 10/10
    assert mean["PS"][1] > mean["PS"][0]
    assert mean["NS"][1] >= mean["NS"][0] - 20
