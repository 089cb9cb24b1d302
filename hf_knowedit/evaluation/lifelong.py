"""Lifelong editing: a stream of edits in batches, measured at checkpoints, resumable.

    >>> res = hf_knowedit.evaluation.run_lifelong(model, tok, "counterfact_flat_edit_10000.json", method="alphaedit",
    ...                                           n_edits=3000, batch_size=100, checkpoint_every=500,
    ...                                           known="known_1000.json", state_dir="runs/alphaedit")
    >>> res.to_markdown(); res.plot(path="alphaedit.png")

The first ``n_edits`` records (less any that repeat an earlier record's fact: they would conflict with it;
their indices are in ``settings["skipped"]``) are applied in consecutive batches of ``batch_size`` (one
:func:`~hf_knowedit.editing.apply_edits` call each, never reverted while the stream runs). Row 0 is the
unedited model; then every ``checkpoint_every`` edits (and after the last batch) one row holds:

* ``ES, PS, NS, S`` (and EasyEdit's token accuracies) on **all records edited so far**
  (row 0: on all records of the stream, the unedited baseline);
* the generation metrics (:mod:`.generative`: ``gen_ES``, ``gen_PS``, ``gen_NS``, prefix, negation) on a
  fixed random sample of ``gen_sample`` records (seeded), those of them edited so far (row 0: all of them);
  ``gen_ES_neg_n``: how many of them have a ``gen_ES_neg`` (only records whose edit took);
* with ``chat=True``, the chat metrics (:mod:`.chat`: ``chat_ES``, ``chat_PS``, ``chat_NS``, ``chat_keep``, the
  questions asked through the chat template) on the same sample, those of them edited so far (row 0: all of
  them); ``chat_keep`` asks ``known``'s facts (none without ``known``);
* ``GE``: fluency of sampled continuations of the whole sample's prompts (generation prompts where the schema
  has them, else the rewrite prompts; one seeded generator per prompt);
* ``ppl``: perplexity of a fixed held-out text: ``heldout_text``, or by default the ``n_heldout`` known facts
  after the probed ones, as sentences ("``prompt`` ``attribute``.", joined by spaces); text used nowhere else in
  the stream (not the prefix sentences of ``gen_ES_prefix``, not a record's prompts). No ``ppl`` without either;
* ``known_acc``: retention of facts the model knew: share of ``n_known`` known facts (ROME's
  ``known_1000.json``: ``prompt`` -> ``attribute``) whose greedy continuation starts with the attribute. The
  probes are the file's first ``n_known`` facts whose prompt does not mention (:func:`mentions`) the subject
  of any record of the **whole stream**, so every row, row 0 included, checks the same facts, none of which an
  edit of the stream rewrites; ``settings["known_excluded"]`` counts the facts passed over;
* ``edit_s`` (seconds spent editing so far) and ``eval_s`` (seconds this row took);
* ``norm_growth`` / ``norm_growth_max``: mean / largest ``‖W‖_F / ‖W₀‖_F`` over the modules the stream edited
  (ENCORE's diagnostic: MEMIT's edited layers grow > 10x over 10,000 edits), read through the architecture
  table's :func:`~hf_knowedit.architectures.read_tensor` (accelerate-offloaded weights included);
* ``failed``: edits that raised so far (their records stay unedited and count as failures).

**Resuming.** With ``state_dir``, each checkpoint writes the batches' edit sets (PEFT adapters, exact
float32 factors), the method history (e.g. AlphaEdit's accumulated keys; RLSEdit's ``P``, ``8 d_in²`` bytes
per layer: :func:`hf_knowedit.methods.memory.state_bytes`; only the latest history file is kept) and the rows,
rows last; the unedited model's scores of all records (row 0, and locality's reference) are kept in
``baseline.json``, keyed by the records and a hash of every weight of the model. A run called again with the
same ``state_dir`` and settings on the *unedited* model loads the sets (merged, or hooked when the stream runs
with ``merge=False``) and the history of its last checkpoint and continues from there: the rows are those of an
uninterrupted run (seconds aside). A stream saved without ``chat`` and called again with ``chat=True`` first
adds the chat metrics to its saved rows, reloading its saved sets up to each row (no edit is recomputed), then
goes on with them. At the end the stream's edits are reverted (``keep_edits=False``), as
``evaluate`` does. :func:`replay_stream` walks a saved stream's rows on the model as it was at each, to measure
something the stream did not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.utils import tqdm
from torch import nn

from ..architectures import edited_param, get_architecture, model_device, read_tensor
from ..editing import apply_edits, get_method
from ..editset import EditSet
from ..errors import InvalidConfigError, InvalidDataError, KnowEditError
from ..generation import generate_texts, max_positions
from ..hooks import frozen
from ..stack import effective_weight, get_edit_set, get_state, list_edits, load_edits, revert_edits
from . import chat as C
from . import generative as G
from . import metrics as M
from .datasets import first_per_fact, load_records
from .protocols import Scorer, case_metrics, encode_record
from .scoring import TargetScore

logger = logging.getLogger(__name__)

#: row fields in display order (metrics absent for a schema are left out)
ROW_ORDER = (
    "n_edits",
    *M.ROME_METRICS,
    *M.ZSRE_METRICS,
    *G.GEN_METRICS,
    "gen_ES_neg_n",
    *C.CHAT_METRICS,
    "ppl",
    "known_acc",
    "norm_growth",
    "norm_growth_max",
    "edit_s",
    "eval_s",
    "failed",
)
#: row fields that are counts (shown without decimals)
COUNTS = ("n_edits", "gen_ES_neg_n", "failed")


@dataclass
class LifelongResult:
    """The rows of one stream (see the module docstring) and the settings that made them."""

    method: str
    rows: list[dict[str, float]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))

    def to_markdown(self, digits: int = 1, columns: Sequence[str] | None = None) -> str:
        """One row per checkpoint."""
        have = {k for r in self.rows for k in r}
        cols = [c for c in (columns or ROW_ORDER) if c in have]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            cells = [_fmt(r.get(c), 0 if c in COUNTS else 3 if "growth" in c else digits) for c in cols]
            lines.append("| " + " | ".join(cells) + " |")
        return f"**{self.method}** lifelong stream, batches of {self.settings.get('batch_size')}\n\n" + "\n".join(lines)

    def plot(self, path: Any = None) -> Any:
        return plot_lifelong([self], path=path)


def _fmt(x: Any, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def plot_lifelong(results: Sequence[LifelongResult], path: Any = None) -> Any:
    """Curves of several streams side by side: efficacy / generalisation / locality, generation metrics,
    general ability (fluency, perplexity, known facts, relative to row 0) and weight-norm growth.
    Needs matplotlib (imported here only). Returns the figure; saves it when ``path`` is given."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        (axes[0, 0], ("ES", "PS", "NS"), "percent", False, False),
        (axes[0, 1], ("gen_ES", "gen_PS", "gen_NS", "gen_ES_prefix"), "percent (generation)", False, False),
        (axes[1, 0], ("GE", "ppl", "known_acc"), "relative to unedited", True, True),
        (axes[1, 1], ("norm_growth", "norm_growth_max"), "‖W‖ / ‖W₀‖ of edited layers", False, True),
    ]  # (axes, metrics, label, divide by row 0, a ratio: log scale once it spans 10×)
    styles = ["-", "--", ":", "-."]  # one colour per stream, one line style per metric
    for ax, names, label, relative, ratio in panels:
        top = 0.0
        for r, res in enumerate(results):
            xs = [row["n_edits"] for row in res.rows]
            for m, name in enumerate(names):
                ys = [row.get(name) for row in res.rows]
                if all(y is None for y in ys):
                    continue
                if relative and res.rows and res.rows[0].get(name):
                    ys = [None if y is None else y / res.rows[0][name] for y in ys]
                top = max([top, *(y for y in ys if y is not None)])
                ax.plot(xs, ys, styles[m % len(styles)], color=f"C{r % 10}", marker="o", markersize=3)
        if ratio and top >= 10:
            ax.set_yscale("log")  # a collapsed stream (perplexity ×10⁶) would flatten every other curve
        ax.set_xlabel("number of edits")
        ax.set_ylabel(label)
        metric_keys = [Line2D([], [], color="gray", linestyle=styles[m % len(styles)]) for m in range(len(names))]
        ax.legend(metric_keys, names, fontsize=7, title="metric", title_fontsize=7)
    method_keys = [Line2D([], [], color=f"C{r % 10}", marker="o") for r in range(len(results))]
    fig.legend(method_keys, [res.method for res in results], loc="lower center", ncol=min(len(results), 4))
    fig.tight_layout(rect=(0, 0.03 * (1 + (len(results) - 1) // 4), 1, 1))
    if path is not None:
        fig.savefig(path, bbox_inches="tight", dpi=120)
    return fig


# ----------------------------------------------------------------------------- measurements


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, text: str) -> float:
    """``exp`` of the mean next-token NLL (float32) of ``text``, read in windows of the model's length."""
    ids = list(tokenizer(text)["input_ids"])
    window = min(max_positions(model), 1024)
    device = model_device(model)
    total, count = 0.0, 0
    with frozen(model, params=False):
        for s in range(0, max(1, len(ids) - 1), window - 1):
            chunk = torch.tensor([ids[s : s + window]], device=device)
            if chunk.shape[1] < 2:
                break
            logp = torch.log_softmax(model(input_ids=chunk).logits[0, :-1].float(), -1)
            total -= float(logp.gather(-1, chunk[0, 1:, None]).sum())
            count += chunk.shape[1] - 1
    return math.exp(total / max(count, 1))


def known_accuracy(
    model: nn.Module, tokenizer: Any, facts: Sequence[tuple[str, str]], max_new_tokens: int = 20
) -> float:
    """Percent of ``(prompt, attribute)`` facts whose greedy continuation, cut at its natural boundary,
    starts with the attribute (:mod:`.generative`'s exact match)."""
    if not facts:
        return float("nan")
    texts = generate_texts(model, tokenizer, [p for p, _ in facts], max_new_tokens=max_new_tokens, seed=None)
    return (
        100.0
        * sum(G.starts_with(G.cut_at_boundary(t[len(p) :]), a) for (p, _), t, (_, a) in zip(facts, texts, facts))
        / len(facts)
    )


def fluency(model: nn.Module, tokenizer: Any, prompts: Sequence[str], seed: int, max_new_tokens: int) -> float:
    """GE (ROME's n-gram entropy, 100 x bits) of top-5 samples from ``prompts``, prompt ``j`` seeded ``seed + j``."""
    texts = generate_texts(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, row_seeds=[seed + j for j in range(len(prompts))]
    )
    return M.ngram_entropy(texts)


def norm_growth(model: nn.Module, paths: Iterable[str]) -> tuple[float, float]:
    """Mean and largest ``‖W‖_F / ‖W₀‖_F`` over ``paths`` (``W``: the weight the module acts with now,
    hooked sets included; ``W₀``: its pristine copy where a set is merged, else the module's weight, read
    with :func:`~hf_knowedit.architectures.read_tensor` so that offloaded modules work)."""
    state = get_state(model)
    layout = get_architecture(model).mlp_out_layout
    ratios = []
    for path in sorted(paths):
        base = state.base.get(path)
        base = read_tensor(model, edited_param(path, layout)) if base is None else base  # pristine if merged
        ratios.append(float(effective_weight(model, path, layout).norm() / base.detach().float().norm()))
    return (sum(ratios) / len(ratios), max(ratios)) if ratios else (1.0, 1.0)


def load_known(source: Any, n: int | None = None) -> list[tuple[str, str]]:
    """The first ``n`` (``None``: all) facts of ``known_1000.json`` (a path or a list of dicts with ``prompt``
    and ``attribute``)."""
    if source is None or n == 0:
        return []
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as f:
            source = json.load(f)
    facts = []
    for i, r in enumerate(list(source)[:n]):
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not isinstance(r.get("attribute"), str):
            raise InvalidDataError(f"known fact {i}: needs string fields 'prompt' and 'attribute', got {r!r}.")
        facts.append((r["prompt"], r["attribute"]))
    return facts


_CUTS = re.compile(r"\b|(?<=\s)|(?=\s)")


def mentions(text: str, subjects: set[str]) -> bool:
    """Whether ``text`` holds one of ``subjects`` as whole words: a span that starts and ends at a word
    boundary or a space (``"Apple's"`` mentions ``Apple``, ``"Applebee's"`` does not). Case-sensitive."""
    cuts = sorted({0, len(text), *(m.start() for m in _CUTS.finditer(text))})
    return any(text[i:j] in subjects for k, i in enumerate(cuts) for j in cuts[k + 1 :])


def split_known(
    facts: Sequence[tuple[str, str]], subjects: set[str], n_known: int, n_heldout: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]], int]:
    """The probes (the first ``n_known`` facts whose prompt :func:`mentions` none of ``subjects``), the
    held-out facts (the next ``n_heldout`` such facts) and how many facts were passed over to pick the probes."""
    probes: list[tuple[str, str]] = []
    heldout: list[tuple[str, str]] = []
    excluded = 0
    for fact in facts:
        if len(probes) == n_known and len(heldout) == n_heldout:
            break
        if mentions(fact[0], subjects):
            excluded += len(probes) < n_known
        elif len(probes) < n_known:
            probes.append(fact)
        else:
            heldout.append(fact)
    return probes, heldout, excluded


# ----------------------------------------------------------------------------- the stream


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidConfigError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


def run_lifelong(
    model: nn.Module,
    tokenizer: Any,
    records: Any,
    *,
    method: str,
    n_edits: int | None = None,
    batch_size: int = 100,
    checkpoint_every: int = 500,
    gen_sample: int = 100,
    known: Any = None,
    n_known: int = 100,
    heldout_text: str | None = None,
    n_heldout: int = 200,
    seed: int = 0,
    state_dir: str | os.PathLike | None = None,
    keep_edits: bool = False,
    gen_max_new_tokens: int = 20,
    chat: bool = False,
    fluency_new_tokens: int = 50,
    score_batch_size: int = 32,
    progress: bool = True,
    **edit_kwargs: Any,
) -> LifelongResult:
    """Apply the first ``n_edits`` records as a stream of batches and measure it (module docstring).

    Args:
        records: benchmark records (a JSON file or a list; any schema of :func:`load_records`).
        method: a registered editing method; ``**edit_kwargs`` go to every ``apply_edits`` call.
        batch_size / checkpoint_every: edits per batch; a row every this many edits (a multiple of ``batch_size``).
        gen_sample: records in the fixed, seeded sample for generation metrics and fluency.
        known / n_known: ``known_1000.json`` (path or list) and how many of its facts to check (facts that
            mention a subject of the stream are passed over).
        heldout_text / n_heldout: text for perplexity; by default the ``n_heldout`` known facts after the probes.
        state_dir: folder for checkpoints; a run found there with the same settings is continued.
        keep_edits: leave the stream's edits on the model at the end (default: revert them).
        chat: also measure the chat metrics on the generation sample (CounterFact full schema or zsRE).
    """
    get_method(method)
    _check_int("batch_size", batch_size, 1)
    _check_int("checkpoint_every", checkpoint_every, 1)
    _check_int("gen_sample", gen_sample, 0)
    _check_int("n_known", n_known, 0)
    _check_int("n_heldout", n_heldout, 0)
    if checkpoint_every % batch_size:
        raise InvalidConfigError(
            f"checkpoint_every ({checkpoint_every}) must be a multiple of batch_size ({batch_size})."
        )
    recs, skipped = first_per_fact(load_records(records, limit=n_edits))  # a repeated fact would conflict
    if skipped:
        logger.warning(
            "Skipping %d record(s) that repeat an earlier fact: %s", len(skipped), [r.where for r in skipped]
        )
    facts, heldout, known_excluded = split_known(
        load_known(known), {r.request.subject for r in recs}, n_known, n_heldout
    )
    text = heldout_text or " ".join(f"{p} {a}." for p, a in heldout)
    if list_edits(model):
        raise InvalidConfigError(
            "run_lifelong needs the unedited model (it has active edit sets); revert them first "
            "(hf_knowedit.revert_edits(model)). A resumed run loads its own edits from state_dir."
        )
    n = len(recs)
    settings = {
        "method": method,
        "n_edits": n,
        "batch_size": batch_size,
        "checkpoint_every": checkpoint_every,
        "gen_sample": gen_sample,
        "n_known": len(facts),
        "known_excluded": known_excluded,
        "seed": seed,
        "case_ids": [r.case_id for r in recs[:5]] + [r.case_id for r in recs[-5:]],
        "skipped": [r.index for r in skipped],
        "edit_kwargs": {k: repr(v) for k, v in sorted(edit_kwargs.items())},
        "heldout": "heldout_text" if heldout_text else "known" if text else None,
        "heldout_chars": len(text),
        "gen_max_new_tokens": gen_max_new_tokens,
        "fluency_new_tokens": fluency_new_tokens,
    }
    if chat:  # only then, so that a stream saved without the option still resumes
        settings["chat"] = True
    state_path = None if state_dir is None else Path(state_dir)
    saved = _read_progress(state_path, settings)

    encoded = [encode_record(tokenizer, r) for r in recs]
    scorer = Scorer(model, tokenizer, encoded, batch_size=score_batch_size, fluency=False)
    sample = sorted(random.Random(seed).sample(range(n), min(gen_sample, n)))
    gen_scorer = Scorer(
        model,
        tokenizer,
        [encoded[i] for i in sample],
        batch_size=score_batch_size,
        fluency=False,
        generation=True,
        seed=seed,
        gen_max_new_tokens=gen_max_new_tokens,
        chat=chat,
        chat_known=C.load_known_facts(known) if chat and known is not None else (),
    )
    fluency_prompts = [p for i in sample for p in (recs[i].generation_prompts or recs[i].rewrite_prompts)]
    pre = _baseline(state_path, settings, scorer, n)  # the unedited scores (locality's reference)

    def sampled(done: int) -> list[int]:
        """The sample's records edited once ``done`` edits are (row 0: the whole sample)."""
        return [k for k, i in enumerate(sample) if i < done] if done else list(range(len(sample)))

    def chat_row(done: int) -> dict[str, float]:
        return M.aggregate([c for c in gen_scorer.chat_metrics(sampled(done)) if c])

    def checkpoint(done: int, edit_s: float, failed: int, touched: set[str]) -> dict[str, float]:
        t = time.perf_counter()
        idx = list(range(done)) if done else list(range(n))
        now = scorer.scores(idx) if done else pre  # row 0 is the unedited model: its scores are ``pre``
        cases = [case_metrics(recs[i], s, pre[i]) for i, s in zip(idx, now)]
        gens = [g for g in gen_scorer.gen(sampled(done)) if g]
        row: dict[str, float] = {"n_edits": done, **M.aggregate(cases), **M.aggregate(gens)}
        if gens:
            row["gen_ES_neg_n"] = sum("gen_ES_neg" in g for g in gens)  # the records it is computed on
        row.update(chat_row(done))
        if fluency_prompts:
            row["GE"] = fluency(model, tokenizer, fluency_prompts, seed, fluency_new_tokens)
        if text:
            row["ppl"] = perplexity(model, tokenizer, text)
        if facts:
            row["known_acc"] = known_accuracy(model, tokenizer, facts, gen_max_new_tokens)
        row["norm_growth"], row["norm_growth_max"] = norm_growth(model, touched)
        row.update(edit_s=edit_s, failed=failed, eval_s=time.perf_counter() - t)
        return row

    names: list[str] = []
    touched: set[str] = set()
    batches = [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]

    def reload(name: str) -> None:
        es = load_edits(model, state_path / "sets" / name, name=name, merge=edit_kwargs.get("merge", True))
        names.append(name)
        touched.update(es.deltas)

    if saved is not None:
        rows, edit_s, failed = saved["rows"], saved["edit_s"], saved["failed"]
        todo = list(saved["sets"])
        replay = chat and not saved["settings"].get("chat")
        if replay:  # rows saved without the chat metrics: add them, reloading the sets up to each row
            logger.info("Adding the chat metrics to the %d saved rows of %s.", len(rows), state_path)
            for row in rows:
                while todo and _edits_with(todo[0], n, batch_size) <= row["n_edits"]:
                    reload(todo.pop(0))
                row.update(chat_row(row["n_edits"]))
        for name in todo:
            reload(name)
        history = torch.load(state_path / saved["history"], weights_only=False)
        get_state(model).history.clear()
        get_state(model).history.update(history)
        if replay:
            _save(state_path, settings, rows, names, [], model, edit_s, failed)
        logger.info("Resuming %s at %d edits from %s.", method, rows[-1]["n_edits"], state_path)
    else:
        rows, edit_s, failed = [checkpoint(0, 0.0, 0, touched)], 0.0, 0
        _save(state_path, settings, rows, names, [], model, edit_s, failed)

    start = rows[-1]["n_edits"] // batch_size if rows[-1]["n_edits"] < n else len(batches)
    since: list[str] = []
    try:
        for b in tqdm(range(start, len(batches)), desc=f"{method} stream", disable=not progress):
            name = f"lifelong-{b:05d}"
            t = time.perf_counter()
            try:
                es = apply_edits(
                    model, tokenizer, [recs[i].request for i in batches[b]], method=method, name=name, **edit_kwargs
                )
                names.append(es.name)
                since.append(es.name)
                touched |= set(es.deltas)
            except KnowEditError as err:
                failed += len(batches[b])
                logger.warning(
                    "Batch %d of the stream failed (%s: %s); its records stay unedited.", b, type(err).__name__, err
                )
            edit_s += time.perf_counter() - t
            done = batches[b][-1] + 1
            if done % checkpoint_every == 0 or done == n:
                rows.append(checkpoint(done, edit_s, failed, touched))
                _save(state_path, settings, rows, names, since, model, edit_s, failed)
                since = []
    finally:
        if not keep_edits:
            for name in reversed(names):
                revert_edits(model, name)
    return LifelongResult(method, rows, {k: v for k, v in settings.items() if k != "case_ids"})


def replay_stream(model: nn.Module, state_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Walk a saved stream (the ``state_dir`` of :func:`run_lifelong`) on ``model``, its unedited model.

    Yields a copy of each saved row once ``model`` holds exactly the stream's sets that were on it when the row was
    measured (row 0: none), loaded merged or hooked as the stream ran; no edit is recomputed. The caller measures
    what it likes at each row (another held-out text, a new metric) on the model as it was. When the walk ends
    (exhausted, closed or raised), every set it loaded is reverted.

    Raises (at the call, before any set is loaded):
        InvalidDataError: ``state_dir`` holds no saved stream.
        InvalidConfigError: ``model`` is not the model the stream started from (its ``baseline.json`` key), or
            already holds one of the stream's sets.
    """
    path = Path(state_dir)
    if not (path / "progress.json").exists():
        raise InvalidDataError(f"{path} holds no saved lifelong stream (no progress.json): pass a run_lifelong folder.")
    saved = json.loads((path / "progress.json").read_text(encoding="utf-8"))
    if (path / "baseline.json").exists():
        key = json.loads((path / "baseline.json").read_text(encoding="utf-8"))["key"]
        if key.get("model") != weights_sha256(model):
            raise InvalidConfigError(
                f"{path} was measured on another model (or this one already edited): load the unedited model it "
                "started from, without edits, and replay again."
            )
    held = {e.name for e in list_edits(model)} & set(saved["sets"])
    if held:
        raise InvalidConfigError(f"The model already holds {sorted(held)} of {path}: revert them before a replay.")
    return _walk(model, path, saved)


def _walk(model: nn.Module, path: Path, saved: dict[str, Any]) -> Iterator[dict[str, Any]]:
    n, size = saved["settings"]["n_edits"], saved["settings"]["batch_size"]
    merge = saved["settings"].get("edit_kwargs", {}).get("merge", "True") != "False"
    todo, loaded = list(saved["sets"]), []
    try:
        for row in saved["rows"]:
            while todo and _edits_with(todo[0], n, size) <= row["n_edits"]:
                name = todo.pop(0)
                load_edits(model, path / "sets" / name, name=name, merge=merge)
                loaded.append(name)
            yield dict(row)
    finally:
        for name in reversed(loaded):
            revert_edits(model, name)


def _edits_with(name: str, n: int, batch_size: int) -> int:
    """How many edits of an ``n``-edit stream are done once its set ``name`` is on (``lifelong-00012``, batches
    of 100: 1,300): the rows from that many edits on were measured with it."""
    return min(n, (int(name.rsplit("-", 1)[1]) + 1) * batch_size)


def _baseline(path: Path | None, settings: dict[str, Any], scorer: Scorer, n: int) -> list[Any]:
    """The unedited model's scores of all ``n`` records, from ``path/baseline.json`` when it was written for
    the same records and the same model (:func:`weights_sha256`), else scored and written. The
    method plays no part: a resumed stream, or another method's stream given a copy of the file, skips a
    full scoring pass."""
    if path is None:
        return scorer.scores(range(n))
    key = {k: settings[k] for k in ("n_edits", "case_ids", "skipped")}
    key["model"] = weights_sha256(scorer.model)
    file = path / "baseline.json"
    if file.exists():
        with open(file, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("key") == json.loads(json.dumps(key)):
            return [_scores_from_json(s) for s in saved["scores"]]
    pre = scorer.scores(range(n))
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"key": key, "scores": [_scores_to_json(s) for s in pre]}, f)
    os.replace(tmp, file)
    return pre


def weights_sha256(model: nn.Module) -> str:
    """sha256 of every parameter of ``model``: names, dtypes, shapes and bytes (offloaded ones read with
    :func:`~hf_knowedit.architectures.read_tensor`)."""
    h = hashlib.sha256()
    for name, _ in model.named_parameters():
        t = read_tensor(model, name).detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _scores_to_json(scores: dict[str, list[tuple[Any, Any]]]) -> dict[str, Any]:
    return {g: [[None if t is None else asdict(t) for t in pair] for pair in pairs] for g, pairs in scores.items()}


def _scores_from_json(saved: dict[str, Any]) -> dict[str, list[tuple[Any, Any]]]:
    def target(t: dict[str, Any] | None) -> TargetScore | None:
        return None if t is None else TargetScore(**{k: tuple(v) for k, v in t.items()})

    return {g: [(target(a), target(b)) for a, b in pairs] for g, pairs in saved.items()}


def _read_progress(path: Path | None, settings: dict[str, Any]) -> dict[str, Any] | None:
    if path is None or not (path / "progress.json").exists():
        return None
    with open(path / "progress.json", encoding="utf-8") as f:
        saved = json.load(f)
    want = json.loads(json.dumps(settings))
    if want.get("chat") and "chat" not in saved["settings"]:
        del want["chat"]  # saved without the chat metrics: the resume adds them to its rows
    if saved["settings"] != want:
        diff = sorted(k for k in {*want, *saved["settings"]} if saved["settings"].get(k) != want.get(k))
        raise InvalidConfigError(
            f"{path} holds a stream with other settings ({', '.join(diff)}); resume with the same arguments "
            "or use a new state_dir."
        )
    return saved


def _save(
    path: Path | None,
    settings: dict[str, Any],
    rows: list[dict[str, float]],
    names: list[str],
    new: list[str],
    model: nn.Module,
    edit_s: float,
    failed: int,
) -> None:
    """Write the new sets, the method history, then (atomically, last) the rows: a kill at any moment
    leaves the previous checkpoint readable."""
    if path is None:
        return
    (path / "sets").mkdir(parents=True, exist_ok=True)
    for name in new:
        es: EditSet = get_edit_set(model, name)
        es.save_pretrained(path / "sets" / name)
    history = f"history-{rows[-1]['n_edits']:07d}.pt"
    torch.save(get_state(model).history, path / history)
    progress = {
        "settings": settings,
        "rows": rows,
        "sets": names,
        "history": history,
        "edit_s": edit_s,
        "failed": failed,
    }
    tmp = path / "progress.json.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(progress, f, indent=1)
    os.replace(tmp, path / "progress.json")
    for old in path.glob("history-*.pt"):
        if old.name != history:
            old.unlink()
