"""The statistics pass: blocked accumulation of ``Σ k kᵀ`` and the cache consulted before any corpus."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

import hf_knowedit.methods.statistics as stats
from hf_knowedit.architectures import get_architecture, mlp_out_dims, mlp_out_path
from hf_knowedit.methods.statistics import add_outer_blocks, compute_second_moment, mirror_upper, model_identity
from hf_knowedit.moments import SecondMoment, StatsCache, StatsKey
from tests.test_stats import CORPUS, _keys_by_hand
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("d_in,block", [(10, 3), (10, 10), (10, 16), (96, 32), (97, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_upper_triangle_accumulation_is_the_full_product(d_in, block, dtype):
    gen = torch.Generator().manual_seed(d_in + block)
    batches = [torch.randn(n, d_in, generator=gen, dtype=torch.float64) for n in (5, 17, 1)]
    blocks = [(i, min(i + block, d_in)) for i in range(0, d_in, block)]
    total = torch.zeros(d_in, d_in, dtype=dtype)
    for keys in batches:
        add_outer_blocks(total, keys.to(dtype), blocks)
    mirror_upper(total, blocks)
    want = sum(k.t() @ k for k in batches)
    assert torch.equal(total, total.t())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(total.double(), want, rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("block", [4, 6, 7])
def test_rows_zero_in_a_block_are_left_out_of_its_products_and_the_sum_is_the_same(block, monkeypatch):
    """Routed experts' keys: each row non-zero only in the blocks of its 2 of 4 experts (6 columns each)."""
    gen = torch.Generator().manual_seed(block)
    keys = torch.randn(40, 24, generator=gen, dtype=torch.float64)
    routed = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(40)])
    mask = torch.zeros(40, 4, dtype=torch.bool).scatter_(1, routed, True).repeat_interleave(6, dim=1)
    keys = keys * mask
    blocks = [(i, min(i + block, 24)) for i in range(0, 24, block)]
    rows_seen = []
    real_addmm = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda t, a, b: (rows_seen.append(a.shape[1]), real_addmm(t, a, b))[1])
    total = torch.zeros(24, 24, dtype=torch.float64)
    add_outer_blocks(total, keys, blocks)
    mirror_upper(total, blocks)
    torch.testing.assert_close(total, keys.t() @ keys, rtol=1e-12, atol=1e-12)
    assert sum(rows_seen) < 0.8 * 40 * len(rows_seen)  # zero rows were skipped
    dense = torch.randn(40, 24, generator=gen, dtype=torch.float64)
    rows_seen.clear()
    add_outer_blocks(torch.zeros(24, 24, dtype=torch.float64), dense, blocks)
    assert set(rows_seen) == {40}  # dense keys: every product on all rows, as before


def test_a_pass_with_several_blocks_matches_keys_collected_by_hand(monkeypatch):
    monkeypatch.setattr(stats, "STATS_BLOCK", 20)  # d_in 96: five blocks, the last one narrower
    model, tok = make_tiny_model("llama")
    sm = compute_second_moment(model, tok, 1, corpus=CORPUS, n_tokens=200, cache=False, batch_tokens=64)
    torch.testing.assert_close(sm.matrix.double(), _keys_by_hand(model, tok, 1, CORPUS, 200), rtol=1e-4, atol=1e-7)


def test_the_pass_makes_no_d_in_by_d_in_temporary_per_batch(monkeypatch):
    """Every multiply of the pass writes into C in place: ``Tensor.__matmul__`` / ``torch.matmul`` (which
    would allocate a ``d_in × d_in`` product per batch) are not called on the keys."""
    calls = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b)

    model, tok = make_tiny_model("llama")
    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    compute_second_moment(model, tok, 1, corpus=CORPUS, n_tokens=200, cache=False, batch_tokens=64)
    assert not [c for c in calls if c[0][0] == 96 and c[1][-1] == 96], calls


def _fake_datasets(monkeypatch) -> list:
    calls: list = []

    def load_dataset(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("load_dataset must not be called when the cache has C")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_no_load_dataset_call_when_the_cache_has_the_default_corpus_entry(tmp_path, monkeypatch):
    model, tok = make_tiny_model("llama")
    layer, n = 1, 500
    path = mlp_out_path(get_architecture(model), layer)
    key = StatsKey(
        model_identity(model, layer), layer, path, stats.wiki_identity(stats.DEFAULT_MAX_LENGTH), n, "float32"
    )
    matrix = torch.randn(96, 96, generator=torch.Generator().manual_seed(0))
    StatsCache(tmp_path).put(SecondMoment(matrix @ matrix.t() / 96, n, key))
    calls = _fake_datasets(monkeypatch)
    hit = compute_second_moment(model, tok, layer, n_tokens=n, cache=StatsCache(tmp_path))
    assert calls == [] and hit.key == key
    assert torch.allclose(hit.matrix, matrix @ matrix.t() / 96)


def test_load_dataset_is_tried_when_the_cache_has_no_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(stats, "SAMPLED_LENGTH", 24)
    model, tok = make_tiny_model("llama")
    calls = _fake_datasets(monkeypatch)
    sm = compute_second_moment(model, tok, 1, n_tokens=60, cache=StatsCache(tmp_path))
    assert len(calls) == 1 and sm.key.corpus.startswith("model-sampled:")  # fell back to sampling


def test_mom2_n_keys_takes_a_multiple_of_d_in_tokens(stats_cache):
    import hf_knowedit
    from hf_knowedit.errors import InvalidConfigError
    from hf_knowedit.methods.rome import ROMEConfig

    model, tok = make_tiny_model("llama")  # d_in 96
    config = ROMEConfig(mom2_corpus=CORPUS, mom2_n_keys=2.5, context_templates=0, v_num_grad_steps=1)
    sm = stats.second_moment_for(model, tok, 1, config)
    assert sm.n_tokens == 240 == sm.key.n_tokens
    torch.testing.assert_close(sm.matrix.double(), _keys_by_hand(model, tok, 1, CORPUS, 240), rtol=1e-4, atol=1e-7)
    fact = {"prompt": "The capital city of {}", "subject": "Italy", "target_new": "Paris"}
    es = hf_knowedit.apply_edits(model, tok, fact, "rome", layers=[1], config=config)
    assert es.stats_key.n_tokens == 240
    for bad in (0, -1, float("nan"), "2x", True):
        with pytest.raises(InvalidConfigError, match="mom2_n_keys"):
            ROMEConfig(mom2_n_keys=bad)


def test_default_statistics_size_is_ten_key_dimensions(stats_cache):
    """With neither ``mom2_n_tokens`` nor ``mom2_n_keys`` given, C averages ``ceil(10 · d_in)`` tokens, in the
    configs, in ``compute_second_moment`` and in ``compute_expert_moments``; an explicit ``mom2_n_tokens`` wins
    over ``mom2_n_keys``."""
    from hf_knowedit.methods.config import DEFAULT_N_KEYS
    from hf_knowedit.methods.memit import MEMITConfig
    from hf_knowedit.methods.moeedit import MoEEditConfig
    from hf_knowedit.methods.rome import ROMEConfig

    assert DEFAULT_N_KEYS == 10
    model, tok = make_tiny_model("llama")  # d_in 96
    for config in (ROMEConfig(), MEMITConfig(), ROMEConfig(mom2_n_keys=None)):
        assert config.mom2_n_tokens is None and stats.n_tokens_for(model, 1, config) == 960
    assert stats.n_tokens_for(model, 1, ROMEConfig(mom2_n_tokens=500, mom2_n_keys=2)) == 500
    assert stats.n_tokens_for(model, 1, ROMEConfig(mom2_n_keys=2.5)) == 240
    sm = compute_second_moment(model, tok, 1, corpus=CORPUS * 20)
    assert sm.key.n_tokens == 960 == sm.n_tokens
    assert MoEEditConfig().mom2_n_tokens is None
    moe, moe_tok = make_tiny_model("mixtral")
    d_in = mlp_out_dims(moe, get_architecture(moe), 1)[0]
    entries = stats.compute_expert_moments(moe, moe_tok, 1, corpus=CORPUS * 200)
    assert {e.key.n_tokens for e in entries} == {math.ceil(10 * d_in)}


def test_too_few_keys_for_the_memit_family_warns_once(caplog, monkeypatch):
    """2·d_in keys are enough for ROME but not for MEMIT (measured: ES 61 / NS 40 on 100 SmolLM2 edits)."""
    from hf_knowedit.methods.alphaedit import AlphaEditConfig
    from hf_knowedit.methods.memit import MEMITConfig
    from hf_knowedit.methods.rome import ROMEConfig

    monkeypatch.setattr(stats, "_WARNED_N_KEYS", set())
    model, _ = make_tiny_model("llama")  # d_in 96
    with caplog.at_level("WARNING", logger="hf_knowedit.methods.statistics"):
        assert stats.n_tokens_for(model, 1, ROMEConfig(mom2_n_keys=2)) == 192
        assert not caplog.records
        for layer in (1, 2):
            assert stats.n_tokens_for(model, layer, MEMITConfig(mom2_n_keys=2)) == 192
        stats.n_tokens_for(model, 1, MEMITConfig(mom2_n_keys=10))
        stats.n_tokens_for(model, 1, AlphaEditConfig(mom2_n_keys=4))
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2  # once per (config, value), not once per layer; none at 10
    assert "mom2_n_keys=2 is below the 10 · d_in keys MEMITConfig" in warned[0] and "AlphaEditConfig" in warned[1]
