"""EMMET: Equality-constrained Mass Model Editing (Gupta, Sajnani & Anumanchipalli, 2024).

MEMIT memorises the edits in the least-squares sense (``λC + KKᵀ``); EMMET makes them hard
constraints — the layer maps every edited key exactly onto its target — while preserving the
other keys as well as possible under ``C``. The closed form is a batched ROME:

    ΔW = R D⁻¹ Kᵀ C⁻¹,    D = Kᵀ C⁻¹ K  (+ emmet_lambda · I when the batch has > 1 edit)

with ``C = λ₀ C₀ (+ update_norm_lambda · I)`` (``scalable-model-editing/unified-model-editing:
emmet/emmet_main.py``). A batch of one is exactly ROME's rank-one update. ``emmet_lambda`` guards
against an ill-conditioned ``D`` (e.g. two requests about the same subject share a key); with
``emmet_lambda = 0`` a singular ``D`` raises :class:`~hf_knowedit.errors.SingularSystemError`
instead of the reference's silent pseudo-inverse.

Target vectors, keys, the residual spread over layers, chunking and exact low-rank storage are
MEMIT's (:mod:`hf_knowedit.methods.memit`). Note that ``λ₀`` cancels out of ``ΔW`` except through the two
regularisers: it sets the scale ``emmet_lambda`` and ``update_norm_lambda`` act on.

    >>> es = model.apply_edits(facts, method="emmet")
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import option, with_aliases
from .memit import Factors, MassEditConfig, mass_edit, prepare
from .registry import EditContext, MethodResult, register_method
from .solvers import emmet_factors, scaled_mom2_weight


@with_aliases
@dataclass
class EMMETConfig(MassEditConfig):
    """EMMET hyper-parameters: MEMIT's (:class:`~hf_knowedit.methods.memit.MassEditConfig`) plus λ₀,
    ``emmet_lambda`` (reference 0.1) and ``update_norm_lambda`` (reference 0)."""

    mom2_update_weight: float | None = option(
        None, "λ₀: scale of C = λ₀ C₀ (None: 15000 * d_in / 16384, as MEMIT's λ)", "?num>0"
    )
    emmet_lambda: float = option(0.1, "ridge on D = KᵀC⁻¹K for batches > 1", "num>=0")
    update_norm_lambda: float = option(0.0, "ridge on C (penalises ‖ΔW‖)", "num>=0")


def compute(ctx: EditContext) -> MethodResult:
    """EMMET for ``ctx.requests`` (see the module docstring)."""
    cfg: EMMETConfig = ctx.config
    chunks, layers, stats, templates = prepare(ctx)

    def solve(i: int, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> Factors:
        return emmet_factors(
            keys,
            resid,
            stats[layer].matrix,
            scaled_mom2_weight(keys.shape[1], cfg.mom2_update_weight),
            emmet_lambda=cfg.emmet_lambda,
            update_norm_lambda=cfg.update_norm_lambda,
        )

    return MethodResult(
        deltas=mass_edit(ctx, chunks, layers, templates, solve),
        layers=layers,
        stats_key={l: s.key for l, s in stats.items()},
    )


register_method("emmet", compute, EMMETConfig)
