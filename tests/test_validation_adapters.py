"""Hostile adapter files and killed / concurrent saves.

* ``adapter_config.json`` / ``knowedit_config.json`` edited field by field: every field ``read_adapter``
  reads is checked by type (:class:`AdapterFormatError` naming the file and the field), regular
  expressions as keys are refused at once (never matched), and a failing ``load_edits`` leaves the
  model as it was (property-based, bounded; trial counts printed at the end of the module).
* ``atomic_directory``: a save killed with SIGKILL leaves no partial adapter and the next save removes
  its temporaries (or puts the old adapter back when the kill fell between the two renames); several
  processes saving into one directory all succeed and leave one complete adapter.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hf_knowedit
from hf_knowedit import adapter_files
from hf_knowedit.editset import EditSet
from hf_knowedit.errors import AdapterFormatError
from tests.strategies import (
    Tally,
    apply_mutation,
    json_mutations,
    json_paths,
    print_tallies,
    property_settings,
    same_set,
    same_state,
    small_set,
    state_of,
)
from tests.test_stack import random_set
from tests.tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
PEFT, META = adapter_files.ADAPTER_CONFIG, adapter_files.KNOWEDIT_CONFIG
TALLIES: dict[str, Tally] = {}


@pytest.fixture(scope="module", autouse=True)
def report_tallies(request):
    yield
    print_tallies(request, TALLIES)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny llama and a valid adapter for it (fingerprints included, state included)."""
    model, tok = make_tiny_model("llama")
    es = random_set(model, [1, 2])
    es.state = {"alphaedit.keys.1": torch.ones(2, 3)}
    es.stats_key = {"model": "tiny", "layer": 1}
    directory = tmp_path_factory.mktemp("adapters") / "good"
    es.save_pretrained(directory)
    return model, directory


def copy_adapter(src: Path, dst: Path, **documents) -> Path:
    """A copy of the adapter in ``src``; ``documents`` (file name -> object) replace its JSON files."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    for name, obj in documents.items():
        (dst / name).write_text(json.dumps(obj), encoding="utf-8")
    return dst


def documents(directory: Path) -> dict:
    return {name: json.loads((directory / name).read_text()) for name in (PEFT, META)}


def module_names(directory: Path) -> list[str]:
    return json.loads((directory / PEFT).read_text())["target_modules"]


# -- regular expressions as keys --------------------------------------------------------------------


@pytest.mark.parametrize("key", ["(.*.*.*.*.*.*.*.*.*.*.*)*x", "(", "[", ".*down_proj", "down_proj"])
@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_pattern_keys_are_exact_names_never_regular_expressions(saved, tmp_path, field, key):
    model, good = saved
    docs = documents(good)
    docs[PEFT][field] = {**docs[PEFT][field], key: 2}
    bad = copy_adapter(good, tmp_path / "bad", **docs)
    before = state_of(model)
    start = time.perf_counter()
    with pytest.raises(AdapterFormatError, match=rf"{PEFT}: field '{field}' is invalid: its key .* is not one of"):
        hf_knowedit.load_edits(model, bad)
    assert time.perf_counter() - start < 5
    assert same_state(before, state_of(model))


def test_exact_pattern_entries_are_honoured(saved, tmp_path):
    _, good = saved
    docs = documents(good)
    first = module_names(good)[0]
    docs[PEFT]["alpha_pattern"] = {first: 4}  # rank 2, alpha 4: PEFT scales by 2
    docs[PEFT]["lora_alpha"] = 2
    scaled = EditSet.from_pretrained(copy_adapter(good, tmp_path / "scaled", **docs))
    plain = EditSet.from_pretrained(good)
    torch.testing.assert_close(scaled.deltas[first].B, 2 * plain.deltas[first].B)
    for other in module_names(good)[1:]:
        assert torch.equal(scaled.deltas[other].B, plain.deltas[other].B)


# -- every field, by type ---------------------------------------------------------------------------

M = "{module}"  # stands for the first module's name
FIELDS = [
    (PEFT, ("peft_type",), 5, "peft_type"),
    (PEFT, ("r",), "2", "'r'"),
    (PEFT, ("r",), True, "'r'"),
    (PEFT, ("r",), 0, "'r'"),
    (PEFT, ("r",), None, "'r'"),
    (PEFT, ("lora_alpha",), "2", "lora_alpha"),
    (PEFT, ("lora_alpha",), float("nan"), "lora_alpha"),
    (PEFT, ("target_modules",), "model.layers.1.mlp.down_proj", "target_modules"),
    (PEFT, ("target_modules",), [1, 2], "target_modules"),
    (PEFT, ("target_modules",), None, "target_modules"),
    (PEFT, ("rank_pattern",), [2], "rank_pattern"),
    (PEFT, ("rank_pattern", M), 1.5, "rank_pattern"),
    (PEFT, ("rank_pattern", M), True, "rank_pattern"),
    (PEFT, ("alpha_pattern", M), "2", "alpha_pattern"),
    (PEFT, ("alpha_pattern", M), float("inf"), "alpha_pattern"),
    (PEFT, ("fan_in_fan_out",), "no", "fan_in_fan_out"),
    (PEFT, ("use_dora",), "false", "use_dora"),
    (PEFT, ("base_model_name_or_path",), 5, "base_model_name_or_path"),
    (META, ("layers",), [1.7], "layers"),
    (META, ("layers",), ["1"], "layers"),
    (META, ("layers",), [True], "layers"),
    (META, ("layers",), 2, "layers"),
    (META, ("requests",), {"prompt": "x"}, "requests"),
    (META, ("requests",), [5], "requests"),
    (META, ("requests", 0, "subject"), 5, "requests"),
    (META, ("requests", 0, "prompt"), None, "requests"),
    (META, ("requests", 0, "paraphrases"), 5, "requests"),
    (META, ("requests", 0, "subject"), "\ud800", "requests"),
    (META, ("method",), 5, "method"),
    (META, ("config",), [], "config"),
    (META, ("name",), 5, "name"),
    (META, ("format_version",), "1", "format_version"),
    (META, ("format_version",), 1.0, "format_version"),
    (META, ("state",), 5, "state"),
    (META, ("state",), "../../etc/passwd", "state"),
    (META, ("files",), [], "files"),
    (META, ("files", "adapter_model.safetensors"), "abc", "files"),
    (META, ("files", "adapter_model.safetensors", "sha256"), 5, "files"),
    (META, ("metrics",), "good", "metrics"),
    (META, ("base_model",), ["x"], "base_model"),
    (META, ("modules",), [], "modules"),
    (META, ("modules", M), "linear", "modules"),
    (META, ("modules", M, "layout"), "conv2d", "layout"),
    (META, ("modules", M, "peft_target"), "weight", "peft_target"),
    (META, ("modules", M, "peft_target"), True, "peft_target"),
    (META, ("modules", M, "dense"), "no", "dense"),
    (META, ("modules", M, "rank"), 0, "rank"),
    (META, ("modules", M, "rank"), "2", "rank"),
    (META, ("modules", M, "shape"), [32], "shape"),
    (META, ("modules", M, "shape"), [32.0, 96], "shape"),
    (META, ("modules", M, "fingerprint"), "abc", "fingerprint"),
    (META, ("modules", M, "fingerprint", "sketch"), ["x"], "fingerprint"),
    (META, ("modules", M, "fingerprint", "shape"), None, "fingerprint"),
]


def _set(doc, path, value, module):
    path = tuple(module if p == M else p for p in path)
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


@pytest.mark.parametrize(
    "file,path,value,field", FIELDS, ids=[f"{f[:5]}-{'.'.join(map(str, p))}={v!r}" for f, p, v, _ in FIELDS]
)
def test_wrong_typed_fields_name_the_file_and_the_field(saved, tmp_path, file, path, value, field):
    model, good = saved
    docs = documents(good)
    _set(docs[file], path, value, module_names(good)[0])
    bad = copy_adapter(good, tmp_path / "bad", **docs)
    before = state_of(model)
    with pytest.raises(AdapterFormatError) as info:
        hf_knowedit.load_edits(model, bad)
    message = str(info.value)
    if "plain LoRA" not in message:  # peft_type has its own message
        assert file in message and field in message and "save the adapter again" in message, message
    assert same_state(before, state_of(model))


def test_module_names_that_are_not_plain_names_are_refused(saved, tmp_path):
    _, good = saved
    for name in ("model.__class__", "model..layers", "", "model.layers.1.mlp.down_proj "):
        docs = documents(good)
        first = module_names(good)[0]
        docs[PEFT]["target_modules"] = [name if m == first else m for m in docs[PEFT]["target_modules"]]
        with pytest.raises(AdapterFormatError, match="target_modules"):
            EditSet.from_pretrained(copy_adapter(good, tmp_path / f"bad{len(name)}", **docs))


def test_unreadable_json_files(saved, tmp_path):
    _, good = saved
    cases = {
        "bytes": b"\xff\xfe{}",
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "list": b"[1, 2]",
        "empty": b"",
    }
    for label, raw in cases.items():
        for name in (PEFT, META):
            bad = copy_adapter(good, tmp_path / f"{label}-{name}")
            (bad / name).write_bytes(raw)
            with pytest.raises(AdapterFormatError, match=name):
                EditSet.from_pretrained(bad)


def test_non_float_factors_are_refused(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, good = saved
    bad = copy_adapter(good, tmp_path / "ints")
    tensors = {k: v.to(torch.int32) for k, v in load_file(good / adapter_files.ADAPTER_WEIGHTS).items()}
    save_file(tensors, str(bad / adapter_files.ADAPTER_WEIGHTS))
    docs = documents(good)
    docs[META]["files"] = {}
    copy_adapter(bad, bad, **docs)
    with pytest.raises(AdapterFormatError, match="floating-point"):
        EditSet.from_pretrained(bad)


def test_valid_files_still_round_trip(saved):
    model, good = saved
    before = state_of(model)
    es = hf_knowedit.load_edits(model, good)
    assert es.layers == [1, 2] and es.state and es.stats_key == {"model": "tiny", "layer": 1}
    hf_knowedit.revert_edits(model)
    assert same_state(before, state_of(model))


@pytest.mark.parametrize("source", [5, None, b"dir", ["x"], "", "a b/c", "-bad-", "x" * 200])
def test_sources_that_are_neither_directories_nor_repo_ids(saved, source):
    model, _ = saved
    before = state_of(model)
    with pytest.raises(AdapterFormatError, match="directory"):
        adapter_files.fetch_adapter(source)
    if isinstance(source, str):  # load_edits passes strings on; no Hub request is made for them
        with pytest.raises(AdapterFormatError, match="neither an adapter directory nor a valid Hub repo id"):
            hf_knowedit.load_edits(model, source)
    assert same_state(before, state_of(model))


# -- property: any single mutation of either file ---------------------------------------------------


@property_settings(120)
@given(st.data())
def test_property_mutated_adapter_files_load_or_raise_typed_leaving_the_model_as_it_was(saved, tmp_path_factory, data):
    model, good = saved
    docs = documents(good)
    name, path, op, value = data.draw(json_mutations(docs))
    docs[name] = apply_mutation(docs[name], path, op, value)
    bad = copy_adapter(good, tmp_path_factory.mktemp("mutated") / "a", **docs)
    before = state_of(model)
    t = TALLIES.setdefault("load_edits", Tally("load_edits (mutated adapter JSON)"))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome, result = t.run(lambda: hf_knowedit.load_edits(model, bad))
    assert time.perf_counter() - start < 10, "loading took too long"
    assert outcome != "untyped", f"{type(result).__name__}: {result}"
    if outcome == "accepted":
        hf_knowedit.revert_edits(model)
    if not same_state(before, state_of(model)):
        t.changed()
        raise AssertionError(f"{outcome} load changed the model's state")


GRID = [None, True, "x", 1.7, -1, [], {}, "<delete>"]


def test_every_field_of_both_files_with_every_wrong_type(saved, tmp_path):
    """Field by field, exhaustively: each path into either JSON file (nested ones included) set to each value
    of :data:`GRID` or deleted."""
    model, good = saved
    docs = documents(good)
    work = copy_adapter(good, tmp_path / "grid")
    before = state_of(model)
    t = TALLIES.setdefault("grid", Tally("load_edits (every field x every wrong type)"))
    for name in (PEFT, META):
        for path in json_paths(docs[name]):
            for value in GRID:
                op = "delete" if value == "<delete>" else "set"
                mutated = apply_mutation(docs[name], path, op, value)
                copy_adapter(work, work, **{**docs, name: mutated})
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    outcome, result = t.run(lambda: hf_knowedit.load_edits(model, work))
                assert outcome != "untyped", (name, path, value, f"{type(result).__name__}: {result}")
                if outcome == "accepted":
                    hf_knowedit.revert_edits(model)
                if not same_state(before, state_of(model)):
                    t.changed()
                    raise AssertionError((name, path, value, f"{outcome} load changed the model's state"))


def test_trial_counts_are_clean():
    for t in TALLIES.values():
        assert t.counts["untyped"] == 0 and t.counts["changed"] == 0, (t.line(), t.untyped[:3])


# -- killed and concurrent saves --------------------------------------------------------------------


def scratch(parent: Path, name: str) -> list[str]:
    """What saves into ``parent / name`` may leave beside it: temporaries, old copies, the lock file."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from tests.strategies import small_set
    from hf_knowedit import adapter_files

    target, mode, seed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    ready = target.parent / f"ready-{{os.getpid()}}"

    def stall():
        ready.write_text("")
        time.sleep(600)

    if mode == "write":  # killed while the adapter files are being written
        real = adapter_files.write_adapter
        def write(es, directory):
            real(es, directory)
            stall()
        adapter_files.write_adapter = write
    elif mode == "swap":  # killed between the two renames of the swap
        real_rename = os.rename
        def rename(src, dst):
            real_rename(src, dst)
            if ".old-" in str(dst):
                stall()
        os.rename = rename
    elif mode == "loop":  # save repeatedly once every child is ready and the start file appears
        ready.write_text("")
        while not (target.parent / "go").exists():
            time.sleep(0.01)
        for i in range(10):
            small_set(seed).save_pretrained(target)
        sys.exit(0)
    small_set(seed).save_pretrained(target)
    """
).format(root=str(ROOT))


def child(target: Path, mode: str, seed: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(target), mode, str(seed)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def kill_when_ready(proc: subprocess.Popen, parent: Path, timeout: float = 60) -> None:
    ready = parent / f"ready-{proc.pid}"
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the child never reached the kill point: {proc.communicate()[1].decode()[-2000:]}")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ready.unlink()


@pytest.mark.parametrize("mode,existing", [("write", False), ("write", True), ("swap", True)])
def test_a_killed_save_leaves_no_partial_adapter_and_the_next_save_cleans_up(tmp_path, mode, existing):
    """``write``: killed while writing the files; ``swap``: killed between moving the old adapter aside and
    moving the new one in (only a save onto an existing adapter swaps)."""
    target = tmp_path / "edit"
    first = small_set(0)
    if existing:
        first.save_pretrained(target)
    proc = child(target, mode, seed=1)
    kill_when_ready(proc, tmp_path)
    leftovers = scratch(tmp_path, "edit")
    assert any(f"-{proc.pid}-" in n for n in leftovers), leftovers  # the killed writer's scratch is there
    if mode == "write":  # the target is untouched: the old adapter, or nothing
        assert same_set(EditSet.from_pretrained(target), first) if existing else not target.exists()
    else:  # killed between the renames: the target is gone for now, the old copy is beside it
        assert not target.exists()
        adapter_files.clean_stale_temporaries(target)  # what the next save does first
        assert same_set(EditSet.from_pretrained(target), first)
    second = small_set(2)
    second.save_pretrained(target)
    assert same_set(EditSet.from_pretrained(target), second)
    assert scratch(tmp_path, "edit") == []


def test_stale_scratch_of_live_processes_is_left_alone(tmp_path):
    target = tmp_path / "edit"
    small_set(0).save_pretrained(target)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = [
            f".edit.tmp-{dead}-abc",
            f".edit.old-{dead}-abc",
            f".edit.tmp-{live.pid}-x_1",
            f".edit.tmp-{os.getpid()}-q",
            ".edit.tmp-nopid",
            ".editor.tmp-1-a",
        ]
        for n in names:
            (tmp_path / n).mkdir()
        removed = adapter_files.clean_stale_temporaries(target)
        assert sorted(p.name for p in removed) == sorted(names[:2])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["edit", *names[2:]])
    finally:
        live.kill()
        live.wait()


def test_concurrent_saves_from_processes_leave_one_complete_adapter(tmp_path):
    target = tmp_path / "edit"
    procs = [child(target, "loop", seed) for seed in range(4)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{p.pid}").exists() for p in procs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a child failed to start"
        time.sleep(0.02)
    (tmp_path / "go").write_text("")
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err.decode()[-3000:]
    loaded = EditSet.from_pretrained(target)
    assert sum(same_set(loaded, small_set(seed)) for seed in range(4)) == 1
    assert sorted(os.listdir(target)) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "knowedit_config.json",
    ]
    assert scratch(tmp_path, "edit") == []


def test_concurrent_saves_from_threads_leave_one_complete_adapter(tmp_path):
    target = tmp_path / "edit"
    sets = [small_set(seed) for seed in range(4)]
    errors = []
    barrier = threading.Barrier(len(sets))

    def save(es):
        try:
            barrier.wait()
            for _ in range(8):
                es.save_pretrained(target)
        except Exception:  # noqa: BLE001 - collected and asserted below
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=save, args=(es,)) for es in sets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    loaded = EditSet.from_pretrained(target)
    assert sum(same_set(loaded, es) for es in sets) == 1
    assert scratch(tmp_path, "edit") == []
