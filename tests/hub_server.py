"""A loopback fake of the Hugging Face Hub HTTP API, for tests.

`HubServer` speaks enough of the Hub protocol (as used by `huggingface_hub` 2.4.0) for the *unmodified*
client to push and pull repos: repo management, refs (branches, tags, 40-hex commit shas), preupload, the
legacy LFS batch/basic upload, ndjson commits, repo info / tree / paths-info / commits listings and
`HEAD`/`GET .../resolve/{rev}/{path}` downloads with the metadata headers the client needs.

Xet is deliberately not implemented: `xet-write-token` answers 501. Use `lfs_mode="never"` (every file is
uploaded inline as a regular file) when the client has Xet enabled, or disable Xet in the client
(`HF_HUB_DISABLE_XET`) to exercise the LFS path with `lfs_mode="auto"`.

Everything is kept in memory, standard library only. Authorization headers are accepted and ignored;
every request is made as the user `HubServer.user`.

    with HubServer(lfs_mode="auto") as server:
        HfApi(endpoint=server.url, token="hf_dummy").create_repo("my-model")
        assert ("POST", "/api/repos/create") in server.requests
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote

USER = "testuser"
LFS_THRESHOLD = 10 * 1024 * 1024  # files above this size are LFS-tracked in lfs_mode="auto"
# Suffixes the Hub's default .gitattributes tracks with LFS (subset).
LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".pkl",
    ".npy",
    ".npz",
    ".gguf",
    ".zip",
    ".tar.gz",
    ".arrow",
    ".parquet",
)
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubError(Exception):
    """An HTTP error typed the Hub way (`X-Error-Code` header), raised by the storage and the handler."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass(frozen=True)
class Blob:
    """One version of a file. Its bytes live in `HubStore.blobs[sha256]`."""

    size: int
    sha256: str
    git_oid: str  # git blob sha1 of the content (regular file) or of the LFS pointer (LFS file)
    lfs: bool

    @property
    def etag(self) -> str:
        """What the Hub sends as ETag, and what the client compares with its local oid."""
        return self.sha256 if self.lfs else self.git_oid

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))

    def entry(self, path: str) -> dict:
        """The `tree` / `paths-info` JSON entry of this file."""
        out = {"type": "file", "oid": self.git_oid, "size": self.size, "path": path}
        if self.lfs:
            out["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return out


@dataclass
class Commit:
    id: str
    parents: list[str]
    title: str
    message: str
    date: str
    files: dict[str, Blob]


@dataclass
class Repo:
    type: str  # "model" | "dataset" | "space"
    id: str  # "ns/name"
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit:
        """Branch name, tag name, `refs/heads/x`, `refs/tags/x` or a commit sha (40 hex or a unique prefix)."""
        for prefix, table in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            name = rev[len(prefix) :] if rev.startswith(prefix) else rev
            if name in table:
                return self.commits[table[name]]
        if re.fullmatch(r"[0-9a-f]{7,40}", rev):
            found = [c for sha, c in self.commits.items() if sha.startswith(rev)]
            if len(found) == 1:
                return found[0]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def history(self, commit: Commit) -> list[Commit]:
        out = [commit]
        while out[-1].parents:
            out.append(self.commits[out[-1].parents[0]])
        return out


class HubStore:
    """In-memory repos and a content-addressed blob store (sha256 -> bytes), shared by all handler threads."""

    def __init__(self, lfs_mode: str = "auto"):
        if lfs_mode not in ("auto", "never", "always"):
            raise ValueError(f"lfs_mode must be 'auto', 'never' or 'always', not {lfs_mode!r}")
        self.lfs_mode = lfs_mode
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self._counter = 0

    # -- blobs --------------------------------------------------------------------------------------------
    def put_blob(self, data: bytes, lfs: bool) -> Blob:
        sha256 = hashlib.sha256(data).hexdigest()
        with self.lock:
            self.blobs[sha256] = data
        git_oid = git_blob_sha1(lfs_pointer(sha256, len(data)) if lfs else data)
        return Blob(size=len(data), sha256=sha256, git_oid=git_oid, lfs=lfs)

    def upload_mode(self, path: str, size: int) -> str:
        """Whether the Hub would ask the client to upload this file as "lfs" or "regular"."""
        if self.lfs_mode == "never" or size == 0:
            return "regular"
        if self.lfs_mode == "always" or size > LFS_THRESHOLD or path.lower().endswith(LFS_SUFFIXES):
            return "lfs"
        return "regular"

    # -- repos and refs -----------------------------------------------------------------------------------
    def get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        """Create a repo whose `main` branch holds an initial commit with `.gitattributes`, like the Hub."""
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}")
            repo = Repo(type=repo_type, id=repo_id, private=private, created_at=_now())
            files = {".gitattributes": self.put_blob(GITATTRIBUTES, lfs=False)}
            repo.branches["main"] = self._new_commit(repo, None, "initial commit", "", files).id
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def _new_commit(self, repo: Repo, parent: str | None, title: str, message: str, files: dict) -> Commit:
        self._counter += 1
        seed = json.dumps(
            [
                repo.id,
                parent,
                title,
                message,
                sorted((p, b.git_oid) for p, b in files.items()),
                self._counter,
                time.time(),
            ]
        )
        commit = Commit(
            hashlib.sha1(seed.encode()).hexdigest(), [parent] if parent else [], title, message, _now(), dict(files)
        )
        repo.commits[commit.id] = commit
        return commit

    def commit(self, repo: Repo, branch: str, lines: list[dict]) -> Commit:
        """Apply an ndjson commit payload (header, file, lfsFile, deletedFile, deletedFolder) to `branch`."""
        with self.lock:
            if branch not in repo.branches:
                repo.resolve(branch)  # 404 RevisionNotFound if it is nothing at all
                raise HubError(400, f"Invalid rev id: {branch} is not a branch")
            head = repo.commits[repo.branches[branch]]
            header = next((x["value"] for x in lines if x.get("key") == "header"), {})
            parent = header.get("parentCommit")
            if parent and parent != head.id:
                raise HubError(412, f"Parent commit {parent} is not the head of {branch} ({head.id})")
            files = dict(head.files)
            for line in lines:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    files[path] = self.put_blob(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    data = self.blobs.get(value["oid"])
                    if data is None:
                        raise HubError(422, f"LFS object {value['oid']} for {path} was never uploaded")
                    pointer = lfs_pointer(value["oid"], len(data))
                    files[path] = Blob(len(data), value["oid"], git_blob_sha1(pointer), lfs=True)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"File not found: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    inside = [p for p in files if p.startswith(path.strip("/") + "/")]
                    if not inside:
                        raise HubError(404, f"Folder not found: {path}", "EntryNotFound")
                    for p in inside:
                        del files[p]
                elif key != "header":
                    raise HubError(400, f"Unknown commit line key: {key!r}")
            commit = self._new_commit(repo, head.id, header.get("summary", ""), header.get("description", ""), files)
            repo.branches[branch] = commit.id
            return commit

    # -- listings -----------------------------------------------------------------------------------------
    @staticmethod
    def tree(commit: Commit, path: str, recursive: bool) -> list[dict]:
        """Files and folders under `path` (directly, or at any depth if `recursive`), Hub `tree` format."""
        base = path.strip("/")
        under = {p: b for p, b in commit.files.items() if not base or p.startswith(base + "/")}
        if base and not under:
            raise HubError(404, f"Path {path} not found in {commit.id}", "EntryNotFound", {"X-Repo-Commit": commit.id})
        folders: set[str] = set()
        out = []
        for p, blob in sorted(under.items()):
            rel = p[len(base) + 1 :] if base else p
            parts = rel.split("/")
            for i in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add("/".join(([base] if base else []) + parts[:i]))
            if recursive or len(parts) == 1:
                out.append(blob.entry(p))
        return [HubStore.folder_entry(commit, f) for f in sorted(folders)] + out

    @staticmethod
    def folder_entry(commit: Commit, folder: str) -> dict:
        inside = sorted((p, b.git_oid) for p, b in commit.files.items() if p.startswith(folder + "/"))
        return {"type": "directory", "oid": hashlib.sha1(repr(inside).encode()).hexdigest(), "size": 0, "path": folder}

    @staticmethod
    def last_commit(repo: Repo, commit: Commit, path: str) -> dict:
        """The most recent commit (from `commit` back) that touched `path`."""
        history = repo.history(commit)
        last = commit
        for older in history[1:]:
            if older.files.get(path) != last.files.get(path):
                break
            last = older
        return {"id": last.id, "title": last.title, "date": last.date}


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections of the client's pool must not block stop()

    def handle_error(self, request, client_address):  # keep the test output clean
        pass


class HubRequestHandler(BaseHTTPRequestHandler):
    """Routes one HTTP request to the store. `self.server.hub` is the owning `HubServer`."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the client pools connections

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr access log
        pass

    def setup(self):
        super().setup()
        self.server.hub._connections.add(self.connection)

    def finish(self):
        self.server.hub._connections.discard(self.connection)
        super().finish()

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # -- plumbing -----------------------------------------------------------------------------------------
    @property
    def store(self) -> HubStore:
        return self.server.hub.store

    @property
    def base_url(self) -> str:
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.server.hub.url

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> dict:
        return json.loads(self.body or b"{}")

    def _send(
        self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "application/json"
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None, content_type: str = "application/json"):
        self._send(status, json.dumps(obj).encode(), headers, content_type)

    def _dispatch(self, method: str) -> None:
        raw_path, _, query = self.path.partition("?")
        self.server.hub._log(method, raw_path)
        self.query = {k: v[-1] for k, v in parse_qs(query).items()}
        segs = [unquote(s) for s in raw_path.strip("/").split("/")]
        try:
            self.body = self._read_body()
            if segs[0] == "api":
                self._api(method, segs[1:])
            elif segs[0] == "lfs":
                self._lfs_object(method, segs[1:])
            else:
                typed = segs[0] in ("datasets", "spaces")
                repo_type, rest = (REPO_TYPES[segs[0]], segs[1:]) if typed else ("model", segs)
                if len(rest) >= 4 and rest[2] == "resolve" and method in ("GET", "HEAD"):
                    self._resolve(self.store.get_repo(repo_type, "/".join(rest[:2])), rest[3], "/".join(rest[4:]))
                elif rest[1:2] and rest[1].endswith(".git") and rest[2:] == ["info", "lfs", "objects", "batch"]:
                    self._lfs_batch(self.store.get_repo(repo_type, f"{rest[0]}/{rest[1][:-4]}"))
                else:
                    raise HubError(404, f"No route for {method} {raw_path}")
        except HubError as e:
            headers = {**e.headers, "X-Error-Message": " ".join(e.message.encode("ascii", "replace").decode().split())}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json({"error": e.message}, e.status, headers)
        except Exception as e:  # a server bug: report it to the client instead of hanging up
            self._json({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}, 500)

    # -- /api/... -----------------------------------------------------------------------------------------
    def _api(self, method: str, segs: list[str]) -> None:
        route = (method, "/".join(segs[:2]))
        if route == ("GET", "whoami-v2"):
            token = {"displayName": "dummy", "role": "write"}
            return self._json(
                {
                    "type": "user",
                    "id": "0" * 24,
                    "name": USER,
                    "fullname": "Test User",
                    "email": f"{USER}@example.com",
                    "emailVerified": True,
                    "isPro": False,
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": token},
                }
            )
        if route == ("POST", "validate-yaml"):
            return self._json({"errors": [], "warnings": []})
        if route in (("POST", "repos/create"), ("DELETE", "repos/delete")):
            return self._repos(method)
        if segs and segs[0] in REPO_TYPES and len(segs) >= 3:
            repo = self.store.get_repo(REPO_TYPES[segs[0]], f"{segs[1]}/{segs[2]}")
            return self._repo_api(method, repo, segs[3:])
        raise HubError(404, f"No route for {method} /api/{'/'.join(segs)}")

    def _repos(self, method: str) -> None:
        data = self._json_body()
        repo_type = data.get("type") or "model"
        repo_id = f"{data.get('organization') or USER}/{data['name']}"
        url = f"{self.base_url}/{URL_PREFIX[repo_type]}{repo_id}"
        if method == "DELETE":
            with self.store.lock:
                self.store.get_repo(repo_type, repo_id)
                del self.store.repos[(repo_type, repo_id)]
            return self._json({})
        try:
            private = data.get("visibility") == "private" or bool(data.get("private"))
            self.store.create_repo(repo_type, repo_id, private=private)
        except HubError as e:
            return self._json({"error": e.message, "url": url}, e.status)  # exist_ok reads "url" from the 409
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _repo_api(self, method: str, repo: Repo, segs: list[str]) -> None:
        action, arg, rest = (segs + ["", ""])[0], (segs + ["", ""])[1], "/".join(segs[2:])
        if method == "GET" and action in ("", "revision"):
            return self._json(self._info(repo, repo.resolve(arg or "main")))
        if method == "GET" and action == "tree":
            commit = repo.resolve(arg)
            entries = self.store.tree(commit, rest, self.query.get("recursive", "").lower() in ("1", "true"))
            if self.query.get("expand", "").lower() in ("1", "true"):
                for e in entries:
                    if e["type"] == "file":
                        e["lastCommit"] = self.store.last_commit(repo, commit, e["path"])
            return self._json(entries)
        if method == "POST" and action == "paths-info":
            commit = repo.resolve(arg)
            form = parse_qs(self.body.decode())
            out = []
            for path in form.get("paths", []):
                path = path.strip("/")
                if path in commit.files:
                    out.append(commit.files[path].entry(path))
                elif any(p.startswith(path + "/") for p in commit.files):
                    out.append(self.store.folder_entry(commit, path))
            return self._json(out)
        if method == "GET" and action == "refs":

            def refs(table, kind):
                return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c} for n, c in sorted(table.items())]

            out = {"branches": refs(repo.branches, "heads"), "tags": refs(repo.tags, "tags"), "converts": []}
            if self.query.get("include_prs"):
                out["pullRequests"] = []
            return self._json(out)
        if method == "GET" and action == "commits":
            return self._json(
                [
                    {
                        "id": c.id,
                        "title": c.title,
                        "message": c.message,
                        "date": c.date,
                        "authors": [{"user": USER, "avatar": ""}],
                    }
                    for c in repo.history(repo.resolve(arg or "main"))
                ]
            )
        if action == "branch":
            return self._branch(method, repo, arg)
        if action == "tag":
            return self._tag(method, repo, arg)
        if method == "POST" and action == "preupload":
            commit = repo.resolve(arg)
            files = []
            for f in self._json_body()["files"]:
                remote = commit.files.get(f["path"])
                files.append(
                    {
                        "path": f["path"],
                        "uploadMode": self.store.upload_mode(f["path"], f["size"]),
                        "shouldIgnore": False,
                        "oid": remote.etag if remote else None,
                    }
                )
            return self._json({"files": files})
        if method == "POST" and action == "commit":
            if self.query.get("create_pr"):
                raise HubError(501, "Pull requests are not supported by the test Hub server")
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
            commit = self.store.commit(repo, arg, lines)
            url = f"{self.base_url}/{URL_PREFIX[repo.type]}{repo.id}/commit/{commit.id}"
            return self._json({"success": True, "commitOid": commit.id, "commitUrl": url})
        if action.startswith("xet-"):
            raise HubError(501, "Xet is not supported by the test Hub server: disable Xet or use lfs_mode='never'")
        raise HubError(404, f"No route for {method} {action}")

    def _branch(self, method: str, repo: Repo, name: str) -> None:
        with self.store.lock:
            if method == "POST":
                if name in repo.branches:
                    raise HubError(409, f"Branch {name} already exists")
                start = self._json_body().get("startingPoint")
                repo.branches[name] = (repo.resolve(start) if start else repo.commits[repo.branches["main"]]).id
            elif method == "DELETE":
                if name not in repo.branches:
                    raise HubError(404, f"Branch {name} not found", "RevisionNotFound")
                if name == "main":
                    raise HubError(403, "Cannot delete the main branch")
                del repo.branches[name]
        self._json({})

    def _tag(self, method: str, repo: Repo, rev_or_tag: str) -> None:
        with self.store.lock:
            if method == "POST":
                tag = self._json_body()["tag"]
                if tag in repo.tags:
                    raise HubError(409, f"Tag {tag} already exists")
                repo.tags[tag] = repo.resolve(rev_or_tag).id
            elif method == "DELETE":
                if repo.tags.pop(rev_or_tag, None) is None:
                    raise HubError(404, f"Tag {rev_or_tag} not found", "RevisionNotFound")
        self._json({})

    def _info(self, repo: Repo, commit: Commit) -> dict:
        """`model_info` / `dataset_info` / `repo_info` payload (with blob metadata when `?blobs=` is set)."""
        blobs = bool(self.query.get("blobs"))
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=blob.size, blobId=blob.git_oid)
                if blob.lfs:
                    sibling["lfs"] = {"sha256": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
            siblings.append(sibling)
        info = {
            "id": repo.id,
            "_id": hashlib.sha1(repo.id.encode()).hexdigest()[:24],
            "author": repo.id.split("/")[0],
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if repo.type == "model":
            info["modelId"] = repo.id
        return info

    # -- downloads ----------------------------------------------------------------------------------------
    def _resolve(self, repo: Repo, rev: str, path: str) -> None:
        """HEAD/GET a file: X-Repo-Commit, ETag (git sha1, or sha256 for LFS), Content-Length, Range."""
        commit = repo.resolve(rev)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.id})
        data = self.store.blobs[blob.sha256]
        headers = {"X-Repo-Commit": commit.id, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes"}
        status = 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and self.command == "GET" and match.group(1):
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
            if start >= len(data):
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers, content_type="application/octet-stream")

    # -- LFS ----------------------------------------------------------------------------------------------
    def _lfs_batch(self, repo: Repo) -> None:
        """git-lfs batch API (basic transfer): ask for every object the store does not hold yet."""
        request = self._json_body()
        if request.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        objects = []
        for obj in request.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            held = self.store.blobs.get(oid)
            if held is None or len(held) != size:
                entry["actions"] = {
                    "upload": {"href": f"{self.base_url}/lfs/objects/{oid}"},
                    "verify": {"href": f"{self.base_url}/lfs/verify/{oid}"},
                }
            objects.append(entry)
        self._json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_object(self, method: str, segs: list[str]) -> None:
        """`PUT /lfs/objects/{oid}` stores the bytes (checking the sha256); `POST /lfs/verify/{oid}` checks them."""
        kind, oid = (segs + ["", ""])[:2]
        if method == "PUT" and kind == "objects":
            if hashlib.sha256(self.body).hexdigest() != oid:
                raise HubError(400, f"Uploaded content does not match sha256 {oid}")
            with self.store.lock:
                self.store.blobs[oid] = self.body
            return self._send(200, b"", {"ETag": f'"{oid}"'})
        if method == "POST" and kind == "verify":
            held = self.store.blobs.get(oid)
            if held is None or len(held) != self._json_body().get("size", len(held)):
                raise HubError(404, f"LFS object {oid} not found")
            return self._json({})
        raise HubError(404, f"No route for {method} /lfs/{'/'.join(segs)}")


class HubServer:
    """A Hub on `http://127.0.0.1:<free port>`, served from a daemon thread.

    `requests` logs every request as `(method, path)`, the raw path without the query string, so tests can
    check which endpoints the client used, e.g. that `.../info/lfs/objects/batch` was posted to.
    """

    user = USER

    def __init__(self, lfs_mode: str = "auto"):
        self.store = HubStore(lfs_mode)
        self.requests: list[tuple[str, str]] = []
        self.url = ""
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._log_lock = threading.Lock()

    @property
    def lfs_mode(self) -> str:
        return self.store.lfs_mode

    def _log(self, method: str, path: str) -> None:
        with self._log_lock:
            self.requests.append((method, path))

    def start(self) -> HubServer:
        self._httpd = _HTTPServer(("127.0.0.1", 0), HubRequestHandler)
        self._httpd.hub = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut open keep-alive connections, so that nothing is served any more."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        for conn in list(self._connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
        self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
