"""The loopback Hub (tests/hub_server.py) against the real, unmodified huggingface_hub and transformers clients."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    create_repo,
    hf_hub_download,
    snapshot_download,
    upload_folder,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.numpy import load_file, save_file

from tests.hub_fixtures import HUB_UPLOAD_MODES, hub, offline  # noqa: F401  (hub is a fixture)

LFS_BATCH = "/info/lfs/objects/batch"


def _make_folder(root: Path, version: int = 1) -> Path:
    """A small model-like folder: weights (.safetensors), config, README with YAML metadata, a nested file."""
    root.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.full((4, 4), version, dtype=np.float32)}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"version": version, "hidden_size": 8}))
    (root / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- test\n---\n# Tiny\n")
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "notes.txt").write_text(f"notes v{version}\n")
    return root


def _used(hub, fragment: str, method: str | None = None) -> bool:
    return any(fragment in path and (method is None or m == method) for m, path in hub.requests)


def test_create_repo_and_exist_ok(hub):
    api = HfApi()
    url = api.create_repo("tiny")
    assert url.repo_id == f"{hub.user}/tiny" and url.startswith(hub.url)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("tiny")
    assert err.value.response.status_code == 409
    assert create_repo("tiny", exist_ok=True).repo_id == url.repo_id  # module-level function, same server
    assert api.repo_exists(url.repo_id) and not api.repo_exists(f"{hub.user}/nope")
    assert api.whoami()["name"] == hub.user
    assert api.list_repo_files(url.repo_id) == [".gitattributes"]  # the Hub's initial commit
    api.delete_repo(url.repo_id)
    api.delete_repo(url.repo_id, missing_ok=True)
    assert not api.repo_exists(url.repo_id)


@pytest.mark.parametrize("hub", HUB_UPLOAD_MODES, indirect=True)
def test_upload_folder_round_trip(hub, tmp_path):
    api = HfApi()
    repo_id = api.create_repo("roundtrip").repo_id
    folder = _make_folder(tmp_path / "src")
    info = upload_folder(repo_id=repo_id, folder_path=folder, commit_message="add model")

    # Which protocol carried the weights.
    assert _used(hub, LFS_BATCH, "POST") == (hub.lfs_mode == "auto")
    assert _used(hub, "/lfs/objects/", "PUT") == (hub.lfs_mode == "auto")
    assert not _used(hub, "xet-")
    tree = {f.path: f for f in api.list_repo_tree(repo_id, recursive=True) if hasattr(f, "size")}
    assert (tree["model.safetensors"].lfs is not None) == (hub.lfs_mode == "auto")
    assert tree["config.json"].lfs is None
    assert sorted(tree) == [".gitattributes", "README.md", "config.json", "model.safetensors", "sub/notes.txt"]

    # Pull it back through snapshot_download (repo_info -> tree -> HEAD/GET per file).
    local = Path(snapshot_download(repo_id))
    assert local.name == info.oid
    for name in ("config.json", "README.md", "sub/notes.txt", "model.safetensors"):
        assert (local / name).read_bytes() == (folder / name).read_bytes()
    assert load_file(str(local / "model.safetensors"))["w"][0, 0] == 1

    # Unchanged files are recognised from the preupload oids: no new commit.
    again = upload_folder(repo_id=repo_id, folder_path=folder)
    assert again.oid == info.oid == api.model_info(repo_id).sha

    siblings = {s.rfilename: s for s in api.model_info(repo_id, files_metadata=True).siblings}
    assert siblings["model.safetensors"].size == (folder / "model.safetensors").stat().st_size
    assert (siblings["model.safetensors"].lfs is not None) == (hub.lfs_mode == "auto")


def test_snapshot_by_branch_tag_and_commit_sha(hub, tmp_path):
    api = HfApi()
    repo_id = api.create_repo("versions").repo_id
    v1 = upload_folder(repo_id=repo_id, folder_path=_make_folder(tmp_path / "v1", 1), commit_message="v1")
    api.create_tag(repo_id, tag="v1.0", revision=v1.oid)
    v2 = api.upload_file(path_or_fileobj=b'{"version": 2}', path_in_repo="config.json", repo_id=repo_id)

    refs = api.list_repo_refs(repo_id)
    assert {t.name: t.target_commit for t in refs.tags} == {"v1.0": v1.oid}
    assert {b.name: b.target_commit for b in refs.branches} == {"main": v2.oid}
    assert [c.commit_id for c in api.list_repo_commits(repo_id)][:2] == [v2.oid, v1.oid]

    def version(revision):
        return json.loads((Path(snapshot_download(repo_id, revision=revision)) / "config.json").read_text())["version"]

    assert version("main") == 2
    assert version("v1.0") == 1
    assert version(v1.oid) == 1  # a 40-hex sha: no repo_info call, tree listed at the sha
    assert version(refs.branches[0].target_commit) == 2

    # Deletions and the parentCommit check of the commit endpoint.
    api.create_commit(repo_id, [CommitOperationDelete("sub/")], commit_message="rm sub", parent_commit=v2.oid)
    assert "sub/notes.txt" not in api.list_repo_files(repo_id)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(repo_id, [CommitOperationAdd("x.txt", b"x")], commit_message="stale", parent_commit=v1.oid)
    assert err.value.response.status_code == 412


def test_branch_upload_and_download(hub, tmp_path):
    api = HfApi()
    repo_id = api.create_repo("branchy").repo_id
    branch = "edits/rome"  # a slash: URL-quoted as one path segment by the client
    api.create_branch(repo_id, branch=branch)
    api.create_branch(repo_id, branch=branch, exist_ok=True)
    upload_folder(repo_id=repo_id, folder_path=_make_folder(tmp_path / "b", 3), revision=branch)

    assert "config.json" in api.list_repo_files(repo_id, revision=branch)
    assert api.list_repo_files(repo_id) == [".gitattributes"]  # main untouched
    local = Path(snapshot_download(repo_id, revision=branch))
    assert json.loads((local / "config.json").read_text())["version"] == 3
    path = hf_hub_download(repo_id, "sub/notes.txt", revision=branch)
    assert Path(path).read_text() == "notes v3\n"
    paths = {p.path for p in api.get_paths_info(repo_id, ["config.json", "sub", "missing"], revision=branch)}
    assert paths == {"config.json", "sub"}
    api.delete_branch(repo_id, branch=branch)
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(repo_id, revision=branch)


def test_download_then_offline_from_cache(hub, tmp_path):
    api = HfApi()
    repo_id = api.create_repo("cached").repo_id
    upload_folder(repo_id=repo_id, folder_path=_make_folder(tmp_path / "c"))
    online = hf_hub_download(repo_id, "model.safetensors")
    snapshot = snapshot_download(repo_id)
    assert _used(hub, f"/{repo_id}/resolve/main/model.safetensors", "HEAD")

    hub.stop()  # nothing can be served from now on
    count = len(hub.requests)
    with offline():
        assert hf_hub_download(repo_id, "model.safetensors") == online
        assert snapshot_download(repo_id) == snapshot
    assert len(hub.requests) == count
    assert load_file(online)["w"].shape == (4, 4)


def test_typed_errors(hub, tmp_path):
    api = HfApi()
    repo_id = api.create_repo("errors").repo_id
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo_id)

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{hub.user}/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{hub.user}/missing")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(repo_id, revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.json")
    # The non-existence is cached under .no_exist/<sha>/ thanks to X-Repo-Commit on the 404.
    storage = Path(os.environ["HF_HUB_CACHE"]) / f"models--{hub.user}--errors"
    assert list(storage.glob(".no_exist/*/missing.json"))
    assert not api.file_exists(repo_id, "missing.json") and api.file_exists(repo_id, "config.json")
    with pytest.raises(EntryNotFoundError):
        api.delete_file("missing.json", repo_id)


def test_list_files_model_info_and_dataset_repo(hub):
    api = HfApi()
    repo_id = api.create_repo("listing").repo_id
    commit = api.upload_file(path_or_fileobj=b"a", path_in_repo="a/b/c.txt", repo_id=repo_id)
    assert api.list_repo_files(repo_id) == [".gitattributes", "a/b/c.txt"]
    assert api.model_info(repo_id).sha == commit.oid
    assert api.model_info(repo_id, revision=commit.oid).sha == commit.oid
    top = {(type(e).__name__, e.path) for e in api.list_repo_tree(repo_id)}
    assert top == {("RepoFile", ".gitattributes"), ("RepoFolder", "a")}
    assert [e.path for e in api.list_repo_tree(repo_id, path_in_repo="a/b")] == ["a/b/c.txt"]

    ds = api.create_repo("table", repo_type="dataset").repo_id
    api.upload_file(path_or_fileobj=b"x,y\n1,2\n", path_in_repo="data.csv", repo_id=ds, repo_type="dataset")
    assert api.dataset_info(ds).sha == api.list_repo_refs(ds, repo_type="dataset").branches[0].target_commit
    local = Path(snapshot_download(ds, repo_type="dataset"))
    assert (local / "data.csv").read_text() == "x,y\n1,2\n"


def test_transformers_autoconfig_from_branch(hub):
    from transformers import AutoConfig, GPT2Config

    api = HfApi()
    repo_id = api.create_repo("tiny-gpt2").repo_id
    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    config.push_to_hub(repo_id, revision="knowedit")  # transformers creates the branch, then commits

    loaded = AutoConfig.from_pretrained(repo_id, revision="knowedit")
    assert (loaded.model_type, loaded.n_embd, loaded.vocab_size) == ("gpt2", 8, 64)
    assert "config.json" not in api.list_repo_files(repo_id)  # only on the branch
    # transformers resolves the branch to its sha with repo_info, then fetches the file at that sha.
    sha = api.model_info(repo_id, revision="knowedit").sha
    assert _used(hub, f"/api/models/{repo_id}/revision/knowedit", "GET")
    assert _used(hub, f"/{repo_id}/resolve/{sha}/config.json", "GET")
