"""Second-moment statistics as data: ``C = E[k kᵀ]`` of an edited module's input, the key that
identifies it, its cache on disk and its sharing on the Hub. Computing ``C`` from a corpus is
:mod:`hf_knowedit.methods.statistics`; this module never runs a model.

Every result is identified by a :class:`StatsKey`: the model (``name@revision`` when the caller
gives a revision, else a sha256 fingerprint of the base weights the layer's input depends on),
layer, module path, corpus identity, requested token count and dtype. :class:`StatsCache`
(``$HF_KNOWEDIT_STATS_CACHE``, else ``$HF_KNOWEDIT_CACHE/stats``, else ``~/.cache/hf_knowedit/stats``)
keeps one file per key. A hit never recomputes; a different key never reuses a file; a file whose
metadata does not match the key it is loaded for raises
:class:`~hf_knowedit.errors.StatisticsMismatchError`.

File format (one ``.safetensors`` file per entry, :meth:`SecondMoment.save` / :meth:`SecondMoment.load`):

* tensor ``"mom2"``: ``C``, shape ``[d_in, d_in]``, dtype = the key's dtype (float32/float64).
* metadata (all strings): ``format = "hf_knowedit.second_moment"``, ``format_version = "1"``,
  ``model``, ``layer``, ``module``, ``corpus``, ``n_tokens`` (the key's, requested), ``dtype``
  (``"float32"``/``"float64"``), ``n_tokens_used`` (tokens actually averaged), ``d_in``.
* file name: :meth:`StatsKey.filename` (``<model slug>--L<layer>--<sha256 of the key, 16 hex>.safetensors``).

On the Hub (:func:`push_statistics` / :func:`pull_statistics`) the same files live in a repo's
``second_moments/`` folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, hf_hub_download
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .architectures import get_architecture, mlp_out_dims, mlp_out_path
from .errors import InvalidConfigError, SingularSystemError, StatisticsMismatchError

logger = logging.getLogger(__name__)

FORMAT = "hf_knowedit.second_moment"
FORMAT_VERSION = "1"
TENSOR_NAME = "mom2"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


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

    def metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> StatsKey:
        try:
            return cls(
                meta["model"], int(meta["layer"]), meta["module"], meta["corpus"], int(meta["n_tokens"]), meta["dtype"]
            )
        except (KeyError, ValueError) as err:
            raise StatisticsMismatchError(
                f"Statistics metadata is incomplete ({err}); expected the keys "
                "model, layer, module, corpus, n_tokens, dtype. Recompute the file."
            ) from err

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def filename(self) -> str:
        slug = re.sub(
            r"[^A-Za-z0-9._-]+", "_", self.model.split(":")[-1] if self.model.startswith("weights:") else self.model
        )[:60]
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
    _factor: torch.Tensor | None = field(default=None, repr=False, compare=False)

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
                        logger.warning(
                            "Second moment at %s is singular; added %.0e * mean(diag) to its diagonal. "
                            "Use more tokens (n_tokens >> %d) for a better estimate.",
                            self.key.module,
                            jitter,
                            c.shape[0],
                        )
                    self._factor = factor
                    break
            else:
                raise SingularSystemError(
                    f"The second moment at {self.key.module} is not positive definite even "
                    "after regularisation; recompute it with more tokens or use mom2='identity'."
                )
        return self._factor

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``C⁻¹ rhs`` for ``rhs`` of shape ``[d_in]`` or ``[d_in, m]``, in float64 via the cached Cholesky
        factor; returned in ``rhs``'s dtype and device."""
        if rhs.shape[0] != self.d_in:
            raise InvalidConfigError(
                f"solve: rhs has {rhs.shape[0]} rows, the second moment is {self.d_in}x{self.d_in}."
            )
        if self.is_identity:
            return rhs.clone()
        factor = self.cholesky()
        x = torch.cholesky_solve(rhs.to(factor.device, torch.float64).reshape(self.d_in, -1), factor)
        return x.reshape(rhs.shape).to(rhs.device, rhs.dtype)

    # -- files ---------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write this entry as one safetensors file (format in the module docstring), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **self.key.metadata(),
            "n_tokens_used": str(self.n_tokens),
            "d_in": str(self.d_in),
        }
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            save_file(
                {TENSOR_NAME: self.matrix.detach().to("cpu", DTYPES[self.key.dtype]).contiguous()}, tmp, metadata=meta
            )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path, expected: StatsKey | None = None, *, device: Any = None) -> SecondMoment:
        """Read a file written by :meth:`save`. With ``expected``, every key field must match, else
        :class:`StatisticsMismatchError` says which (another model, layer, module, corpus, ...)."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise StatisticsMismatchError(
                        f"{path} is not an hf_knowedit second-moment file (metadata format={meta.get('format')!r})."
                    )
                matrix = f.get_tensor(TENSOR_NAME)
        except StatisticsMismatchError:
            raise
        except Exception as err:  # unreadable / not safetensors
            raise StatisticsMismatchError(
                f"Cannot read statistics file {path}: {err}. Delete it to recompute."
            ) from err
        key = StatsKey.from_metadata(meta)
        if expected is not None and key != expected:
            diff = [
                f"{k}: file has {getattr(key, k)!r}, expected {getattr(expected, k)!r}"
                for k in ("model", "layer", "module", "corpus", "n_tokens", "dtype")
                if getattr(key, k) != getattr(expected, k)
            ]
            raise StatisticsMismatchError(
                f"Statistics file {path} was computed for something else ("
                + "; ".join(diff)
                + "). Use the file made for this model and layer, "
                "or delete it to recompute."
            )
        if (
            matrix.dim() != 2
            or matrix.shape[0] != matrix.shape[1]
            or str(matrix.shape[0]) != meta.get("d_in", str(matrix.shape[0]))
        ):
            raise StatisticsMismatchError(
                f"Statistics file {path} holds a {tuple(matrix.shape)} matrix, not [d_in, d_in]."
            )
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

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path(self, key: StatsKey) -> Path:
        return self.directory / key.filename()

    def get(self, key: StatsKey, device: Any = None) -> SecondMoment | None:
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


def identity_moment(model: nn.Module, layer: int) -> SecondMoment:
    """``C = I`` (``mom2="identity"``): ROME without the covariance adjustment, labelled ``corpus="identity"``."""
    spec = get_architecture(model)
    d_in, _ = mlp_out_dims(model, spec, layer)
    key = StatsKey("any", layer, mlp_out_path(spec, layer), "identity", 0, "float64")
    return SecondMoment(torch.eye(d_in, dtype=torch.float64), 0, key)


# --------------------------------------------------------------------------------------------
# second-moment statistics on the Hub

#: folder of a Hub repo that holds second-moment files, one per StatsKey (``StatsKey.filename()``)
STATS_FOLDER = "second_moments"


def push_statistics(
    entry_or_path: Any,
    repo_id: str,
    *,
    repo_type: str = "model",
    revision: str | None = None,
    token: str | bool | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool | None = None,
) -> Any:
    """Upload one second-moment cache entry (a :class:`SecondMoment` or a file
    written by ``SecondMoment.save``) to ``repo_id`` under ``second_moments/<StatsKey.filename()>``.

    The file is read (and so validated) before anything is sent. Returns huggingface_hub's ``CommitInfo``.
    """
    with tempfile.TemporaryDirectory(prefix="hf_knowedit-stats-") as tmp:
        if isinstance(entry_or_path, SecondMoment):
            entry = entry_or_path
            path = entry.save(Path(tmp) / entry.key.filename())
        else:
            path = Path(entry_or_path)
            entry = SecondMoment.load(path)
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True).repo_id
        return api.upload_file(
            path_or_fileobj=str(path),
            path_in_repo=f"{STATS_FOLDER}/{entry.key.filename()}",
            repo_id=repo_id,
            repo_type=repo_type,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message
            or f"Second moment of {entry.key.module} ({entry.key.n_tokens} tokens, {entry.key.corpus})",
        )


def pull_statistics(
    repo_id: str,
    key_or_filename: Any,
    *,
    repo_type: str = "model",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    device: Any = None,
    stats_cache: Any = None,
) -> Any:
    """Download a second-moment entry pushed by :func:`push_statistics` and return the
    :class:`SecondMoment`.

    ``key_or_filename`` is a :class:`StatsKey` (the file must have been computed
    for exactly that key, else :class:`~hf_knowedit.errors.StatisticsMismatchError`) or a file name
    in the repo's ``second_moments/`` folder. With ``stats_cache`` (a ``StatsCache``) the entry is also
    stored there, so editing methods find it without recomputing.
    """
    expected = key_or_filename if isinstance(key_or_filename, StatsKey) else None
    filename = expected.filename() if expected is not None else str(key_or_filename)
    if "/" not in filename:
        filename = f"{STATS_FOLDER}/{filename}"
    path = hf_hub_download(
        repo_id,
        filename,
        repo_type=repo_type,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        force_download=force_download,
        local_files_only=local_files_only,
    )
    entry = SecondMoment.load(path, expected=expected, device=device)
    if stats_cache is not None:
        stats_cache.put(entry)
    return entry
