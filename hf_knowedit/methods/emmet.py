"""EMMET: Equality-constrained Mass Model Editing (Gupta, Sajnani & Anumanchipalli, 2024).

MEMIT memorises the edits in the least-squares sense (``λC + KKᵀ``); EMMET makes them hard
constraints — the layer maps every edited key onto its target — while preserving the other keys
as well as possible under ``C``. The closed form is a batched ROME:

    ΔW = R D⁻¹ Kᵀ C⁻¹,    D = Kᵀ C⁻¹ K  (+ emmet_lambda · I when the batch has > 1 edit)

with ``C = λ₀ C₀ (+ update_norm_lambda · I)`` (``scalable-model-editing/unified-model-editing:
emmet/emmet_main.py``). A batch of one is exactly ROME's rank-one update. ``emmet_lambda`` guards
against an ill-conditioned ``D`` (e.g. two requests about the same subject share a key); with
``emmet_lambda = 0`` a singular ``D`` raises :class:`~hf_knowedit.errors.SingularSystemError`
instead of the reference's silent pseudo-inverse.

**How exactly each key is written.** ``λ₀`` cancels out of ``ΔW`` except through the two ridges:
``ΔW = R (K₀ᵀC₀⁻¹K₀ + λ₀·emmet_lambda·I)⁻¹ KᵀC₀⁻¹`` (with ``update_norm_lambda = 0``). An edit whose
key has ``a = kᵀC₀⁻¹k`` (≈ ``d_in`` for a typical key) gets ``a / (a + λ₀·emmet_lambda)`` of its
residual: all of it with ``emmet_lambda = 0`` or a batch of one, ≈ 99.99 % at the defaults
(``λ₀ = 1``, ``emmet_lambda = 0.1``) on any model with ``d_in`` in the thousands (≈ 99.9 % on a
96-dimensional test model). The pre-parity defaults (``λ₀ = 15,000 · d_in / 16,384``, MEMIT's λ)
made the ridge ≈ 9 % of ``a``: each layer wrote only ≈ 92 % of its share.

**Defaults are the reference's.** One layer (``band_size=1``): ``layers=None`` edits ROME's default
layer (:func:`hf_knowedit.methods.rome.default_layer`; the reference EMMET edits ROME's layer: 17 on
GPT-2 XL, 5 on GPT-J and Llama-2-7B), ``"auto"`` the traced peak; ``band_size > 1`` spreads the
residual over that many layers around it, as MEMIT does. ``λ₀ = 1`` (the reference's Llama-2-7B
value; GPT-2 XL uses 1,000 and GPT-J 10,000 in ``hparams/EMMET/*.json``: pass
``mom2_update_weight=`` to reproduce them, or ``EMMETConfig.from_reference(path)``), and
``emmet_lambda = 0.1``, ``update_norm_lambda = 0`` as in every reference file.
``mom2_update_weight=None`` gives the pre-parity ``15,000 · d_in / 16,384``.

Target vectors, keys, the residual spread over layers, chunking and exact low-rank storage are
MEMIT's (:mod:`hf_knowedit.methods.memit`).

    >>> es = model.apply_edits(facts, method="emmet")
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..architectures import num_layers
from .config import option, with_aliases
from .memit import Factors, MassEditConfig, band_around, mass_edit, prepare
from .registry import EditContext, MethodResult, register_method
from .rome import default_layer
from .solvers import cached_inverse, emmet_factors, scaled_mom2_weight


@with_aliases
@dataclass
class EMMETConfig(MassEditConfig):
    """EMMET hyper-parameters: MEMIT's (:class:`~hf_knowedit.methods.memit.MassEditConfig`) with the
    reference's single layer (``band_size=1``), plus λ₀ (reference 1 on Llama-2-7B), ``emmet_lambda``
    (reference 0.1) and ``update_norm_lambda`` (reference 0)."""

    band_size: int = option(1, "layers edited when layers is None or 'auto' (the reference EMMET: 1)", "int>=1")
    mom2_update_weight: float | None = option(
        1.0,
        "λ₀: C = λ₀ C₀; only scales the ridges (λ₀·emmet_lambda on KᵀC₀⁻¹K). None: 15000 * d_in / 16384 (pre-parity)",
        "?num>0",
    )
    emmet_lambda: float = option(0.1, "ridge on D = KᵀC⁻¹K for batches > 1", "num>=0")
    update_norm_lambda: float = option(0.0, "ridge on C (penalises ‖ΔW‖)", "num>=0")


def default_layers(model: nn.Module, band_size: int) -> list[int]:
    """EMMET's layers for ``layers=None``: ``band_size`` layers around ROME's default layer."""
    return band_around(default_layer(model), num_layers(model), band_size)


def compute(ctx: EditContext) -> MethodResult:
    """EMMET for ``ctx.requests`` (see the module docstring)."""
    cfg: EMMETConfig = ctx.config
    chunks, layers, stats, templates = prepare(ctx, default_layers=default_layers)

    def solve(i: int, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> Factors:
        return emmet_factors(
            keys,
            resid,
            stats[layer].matrix,
            scaled_mom2_weight(keys.shape[1], cfg.mom2_update_weight),
            emmet_lambda=cfg.emmet_lambda,
            update_norm_lambda=cfg.update_norm_lambda,
            cov_solve=cached_inverse(stats[layer]),
        )

    return MethodResult(
        deltas=mass_edit(ctx, chunks, layers, templates, solve),
        layers=layers,
        stats_key={l: s.key for l, s in stats.items()},
    )


register_method("emmet", compute, EMMETConfig)
