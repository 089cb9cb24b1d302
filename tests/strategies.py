"""Hypothesis strategies for hostile input: edit requests, method configs and adapter JSON files.

Each strategy mixes valid values (so some inputs are accepted and the accept path is exercised too)
with hostile ones: wrong types, empty and huge strings, lone surrogates, bytes, nested ``None``,
extra ``{}`` placeholders, booleans where numbers belong, NaN / inf, negative numbers, regular
expressions where exact names belong. :class:`Tally` counts what a property saw.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from hf_knowedit.errors import KnowEditError
from hf_knowedit.methods.config import ALIASES
from hf_knowedit.requests import EditRequest

#: ``HF_KNOWEDIT_FUZZ=N`` runs every property N times longer, with fresh random inputs each run (default:
#: the bounded, derandomised run CI does)
FUZZ = int(os.environ.get("HF_KNOWEDIT_FUZZ", "0") or 0)


def property_settings(max_examples: int) -> settings:
    """Bounded settings for a property test (see :data:`FUZZ`)."""
    return settings(
        max_examples=max_examples * max(1, FUZZ),
        deadline=None,
        derandomize=not FUZZ,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


GOOD = {"prompt": "{} is located in", "subject": "Angola", "target_new": "Antarctica"}
#: fields a method config shares
CHEAP = {"mom2": "identity", "context_templates": 0, "v_num_grad_steps": 2}

# -- text -------------------------------------------------------------------------------------------

SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)


def texts(max_size: int = 40, huge: bool = True) -> st.SearchStrategy[str]:
    """Strings: ordinary words, arbitrary unicode, whitespace, lone surrogates, ``{}``, and (if ``huge``)
    a very long one."""
    parts = [
        st.sampled_from(["Angola", "Paris", "the", "Antarctica", "Thomas Mann", " ", "", "{}", "{", "}", "\x00"]),
        st.text(max_size=max_size),
        st.text(alphabet=st.characters(categories=["Zs", "Cc", "Mn", "So"]), max_size=8),
        st.builds(lambda a, s, b: a + s + b, st.text(max_size=5), SURROGATES, st.text(max_size=5)),
    ]
    if huge:
        parts.append(st.builds(lambda n: "Angola " * n, st.sampled_from([2_000, 20_000])))
    return st.one_of(*parts)


def hostile_values(text: st.SearchStrategy | None = None) -> st.SearchStrategy[Any]:
    """Anything that is not a string where a string belongs (and some strings)."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**20), max_value=10**20),
        st.floats(allow_nan=True, allow_infinity=True),
        st.binary(max_size=10),
        st.just(b"Angola"),
        st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=5)), max_size=3),
        st.dictionaries(st.text(max_size=3), st.one_of(st.none(), st.integers(), st.text(max_size=5)), max_size=2),
        st.just({"str": None}),
        st.just({"str": 5}),
        st.just(object()),
        text if text is not None else texts(),
    )


# -- requests ---------------------------------------------------------------------------------------

PROMPTS = st.one_of(
    st.sampled_from(
        [
            "{} is located in",
            "The capital of {} is",
            "{}",
            "Angola is located in",  # filled: the subject becomes the placeholder
            "{} is {} in",  # two placeholders
            "no placeholder",
            "",
            "{{}} is in",
        ]
    ),
    st.builds(lambda t: "{} " + t, st.text(max_size=20)),
)

REQUEST_FIELDS = ["prompt", "subject", "target_new", "target_true", "paraphrases", "neighborhood", "case_id"]


@st.composite
def edit_requests(draw: Any, max_text: int = 40, huge: bool = True) -> Any:
    """One request in any accepted form (our dict, CounterFact, EasyEdit, ``EditRequest``) with 0-3 fields
    replaced by hostile values or removed, or something that is not a request at all."""
    text = texts(max_text, huge)
    fields = dict(GOOD)
    fields["prompt"] = draw(st.one_of(st.just(GOOD["prompt"]), PROMPTS))
    for name in draw(st.lists(st.sampled_from(REQUEST_FIELDS), max_size=3, unique=True)):
        fields[name] = draw(
            st.one_of(
                text,
                hostile_values(text),
                st.just("<missing>"),
                st.lists(text, max_size=3),
            )
        )
    fields = {k: v for k, v in fields.items() if not (isinstance(v, str) and v == "<missing>")}
    form = draw(st.sampled_from(["ours", "counterfact", "easyedit", "object", "not a request"]))
    if form == "counterfact":
        rewrite = {k: fields[k] for k in ("prompt", "subject", "target_new", "target_true") if k in fields}
        if "target_new" in rewrite and draw(st.booleans()):
            rewrite["target_new"] = {"str": rewrite["target_new"], "id": "Q1"}
        record = {"case_id": fields.get("case_id"), "requested_rewrite": rewrite}
        record["paraphrase_prompts"] = fields.get("paraphrases", [])
        return draw(st.sampled_from([record, {"requested_rewrite": draw(hostile_values(text))}]))
    if form == "easyedit":
        record = {k: v for k, v in fields.items() if k not in ("paraphrases", "neighborhood", "target_true")}
        if "target_true" in fields:
            record["ground_truth"] = fields["target_true"]
        if "paraphrases" in fields:
            record["rephrase_prompt"] = fields["paraphrases"]
        return record
    if form == "object":
        return EditRequest(**{k: fields.get(k) for k in REQUEST_FIELDS})
    if form == "not a request":
        return draw(hostile_values(text))
    return fields


WORDS = ["Angola", "Paris", "Thomas Mann", "Kenya", "the Louvre", "Toyota", "Python", "Rome"]


def valid_requests() -> st.SearchStrategy[dict[str, Any]]:
    """Well-formed requests: templates, subjects and targets from small lists, or plain letters."""
    word = st.one_of(st.sampled_from(WORDS), st.text(alphabet="abcdefghij ABC", min_size=1, max_size=12))
    return st.builds(
        lambda prompt, subject, target: {"prompt": prompt, "subject": subject, "target_new": target},
        st.sampled_from(["{} is located in", "The capital of {} is", "{} was made by", "{}"]),
        word,
        word,
    )


def request_batches(max_text: int = 40, huge: bool = True) -> st.SearchStrategy[Any]:
    """One request, or a list / tuple of 0-3 of them, or a hostile value in place of the batch."""
    one = edit_requests(max_text, huge)
    return st.one_of(
        one,
        st.lists(one, min_size=0, max_size=3),
        st.lists(one, max_size=2).map(tuple),
        st.sampled_from([None, 5, "a string", b"bytes", [None], [[GOOD]]]),
    )


# -- configs ----------------------------------------------------------------------------------------

CONFIG_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=5),
    st.sampled_from([10**400, -(10**400), 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e-3, 0.5, 1.0, 2.5, 1e308]),
    st.text(max_size=8),
    st.sampled_from(["corpus", "identity", "float32", "float64", "float16", "3", "True", "\ud800"]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
    st.binary(max_size=3),
)

#: fields whose valid values decide the cost of a run: in property tests on a model they only take
#: cheap valid values (besides invalid ones)
EXPENSIVE = {
    "v_num_grad_steps": [1, 2],
    "context_templates": [0, 1],
    "context_length": [1, 2],
    "mom2": ["identity"],
    "mom2_corpus": [None, ["a text"]],
    "mom2_n_tokens": [1, 10],
    "target_batch_tokens": [64, 2048],
}


def field_names(config_cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls)]


@st.composite
def config_overrides(draw: Any, config_cls: type, cheap: bool = False) -> dict[str, Any]:
    """0-3 fields of ``config_cls`` (or old names, or unknown names) set to arbitrary values. With
    ``cheap``, fields in :data:`EXPENSIVE` take only cheap valid values or values that are invalid
    for every field (so a property test on a model never runs long)."""
    names = field_names(config_cls)
    key = st.one_of(st.sampled_from(names), st.sampled_from(sorted(ALIASES)), st.sampled_from(["stepz", "LR", ""]))
    out = {}
    for name in draw(st.lists(key, max_size=3, unique=True)):
        if cheap and name in EXPENSIVE:
            out[name] = draw(st.sampled_from([*EXPENSIVE[name], None, "2", True, -1, 2.5, float("nan"), []]))
        else:
            out[name] = draw(CONFIG_VALUES)
    if cheap and out.get("mom2") != "identity":  # a run computing corpus statistics is not cheap
        out.pop("mom2_n_tokens", None)
        out.pop("mom2_n_keys", None)
        out.pop("mom2_corpus", None)
    return out


@st.composite
def configs(draw: Any, config_cls: type) -> tuple[Any, dict[str, Any]]:
    """``(config, overrides)`` as ``apply_edits`` takes them: ``config`` None, a dict, an instance
    (default, or with an attribute set after construction) or a hostile value."""
    given = draw(config_overrides(config_cls))
    overrides = draw(config_overrides(config_cls))
    form = draw(st.sampled_from(["none", "dict", "instance", "mutated instance", "hostile"]))
    if form == "none":
        return None, {**given, **overrides}
    if form == "dict":
        return given, overrides
    if form == "hostile":
        return draw(st.sampled_from([5, "rome", [("v_lr", 1)], object()])), overrides
    instance = config_cls()
    if form == "mutated instance":
        for name, value in given.items():
            if name not in ALIASES:  # old names are read-only properties
                object.__setattr__(instance, name, value)
    return instance, overrides


# -- adapter JSON -----------------------------------------------------------------------------------

JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=10**30),
    st.sampled_from([1.7, -1.0, 0.0, float("nan"), float("inf"), 1e308]),
    st.sampled_from(["", "x", "LORA", "linear", "conv1d", "\ud800", "1", "a" * 100_000]),
    st.sampled_from([[], [1.7], ["1"], [1, 2, 3], [None], [[32, 96]], {}, {"a": 1}, {"sha256": 5}]),
    st.text(max_size=5),
)

REGEX_KEYS = ["(.*.*.*.*.*.*.*.*.*.*.*)*x", "(", ".*", "model\\.layers\\..*", "down_proj", "[", "a{1000000}"]


def json_paths(obj: Any, prefix: tuple = (), depth: int = 4) -> list[tuple]:
    """Every path (a tuple of keys / indices) into ``obj`` down to ``depth``, the root excluded."""
    out = []
    if depth == 0:
        return out
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        if isinstance(obj, list) and key > 1:  # long lists: the first two items stand for all
            break
        out.append((*prefix, key))
        out += json_paths(value, (*prefix, key), depth - 1)
    return out


@st.composite
def json_mutations(draw: Any, documents: dict[str, Any]) -> tuple[str, tuple, str, Any]:
    """``(file, path, op, value)`` for one of ``documents`` (file name -> parsed JSON): ``op`` is
    ``"set"`` (a wrong-typed or wrong value), ``"delete"``, ``"regex key"`` (a regular expression as a
    key of the object at ``path``) or ``"rename"`` (the last key becomes a regular expression)."""
    name = draw(st.sampled_from(sorted(documents)))
    paths = json_paths(documents[name])
    path = draw(st.sampled_from(paths))
    op = draw(st.sampled_from(["set", "set", "set", "delete", "regex key", "rename"]))
    if op == "set":
        value = draw(JSON_VALUES)
    elif op == "regex key":
        value = (draw(st.sampled_from(REGEX_KEYS)), draw(JSON_VALUES))
    else:
        value = draw(st.sampled_from(REGEX_KEYS))
    return name, path, op, value


def apply_mutation(document: Any, path: tuple, op: str, value: Any) -> Any:
    """A mutated deep copy of ``document`` (see :func:`json_mutations`)."""
    doc = copy.deepcopy(document)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if op == "set":
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif op == "regex key":  # value: (regular expression, its value)
        target = parent[last]
        if isinstance(target, dict):
            target[value[0]] = value[1]
        else:
            parent[last] = {value[0]: value[1]}
    elif op == "rename" and isinstance(parent, dict):
        parent[value] = parent.pop(last)
    elif op == "rename":
        parent[last] = {value: parent[last]}
    return doc


# -- counting ---------------------------------------------------------------------------------------


class Tally:
    """Counts of a property's trials: tried, accepted, typed (a ``KnowEditError``), untyped (anything
    else), changed (the model's state moved although the call raised)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: Counter = Counter()
        self.untyped: list[str] = []

    def run(self, call: Callable[[], Any]) -> tuple[str, Any]:
        """``("accepted", result)``, ``("typed", error)`` or ``("untyped", error)``."""
        self.counts["tried"] += 1
        try:
            result = call()
        except KnowEditError as err:
            self.counts["typed"] += 1
            return "typed", err
        except Exception as err:  # noqa: BLE001 - the property is that this never happens
            self.counts["untyped"] += 1
            self.untyped.append(f"{type(err).__name__}: {err}"[:300])
            return "untyped", err
        self.counts["accepted"] += 1
        return "accepted", result

    def changed(self) -> None:
        self.counts["changed"] += 1

    def line(self) -> str:
        c = self.counts
        return (
            f"{self.name}: tried {c['tried']}, accepted {c['accepted']}, typed errors {c['typed']}, "
            f"untyped {c['untyped']}, changed state {c['changed']}"
        )


def print_tallies(request: Any, tallies: dict[str, Tally]) -> None:
    """Print each tally's counts past pytest's output capture (from a module fixture's teardown)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        for t in tallies.values():
            print(f"\n[trials] {t.line()}", end="")


# -- model state and small edit sets ----------------------------------------------------------------


def state_of(model: Any) -> tuple:
    """Everything a failing call must leave alone: weights, forward hooks, the edit stack."""
    import hf_knowedit
    from hf_knowedit.hooks import count_forward_hooks

    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        count_forward_hooks(model),
        [e.name for e in hf_knowedit.list_edits(model)],
    )


def same_state(a: tuple, b: tuple) -> bool:
    """Two :func:`state_of` snapshots agree bit for bit."""
    import torch

    return a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1:] == b[1:]


def small_set(seed: int) -> Any:
    """An edit set built without a model (two modules shaped like the tiny llama's MLP output)."""
    import torch

    from hf_knowedit.deltas import ModuleDelta
    from hf_knowedit.editset import EditSet

    g = torch.Generator().manual_seed(seed)
    deltas = {
        f"model.layers.{layer}.mlp.down_proj": ModuleDelta(
            A=torch.randn(2, 96, generator=g), B=torch.randn(32, 2, generator=g)
        )
        for layer in (1, 2)
    }
    req = EditRequest("{} is located in", f"Subject{seed}", "Antarctica")
    return EditSet(deltas=deltas, requests=[req], method="rome", layers=[1, 2], layouts=dict.fromkeys(deltas, "linear"))


def same_set(a: Any, b: Any) -> bool:
    """Two edit sets hold the same requests and bit-identical factors."""
    import torch

    return (
        a.requests == b.requests
        and a.deltas.keys() == b.deltas.keys()
        and all(
            torch.equal(a.deltas[p].A, b.deltas[p].A) and torch.equal(a.deltas[p].B, b.deltas[p].B) for p in a.deltas
        )
    )
