"""Families against ``torch.distributions``: log-likelihoods, output Fishers, KL, entropy,
sampling."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, output_fisher, torch_log_prob
from torch import Tensor
from torch.distributions import Bernoulli as TBernoulli
from torch.distributions import Categorical as TCategorical
from torch.distributions import Normal, kl_divergence

from npg.families import (
    Bernoulli,
    Categorical,
    DiagGaussian,
    Family,
    GaussianRegression,
    MultiCategorical,
    get_family,
)

pytestmark = pytest.mark.usefixtures("float64")

FAMILIES = {
    "categorical": (Categorical(), 4),
    "bernoulli": (Bernoulli(), 3),
    "diag_gaussian": (DiagGaussian(), 6),
    "regression": (GaussianRegression(0.6), 3),
    "multi": (MultiCategorical([2, 3, 1]), 6),
}


def _rows(k: int, n: int = 4, seed: int = 0) -> Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def _support(family: Family, o: Tensor) -> list[tuple[Tensor, float]]:
    """Targets with weights such that ``Σ w h(y)`` is exactly ``E_y h(y)`` for every ``h`` that is
    polynomial of degree ≤ 3 in each Gaussian coordinate (2-point Gauss-Hermite) or any ``h``
    for the discrete families (enumeration)."""
    if isinstance(family, MultiCategorical):
        grids = torch.cartesian_prod(*[torch.arange(k) for k in family.nvec])
        grids = grids.reshape(-1, len(family.nvec))
        probs = [torch.softmax(p, 0) for p in o.split(family.nvec)]
        return [
            (y, float(torch.prod(torch.stack([p[j] for p, j in zip(probs, y, strict=True)]))))
            for y in grids
        ]
    if isinstance(family, Categorical):
        p = torch.softmax(o, 0)
        return [(torch.tensor(c), float(p[c])) for c in range(o.shape[0])]
    if isinstance(family, Bernoulli):
        k = o.shape[0]
        grid = torch.cartesian_prod(*[torch.tensor([0.0, 1.0])] * k).reshape(-1, k)
        p = torch.sigmoid(o)
        return [(y, float(torch.prod(torch.where(y > 0, p, 1 - p)))) for y in grid]
    if isinstance(family, DiagGaussian):
        mean, log_std = o.chunk(2)
        return [(mean + s * log_std.exp(), 0.5) for s in (1.0, -1.0)]
    return [(o + s * family.sigma, 0.5) for s in (1.0, -1.0)]


@pytest.mark.parametrize("fid", FAMILIES)
def test_log_prob_matches_torch_distributions(fid: str) -> None:
    family, k = FAMILIES[fid]
    out = _rows(k)
    for i, o in enumerate(out):
        for y, _ in _support(family, o)[:5]:
            ours = family.log_prob(out[i : i + 1], y[None])
            assert_close(ours, torch_log_prob(family, out[i : i + 1], y[None]))


@pytest.mark.parametrize("fid", FAMILIES)
def test_output_fisher_is_expected_negative_hessian_of_torch_log_prob(fid: str) -> None:
    """``F_out = E_y[-∇²_out log p(y|out)]`` with torch.distributions' log-prob, and the
    family's ``fisher_out_mv`` / ``fisher_out_sqrt`` and the hand-written reference agree."""
    family, k = FAMILIES[fid]
    out = _rows(k)
    for o in out:
        expected = 0.0
        for y, w in _support(family, o):

            def nll(z: Tensor, y: Tensor = y) -> Tensor:
                return -torch_log_prob(family, z[None], y[None])[0]

            expected = expected + w * torch.autograd.functional.hessian(nll, o)
        assert_close(output_fisher(family, o), expected)
        s = family.fisher_out_sqrt(o[None])[0]
        assert_close(s @ s.T, expected)
        assert_close(family.fisher_out_mv(o[None].expand(k, k), torch.eye(k)), expected)


@pytest.mark.parametrize("fid", ["categorical", "bernoulli", "multi"])
def test_output_fisher_is_expected_score_outer_product(fid: str) -> None:
    """Discrete families only: for Gaussians the score outer product is degree 4 in ``y``, out of
    the 2-point rule's reach (the Hessian identity above covers them)."""
    family, k = FAMILIES[fid]
    o = _rows(k, 1, seed=3)[0]
    expected = 0.0
    for y, w in _support(family, o):
        z = o.clone().requires_grad_(True)
        (score,) = torch.autograd.grad(torch_log_prob(family, z[None], y[None]).sum(), z)
        expected = expected + w * torch.outer(score, score)
    assert_close(output_fisher(family, o), expected)


def _torch_dist(family: Family, out: Tensor):
    if isinstance(family, Categorical):
        return [TCategorical(logits=out)]
    if isinstance(family, MultiCategorical):
        return [TCategorical(logits=p) for p in out.split(family.nvec, -1)]
    if isinstance(family, Bernoulli):
        return [TBernoulli(logits=out)]
    if isinstance(family, DiagGaussian):
        mean, log_std = out.chunk(2, -1)
        return [Normal(mean, log_std.exp())]
    return [Normal(out, torch.full_like(out, family.sigma))]


def _summed(t: Tensor, family: Family) -> Tensor:
    return t if isinstance(family, (Categorical, MultiCategorical)) else t.sum(-1)


@pytest.mark.parametrize("fid", FAMILIES)
def test_kl_and_entropy_match_torch(fid: str) -> None:
    family, k = FAMILIES[fid]
    p, q = _rows(k, seed=1), _rows(k, seed=2)
    kl_ref = sum(
        _summed(kl_divergence(a, b), family)
        for a, b in zip(_torch_dist(family, p), _torch_dist(family, q), strict=True)
    )
    ent_ref = sum(_summed(d.entropy(), family) for d in _torch_dist(family, p))
    assert_close(family.kl(p, q), kl_ref)
    assert_close(family.entropy(p), ent_ref)
    assert_close(family.kl(p, p), torch.zeros(p.shape[0]), atol=1e-12, rtol=0)


@pytest.mark.parametrize("fid", FAMILIES)
def test_kl_hessian_is_output_fisher(fid: str) -> None:
    """``∇²_q KL(p‖q)`` at ``q = p`` is the output Fisher (what TRPO's KL-Hessian computes)."""
    family, k = FAMILIES[fid]
    o = _rows(k, 1, seed=5)[0]
    h = torch.autograd.functional.hessian(lambda z: family.kl(o[None], z[None])[0], o)
    assert_close(h, output_fisher(family, o))


@pytest.mark.parametrize("fid", FAMILIES)
def test_samples_have_the_right_moments(fid: str) -> None:
    family, k = FAMILIES[fid]
    o = _rows(k, 1, seed=7)
    gen = torch.Generator().manual_seed(0)
    s = torch.cat([family.sample(o.expand(20000, k), gen) for _ in range(5)]).to(torch.float64)
    # the mean score is zero: E_y ∇_out log p(y|out) = 0, within 5 standard errors
    z = o.expand(s.shape[0], k).clone().requires_grad_(True)
    y = s.long() if isinstance(family, (Categorical, MultiCategorical)) else s
    (scores,) = torch.autograd.grad(torch_log_prob(family, z, y).sum(), z)
    se = scores.std(0) / scores.shape[0] ** 0.5
    assert bool((scores.mean(0).abs() <= 5 * se + 1e-12).all())


def test_modes_and_registry() -> None:
    o = torch.tensor([[0.1, 2.0, -1.0, 0.5, 0.2, -3.0]])
    assert Categorical().mode(o).item() == 1
    assert MultiCategorical([2, 3, 1]).mode(o).tolist() == [[1, 1, 0]]
    assert Bernoulli().mode(o).tolist() == [[1.0, 1.0, 0.0, 1.0, 1.0, 0.0]]
    assert DiagGaussian().mode(o).tolist() == [[0.1, 2.0, -1.0]]
    assert get_family("categorical").name == "categorical"
    with pytest.raises(ValueError):
        get_family("nope")
    with pytest.raises(ValueError):
        GaussianRegression(0.0)
