"""The mixture-of-experts test bed (hf_knowedit._testbeds.upcycle_moe) and routing measurements
(hf_knowedit.evaluation.routing): tiny models here, the real SmolLM2 weights in the slow tests."""

from __future__ import annotations

import copy
import json
import logging
import time

import pytest
import torch

from hf_knowedit._testbeds import upcycle_moe
from hf_knowedit.architectures import ARCHITECTURES, get_module, layer_path
from hf_knowedit.errors import InvalidConfigError, MissingTokenizerError, UnsupportedArchitectureError
from hf_knowedit.evaluation.routing import RoutingSnapshot, routing_change, routing_snapshot
from tests.tiny_models import LAYERS, assert_same, make_tiny_model, make_tiny_tokenizer, tiny_config, weights

logger = logging.getLogger(__name__)

TEXTS = [
    "The Eiffel Tower is located in Paris.",
    "Danielle Darrieux was a French actress.",
    "Toyota is a car company headquartered in Japan, and its language is Japanese.",
    "Who is the author of this book?",
    "Lionel Messi plays soccer.",
]


def _routers(model):
    return [get_module(model, f"{layer_path(ARCHITECTURES['qwen2_moe'], i)}.mlp.gate") for i in range(LAYERS)]


def _manual_routing(model, tok, texts, top_k):
    """Top-k sets per layer from the routers' inputs, one text at a time (no padding)."""
    inputs = {i: [] for i in range(LAYERS)}
    handles = [
        r.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0])) for i, r in enumerate(_routers(model))
    ]
    try:
        with torch.no_grad():
            for text in texts:
                model(input_ids=torch.tensor([tok(text).input_ids]))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for i, router in enumerate(_routers(model)):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[i]])
        out[i] = (x @ router.weight.T).topk(top_k, dim=-1).indices.sort(dim=-1).values
    return out


# -----------------------------------------------------------------------------
# routing_snapshot / routing_change on a tiny random Qwen2-MoE


def test_snapshot_is_the_routers_top_k_of_every_real_token():
    model, tok = make_tiny_model("qwen2_moe")
    snap = routing_snapshot(model, tok, TEXTS, batch_size=2)  # padded batches of different lengths
    expected = _manual_routing(model, tok, TEXTS, model.config.num_experts_per_tok)
    assert snap.texts == tuple(TEXTS) and sorted(snap.experts) == list(range(LAYERS))
    assert snap.n_tokens == sum(len(tok(t).input_ids) for t in TEXTS)
    for layer, rows in expected.items():
        assert torch.equal(snap.experts[layer], rows), layer
    # every expert is used somewhere: the measurement is not trivially constant
    assert set(snap.experts[0].flatten().tolist()) == set(range(model.config.num_experts))
    for size in (1, 5):
        again = routing_snapshot(model, tok, TEXTS, batch_size=size)
        assert all(torch.equal(again.experts[i], snap.experts[i]) for i in snap.experts)


def test_identical_models_give_no_change():
    model, tok = make_tiny_model("qwen2_moe")
    twin = copy.deepcopy(model)
    change = routing_change(routing_snapshot(model, tok, TEXTS), routing_snapshot(twin, tok, TEXTS, batch_size=3))
    assert change.fraction == 0.0 and change.per_layer == {i: 0.0 for i in range(LAYERS)}
    assert change.n_tokens == sum(len(tok(t).input_ids) for t in TEXTS)


@pytest.mark.parametrize("layer", [0, LAYERS - 1])
def test_swapping_two_experts_in_a_router_changes_the_tokens_routed_to_one_of_them(layer):
    """Swapping router rows 0 and 1 of one block changes exactly the sets holding one of experts 0, 1;
    blocks before it are untouched."""
    model, tok = make_tiny_model("qwen2_moe")
    before = routing_snapshot(model, tok, TEXTS)
    base = weights(model)
    with torch.no_grad():
        w = _routers(model)[layer].weight
        w[[0, 1]] = w[[1, 0]].clone()
    change = routing_change(before, routing_snapshot(model, tok, TEXTS))
    sets = before.experts[layer]
    has0, has1 = (sets == 0).any(-1), (sets == 1).any(-1)
    expected = (has0 ^ has1).double().mean().item()
    assert 0 < expected < 1
    assert change.per_layer[layer] == pytest.approx(expected, abs=1e-12)
    assert all(change.per_layer[i] == 0.0 for i in range(layer))
    if layer == LAYERS - 1:  # nothing after it: the overall fraction is this block's share
        assert change.fraction == pytest.approx(expected / LAYERS, abs=1e-12)
    else:
        assert change.fraction == pytest.approx(sum(change.per_layer.values()) / LAYERS, abs=1e-12)
    with torch.no_grad():
        w[[0, 1]] = w[[1, 0]].clone()
    assert_same(weights(model), base)
    assert routing_change(before, routing_snapshot(model, tok, TEXTS)).fraction == 0.0


def test_mixtral_routing_through_its_table_row():
    config = tiny_config("llama")
    mix = dict(
        vocab_size=config.vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        pad_token_id=0,
    )
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**mix)).eval()
    tok = make_tiny_tokenizer(True)
    snap = routing_snapshot(model, tok, TEXTS, batch_size=2)
    inputs = {}
    handles = [
        model.model.layers[i].mlp.gate.register_forward_pre_hook(
            lambda m, a, i=i: inputs.setdefault(i, []).append(a[0])
        )
        for i in range(LAYERS)
    ]
    with torch.no_grad():
        for text in TEXTS:
            model(input_ids=torch.tensor([tok(text).input_ids]))
    for h in handles:
        h.remove()
    for i in range(LAYERS):
        x = torch.cat([t.reshape(-1, 32) for t in inputs[i]])
        rows = (x @ model.model.layers[i].mlp.gate.weight.T).topk(2, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(snap.experts[i], rows)
    assert routing_change(snap, routing_snapshot(model, tok, TEXTS)).fraction == 0.0


def test_routing_errors_are_typed_and_leave_no_hooks():
    dense, tok = make_tiny_model("llama")
    with pytest.raises(UnsupportedArchitectureError, match="no routed experts"):
        routing_snapshot(dense, tok, TEXTS)
    model, tok = make_tiny_model("qwen2_moe")
    for bad in ([], "one string", None):
        with pytest.raises(InvalidConfigError, match="texts"):
            routing_snapshot(model, tok, bad)
    with pytest.raises(InvalidConfigError, match="batch_size"):
        routing_snapshot(model, tok, TEXTS, batch_size=0)
    a, b = routing_snapshot(model, tok, TEXTS[:2]), routing_snapshot(model, tok, TEXTS[1:3])
    with pytest.raises(InvalidConfigError, match="different texts"):
        routing_change(a, b)
    other = RoutingSnapshot(a.texts, a.token_ids, {0: a.experts[0]})
    with pytest.raises(InvalidConfigError, match="different MoE blocks"):
        routing_change(a, other)
    with pytest.raises(InvalidConfigError, match="RoutingSnapshot"):
        routing_change(a, {"experts": {}})

    # a forward that fails half-way: the routing hooks come off all the same
    experts = [get_module(model, f"{layer_path(ARCHITECTURES['qwen2_moe'], i)}.mlp.experts") for i in range(LAYERS)]

    def boom(*_):
        raise RuntimeError("boom")

    failing = get_module(model, layer_path(ARCHITECTURES["qwen2_moe"], 2)).register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            routing_snapshot(model, tok, TEXTS)
    finally:
        failing.remove()
    assert all(not e._forward_pre_hooks for e in experts)


# -----------------------------------------------------------------------------
# upcycle_moe on a tiny Llama


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_upcycled_tiny_llama_computes_the_dense_model(kind):
    dense, tok = make_tiny_model("llama")
    base = weights(dense)
    moe = upcycle_moe(dense, kind, tokenizer=tok)
    assert_same(weights(dense), base)
    assert moe.config.model_type == kind and not moe.training
    assert kind in moe.config._name_or_path and moe.name_or_path == moe.config._name_or_path
    assert next(moe.parameters()).dtype == torch.float32
    ids = torch.tensor([tok(t).input_ids for t in TEXTS[:1]])
    with torch.no_grad():
        want, got = dense(input_ids=ids).logits, moe(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    # the routers route: not every token goes to the same experts
    snap = routing_snapshot(moe, tok, TEXTS)
    assert all(len(set(map(tuple, rows.tolist()))) > 1 for rows in snap.experts.values())
    # no shared storage: editing the MoE model leaves the dense one as it was
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(1.0)
    assert_same(weights(dense), base)


def test_perturbed_experts_differ_by_seeded_noise_of_the_given_size():
    dense, tok = make_tiny_model("llama")
    moe = upcycle_moe(dense, "qwen2_moe", n_experts=3, top_k=1, perturb=0.1, seed=1, tokenizer=tok)
    block, mlp = moe.model.layers[2].mlp, dense.model.layers[2].mlp
    assert moe.config.num_experts == 3 and moe.config.num_experts_per_tok == 1
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    noise = block.experts.gate_up_proj / gate_up - 1  # [E, 2I, H]: perturb * standard Gaussian
    assert noise.std().item() == pytest.approx(0.1, rel=0.05) and noise.mean().abs().item() < 0.005
    assert not torch.allclose(noise[0], noise[1])
    down_noise = block.experts.down_proj / (mlp.down_proj.weight / 2) - 1  # routed experts hold half of down_proj
    assert down_noise.std().item() == pytest.approx(0.1, rel=0.05) and down_noise.mean().abs().item() < 0.005
    # the shared expert, attention and norms are the dense model's, unperturbed
    assert torch.equal(block.shared_expert.down_proj.weight, mlp.down_proj.weight)
    assert torch.equal(block.shared_expert_gate.weight, torch.zeros_like(block.shared_expert_gate.weight))
    assert torch.equal(moe.model.layers[2].self_attn.q_proj.weight, dense.model.layers[2].self_attn.q_proj.weight)
    assert not moe.model.layers[2].self_attn.q_proj.bias.any()
    again = upcycle_moe(dense, "qwen2_moe", n_experts=3, top_k=1, perturb=0.1, seed=1, tokenizer=tok)
    other = upcycle_moe(dense, "qwen2_moe", n_experts=3, top_k=1, perturb=0.1, seed=2, tokenizer=tok)
    assert_same(weights(again), weights(moe))
    assert not torch.equal(other.model.layers[2].mlp.experts.down_proj, block.experts.down_proj)
    assert not torch.equal(other.model.layers[2].mlp.gate.weight, block.gate.weight)


def test_upcycle_keeps_dtype_and_device():
    dense, tok = make_tiny_model("llama", dtype=torch.bfloat16)
    moe = upcycle_moe(dense, "mixtral", tokenizer=tok)
    assert {p.dtype for p in moe.parameters()} == {torch.bfloat16}
    assert {p.device for p in moe.parameters()} == {next(dense.parameters()).device}
    assert moe.model.rotary_emb.inv_freq.dtype == dense.model.rotary_emb.inv_freq.dtype


def test_upcycle_bad_arguments_are_typed_errors():
    dense, tok = make_tiny_model("llama")
    base = weights(dense)
    for kwargs in (
        dict(kind="switch"),
        dict(kind="mixtral", n_experts=4, top_k=4),
        dict(kind="mixtral", top_k=0),
        dict(kind="mixtral", n_experts=2.0),
        dict(kind="mixtral", perturb=-0.1),
        dict(kind="mixtral", perturb=float("nan")),
        dict(kind="mixtral", seed=True),
    ):
        with pytest.raises(InvalidConfigError):
            upcycle_moe(dense, tokenizer=tok, **kwargs)
    with pytest.raises(MissingTokenizerError):
        upcycle_moe(dense, "mixtral")
    gpt2, gpt2_tok = make_tiny_model("gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="Llama"):
        upcycle_moe(gpt2, "mixtral", tokenizer=gpt2_tok)
    assert_same(weights(dense), base)


# -----------------------------------------------------------------------------
# the real test bed: SmolLM2-135M-Instruct upcycled


def _last_logits(model, tok, prompts):
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([tok(p).input_ids])).logits[0, -1] for p in prompts])


def _shares(snap, n_experts):
    """Per MoE block, the share of the top-k slots each expert gets."""
    return {
        i: torch.bincount(rows.flatten(), minlength=n_experts).double() / rows.numel()
        for i, rows in snap.experts.items()
    }


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_upcycled_smollm2_knows_what_smollm2_knows(smollm2, data_path, kind):
    dense, tok = smollm2
    counterfact = json.loads((data_path / "counterfact_500.json").read_text())[:5]
    prompts = [r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]) for r in counterfact]
    known = [r["prompt"] for r in json.loads((data_path / "known_1000.json").read_text())[:50]]

    start = time.perf_counter()
    moe = upcycle_moe(dense, kind, tokenizer=tok)
    seconds = time.perf_counter() - start
    diffs = []
    with torch.no_grad():
        for prompt in prompts:  # every position's logits
            ids = torch.tensor([tok(prompt).input_ids])
            want, got = dense(input_ids=ids).logits, moe(input_ids=ids).logits
            diffs.append(((got - want).abs().max().item(), want.abs().max().item()))
    spread = _shares(routing_snapshot(moe, tok, known), moe.config.num_experts)
    del moe
    worst = max(d / scale for d, scale in diffs)
    logger.warning(
        "%s upcycled in %.1f s; on 5 CounterFact prompts max |logit diff| %.2e, max |logit| %.1f, ratio %.2e",
        kind,
        seconds,
        max(d for d, _ in diffs),
        max(scale for _, scale in diffs),
        worst,
    )
    assert worst <= 1e-4

    moe = upcycle_moe(dense, kind, perturb=0.01, tokenizer=tok)
    agree = (
        (_last_logits(moe, tok, known).argmax(-1) == _last_logits(dense, tok, known).argmax(-1)).double().mean().item()
    )
    perturbed_spread = _shares(routing_snapshot(moe, tok, known, batch_size=16), 4)
    del moe
    logger.warning("%s perturb=0.01: top-1 agreement with SmolLM2 on 50 known_1000 prompts: %.0f %%", kind, 100 * agree)
    for name, shares in (("perturb=0", spread), ("perturb=0.01", perturbed_spread)):
        lowest = min(s.min().item() for s in shares.values())
        logger.warning(
            "%s %s expert shares of the top-2 slots (50 known_1000 prompts): lowest %.3f, per block %s",
            kind,
            name,
            lowest,
            {i: [round(x, 2) for x in s.tolist()] for i, s in shares.items()},
        )
        assert len(shares) == 30 and lowest >= 0.10
    assert agree >= 0.9


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread", "stats_cache")
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_rome_rewrites_real_facts_through_the_routing_of_an_upcycled_smollm2(smollm2, data_path, stats_corpus, kind):
    """Real knowledge, edited through the routing: ROME on 3 CounterFact facts of the upcycled SmolLM2 (routed
    experts as one matrix for Mixtral, the gated shared expert for Qwen2-MoE): each new object beats the old on
    its prompt, the routing of the edited block and those before it is exactly kept, revert is bit-exact."""
    import hf_knowedit
    from hf_knowedit.evaluation import evaluate

    dense, tok = smollm2
    records = json.loads((data_path / "counterfact_500.json").read_text())[:3]
    known = [f"{r['prompt']} {r['attribute']}." for r in json.loads((data_path / "known_1000.json").read_text())[:20]]
    moe = upcycle_moe(dense, kind, perturb=0.01, tokenizer=tok)
    before, routed = weights(moe), routing_snapshot(moe, tok, known)
    config = dict(mom2_corpus=stats_corpus, mom2_n_tokens=3000, context_templates=0)
    result = evaluate(moe, tok, records, method="rome", protocol="batch", layers=[6], config=config, fluency=False)
    assert result.post["ES"] == 100.0 and result.pre["ES"] < 100.0
    es = hf_knowedit.apply_edits(moe, tok, records, method="rome", layers=[6], config=config)
    path = f"model.layers.6.{ARCHITECTURES[kind].mlp_out}"
    assert list(es.deltas) == [path]
    moved = routing_change(routed, routing_snapshot(moe, tok, known))
    assert all(moved.per_layer[i] == 0.0 for i in range(7))  # routers and their inputs up to the edited block
    logger.warning(
        "%s: ROME on 3 facts moves the routing of %.2f %% of unrelated (token, block) pairs", kind, 100 * moved.fraction
    )
    hf_knowedit.revert_edits(moe)
    assert_same(weights(moe), before)
