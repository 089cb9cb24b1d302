"""Generation metrics: what the model *says*, not which of two targets it scores higher.

Teacher-forced and probability-comparison metrics overstate edits ("The Mirage of Model Editing", ACL 2025:
96.8 % reported vs 38.5 % generated). Here every prompt is continued by **greedy decoding with no teacher
forcing** for a fixed ``max_new_tokens`` (never derived from the target), the continuation is cut at its
first **natural boundary** (:func:`cut_at_boundary`: a newline or a sentence end), and compared with the
answer after SQuAD-style normalisation (:func:`normalize`), as the WILD protocol does:

* **exact match** (``gen_ES``, ``gen_PS``, ``gen_NS``): the continuation *starts with* the answer
  (word-aligned: "Rome" does not match "Romeo");
* **contains** (``gen_ES_in``, ``gen_PS_in``, ``gen_NS_in``): the answer appears anywhere in it.

ES uses the rewrite prompt and ``target_new``; PS the paraphrases and ``target_new``; NS the neighbourhood
prompts and *their* answer (the fact about another subject the edit must not change), so before editing NS
is the share of neighbour facts the model itself generates, as NS is for probabilities.

Robustness (each on the rewrite prompt, exact match):

* ``gen_ES_prefix``: after a random context prefix of about ``prefix_tokens`` (50) tokens of unrelated text
  (NAMET / EAMET's protocol), :func:`random_prefix`: whole sentences drawn from :data:`FILLER` with
  ``random.Random(seed)``, one prefix per record (``seed + record index``), the same before and after editing;
* ``gen_ES_neg``: "Is Model Editing Built on Sand?" negates the prompt; where the rewrite prompt has a copula
  after the subject (:func:`negate`: "X is located in" -> "X is not located in"), success is that the
  continuation does **not** start with ``target_new`` (an edit learned as a fact, not as a shortcut from the
  subject to the target, should not be asserted after "not"). It is computed only where the edit took (the
  rewrite prompt's own continuation starts with ``target_new``) and the negated continuation is not empty:
  an unedited model, or one that says nothing, would otherwise succeed by default. Records without a
  copula, where the edit did not take, or with an empty negated continuation give no value.
  Questions: zsRE's rewrite prompts are questions already, so its ``gen_ES`` is the question form.

Each per-record value is a fraction over that record's prompts; :func:`~.metrics.aggregate` averages
records and reports percent.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence
from statistics import fmean

#: metric names, in display order
GEN_METRICS = ("gen_ES", "gen_PS", "gen_NS", "gen_ES_in", "gen_PS_in", "gen_NS_in", "gen_ES_prefix", "gen_ES_neg")

#: unrelated sentences the random prefixes are drawn from (no entities, no facts a benchmark asks about)
FILLER = (
    "The weather was mild for most of the afternoon.",
    "She folded the letter twice and put it in a drawer.",
    "A small dog ran across the empty parking lot.",
    "They decided to paint the kitchen a pale shade of green.",
    "Nobody remembered who had left the umbrella by the door.",
    "The meeting ran long, so lunch was served late.",
    "He likes to read a few pages before going to sleep.",
    "The old bicycle needed new tires and a better seat.",
    "Rain tapped gently against the window all night.",
    "We walked along the river until the path ended.",
    "The recipe called for two eggs and a cup of flour.",
    "A quiet song played somewhere down the hall.",
    "The children built a tower out of wooden blocks.",
    "It took three tries to get the stubborn lid off the jar.",
    "The train was crowded, but everyone found a seat eventually.",
    "Leaves covered the garden after the strong wind.",
    "He wrote a short list and then forgot it at home.",
    "The lamp in the corner flickered once and went out.",
    "Someone had left a half-finished puzzle on the table.",
    "The coffee was too hot, so she waited a minute.",
)

#: words that end in a period without ending a sentence (compared case-insensitively): titles, place-name
#: prefixes ("St. Petersburg", "Mt. Everest"), company suffixes, months
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt ft gen col lt sgt capt rev gov sen rep pres hon inc ltd co corp bros vs "
    "ave blvd jan feb mar apr jun jul aug sep sept oct nov dec".split()
)

_BOUNDARY = re.compile(r"\n|[.!?](?=\s|$)")
_INITIALS = re.compile(r"(?:[^\W\d_]\.)*[^\W\d_]")  # "J", "U.S", "e.g" (the final period is the boundary's)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_COPULA = re.compile(r"\b(is|was|are|were)\b")
_PUNCT = set(string.punctuation)


def cut_at_boundary(continuation: str) -> str:
    """The continuation up to its first newline or sentence end (``.``, ``!`` or ``?`` followed by a space
    or the end), stripped. A period that ends an abbreviation is no sentence end: a single letter or a
    chain of them (initials "J. K. Rowling", "U.S.", "e.g."), or a word of :data:`ABBREVIATIONS` ("St.
    Petersburg", "Mr. Bean"); a period inside a number ("3.5") is followed by no space, so never one."""
    for m in _BOUNDARY.finditer(continuation):
        if m.group() == "." and _abbreviation(continuation[: m.start()]):
            continue
        return continuation[: m.start()].strip()
    return continuation.strip()


def _abbreviation(before: str) -> bool:
    """Whether the word that ``before`` ends with (the text up to a period) is an abbreviation."""
    word = before.rsplit(None, 1)[-1].lstrip("([\"'\u201c\u2018") if before and not before[-1].isspace() else ""
    return bool(_INITIALS.fullmatch(word)) or word.casefold() in ABBREVIATIONS


def normalize(text: str) -> list[str]:
    """SQuAD's answer normalisation (used by WILD's exact match): lower case, no punctuation, no articles,
    single spaces; returned as words."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return _ARTICLES.sub(" ", text).split()


def starts_with(continuation: str, answer: str) -> bool:
    """Exact match: the normalised continuation begins with the normalised answer, word for word."""
    a = normalize(answer)
    return bool(a) and normalize(continuation)[: len(a)] == a


def contains(continuation: str, answer: str) -> bool:
    """The normalised answer is a contiguous run of words of the normalised continuation."""
    a, c = normalize(answer), normalize(continuation)
    return bool(a) and any(c[i : i + len(a)] == a for i in range(len(c) - len(a) + 1))


def negate(prompt: str, subject: str) -> str | None:
    """``prompt`` with ``not`` after the first copula (is / was / are / were) that follows the subject;
    ``None`` when there is none (the record does not allow a negated form)."""
    at = prompt.find(subject)
    start = 0 if at < 0 else at + len(subject)
    m = _COPULA.search(prompt, start)
    return None if m is None else prompt[: m.end()] + " not" + prompt[m.end() :]


def random_prefix(tokenizer, seed: int, n_tokens: int = 50) -> str:
    """Whole sentences of :data:`FILLER`, drawn with ``random.Random(seed)`` (no repeats until all are used),
    until the text has at least ``n_tokens`` tokens; ends with a space, ready to precede a prompt."""
    rng = random.Random(seed)
    pool: list[str] = []
    text = ""
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        if not pool:
            pool = list(FILLER)
            rng.shuffle(pool)
        text += pool.pop() + " "
    return text


def generation_case(
    rewrite: Sequence[str],
    paraphrase: Sequence[str],
    neighborhood: Sequence[str],
    prefixed: Sequence[str],
    negated: Sequence[str],
    target_new: str,
    neighborhood_target: str,
) -> dict[str, float]:
    """One record's generation metrics (fractions) from its cut continuations (:func:`cut_at_boundary`).

    ``negated`` continues the first rewrite prompt negated (:func:`negate`); ``gen_ES_neg`` is left out
    unless that prompt's own continuation starts with ``target_new`` (the edit took) and the negated one
    says something: otherwise "does not start with target_new" would hold for an unedited model or an
    empty continuation and show nothing."""
    out = {
        "gen_ES": fmean(starts_with(c, target_new) for c in rewrite),
        "gen_PS": fmean(starts_with(c, target_new) for c in paraphrase),
        "gen_NS": fmean(starts_with(c, neighborhood_target) for c in neighborhood),
        "gen_ES_in": fmean(contains(c, target_new) for c in rewrite),
        "gen_PS_in": fmean(contains(c, target_new) for c in paraphrase),
        "gen_NS_in": fmean(contains(c, neighborhood_target) for c in neighborhood),
    }
    if prefixed:
        out["gen_ES_prefix"] = fmean(starts_with(c, target_new) for c in prefixed)
    said = [c for c in negated if normalize(c)]
    if said and starts_with(rewrite[0], target_new):  # the negated prompt is rewrite[0] with "not"
        out["gen_ES_neg"] = fmean(not starts_with(c, target_new) for c in said)
    return out
