"""Low-rank weight deltas and base-weight fingerprints: the data every other module builds on.

A module's update is ``ΔW = B @ A`` in the ``[out, in]`` orientation of ``nn.Linear``,
with ``A: [r, in]`` and ``B: [out, r]`` (PEFT's ``lora_A`` / ``lora_B`` with scaling 1).
ROME gives ``r = 1``; MEMIT-family methods give ``r <= edits per layer``. A *dense* delta
is stored exactly as full-rank factors with one identity factor (``r = min(in, out)``),
flagged ``dense=True``.

Factors are kept in float32 whatever the model's dtype; they are cast only when
written into weights.
"""

from __future__ import annotations

import hashlib
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidConfigError

#: a fingerprint's sketch is ``_SKETCH_SIDE²`` projections of the weight
_SKETCH_SIDE = 8
#: version of the fingerprint layout (1: column-sum sketch; 2: two-sided sketch and dtype)
FINGERPRINT_VERSION = 2


@dataclass
class ModuleDelta:
    """``ΔW = B @ A`` for one module (``A: [r, in]``, ``B: [out, r]``, float32)."""

    A: torch.Tensor
    B: torch.Tensor
    dense: bool = False

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"ModuleDelta needs A [r, in] and B [out, r]; got {tuple(self.A.shape)} and {tuple(self.B.shape)}"
            )
        self.A = self.A.detach().float()
        self.B = self.B.detach().float()

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple:
        """Shape of ``ΔW`` as ``(out, in)``."""
        return (self.B.shape[0], self.A.shape[1])

    def delta(self, device: Any = None) -> torch.Tensor:
        """``B @ A`` in float32, ``[out, in]``."""
        A, B = self.A.to(device), self.B.to(device)
        return B @ A

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.A).all() and torch.isfinite(self.B).all())

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``ΔW = U diag(S) Vh`` in float64 (``U [out, p]``, ``S [p]`` descending, ``Vh [p, in]``,
        ``p <= rank``), computed from the factors without forming ``ΔW``: QR of ``B`` and of ``Aᵀ``,
        then the SVD of the small core ``R_B R_Aᵀ``."""
        qb, rb = torch.linalg.qr(self.B.double())  # [out, p], [p, r]
        qa, ra = torch.linalg.qr(self.A.double().t())  # [in, q], [q, r]
        u, s, vh = torch.linalg.svd(rb @ ra.t(), full_matrices=False)
        return qb @ u, s, vh @ qa.t()

    def singular_values(self) -> torch.Tensor:
        """The singular values of ``ΔW`` (float64, descending; see :meth:`svd`)."""
        return self.svd()[1]

    def truncate(self, rank: int) -> tuple[ModuleDelta, float]:
        """The best rank-``rank`` approximation of ``ΔW`` (Eckart–Young: its largest singular values) as
        factors, and the relative error ``‖ΔW − ΔW_r‖_F / ‖ΔW‖_F = sqrt(Σ_{i>r} s_i² / Σ s_i²)``.

        Computed in float64 from the factors (:meth:`svd`); the singular values are split evenly between
        the new factors (``B = U √S``, ``A = √S Vh``) so that neither is much larger than the other in a
        low-precision serving dtype. A delta whose rank is at most ``rank`` comes back unchanged (a copy,
        error 0). The result is never stored dense: it is a rank-``rank`` LoRA, whatever its size."""
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise InvalidConfigError(f"rank must be a positive integer, got {rank!r}.")
        rank = int(rank)
        if rank >= self.rank:
            return ModuleDelta(A=self.A.clone(), B=self.B.clone(), dense=self.dense), 0.0
        u, s, vh = self.svd()
        total = float(s.square().sum())
        error = (float(s[rank:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
        root = s[:rank].sqrt()
        return ModuleDelta(A=root[:, None] * vh[:rank], B=u[:, :rank] * root), error

    @classmethod
    def from_dense(cls, delta: torch.Tensor) -> ModuleDelta:
        """Exact full-rank factors of a dense ``[out, in]`` delta (one factor is the identity)."""
        out_dim, in_dim = delta.shape
        delta = delta.detach().float()
        if in_dim <= out_dim:
            return cls(A=torch.eye(in_dim, device=delta.device), B=delta, dense=True)
        return cls(A=delta, B=torch.eye(out_dim, device=delta.device), dense=True)

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor, dense_fraction: float = 0.5) -> ModuleDelta:
        """``B @ A``; stored dense when the rank exceeds ``dense_fraction * min(in, out)``
        (then the factors would be larger than the matrix they describe)."""
        r, (out_dim, in_dim) = A.shape[0], (B.shape[0], A.shape[1])
        if r > dense_fraction * min(in_dim, out_dim):
            return cls.from_dense(B.double() @ A.double())
        return cls(A=A, B=B)


def _unit_roundoff(dtype_name: str) -> float:
    try:
        return float(torch.finfo(getattr(torch, dtype_name)).eps) / 2
    except (AttributeError, TypeError):
        return float(torch.finfo(torch.float32).eps) / 2


def _sketch(weight: torch.Tensor) -> torch.Tensor:
    """``Rᵀ W Q / sqrt(numel)`` with fixed Gaussian ``R [out, k]`` and ``Q [in, k]``: k² numbers that move
    by about the relative size of any change of ``W`` (rounding to another dtype: its unit roundoff; a 1 %
    perturbation: 1 %; a permutation of rows or columns: more than 100 %)."""
    w = weight.detach().float().reshape(-1, weight.shape[-1])
    gen = torch.Generator().manual_seed(0)
    left = torch.randn(w.shape[0], _SKETCH_SIDE, generator=gen).to(w.device)
    right = torch.randn(w.shape[1], _SKETCH_SIDE, generator=gen).to(w.device)
    return (left.t().double() @ (w @ right).double()).flatten().cpu() / max(1, w.numel()) ** 0.5


def fingerprint(weight: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Identify the weights an edit was computed on: the exact sha256 of their float32 bytes, the dtype
    they were held in (``dtype``, default the weight's own), and a sketch (:func:`_sketch`) that still
    matches the same weights rounded to another dtype. See :func:`fingerprints_match`."""
    w = weight.detach().float().cpu().contiguous()
    return {
        "version": FINGERPRINT_VERSION,
        "shape": list(weight.shape),
        "dtype": str(dtype or weight.dtype).removeprefix("torch."),
        "sha256": hashlib.sha256(w.numpy().tobytes()).hexdigest(),
        "sketch": [float(f"{x:.9g}") for x in _sketch(w)],
    }


def _legacy_sketch(weight: torch.Tensor) -> list[float]:
    """The sketch of fingerprints written before version 2 (16 projections of the column sums)."""
    w = weight.detach().float().cpu()
    probe = torch.randn(w.shape[-1], 16, generator=torch.Generator().manual_seed(0))
    return [round(float(x), 6) for x in (w.reshape(-1, w.shape[-1]) @ probe).sum(0) / max(1, w.numel()) ** 0.5]


def matches_weight(stored: dict[str, Any], weight: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether ``weight`` (held in ``dtype``) is the weight ``stored`` was taken of, in ``stored``'s version."""
    if stored.get("version", 1) < FINGERPRINT_VERSION:
        w = weight.detach().float().cpu().contiguous()
        legacy = {"shape": list(weight.shape), "sha256": hashlib.sha256(w.numpy().tobytes()).hexdigest(),
                  "sketch": _legacy_sketch(w)}  # fmt: skip
        return fingerprints_match(stored, legacy)
    return fingerprints_match(stored, fingerprint(weight, dtype))


def fingerprints_match(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same shape, and the exact hash or the sketch agrees: within ``2.2 · u / √3`` relative (about twice
    the RMS rounding error) for the unit roundoff ``u`` of the coarser of the two dtypes — bf16 0.5 %,
    fp16 0.06 %, float32 exact up to summation order. A 1 % perturbation or a permutation fails."""
    if list(a["shape"]) != list(b["shape"]):
        return False
    if a["sha256"] == b["sha256"]:
        return True
    sa, sb = torch.tensor(a["sketch"], dtype=torch.float64), torch.tensor(b["sketch"], dtype=torch.float64)
    if sa.shape != sb.shape:
        return False
    if a.get("version", 1) < FINGERPRINT_VERSION:
        return bool((sa - sb).norm() <= 2e-2 * max(float(sa.norm()), 1e-12))
    u = max(_unit_roundoff(a.get("dtype", "float32")), _unit_roundoff(b.get("dtype", "float32")))
    tol = max(2.2 * u / 3**0.5, 1e-6)
    return bool((sa - sb).norm() <= tol * max(float(sa.norm()), 1e-30))


def deltas_digest(deltas: dict[str, ModuleDelta], layouts: dict[str, str]) -> str:
    """sha256 of what a set of deltas does: module paths, layouts and the factors' float32 bytes. Two
    edit sets with the same digest make the same change."""
    h = hashlib.sha256()
    for path in sorted(deltas):
        d = deltas[path]
        h.update(f"{path}|{layouts.get(path, 'linear')}|{tuple(d.A.shape)}|{tuple(d.B.shape)}|".encode())
        for t in (d.A, d.B):
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
