"""Causal tracing on every tiny architecture, plus API behaviour (bad input, targets, save/load, plots)."""

import logging
import math

import pytest
import torch

import hf_knowedit
from hf_knowedit.architectures import get_architecture, get_module
from hf_knowedit.errors import KnowEditError, SubjectNotFoundError, TraceError
from hf_knowedit.stack import get_state
from hf_knowedit.tracing import (
    CausalTracer,
    TraceResult,
    TraceSummary,
    embedding_noise_level,
    suggest_layers,
    trace_fact,
    trace_facts,
)
from tests.helpers import assert_untouched, snapshot
from tests.oracles import NaiveTracer
from tests.tiny_models import TINY_HYBRIDS, TINY_MODEL_TYPES, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, SUBJECT = "The Eiffel Tower is in", "Eiffel Tower"


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-9)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_trace_every_architecture(model_type, caplog):
    model, tok = make_tiny_model(model_type)
    before = snapshot(model)
    with caplog.at_level(logging.DEBUG, logger="hf_knowedit.tracing.engine"):
        tracer = CausalTracer(model, tok, PROMPT, SUBJECT, samples=2, noise=0.5)
    L, T = tracer.n_layers, tracer.n_tokens
    s0, s1 = tracer.subject_range
    assert tok.decode(tracer.input_ids[s0:s1]).strip() == SUBJECT
    # the KV-cache self-check passes on every table architecture but the hybrid stacks, whose caches hold
    # recurrent / convolution state: they take full-length forwards, and say so
    assert tracer.use_kv == (model_type not in TINY_HYBRIDS)
    assert ("recurrent / convolution state" in caplog.text) == (model_type in TINY_HYBRIDS)
    a = max(l for l in tracer.attention_layers if l <= 2)  # block 2, or the hybrid stacks' attention block 1
    everything = [("hidden", l, t) for l in range(L) for t in range(T)]
    probs = tracer.score([everything, [], [("hidden", L - 1, T - 1)], [("mlp", 1, s1 - 1), ("attn", a, T - 1)]])
    assert _close(probs[0].item(), tracer.clean_prob)  # restore everything -> clean
    assert _close(probs[1].item(), tracer.corrupted_prob)  # restore nothing -> corrupted
    assert _close(probs[2].item(), tracer.clean_prob)  # last block at the last token is the final state
    assert tracer.clean_prob != tracer.corrupted_prob
    # the batched tracer (replayed lower blocks, KV-cache prefixes) agrees with plain forwards, one per restoration
    oracle = NaiveTracer(model, tok, PROMPT, SUBJECT, tracer.corruption.noise)
    assert oracle.subject_range == (s0, s1) and [oracle.answer] == tracer.answer_ids
    restorations = [everything, [], [("hidden", L - 1, T - 1)], [("mlp", 1, s1 - 1), ("attn", a, T - 1)]]
    want = torch.tensor([oracle.prob(r) for r in restorations], dtype=probs.dtype)
    # a mixture-of-experts block sums each expert's tokens in an order set by the batch it sees (index_add):
    # the batched and the one-by-one forwards differ in the last bits there
    rtol = 1e-4 if get_architecture(model).experts is not None else 1e-5
    torch.testing.assert_close(probs, want, rtol=rtol, atol=1e-9)

    result = trace_fact(model, tok, PROMPT, SUBJECT, samples=2, window=2, noise=0.5)
    assert set(result.scores) == {"hidden", "mlp", "attn"}
    # window 2: layers l - 1 and l; a window of a hybrid stack without an attention block has no attention cell
    no_attention = [l for l in range(L) if not {l - 1, l} & set(tracer.attention_layers)]
    assert no_attention == ([0] if model_type in ("lfm2", "bamba", "qwen3_next", "granitemoehybrid") else [])
    for kind, scores in result.scores.items():
        assert scores.shape == (T, L)
        traced = [l for l in range(L) if kind != "attn" or l not in no_attention]
        assert (
            torch.isfinite(scores[:, traced]).all() and scores[:, no_attention if kind == "attn" else []].isnan().all()
        )
        assert torch.all(scores[:s0, traced] == result.corrupted_prob)  # before the subject nothing changes
    assert _close(result.scores["hidden"][T - 1, L - 1].item(), result.clean_prob)
    torch.testing.assert_close(
        result.scores["hidden"][s1 - 1, 0],
        probs.new_tensor(tracer.score([[("hidden", 0, s1 - 1)]])[0].item()),
        rtol=1e-4,
        atol=1e-9,
    )
    assert result.tokens == [tok.decode([i]) for i in tok(PROMPT)["input_ids"]]
    assert_untouched(model, before)


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "falcon", "llama", "gpt_neox", "mpt", "lfm2", "bamba"])
def test_trace_fact_grids_match_the_per_cell_oracle(model_type):
    """Every cell of every kind (windows clipped at both ends, tokens before the subject included)
    against tests/oracles.py: one plain forward pass per cell, clean states copied back by hooks. In the
    hybrid stacks LFM2 and Bamba (attention in blocks 1 and 3) a window of 3 around block 3 holds one attention
    block, and none of the cells is NaN; with window 1 the attention cells of blocks 0 and 2 are NaN."""
    model, tok = make_tiny_model(model_type)
    with torch.no_grad():  # logits of a realistic range, so that cells differ visibly
        get_module(model, get_architecture(model).final_norm).weight.mul_(8.0)
    options = dict(samples=3, window=3, noise=0.5, seed=3)
    result = trace_fact(model, tok, PROMPT, SUBJECT, **options)
    oracle = NaiveTracer(
        model, tok, PROMPT, SUBJECT, CausalTracer(model, tok, PROMPT, SUBJECT, **options).corruption.noise
    )
    assert result.subject_range == oracle.subject_range and result.answer_ids == [oracle.answer]
    assert math.isclose(result.clean_prob, oracle.clean_prob, rel_tol=1e-5)
    assert math.isclose(result.corrupted_prob, oracle.corrupted_prob, rel_tol=1e-5)
    for kind in ("hidden", "mlp", "attn"):
        want = oracle.grid(kind, window_size=3)
        assert float(want.max() - want.min()) > 1e-3 * float(want.max()), "a flat grid would not tell cells apart"
        torch.testing.assert_close(result.scores[kind], want, rtol=1e-5, atol=1e-7, msg=lambda m, k=kind: f"{k}: {m}")
    if model_type in ("lfm2", "bamba"):
        result = trace_fact(model, tok, PROMPT, SUBJECT, kinds="attn", **dict(options, window=1))
        want = oracle.grid("attn", window_size=1)
        assert want[:, [0, 2]].isnan().all() and not want[:, [1, 3]].isnan().any()
        torch.testing.assert_close(result.scores["attn"], want, rtol=1e-5, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("model_type", ["lfm2", "bamba"])
def test_restoring_attention_in_a_block_without_attention_is_a_trace_error(model_type):
    model, tok = make_tiny_model(model_type)
    before = snapshot(model)
    tracer = CausalTracer(model, tok, PROMPT, SUBJECT, samples=2, noise=0.5)
    assert tracer.attention_layers == [1, 3]
    with pytest.raises(TraceError, match=r"block 2 .* no attention.*\[1, 3\]"):
        tracer.score([[("attn", 1, 3)], [("attn", 2, 3)]])
    assert_untouched(model, before)


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama")


def test_same_seed_same_result_and_other_seed_differs(llama):
    model, tok = llama
    a = trace_fact(model, tok, PROMPT, SUBJECT, kinds="mlp", samples=3, window=2)
    b = trace_fact(model, tok, PROMPT, SUBJECT, kinds="mlp", samples=3, window=2)
    c = trace_fact(model, tok, PROMPT, SUBJECT, kinds="mlp", samples=3, window=2, seed=1)
    assert torch.equal(a.scores["mlp"], b.scores["mlp"]) and a.corrupted_prob == b.corrupted_prob
    assert a.corrupted_prob != c.corrupted_prob


def test_auto_noise_is_three_embedding_stds_and_cached(llama):
    model, tok = llama
    subjects = ["Paris", "Rome", "Germany"]
    ids = [i for s in subjects for i in tok(s, add_special_tokens=False)["input_ids"]]
    std = get_module(model, get_architecture(model).embed)(torch.tensor([ids])).std().item()
    assert math.isclose(embedding_noise_level(model, tok, subjects), 3 * std, rel_tol=1e-5)
    assert any(math.isclose(v, std, rel_tol=1e-5) for v in get_state(model).history["tracing.embedding_std"].values())
    r = trace_fact(model, tok, PROMPT, SUBJECT, kinds="hidden", samples=2, subjects=subjects, positions=[-1])
    assert math.isclose(r.settings["noise"], 3 * std, rel_tol=1e-5)


def test_multi_token_target_is_teacher_forced_product(llama):
    model, tok = llama
    target = "Paris and Rome"
    r = trace_fact(model, tok, PROMPT, SUBJECT, target=target, kinds="hidden", samples=2, positions=[-1])
    ids = tok(PROMPT + " " + target)["input_ids"]
    n_target = len(r.answer_ids)
    assert n_target > 1 and ids[-n_target:] == r.answer_ids and r.input_ids == ids[:-1]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    want = sum(logp[len(ids) - n_target - 1 + i, tok_id].item() for i, tok_id in enumerate(r.answer_ids))
    assert math.isclose(r.clean_prob, math.exp(want), rel_tol=1e-4)
    assert len(r.tokens) == len(ids) - 1 and r.scores["hidden"].shape[0] == len(ids) - 1


def test_positions_limit_the_traced_rows(llama):
    model, tok = llama
    r = trace_fact(model, tok, PROMPT, SUBJECT, kinds=("hidden", "attn"), samples=2, window=2, positions=[-1])
    T = len(r.tokens)
    assert torch.isnan(r.scores["hidden"][: T - 1]).all() and torch.isfinite(r.scores["hidden"][T - 1]).all()


def test_symmetric_token_replacement(llama):
    model, tok = llama
    n = len(tok(SUBJECT, add_special_tokens=False)["input_ids"])
    pool = ["Michael Jordan", "Steve Jobs", "Bill Gates", "Lionel Messi", "Marie Curie", "Amazon River"]
    same = [s for s in pool if len(tok(" " + s, add_special_tokens=False)["input_ids"]) == n]
    assert same, "test needs same-length subjects in the tiny tokenizer"
    r = trace_fact(
        model, tok, PROMPT, SUBJECT, kinds="hidden", samples=3, corruption="str", subjects=pool, positions=[-1]
    )
    assert all(x.strip() in same for x in r.settings["replacements"])
    assert r.corrupted_prob != r.clean_prob
    with pytest.raises(TraceError, match="same number of tokens"):
        trace_fact(model, tok, PROMPT, SUBJECT, corruption="str", subjects=["x y z w v u t s"], samples=2)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(subject="Colosseum"), SubjectNotFoundError),
        (dict(samples=0), TraceError),
        (dict(window=0), TraceError),
        (dict(kinds=("hidden", "mlps")), TraceError),
        (dict(target="   "), TraceError),
        (dict(corruption="blur"), TraceError),
        (dict(noise=-1.0), TraceError),
        (dict(positions=[99]), TraceError),
    ],
)
def test_bad_input_raises_typed_error_and_leaves_model_untouched(kwargs, error):
    model, tok = make_tiny_model("gpt2")
    before = snapshot(model)
    args = dict(prompt=PROMPT, subject=SUBJECT, samples=2) | kwargs
    with pytest.raises(error) as info:
        trace_fact(model, tok, **args)
    assert isinstance(info.value, KnowEditError) and str(info.value)
    assert_untouched(model, before)


def test_attached_method_save_load_and_plot(llama, tmp_path):
    model, tok = llama
    hf_knowedit.attach(model, tok)
    try:
        r = model.trace_fact(PROMPT, SUBJECT, samples=2, window=2)
    finally:
        hf_knowedit.detach(model)
    assert isinstance(r, TraceResult) and r.answer == tok.decode(r.answer_ids)
    path = r.save(tmp_path / "trace.json")
    back = TraceResult.load(path)
    assert back.tokens == r.tokens and back.subject_range == r.subject_range and back.settings == r.settings
    for k in r.scores:
        torch.testing.assert_close(back.scores[k], r.scores[k], equal_nan=True)
    fig = r.plot(tmp_path / "trace.png")
    assert (tmp_path / "trace.png").stat().st_size > 1000 and len(fig.axes) >= 3
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(TraceError):
        TraceResult.load(tmp_path / "bad.json")


def test_trace_facts_and_suggest_layers(tmp_path):
    model, tok = make_tiny_model("qwen2")
    facts = [
        {"prompt": PROMPT, "subject": SUBJECT, "attribute": "Paris"},
        ("Michael Jordan plays for the", "Michael Jordan"),
    ]
    summary = trace_facts(
        model,
        tok,
        facts,
        kinds=("mlp", "hidden"),
        samples=2,
        window=2,
        require_correct=False,
        keep_results=True,
        progress=False,
    )
    assert isinstance(summary, TraceSummary) and summary.n_facts == 2 and summary.n_skipped == 0
    r0, r1 = summary.results
    want = (r0.indirect_effect("mlp")[r0.last_subject_token] + r1.indirect_effect("mlp")[r1.last_subject_token]) / 2
    torch.testing.assert_close(summary.aie["last_subject"]["mlp"], want)
    assert summary.aie["last"]["hidden"].shape == (4,)
    peak = int(want.argmax())
    assert suggest_layers(summary) == [peak] == suggest_layers(model) == suggest_layers(summary.results)
    summary.plot(tmp_path / "aie.png")
    assert (tmp_path / "aie.png").stat().st_size > 1000
    # with a known answer the model does not predict, the fact is skipped
    with pytest.raises(TraceError, match="None of the"):
        trace_facts(model, tok, [{"prompt": PROMPT, "subject": SUBJECT, "attribute": "zzzz"}], samples=2)


def test_suggest_layers_peak_and_window():
    scores = torch.zeros(3, 6)
    scores[1] = torch.tensor([0.1, 0.5, 0.05, 0.45, 0.44, 0.4])
    r = TraceResult(
        scores={"mlp": scores},
        clean_prob=0.6,
        corrupted_prob=0.05,
        tokens=["a", "b", "c"],
        input_ids=[1, 2, 3],
        subject_range=(0, 2),
        answer="x",
        answer_ids=[4],
        prompt="a b c",
        subject="a b",
    )
    assert suggest_layers(r) == [1]
    assert suggest_layers(r, count=3) == [3, 4, 5]  # largest summed window
    with pytest.raises(TraceError):
        suggest_layers(r, kind="attn")
    with pytest.raises(TraceError):
        suggest_layers(torch.nn.Linear(2, 2))
