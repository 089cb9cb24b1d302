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
from dataclasses import dataclass
from typing import Any

import torch

#: sketch length of a weight fingerprint
_SKETCH = 16


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


def fingerprint(weight: torch.Tensor) -> dict[str, Any]:
    """Identify a base weight: exact sha256 of its float32 bytes plus a small numeric sketch
    (projections on fixed pseudo-random vectors), which still matches the same weights in
    another dtype. See :func:`fingerprints_match`."""
    w = weight.detach().float().cpu().contiguous()
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(w.shape[-1], _SKETCH, generator=gen)
    sketch = (w.reshape(-1, w.shape[-1]) @ probe).sum(0) / max(1, w.numel()) ** 0.5
    return {
        "shape": list(weight.shape),
        "sha256": hashlib.sha256(w.numpy().tobytes()).hexdigest(),
        "sketch": [round(float(x), 6) for x in sketch],
    }


def fingerprints_match(a: dict[str, Any], b: dict[str, Any], rtol: float = 2e-2) -> bool:
    """Same shape and either the exact hash or the sketch agrees (same weights, other dtype)."""
    if list(a["shape"]) != list(b["shape"]):
        return False
    if a["sha256"] == b["sha256"]:
        return True
    sa, sb = torch.tensor(a["sketch"]), torch.tensor(b["sketch"])
    return bool((sa - sb).norm() <= rtol * max(float(sa.norm()), 1e-12))
