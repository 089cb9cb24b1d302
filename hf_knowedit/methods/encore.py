"""ENCORE: lifelong sequential editing without model degradation (Gupta et al. 2025, arXiv 2502.01636).

MEMIT's target vectors, keys and residual spread (:mod:`hf_knowedit.methods.memit`), with the closed form and
the stopping rule of the authors' code (``baselines/encore/encore_main.py`` and ``compute_z.py`` in
SasyaTitech/NAS; settings ``hparams/ENCORE/{gpt2-xl,Llama3-8B}.json``). Each critical layer solves

    ΔW = R Kᵀ (λC + Σ_p K_p K_pᵀ + K Kᵀ + α I)⁻¹          R = V − W K (the residual this layer writes)

the minimiser of ``λ ‖ΔW K₀‖² + Σ_p ‖ΔW K_p‖² + ‖(W + ΔW) K − V‖² + α ‖ΔW‖²_F``:

1. **Earlier edits stay put** (``add_prev_edits=True``, as in both reference settings). ``K_p`` are the keys of
   every earlier ENCORE batch at this layer, as they were when that batch was edited (stored, not recomputed),
   so a new batch does not overwrite them. The sum is the model's ENCORE history, kept and committed like
   AlphaEdit's (:mod:`hf_knowedit.methods.key_history`): it grows only once the edit set is active, each set
   carries its keys (``EditSet.state["encore.keys.<layer>"]``, :func:`restore_history`), and the chunks of one
   call (``chunk=True``) enter it one after another. It grows with ``add_prev_edits=False`` too (as the
   authors' cache does); only the solve leaves it out.
2. **A norm constraint**, ``α I`` (the paper's ``λ_n ‖Ŵ − W₀‖²_F`` with ``W₀`` the weight before this call).
3. **MPES, most-probable early stopping** of each request's ``z``, by ``prob_cutoff``
   (:func:`hf_knowedit.methods.targets.mpes_stop`): ``−N`` stops at the ``N``-th forward pass at which the new
   object is the arg-max at every target token of every rewriting prompt except the bare ``"{}"`` one (passes
   counted along the run; ``−1``: the first; ``−N`` allows up to ``N − 1`` Adam steps past it); ``p`` in
   ``(0, 1)`` stops once its probability, averaged over all rewriting prompts, exceeds ``p``. MEMIT's loss
   threshold ``early_stop`` still applies. ``most_probable_stop=False`` turns MPES off.

Deliberate differences from the authors' code:

* ``α`` is relative by default: ``α = norm_weight · λ · tr(C) / d_in``, the mean eigenvalue of ``λC`` scaled,
  so it means the same on every model (``norm_weight`` 0.1). The authors' ``update_norm_lambda`` is absolute
  (10 on GPT-2 XL, 20 on Llama-3-8B); passing ``update_norm_lambda`` uses it as is. ``λ``
  (``mom2_update_weight``) defaults to MEMIT's scaled value; the authors' is 20,000 / 15,000.
* ``prob_cutoff`` defaults to ``−2``, the Llama-3-8B setting (SmolLM2 is a Llama); GPT-2 XL's is ``−4``.
* MPES with a multi-token object wants every target token of every checked prompt at the arg-max (the
  reference compares the count of such positions with 5, its number of generated prompts: the same for
  one-token objects). With the bare prompt as the only template, that prompt is checked.
* The history is per model (the reference keeps one module-level cache). Reverting an edit set keeps its
  keys in the history, as AlphaEdit does (they only make later edits more conservative);
  :func:`reset_history` starts afresh.
* ``norm_anchor="original"`` (not in the paper or the authors' code) measures the norm term from the
  *unedited* weight, ``α ‖W + ΔW − W₀‖²_F`` with ``W₀`` pristine, which also pulls the accumulated change of
  earlier calls back::

      ΔW = (R Kᵀ − α (W − W₀)) (λC + Σ_p K_p K_pᵀ + K Kᵀ + α I)⁻¹

  Its delta has the rank of ``W − W₀`` (all earlier edits), so it is stored dense (exact,
  :meth:`~hf_knowedit.deltas.ModuleDelta.from_factors`); the default (``"previous"``) is rank ``n``.

Measurements on SmolLM2 are in ``docs/evaluation.md`` and ``docs/results/lifelong_smollm2_*.md``.

    >>> for batch in batches:
    ...     model.apply_edits(batch, method="encore")
    >>> ref = ENCOREConfig.from_reference("hparams/ENCORE/Llama3-8B.json")   # the authors' settings
    >>> model.apply_edits(batch, method="encore", config=ref.config, layers=ref.layers)
    >>> hf_knowedit.methods.encore.reset_history(model)          # a new stream
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..architectures import edited_param, from_param, mlp_out_path, read_tensor
from ..editset import EditSet
from ..errors import InvalidConfigError, SingularSystemError
from ..stack import effective_weight, get_state
from . import key_history
from .config import option, with_aliases
from .key_history import KeyHistory, PriorKeys
from .memit import Factors, MEMITConfig, mass_edit, prepare
from .registry import EditContext, MethodResult, register_method
from .solvers import scaled_mom2_weight

HISTORY_KEY = "encore"


@with_aliases
@dataclass
class ENCOREConfig(MEMITConfig):
    """ENCORE hyper-parameters: MEMIT's plus MPES, the earlier edits' keys and the norm constraint
    (reference names where the authors' files have them: ``prob_cutoff``, ``add_prev_edits``,
    ``update_norm_lambda``; :meth:`~hf_knowedit.methods.config.EditConfig.from_reference` reads those files)."""

    most_probable_stop: bool = option(True, "MPES: stop z by prob_cutoff", "bool")
    prob_cutoff: float = option(
        -2,
        "MPES rule (the authors'): -N stops z at the N-th step at which the new object is the arg-max at every "
        "rewriting prompt but the bare one (-1: the first); p in (0, 1): once its mean probability exceeds p",
    )
    add_prev_edits: bool = option(True, "solve with the keys of earlier ENCORE batches (Σ K_p K_pᵀ)", "bool")
    norm_weight: float = option(0.1, "α relative to the mean eigenvalue of λC (norm constraint)", "num>=0")
    update_norm_lambda: float | None = option(
        None, "α as an absolute number (the authors' field: 10 GPT-2 XL, 20 Llama-3-8B); None: norm_weight", "?num>=0"
    )
    norm_anchor: str = option(
        "previous",
        "the norm term's reference: 'previous' (the weight before this call: ‖ΔW‖², the paper) or "
        "'original' (the unedited weight: also pulls earlier edits back)",
        "choice:previous|original",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        c = self.prob_cutoff
        number = isinstance(c, (int, float)) and not isinstance(c, bool)
        whole = number and (isinstance(c, int) or (math.isfinite(c) and c.is_integer()))
        if not (number and ((c < 0 and whole) or 0 < c < 1)):
            raise InvalidConfigError(
                f"ENCOREConfig.prob_cutoff must be a negative whole number -N (stop z at the N-th step at which "
                f"the new object is the most probable; the authors use -2 and -4) or a probability in (0, 1), "
                f"got {c!r}. To turn MPES off, pass most_probable_stop=False."
            )


def get_history(model: nn.Module) -> KeyHistory:
    """The ENCORE history of ``model``: ``Σ K_p K_pᵀ`` per layer and the number of edits (empty if none)."""
    return key_history.get(model, HISTORY_KEY)


def history_size(model: nn.Module) -> int:
    """How many edits the ENCORE history of ``model`` holds."""
    return get_history(model).edits


def reset_history(model: nn.Module) -> None:
    """Forget the keys of earlier ENCORE batches on ``model`` (a new stream); active sets stay active."""
    key_history.reset(model, HISTORY_KEY)


def restore_history(model: nn.Module, edit_sets: Iterable[EditSet]) -> int:
    """Add the keys stored in ENCORE ``edit_sets`` (e.g. loaded from disk, in order) to the history of
    ``model``; returns the number of edits added. Use it on a model whose history was reset (or never
    written), or keys are counted twice."""
    return key_history.restore(model, edit_sets, HISTORY_KEY)


def encore_update(
    keys: torch.Tensor,
    resid: torch.Tensor,
    cov: torch.Tensor,
    lam: float,
    alpha: float,
    drift: torch.Tensor | None,
    prior: torch.Tensor | None = None,
) -> Factors:
    """``ΔW = (R Kᵀ − α D) (λC + P + K Kᵀ + α I)⁻¹`` as factors ``(B, A)``, float64 solve, float32 out.

    ``keys [n, d_in]``, ``resid [n, d_out]`` (rows are vectors), ``drift = D = W − W₀ [d_out, d_in]``,
    ``prior = P = Σ_p K_p K_pᵀ [d_in, d_in]`` (the earlier batches' keys; ``None``: none).
    ``D = 0`` or ``None`` (the increment form): ``B = Rᵀ``, ``A = K M⁻¹`` (rank ``n``);
    else ``B = [Rᵀ, −αD]``, ``A = [K M⁻¹; M⁻¹]`` (stored dense by the caller's ``ModuleDelta.from_factors``)."""
    K = keys.double()
    d_in = K.shape[1]
    eye = torch.eye(d_in, dtype=torch.float64, device=K.device)
    system = lam * cov.double().to(K.device) + K.t() @ K + alpha * eye
    if prior is not None:
        system = system + prior.double().to(K.device)
    try:
        inv = torch.linalg.solve(system, eye)  # symmetric
    except torch.linalg.LinAlgError:
        raise SingularSystemError(
            "ENCORE's system λC + Σ K_p K_pᵀ + KKᵀ + αI is singular; raise norm_weight or mom2_update_weight."
        ) from None
    if drift is None or alpha == 0 or not bool(drift.any()):
        return resid.double().t().float(), (K @ inv).float()
    B = torch.cat([resid.double().t(), -alpha * drift.to(K.device).double()], dim=1)
    A = torch.cat([K @ inv, inv], dim=0)
    return B.float(), A.float()


def norm_alpha(cfg: ENCOREConfig, lam: float, cov: torch.Tensor) -> float:
    """``α``: ``update_norm_lambda`` when given, else ``norm_weight · λ · tr(C) / d_in``."""
    if cfg.update_norm_lambda is not None:
        return float(cfg.update_norm_lambda)
    return cfg.norm_weight * lam * float(torch.diagonal(cov.double()).mean())


def compute(ctx: EditContext) -> MethodResult:
    """ENCORE for ``ctx.requests`` on top of the model's ENCORE history (see the module docstring)."""
    cfg: ENCOREConfig = ctx.config
    chunks, layers, stats, templates = prepare(ctx)
    state = get_state(ctx.model)
    prior = PriorKeys(ctx.history.get(HISTORY_KEY) or KeyHistory(), HISTORY_KEY, layers)

    def drift_of(layer: int) -> torch.Tensor:  # W − W₀, Linear orientation, on the CPU
        path = mlp_out_path(ctx.arch, layer)
        base = state.base.get(path)
        layout = ctx.arch.mlp_out_layout
        base = read_tensor(ctx.model, edited_param(path, layout)) if base is None else base
        return from_param((effective_weight(ctx.model, path, layout) - base.detach().float()).cpu(), layout)

    def solve(i: int, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> Factors:
        cov = stats[layer].matrix
        lam = scaled_mom2_weight(keys.shape[1], cfg.mom2_update_weight)
        earlier = prior.get(layer, keys.device) if cfg.add_prev_edits else None
        drift = drift_of(layer) if cfg.norm_anchor == "original" else None
        return encore_update(keys, resid, cov, lam, norm_alpha(cfg, lam, cov), drift, prior=earlier)

    deltas = mass_edit(ctx, chunks, layers, templates, solve, on_keys=prior.remember)
    return prior.result(ctx, deltas, layers, stats)


register_method("encore", compute, ENCOREConfig)
