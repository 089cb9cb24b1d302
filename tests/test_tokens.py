"""Subject and target token positions from offset mappings."""

import pytest

from hf_knowedit.errors import InvalidRequestError, SubjectNotFoundError
from hf_knowedit.tokens import encode_template, split_prompt_target, subject_token_span
from tests.tiny_models import make_tiny_tokenizer


@pytest.fixture(params=[False, True], ids=["no-bos", "bos"])
def tok(request):
    return make_tiny_tokenizer(add_bos=request.param)


def _decoded(tok, prompt, span):
    ids = tok(prompt)["input_ids"]
    return tok.decode(ids[span[0] : span[1]]).strip()


@pytest.mark.parametrize(
    "prompt,subject",
    [
        ("The Eiffel Tower is located in Paris", "Eiffel Tower"),
        ("Angola is located in Africa", "Angola"),  # subject at the start
        ("The capital of Ångström Straße is", "Ångström Straße"),  # non-ASCII
        ("Say hello to   Bob", "Bob"),
    ],
)
def test_subject_span_decodes_to_subject(tok, prompt, subject):
    span = subject_token_span(tok, prompt, subject)
    assert span[0] < span[1]
    assert _decoded(tok, prompt, span) == subject


def test_bos_shifts_span():
    plain, bos = make_tiny_tokenizer(False), make_tiny_tokenizer(True)
    p = "Angola is located in"
    assert bos("x")["input_ids"][0] == bos.bos_token_id
    assert subject_token_span(bos, p, "Angola")[0] == subject_token_span(plain, p, "Angola")[0] + 1
    assert subject_token_span(bos, p, "Angola")[0] == 1


def test_subject_with_leading_space_is_stripped(tok):
    assert subject_token_span(tok, "I met Bob today", " Bob") == subject_token_span(tok, "I met Bob today", "Bob")


def test_repeated_subject_first_occurrence_by_default(tok):
    p = "Paris is big and Paris is old"
    first = subject_token_span(tok, p, "Paris")
    last = subject_token_span(tok, p, "Paris", occurrence=-1)
    assert first[0] < last[0]
    assert _decoded(tok, p, last) == "Paris"


def test_template_uses_placeholder_position(tok):
    enc = encode_template(tok, "{} and {} again", "Bob")
    assert enc.text == "Bob and Bob again"
    assert enc.subject_span == subject_token_span(tok, enc.text, "Bob")
    enc2 = encode_template(tok, "{} lives in", "Bob", prefix="Once upon a time. ")
    assert tok.decode(enc2.input_ids[enc2.subject_span[0] : enc2.subject_span[1]]).strip() == "Bob"


@pytest.mark.parametrize("subject", ["Zorro", "", "   "])
def test_missing_or_empty_subject(tok, subject):
    with pytest.raises(SubjectNotFoundError):
        subject_token_span(tok, "Angola is located in", subject)


def test_split_prompt_target_in_context(tok):
    prompt_ids, target_ids = split_prompt_target(tok, "The city of", "New Paris")
    full = tok("The city of New Paris")["input_ids"]
    assert prompt_ids + target_ids == full
    assert tok.decode(target_ids).strip() == "New Paris"
    with pytest.raises(InvalidRequestError):
        split_prompt_target(tok, "The city of", "  ")
