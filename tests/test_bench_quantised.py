"""The quantisation benchmark's llama.cpp-side scoring: driven through a stand-in for ``llama_cpp.Llama`` whose
logits come from a tiny transformers model, it gives the library's own numbers (TargetScores, ES/PS/NS, gen_ES)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hf_knowedit
from hf_knowedit.evaluation.datasets import load_records
from hf_knowedit.evaluation.protocols import encode_record
from hf_knowedit.evaluation.scoring import score_encoded

from .test_evaluation import cf_records
from .tiny_models import make_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_quantised  # noqa: E402


class StubLlama:
    """What the benchmark uses of ``llama_cpp.Llama(logits_all=True)``: ``n_tokens``, ``input_ids``, ``scores``
    (one row of logits per evaluated position), ``reset`` and ``eval`` (which appends after ``n_tokens``)."""

    def __init__(self, model, n_ctx: int = 96):
        self.model, self.n_tokens, self.prompt_evals = model, 0, 0
        self.input_ids = np.zeros(n_ctx, dtype=np.intc)
        self.scores = np.zeros((n_ctx, model.config.vocab_size), dtype=np.single)

    def reset(self):
        self.n_tokens = 0

    def eval(self, tokens):
        self.prompt_evals += self.n_tokens == 0
        n, ids = self.n_tokens, [*self.input_ids[: self.n_tokens].tolist(), *tokens]
        self.input_ids[n : len(ids)] = tokens
        with torch.no_grad():
            self.scores[n : len(ids)] = self.model(torch.tensor([ids])).logits[0, n:].float().numpy()
        self.n_tokens = len(ids)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return make_tiny_model("llama")


def test_llama_cpp_scores_equal_the_librarys_and_reuse_the_prompt(tiny):
    model, tok = tiny
    encoded = [encode_record(tok, r) for r in load_records(cf_records())]
    pairs = [p for e in encoded for p in e.pairs]
    llm = StubLlama(model)
    got = bench_quantised.llama_cpp_scores(llm, pairs)
    want = score_encoded(model, pairs, tokenizer=tok)
    for g, w in zip(got, want):
        assert g.target_ids == w.target_ids and g.predicted == w.predicted
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
    # a prompt already in the context is not evaluated again (each prompt's two targets follow it)
    assert llm.prompt_evals <= len({tuple(p) for p, _ in pairs}) < len(pairs)


def test_record_metrics_equal_evaluate(tiny):
    model, tok = tiny
    records = cf_records()
    encoded = [encode_record(tok, r) for r in load_records(records)]
    llm = StubLlama(model)
    cases = bench_quantised.record_metrics(
        encoded,
        lambda pairs: bench_quantised.llama_cpp_scores(llm, pairs),
        lambda prompts: bench_quantised.llama_cpp_generate(
            llm, [tok(p)["input_ids"] for p in prompts], tok, bench_quantised.GEN_TOKENS
        ),
    )
    assert cases == bench_quantised.transformers_metrics(model, tok, encoded)
    result = hf_knowedit.evaluate(model, tok, records, fluency=False, generation=True, prefix_tokens=0, progress=False)
    row = bench_quantised.row("test", "stub", cases)
    for k in ("ES", "PS", "NS", "gen_ES"):
        assert row[k] == round(result.pre[k], 1)
