"""The natural-gradient step: trust-region size, predicted improvement, degenerate cases."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, make_case
from torch import Tensor

from npg import make_fisher, natural_step
from npg.fisher import FisherOperator

pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("flavour", ["exact", "empirical", "diagonal", "kfac", "kfac_pi", "ekfac"])
@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_step_fills_the_trust_region(flavour: str, damping: float) -> None:
    model, x, family = make_case("mlp_tanh", "gauss_free_std", n=64)
    y = family.sample(model(x), torch.Generator().manual_seed(0))
    inverse = "pi" if flavour == "kfac_pi" else "eigen"
    op = make_fisher(flavour.removesuffix("_pi"), model, x, family, targets=y, kfac_inverse=inverse)
    g = torch.randn(op.dim, generator=torch.Generator().manual_seed(1))
    delta = 0.01
    res = natural_step(op, g, delta, damping=damping + 1e-4, cg_iters=200, cg_tol=1e-12)
    lam = damping + 1e-4
    a = op.to_dense() + lam * torch.eye(op.dim)
    assert res.ok
    s = res.step
    assert math.isclose(0.5 * float(s @ a @ s), delta, rel_tol=1e-8)
    assert math.isclose(res.predicted_improvement, float(g @ s), rel_tol=1e-12)
    assert res.predicted_improvement > 0
    assert math.isclose(res.xFx, float(res.direction @ a @ res.direction), rel_tol=1e-6)
    # the direction is the damped solve (π-damping solves a different system: it is checked
    # in test_fisher_kfac), and the step is parallel to it
    if flavour != "kfac_pi":
        assert_close(res.direction, torch.linalg.solve(a, g), rtol=1e-5, atol=1e-8)
    assert_close(s, math.sqrt(2 * delta / res.xFx) * res.direction)
    if flavour in ("exact", "empirical"):
        assert res.cg is not None and res.cg.converged
    else:
        assert res.cg is None


def test_preconditioner_and_truncated_cg() -> None:
    model, x, family = make_case("mlp_relu", "categorical", n=32)
    op = make_fisher("exact", model, x, family)
    g = torch.randn(op.dim, generator=torch.Generator().manual_seed(2))
    kfac = make_fisher("kfac", model, x, family)
    res = natural_step(op, g, 0.02, damping=1e-2, cg_iters=3, preconditioner=kfac)
    a = op.to_dense() + 1e-2 * torch.eye(op.dim)
    # a truncated solve still gives an exactly sized step with a positive predicted gain
    assert res.ok and res.cg.iterations == 3
    assert math.isclose(0.5 * float(res.step @ a @ res.step), 0.02, rel_tol=1e-8)
    assert math.isclose(res.predicted_improvement, float(g @ res.step), rel_tol=1e-12)
    assert res.predicted_improvement > 0


class _Dense(FisherOperator):
    """A fixed matrix behind the operator interface (for degenerate cases)."""

    def __init__(self, a: Tensor) -> None:
        self.a, self.dim, self.n = a, a.shape[0], 1
        self.dtype, self.device = a.dtype, a.device

    def _mv(self, v: Tensor) -> Tensor:
        return self.a @ v


def test_degenerate_cases_give_zero_steps_not_nan() -> None:
    op = _Dense(torch.diag(torch.tensor([1.0, 2.0])))
    res = natural_step(op, torch.zeros(2), 0.01)
    assert res.status == "zero_gradient" and not res.ok
    assert bool((res.step == 0).all()) and res.predicted_improvement == 0.0
    neg = _Dense(-torch.eye(2))
    res = natural_step(neg, torch.ones(2), 0.01)
    assert res.status == "nonpositive_curvature"
    assert bool((res.step == 0).all()) and bool(torch.isfinite(res.direction).all())
    with pytest.raises(ValueError):
        natural_step(op, torch.ones(2), 0.0)
