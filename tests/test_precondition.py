"""KFACPreconditioner: K-FAC gradients in front of any torch optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from npg import KFACPreconditioner, make_fisher
from npg.optim import NGD

pytestmark = pytest.mark.usefixtures("float64", "one_thread")


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _backward(model: nn.Module, loss_fn, x, y) -> None:
    model.zero_grad()
    loss_fn(model(x), y).backward()


def test_gradients_become_the_damped_kfac_solve() -> None:
    """One step: ``.grad`` is ``(F̂ + λI)⁻¹ g`` with the K-FAC matrix of the batch, checked
    against the dense matrix of an independently built operator and ``torch.linalg.solve``."""
    model, x, y = _problem()
    loss_fn = nn.CrossEntropyLoss()
    pre = KFACPreconditioner(model, loss_fn=loss_fn, kl_clip=None, damping=1e-2, inverse="eigen")
    _backward(model, loss_fn, x, y)
    g = _grads(model).clone()
    pre.step(x, y)
    dense = make_fisher("kfac", model, x, "categorical").to_dense()
    expected = torch.linalg.solve(dense + 1e-2 * torch.eye(len(g)), g)
    torch.testing.assert_close(_grads(model), expected, rtol=1e-8, atol=1e-12)


def test_sgd_with_the_preconditioner_is_ngd() -> None:
    """SGD(lr) behind the preconditioner takes NGD's K-FAC steps, step for step."""
    loss_fn = nn.CrossEntropyLoss()
    options = dict(damping=1e-2, factor_decay=0.9, inv_interval=2)
    model, x, y = _problem()
    twin = _problem()[0]
    sgd = torch.optim.SGD(model.parameters(), lr=0.3)
    pre = KFACPreconditioner(model, loss_fn=loss_fn, kl_clip=None, **options)
    ngd = NGD(
        twin.parameters(),
        model=twin,
        loss_fn=loss_fn,
        lr=0.3,
        max_kl=None,
        damping=1e-2,
        kfac_decay=0.9,
        kfac_inv_interval=2,
    )
    for k in range(5):
        xb, yb = x[k : k + 8], y[k : k + 8]
        _backward(model, loss_fn, xb, yb)
        pre.step(xb, yb)
        sgd.step()
        _backward(twin, loss_fn, xb, yb)
        ngd.step(inputs=xb, targets=yb)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_kl_clip_bounds_the_optimizers_step() -> None:
    """The clipped ``d = ν d₀`` puts the step ``-η d`` on the damped KL model's boundary:
    ``½ η² ν² gᵀd₀ = δ``, with ``d₀`` the unclipped preconditioned gradient."""
    loss_fn = nn.CrossEntropyLoss()
    model, x, y = _problem()
    free = _problem()[0]
    unclipped = KFACPreconditioner(free, loss_fn=loss_fn, kl_clip=None)
    _backward(free, loss_fn, x, y)
    g = _grads(free).clone()
    unclipped.step(x, y)
    d0 = _grads(free).clone()
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    pre = KFACPreconditioner(model, loss_fn=loss_fn, optimizer=sgd, kl_clip=1e-4)
    _backward(model, loss_fn, x, y)
    pre.step(x, y)
    nu = pre.last_info["scale"]
    assert nu < 1  # the lr=1 step was clipped ...
    torch.testing.assert_close(_grads(model), nu * d0, rtol=1e-10, atol=1e-14)
    assert 0.5 * nu**2 * float(g @ d0) == pytest.approx(1e-4, rel=1e-9)  # ... onto δ
    sgd.param_groups[0]["lr"] = 1e-4  # a small step is left alone
    _backward(model, loss_fn, x, y)
    pre.step(x, y)
    assert pre.last_info["scale"] == 1.0


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=1e-2),
    ],
)
def test_readme_example_trains_behind_sgd_and_adam(make_opt) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    x = torch.randn(256, 10) * torch.logspace(-1, 1, 10)
    y = (x[:, 0] + x[:, 9] > 0).long() + (x[:, 5] > 1).long()
    loss_fn = nn.CrossEntropyLoss()
    opt = make_opt(net.parameters())
    pre = KFACPreconditioner(net, loss_fn=loss_fn, optimizer=opt)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        initial = float(loss_fn(net(x), y))
    for _ in range(200):
        idx = torch.randint(0, 256, (25,), generator=gen)
        _backward(net, loss_fn, x[idx], y[idx])
        pre.step(x[idx], y[idx])
        opt.step()
    with torch.no_grad():
        assert float(loss_fn(net(x), y)) < 0.5 * initial


def test_bad_input_is_refused_and_changes_nothing() -> None:
    model, x, y = _problem()
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="optimizer= .* or lr="):
        KFACPreconditioner(model, loss_fn=loss_fn)
    pre = KFACPreconditioner(model, loss_fn=loss_fn, lr=0.1)
    _backward(model, loss_fn, x, y)
    model[0].weight.grad[0, 0] = float("nan")
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="NaN/inf"):
        pre.step(x, y)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.grad.nan_to_num(), b.nan_to_num())
