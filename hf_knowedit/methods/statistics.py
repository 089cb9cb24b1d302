"""Second-moment statistics ``C = E[k kᵀ]`` of the edited module's input (ROME §3.1, MEMIT eq. 14).

``k`` is the input of the MLP output projection (``mlp_out`` in the architecture table) at
one layer, at every token of a text corpus. ROME solves ``u = C⁻¹ k*``; MEMIT-family methods
solve ``(λ C + K Kᵀ) x = K``. ``C`` is uncentered (``Σ k kᵀ / N``), counted in tokens,
accumulated in float32 or float64, and always measured on the *base* model (active edit
sets are disabled while it is computed, as the reference computes it once per model).

    >>> sm = compute_second_moment(model, tok, layer=8)          # default corpus, cached on disk
    >>> u = sm.solve(k_star)                                      # C⁻¹ k*, Cholesky cached on ``sm``

Corpus (``corpus=``): a list of texts; a ``datasets`` dataset (its ``"text"`` column); or
``None`` for the default: Wikipedia-like text (``wikitext-103``) when the ``datasets``
package is importable and the Hub reachable, else a corpus *sampled from the model itself*
with a fixed seed (logged; the identity string says which). ``mom2="identity"`` in the
method configs uses ``C = I`` instead (:func:`identity_moment`), labelled ``corpus="identity"``.

Caching. Results are identified by a :class:`~hf_knowedit.moments.StatsKey` and kept (with their
factorisation) per model in ``get_state(model).history`` and on disk by
:class:`~hf_knowedit.moments.StatsCache`; the key, the file format and Hub sharing are in
:mod:`hf_knowedit.moments`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.utils import tqdm
from torch import nn

from ..architectures import (
    EXPERT_LAYOUTS,
    edited_param,
    execution_device,
    get_architecture,
    get_module,
    mlp_out_dims,
    mlp_out_path,
    model_device,
    num_layers,
    read_tensor,
)
from ..errors import InvalidConfigError, UnsupportedArchitectureError
from ..experts import expert_dims, expert_keys, gate_up_of, routing_inputs, traced_key
from ..generation import generate_texts, max_positions
from ..hooks import Trace, frozen
from ..moments import DTYPES, SecondMoment, StatsCache, StatsKey, identity_moment
from ..stack import base_view, get_state, locked
from ..tokens import pad_batch
from .config import DEFAULT_N_KEYS
from .memory import kv_cache_bytes

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 128
DEFAULT_BATCH_TOKENS = 4096
#: the default corpus when ``datasets`` and the Hub are available
WIKI = ("wikitext", "wikitext-103-raw-v1", "train")
_MEM_KEY = "stats.moments"
_DIGEST_KEY = "stats.digests"
_CORPUS_KEY = "stats.sampled_corpus"

Corpus = Sequence[str] | Any | None


# -----------------------------------------------------------------------------
# identities


def _dtype_name(dtype: Any) -> str:
    for name, dt in DTYPES.items():
        if dtype in (dt, name):
            return name
    raise InvalidConfigError(f"Statistics dtype must be torch.float32 or torch.float64, got {dtype!r}.")


def _param_digest(history: dict[str, Any], name: str, t: torch.Tensor) -> str:
    memo = history.setdefault(_DIGEST_KEY, {})
    tag = (t.data_ptr(), t._version, tuple(t.shape), str(t.dtype))
    hit = memo.get(name)
    if hit is not None and hit[0] == tag:
        return hit[1]
    flat = t.detach().contiguous().reshape(-1)
    data = flat.view(torch.uint8).cpu().numpy().tobytes() if flat.numel() else b""
    digest = hashlib.sha256(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode() + data).hexdigest()
    memo[name] = (tag, digest)
    return digest


def model_identity(model: nn.Module, layer: int, *, revision: str | None = None, whole: bool = False) -> str:
    """``"name@revision"`` when a revision is given, else ``"weights:<sha256[:32]>"``: a fingerprint of the
    base weights (pristine copies where edits are merged) that the input of ``layer``'s ``mlp_out`` depends on
    (everything but later blocks, the final norm and the LM head; ``whole=True``: every weight).
    Per-tensor digests are memoised per model until the tensor changes."""
    if revision:
        name = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", "") or "model"
        return f"{name}@{revision}"
    spec = get_architecture(model)
    state = get_state(model)
    later = tuple(f"{spec.layers}.{i}." for i in range(layer + 1, len(get_module(model, spec.layers))))
    skip = () if whole else later + (spec.final_norm + ".", spec.lm_head + ".")
    h = hashlib.sha256()
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        ident = id(p) if p.device.type == "meta" else p.data_ptr()  # tied weights count once
        if name.startswith(skip) or ident in seen:
            continue
        seen.add(ident)
        module_path = name.rsplit(".", 1)[0]
        memo = state.history
        if module_path in state.base and name == edited_param(module_path, spec.mlp_out_layout):
            p = state.base[module_path]  # the pristine weight under a merged edit
        elif p.device.type == "meta":
            p, memo = read_tensor(model, name), {}  # offloaded: the values accelerate loads (a fresh tensor)
        h.update(_param_digest(memo, name, p).encode())
    return "weights:" + h.hexdigest()[:32]


def corpus_identity(corpus: Corpus, max_length: int) -> str:
    """A string naming the corpus (and the truncation length) for :class:`StatsKey`."""
    if corpus is None:
        raise InvalidConfigError("corpus_identity needs a corpus; resolve the default first.")
    if isinstance(corpus, str):
        raise InvalidConfigError("corpus must be a list of texts or a datasets dataset, not a single string.")
    if _is_dataset(corpus):
        info = getattr(corpus, "info", None)
        name = "/".join(str(x) for x in (getattr(info, "builder_name", None), getattr(info, "config_name", None)) if x)
        fp = getattr(corpus, "_fingerprint", None) or hashlib.sha256(repr(corpus).encode()).hexdigest()[:16]
        return f"datasets:{name or 'dataset'}:{getattr(corpus, 'split', None)}:{fp};max_length={max_length}"
    texts = list(corpus)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise InvalidConfigError("corpus must be a non-empty list of strings, a datasets dataset, or None.")
    digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
    return f"texts:{len(texts)}:{digest};max_length={max_length}"


def _is_dataset(x: Any) -> bool:
    return type(x).__module__.startswith("datasets")


def _texts(corpus: Any) -> Iterable[str]:
    if _is_dataset(corpus):
        for row in corpus:
            text = row.get("text") if isinstance(row, dict) else None
            if text and text.strip():
                yield text
    else:
        yield from corpus


# -----------------------------------------------------------------------------
# the default corpus


def _wikitext() -> Any:
    """wikitext-103 via ``datasets`` if importable and reachable, else None."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        return None
    try:
        return datasets.load_dataset(*WIKI[:2], split=WIKI[2])
    except Exception as err:  # offline, Hub down, ...
        logger.info("Default statistics corpus %s unavailable (%s).", "/".join(WIKI), err)
        return None


SAMPLED_LENGTH = 128
SAMPLED_STARTS = ("The", "In", "A", "It", "This", "He", "She", "After", "There", "According to", "When", "On")
#: the sampled corpus grows by whole blocks of this many texts (every start 4 times), so text ``i`` depends
#: on ``(seed, i)`` alone (up to the float rounding of how many rows share a batch): never on how many texts
#: were asked for, or when
SAMPLED_BLOCK = 4 * len(SAMPLED_STARTS)
#: KV-cache budget of one sampling batch: as many whole blocks share a batch as fit (bigger batches are faster
#: on a CPU; ``docs/results/first_run.md``)
SAMPLED_KV_BYTES = 1 << 30


def _row_seed(seed: int, i: int) -> int:
    """Text ``i``'s generator seed, distinct for every ``(seed, i)`` with ``i < 2**20`` (a CPU generator
    keeps only a seed's low 32 bits, so ``seed`` takes the 12 bits above ``i``)."""
    return (int(seed) % 4096) * (1 << 20) + i


def sampling_batch(model: nn.Module, length: int) -> int:
    """Texts per sampling batch: the most whole :data:`SAMPLED_BLOCK` blocks whose KV cache (``length`` new
    tokens and a few prompt tokens per text) fits in :data:`SAMPLED_KV_BYTES`, at least one block."""
    per_block = kv_cache_bytes(model, SAMPLED_BLOCK * (length + 8))
    return SAMPLED_BLOCK * max(1, SAMPLED_KV_BYTES // per_block)


def sampled_corpus(
    model: nn.Module,
    tokenizer: Any,
    n_tokens: int,
    *,
    seed: int = 0,
    length: int = SAMPLED_LENGTH,
    directory: str | Path | None = None,
) -> list[str]:
    """Texts sampled from the base model itself (top-k 50), about ``n_tokens`` tokens in all.

    Text ``i`` starts with ``SAMPLED_STARTS[i % 12]`` and is drawn with its own generator seeded from
    ``(seed, i)``, in blocks of :data:`SAMPLED_BLOCK`: the texts for a smaller ``n_tokens`` are the first
    texts of a larger one. One corpus per model and seed grows as needed, cached in
    ``get_state(model).history`` and, with ``directory``, as a JSON file there
    (``corpus--<weights fingerprint>--seed<seed>-len<length>.json``), so statistics for any token count,
    any layer and later sessions reuse what was sampled (sampling is the slow part on a CPU).
    """
    length = max(8, min(length, max_positions(model) - 8))
    n_texts = max(1, math.ceil(1.1 * n_tokens / length))
    wanted = SAMPLED_BLOCK * math.ceil(n_texts / SAMPLED_BLOCK)
    cache = get_state(model).history.setdefault(_CORPUS_KEY, {})
    texts: list[str] = cache.get((seed, length), [])
    path = None
    if directory is not None:
        ident = model_identity(model, num_layers(model) - 1, whole=True).split(":")[-1]
        path = Path(directory) / f"corpus--{ident}--seed{seed}-len{length}.json"
        if len(texts) < wanted and path.exists():
            stored = json.loads(path.read_text())
            if len(stored) > len(texts):
                texts = stored
                logger.info("Model-sampled statistics corpus (%d texts) loaded from %s.", len(texts), path)
    if len(texts) < wanted:
        have = len(texts) - len(texts) % SAMPLED_BLOCK  # a partial block (never written) is sampled again
        rows = range(have, wanted)
        logger.warning(
            "No Wikipedia-like corpus available (needs the 'datasets' package and the Hub): sampling %d texts "
            "of %d tokens (%d tokens) from the model itself for the second-moment statistics%s%s.",
            len(rows),
            length,
            len(rows) * length,
            f", after the {have} already sampled" if have else "",
            f"; kept in {path} for every later token count and session" if path is not None else "",
        )
        with base_view(model):
            texts = texts[:have] + generate_texts(
                model,
                tokenizer,
                [SAMPLED_STARTS[i % len(SAMPLED_STARTS)] for i in rows],
                max_new_tokens=length,
                row_seeds=[_row_seed(seed, i) for i in rows],
                top_k=50,
                batch_size=sampling_batch(model, length),
            )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes of a distributed run write the same file
            tmp.write_text(json.dumps(texts))
            os.replace(tmp, path)
    cache[(seed, length)] = texts
    return texts[:n_texts]


def wiki_identity(max_length: int) -> str:
    """The corpus identity of the default wikitext-103 corpus (known without loading it)."""
    return f"datasets:{'/'.join(WIKI)};max_length={max_length}"


def resolve_corpus(
    model: nn.Module, tokenizer: Any, corpus: Corpus, n_tokens: int, max_length: int, seed: int = 0
) -> tuple:
    """``(corpus_or_loader, identity)``; for the default, ``(None, identity)`` means "sample lazily"."""
    if corpus is not None:
        return corpus, corpus_identity(corpus, max_length)
    wiki = _wikitext()
    if wiki is not None:
        logger.info("Second-moment corpus: %s.", "/".join(WIKI))
        return wiki, wiki_identity(max_length)
    return None, (
        f"model-sampled:seed={seed};length={SAMPLED_LENGTH};top_k=50;max_length={max_length};rows={SAMPLED_BLOCK}"
    )


# -----------------------------------------------------------------------------
# computing


#: texts are read ahead this many batches at a time and grouped by length, so padding stays small
READ_AHEAD_BATCHES = 32


def _batches(
    tokenizer: Any, texts: Iterable[str], max_length: int, batch_tokens: int, n_tokens: int
) -> Iterable[list[list[int]]]:
    """The corpus's first ``n_tokens`` tokens, in text order (the last text cut short), as batches of
    token-id rows of at most ``batch_tokens`` padded tokens. Each text stays its own row (no
    cross-document attention); rows read ahead together are sorted by length, which changes which
    batch a row lands in but not the sum of ``k kᵀ``."""
    buffer: list[list[int]] = []
    held, remaining = 0, n_tokens
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"][:remaining]
        if not ids:
            continue
        buffer.append(ids)
        held += len(ids)
        remaining -= len(ids)
        if remaining == 0 or held >= READ_AHEAD_BATCHES * batch_tokens:
            yield from _by_length(buffer, batch_tokens)
            buffer, held = [], 0
        if remaining == 0:
            return
    yield from _by_length(buffer, batch_tokens)


def _by_length(rows: list[list[int]], batch_tokens: int) -> Iterable[list[list[int]]]:
    batch: list[list[int]] = []
    for ids in sorted(rows, key=len):  # ascending: the batch's last row is its widest
        if batch and len(ids) * (len(batch) + 1) > batch_tokens:
            yield batch
            batch = []
        batch.append(ids)
    if batch:
        yield batch


def process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the processes ``accelerate launch`` (or ``torchrun``) started, ``(0, 1)``
    otherwise. Under a launcher (``WORLD_SIZE`` > 1) the default process group is initialised through
    accelerate's ``PartialState`` if the script has not done it (gloo on CPUs, NCCL on GPUs)."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState()
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


#: column block of the accumulated ``C`` (see :func:`add_outer_blocks`)
STATS_BLOCK = 1024


def add_outer_blocks(total: torch.Tensor, keys: torch.Tensor, blocks: Sequence[tuple[int, int]]) -> None:
    """``total += keysᵀ keys`` on the blocks on and above the diagonal only, in place.

    ``C`` is symmetric, so one triangle of blocks is enough: with ``b`` blocks this does
    ``(b + 1) / 2b`` of the multiply-adds of the full product (62.5 % at 4 blocks, ~50 % for many),
    writes each product straight into ``total`` (``addmm_``: no ``d_in × d_in`` temporary per batch,
    whatever ``total``'s dtype), and needs nothing but ``total`` itself and the batch's keys.
    :func:`mirror_upper` fills the lower triangle once at the end.

    A pair of blocks takes only the rows non-zero in both (all rows, as they are, when every row is): routed
    experts' keys (:mod:`hf_knowedit.experts`) are zero outside the experts a token is routed to, so a block of
    one expert sees the tokens routed there, a pair of experts' blocks the tokens routed to both."""
    live = [keys[:, a0:a1].ne(0).any(dim=1) for a0, a1 in blocks]  # rows with a non-zero in each block
    for i, (a0, a1) in enumerate(blocks):
        for j in range(i, len(blocks)):
            b0, b1 = blocks[j]
            rows = live[i] & live[j]
            if bool(rows.all()):
                total[a0:a1, b0:b1].addmm_(keys[:, a0:a1].t(), keys[:, b0:b1])
            elif bool(rows.any()):
                sub = keys[rows]
                total[a0:a1, b0:b1].addmm_(sub[:, a0:a1].t(), sub[:, b0:b1])


def mirror_upper(total: torch.Tensor, blocks: Sequence[tuple[int, int]]) -> None:
    """Copy the blocks above the diagonal to below it and symmetrise the diagonal blocks (in place)."""
    for i, (a0, a1) in enumerate(blocks):
        diag = total[a0:a1, a0:a1]
        diag.copy_(torch.triu(diag) + torch.triu(diag, 1).t())
        for b0, b1 in blocks[i + 1 :]:
            total[b0:b1, a0:a1].copy_(total[a0:a1, b0:b1].t())


def _check_pass_args(owner: str, n_tokens: int, batch_tokens: int, max_length: int) -> None:
    for name, value, low in (
        ("n_tokens", n_tokens, 1),
        ("batch_tokens", batch_tokens, 1),
        ("max_length", max_length, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidConfigError(f"{owner}: {name} must be an int >= {low}, got {value!r}.")


@locked
def compute_second_moment(
    model: nn.Module,
    tokenizer: Any,
    layer: int,
    *,
    corpus: Corpus = None,
    n_tokens: int | None = None,
    dtype: Any = torch.float32,
    cache: StatsCache | str | Path | None | bool = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    max_length: int = DEFAULT_MAX_LENGTH,
    revision: str | None = None,
    seed: int = 0,
) -> SecondMoment:
    """``C = E[k kᵀ]`` of the input of ``mlp_out`` at ``layer`` over ``n_tokens`` corpus tokens.

    Args:
        corpus: a list of texts, a ``datasets`` dataset (``"text"`` column), or None (default corpus,
            see module docstring).
        n_tokens: how many token positions (key vectors) to average; None: ``ceil(10 · d_in)`` of the layer
            (:data:`~hf_knowedit.methods.config.DEFAULT_N_KEYS`).
        dtype: accumulation and storage dtype, ``torch.float32`` or ``torch.float64``.
        cache: a :class:`StatsCache` or a directory; None uses :func:`default_cache_dir`; False keeps
            the result in memory only.
        batch_tokens: at most this many (padded) tokens per forward pass; lower it on small GPUs.
        max_length: texts are truncated to this many tokens.
        revision: identify the model as ``name@revision`` instead of by a weight fingerprint.
        seed: seed of the model-sampled default corpus.

    The forward passes run on the base model (:func:`~hf_knowedit.stack.base_view`: in this thread only,
    other threads keep serving the edited model), in eval mode without gradients, and stop right after
    the edited module. Results are reused from memory, then from ``cache``.
    """
    spec = get_architecture(model)
    d_in, _ = mlp_out_dims(model, spec, layer)  # validates the layer
    n_tokens = keys_to_tokens(DEFAULT_N_KEYS, d_in) if n_tokens is None else n_tokens
    _check_pass_args("compute_second_moment", n_tokens, batch_tokens, max_length)
    dtype = DTYPES[_dtype_name(dtype)]
    module = mlp_out_path(spec, layer)

    def accumulate(source: Any, keys: list[StatsKey]) -> list[SecondMoment]:
        if spec.mlp_out_layout in EXPERT_LAYOUTS:
            _warn_joint_size(model, module, spec.mlp_out_layout, d_in, dtype)
        return [
            _accumulate(
                model, tokenizer, layer, module, d_in, source, n_tokens, dtype, batch_tokens, max_length, keys[0]
            )
        ]

    args = (corpus, n_tokens, dtype, cache, max_length, revision, seed)
    return _cached(model, tokenizer, layer, [module], accumulate, *args)[0]


def expert_module_name(module: str, expert: int | str) -> str:
    """The :class:`~hf_knowedit.moments.StatsKey` module of expert ``expert``'s own statistics
    (:func:`compute_expert_moments`), distinct from the joint ``C`` of the experts module ``module``."""
    return f"{module}[{expert}]:ungated"


#: a routed-experts block's joint second moment above this size (bytes) is computed with a warning that names MoEEdit
JOINT_WARN_BYTES = 1 << 30


def _warn_joint_size(model: nn.Module, module: str, layout: str, d_in: int, dtype: torch.dtype) -> None:
    """Warn before a joint ``C`` of routed experts (``(E·I)²``) larger than :data:`JOINT_WARN_BYTES` is built."""
    size = torch.empty((), dtype=dtype).element_size() * d_in * d_in
    if size <= JOINT_WARN_BYTES:
        return
    n_experts, inner = expert_dims(get_module(model, module), gate_up_of(model, module, layout), layout)
    per_expert = torch.empty((), dtype=dtype).element_size() * n_experts * inner * inner
    logger.warning(
        "The second moment of %s's routed keys is %d x %d (%d experts of %d): %.1f GiB for this layer, held while "
        "it is computed and solved. method='moeedit' keeps one %d x %d block per expert instead (%.0f MiB).",
        module,
        d_in,
        d_in,
        n_experts,
        inner,
        size / 2**30,
        inner,
        inner,
        per_expert / 2**20,
    )


@locked
def compute_expert_moments(
    model: nn.Module,
    tokenizer: Any,
    layer: int,
    *,
    corpus: Corpus = None,
    n_tokens: int | None = None,
    dtype: Any = torch.float32,
    cache: StatsCache | str | Path | None | bool = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    max_length: int = DEFAULT_MAX_LENGTH,
    revision: str | None = None,
    seed: int = 0,
) -> list[SecondMoment]:
    """Per-expert statistics of a routed-experts block (``mlp_out_layout`` ``"experts"`` / ``"experts_t"``):
    for each expert ``e``, ``C_e = E[k_e k_eᵀ]`` of its *un-gated* key ``k_e(x)`` (:mod:`hf_knowedit.experts`,
    no routing weight) over the corpus tokens routed to ``e``: ``E`` matrices ``[I, I]`` (memory ``E·I²``, not
    the joint ``C``'s ``(E·I)²``). An expert no token reached gets ``C_e = I`` with ``n_tokens = 0`` (as
    MoEEdit's reference code). Arguments, base model and caching as :func:`compute_second_moment`; each expert
    is one cache entry, its key's module :func:`expert_module_name` (``n_tokens`` is the whole pass's, the
    entry's ``n_tokens`` the tokens routed to the expert)."""
    spec = get_architecture(model)
    if spec.mlp_out_layout not in EXPERT_LAYOUTS:
        raise UnsupportedArchitectureError(
            f"compute_expert_moments: {spec.model_type}'s edited module is not a routed-experts block "
            f"(mlp_out_layout={spec.mlp_out_layout!r}); use compute_second_moment."
        )
    module = mlp_out_path(spec, layer)
    d_in, _ = mlp_out_dims(model, spec, layer)  # validates the layer
    n_tokens = keys_to_tokens(DEFAULT_N_KEYS, d_in) if n_tokens is None else n_tokens
    _check_pass_args("compute_expert_moments", n_tokens, batch_tokens, max_length)
    dtype = DTYPES[_dtype_name(dtype)]
    n_experts, _ = expert_dims(
        get_module(model, module), gate_up_of(model, module, spec.mlp_out_layout), spec.mlp_out_layout
    )

    def accumulate(source: Any, keys: list[StatsKey]) -> list[SecondMoment]:
        return _accumulate_experts(
            model, tokenizer, layer, module, source, n_tokens, dtype, batch_tokens, max_length, keys
        )

    names = [expert_module_name(module, e) for e in range(n_experts)]
    return _cached(
        model, tokenizer, layer, names, accumulate, corpus, n_tokens, dtype, cache, max_length, revision, seed
    )


def _cached(
    model: nn.Module,
    tokenizer: Any,
    layer: int,
    names: list[str],
    accumulate: Callable[[Any, list[StatsKey]], list[SecondMoment]],
    corpus: Corpus,
    n_tokens: int,
    dtype: torch.dtype,
    cache: StatsCache | str | Path | None | bool,
    max_length: int,
    revision: str | None,
    seed: int,
) -> list[SecondMoment]:
    """The entries named ``names`` (key modules) at ``layer``: from memory, else from the disk cache (all of
    them), else ``accumulate(corpus source, keys)`` over the corpus, then kept in both."""
    module = mlp_out_path(get_architecture(model), layer)
    device = execution_device(get_module(model, module))
    memory = get_state(model).history.setdefault(_MEM_KEY, {})
    disk = None if cache is False else cache if isinstance(cache, StatsCache) else StatsCache(cache)
    dtype_name = _dtype_name(dtype)

    def keys_for(corpus_id: str) -> list[StatsKey]:
        ident = model_identity(model, layer, revision=revision)
        return [StatsKey(ident, layer, name, corpus_id, n_tokens, dtype_name) for name in names]

    def cached(keys: list[StatsKey]) -> list[SecondMoment] | None:
        hits = []
        for key in keys:
            hit = memory.get(key)
            if hit is None and disk is not None:
                hit = disk.get(key, device=device)
                if hit is not None:
                    logger.info("Second moment for %s loaded from %s.", key.module, disk.path(key))
            if hit is None:
                return None
            hits.append(hit)
        memory.update((hit.key, hit) for hit in hits)
        return hits

    # the default corpus: a cached wikitext entry is used without loading (or downloading) the dataset
    hit = cached(keys_for(wiki_identity(max_length))) if corpus is None else None
    if hit is not None:
        return hit
    source, corpus_id = resolve_corpus(model, tokenizer, corpus, n_tokens, max_length, seed)
    keys = keys_for(corpus_id)
    hit = cached(keys)
    if hit is not None:
        return hit

    if source is None:
        source = sampled_corpus(
            model, tokenizer, n_tokens, seed=seed, directory=disk.directory if disk is not None else None
        )
    entries = accumulate(source, keys)
    rank, world = process_group()
    if disk is not None and rank == 0:  # one process writes the cache entries for all
        for entry in entries:
            logger.info("Second moment for %s saved to %s.", entry.key.module, disk.put(entry))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the entries are on disk before any process goes on
    memory.update((entry.key, entry) for entry in entries)
    return entries


def _corpus_traces(
    model: nn.Module,
    tokenizer: Any,
    layer: int,
    module: str,
    corpus: Any,
    n_tokens: int,
    batch_tokens: int,
    max_length: int,
) -> Iterator[tuple[Trace, torch.Tensor]]:
    """The statistics pass: for each batch of the corpus's first ``n_tokens`` tokens that this process handles
    (every world-th under a launcher), the :class:`~hf_knowedit.hooks.Trace` of ``module`` (its input retained,
    the forward stopped there) and the batch's non-pad mask ``[B·T]`` (bool). On the base model, frozen, without
    gradients."""
    rank, world = process_group()
    with (
        frozen(model),
        base_view(model),
        torch.no_grad(),
        tqdm(total=n_tokens, desc=f"second moment L{layer}", unit="tok", leave=False) as bar,
    ):
        for i, batch in enumerate(_batches(tokenizer, _texts(corpus), max_length, batch_tokens, n_tokens)):
            bar.update(sum(map(len, batch)))
            if i % world != rank:
                continue  # another process's batch
            ids, mask, _, _ = pad_batch(batch, 0, "right", model_device(model))
            with Trace(model, module, retain_input=True, retain_output=False, stop=True) as tr:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            yield tr, mask.reshape(-1).bool()


def _sum_over_processes(*sums: torch.Tensor) -> None:
    """Under a launcher every process saw every world-th batch: sum the sums (in place)."""
    if process_group()[1] > 1:
        import torch.distributed as dist

        for total in sums:
            dist.all_reduce(total)


def _accumulate(
    model: nn.Module,
    tokenizer: Any,
    layer: int,
    module: str,
    d_in: int,
    corpus: Any,
    n_tokens: int,
    dtype: torch.dtype,
    batch_tokens: int,
    max_length: int,
    key: StatsKey,
    block: int | None = None,
) -> SecondMoment:
    block = block or STATS_BLOCK
    layout = get_architecture(model).mlp_out_layout
    device = execution_device(get_module(model, module))  # C is accumulated where the module computes
    total = torch.zeros(d_in, d_in, dtype=dtype, device=device)
    blocks = [(i, min(i + block, d_in)) for i in range(0, d_in, block)]
    count = torch.zeros((), dtype=torch.float64, device=device)
    for tr, mask in _corpus_traces(model, tokenizer, layer, module, corpus, n_tokens, batch_tokens, max_length):
        keys = traced_key(layout, model, module, tr).to(device).reshape(-1, d_in)
        keys = keys[mask.to(device)].to(dtype)  # no pads
        add_outer_blocks(total, keys, blocks)
        count += keys.shape[0]
    _sum_over_processes(total, count)
    mirror_upper(total, blocks)
    used = int(count.item())
    _check_count(used, n_tokens)
    return SecondMoment(total / used, used, key)


def _check_count(used: int, n_tokens: int) -> None:
    if used == 0:
        raise InvalidConfigError("The statistics corpus produced no tokens; pass a non-empty corpus.")
    if used < n_tokens:
        logger.warning(
            "The statistics corpus ran out after %d of %d tokens; C is averaged over %d.", used, n_tokens, used
        )


def _accumulate_experts(
    model: nn.Module,
    tokenizer: Any,
    layer: int,
    module: str,
    corpus: Any,
    n_tokens: int,
    dtype: torch.dtype,
    batch_tokens: int,
    max_length: int,
    keys: list[StatsKey],
) -> list[SecondMoment]:
    """:func:`compute_expert_moments`' pass: ``Σ k_e k_eᵀ`` per expert over the tokens routed to it."""
    layout = get_architecture(model).mlp_out_layout
    experts = get_module(model, module)
    device = execution_device(experts)
    gate_up = gate_up_of(model, module, layout)
    n_experts, inner = expert_dims(experts, gate_up, layout)
    totals = torch.zeros(n_experts, inner, inner, dtype=dtype, device=device)
    counts = torch.zeros(n_experts, dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    for tr, mask in _corpus_traces(model, tokenizer, layer, module, corpus, n_tokens, batch_tokens, max_length):
        hidden, index, _ = routing_inputs(tr.args)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        mask = mask.to(hidden.device)
        index = index.reshape(hidden.shape[0], -1)[mask]
        tokens += int(mask.sum())
        for e, _, _, k in expert_keys(experts, hidden[mask], index, gate_up, layout):
            k = k.to(device, dtype)
            totals[e].addmm_(k.t(), k)
            counts[e] += k.shape[0]
    _sum_over_processes(totals, counts, tokens)
    _check_count(int(tokens.item()), n_tokens)
    out = []
    for e, key in enumerate(keys):
        n = int(counts[e].item())
        matrix = totals[e] / n if n else torch.eye(inner, dtype=dtype, device=device)
        out.append(SecondMoment(matrix, n, key))
    if not all(counts):
        logger.warning(
            "No statistics token was routed to experts %s of layer %d: their C_e is the identity.",
            [e for e in range(n_experts) if not counts[e]],
            layer,
        )
    return out


#: (config class, mom2_n_keys) pairs already warned about (once per process, not once per layer)
_WARNED_N_KEYS: set[tuple[str, float]] = set()


def keys_to_tokens(multiple: float, d_in: int) -> int:
    """``ceil(multiple · d_in)``, at least 1: the tokens of ``multiple`` key dimensions' worth of keys."""
    return max(1, math.ceil(multiple * d_in))


def n_tokens_for(model: nn.Module, layer: int, config: Any) -> int:
    """Tokens averaged into ``C``: ``mom2_n_tokens`` when set, else ``ceil(mom2_n_keys · d_in)`` of ``layer``
    (minimal precomputation, "Efficient Knowledge Editing via Minimal Precomputation", ACL 2025): a few
    multiples of the key dimension instead of millions of tokens. ``C`` needs at least ``d_in`` keys to be
    invertible; the paper's FastROME / FastMEMIT use 2-10 × d_in, and the default is 10."""
    if config.mom2_n_tokens is not None:
        return config.mom2_n_tokens
    multiple = DEFAULT_N_KEYS if config.mom2_n_keys is None else config.mom2_n_keys
    least = getattr(config, "min_n_keys", 0.0)
    if multiple < least and (type(config).__name__, multiple) not in _WARNED_N_KEYS:
        _WARNED_N_KEYS.add((type(config).__name__, multiple))
        logger.warning(
            "mom2_n_keys=%g is below the %g · d_in keys %s was measured to need (with fewer, MEMIT on 100 "
            "SmolLM2 edits fell from ES 100 / NS 69 to ES 61 / NS 40: docs/results/minimal_precomputation.md); "
            "use mom2_n_keys >= %g.",
            multiple,
            least,
            type(config).__name__,
            least,
        )
    d_in, _ = mlp_out_dims(model, get_architecture(model), layer)
    return keys_to_tokens(multiple, d_in)


def second_moment_for(model: nn.Module, tokenizer: Any, layer: int, config: Any) -> SecondMoment:
    """``C`` at ``layer`` as a method config asks (``mom2``, ``mom2_corpus``, ``mom2_n_tokens`` or else
    ``mom2_n_keys``, ``mom2_dtype``, ``mom2_batch_tokens``): from a corpus (cached in memory and on disk)
    or the identity; with ``mom2_preserve``, plus the preserved texts' second moment (:func:`with_preserved`)."""
    if config.mom2 == "identity":
        moment = identity_moment(model, layer)
    else:
        moment = compute_second_moment(
            model,
            tokenizer,
            layer,
            corpus=config.mom2_corpus,
            n_tokens=n_tokens_for(model, layer, config),
            **_pass_options(config),
        )
    return with_preserved(model, tokenizer, layer, config, [moment], compute_second_moment)[0]


#: ``get_state(model).history`` entry of the corpus + preserved-texts sums, so their factorisation is reused
_PRESERVED_KEY = "stats.preserved"


def _pass_options(config: Any) -> dict[str, Any]:
    """The statistics pass's accumulation dtype and batch size as a method config sets them."""
    return {
        "dtype": getattr(torch, config.mom2_dtype),
        "batch_tokens": getattr(config, "mom2_batch_tokens", DEFAULT_BATCH_TOKENS),
    }


def corpus_tokens(tokenizer: Any, texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH) -> int:
    """Token positions of ``texts`` as the statistics pass reads them (special tokens, truncation)."""
    return sum(
        len(tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]) for t in texts
    )


def with_preserved(
    model: nn.Module, tokenizer: Any, layer: int, config: Any, moments: list[SecondMoment], compute: Callable
) -> list[SecondMoment]:
    """``moments`` with ``w · E_p[k kᵀ]`` added, ``E_p`` over every token of ``config.mom2_preserve`` and ``w``
    ``config.mom2_preserve_weight``; unchanged when ``mom2_preserve`` is None.

    ``compute`` is :func:`compute_second_moment` (one joint ``C``) or :func:`compute_expert_moments` (one ``C_e``
    per expert, each added to its own): the preserved texts go through the same pass, cached the same way. The
    sum's :class:`~hf_knowedit.moments.StatsKey` names both parts, so an edit set's provenance says what ``C``
    was. Methods that solve against ``C`` (ROME, MEMIT, EMMET, ENCORE, RLSEdit) then weigh a change of those
    texts' outputs ``w`` times as much as the corpus's; methods that project onto ``C``'s null space (AlphaEdit,
    MoEEdit) add their directions to the protected space."""
    texts = getattr(config, "mom2_preserve", None)
    if not texts:
        return moments
    texts = list(texts)
    kept = compute(
        model,
        tokenizer,
        layer,
        corpus=texts,
        n_tokens=corpus_tokens(tokenizer, texts),
        **_pass_options(config),
    )
    kept = kept if isinstance(kept, list) else [kept]
    w = config.mom2_preserve_weight
    memory = get_state(model).history.setdefault(_PRESERVED_KEY, {})  # one sum (and its factor) per key
    out = []
    for moment, extra in zip(moments, kept, strict=True):
        key = dataclasses.replace(
            moment.key,
            corpus=f"{moment.key.corpus} + {w:g} x preserve[{extra.key.corpus}]",
            n_tokens=moment.n_tokens + extra.n_tokens,
        )
        if key not in memory:
            matrix = moment.matrix + w * extra.matrix.to(moment.matrix.device, moment.matrix.dtype)
            memory[key] = SecondMoment(matrix, moment.n_tokens + extra.n_tokens, key)
        out.append(memory[key])
    return out


def expert_moments_for(model: nn.Module, tokenizer: Any, layer: int, config: Any) -> list[SecondMoment]:
    """The per-expert statistics ``C_e`` at ``layer`` (:func:`compute_expert_moments`) as a method config asks
    (the fields of :func:`second_moment_for`, ``mom2_preserve`` included); ``mom2="identity"``: ``C_e = I`` for
    every expert."""
    if config.mom2 == "identity":
        spec = get_architecture(model)
        module = mlp_out_path(spec, layer)
        mlp_out_dims(model, spec, layer)  # validates the layer
        n_experts, inner = expert_dims(
            get_module(model, module), gate_up_of(model, module, spec.mlp_out_layout), spec.mlp_out_layout
        )
        eye = torch.eye(inner, dtype=torch.float64)
        keys = [
            StatsKey("any", layer, expert_module_name(module, e), "identity", 0, "float64") for e in range(n_experts)
        ]
        moments = [SecondMoment(eye, 0, key) for key in keys]
    else:
        moments = compute_expert_moments(
            model,
            tokenizer,
            layer,
            corpus=config.mom2_corpus,
            n_tokens=n_tokens_for(model, layer, config),
            **_pass_options(config),
        )
    return with_preserved(model, tokenizer, layer, config, moments, compute_expert_moments)
