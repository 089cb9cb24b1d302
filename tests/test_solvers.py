"""The MEMIT-family linear algebra on synthetic keys, residuals and statistics."""

import math

import pytest
import torch

from hf_knowedit.errors import SingularSystemError
from hf_knowedit.methods import solvers
from hf_knowedit.methods.solvers import (
    alphaedit_factors,
    emmet_factors,
    memit_factors,
    nullspace_projector,
    spread_residual,
)
from tests.tiny_models import make_tiny_model

D_IN, D_OUT = 24, 16


def _spd(d: int, seed: int = 0, low_rank: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * d, d, generator=g, dtype=torch.float64)
    if low_rank:  # keys that live in a low-dimensional subspace: C has a real null space
        X = X[:, :low_rank] @ torch.randn(low_rank, d, generator=g, dtype=torch.float64)
    return X.t() @ X / X.shape[0]


def _batch(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g, dtype=torch.float64), torch.randn(
        n, D_OUT, generator=g, dtype=torch.float64
    )


def test_memit_factor_shapes_and_rank():
    K, R = _batch(5)
    B, A = memit_factors(K, R, _spd(D_IN), 100.0)
    assert B.shape == (D_OUT, 5) and A.shape == (5, D_IN) and B.dtype == torch.float32
    assert torch.linalg.matrix_rank(B.double() @ A.double()) == 5


def test_memit_small_lambda_writes_values_exactly():
    K, R = _batch(6)
    B, A = memit_factors(K, R, _spd(D_IN), 1e-7, dtype=torch.float64)
    torch.testing.assert_close(K @ (B @ A).t(), R, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,lam", [(4, 7.0), (4, 1e-3), (D_IN + 6, 0.5)])
def test_memit_solves_its_objective_like_a_stacked_least_squares_problem(n, lam):
    """ΔW minimises ||ΔW K - R||² + λ tr(ΔW C ΔWᵀ). With C = L Lᵀ the penalty is ||√λ ΔW L||², so the
    minimiser is the least-squares solution of the stacked system [Kᵀ; √λ Lᵀ] ΔWᵀ = [Rᵀ; 0]."""
    K, R = _batch(n, seed=n)  # rows are keys / residuals
    C = _spd(D_IN, 3)
    B, A = memit_factors(K, R, C, lam, dtype=torch.float64)
    L = torch.linalg.cholesky(C)
    system = torch.cat([K, lam**0.5 * L.t()])  # [n + d_in, d_in]
    target = torch.cat([R, torch.zeros(D_IN, D_OUT, dtype=R.dtype)])  # [n + d_in, d_out]
    reference = torch.linalg.lstsq(system, target, driver="gelsd").solution.t()  # [d_out, d_in]
    torch.testing.assert_close(B @ A, reference, rtol=1e-7, atol=1e-9)
    # ... and the objective is stationary there: its gradient (K ΔWᵀ - R)ᵀ K + λ ΔW C vanishes
    dW = B @ A
    grad = (K @ dW.t() - R).t() @ K + lam * dW @ C
    assert float(grad.abs().max()) < 1e-9 * max(1.0, float((R.t() @ K).abs().max()))


def test_memit_large_lambda_preserves_more():
    """λ trades memorisation for preservation: larger λ, smaller update on typical keys."""
    K, R = _batch(4)
    C = _spd(D_IN)
    small = torch.linalg.norm(torch.matmul(*memit_factors(K, R, C, 1.0)))
    large = torch.linalg.norm(torch.matmul(*memit_factors(K, R, C, 1e4)))
    assert large < small


def test_memit_singular_system_raises():
    K, R = _batch(3)
    with pytest.raises(SingularSystemError, match="mom2_update_weight"):
        memit_factors(K, R, torch.zeros(D_IN, D_IN), 1.0)  # KKᵀ has rank 3 < d_in


def test_memit_bad_shapes():
    K, R = _batch(3)
    with pytest.raises(ValueError):
        memit_factors(K, R[:2], _spd(D_IN), 1.0)
    with pytest.raises(ValueError):
        memit_factors(K, R, _spd(D_IN + 1), 1.0)


def test_spread_residual_gives_every_layer_of_the_band_an_equal_share():
    """MEMIT's spreading, written as a recursion (each layer takes its part of what is still missing),
    has a closed form: when every layer writes its part, each of the L layers writes R / L."""
    R = _batch(3, seed=4)[1]
    L = 4
    written = torch.zeros_like(R)
    for i in range(L):
        part = spread_residual(R - written, i, L)
        torch.testing.assert_close(part, R / L, rtol=1e-12, atol=1e-12)
        written = written + part
    torch.testing.assert_close(written, R, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        spread_residual(R, L, L)
    with pytest.raises(ValueError):
        spread_residual(R, -1, L)


def test_spread_residual_later_layers_take_up_what_earlier_ones_did_not_write():
    """If every layer writes only the fraction a of its part, what is missing after layer i is
    R · Π_{j<=i} (1 - a / (L - j)); the last layer's part is everything still missing (a = 1 then
    closes the gap whatever came before)."""
    R = _batch(2, seed=6)[1]
    L, a = 5, 0.6
    missing = R.clone()
    for i in range(L):
        missing = missing - a * spread_residual(missing, i, L)
        expected = math.prod(1 - a / (L - j) for j in range(i + 1))
        torch.testing.assert_close(missing, expected * R, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(spread_residual(missing, L - 1, L), missing)


def test_nullspace_projector_spans_small_singular_directions():
    C = _spd(D_IN, low_rank=10)  # rank 10: a 14-dimensional null space
    P = nullspace_projector(C, 2e-2)
    assert int(round(float(torch.trace(P)))) == D_IN - 10
    torch.testing.assert_close(P @ P, P, atol=1e-10, rtol=0)  # a projector
    torch.testing.assert_close(P @ C, torch.zeros_like(C), atol=1e-8, rtol=0)
    # the threshold is absolute (as in the reference); relative=True scales it by σ_max
    assert float(torch.trace(nullspace_projector(C * 1e-6, 2e-2))) == pytest.approx(D_IN)
    assert int(round(float(torch.trace(nullspace_projector(C * 1e-6, 2e-2, relative=True))))) == D_IN - 10


def test_alphaedit_update_annihilates_preserved_keys():
    C = _spd(D_IN, low_rank=10)
    P = nullspace_projector(C)
    g = torch.Generator().manual_seed(5)
    evals, evecs = torch.linalg.eigh(C)
    K0 = torch.randn(50, 10, generator=g, dtype=torch.float64) @ evecs[:, -10:].t()  # keys C has seen
    assert float((K0 @ P).norm()) < 1e-8 * float(K0.norm())
    K, R = _batch(4)
    B, A = alphaedit_factors(K, R, P, l2=1e-6, dtype=torch.float64)
    dW = B @ A
    assert float((K0 @ dW.t()).norm()) < 1e-8 * float(K0.norm())
    # and the edits are written, through the part of the keys that lies in the null space
    torch.testing.assert_close((K @ P) @ dW.t(), R, rtol=1e-4, atol=1e-4)


def test_alphaedit_matches_paper_formula_with_prior():
    P = nullspace_projector(_spd(D_IN, low_rank=6))
    K, R = _batch(3)
    Kp, _ = _batch(5, seed=9)
    prior = Kp.t() @ Kp
    alpha = 10.0
    B, A = alphaedit_factors(K, R, P, prior, l2=alpha, dtype=torch.float64)
    Kc, Rc = K.t(), R.t()
    expected = (
        Rc @ Kc.t() @ P @ torch.linalg.inv(Kp.t() @ Kp @ P + Kc @ Kc.t() @ P + alpha * torch.eye(D_IN, dtype=P.dtype))
    )
    torch.testing.assert_close(B @ A, expected, rtol=1e-9, atol=1e-9)


def test_alphaedit_prior_protects_earlier_edits():
    """With the earlier keys in the prior, a new batch barely moves their outputs."""
    P = nullspace_projector(_spd(D_IN, low_rank=4))
    Kp, _ = _batch(5, seed=9)
    K, R = _batch(3)
    with_prior = torch.matmul(*alphaedit_factors(K, R, P, Kp.t() @ Kp, l2=1e-3))
    without = torch.matmul(*alphaedit_factors(K, R, P, None, l2=1e-3))
    assert (Kp.float() @ with_prior.t()).norm() < 0.1 * (Kp.float() @ without.t()).norm()


def test_alphaedit_nonpositive_l2_is_singular():
    K, R = _batch(2)
    with pytest.raises(SingularSystemError, match="L2"):
        alphaedit_factors(K, R, torch.eye(D_IN), l2=0.0)


def test_emmet_satisfies_constraints_exactly():
    K, R = _batch(7)
    B, A = emmet_factors(K, R, _spd(D_IN), 100.0, emmet_lambda=0.0, dtype=torch.float64)
    torch.testing.assert_close(K @ (B @ A).t(), R, rtol=1e-9, atol=1e-9)
    C = 100.0 * _spd(D_IN)
    expected = R.t() @ torch.linalg.inv(K @ torch.linalg.inv(C) @ K.t()) @ K @ torch.linalg.inv(C)
    torch.testing.assert_close(B @ A, expected, rtol=1e-8, atol=1e-8)


def test_emmet_single_edit_is_rome():
    """Batch of one: ΔW = r (C⁻¹k)ᵀ / (kᵀC⁻¹k), ROME's rank-one update."""
    K, R = _batch(1)
    C = _spd(D_IN)
    B, A = emmet_factors(K, R, C, 1.0, emmet_lambda=0.1, dtype=torch.float64)  # λ_E only applies for n > 1
    u = torch.linalg.solve(C, K[0])
    torch.testing.assert_close(B @ A, torch.outer(R[0], u) / (K[0] @ u), rtol=1e-9, atol=1e-9)


def test_emmet_duplicate_keys_singular_unless_regularised():
    K, R = _batch(3)
    K = torch.cat([K, K[:1]])  # two edits with the same key
    R = torch.cat([R, R[1:2]])
    with pytest.raises(SingularSystemError, match="emmet_lambda"):
        emmet_factors(K, R, _spd(D_IN), 1.0, emmet_lambda=0.0)
    B, A = emmet_factors(K, R, _spd(D_IN), 1.0, emmet_lambda=0.1)
    assert torch.isfinite(B @ A).all()


def test_emmet_more_edits_than_dims_singular():
    K, R = _batch(D_IN + 4)
    with pytest.raises(SingularSystemError):
        emmet_factors(K, R, _spd(D_IN), 1.0, emmet_lambda=0.0)


def test_scaled_mom2_weight_keeps_gptj_lambda_per_key_dimension():
    from hf_knowedit.methods.solvers import scaled_mom2_weight

    assert scaled_mom2_weight(16384) == 15000.0  # GPT-J: the reference value
    assert scaled_mom2_weight(1536) == pytest.approx(1406.25)  # SmolLM2-135M
    assert scaled_mom2_weight(1536, 2e4) == 2e4  # an explicit λ is used as is
    from hf_knowedit.methods.memit import MEMITConfig

    assert MEMITConfig().mom2_update_weight is None


# -----------------------------------------------------------------------------------------------
# the same updates without new d x d factorisations


def _moment(C: torch.Tensor):
    from hf_knowedit.moments import SecondMoment, StatsKey

    return SecondMoment(C, 1000, StatsKey("tiny", 1, "mlp", "corpus", 1000, "float64"))


@pytest.mark.parametrize("n,lam", [(1, 3.0), (5, 100.0), (5, 1e-3), (D_IN + 6, 0.5)])
def test_memit_woodbury_on_the_cached_factor_is_todays_solve(n, lam):
    K, R = _batch(n, seed=n)
    C = _spd(D_IN, 3)
    inverse = solvers.cached_inverse(_moment(C))
    assert inverse is not None
    B, A = memit_factors(K, R, C, lam, cov_solve=inverse, dtype=torch.float64)
    B0, A0 = memit_factors(K, R, C, lam, dtype=torch.float64)
    naive = R.t() @ K @ torch.linalg.inv(lam * C + K.t() @ K)  # ΔW = R Kᵀ (λC + KKᵀ)⁻¹, rows are keys
    torch.testing.assert_close(B, B0, rtol=0, atol=0)
    torch.testing.assert_close(A, A0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(B @ A, naive, rtol=1e-9, atol=1e-11)


def test_cached_inverse_only_where_it_gives_todays_numbers():
    from hf_knowedit.moments import identity_moment

    C = _spd(D_IN, 3)
    moment = _moment(C)
    x = torch.randn(D_IN, 3, dtype=torch.float64)
    torch.testing.assert_close(solvers.cached_inverse(moment)(x), torch.linalg.solve(C, x), rtol=1e-10, atol=1e-12)
    # rank-deficient C: the cached factor carries a jitter (with a warning), so the solvers form their system
    singular = _moment(_spd(D_IN, low_rank=6))
    assert solvers.cached_inverse(singular) is None
    model, _ = make_tiny_model("llama")
    eye = identity_moment(model, 1)
    assert torch.equal(solvers.cached_inverse(eye)(torch.ones(96, 2, dtype=torch.float64)), torch.ones(96, 2))


@pytest.mark.parametrize("n,emmet_lambda,lam0", [(1, 0.1, 1.0), (4, 0.0, 1.0), (4, 0.1, 1000.0)])
def test_emmet_on_the_cached_factor_is_todays_solve(n, emmet_lambda, lam0):
    K, R = _batch(n, seed=n)
    C = _spd(D_IN, 3)
    kw = dict(emmet_lambda=emmet_lambda, dtype=torch.float64)
    B, A = emmet_factors(K, R, C, lam0, cov_solve=solvers.cached_inverse(_moment(C)), **kw)
    B0, A0 = emmet_factors(K, R, C, lam0, **kw)
    Ci = torch.linalg.inv(lam0 * C)  # ΔW = R D⁻¹ Kᵀ C⁻¹, D = KᵀC⁻¹K (+ λ_E I when n > 1)
    D = K @ Ci @ K.t() + (emmet_lambda * torch.eye(n, dtype=K.dtype) if n > 1 else 0)
    naive = R.t() @ torch.linalg.inv(D) @ K @ Ci
    torch.testing.assert_close(B, B0, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(A, A0, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(B @ A, naive, rtol=1e-8, atol=1e-10)
    # a new preservation matrix (update_norm_lambda) needs its own factorisation: cov_solve is not used
    kw["update_norm_lambda"] = 0.5
    torch.testing.assert_close(
        emmet_factors(K, R, C, lam0, cov_solve=lambda x: x * float("nan"), **kw)[1],
        emmet_factors(K, R, C, lam0, **kw)[1],
    )


@pytest.mark.parametrize("n,with_prior", [(3, False), (3, True), (D_IN + 4, False), (D_IN + 4, True)])
def test_alphaedit_in_the_null_space_basis_is_todays_solve(n, with_prior):
    K, R = _batch(n, seed=n)
    C = _spd(D_IN, low_rank=10)
    U = solvers.nullspace_basis(C)
    P = nullspace_projector(C)
    assert U.shape == (D_IN, D_IN - 10)
    torch.testing.assert_close(U.t() @ U, torch.eye(D_IN - 10, dtype=U.dtype))
    torch.testing.assert_close(U @ U.t(), P, rtol=0, atol=0)
    prior = None
    if with_prior:
        Kp = _batch(7, seed=99)[0]
        prior = Kp.t() @ Kp
    B, A = alphaedit_factors(K, R, None, prior, l2=10.0, basis=U, dtype=torch.float64)
    B0, A0 = alphaedit_factors(K, R, P, prior, l2=10.0, dtype=torch.float64)
    S = K.t() @ K + (prior if prior is not None else 0)
    naive = R.t() @ K @ P @ torch.linalg.inv(S @ P + 10.0 * torch.eye(D_IN, dtype=K.dtype))  # the paper's form
    torch.testing.assert_close(B, B0, rtol=0, atol=0)
    torch.testing.assert_close(A, A0, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(B @ A, naive, rtol=1e-8, atol=1e-11)
    with pytest.raises(ValueError, match="exactly one"):
        alphaedit_factors(K, R, P, prior, basis=U)
    with pytest.raises(SingularSystemError):
        alphaedit_factors(K, R, None, prior, l2=0.0, basis=U)
