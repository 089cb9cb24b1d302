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

Caching. Every result is identified by a :class:`StatsKey`: the model (``name@revision``
when the caller gives a revision, else a sha256 fingerprint of the base weights the layer's
input depends on), layer, module path, corpus identity, requested token count and dtype.
Results are kept (with their factorisation) per model in ``get_state(model).history`` and on
disk by :class:`StatsCache` (``$HF_KNOWEDIT_STATS_CACHE``, else ``$HF_KNOWEDIT_CACHE/stats``,
else ``~/.cache/hf_knowedit/stats``), one file per key. A hit never recomputes; a different key
never reuses a file; a file whose metadata does not match the key it is loaded for raises
:class:`~hf_knowedit.errors.StatisticsMismatchError`.

File format (one ``.safetensors`` file per entry, :meth:`SecondMoment.save` / :meth:`SecondMoment.load`):

* tensor ``"mom2"``: ``C``, shape ``[d_in, d_in]``, dtype = the key's dtype (float32/float64).
* metadata (all strings): ``format = "hf_knowedit.second_moment"``, ``format_version = "1"``,
  ``model``, ``layer``, ``module``, ``corpus``, ``n_tokens`` (the key's, requested), ``dtype``
  (``"float32"``/``"float64"``), ``n_tokens_used`` (tokens actually averaged), ``d_in``.
* file name: :meth:`StatsKey.filename` (``<model slug>--L<layer>--<sha256 of the key, 16 hex>.safetensors``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from .architectures import get_architecture, get_module, mlp_out_dims, mlp_out_path
from .errors import InvalidConfigError, SingularSystemError, StatisticsMismatchError
from .hooks import Trace
from .stack import disable_edits, get_state

logger = logging.getLogger(__name__)

FORMAT = "hf_knowedit.second_moment"
FORMAT_VERSION = "1"
TENSOR_NAME = "mom2"
DEFAULT_N_TOKENS = 100_000
DEFAULT_MAX_LENGTH = 128
DEFAULT_BATCH_TOKENS = 4096
#: the default corpus when ``datasets`` and the Hub are available
WIKI = ("wikitext", "wikitext-103-raw-v1", "train")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_MEM_KEY = "stats.moments"
_DIGEST_KEY = "stats.digests"
_CORPUS_KEY = "stats.sampled_corpus"

Corpus = Union[None, Sequence[str], Any]


# -----------------------------------------------------------------------------
# key and entry


@dataclass(frozen=True)
class StatsKey:
    """Everything a second-moment matrix depends on."""

    model: str
    layer: int
    module: str
    corpus: str
    n_tokens: int
    dtype: str

    def metadata(self) -> Dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, meta: Dict[str, str]) -> "StatsKey":
        try:
            return cls(meta["model"], int(meta["layer"]), meta["module"], meta["corpus"], int(meta["n_tokens"]),
                       meta["dtype"])
        except (KeyError, ValueError) as err:
            raise StatisticsMismatchError(f"Statistics metadata is incomplete ({err}); expected the keys "
                                          "model, layer, module, corpus, n_tokens, dtype. Recompute the file.") from err

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def filename(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model.split(":")[-1] if self.model.startswith("weights:")
                      else self.model)[:60]
        return f"{slug}--L{self.layer}--{self.digest()[:16]}.safetensors"


@dataclass
class SecondMoment:
    """``C = E[k kᵀ]`` at one layer, with a cached factorisation for repeated solves.

    Attributes:
        matrix: ``[d_in, d_in]`` (float32/float64).
        n_tokens: number of key vectors averaged (``0`` for the identity).
        key: the :class:`StatsKey` the matrix was computed for.
    """

    matrix: torch.Tensor
    n_tokens: int
    key: StatsKey
    _factor: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    @property
    def is_identity(self) -> bool:
        """True for the ``mom2="identity"`` stand-in ``C = I``."""
        return self.key.corpus == "identity"

    @property
    def d_in(self) -> int:
        return self.matrix.shape[0]

    def cholesky(self) -> torch.Tensor:
        """Lower Cholesky factor of ``C`` in float64 (computed once). Adds a small diagonal jitter,
        with a warning, when ``C`` is singular (too few tokens for the key dimension)."""
        if self._factor is None:
            c = self.matrix.double()
            scale = float(c.diagonal().mean().clamp_min(1e-30))
            eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
            for jitter in (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
                factor, info = torch.linalg.cholesky_ex(c + jitter * scale * eye)
                if int(info) == 0 and torch.isfinite(factor).all():
                    if jitter:
                        logger.warning("Second moment at %s is singular; added %.0e * mean(diag) to its diagonal. "
                                       "Use more tokens (n_tokens >> %d) for a better estimate.",
                                       self.key.module, jitter, c.shape[0])
                    self._factor = factor
                    break
            else:
                raise SingularSystemError(f"The second moment at {self.key.module} is not positive definite even "
                                          "after regularisation; recompute it with more tokens or use mom2='identity'.")
        return self._factor

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``C⁻¹ rhs`` for ``rhs`` of shape ``[d_in]`` or ``[d_in, m]``, in float64 via the cached Cholesky
        factor; returned in ``rhs``'s dtype and device."""
        if rhs.shape[0] != self.d_in:
            raise InvalidConfigError(f"solve: rhs has {rhs.shape[0]} rows, the second moment is {self.d_in}x{self.d_in}.")
        if self.is_identity:
            return rhs.clone()
        factor = self.cholesky()
        x = torch.cholesky_solve(rhs.to(factor.device, torch.float64).reshape(self.d_in, -1), factor)
        return x.reshape(rhs.shape).to(rhs.device, rhs.dtype)

    # -- files ---------------------------------------------------------------

    def save(self, path: Union[str, Path]) -> Path:
        """Write this entry as one safetensors file (format in the module docstring), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **self.key.metadata(),
                "n_tokens_used": str(self.n_tokens), "d_in": str(self.d_in)}
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            save_file({TENSOR_NAME: self.matrix.detach().to("cpu", _DTYPES[self.key.dtype]).contiguous()}, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: Union[str, Path], expected: Optional[StatsKey] = None, *,
             device: Any = None) -> "SecondMoment":
        """Read a file written by :meth:`save`. With ``expected``, every key field must match, else
        :class:`StatisticsMismatchError` says which (another model, layer, module, corpus, ...)."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise StatisticsMismatchError(f"{path} is not an hf_knowedit second-moment file "
                                                  f"(metadata format={meta.get('format')!r}).")
                matrix = f.get_tensor(TENSOR_NAME)
        except StatisticsMismatchError:
            raise
        except Exception as err:  # unreadable / not safetensors
            raise StatisticsMismatchError(f"Cannot read statistics file {path}: {err}. Delete it to recompute.") from err
        key = StatsKey.from_metadata(meta)
        if expected is not None and key != expected:
            diff = [f"{k}: file has {getattr(key, k)!r}, expected {getattr(expected, k)!r}"
                    for k in ("model", "layer", "module", "corpus", "n_tokens", "dtype")
                    if getattr(key, k) != getattr(expected, k)]
            raise StatisticsMismatchError(f"Statistics file {path} was computed for something else ("
                                          + "; ".join(diff) + "). Use the file made for this model and layer, "
                                          "or delete it to recompute.")
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or str(matrix.shape[0]) != meta.get("d_in", str(matrix.shape[0])):
            raise StatisticsMismatchError(f"Statistics file {path} holds a {tuple(matrix.shape)} matrix, not [d_in, d_in].")
        if device is not None:
            matrix = matrix.to(device)
        return cls(matrix, int(meta.get("n_tokens_used", key.n_tokens)), key)


def default_cache_dir() -> Path:
    """``$HF_KNOWEDIT_STATS_CACHE``, else ``$HF_KNOWEDIT_CACHE/stats``, else ``~/.cache/hf_knowedit/stats``."""
    env = os.environ.get("HF_KNOWEDIT_STATS_CACHE")
    if env:
        return Path(env)
    root = os.environ.get("HF_KNOWEDIT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "hf_knowedit") / "stats"


class StatsCache:
    """A directory of second-moment files, one per :class:`StatsKey` (see module docstring)."""

    def __init__(self, directory: Union[str, Path, None] = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path(self, key: StatsKey) -> Path:
        return self.directory / key.filename()

    def get(self, key: StatsKey, device: Any = None) -> Optional[SecondMoment]:
        """The entry for ``key``, or None. A file under the key's name with other metadata raises
        :class:`StatisticsMismatchError`."""
        path = self.path(key)
        if not path.exists():
            return None
        return SecondMoment.load(path, expected=key, device=device)

    def put(self, entry: SecondMoment) -> Path:
        return entry.save(self.path(entry.key))

    def __contains__(self, key: StatsKey) -> bool:
        return self.path(key).exists()

    def __repr__(self) -> str:
        return f"StatsCache({str(self.directory)!r})"


# -----------------------------------------------------------------------------
# identities


def _dtype_name(dtype: Any) -> str:
    for name, dt in _DTYPES.items():
        if dtype in (dt, name):
            return name
    raise InvalidConfigError(f"Statistics dtype must be torch.float32 or torch.float64, got {dtype!r}.")


def _param_digest(history: Dict[str, Any], name: str, t: torch.Tensor) -> str:
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


def model_identity(model: nn.Module, layer: int, *, revision: Optional[str] = None, whole: bool = False) -> str:
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
        if name.startswith(skip) or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        module_path = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module_path in state.base:
            p = state.base[module_path]  # the pristine weight under a merged edit
        h.update(_param_digest(state.history, name, p).encode())
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


def sampled_corpus(model: nn.Module, tokenizer: Any, n_tokens: int, *, seed: int = 0,
                   length: int = SAMPLED_LENGTH, directory: Union[str, Path, None] = None) -> List[str]:
    """Texts sampled from the base model itself (top-k 50, seeded), about ``n_tokens`` tokens in all.

    Cached per model in ``get_state(model).history`` and, with ``directory``, as a JSON file there
    (``corpus--<weights fingerprint>--seed<seed>-len<length>-n<texts>.json``) so other layers and
    later sessions reuse it (sampling is the slow part on a CPU).
    """
    from .context import generate_texts, max_positions

    length = max(8, min(length, max_positions(model) - 8))
    n_texts = max(1, math.ceil(1.1 * n_tokens / length))
    per_start = math.ceil(n_texts / len(SAMPLED_STARTS))
    cache = get_state(model).history.setdefault(_CORPUS_KEY, {})
    key = (seed, length, per_start)
    if key in cache:
        return cache[key]
    path = None
    if directory is not None:
        ident = model_identity(model, num_layers_of(model) - 1, whole=True).split(":")[-1]
        path = Path(directory) / f"corpus--{ident}--seed{seed}-len{length}-n{per_start * len(SAMPLED_STARTS)}.json"
        if path.exists():
            cache[key] = json.loads(path.read_text())
            logger.info("Model-sampled statistics corpus loaded from %s.", path)
            return cache[key]
    logger.warning("No Wikipedia-like corpus available (needs the 'datasets' package and the Hub): sampling "
                   "%d texts of %d tokens from the model itself (seed %d) for the second-moment statistics.",
                   per_start * len(SAMPLED_STARTS), length, seed)
    cache[key] = generate_texts(model, tokenizer, SAMPLED_STARTS, length=length, seed=seed, per_start=per_start,
                                top_k=50)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache[key]))
        os.replace(tmp, path)
    return cache[key]


def num_layers_of(model: nn.Module) -> int:
    return len(get_module(model, get_architecture(model).layers))


def resolve_corpus(model: nn.Module, tokenizer: Any, corpus: Corpus, n_tokens: int, max_length: int,
                   seed: int = 0) -> tuple:
    """``(corpus_or_loader, identity)``; for the default, ``(None, identity)`` means "sample lazily"."""
    if corpus is not None:
        return corpus, corpus_identity(corpus, max_length)
    wiki = _wikitext()
    if wiki is not None:
        logger.info("Second-moment corpus: %s.", "/".join(WIKI))
        return wiki, f"datasets:{'/'.join(WIKI)};max_length={max_length}"
    return None, f"model-sampled:seed={seed};length={SAMPLED_LENGTH};top_k=50;max_length={max_length}"


# -----------------------------------------------------------------------------
# computing


def identity_moment(model: nn.Module, layer: int) -> SecondMoment:
    """``C = I`` (``mom2="identity"``): ROME without the covariance adjustment, labelled ``corpus="identity"``."""
    spec = get_architecture(model)
    d_in, _ = mlp_out_dims(model, spec, layer)
    key = StatsKey("any", layer, mlp_out_path(spec, layer), "identity", 0, "float64")
    return SecondMoment(torch.eye(d_in, dtype=torch.float64), 0, key)


#: texts are read ahead this many batches at a time and grouped by length, so padding stays small
READ_AHEAD_BATCHES = 32


def _batches(tokenizer: Any, texts: Iterable[str], max_length: int, batch_tokens: int,
             n_tokens: int) -> Iterable[List[List[int]]]:
    """The corpus's first ``n_tokens`` tokens, in text order (the last text cut short), as batches of
    token-id rows of at most ``batch_tokens`` padded tokens. Each text stays its own row (no
    cross-document attention); rows read ahead together are sorted by length, which changes which
    batch a row lands in but not the sum of ``k kᵀ``."""
    buffer: List[List[int]] = []
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


def _by_length(rows: List[List[int]], batch_tokens: int) -> Iterable[List[List[int]]]:
    batch: List[List[int]] = []
    for ids in sorted(rows, key=len):  # ascending: the batch's last row is its widest
        if batch and len(ids) * (len(batch) + 1) > batch_tokens:
            yield batch
            batch = []
        batch.append(ids)
    if batch:
        yield batch


def compute_second_moment(model: nn.Module, tokenizer: Any, layer: int, *, corpus: Corpus = None,
                          n_tokens: int = DEFAULT_N_TOKENS, dtype: Any = torch.float32,
                          cache: Union[StatsCache, str, Path, None, bool] = None,
                          batch_tokens: int = DEFAULT_BATCH_TOKENS, max_length: int = DEFAULT_MAX_LENGTH,
                          revision: Optional[str] = None, seed: int = 0) -> SecondMoment:
    """``C = E[k kᵀ]`` of the input of ``mlp_out`` at ``layer`` over ``n_tokens`` corpus tokens.

    Args:
        corpus: a list of texts, a ``datasets`` dataset (``"text"`` column), or None (default corpus,
            see module docstring).
        n_tokens: how many token positions (key vectors) to average.
        dtype: accumulation and storage dtype, ``torch.float32`` or ``torch.float64``.
        cache: a :class:`StatsCache` or a directory; None uses :func:`default_cache_dir`; False keeps
            the result in memory only.
        batch_tokens: at most this many (padded) tokens per forward pass; lower it on small GPUs.
        max_length: texts are truncated to this many tokens.
        revision: identify the model as ``name@revision`` instead of by a weight fingerprint.
        seed: seed of the model-sampled default corpus.

    The forward passes run on the base model (edits disabled), in eval mode without gradients, and
    stop right after the edited module. Results are reused from memory, then from ``cache``.
    """
    for name, value, low in (("n_tokens", n_tokens, 1), ("batch_tokens", batch_tokens, 1), ("max_length", max_length, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidConfigError(f"compute_second_moment: {name} must be an int >= {low}, got {value!r}.")
    dtype_name = _dtype_name(dtype)
    spec = get_architecture(model)
    d_in, _ = mlp_out_dims(model, spec, layer)  # validates the layer
    module = mlp_out_path(spec, layer)
    source, corpus_id = resolve_corpus(model, tokenizer, corpus, n_tokens, max_length, seed)
    key = StatsKey(model_identity(model, layer, revision=revision), layer, module, corpus_id, n_tokens, dtype_name)
    device = next(model.parameters()).device

    memory = get_state(model).history.setdefault(_MEM_KEY, {})
    if key in memory:
        return memory[key]
    disk = None if cache is False else cache if isinstance(cache, StatsCache) else StatsCache(cache)
    if disk is not None:
        hit = disk.get(key, device=device)
        if hit is not None:
            logger.info("Second moment for %s loaded from %s.", module, disk.path(key))
            memory[key] = hit
            return hit

    if source is None:
        source = sampled_corpus(model, tokenizer, n_tokens, seed=seed,
                                directory=disk.directory if disk is not None else None)
    entry = _accumulate(model, tokenizer, layer, module, d_in, source, n_tokens, _DTYPES[dtype_name],
                        batch_tokens, max_length, key)
    if disk is not None:
        path = disk.put(entry)
        logger.info("Second moment for %s saved to %s.", module, path)
    memory[key] = entry
    return entry


def _accumulate(model: nn.Module, tokenizer: Any, layer: int, module: str, d_in: int, corpus: Any, n_tokens: int,
                dtype: torch.dtype, batch_tokens: int, max_length: int, key: StatsKey) -> SecondMoment:
    from huggingface_hub.utils import tqdm

    from .editing import frozen

    device = next(model.parameters()).device
    total = torch.zeros(d_in, d_in, dtype=dtype, device=device)
    count = 0
    with frozen(model), disable_edits(model), torch.no_grad(), \
            tqdm(total=n_tokens, desc=f"second moment L{layer}", unit="tok", leave=False) as bar:
        for batch in _batches(tokenizer, _texts(corpus), max_length, batch_tokens, n_tokens):
            width = max(len(ids) for ids in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
            mask = torch.zeros(len(batch), width, dtype=torch.long, device=device)
            for i, row in enumerate(batch):
                ids[i, : len(row)] = torch.tensor(row, device=device)
                mask[i, : len(row)] = 1
            with Trace(model, module, retain_input=True, retain_output=False, stop=True) as tr:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            keys = tr.input.reshape(-1, d_in)[mask.reshape(-1).bool()].to(dtype)  # right padding
            total += keys.t() @ keys
            count += keys.shape[0]
            bar.update(keys.shape[0])
    if count == 0:
        raise InvalidConfigError("The statistics corpus produced no tokens; pass a non-empty corpus.")
    if count < n_tokens:
        logger.warning("The statistics corpus ran out after %d of %d tokens; C is averaged over %d.",
                       count, n_tokens, count)
    return SecondMoment(total / count, count, key)
