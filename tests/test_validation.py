"""Hostile input to requests, tokenizers and method configs: typed errors that name the field, and a
failing ``apply_edits`` leaves the model as it was (property-based, bounded).

Each property counts its trials (tried / accepted / typed errors / untyped / changed state) and the
module prints the counts at the end (``-rA`` or the terminal summary shows them)."""

import dataclasses
import math
import time
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

import hf_knowedit
from hf_knowedit import tokens
from hf_knowedit.errors import InvalidConfigError, InvalidRequestError, MissingTokenizerError
from hf_knowedit.generation import max_positions
from hf_knowedit.methods.config import make_config
from hf_knowedit.methods.registry import available_methods, get_method
from hf_knowedit.requests import EditRequest, normalize_requests, to_request
from tests.strategies import (
    CHEAP,
    GOOD,
    Tally,
    config_overrides,
    configs,
    print_tallies,
    property_settings,
    request_batches,
    same_state,
    state_of,
    valid_requests,
)
from tests.tiny_models import make_tiny_model

TALLIES: dict[str, Tally] = {}
METHODS = ["rome", "memit", "alphaedit", "emmet"]


def tally(name: str) -> Tally:
    return TALLIES.setdefault(name, Tally(name))


@pytest.fixture(scope="module", autouse=True)
def report_tallies(request):
    yield
    print_tallies(request, TALLIES)


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama")


# -- requests ---------------------------------------------------------------------------------------

WRONG_FIELDS = [
    ("subject", 5, "subject must be a string"),
    ("subject", b"Angola", "subject must be a string, got bytes"),
    ("subject", "\ud800", "subject.*surrogate"),
    ("subject", None, "no subject"),
    ("subject", ["Angola"], "subject must be a string"),
    ("prompt", None, "no prompt"),
    ("prompt", 5, "prompt must be a string"),
    ("prompt", "{} is {} in", "2 '{}' placeholders"),
    ("prompt", "{} is located in \udfff", "prompt.*surrogate"),
    ("target_new", 3.5, "target_new must be a string"),
    ("target_new", {"str": None}, "no target_new"),
    ("target_new", {"str": 7}, "target_new must be a string"),
    ("target_true", 5, "target_true must be a string"),
    ("paraphrases", 5, "paraphrases must be a list of strings"),
    ("paraphrases", [5], "paraphrases must be a string"),
    ("neighborhood", {"a": 1}, "neighborhood must be a list"),
    ("case_id", [1], "case_id"),
]


@pytest.mark.parametrize("field,value,match", WRONG_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in WRONG_FIELDS])
def test_request_fields_of_the_wrong_type_are_invalid_request_errors(field, value, match):
    for form in (dict(GOOD, **{field: value}), EditRequest(**dict(GOOD, **{field: value}))):
        with pytest.raises(InvalidRequestError, match=match):
            normalize_requests(form)


@pytest.mark.parametrize(
    "record", [{"requested_rewrite": None}, {"requested_rewrite": "Angola"}, {"requested_rewrite": 5}]
)
def test_counterfact_record_without_a_rewrite_object(record):
    with pytest.raises(InvalidRequestError, match="requested_rewrite must be a dict"):
        to_request(record)


def test_valid_forms_still_normalise_the_same():
    cf = {
        "case_id": 3,
        "requested_rewrite": {
            "prompt": "{} is located in",
            "subject": " Angola ",
            "target_new": {"str": "Antarctica", "id": "Q1"},
            "target_true": {"str": "Africa"},
        },
        "paraphrase_prompts": ["Angola lies in"],
    }
    easy = {
        "prompt": "Angola is located in",
        "subject": "Angola",
        "target_new": "Antarctica",
        "ground_truth": "Africa",
        "rephrase_prompt": "Angola lies in",
        "locality_prompt": "",
    }
    want = EditRequest("{} is located in", "Angola", "Antarctica", "Africa", ("Angola lies in",), (), None)
    assert dataclasses.replace(to_request(cf), case_id=None) == want
    assert to_request(easy) == want
    assert to_request(dict(GOOD)) == EditRequest("{} is located in", "Angola", "Antarctica")


def test_tokenizer_given_as_a_name_asks_for_a_tokenizer_object(llama):
    model, _ = llama
    before = state_of(model)
    for bad in ("gpt2", b"gpt2", 5, object()):
        with pytest.raises(MissingTokenizerError, match="fast tokenizer object"):
            hf_knowedit.apply_edits(model, bad, GOOD, "rome", **CHEAP)
    with pytest.raises(MissingTokenizerError, match=r"AutoTokenizer.from_pretrained\('gpt2'\)"):
        tokens.encode("gpt2", "Angola")
    assert same_state(before, state_of(model))


def test_encode_refuses_text_no_tokenizer_can_encode(llama):
    _, tok = llama
    for bad, match in ((None, "must be a string"), (b"x", "got bytes"), ("a\ud800b", "surrogate")):
        with pytest.raises(InvalidRequestError, match=match):
            tokens.encode(tok, bad)


# -- prompt length ----------------------------------------------------------------------------------


def test_check_length_says_how_long_and_what_fits():
    tokens.check_length(128, 128)
    with pytest.raises(InvalidRequestError, match=r"prompt is 300 tokens, the model takes at most 128; shorten it"):
        tokens.check_length(300, 128)
    with pytest.raises(InvalidRequestError, match=r"plus 11 for context templates.*at most 117 tokens"):
        tokens.check_length(120, 128, reserve=11)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_check_request_lengths_catches_prompts_longer_than_the_positions(model_type):
    model, tok = make_tiny_model(model_type)
    limit = max_positions(model)
    reqs = normalize_requests(GOOD)
    tokens.check_request_lengths(tok, reqs, limit)
    long = normalize_requests(dict(GOOD, prompt="{} is located in" + " the city" * limit))
    with pytest.raises(InvalidRequestError, match=rf"is \d+ tokens, the model takes at most {limit}; shorten it"):
        tokens.check_request_lengths(tok, long, limit)
    if model_type == "gpt2":  # without the check the model itself fails, untyped
        ids = tok(long[0].text, return_tensors="pt")["input_ids"]
        with pytest.raises(IndexError):
            model(ids)
    # exactly at the limit is fine, one more is not
    n = sum(map(len, tokens.split_prompt_target(tok, reqs[0].text, reqs[0].target_new)))
    tokens.check_request_lengths(tok, reqs, n)
    with pytest.raises(InvalidRequestError):
        tokens.check_request_lengths(tok, reqs, n - 1)
    with pytest.raises(InvalidRequestError, match="context_length"):
        tokens.check_request_lengths(tok, reqs, n, reserve=1)


# -- configs ----------------------------------------------------------------------------------------


def config_classes():
    return {m: get_method(m).config_cls for m in available_methods() if m in METHODS}


def test_every_numeric_and_bool_field_of_every_config_has_a_rule():
    for method, cls in config_classes().items():
        for f in dataclasses.fields(cls):
            if f.name == "mom2_corpus":  # checked by check_corpus
                continue
            assert f.metadata.get("check"), f"{cls.__name__}.{f.name} declares no check rule"


@pytest.mark.parametrize("method", METHODS)
def test_every_field_refuses_none_strings_bools_and_non_finite_values(method):
    cls = config_classes()[method]
    for f in dataclasses.fields(cls):
        rule = f.metadata.get("check", "")
        bad = ["x", b"1", [1], {"a": 1}]
        if not rule.startswith("?"):
            bad.append(None)
        if rule.lstrip("?") != "bool":
            bad += [True, False]
        if rule.lstrip("?").startswith(("num", "int", "(0,1]")):
            bad += [float("nan"), float("inf"), -float("inf"), 10**400 if "int" not in rule else 2.5, "3"]
        if f.name == "mom2_corpus":
            bad = ["a text", b"x", [], [5], 5, {"text": "x"}]
        for value in bad:
            with pytest.raises(InvalidConfigError, match=rf"{cls.__name__}\.{f.name} must be"):
                cls(**{f.name: value})
        cls(**{f.name: getattr(cls(), f.name)})  # the default is valid


@pytest.mark.parametrize(
    "field,value",
    [
        ("v_lr", True),
        ("clamp_norm_factor", float("inf")),
        ("early_stop", float("inf")),
        ("band_size", float("inf")),
        ("v_lr", 10**400),
        ("kl_factor", float("nan")),
        ("dense_fraction", float("nan")),
        ("max_batch", 1e3),
    ],
)
def test_bools_infinities_and_huge_ints_are_refused_not_used(field, value):
    with pytest.raises(InvalidConfigError, match=f"MEMITConfig.{field}"):
        hf_knowedit.MEMITConfig(**{field: value})


@pytest.mark.parametrize("method", METHODS)
def test_unknown_option_is_refused_through_every_route(method):
    cls = config_classes()[method]
    instance = cls()
    instance.stepz = 2  # set after construction
    for route in (
        lambda: make_config(cls, {"stepz": 2}, {}, method),
        lambda: make_config(cls, None, {"stepz": 2}, method),
        lambda: make_config(cls, cls(), {"stepz": 2}, method),
        lambda: make_config(cls, instance, {}, method),
        lambda: cls(stepz=2),
        lambda: dataclasses.replace(cls(), stepz=2),
        lambda: cls(*range(100)),
    ):
        with pytest.raises(InvalidConfigError, match="stepz|positional"):
            route()


def test_unknown_option_through_apply_edits_leaves_the_model_untouched(llama):
    model, tok = llama
    before = state_of(model)
    for kwargs in (dict(config={"stepz": 2}), dict(stepz=2), dict(config=hf_knowedit.ROMEConfig(), stepz=2)):
        with pytest.raises(InvalidConfigError, match="stepz"):
            hf_knowedit.apply_edits(model, tok, GOOD, "rome", **kwargs)
    assert same_state(before, state_of(model))


def test_old_names_as_overrides_of_an_instance_warn_and_apply():
    with pytest.warns(FutureWarning, match="v_lr"):
        cfg = make_config(hf_knowedit.ROMEConfig, hf_knowedit.ROMEConfig(v_lr=0.1), {"lr": 0.3}, "rome")
    assert cfg.v_lr == 0.3
    with pytest.raises(InvalidConfigError, match="v_lr only"):
        make_config(hf_knowedit.ROMEConfig, {"lr": 0.1, "v_lr": 0.2}, {}, "rome")


# -- properties -------------------------------------------------------------------------------------


@property_settings(400)
@given(request_batches())
def test_property_requests_are_accepted_or_refused_with_a_typed_error(batch):
    t = tally("normalize_requests")
    outcome, result = t.run(lambda: normalize_requests(batch))
    assert outcome != "untyped", f"{type(result).__name__}: {result}"
    if outcome == "accepted":
        for r in result:
            assert all(isinstance(x, str) for x in (r.prompt, r.subject, r.target_new)), r
            assert r.prompt.count("{}") == 1 and r.subject and r.target_new
            assert all(isinstance(p, str) for p in (*r.paraphrases, *r.neighborhood))
            r.text.encode("utf-8")  # no lone surrogates


@property_settings(200)
@given(st.sampled_from(METHODS), st.data())
def test_property_configs_are_accepted_or_refused_with_a_typed_error(method, data):
    cls = config_classes()[method]
    config, overrides = data.draw(configs(cls))
    t = tally("make_config")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        outcome, result = t.run(lambda: make_config(cls, config, overrides, method))
    assert outcome != "untyped", f"{type(result).__name__}: {result}"
    if outcome == "accepted":  # every checked field obeys its rule
        for f in dataclasses.fields(cls):
            value = getattr(result, f.name)
            rule = f.metadata.get("check", "")
            if rule.lstrip("?").startswith("num") and value is not None:
                assert not isinstance(value, bool) and math.isfinite(value), (f.name, value)
            if rule.lstrip("?").startswith("int") and not (rule.startswith("?") and value is None):
                assert isinstance(value, int) and not isinstance(value, bool), (f.name, value)


@property_settings(70)
@given(
    st.sampled_from(METHODS),
    st.one_of(valid_requests(), st.lists(valid_requests(), min_size=1, max_size=3), request_batches(30, huge=False)),
    st.data(),
    st.sampled_from(["tokenizer"] * 8 + [None, "gpt2", 5]),
    st.booleans(),
)
def test_property_apply_edits_raises_typed_and_leaves_the_model_as_it_was(llama, method, batch, data, which, merge):
    """Any request batch, config and tokenizer: accepted (then reverted bit-exactly) or a typed error with
    weights, hooks and edit stack exactly as before."""
    model, tok = llama
    tokenizer = tok if which == "tokenizer" else which
    random = data.draw(st.one_of(st.just({}), config_overrides(get_method(method).config_cls, cheap=True)))
    # with C = I AlphaEdit's null space is empty unless the threshold exceeds 1
    overrides = {**CHEAP, **({"nullspace_threshold": 2.0} if method == "alphaedit" else {}), **random}
    before = state_of(model)
    t = tally("apply_edits")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome, result = t.run(
            lambda: hf_knowedit.apply_edits(
                model, tokenizer, batch, method, layers=[1, 2] if method != "rome" else [1], merge=merge, **overrides
            )
        )
    assert time.perf_counter() - start < 60, "apply_edits took too long"
    assert outcome != "untyped", f"{type(result).__name__}: {result}"
    if outcome == "accepted":
        hf_knowedit.revert_edits(model)
    if not same_state(before, state_of(model)):
        t.changed()
        raise AssertionError(f"{outcome} call changed the model's state")


def test_trial_counts_are_clean():
    """Runs last in this module: no property saw an untyped error or a changed state."""
    for t in TALLIES.values():
        assert t.counts["untyped"] == 0 and t.counts["changed"] == 0, (t.line(), t.untyped[:3])
