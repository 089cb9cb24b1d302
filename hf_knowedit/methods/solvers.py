"""The linear algebra of the MEMIT family, as exact low-rank factors.

Every MEMIT-style method writes, at each edited layer, an update ``ΔW`` (``[d_out, d_in]``,
Linear orientation) that maps the edited keys onto a residual. All of them have the form
``ΔW = B @ A`` with ``B: [d_out, n]`` and ``A: [n, d_in]`` for a batch of ``n`` edits, so the
functions here return ``(B, A)`` — the factors :class:`hf_knowedit.editset.ModuleDelta` stores.

Conventions (rows are vectors, as the rest of the library produces them):

* ``keys``: ``[n, d_in]`` — the key of each edit at this layer (``K`` below is ``keysᵀ``, ``[d_in, n]``).
* ``resid``: ``[n, d_out]`` — what each key's output should change by (``R = residᵀ``).
* ``cov``: ``[d_in, d_in]`` — the uncentered second moment ``C = E[k kᵀ]`` of the preserved keys.

All solves run in float64; factors are returned in ``dtype`` (float32 by default). A system
that is singular (or numerically so) raises :class:`~hf_knowedit.errors.SingularSystemError`
with a hint about which regulariser to raise; nothing is silently pseudo-inverted.

Formulas (paper notation, columns are vectors):

* MEMIT (Meng et al. 2023, eq. 14): ``ΔW = R Kᵀ (λC + K Kᵀ)⁻¹`` → ``B = R``, ``A = ((λC + KKᵀ)⁻¹ K)ᵀ``.
* AlphaEdit (Fang et al. 2025): ``ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹`` with the null-space
  projector ``P`` of ``C`` and the earlier edits' keys ``K_p`` → ``B = R``,
  ``A = ((P (KKᵀ + K_pK_pᵀ) + αI)⁻¹ P K)ᵀ``.
* MoEEdit (Gu et al. 2026), per-expert projectors ``P_e = U_e U_eᵀ`` on routed keys: AlphaEdit's update without
  earlier keys for the block-diagonal ``P = diag(P_0 … P_{E-1})`` and ``α = λ``, solved in ``n``-space expert by
  expert (:func:`expert_nullspace_factors`; ``diag(U_e)`` is never formed).
* EMMET (Gupta et al. 2024): ``ΔW = R D⁻¹ Kᵀ C⁻¹``, ``D = Kᵀ C⁻¹ K (+ λ_E I)`` → ``B = R D⁻¹``,
  ``A = (C⁻¹ K)ᵀ``; with ``λ_E = 0`` the edits hold exactly: ``ΔW K = R``.

Without new ``d × d`` factorisations (the same numbers, O(d²n) instead of O(d³) per layer per batch):

* MEMIT with ``cov_solve = C⁻¹·`` (the second moment's cached Cholesky, :func:`cached_inverse`):
  ``(λC + KKᵀ)⁻¹K = C⁻¹K (λI + KᵀC⁻¹K)⁻¹`` (Woodbury; an ``n × n`` system).
* EMMET with ``cov_solve``: ``C⁻¹K = C₀⁻¹K / λ₀`` (only when ``update_norm_lambda = 0``).
* AlphaEdit with the null-space basis ``U`` (``P = UUᵀ``, :func:`nullspace_basis`): the solution lies in
  the span of ``U``, so ``(PS + αI)⁻¹PK = U (UᵀSU + αI)⁻¹ UᵀK`` (an ``r × r`` system; without earlier
  keys ``S = KKᵀ`` and it is ``U B (BᵀB + αI)⁻¹``, ``B = UᵀK``, an ``n × n`` one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import SingularSystemError

__all__ = [
    "alphaedit_factors",
    "cached_inverse",
    "emmet_factors",
    "expert_nullspace_factors",
    "memit_factors",
    "nullspace_basis",
    "nullspace_projector",
    "prior_inverse",
    "spread_residual",
]

#: a symmetric system whose Cholesky pivots spread more than this (≈ condition number) counts as singular
MAX_CONDITION = 1e13


def _check_shapes(keys: torch.Tensor, resid: torch.Tensor, square: torch.Tensor | None = None) -> None:
    if keys.dim() != 2 or resid.dim() != 2 or keys.shape[0] != resid.shape[0]:
        raise ValueError(
            f"keys [n, d_in] and resid [n, d_out] must agree on n; got {tuple(keys.shape)} and {tuple(resid.shape)}"
        )
    if keys.shape[0] == 0:
        raise ValueError("No keys: a layer update needs at least one edit.")
    if square is not None and tuple(square.shape) != (keys.shape[1], keys.shape[1]):
        raise ValueError(f"Expected a [{keys.shape[1]}, {keys.shape[1]}] matrix, got {tuple(square.shape)}")


def _spd_solve(matrix: torch.Tensor, rhs: torch.Tensor, what: str, hint: str) -> torch.Tensor:
    """``matrix⁻¹ rhs`` for a symmetric positive definite ``matrix`` (float64, Cholesky)."""
    L, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise SingularSystemError(f"{what} is singular (not positive definite); {hint}")
    pivots = L.diagonal().abs()
    if float(pivots.min()) == 0.0 or float((pivots.max() / pivots.min()) ** 2) > MAX_CONDITION:
        raise SingularSystemError(
            f"{what} is numerically singular (condition number above {MAX_CONDITION:.0e}); {hint}"
        )
    out = torch.cholesky_solve(rhs, L)
    if not torch.isfinite(out).all():
        raise SingularSystemError(f"Solving {what} gave NaN/Inf; {hint}")
    return out


def cached_inverse(moment: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``C⁻¹ ·`` through a :class:`~hf_knowedit.moments.SecondMoment`'s cached Cholesky factor, or None
    where it would not give today's numbers: the factor carries a diagonal jitter (``C`` was singular)
    or ``C`` is numerically singular (then the solvers form their system and report it as before).
    ``mom2="identity"`` solves without a factor."""
    if moment.is_identity:
        return moment.solve
    L = moment.cholesky()
    diag = moment.matrix.double().diagonal().to(L.device)
    scale = float(diag.mean().clamp_min(1e-30))
    if float((L.pow(2).sum(1) - diag).mean()) > 1e-11 * scale:  # the smallest jitter is 1e-10 · scale
        return None
    pivots = L.diagonal().abs()
    if float(pivots.min()) == 0.0 or float((pivots.max() / pivots.min()) ** 2) > MAX_CONDITION:
        return None
    return moment.solve


def prior_inverse(moment: Any, mom2_weight: float) -> torch.Tensor:
    """``(λC)⁻¹`` (float64, ``[d_in, d_in]``) through ``C``'s cached Cholesky factor, with its checks
    (:func:`cached_inverse`): where ``C`` is singular or numerically singular (its factor needed a jitter, or
    its pivots spread beyond :data:`MAX_CONDITION`) it raises :class:`SingularSystemError`, as MEMIT's solve
    does for ``λC + KKᵀ``, instead of inverting noise."""
    if mom2_weight <= 0:
        raise SingularSystemError(f"λC with λ = {mom2_weight} is singular; set mom2_update_weight > 0.")
    solve = cached_inverse(moment)
    if solve is None:
        raise SingularSystemError(
            f"The second moment C at {moment.key.module} is singular or numerically singular (condition number "
            f"above {MAX_CONDITION:.0e}), so (λC)⁻¹ is noise; collect statistics from more tokens "
            f"(mom2_n_tokens >> d_in = {moment.d_in}) or use mom2='identity'."
        )
    eye = torch.eye(moment.d_in, dtype=torch.float64, device=moment.matrix.device)
    return solve(eye).div_(mom2_weight)


def spread_residual(resid: torch.Tensor, index: int, num_layers: int) -> torch.Tensor:
    """MEMIT's residual spreading: layer ``index`` (0-based, ascending) of ``num_layers`` takes
    ``resid / (num_layers - index)`` — the remaining error shared equally by the layers left."""
    if not 0 <= index < num_layers:
        raise ValueError(f"index {index} is outside 0..{num_layers - 1}")
    return resid / (num_layers - index)


#: MEMIT's λ for GPT-J and Llama-3-8B (15,000) at GPT-J's key dimension (16,384)
REFERENCE_MOM2_WEIGHT, REFERENCE_D_IN = 15000.0, 16384


def scaled_mom2_weight(d_in: int, value: float | None = None) -> float:
    """λ for keys of dimension ``d_in``: ``value`` when given, else ``15,000 · d_in / 16,384``.

    One edit with key ``k`` writes the fraction ``a / (1 + a)`` of its residual, ``a = kᵀC⁻¹k / λ``,
    and for a key drawn like the ones ``C`` was measured on ``kᵀC⁻¹k ≈ d_in``. Keeping ``a`` at
    GPT-J's value therefore means λ ∝ d_in: SmolLM2-135M (d_in 1,536) gets λ ≈ 1,406, Llama-3-8B
    (14,336) ≈ 13,125 (measured effect: ``docs/design.md``).
    """
    return float(value) if value is not None else REFERENCE_MOM2_WEIGHT * d_in / REFERENCE_D_IN


def memit_factors(
    keys: torch.Tensor,
    resid: torch.Tensor,
    cov: torch.Tensor,
    mom2_weight: float,
    *,
    cov_solve: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT's layer update ``ΔW = R Kᵀ (λC + K Kᵀ)⁻¹`` as factors ``(B [d_out, n], A [n, d_in])``.

    Args:
        keys: ``[n, d_in]`` keys of the edits at this layer.
        resid: ``[n, d_out]`` residuals this layer must write (already spread over the layers).
        cov: ``[d_in, d_in]`` second moment ``C`` of the preserved keys.
        mom2_weight: ``λ``, the weight of preservation against memorisation.
        cov_solve: ``x -> C⁻¹x`` from an existing factorisation of ``C`` (:func:`cached_inverse`): then
            ``A = (λI + KᵀC⁻¹K)⁻¹ (C⁻¹K)ᵀ`` (Woodbury; the same update, no ``d × d`` factorisation).

    Raises :class:`SingularSystemError` when ``λC + K Kᵀ`` is singular.
    """
    _check_shapes(keys, resid, cov)
    K = keys.double().t()  # [d_in, n]
    if cov_solve is not None and mom2_weight > 0:
        CinvK = cov_solve(K).double()
        small = K.t() @ CinvK
        small = (small + small.t()) / 2 + mom2_weight * torch.eye(K.shape[1], dtype=K.dtype, device=K.device)
        adj_t = _spd_solve(
            small, CinvK.t(), "MEMIT's system λI + KᵀC⁻¹K", "raise mom2_update_weight, or collect statistics"
        )
        return resid.double().t().to(dtype), adj_t.to(dtype)
    system = mom2_weight * cov.double() + K @ K.t()
    adj = _spd_solve(
        system, K, "MEMIT's system λC + KKᵀ", "raise mom2_update_weight, or collect statistics from more tokens"
    )
    return resid.double().t().to(dtype), adj.t().to(dtype)


def nullspace_basis(cov: torch.Tensor, threshold: float = 2e-2, *, relative: bool = False) -> torch.Tensor:
    """An orthonormal basis ``U`` (``[d, r]``, float64) of the span of ``C``'s singular vectors whose
    singular value is below ``threshold``: AlphaEdit's projector is ``P = U Uᵀ``.

    Like the reference (``AlphaEdit/experiments/evaluate.py::get_project``) the threshold is
    absolute: ``σ < threshold``. With ``relative=True`` it is ``σ < threshold · σ_max`` instead,
    for models whose activations live on another scale. ``C`` is symmetric PSD, so its singular
    values/vectors are the absolute eigenvalues / eigenvectors of ``eigh``.
    """
    C = cov.double()
    C = (C + C.t()) / 2
    evals, evecs = torch.linalg.eigh(C)
    sigma = evals.abs()
    cut = threshold * float(sigma.max()) if relative else threshold
    return evecs[:, sigma < cut]


def nullspace_projector(cov: torch.Tensor, threshold: float = 2e-2, *, relative: bool = False) -> torch.Tensor:
    """AlphaEdit's projector ``P = U Uᵀ`` (float64, ``[d, d]``) with ``U`` from :func:`nullspace_basis`."""
    U = nullspace_basis(cov, threshold, relative=relative)
    return U @ U.t()


def alphaedit_factors(
    keys: torch.Tensor,
    resid: torch.Tensor,
    projector: torch.Tensor | None,
    prior: torch.Tensor | None = None,
    l2: float = 10.0,
    *,
    basis: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's null-space update ``ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹`` as factors.

    Args:
        keys, resid: this batch's ``[n, d_in]`` keys and ``[n, d_out]`` residuals.
        projector: ``P`` from :func:`nullspace_projector`.
        prior: ``K_p K_pᵀ`` (``[d_in, d_in]``), the summed outer products of earlier sequential edits'
            keys at this layer, or None.
        l2: ``α`` (the reference's ``L2``), a ridge that keeps the system invertible; must be > 0.
        basis: instead of ``projector`` (pass None), its orthonormal basis ``U`` (``[d_in, r]``,
            :func:`nullspace_basis`): the same update from an ``r × r`` (or ``n × n``) system.

    The update vanishes on every key ``k₀`` with ``P k₀ = 0``: preserved knowledge is untouched.
    """
    if (projector is None) == (basis is None):
        raise ValueError("alphaedit_factors needs exactly one of projector (P) and basis (U, P = UUᵀ)")
    if basis is not None and (basis.dim() != 2 or basis.shape[0] != keys.shape[-1]):
        raise ValueError(f"basis must be [{keys.shape[-1]}, r], got {tuple(basis.shape)}")
    _check_shapes(keys, resid, projector)
    if not l2 > 0:
        raise SingularSystemError(
            f"AlphaEdit's system P(KKᵀ + K_pK_pᵀ) + αI is singular for α = {l2}; "
            "use a positive L2 (the reference uses 10)."
        )
    if basis is not None:
        return resid.double().t().to(dtype), _alphaedit_in_basis(keys, basis, prior, l2).t().to(dtype)
    P = projector.double()
    K = keys.double().t()
    S = K @ K.t()
    if prior is not None:
        if tuple(prior.shape) != tuple(S.shape):
            raise ValueError(f"prior must be [{S.shape[0]}, {S.shape[0]}], got {tuple(prior.shape)}")
        S = S + prior.double()
    system = P @ S + l2 * torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    rhs = P @ K
    adj, info = torch.linalg.solve_ex(system, rhs)
    if int(info) != 0 or not torch.isfinite(adj).all():
        raise SingularSystemError("AlphaEdit's system P(KKᵀ + K_pK_pᵀ) + αI is singular; raise L2.")
    return resid.double().t().to(dtype), adj.t().to(dtype)


def _alphaedit_in_basis(keys: torch.Tensor, basis: torch.Tensor, prior: torch.Tensor | None, l2: float) -> torch.Tensor:
    """``(P S + αI)⁻¹ P K`` with ``P = UUᵀ`` (see module docstring), ``[d_in, n]`` float64."""
    U = basis.double()
    K = keys.double().t()
    B = U.t() @ K  # [r, n]
    hint = "raise L2."
    if prior is None:  # (BBᵀ + αI)⁻¹B = B(BᵀB + αI)⁻¹
        small = B.t() @ B
        small = (small + small.t()) / 2 + l2 * torch.eye(B.shape[1], dtype=B.dtype, device=B.device)
        return U @ (B @ _spd_solve(small, torch.eye(B.shape[1], dtype=B.dtype, device=B.device), _ALPHA, hint))
    if tuple(prior.shape) != (K.shape[0], K.shape[0]):
        raise ValueError(f"prior must be [{K.shape[0]}, {K.shape[0]}], got {tuple(prior.shape)}")
    G = U.t() @ prior.double().to(U.device) @ U + B @ B.t()
    G = (G + G.t()) / 2 + l2 * torch.eye(U.shape[1], dtype=U.dtype, device=U.device)
    return U @ _spd_solve(G, B, _ALPHA, hint)


_ALPHA = "AlphaEdit's system P(KKᵀ + K_pK_pᵀ) + αI"


def expert_nullspace_factors(
    keys: torch.Tensor,
    resid: torch.Tensor,
    bases: dict[int, torch.Tensor],
    l2: float,
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ΔW = R (K̃ᵀK̃ + λI)⁻¹ K̃ᵀ`` over routed keys with one null-space projector per expert, as factors.

    ``keys`` ``[n, E·I]`` are routed keys (expert ``e``'s block ``g_e k_e``, :mod:`hf_knowedit.experts`);
    ``K̃`` projects expert ``e``'s block by ``P_e = U_e U_eᵀ`` (``bases[e]``, ``[I, r_e]``,
    :func:`nullspace_basis` of the expert's statistics; an expert not in ``bases`` has ``P_e = 0``). With
    ``K̃`` this is the minimiser of ``‖R − ΔW K̃‖² + λ‖ΔW‖²`` and equals :func:`alphaedit_factors` with
    ``basis = diag(U_0 … U_{E-1})``, ``l2 = λ`` and no earlier keys: its ``n × n`` system
    ``Σ_e Y_eᵀ Y_e + λI`` (``Y_e = U_eᵀ K_e``) is solved once, and expert ``e``'s block of ``A`` is
    ``(Σ Y_eᵀY_e + λI)⁻¹ Y_eᵀ U_eᵀ``: it lies in the span of ``U_e``, so ``ΔW_e = ΔW_e P_e``."""
    _check_shapes(keys, resid)
    if not l2 > 0:
        raise SingularSystemError(f"The per-expert ridge K̃ᵀK̃ + λI needs λ > 0, got {l2}; use a positive lambda_reg.")
    n = keys.shape[0]
    inner = next(iter(bases.values())).shape[0] if bases else 1
    if keys.shape[1] % inner or any(U.dim() != 2 or U.shape[0] != inner for U in bases.values()):
        raise ValueError(f"bases must be [I, r_e] with I dividing the key dimension {keys.shape[1]}")
    K = keys.double().reshape(n, -1, inner)
    Y = {e: K[:, e] @ U.double().to(K.device) for e, U in bases.items()}  # [n, r_e]
    eye = torch.eye(n, dtype=torch.float64, device=K.device)
    gram = sum((y @ y.t() for y in Y.values()), torch.zeros_like(eye))
    X = _spd_solve((gram + gram.t()) / 2 + l2 * eye, eye, "MoEEdit's system K̃ᵀK̃ + λI", "raise lambda_reg.")
    A = torch.zeros_like(K)
    for e, y in Y.items():
        A[:, e] = X @ y @ bases[e].double().to(K.device).t()
    return resid.double().t().to(dtype), A.reshape(n, -1).to(dtype)


def emmet_factors(
    keys: torch.Tensor,
    resid: torch.Tensor,
    cov: torch.Tensor,
    mom2_weight: float = 1.0,
    *,
    emmet_lambda: float = 0.1,
    update_norm_lambda: float = 0.0,
    cov_solve: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EMMET's equality-constrained update ``ΔW = R D⁻¹ Kᵀ C⁻¹`` as factors ``(R D⁻¹, (C⁻¹K)ᵀ)``.

    ``C = λ₀ C₀ + μ I`` (``mom2_weight``, ``update_norm_lambda``) and ``D = Kᵀ C⁻¹ K``, plus
    ``emmet_lambda · I`` when the batch has more than one edit (the reference's guard against
    ill-conditioned ``D``). With ``emmet_lambda = 0``, ``ΔW K = R`` exactly. ``cov_solve`` (``x -> C₀⁻¹x``,
    :func:`cached_inverse`) reuses ``C₀``'s factorisation when ``update_norm_lambda = 0``.

    Raises :class:`SingularSystemError` if ``C`` or ``D`` is singular (e.g. two edits sharing a
    key with ``emmet_lambda = 0``, or more edits than key dimensions).
    """
    _check_shapes(keys, resid, cov)
    K = keys.double().t()
    if cov_solve is not None and not update_norm_lambda and mom2_weight > 0:
        CinvK = cov_solve(K).double() / mom2_weight
    else:
        C = mom2_weight * cov.double()
        if update_norm_lambda:
            C = C + update_norm_lambda * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
        CinvK = _spd_solve(
            C,
            K,
            "EMMET's preservation matrix λ₀C₀ + μI",
            "raise update_norm_lambda or collect statistics from more tokens",
        )
    D = K.t() @ CinvK
    D = (D + D.t()) / 2
    if D.shape[0] > 1 and emmet_lambda:
        D = D + emmet_lambda * torch.eye(D.shape[0], dtype=D.dtype, device=D.device)
    DinvR = _spd_solve(
        D,
        resid.double(),
        "EMMET's constraint matrix D = KᵀC⁻¹K",
        "two edits have (nearly) the same key or the batch exceeds the key dimension; "
        "raise emmet_lambda (the reference uses 0.1)",
    )
    return DinvR.t().to(dtype), CinvK.t().to(dtype)
