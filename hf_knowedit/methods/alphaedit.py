"""AlphaEdit: null-space constrained knowledge editing (Fang et al., ICLR 2025).

MEMIT with two changes that keep many sequential batches from eroding the model:

1. **Null-space projection.** The update is confined to directions that the preserved
   knowledge does not use: ``P = Û Ûᵀ``, with ``Û`` the singular vectors of the key second moment
   ``C`` whose singular value is below ``nullspace_threshold`` (2e-2, absolute, as the reference's
   ``get_project``). Keys ``k₀`` of ordinary text (``P k₀ ≈ 0``) see no change: ``ΔW k₀ ≈ 0``. The
   projection replaces MEMIT's ``λC`` preservation term.
2. **Earlier edits stay put.** The keys of earlier sequential batches ``K_p`` enter the solve, so
   a new batch does not overwrite them:

       ΔW = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹          (α = ``l2``; "one line" vs MEMIT)

   solved in the basis ``Û`` (cached per layer; ``P`` is never formed): the same update from the
   ``r × r`` system ``Ûᵀ(K_p K_pᵀ + K₁ K₁ᵀ)Û + αI`` (:func:`~hf_knowedit.methods.solvers.alphaedit_factors`).

Everything else — target vectors ``z``, keys, the residual spread over the layer band, chunking,
exact low-rank storage — is MEMIT's (:mod:`hf_knowedit.methods.memit`).

**State.** ``K_p K_pᵀ`` per layer is the model's AlphaEdit history, kept in
``get_state(model).history`` (no globals; :mod:`hf_knowedit.methods.key_history`, shared with ENCORE). It
grows only after an edit set has been activated (``MethodResult.commit``), so a failed call leaves it
untouched. Each edit set also carries its own keys in ``EditSet.state`` (``"alphaedit.keys.<layer>"``), so a
saved sequence can rebuild the history on another model with :func:`restore_history`. Reverting an edit set
does not remove its keys from the history (they only make later edits more conservative);
:func:`reset_history` starts afresh explicitly.

    >>> for batch in batches:
    ...     model.apply_edits(batch, method="alphaedit")
    >>> hf_knowedit.methods.alphaedit.history_size(model)      # edits remembered so far
    >>> hf_knowedit.methods.alphaedit.reset_history(model)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..editset import EditSet
from ..errors import InvalidConfigError
from . import key_history
from .config import option, with_aliases
from .key_history import KeyHistory, PriorKeys
from .memit import Factors, MassEditConfig, mass_edit, prepare
from .registry import EditContext, MethodResult, register_method
from .solvers import alphaedit_factors, nullspace_basis

logger = logging.getLogger(__name__)

HISTORY_KEY = "alphaedit"
STATE_PREFIX = key_history.state_prefix(HISTORY_KEY)


@with_aliases
@dataclass
class AlphaEditConfig(MassEditConfig):
    """AlphaEdit hyper-parameters: MEMIT's (:class:`~hf_knowedit.methods.memit.MassEditConfig`) plus the
    null-space threshold and the ridge ``α`` (reference ``hparams/AlphaEdit``: 2e-2 and 10)."""

    nullspace_threshold: float = option(2e-2, "singular values of C below this span P", "num>0")
    nullspace_relative: bool = option(False, "threshold relative to C's largest singular value", "bool")
    l2: float = option(10.0, "α: ridge keeping the system invertible (reference 'L2')", "num>0")


@dataclass
class AlphaEditHistory(KeyHistory):
    """What AlphaEdit remembers on one model.

    Attributes:
        prior: layer -> ``Σ K_p K_pᵀ`` over the keys of all committed AlphaEdit batches (float64).
        edits: number of edits committed.
        projectors: ``(layer, stats key, threshold, relative)`` -> the null-space basis ``U`` (float32,
            ``[d_in, r]``; the projector is ``P = UUᵀ``), a cache.
    """

    projectors: dict[tuple, torch.Tensor] = field(default_factory=dict)


def get_history(model: nn.Module) -> AlphaEditHistory:
    """The AlphaEdit history of ``model`` (empty if it has none)."""
    return key_history.get(model, HISTORY_KEY, AlphaEditHistory)


def history_size(model: nn.Module) -> int:
    """How many edits the AlphaEdit history of ``model`` holds."""
    return get_history(model).edits


def reset_history(model: nn.Module) -> None:
    """Forget the keys of earlier AlphaEdit batches (and cached projectors) on ``model``.

    Active edit sets stay active; the next AlphaEdit call simply no longer protects their keys."""
    key_history.reset(model, HISTORY_KEY)


def restore_history(model: nn.Module, edit_sets: Iterable[EditSet]) -> int:
    """Add the keys stored in AlphaEdit ``edit_sets`` (e.g. loaded from disk, in order) to the
    history of ``model``. Returns the number of edits added. Use it on a model whose history was
    reset (or never written), or keys are counted twice."""
    return key_history.restore(model, edit_sets, HISTORY_KEY, AlphaEditHistory)


def compute(ctx: EditContext) -> MethodResult:
    """AlphaEdit for ``ctx.requests`` on top of the model's AlphaEdit history."""
    cfg: AlphaEditConfig = ctx.config
    chunks, layers, stats, templates = prepare(ctx)
    history: AlphaEditHistory | None = ctx.history.get(HISTORY_KEY)
    cached = dict(history.projectors) if history else {}

    projectors: dict[tuple, torch.Tensor] = {}
    for layer in layers:
        key = (layer, stats[layer].key, cfg.nullspace_threshold, cfg.nullspace_relative)
        U = cached.get(key)
        if U is None:
            U = nullspace_basis(stats[layer].matrix, cfg.nullspace_threshold, relative=cfg.nullspace_relative).float()
        rank = U.shape[1]
        if rank == 0:
            raise InvalidConfigError(
                f"AlphaEdit: the null space of layer {layer}'s statistics is empty (no singular value below "
                f"{cfg.nullspace_threshold:g}), so every update would be zero. Raise nullspace_threshold, or "
                "set nullspace_relative=True to scale it by the largest singular value."
            )
        logger.info("AlphaEdit layer %d: null space of dimension %d / %d", layer, rank, U.shape[0])
        projectors[key] = U
    U_of = {key[0]: U for key, U in projectors.items()}
    prior = PriorKeys(history or AlphaEditHistory(), HISTORY_KEY, layers)  # the model's only on commit

    def solve(i: int, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> Factors:
        old = prior.get(layer, keys.device)
        return alphaedit_factors(keys, resid, None, old, l2=cfg.l2, basis=U_of[layer].to(keys.device))

    deltas = mass_edit(ctx, chunks, layers, templates, solve, on_keys=prior.remember)
    return prior.result(ctx, deltas, layers, stats, projectors={**cached, **projectors})


register_method("alphaedit", compute, AlphaEditConfig)
