"""The exact Fisher's autograd-free path for MLPs (``LinearStack``) against brute force."""

from __future__ import annotations

import pytest
import torch
from conftest import FreeLogStd, assert_close, dense_fisher, make_case, make_inputs
from torch import Tensor, nn

from npg.families import Categorical
from npg.fisher import ExactFisher
from npg.model import LinearStack, find_linear_stack

pytestmark = pytest.mark.usefixtures("float64")


class StackedFreeLogStd(FreeLogStd):
    """A Gaussian policy that describes itself (as ``agents.policies.Actor`` does)."""

    def __init__(self, body: nn.Sequential, act_dim: int, claimed: str | None = None) -> None:
        super().__init__(body, act_dim)
        self.claimed = claimed  # a wrong activation name, to test the check

    def linear_stack(self) -> LinearStack:
        stack = find_linear_stack(self.body)
        assert stack is not None
        return LinearStack(stack.layers, self.claimed or stack.activation, self.log_std)


class Hidden(nn.Module):
    """The same network without a description: the generic (autograd) path."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _check(op: ExactFisher, ref: Tensor) -> None:
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1))
    assert_close(op.to_dense(), ref)
    assert_close(op.mv(v), ref @ v)


@pytest.mark.parametrize("arch", ["mlp_tanh", "mlp_relu"])
@pytest.mark.parametrize(
    "fid", ["categorical", "bernoulli", "gauss_out_std", "regression", "multi", "gauss_free_std"]
)
def test_stack_path_is_taken_and_matches_bruteforce(arch: str, fid: str) -> None:
    model, x, family = make_case(arch, fid)
    if isinstance(model, FreeLogStd):
        model = StackedFreeLogStd(model.body, model.log_std.numel())
    op = ExactFisher(model, x, family)
    assert op._stack is not None
    _check(op, dense_fisher(model, x, family))


def test_a_wrong_description_falls_back_to_autograd() -> None:
    model, x, family = make_case("mlp_tanh", "gauss_free_std")
    liar = StackedFreeLogStd(model.body, model.log_std.numel(), claimed="relu")
    op = ExactFisher(liar, x, family)
    assert op._stack is None
    _check(op, dense_fisher(liar, x, family))


def test_parameter_subset_uses_autograd() -> None:
    model, x, family = make_case("mlp_tanh", "categorical")
    op = ExactFisher(model, x, family, params=["0.weight", "0.bias"])
    assert op._stack is None


def test_stack_equals_autograd_on_a_larger_net_and_is_a_snapshot() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    x = make_inputs("mlp_tanh", 64).repeat(1, 2)
    fast, slow = ExactFisher(net, x, Categorical()), ExactFisher(Hidden(net), x, Categorical())
    assert fast._stack is not None and slow._stack is None
    v = torch.randn(fast.dim)
    expected = slow.mv(v)
    with torch.no_grad():  # an in-place update after construction (a line search) changes nothing
        for p in net.parameters():
            p.add_(1.0)
    assert_close(fast.mv(v), expected, rtol=1e-10)


def test_find_linear_stack() -> None:
    assert find_linear_stack(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))) is not None
    assert find_linear_stack(nn.Sequential(nn.Linear(2, 3), nn.ELU(), nn.Linear(3, 1))) is None
    mixed = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    assert find_linear_stack(mixed) is None
    assert find_linear_stack(nn.Sequential(nn.Linear(2, 3, bias=False))) is None
    assert find_linear_stack(Hidden(nn.Linear(2, 3))) is None
    assert find_linear_stack(None) is None


@pytest.mark.parametrize("labels", ["exact", "mc", "empirical"])
def test_kfac_free_log_std_block_in_closed_form(labels: str, monkeypatch) -> None:
    """For a described Gaussian policy K-FAC takes the free log-std's diagonal block from the
    label vectors (and backpropagates only the columns that reach the MLP); it equals the
    block from per-sample gradients that the undescribed model gets, and so does everything
    else. A wrong description is not used."""
    from npg.fisher import KFACFisher
    from npg.fisher import kfac as kfac_module

    model, x, family = make_case("mlp_tanh", "gauss_free_std", n=6)
    described = StackedFreeLogStd(model.body, model.log_std.numel())
    y = family.sample(described(x), torch.Generator().manual_seed(3))
    kw = dict(labels=labels, targets=y, n_samples=3, seed=7)
    slow = KFACFisher(Hidden(described), x, family, **kw)
    calls = []

    def spy(*args):
        calls.append(1)
        return per_sample_grads(*args)

    per_sample_grads = kfac_module.per_sample_grads
    monkeypatch.setattr(kfac_module, "per_sample_grads", spy)
    fast = KFACFisher(described, x, family, **kw)
    assert not calls  # the closed form needed no per-sample gradients
    assert_close(fast.to_dense(), slow.to_dense())
    assert [s.start for s in fast.diag_slices] == [s.start for s in slow.diag_slices]
    liar = StackedFreeLogStd(model.body, model.log_std.numel(), claimed="relu")
    assert_close(KFACFisher(liar, x, family, **kw).to_dense(), slow.to_dense())
    assert calls  # the wrong description fell back to per-sample gradients
