"""Conjugate gradient: agreement with a direct solve, preconditioning, and indefinite operators."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, make_case
from torch import Tensor, nn

from npg import make_fisher
from npg.cg import conjugate_gradient
from npg.families import GaussianRegression

pytestmark = pytest.mark.usefixtures("float64")


def _spd(dim: int, cond: float, seed: int = 0) -> Tensor:
    """A random SPD matrix with eigenvalues log-spaced in ``[1/cond, 1]``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    return q @ torch.diag(torch.logspace(-math.log10(cond), 0, dim)) @ q.T


@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_cg_matches_linalg_solve(damping: float) -> None:
    a = _spd(30, 1e3)
    b = torch.randn(30, generator=torch.Generator().manual_seed(1))
    res = conjugate_gradient(lambda v: a @ v, b, damping=damping, max_iter=200, tol=1e-13)
    expected = torch.linalg.solve(a + damping * torch.eye(30), b)
    assert res.converged and res.status == "converged"
    assert_close(res.x, expected, rtol=1e-8, atol=1e-10)
    true_res = torch.linalg.norm(b - (a + damping * torch.eye(30)) @ res.x) / torch.linalg.norm(b)
    assert float(true_res) <= 1e-12
    assert math.isclose(res.residual, float(true_res), rel_tol=0.5, abs_tol=1e-14)
    assert math.isclose(res.xAx, float(res.x @ (a + damping * torch.eye(30)) @ res.x), rel_tol=1e-9)


def test_cg_exact_fisher_matches_dense_solve_and_warm_start() -> None:
    model, x, family = make_case("mlp_tanh", "categorical", n=8)
    op = make_fisher("exact", model, x, family)
    g = torch.randn(op.dim, generator=torch.Generator().manual_seed(2))
    lam = 1e-3
    expected = torch.linalg.solve(op.to_dense() + lam * torch.eye(op.dim), g)
    res = op.cg(g, lam, max_iter=500, tol=1e-12)
    assert res.converged
    assert_close(res.x, expected, rtol=1e-6, atol=1e-8)
    assert_close(op.solve(g, lam, max_iter=500, tol=1e-12), expected, rtol=1e-6, atol=1e-8)
    # a warm start at the answer converges without a product
    warm = conjugate_gradient(op.mv, g, damping=lam, x0=expected, tol=1e-8)
    assert warm.iterations == 0 and warm.converged


def test_max_iter_status_and_reported_quantities() -> None:
    a = _spd(40, 1e4, seed=3)
    b = torch.ones(40)
    res = conjugate_gradient(lambda v: a @ v, b, max_iter=5)
    assert res.status == "max_iter" and not res.converged and res.iterations == 5
    true_res = torch.linalg.norm(b - a @ res.x) / torch.linalg.norm(b)
    assert math.isclose(res.residual, float(true_res), rel_tol=1e-8)
    assert math.isclose(res.xAx, float(res.x @ a @ res.x), rel_tol=1e-10)


def _ill_conditioned_fisher():
    """A full-rank, badly scaled Fisher (condition number ~1e8): an MLP regression whose 10 input
    features span three orders of magnitude, 256 data for 115 parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(256, 10) * torch.logspace(-2, 1, 10)
    return model, x, GaussianRegression(1.0)


def test_preconditioned_cg_needs_fewer_iterations() -> None:
    """Diagonal and K-FAC preconditioners (and a plain callable) cut the iterations to a 1e-8
    residual on an ill-conditioned Fisher by well over a third, and reach the same answer. CG runs
    on the dense matrix (the same operator, cheaper); one short run checks the operator path."""
    model, x, family = _ill_conditioned_fisher()
    op = make_fisher("exact", model, x, family)
    dense = op.to_dense()
    lam = 1e-4
    g = torch.randn(op.dim, generator=torch.Generator().manual_seed(4))
    expected = torch.linalg.solve(dense + lam * torch.eye(op.dim), g)

    def matvec(v: Tensor) -> Tensor:
        return dense @ v

    kw = dict(damping=lam, max_iter=3000, tol=1e-8)
    plain = conjugate_gradient(matvec, g, **kw)
    diag = make_fisher("diagonal", model, x, family)
    kfac = make_fisher("kfac", model, x, family)
    d = torch.diagonal(dense) + lam
    preconditioners = {
        "diagonal": lambda r: diag.inverse_mv(r, lam),
        "kfac": lambda r: kfac.inverse_mv(r, lam),
        "callable": lambda r: r / d,
    }
    assert plain.converged
    assert_close(plain.x, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    for name, pre in preconditioners.items():
        fast = conjugate_gradient(matvec, g, preconditioner=pre, **kw)
        assert fast.converged, name
        assert fast.iterations < 0.6 * plain.iterations, (name, fast.iterations, plain.iterations)
        assert_close(fast.x, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    # FisherOperator.cg applies an operator's inverse_mv with the same damping
    via_op = op.cg(g, lam, max_iter=15, preconditioner=kfac)
    direct = conjugate_gradient(
        matvec, g, preconditioner=preconditioners["kfac"], **{**kw, "max_iter": 15}
    )
    assert via_op.iterations == direct.iterations == 15
    assert_close(via_op.x, direct.x, rtol=1e-6, atol=1e-8 * float(direct.x.abs().max()))


def test_indefinite_operator_stops_without_nan() -> None:
    """On an indefinite matrix CG stops at the first direction of non-positive curvature and
    returns its last (finite) iterate."""
    a = torch.diag(torch.tensor([2.0, 1.0, -1.0, -3.0]))
    for b in (torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])):
        res = conjugate_gradient(lambda v: a @ v, b, max_iter=50)
        assert res.status == "nonpositive_curvature" and not res.converged
        assert bool(torch.isfinite(res.x).all()) and math.isfinite(res.xAx)
    # curvature turns negative only after some progress: the progress is kept
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(5)))
    a = q @ torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, -0.5])) @ q.T
    res = conjugate_gradient(lambda v: a @ v, torch.ones(6), max_iter=50)
    assert res.status == "nonpositive_curvature" and res.iterations >= 1
    assert bool(torch.isfinite(res.x).all())
    # a zero operator (pᵀAp = 0) does not divide by zero
    res = conjugate_gradient(torch.zeros_like, torch.ones(3))
    assert res.status == "nonpositive_curvature" and bool((res.x == 0).all())
    # an operator that returns NaN is caught as well
    res = conjugate_gradient(lambda v: v * float("nan"), torch.ones(3))
    assert res.status == "nonpositive_curvature" and bool(torch.isfinite(res.x).all())


def test_edge_cases() -> None:
    res = conjugate_gradient(lambda v: v, torch.zeros(4))
    assert res.status == "zero_rhs" and res.converged and bool((res.x == 0).all())
    with pytest.raises(ValueError):
        conjugate_gradient(lambda v: v, torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError):
        conjugate_gradient(lambda v: v, torch.ones(2), max_iter=0)
    with pytest.raises(ValueError):
        conjugate_gradient(lambda v: v, torch.ones(2), damping=-1.0)
    # identity: one product solves it
    res = conjugate_gradient(lambda v: 2 * v, torch.ones(5), damping=1.0)
    assert res.iterations == 1 and res.converged
    assert_close(res.x, torch.full((5,), 1 / 3))


def test_singular_inconsistent_system_does_not_blow_up() -> None:
    """Undamped, singular PSD ``A`` with ``b`` outside its range (CG has no solution to find):
    once the range is exhausted the curvature is rounding noise; CG stops there instead of
    dividing by it (which threw the iterate to ~1e16 and made the reported residual wrong), and
    the residual it reports is the true one."""
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(6)))
    a = q[:, :3] @ torch.diag(torch.tensor([3.0, 1.0, 0.2])) @ q[:, :3].T  # rank 3
    b = torch.randn(8, generator=torch.Generator().manual_seed(7))
    res = conjugate_gradient(lambda v: a @ v, b, max_iter=50)
    assert res.status == "nonpositive_curvature"
    assert float(res.x.abs().max()) < 1e3
    assert res.iterations <= 4  # three directions in the range, then the rounding-level one
    true_res = float(torch.linalg.norm(b - a @ res.x) / torch.linalg.norm(b))
    assert math.isclose(res.residual, true_res, rel_tol=1e-8)
    assert math.isclose(res.xAx, float(res.x @ a @ res.x), rel_tol=1e-8)
