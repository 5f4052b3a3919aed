"""Shared small models, families and brute-force references for the Fisher tests.

The references avoid npg's own Fisher code: output-space Fishers are written by hand,
log-likelihoods come from ``torch.distributions``, and Jacobians from
``torch.autograd.functional.jacobian`` one sample at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import pytest
import torch
from gymnasium import spaces
from torch import Tensor, nn
from torch.distributions import Bernoulli as TBernoulli
from torch.distributions import Categorical as TCategorical
from torch.distributions import Normal
from torch.func import functional_call

from npg.families import (
    Bernoulli,
    Categorical,
    DiagGaussian,
    Family,
    GaussianRegression,
    MultiCategorical,
)


@pytest.fixture
def float64():
    """Run a test in float64 and restore the default dtype afterwards (the Fisher test modules
    opt in with ``pytestmark = pytest.mark.usefixtures("float64")``)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to a busy machine (modules opt in
    with ``pytest.mark.usefixtures("one_thread")``)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --- envs -------------------------------------------------------------------------------------
class DictObsEnv(gym.Env):
    """One-step episodes with a Dict observation (a Box and a Discrete) and reward = action."""

    observation_space = spaces.Dict({"a": spaces.Box(-1, 1, (2,)), "b": spaces.Discrete(3)})
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), float(action), True, False, {}


# --- models -----------------------------------------------------------------------------------
class FreeLogStd(nn.Module):
    """A mean network plus a state-independent log-std broadcast into ``[mean, log_std]``."""

    def __init__(self, body: nn.Module, act_dim: int) -> None:
        super().__init__()
        self.body = body
        self.log_std = nn.Parameter(torch.linspace(-0.5, 0.3, act_dim))

    def forward(self, x: Tensor) -> Tensor:
        mean = self.body(x)
        return torch.cat([mean, self.log_std.expand_as(mean)], -1)


ARCHS = ("linear", "mlp_tanh", "mlp_relu", "conv")
IN_DIM, CONV_IN = 3, (2, 5, 5)


def make_body(arch: str, k: int) -> nn.Module:
    """A small network with ``k`` outputs; inputs are ``(N, 3)`` or ``(N, 2, 5, 5)``."""
    if arch == "linear":
        return nn.Linear(IN_DIM, k)
    if arch in ("mlp_tanh", "mlp_relu"):
        act = nn.Tanh if arch == "mlp_tanh" else nn.ReLU
        return nn.Sequential(nn.Linear(IN_DIM, 4), act(), nn.Linear(4, 3), act(), nn.Linear(3, k))
    if arch == "conv":
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(3, 2, 2, stride=2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(8, k),
        )
    raise ValueError(arch)


def make_inputs(arch: str, n: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, *CONV_IN) if arch == "conv" else (n, IN_DIM)
    return torch.randn(shape, generator=g)


# family id -> (family, output width of the network body, whether log-std is a free parameter)
FAMILY_IDS = ("categorical", "bernoulli", "gauss_free_std", "gauss_out_std", "regression", "multi")


def make_family(fid: str) -> tuple[Family, int, bool]:
    return {
        "categorical": (Categorical(), 3, False),
        "bernoulli": (Bernoulli(), 3, False),
        "gauss_free_std": (DiagGaussian(), 2, True),
        "gauss_out_std": (DiagGaussian(), 4, False),
        "regression": (GaussianRegression(0.7), 2, False),
        "multi": (MultiCategorical([2, 3]), 5, False),
    }[fid]


def make_case(arch: str, fid: str, n: int = 5, seed: int = 0):
    """``(model, inputs, family)`` for one architecture and family."""
    torch.manual_seed(seed)
    family, k, free_std = make_family(fid)
    body = make_body(arch, k)
    model = FreeLogStd(body, k) if free_std else body
    return model, make_inputs(arch, n, seed + 1), family


# --- independent references -------------------------------------------------------------------
def output_fisher(family: Family, o: Tensor) -> Tensor:
    """Hand-written ``F_out`` for one output row ``o`` (shape ``(K,)``)."""
    if isinstance(family, MultiCategorical):
        blocks = [output_fisher(Categorical(), p) for p in o.split(family.nvec)]
        return torch.block_diag(*blocks)
    if isinstance(family, Categorical):
        p = torch.softmax(o, 0)
        return torch.diag(p) - torch.outer(p, p)
    if isinstance(family, Bernoulli):
        p = torch.sigmoid(o)
        return torch.diag(p * (1 - p))
    if isinstance(family, DiagGaussian):
        d = o.shape[0] // 2
        return torch.diag(torch.cat([torch.exp(-2 * o[d:]), 2 * torch.ones(d)]))
    if isinstance(family, GaussianRegression):
        return torch.eye(o.shape[0]) / family.sigma**2
    raise TypeError(family)


def torch_log_prob(family: Family, out: Tensor, y: Tensor) -> Tensor:
    """``log p(y | out)`` per row from ``torch.distributions`` (independent of npg)."""
    if isinstance(family, MultiCategorical):
        parts = out.split(family.nvec, -1)
        return sum(TCategorical(logits=p).log_prob(y[..., j]) for j, p in enumerate(parts))
    if isinstance(family, Categorical):
        return TCategorical(logits=out).log_prob(y)
    if isinstance(family, Bernoulli):
        return TBernoulli(logits=out).log_prob(y).sum(-1)
    if isinstance(family, DiagGaussian):
        mean, log_std = out.chunk(2, -1)
        return Normal(mean, log_std.exp()).log_prob(y).sum(-1)
    if isinstance(family, GaussianRegression):
        return Normal(out, family.sigma).log_prob(y).sum(-1)
    raise TypeError(family)


def torch_sample(family: Family, out: Tensor, seed: int) -> Tensor:
    """Targets drawn with ``torch.distributions`` (for the empirical Fisher)."""
    torch.manual_seed(seed)
    out = out.detach()
    if isinstance(family, MultiCategorical):
        parts = out.split(family.nvec, -1)
        return torch.stack([TCategorical(logits=p).sample() for p in parts], -1)
    if isinstance(family, Categorical):
        return TCategorical(logits=out).sample()
    if isinstance(family, Bernoulli):
        return TBernoulli(logits=out).sample()
    if isinstance(family, DiagGaussian):
        mean, log_std = out.chunk(2, -1)
        return Normal(mean, log_std.exp()).sample()
    return Normal(out, family.sigma).sample()


def flat_params(model: nn.Module, names: list[str] | None = None) -> tuple[list[str], Tensor]:
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    return names, torch.cat([params[n].detach().reshape(-1) for n in names])


def flat_fn(model: nn.Module, names: list[str] | None = None) -> tuple[Callable, Tensor]:
    """``f(theta_flat, x) -> out`` over the parameters ``names`` (all by default)."""
    names, theta = flat_params(model, names)
    shapes = {n: p.shape for n, p in model.named_parameters()}

    def f(theta_flat: Tensor, x: Tensor) -> Tensor:
        chunks, start = {}, 0
        for n in names:
            size = shapes[n].numel()
            chunks[n] = theta_flat[start : start + size].reshape(shapes[n])
            start += size
        return functional_call(model, chunks, (x,))

    return f, theta


def jacobians(model: nn.Module, x: Tensor, names: list[str] | None = None) -> list[Tensor]:
    """Per-sample Jacobians ``(K, D)`` of the output w.r.t. the flat parameters, one by one."""
    f, theta = flat_fn(model, names)
    return [
        torch.autograd.functional.jacobian(lambda t, xi=xi: f(t, xi[None])[0], theta) for xi in x
    ]


def dense_fisher(
    model: nn.Module, x: Tensor, family: Family, names: list[str] | None = None
) -> Tensor:
    """``(1/N) Σ_i J_iᵀ F_out(out_i) J_i`` from explicit Jacobians and hand-written ``F_out``."""
    with torch.no_grad():
        out = model(x)
    js = jacobians(model, x, names)
    return sum(j.T @ output_fisher(family, o) @ j for j, o in zip(js, out, strict=True)) / len(js)


def dense_outer(
    model: nn.Module, x: Tensor, family: Family, ys: list[Tensor], names: list[str] | None = None
) -> Tensor:
    """``(1/(N·S)) Σ_i Σ_s ∇log p(y_is|x_i) ∇log p(y_is|x_i)ᵀ`` by a python loop of
    ``autograd.grad``; ``ys`` holds ``S`` label tensors for the whole batch."""
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    sel = [params[n] for n in names]
    total, count = 0.0, 0
    for y in ys:
        for i in range(x.shape[0]):
            lp = torch_log_prob(family, model(x[i : i + 1]), y[i : i + 1]).sum()
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(lp, sel)])
            total = total + torch.outer(g, g)
            count += 1
    return total / count


def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-6, atol: float = 1e-10):
    """``torch.testing.assert_close`` with the suite's default tolerances."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
