"""Pytest fixtures pointing the unmodified `huggingface_hub` (and `transformers`) client at a `HubServer`.

`huggingface_hub` reads `HF_ENDPOINT`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_HUB_DISABLE_XET` into
`huggingface_hub.constants` at import time, and `huggingface_hub.hf_api.api` (the `HfApi` behind the module-level
`create_repo`, `upload_folder`, ...) copies the endpoint when it is built. So besides the environment, the
`hub` fixture patches those constants and that instance for the duration of one test. `transformers` reads
the same constants at call time and keeps no copies of them.

Use it from a test module with `from tests.hub_fixtures import hub` (pytest finds a fixture imported into the
module), or for the whole suite with `pytest_plugins = ["tests.hub_fixtures"]` in the root conftest.py.

    def test_push(hub):                                   # lfs_mode="auto", Xet disabled: the LFS protocol
        api = HfApi()                                     # endpoint and token come from the fixture
        repo_id = api.create_repo("m").repo_id            # -> f"{hub.user}/m"

    @pytest.mark.parametrize("hub", HUB_UPLOAD_MODES, indirect=True)  # LFS path, then Xet-enabled client
    def test_both(hub): ...

    @pytest.mark.parametrize("hub", [{"lfs_mode": "never", "xet": True}], indirect=True)
    def test_xet_client(hub): ...
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from tests.hub_server import HubServer

__all__ = ["HUB_LFS", "HUB_XET", "HUB_UPLOAD_MODES", "hub", "offline"]

#: Server `lfs_mode="auto"` with the client's Xet disabled: LFS files go through the LFS batch + basic PUT.
HUB_LFS = {"lfs_mode": "auto", "xet": False}
#: Client with Xet enabled (today's default, pipelined upload) and a server that makes every file regular.
HUB_XET = {"lfs_mode": "never", "xet": True}
#: Both of the above, for `@pytest.mark.parametrize("hub", HUB_UPLOAD_MODES, indirect=True)`.
HUB_UPLOAD_MODES = [pytest.param(HUB_LFS, id="lfs"), pytest.param(HUB_XET, id="xet-regular")]


@pytest.fixture
def hub(request, tmp_path, monkeypatch) -> Iterator[HubServer]:
    """A started `HubServer` that `huggingface_hub` / `transformers` talk to, with a per-test cache.

    Indirect parameter (optional): a dict with `lfs_mode` ("auto" | "never" | "always", default "auto") and
    `xet` (bool, default False: the client's Xet support is disabled). Sets HF_ENDPOINT, HF_TOKEN="hf_dummy",
    HF_HUB_CACHE=<tmp_path>/hf_cache, HF_HUB_OFFLINE=0, and patches the matching `huggingface_hub` globals.
    """
    import huggingface_hub.hf_api
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    params = dict(getattr(request, "param", None) or {})
    xet = bool(params.pop("xet", False))
    server = HubServer(**params).start()
    cache = tmp_path / "hf_cache"

    env = {
        "HF_ENDPOINT": server.url,
        "HF_TOKEN": "hf_dummy",
        "HF_HUB_CACHE": str(cache),
        "HF_XET_CACHE": str(tmp_path / "xet_cache"),
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "0" if xet else "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(key, raising=False)

    patches = {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_CACHE": str(cache),
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": not xet,
        "HF_HUB_DISABLE_TELEMETRY": True,
        # Written by the user-agent detection; keep it out of the real HF_HOME.
        "AGENT_HARNESSES_PATH": str(tmp_path / "hf_home" / ".agent_harnesses.json"),
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", server.url)
    # transformers keeps one shared HfApi built with the endpoint of the first call: start afresh.
    import transformers.utils.hub as transformers_hub

    monkeypatch.setattr(transformers_hub, "_hf_api", None, raising=False)

    # A fresh HTTP client: no pooled connection to an earlier test's server, and today's proxy env.
    _http.close_session()
    try:
        yield server
    finally:
        server.stop()
        _http.close_session()


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """`HF_HUB_OFFLINE=1` inside the block (environment and `huggingface_hub.constants`), restored after."""
    from huggingface_hub import constants

    saved_env = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE",)}
    saved = constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
