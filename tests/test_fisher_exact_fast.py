"""The Linear-layer path of the exact Fisher (``ExactFisher(..., fast=True)``) against brute-force
dense Fishers from explicit per-sample Jacobians, and its refusals where it would be wrong."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import FAMILY_IDS, FreeLogStd, assert_close, dense_fisher, make_case
from test_fisher_exact import _check_operator
from torch import Tensor, nn

from npg.families import Categorical, DiagGaussian
from npg.fisher import ExactFisher

pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize(
    ("arch", "fid"), list(itertools.product(("linear", "mlp_tanh", "mlp_relu"), FAMILY_IDS))
)
def test_fast_path_matches_bruteforce(arch: str, fid: str) -> None:
    model, x, family = make_case(arch, fid)
    op = ExactFisher(model, x, family, fast=True)
    assert op.linear is not None  # the Linear path is taken ...
    n_linear = sum(
        p.numel() for m in model.modules() if type(m) is nn.Linear for p in m.parameters()
    )
    # ... for every Linear parameter; only a free log-std is left to autograd
    assert sum(op.fmodel.numels[op.fmodel.names.index(n)] for n in op._rest) == op.dim - n_linear
    _check_operator(op, dense_fisher(model, x, family))


def test_fast_path_stores_and_factors() -> None:
    """In a 3-layer MLP the last layer is constant, the middle one factored through the
    activation and the first stored; the log-std output columns are dropped."""
    model, x, family = make_case("mlp_tanh", "gauss_free_std", n=7)
    lin = ExactFisher(model, x, family, fast=True).linear
    assert lin.sizes == [3, 2, 4]  # factored (middle, last) first, then the stored first layer
    assert lin.width == 5 and lin.d is not None and lin.m.shape == (7, 2, 4)
    assert lin.keep.tolist() == [0, 1]


@pytest.mark.parametrize("n", [3, 40])  # both contraction forms (multiply-and-sum, bmm)
def test_fast_path_wide_stored_block(n: int, monkeypatch) -> None:
    from npg.fisher import _linear

    monkeypatch.setattr(_linear, "BMM_MIN", 1 if n == 40 else 10**9)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(n, 3)
    op = ExactFisher(model, x, Categorical(), fast=True)
    assert op.linear.bmm == (n == 40)
    _check_operator(op, dense_fisher(model, x, Categorical()))


def test_fast_path_parameter_subset() -> None:
    model, x, family = make_case("mlp_relu", "gauss_free_std")
    chosen = ["body.2.weight", "log_std", "body.0.bias", "body.4.bias"]
    op = ExactFisher(model, x, family, params=chosen, fast=True)
    assert op._rest == ["log_std"]
    assert_close(op.to_dense(), dense_fisher(model, x, family, op.fmodel.names))


def test_fast_path_is_a_snapshot() -> None:
    model, x, family = make_case("mlp_tanh", "categorical")
    op = ExactFisher(model, x, family, fast=True)
    before = op.to_dense()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5).add_(0.1)
    assert_close(op.to_dense(), before)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1).div_(1.5)
    assert_close(before, dense_fisher(model, x, family))


class Twice(nn.Module):
    """The same Linear applied twice: its Jacobian has two terms per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


def _batchnorm() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))


@pytest.mark.parametrize("make", [Twice, _batchnorm], ids=["linear_twice", "batchnorm"])
def test_invalid_models_are_refused_and_generic_path_is_right(make) -> None:
    torch.manual_seed(0)
    model = make()
    x = torch.randn(6, 3)
    with pytest.raises(ValueError):
        ExactFisher(model, x, Categorical(), fast=True)
    op = ExactFisher(model, x, Categorical())
    assert op.linear is None
    if isinstance(model, Twice):  # a per-sample reference exists only without batch statistics
        assert_close(op.to_dense(), dense_fisher(model, x, Categorical()))


def test_fast_path_refuses_function_models_and_tied_weights() -> None:
    model, x, family = make_case("mlp_tanh", "categorical")
    pd = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError):
        ExactFisher(lambda p, inp: inp @ p["0.weight"].T, x, family, param_dict=pd, fast=True)
    tied = FreeLogStd(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)), 3)
    tied.body[2].weight = tied.body[0].weight
    with pytest.raises(ValueError):
        ExactFisher(tied, x, DiagGaussian(), fast=True)
