"""Second-moment statistics: the value, the keyed cache (hits, misses, mismatches), the solve."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors import safe_open

from hf_knowedit.architectures import get_architecture, get_module, mlp_out_path
from hf_knowedit.errors import InvalidConfigError, LayerOutOfRangeError, StatisticsMismatchError
from hf_knowedit.hooks import Trace
from hf_knowedit.methods.statistics import compute_second_moment, model_identity
from hf_knowedit.moments import TENSOR_NAME, SecondMoment, StatsCache, StatsKey, identity_moment
from tests.tiny_models import _CORPUS, make_tiny_model

CORPUS = [line for line in _CORPUS.splitlines() if line.strip()]


pytestmark = pytest.mark.usefixtures("one_thread")  # ~50x faster than two busy threads here


def _keys_by_hand(model, tok, layer, texts, n):
    """The first ``n`` keys of the corpus, one text at a time (no batching, no padding)."""
    path = mlp_out_path(get_architecture(model), layer)
    rows = []
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad(), Trace(model, path, retain_input=True, retain_output=False) as tr:
            model(input_ids=ids)
        rows.append(tr.input.reshape(-1, tr.input.shape[-1]))
    keys = torch.cat(rows)[:n].double()
    return keys.t() @ keys / keys.shape[0]


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "opt"])
def test_matches_keys_collected_by_hand(model_type, tmp_path):
    model, tok = make_tiny_model(model_type)
    sm = compute_second_moment(model, tok, 1, corpus=CORPUS, n_tokens=200, cache=StatsCache(tmp_path), batch_tokens=64)
    assert sm.n_tokens == 200 and sm.matrix.dtype == torch.float32
    torch.testing.assert_close(sm.matrix.double(), _keys_by_hand(model, tok, 1, CORPUS, 200), rtol=1e-4, atol=1e-7)
    assert sm.key.layer == 1 and sm.key.module.endswith(get_architecture(model).mlp_out)
    assert sm.key.corpus.startswith("texts:") and sm.key.model.startswith("weights:")


def test_cache_hit_never_recomputes_and_changed_key_never_reuses(tmp_path):
    cache = StatsCache(tmp_path)
    model, tok = make_tiny_model("llama")
    first = compute_second_moment(model, tok, 1, corpus=CORPUS, n_tokens=150, cache=cache)
    assert cache.path(first.key).exists() and len(list(tmp_path.iterdir())) == 1

    fresh, _ = make_tiny_model("llama")  # same weights, new object: only the disk cache can answer
    module = get_module(fresh, mlp_out_path(get_architecture(fresh), 1))
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    hit = compute_second_moment(fresh, tok, 1, corpus=CORPUS, n_tokens=150, cache=cache)
    assert calls == [] and torch.equal(hit.matrix, first.matrix) and hit.key == first.key
    assert compute_second_moment(fresh, tok, 1, corpus=CORPUS, n_tokens=150, cache=cache) is hit  # in memory

    misses = [
        dict(corpus=CORPUS, n_tokens=151),
        dict(corpus=CORPUS[:-1], n_tokens=150),
        dict(corpus=CORPUS, n_tokens=150, dtype=torch.float64),
        dict(corpus=CORPUS, n_tokens=150, max_length=16),
    ]
    for kwargs in misses:
        calls.clear()
        entry = compute_second_moment(fresh, tok, 1, cache=cache, **kwargs)
        assert calls and entry.key != first.key
    calls.clear()
    other_layer = compute_second_moment(fresh, tok, 2, corpus=CORPUS, n_tokens=150, cache=cache)
    assert other_layer.key.layer == 2 and other_layer.key.module != first.key.module
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 + len(misses) + 1

    with torch.no_grad():  # other weights feeding layer 1: another model identity, recomputed
        get_module(fresh, "model.layers.0.mlp.up_proj").weight.add_(0.01)
    changed = compute_second_moment(fresh, tok, 1, corpus=CORPUS, n_tokens=150, cache=cache)
    assert changed.key.model != first.key.model and not torch.equal(changed.matrix, first.matrix)


def test_statistics_ignore_active_edits(tmp_path):
    import hf_knowedit
    from hf_knowedit.deltas import ModuleDelta

    model, tok = make_tiny_model("llama")
    before = compute_second_moment(model, tok, 2, corpus=CORPUS, n_tokens=100, cache=False)
    identity = model_identity(model, 2)
    path = mlp_out_path(get_architecture(model), 1)
    es = hf_knowedit.EditSet(
        deltas={path: ModuleDelta(torch.randn(1, 96), torch.randn(32, 1))}, requests=[], method="test"
    )
    hf_knowedit.stack.push_edit_set(model, es)
    assert model_identity(model, 2) == identity  # fingerprint of the base weights
    get_state = hf_knowedit.stack.get_state
    get_state(model).history.clear()  # force a recomputation
    after = compute_second_moment(model, tok, 2, corpus=CORPUS, n_tokens=100, cache=False)
    torch.testing.assert_close(after.matrix, before.matrix)
    hf_knowedit.revert_edits(model)


def test_file_format_and_mismatch(tmp_path):
    model, tok = make_tiny_model("gpt2")
    cache = StatsCache(tmp_path)
    l1 = compute_second_moment(model, tok, 1, corpus=CORPUS, n_tokens=100, cache=cache)
    l2 = compute_second_moment(model, tok, 2, corpus=CORPUS, n_tokens=100, cache=cache)
    with safe_open(str(cache.path(l1.key)), framework="pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == [TENSOR_NAME]
    assert meta["format"] == "hf_knowedit.second_moment" and meta["layer"] == "1"
    assert {"model", "layer", "module", "corpus", "n_tokens", "dtype", "n_tokens_used", "d_in"} <= set(meta)
    assert StatsKey.from_metadata(meta) == l1.key

    with pytest.raises(StatisticsMismatchError, match="layer"):
        SecondMoment.load(cache.path(l2.key), expected=l1.key)
    other_model, _ = make_tiny_model("gpt2", seed=1)
    other_key = compute_second_moment(other_model, tok, 1, corpus=CORPUS, n_tokens=100, cache=False).key
    with pytest.raises(StatisticsMismatchError, match="model"):
        SecondMoment.load(cache.path(l1.key), expected=other_key)
    # a file under this key's name but written for another layer: refused, never used
    cache.path(l1.key).write_bytes(cache.path(l2.key).read_bytes())
    fresh, _ = make_tiny_model("gpt2")
    with pytest.raises(StatisticsMismatchError):
        compute_second_moment(fresh, tok, 1, corpus=CORPUS, n_tokens=100, cache=cache)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StatisticsMismatchError):
        SecondMoment.load(tmp_path / "junk.safetensors")

    loaded = SecondMoment.load(l2.save(tmp_path / "copy" / "entry.safetensors"), expected=l2.key)
    assert torch.equal(loaded.matrix, l2.matrix) and loaded.n_tokens == l2.n_tokens


def test_solve_uses_cached_factor_and_identity():
    torch.manual_seed(0)
    x = torch.randn(50, 8, dtype=torch.float64)
    key = StatsKey("m", 0, "mod", "texts", 50, "float64")
    sm = SecondMoment(x.t() @ x / 50, 50, key)
    rhs = torch.randn(8, 3)
    sol = sm.solve(rhs)
    assert sol.dtype == torch.float32
    torch.testing.assert_close(sm.matrix.float() @ sol, rhs, rtol=1e-4, atol=1e-4)
    factor = sm.cholesky()
    sm.solve(rhs[:, 0])
    assert sm.cholesky() is factor  # factorised once
    with pytest.raises(InvalidConfigError):
        sm.solve(torch.randn(7))

    model, _ = make_tiny_model("llama")
    eye = identity_moment(model, 1)
    assert eye.is_identity and eye.key.corpus == "identity" and eye.matrix.shape == (96, 96)
    v = torch.randn(96)
    assert torch.equal(eye.solve(v), v)


def test_singular_moment_is_regularised(caplog):
    x = torch.randn(3, 8, dtype=torch.float64)  # rank 3 < 8
    sm = SecondMoment(x.t() @ x / 3, 3, StatsKey("m", 0, "mod", "texts", 3, "float64"))
    with caplog.at_level(logging.WARNING, logger="hf_knowedit.methods.statistics"):
        out = sm.solve(torch.randn(8, dtype=torch.float64))
    assert torch.isfinite(out).all() and "singular" in caplog.text


def test_default_corpus_is_sampled_from_the_model_and_labelled(tmp_path, caplog, monkeypatch):
    import hf_knowedit.methods.statistics as stats

    monkeypatch.setattr(stats, "SAMPLED_LENGTH", 24)  # short samples keep the test fast
    model, tok = make_tiny_model("llama")
    with caplog.at_level(logging.WARNING, logger="hf_knowedit.methods.statistics"):
        sm = compute_second_moment(model, tok, 0, n_tokens=120, cache=StatsCache(tmp_path))
    assert sm.key.corpus.startswith("model-sampled:seed=0;length=24") and "sampling" in caplog.text
    assert len(list(tmp_path.glob("corpus--*.json"))) == 1  # the sampled texts are cached too
    assert sm.n_tokens == 120 and torch.isfinite(sm.matrix).all()
    again, _ = make_tiny_model("llama")
    assert torch.equal(compute_second_moment(again, tok, 0, n_tokens=120, cache=False).matrix, sm.matrix)  # seeded


def test_bad_arguments():
    model, tok = make_tiny_model("llama")
    with pytest.raises(LayerOutOfRangeError):
        compute_second_moment(model, tok, 4, corpus=CORPUS, cache=False)
    for kwargs in (
        dict(n_tokens=0),
        dict(dtype=torch.float16),
        dict(batch_tokens=0),
        dict(corpus="one string"),
        dict(corpus=[]),
    ):
        with pytest.raises(InvalidConfigError):
            compute_second_moment(model, tok, 1, cache=False, **({"corpus": CORPUS} | kwargs))


def test_batches_take_the_first_tokens_in_order_and_group_rows_by_length():
    from hf_knowedit.methods.statistics import _batches

    _, tok = make_tiny_model("llama")
    texts = [" ".join(["word"] * n) for n in (1, 40, 2, 38) * 8]
    ids = [tok(t)["input_ids"] for t in texts]
    n_tokens = sum(len(x) for x in ids) - 5  # the last text is cut short by 5 tokens
    batches = list(_batches(tok, texts, 128, 170, n_tokens))
    rows = [row for batch in batches for row in batch]
    expected = ids[:-1] + [ids[-1][:-5]]
    assert sorted(map(tuple, rows)) == sorted(map(tuple, expected))  # the same tokens, nothing more
    assert all(len(b) * max(map(len, b)) <= 170 for b in batches)
    padded = sum(len(b) * max(map(len, b)) for b in batches)
    assert padded < 1.25 * n_tokens  # length grouping; text order would pad about 2x here


def test_the_sampled_corpus_grows_and_its_texts_never_depend_on_the_count_asked(tmp_path, monkeypatch):
    """One corpus per model and seed: a larger token count extends what is there (only the missing blocks
    are sampled, the file on disk is reused), and text ``i`` is the same whether sampled at once or later."""
    import hf_knowedit.methods.statistics as stats

    monkeypatch.setattr(stats, "SAMPLED_LENGTH", 12)
    calls = []
    real = stats.generate_texts

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(stats, "generate_texts", counting)
    block = stats.SAMPLED_BLOCK
    model, tok = make_tiny_model("llama")
    small = stats.sampled_corpus(model, tok, 100, length=12, directory=tmp_path)
    assert calls == [block] and len(small) == math.ceil(1.1 * 100 / 12)
    large = stats.sampled_corpus(model, tok, 12 * block, length=12, directory=tmp_path)  # 1.1x: two blocks
    assert calls == [block, block] and large[: len(small)] == small
    again = stats.sampled_corpus(model, tok, 50, length=12, directory=tmp_path)
    assert calls == [block, block] and again == small[: len(again)]  # from memory, nothing sampled

    fresh, tok2 = make_tiny_model("llama")  # same weights, new state: read from the file
    assert stats.sampled_corpus(fresh, tok2, 12 * block, length=12, directory=tmp_path) == large
    assert calls == [block, block]
    at_once, tok3 = make_tiny_model("llama")  # no file: both blocks sampled in one go give the same texts
    assert stats.sampled_corpus(at_once, tok3, 12 * block, length=12) == large
    assert calls[-1] == 2 * block


def test_sampling_batches_hold_as_many_whole_blocks_as_the_kv_budget_allows(monkeypatch):
    """Sampling batches whole blocks, as many as fit in ``SAMPLED_KV_BYTES`` of KV cache (the model's own
    layers, KV width and dtype), never less than one block; ``sampled_corpus`` generates with that batch."""
    import hf_knowedit.methods.statistics as stats
    from hf_knowedit.methods.memory import kv_cache_bytes

    model, tok = make_tiny_model("llama")
    block = stats.SAMPLED_BLOCK
    per_block = kv_cache_bytes(model, block * (12 + 8))
    cfg = model.config
    assert per_block == 2 * cfg.num_hidden_layers * block * 20 * cfg.num_key_value_heads * cfg.head_dim * 4
    for budget, blocks in ((1, 1), (per_block, 1), (3 * per_block + 1, 3)):
        monkeypatch.setattr(stats, "SAMPLED_KV_BYTES", budget)
        assert stats.sampling_batch(model, 12) == blocks * block
    seen = []
    real = stats.generate_texts
    monkeypatch.setattr(stats, "generate_texts", lambda *a, **k: seen.append(k["batch_size"]) or real(*a, **k))
    stats.sampled_corpus(model, tok, 12 * block, length=12)
    assert seen == [3 * block]


def test_sampled_corpora_of_two_seeds_differ_and_so_do_texts_sharing_a_start():
    """Each text is sampled, not decoded greedily: texts with the same start differ, and so do seeds (a seed
    once shifted past the generator's 32 bits gave every seed the same corpus)."""
    import hf_knowedit.methods.statistics as stats

    model, tok = make_tiny_model("llama")
    zero = stats.sampled_corpus(model, tok, 300, seed=0, length=12)
    one = stats.sampled_corpus(model, tok, 300, seed=1, length=12)
    n = len(stats.SAMPLED_STARTS)
    assert zero[0] != zero[n] and zero[0].startswith("The") and zero[n].startswith("The")
    assert all(a != b for a, b in zip(zero, one))
