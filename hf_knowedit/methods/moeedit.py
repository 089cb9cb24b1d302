"""MoEEdit: efficient and routing-stable knowledge editing for mixture-of-experts LLMs (Gu et al., ICLR 2026).

For routed-experts blocks only (the table's ``mlp_out_layout`` ``"experts"`` / ``"experts_t"``,
:mod:`hf_knowedit.experts`): the block adds ``Σ_{e ∈ T(x)} g_e(x) W_e k_e(x)``, ``W_e = down_proj[e]``. MEMIT and
AlphaEdit edit ``W = [W_0 … W_{E-1}]`` against the joint second moment of the routed keys, ``(E·I)²`` per layer
(Qwen3-30B-A3B: 98,304² floats), and their updates move the routing of later layers on unrelated text. MoEEdit
protects each expert on its own:

1. **Per-expert null spaces.** ``C_e = E[k_e k_eᵀ]`` of expert ``e``'s *un-gated* key over the statistics tokens
   routed to ``e`` (:func:`~hf_knowedit.methods.statistics.compute_expert_moments`: ``E`` blocks ``I × I``, memory
   ``E·I²`` per layer). ``P_e = U_e U_eᵀ`` spans ``C_e``'s eigenvectors with eigenvalue below
   ``nullspace_threshold`` (2e-2, absolute: AlphaEdit's recipe per expert,
   :func:`~hf_knowedit.methods.solvers.nullspace_basis`). An update ``Δ_e P_e`` leaves ``W_e k`` unchanged on
   the keys the expert sees on ordinary text, so the block's output there — and every later router's input —
   stays put.
2. **Per-expert ridge.** With the routed key of edit ``t`` at expert ``j``, ``g_tj k_tj`` (routing weights as the
   model applies them), ``v_tj = P_j k_tj`` and the residual ``R_t`` (what the block output still lacks)::

       min_Δ  Σ_t ‖R_t − Σ_j g_tj Δ_j v_tj‖² + λ Σ_j ‖Δ_j‖²          (λ = ``lambda_reg``, 1 in the authors' configs)

   and expert ``j``'s ``down_proj`` changes by ``Δ_j P_j``.

Everything else — target vectors ``z`` at the last edited layer, the keys (routed keys at the subject's last token,
averaged over the context templates), chunking, exact low-rank storage of ``ΔW = [Δ_0 P_0 … Δ_{E-1} P_{E-1}]`` in
the same routed-experts delta form as MEMIT's (so adapters, revert, merge and dispatch are unchanged) — is MEMIT's
(:mod:`hf_knowedit.methods.memit`).

Deliberate differences from the authors' code (``Terence-Gu/MoEEdit``):

* **Exact solve instead of RP-BCD.** The authors minimise the objective above by randomly permuted block
  coordinate descent over the experts (``num_passes`` 4 for Qwen3-30B-A3B, 10 for GPT-OSS-20B). It is a ridge
  problem in the ``n`` edits, so its minimiser is solved exactly: with ``K̃`` the projected routed keys,
  ``ΔW = R (K̃ᵀK̃ + λI)⁻¹ K̃ᵀ`` restricted to the experts the edits reach
  (:func:`~hf_knowedit.methods.solvers.expert_nullspace_factors`) — the point BCD converges to. Since that update
  already lies in the span of ``P_j``, ``Δ_j P_j = Δ_j``.
* **Residual spreading is MEMIT's.** The authors write, at edited layer ``l_i`` (``i`` of ``L``), the residual
  ``(z − h_{l_i}) / √(L − i)`` with ``h_{l_i}`` the block output of the edited layer itself; here, as MEMIT,
  ``(z − h_{l_L}) / (L − i)`` with ``h_{l_L}`` the block output of the last edited layer, where ``z`` lives. The
  two agree on one layer (the authors' GPT-OSS-20B setting, layer 5).
* **Keys and routing weights.** The authors use the bare prompt's key and renormalised top-k softmax weights;
  here the model's own routing weights (the same for models that renormalise, as Qwen3-30B-A3B and Mixtral) and
  keys averaged over the context templates (``context_templates=0``: the bare prompt, as theirs;
  :meth:`~hf_knowedit.methods.config.EditConfig.from_reference` sets that).
* **No replay of earlier batches.** The authors' solver keeps earlier calls' keys and residuals and solves them
  again with each new batch; here each call is one solve on top of the edited model.
* **GPT-OSS keys.** The statistics use the experts' own gate (``_apply_gate``: clamped SwiGLU on interleaved
  columns, :mod:`hf_knowedit.experts`) where the authors' packed-experts statistics take ``silu(gate) · up`` of
  the two halves.

An expert no statistics token reached gets ``C_e = I``, hence ``P_e = 0`` and no update (as the authors').

    >>> es = model.apply_edits(facts, method="moeedit")                      # Mixtral, Qwen3-MoE, OLMoE, GPT-OSS, ...
    >>> ref = MoEEditConfig.from_reference("configs/qwen3-30b-a3b.json")     # the authors' settings
    >>> es = model.apply_edits(facts, method="moeedit", config=ref.config, layers=ref.layers)
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..architectures import EXPERT_LAYOUTS, mlp_out_path
from ..errors import InvalidConfigError, UnsupportedArchitectureError
from .config import option, with_aliases
from .memit import Factors, MassEditConfig, check_batch, edit_templates, mass_edit, resolve_layers
from .registry import EditContext, MethodResult, register_method
from .solvers import expert_nullspace_factors, nullspace_basis
from .statistics import expert_module_name, expert_moments_for

logger = logging.getLogger(__name__)


@with_aliases
@dataclass
class MoEEditConfig(MassEditConfig):
    """MoEEdit hyper-parameters: MEMIT's (:class:`~hf_knowedit.methods.memit.MassEditConfig`) plus the per-expert
    null-space threshold and the ridge ``λ`` (the authors' ``nullspace_threshold`` 2e-2 and ``lambda_reg`` 1)."""

    #: ``from_reference`` reads the authors' files with the bare prompt only (they use no context templates)
    reference_templates: ClassVar[Any] = 0

    nullspace_threshold: float = option(2e-2, "eigenvalues of an expert's C_e below this span its P_e", "num>0")
    nullspace_relative: bool = option(False, "threshold relative to each C_e's largest eigenvalue", "bool")
    lambda_reg: float = option(1.0, "λ: ridge of the per-expert solve (the authors' lambda_reg)", "num>0")


def compute(ctx: EditContext) -> MethodResult:
    """MoEEdit for ``ctx.requests`` (see the module docstring)."""
    cfg: MoEEditConfig = ctx.config
    if ctx.arch.mlp_out_layout not in EXPERT_LAYOUTS:
        raise UnsupportedArchitectureError(
            f"MoEEdit edits routed-experts blocks only, but {ctx.arch.model_type}'s edited module is "
            f"{ctx.arch.mlp_out!r} (mlp_out_layout={ctx.arch.mlp_out_layout!r}); use method='alphaedit' or "
            "method='memit' for it."
        )
    chunks = check_batch(ctx.requests, cfg)
    layers = resolve_layers(ctx, cfg.band_size)
    moments = {layer: expert_moments_for(ctx.model, ctx.tokenizer, layer, cfg) for layer in layers}
    bases: dict[tuple[int, int], torch.Tensor] = {}

    def basis(layer: int, e: int) -> torch.Tensor:
        """``U_e`` of expert ``e`` at ``layer`` (computed for the experts the edits reach only)."""
        if (layer, e) not in bases:
            C = moments[layer][e].matrix
            bases[layer, e] = nullspace_basis(C, cfg.nullspace_threshold, relative=cfg.nullspace_relative).float()
        return bases[layer, e]

    def solve(i: int, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> Factors:
        inner = moments[layer][0].d_in
        reached = keys.reshape(keys.shape[0], -1, inner).ne(0).any(dim=2).any(dim=0).nonzero().flatten().tolist()
        U = {e: basis(layer, e).to(keys.device) for e in reached}
        U = {e: u for e, u in U.items() if u.shape[1] > 0}
        dims = [u.shape[1] for u in U.values()] or [0]
        logger.info(
            "MoEEdit layer %d: %d experts reached, %d with a null space (dimension %d to %d of %d)",
            layer,
            len(reached),
            len(U),
            min(dims),
            max(dims),
            inner,
        )
        if not U:
            raise InvalidConfigError(
                f"MoEEdit: the null space of every expert the edits reach at layer {layer} is empty (no eigenvalue "
                f"of their C_e below {cfg.nullspace_threshold:g}), so every update would be zero. Raise "
                "nullspace_threshold, or set nullspace_relative=True to scale it by each C_e's largest eigenvalue."
            )
        return expert_nullspace_factors(keys, resid, U, cfg.lambda_reg)

    deltas = mass_edit(ctx, chunks, layers, edit_templates(ctx), solve)
    stats_key = {
        layer: dataclasses.replace(moments[layer][0].key, module=expert_module_name(mlp_out_path(ctx.arch, layer), "*"))
        for layer in layers
    }
    return MethodResult(deltas=deltas, layers=layers, stats_key=stats_key)


register_method("moeedit", compute, MoEEditConfig)
