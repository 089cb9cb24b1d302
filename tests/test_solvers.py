"""The MEMIT-family linear algebra on synthetic keys, residuals and statistics."""

import pytest
import torch

from hf_knowedit.errors import SingularSystemError
from hf_knowedit.methods.solvers import (alphaedit_factors, emmet_factors, memit_factors, nullspace_projector,
                                 spread_residual)

D_IN, D_OUT = 24, 16


def _spd(d: int, seed: int = 0, low_rank: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * d, d, generator=g, dtype=torch.float64)
    if low_rank:  # keys that live in a low-dimensional subspace: C has a real null space
        X = X[:, :low_rank] @ torch.randn(low_rank, d, generator=g, dtype=torch.float64)
    return X.t() @ X / X.shape[0]


def _batch(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g, dtype=torch.float64), torch.randn(n, D_OUT, generator=g,
                                                                                 dtype=torch.float64)


def test_memit_factor_shapes_and_rank():
    K, R = _batch(5)
    B, A = memit_factors(K, R, _spd(D_IN), 100.0)
    assert B.shape == (D_OUT, 5) and A.shape == (5, D_IN) and B.dtype == torch.float32
    assert torch.linalg.matrix_rank(B.double() @ A.double()) == 5


def test_memit_small_lambda_writes_values_exactly():
    K, R = _batch(6)
    B, A = memit_factors(K, R, _spd(D_IN), 1e-7, dtype=torch.float64)
    torch.testing.assert_close(K @ (B @ A).t(), R, rtol=1e-5, atol=1e-5)


def test_memit_matches_closed_form():
    K, R = _batch(4)
    C, lam = _spd(D_IN, 3), 7.0
    B, A = memit_factors(K, R, C, lam, dtype=torch.float64)
    expected = R.t() @ K @ torch.linalg.inv(lam * C + K.t() @ K)
    torch.testing.assert_close(B @ A, expected, rtol=1e-9, atol=1e-9)


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


def test_spread_residual_sums_to_whole_over_layers():
    r = torch.ones(3, 4)
    # layers take R/3, then (what is left) R'/2, then all of the rest: 1/3, 1/3, 1/3 when each step writes its share
    left, parts = r.clone(), []
    for i in range(3):
        part = spread_residual(left, i, 3)
        parts.append(part)
        left = left - part
    torch.testing.assert_close(sum(parts), r)
    torch.testing.assert_close(left, torch.zeros_like(r))
    with pytest.raises(ValueError):
        spread_residual(r, 3, 3)


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
    expected = Rc @ Kc.t() @ P @ torch.linalg.inv(Kp.t() @ Kp @ P + Kc @ Kc.t() @ P + alpha * torch.eye(D_IN,
                                                                                                    dtype=P.dtype))
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
