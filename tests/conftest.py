"""Shared fixtures. Environment first: huggingface_hub reads its constants at import time."""

import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from tests.hub_fixtures import hub  # noqa: E402,F401  (the loopback Hub, for every test module)

pytest_plugins = ["pytester"]  # tests/test_conftest_rules.py runs pytest on generated files


def data_dir() -> Path:
    """Benchmark data: $HF_KNOWEDIT_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("HF_KNOWEDIT_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return path


@pytest.fixture(scope="session")
def data_path() -> Path:
    path = data_dir()
    if not (path / "counterfact_500.json").exists():
        pytest.fail(f"Benchmark data not found at {path}; set HF_KNOWEDIT_DATA to the shared data folder.")
    return path


@pytest.fixture(scope="session")
def stats_corpus(data_path) -> list:
    """Second-moment corpus for real-model tests: the attribute and generation prompts of CounterFact
    records 100-499 (text the tests never edit; no dataset download in CI)."""
    import json

    records = json.loads((data_path / "counterfact_500.json").read_text())[100:]
    return [p for r in records for p in r["attribute_prompts"] + r["generation_prompts"]]


@pytest.fixture(scope="session")
def smollm2():
    """The bundled real model (float32), loaded once per session. Tests must leave it unedited."""
    from hf_knowedit._bundled import load_smollm2

    model, tok = load_smollm2()
    return model, tok


@pytest.fixture(scope="session")
def gemma3():
    """The second bundled family, Gemma-3-270M (float32), loaded once per session. Tests must leave it
    unedited. Needs the ``bundled-gemma`` extra (``make setup`` installs it)."""
    from hf_knowedit._bundled import load_gemma3

    model, tok = load_gemma3()
    return model, tok


# -----------------------------------------------------------------------------
# shared fixtures


@pytest.fixture
def one_thread():
    """One torch thread for the test (two OpenMP threads on a busy 2-core machine spin against other
    jobs and are many times slower for tiny matrices); the previous count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def stats_cache(tmp_path, monkeypatch) -> Path:
    """An isolated second-moment cache: ``$HF_KNOWEDIT_STATS_CACHE`` points to ``tmp_path / "stats"``
    (returned), so no test reads or writes the user's cache or another test's files."""
    path = tmp_path / "stats"
    monkeypatch.setenv("HF_KNOWEDIT_STATS_CACHE", str(path))
    return path


# -----------------------------------------------------------------------------
# collection rule: the real model only in slow tests

#: session fixtures that load a real (not tiny, not in-process) model
REAL_MODEL_FIXTURES = ("smollm2", "gemma3")


def unmarked_real_model_tests(items) -> list[str]:
    """Node ids of the collected tests that use a real-model fixture (directly or through another
    fixture) without the ``slow`` marker."""
    return [
        item.nodeid
        for item in items
        if any(name in getattr(item, "fixturenames", ()) for name in REAL_MODEL_FIXTURES)
        and item.get_closest_marker("slow") is None
    ]


@pytest.hookimpl(tryfirst=True)  # before ``-m "not slow"`` deselects anything
def pytest_collection_modifyitems(session, config, items):
    bad = unmarked_real_model_tests(items)
    if bad:
        raise pytest.UsageError(
            f"These tests use the real model ({', '.join(REAL_MODEL_FIXTURES)}) but are not marked "
            "@pytest.mark.slow, so they would run in the fast suite; mark them slow:\n  " + "\n  ".join(bad)
        )
