"""RLSEdit: lifelong editing as recursive least squares (IJCAI-ECAI 2026, arXiv 2601.15686).

MEMIT solves each batch as if it were the first: ``ΔW = R Kᵀ (λC + K Kᵀ)⁻¹`` forgets the keys of earlier
batches, which later batches then overwrite. The least-squares problem of the *whole* stream keeps them:

    min_W  λ ‖(W − W₀) K₀‖² + Σ_t ‖W K_t − V_t‖²

and recursive least squares solves it one batch at a time with a cost that does not grow with the history.
Per layer the method keeps ``P = (λC + Σ_past K Kᵀ)⁻¹`` (``d_in × d_in``, float64, in the model's history),
starting from MEMIT's prior ``P₀ = (λC)⁻¹``. For a batch with keys ``K`` and residual ``R = V − W K``:

    ΔW = R (I + Kᵀ P K)⁻¹ Kᵀ P                 (the gain; Woodbury: = R Kᵀ (P⁻¹ + K Kᵀ)⁻¹)
    P ← P − P K (I + Kᵀ P K)⁻¹ Kᵀ P            (= (P⁻¹ + K Kᵀ)⁻¹)

(:func:`rls_update`). The first batch of a model is exactly MEMIT; later batches are MEMIT with every earlier
edit's keys in the system, at the price of an ``n × n`` solve and a rank-``n`` update of ``P``.

Why RLSEdit rather than UltraEdit (anchors §e.1): RLSEdit is a closed form on MEMIT's keys, targets and
residual spread, so it is one solver and one history here, with an exact rank-``n`` adapter per batch and an
oracle (the batch least-squares solution over all edits). UltraEdit edits other modules (gate / up projections)
from gradients with running feature normalisation, with no covariance: a different pipeline.

The prior goes through ``C``'s cached, checked Cholesky factor (:func:`~hf_knowedit.methods.solvers.prior_inverse`):
a singular or numerically singular ``C`` raises :class:`~hf_knowedit.errors.SingularSystemError`, as MEMIT does.

**State.** ``P`` per layer is committed to ``get_state(model).history`` only once the edit set is active (as
AlphaEdit's keys); :func:`reset_history` starts afresh. Reverting a set does not rewind ``P``. It is
``8 d_in²`` bytes per layer (float64; ``d_in`` the key dimension), held twice during a call, and it is written
into every lifelong checkpoint with the history (:func:`hf_knowedit.methods.memory.state_bytes`).

    >>> for batch in batches:
    ...     model.apply_edits(batch, method="rlsedit")
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SingularSystemError
from ..stack import get_state
from .config import with_aliases
from .memit import Factors, MEMITConfig, mass_edit, prepare
from .registry import EditContext, MethodResult, register_method
from .solvers import prior_inverse, scaled_mom2_weight

HISTORY_KEY = "rlsedit"


@with_aliases
@dataclass
class RLSEditConfig(MEMITConfig):
    """RLSEdit hyper-parameters: MEMIT's (λ sets the prior ``P₀ = (λC)⁻¹``)."""


@dataclass
class RLSHistory:
    """``P`` per (layer, statistics key) (float64) and the number of edits absorbed."""

    P: dict[tuple, torch.Tensor] = field(default_factory=dict)
    edits: int = 0


def reset_history(model: nn.Module) -> None:
    """Forget the stream: the next RLSEdit call starts from MEMIT's prior again."""
    get_state(model).history.pop(HISTORY_KEY, None)


def rls_update(keys: torch.Tensor, resid: torch.Tensor, P: torch.Tensor) -> tuple[Factors, torch.Tensor]:
    """One RLS step: ``((B, A), P_new)`` with ``ΔW = B A = R (I + KᵀPK)⁻¹ KᵀP`` (float32 factors, rank ``n``)
    and ``P_new = P − PK (I + KᵀPK)⁻¹ KᵀP`` (float64). ``keys [n, d_in]``, ``resid [n, d_out]``."""
    K = keys.double().t().to(P.device)  # [d_in, n]
    PK = P @ K
    S = torch.eye(K.shape[1], dtype=torch.float64, device=P.device) + K.t() @ PK  # I + KᵀPK, SPD
    try:
        gain = torch.linalg.solve(S, PK.t())  # (I + KᵀPK)⁻¹ KᵀP   [n, d_in]
    except torch.linalg.LinAlgError:
        raise SingularSystemError("RLSEdit's system I + KᵀPK is singular; check the statistics.") from None
    B = resid.double().t().to(P.device)  # [d_out, n]
    P_new = torch.addmm(P, PK, gain, alpha=-1.0)  # no d_in² temporary for PK @ gain
    return (B.float(), gain.float()), (P_new + P_new.t()).mul_(0.5)


def compute(ctx: EditContext) -> MethodResult:
    """RLSEdit for ``ctx.requests`` on top of the model's RLS history (see the module docstring)."""
    chunks, layers, stats, templates = prepare(ctx)
    history: RLSHistory = ctx.history.get(HISTORY_KEY) or RLSHistory()
    P = dict(history.P)  # updated per chunk here; written to the history only on commit

    def solve(i: int, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> Factors:
        key = (layer, stats[layer].key)
        if key not in P:
            lam = scaled_mom2_weight(keys.shape[1], ctx.config.mom2_update_weight)
            P[key] = prior_inverse(stats[layer], lam)  # P₀ = (λC)⁻¹, MEMIT's prior
        factors, P[key] = rls_update(keys, resid, P[key])
        return factors

    deltas = mass_edit(ctx, chunks, layers, templates, solve)
    new_history = RLSHistory({**history.P, **P}, history.edits + len(ctx.requests))

    def commit() -> None:  # the last step of the stack's switch, once the set is active
        ctx.history[HISTORY_KEY] = new_history

    return MethodResult(deltas=deltas, layers=layers, stats_key={l: s.key for l, s in stats.items()}, commit=commit)


register_method("rlsedit", compute, RLSEditConfig)
