"""Edit sets and statistics on a real (loopback) Hub, through the unmodified huggingface_hub,
peft and transformers clients: push, pull by branch / tag / commit sha, offline reuse from
the cache, both upload paths, typed errors, and no token on disk."""

import logging
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

import hf_knowedit
from hf_knowedit.editset import EditSet
from hf_knowedit.moments import STATS_FOLDER, pull_statistics, push_statistics
from tests.helpers import assert_untouched, logits, snapshot
from tests.hub_fixtures import HUB_UPLOAD_MODES, offline
from tests.test_adapters import edited
from tests.test_stack import random_set
from tests.tiny_models import assert_same, make_tiny_model, weights

LFS_BATCH = "/info/lfs/objects/batch"
SECRET = "hf_knowedit_test_secret_token_5f3a"


def _used(hub, fragment, method=None):
    return any(fragment in path and (method is None or m == method) for m, path in hub.requests)


def _same_deltas(a: EditSet, b: EditSet) -> bool:
    return a.deltas.keys() == b.deltas.keys() and all(
        torch.equal(a.deltas[p].A, b.deltas[p].A) and torch.equal(a.deltas[p].B, b.deltas[p].B) for p in a.deltas
    )


@pytest.mark.parametrize("hub", HUB_UPLOAD_MODES, indirect=True)
def test_push_then_pull_by_branch_tag_and_sha(hub):
    model, tok = make_tiny_model("gpt2")
    v1, v2, v3 = (random_set(model, layers, seed=s) for s, layers in ((1, [1]), (2, [1, 2]), (3, [3])))
    api = HfApi()
    commit1 = v1.push_to_hub("angola-edit", commit_message="first edit")
    repo_id = f"{hub.user}/angola-edit"
    assert commit1.repo_url.repo_id == repo_id
    # which protocol carried adapter_model.safetensors
    assert _used(hub, LFS_BATCH, "POST") == (hub.lfs_mode == "auto")
    assert not _used(hub, "xet-")
    files = {f.path: f for f in api.list_repo_tree(repo_id)}
    assert set(files) >= {"adapter_model.safetensors", "adapter_config.json", "knowedit_config.json", "README.md"}
    assert "config.json" not in files and (files["adapter_model.safetensors"].lfs is not None) == (
        hub.lfs_mode == "auto"
    )
    assert "model.load_edits('angola-edit')" in ModelCard.load(repo_id).text  # the card names the repo

    api.create_tag(repo_id, tag="v1", revision=commit1.oid)
    v2.push_to_hub(repo_id)
    api.create_branch(repo_id, branch="edits/other")
    v3.push_to_hub(repo_id, branch="edits/other")

    assert _same_deltas(EditSet.from_pretrained(repo_id), v2)
    assert _same_deltas(EditSet.from_pretrained(repo_id, revision="v1"), v1)
    assert _same_deltas(EditSet.from_pretrained(repo_id, revision=commit1.oid), v1)
    assert _same_deltas(EditSet.from_pretrained(repo_id, revision="edits/other"), v3)
    # all files of one load come from the commit the first one resolved to
    assert _used(hub, f"/{repo_id}/resolve/{commit1.oid}/adapter_model.safetensors")


def test_load_from_hub_into_a_fresh_model_then_offline_from_cache(hub, tmp_path):
    model, tok, es = edited("llama", dense_layer=2)
    w_edit, edited_logits = weights(model), logits(model, tok)
    model.revert_edits()
    w0 = weights(model)
    es.push_to_hub("llama-edit")
    repo_id = f"{hub.user}/llama-edit"

    fresh, _ = make_tiny_model("llama")
    hf_knowedit.attach(fresh, tok)
    loaded = fresh.load_edits(repo_id)
    assert loaded.name == es.name and len(loaded) == 2
    assert_same(weights(fresh), w_edit)
    fresh.unmerge_edits()
    assert_same(weights(fresh), w0)
    torch.testing.assert_close(logits(fresh, tok), edited_logits, atol=1e-5, rtol=1e-5)
    fresh.revert_edits()
    assert_same(weights(fresh), w0)

    hub.stop()
    count = len(hub.requests)
    with offline():
        again = EditSet.from_pretrained(repo_id)
        fresh.load_edits(repo_id, name="offline")
    assert len(hub.requests) == count and _same_deltas(again, es)
    assert_same(weights(fresh), w_edit)
    fresh.revert_edits()
    # a cache_dir of one's own works too (and is empty offline: huggingface_hub's own error)
    with offline(), pytest.raises(EntryNotFoundError):
        EditSet.from_pretrained(repo_id, cache_dir=tmp_path / "elsewhere")


def test_peft_and_transformers_load_straight_from_the_hub(hub):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, tok = make_tiny_model("gpt2")
    base.push_to_hub("tiny-gpt2")  # so that base_model_name_or_path resolves on this Hub
    model, tok, es = edited("gpt2")
    ours = logits(model, tok)
    model.revert_edits()
    es.base_model = f"{hub.user}/tiny-gpt2"
    es.push_to_hub("gpt2-edit")
    repo_id = f"{hub.user}/gpt2-edit"
    assert ModelCard.load(repo_id).data.base_model == f"{hub.user}/tiny-gpt2"

    peft_model = PeftModel.from_pretrained(make_tiny_model("gpt2")[0], repo_id)
    torch.testing.assert_close(logits(peft_model, tok), ours, atol=1e-5, rtol=1e-5)
    auto = AutoModelForCausalLM.from_pretrained(repo_id)  # reads adapter_config.json, loads the base from the Hub
    torch.testing.assert_close(logits(auto, tok), ours, atol=1e-5, rtol=1e-5)


def test_missing_repo_revision_and_file_are_huggingface_hub_errors(hub):
    model, tok = make_tiny_model("llama")
    hf_knowedit.attach(model, tok)
    before = snapshot(model)
    es = random_set(model, [1])
    es.push_to_hub("errs")
    repo_id = f"{hub.user}/errs"
    with pytest.raises(RepositoryNotFoundError):
        model.load_edits(f"{hub.user}/no-such-repo")
    with pytest.raises(RevisionNotFoundError):
        model.load_edits(repo_id, revision="no-such-branch")
    HfApi().delete_file("adapter_model.safetensors", repo_id)
    with pytest.raises(EntryNotFoundError):
        model.load_edits(repo_id)
    HfApi().delete_file("knowedit_config.json", repo_id)
    with pytest.raises(EntryNotFoundError):
        EditSet.from_pretrained(repo_id)
    assert_untouched(model, before)


def test_token_is_never_written(hub, tmp_path, caplog):
    model, tok, es = edited("gpt2")
    model.revert_edits()
    with caplog.at_level(logging.DEBUG):
        es.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="secret-edit", token=SECRET)
        EditSet.from_pretrained(f"{hub.user}/secret-edit", token=SECRET)
        model.load_edits(f"{hub.user}/secret-edit", token=SECRET, force_download=True)
        model.revert_edits()
    assert SECRET not in caplog.text
    assert _used(hub, f"/{hub.user}/secret-edit/resolve/")
    written = [p for root in (tmp_path, Path(os.environ["HF_HUB_CACHE"])) for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "adapter_model.safetensors" for p in written) and len(written) > 8
    for p in written:
        assert SECRET.encode() not in p.read_bytes(), p
    for blob in hub.store.blobs.values():  # nothing uploaded carries it either
        assert SECRET.encode() not in blob


@pytest.mark.parametrize("hub", HUB_UPLOAD_MODES, indirect=True)
def test_statistics_push_and_pull(hub, tmp_path):
    from hf_knowedit.errors import StatisticsMismatchError
    from hf_knowedit.moments import SecondMoment, StatsCache, StatsKey

    key = StatsKey(
        model="tiny@abc", layer=2, module="model.layers.2.mlp.down_proj", corpus="test", n_tokens=100, dtype="float32"
    )
    x = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
    entry = SecondMoment(x.t() @ x / 100, 100, key)
    commit = push_statistics(entry, "stats")
    repo_id = f"{hub.user}/stats"
    assert f"{STATS_FOLDER}/{key.filename()}" in HfApi().list_repo_files(repo_id)

    cache = StatsCache(tmp_path / "stats")
    pulled = pull_statistics(repo_id, key, stats_cache=cache)
    assert torch.equal(pulled.matrix, entry.matrix) and pulled.key == key and pulled.n_tokens == 100
    assert key in cache and torch.equal(cache.get(key).matrix, entry.matrix)
    by_name = pull_statistics(repo_id, key.filename(), revision=commit.oid)
    assert torch.equal(by_name.matrix, entry.matrix)

    # a file pushed from disk; a file that is not statistics is refused before anything is sent
    other = SecondMoment(torch.eye(8), 5, StatsKey("tiny@abc", 3, "m", "test", 5, "float32"))
    push_statistics(other.save(tmp_path / "x.safetensors"), repo_id)
    assert torch.equal(pull_statistics(repo_id, other.key).matrix, torch.eye(8))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(StatisticsMismatchError):
        push_statistics(tmp_path / "junk.safetensors", repo_id)
    with pytest.raises(EntryNotFoundError):
        pull_statistics(repo_id, StatsKey("tiny@abc", 9, "m", "test", 5, "float32"))


class _Bomb:
    """Unpickling this would create a marker file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_only_json_and_safetensors_are_fetched(hub, tmp_path):
    import pickle

    model, tok = make_tiny_model("llama")
    hf_knowedit.attach(model, tok)
    random_set(model, [1]).push_to_hub("booby")
    repo_id = f"{hub.user}/booby"
    marker = tmp_path / "pwned"
    api = HfApi()
    api.upload_file(path_or_fileobj=pickle.dumps(_Bomb(marker)), path_in_repo="adapter_model.bin", repo_id=repo_id)
    api.upload_file(
        path_or_fileobj=f"open({str(marker)!r}, 'w')".encode(), path_in_repo="modeling_evil.py", repo_id=repo_id
    )
    model.load_edits(repo_id)
    model.revert_edits()
    fetched = {path.rsplit("/", 1)[-1] for m, path in hub.requests if "/resolve/" in path}
    assert fetched == {"adapter_config.json", "knowedit_config.json", "adapter_model.safetensors"}
    assert not marker.exists()
