"""The Fisher registry: one entry makes a flavour usable everywhere, and the flags it records."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_fisher
from torch import Tensor, nn

import npg
from agents import TRPO
from npg.families import Categorical
from npg.fisher import ExactFisher
from npg.optim import NGD

pytestmark = pytest.mark.usefixtures("one_thread")


class TwiceExact(ExactFisher):
    """A test flavour: ``2F`` (a flavour's whole module is its operator class)."""

    def _mv(self, v: Tensor) -> Tensor:
        return 2 * super()._mv(v)


@pytest.fixture
def twice() -> None:
    """Registers ``"twice"`` for one test (the one registry line) and removes it after."""
    npg.register_fisher(
        "twice", npg.Flavour(lambda m, x, f, o: TwiceExact(m, x, f, params=o.params))
    )
    yield
    del npg.FLAVOURS["twice"]


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _step(opt: NGD, model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> None:
    """One NGD step on the batch ``(x, y)``."""

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    opt.step(closure, inputs=x, targets=y)


@pytest.mark.usefixtures("twice", "float64")
def test_a_registered_flavour_works_in_make_fisher_and_ngd() -> None:
    model, x, y = _problem()
    dense = dense_fisher(model, x, Categorical())  # independent of npg
    op = npg.make_fisher("twice", model, x, "categorical")
    torch.testing.assert_close(op.to_dense(), 2 * dense)

    loss_fn = nn.CrossEntropyLoss()
    opt = NGD(model.parameters(), model=model, loss_fn=loss_fn, fisher="twice", lr=0.5, max_kl=None)
    opt.param_groups[0].update(cg_iters=200, cg_tol=1e-14)
    g = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
    g = torch.cat([t.reshape(-1) for t in g])
    before = _flat(model)
    _step(opt, model, loss_fn, x, y)
    lam = opt.damping
    expected = -0.5 * torch.linalg.solve(2 * dense + lam * torch.eye(len(g)), g)
    torch.testing.assert_close(_flat(model) - before, expected, rtol=1e-7, atol=1e-12)


@pytest.mark.usefixtures("twice")
def test_an_agent_trains_with_a_registered_flavour() -> None:
    agent = TRPO(
        "MlpPolicy", "CartPole-v1", fisher="twice", n_envs=2, n_steps=32, vf_minibatch=64, seed=0
    )
    metrics: list[dict] = []
    agent.learn(64, callback=metrics.append)
    assert metrics[0]["step_status"] == "ok"


def test_unknown_and_duplicate_names_are_refused() -> None:
    model, x, _ = _problem()
    with pytest.raises(ValueError, match="unknown Fisher 'hessian'; accepted: exact, mc"):
        npg.make_fisher("hessian", model, x, "categorical")
    with pytest.raises(ValueError, match="unknown Fisher"):
        NGD(model.parameters(), model=model, loss_fn=nn.CrossEntropyLoss(), fisher="hessian")
    with pytest.raises(ValueError, match="fisher"):
        TRPO("MlpPolicy", "CartPole-v1", fisher="hessian")
    with pytest.raises(ValueError, match="already registered"):
        npg.register_fisher("exact", npg.FLAVOURS["exact"])
    with pytest.raises(ValueError, match="needs targets"):
        npg.make_fisher("empirical", model, x, "categorical")
    with pytest.raises(TypeError, match="unexpected keyword"):
        npg.make_fisher("exact", model, x, "categorical", n_sample=2)  # a typo is not ignored


@pytest.mark.parametrize("name", npg.fisher_names())
def test_registry_flags_match_the_operators(name: str) -> None:
    model, x, y = _problem()
    flavour = npg.get_flavour(name)
    op = npg.make_fisher(name, model, x, "categorical", targets=y)
    assert op.direct == flavour.direct
    assert flavour.sampled == (name in ("mc", "empirical"))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_sampled_flavours_clip_with_the_exact_fishers_kl(fisher: str) -> None:
    """The KL an NGD step reports (and clips to ``max_kl``) is ½ΔᵀFΔ with the dense exact
    Fisher: the sampled estimate has rank <= N and would not see most of the step."""
    model, x, y = _problem()
    dense = dense_fisher(model, x, Categorical())
    loss_fn = nn.CrossEntropyLoss()
    opt = NGD(model.parameters(), model=model, loss_fn=loss_fn, fisher=fisher, max_kl=1e-3)
    before = _flat(model)
    _step(opt, model, loss_fn, x, y)
    delta = _flat(model) - before
    kl = 0.5 * float(delta @ dense @ delta)
    assert opt.last_info["kl"] == pytest.approx(kl, rel=1e-8)
    assert kl == pytest.approx(1e-3, rel=1e-8)  # the lr=1 step was clipped onto the boundary
