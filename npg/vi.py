"""Natural-gradient variational inference for Bayesian GLMs with a full-covariance Gaussian.

Model: ``w ~ N(0, α⁻¹I)``, ``y_i | w ~ p(y_i | x_iᵀw)`` (``"logistic"``: Bernoulli with logit
``x_iᵀw``; ``"gaussian"``: ``N(x_iᵀw, σ²)``). Variational family ``q = N(m, S)``.

The ELBO ``E_q[log p(y|w)] - KL(q ‖ p(w))`` needs only one-dimensional expectations over
``a_i = x_iᵀw ~ N(x_iᵀm, x_iᵀSx_i)``, computed with Gauss-Hermite quadrature (deterministic; exact
for polynomials, so exact for the Gaussian likelihood). Both optimisers below use this same ELBO
estimator and its autograd gradients:

* :func:`ngvi` — natural gradient ascent in the natural parameters ``(S⁻¹m, -½S⁻¹)``, which equals
  the ordinary gradient in the mean parameters (Khan & Lin 2017; Khan & Rue 2023):
  ``S⁻¹ ← S⁻¹ - 2ρ ∇_S ELBO``, ``m ← m + ρ S ∇_m ELBO``. With ``ρ = 1`` the precision becomes
  ``αI + E_q[-∇² log p(y|w)]``: a Newton-like step, exact in one step for the Gaussian case.
* :func:`gradient_ascent_vi` — plain gradient ascent on ``(m, L)`` with ``S = LLᵀ``.

References: :func:`laplace` (MAP and inverse Hessian), :func:`linear_gaussian_posterior` (closed
form) and :func:`hmc` (a plain Hamiltonian Monte Carlo sampler with fixed step size).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

LIKELIHOODS = ("logistic", "gaussian")


@dataclass
class VIResult:
    """A Gaussian ``N(mean, cov)`` and the optimiser's trace.

    Attributes:
        mean, cov: the final variational parameters.
        means: the mean after every iteration (index 0 = initial).
        elbos: the ELBO after every iteration (index 0 = initial).
    """

    mean: Tensor
    cov: Tensor
    means: list[Tensor] = field(default_factory=list)
    elbos: list[float] = field(default_factory=list)


def gauss_hermite(n: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Nodes and weights with ``Σ_k w_k f(z_k) ≈ E[f(z)]`` for ``z ~ N(0, 1)``."""
    t, w = np.polynomial.hermite.hermgauss(n)
    return torch.tensor(math.sqrt(2) * t, dtype=dtype), torch.tensor(
        w / math.sqrt(math.pi), dtype=dtype
    )


def _check(likelihood: str) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; accepted: {', '.join(LIKELIHOODS)}")


def log_likelihood(a: Tensor, y: Tensor, likelihood: str, noise_std: float = 1.0) -> Tensor:
    """Elementwise ``log p(y | a)`` for linear predictors ``a`` (broadcast against ``y``)."""
    _check(likelihood)
    if likelihood == "logistic":
        return y * a - F.softplus(a)
    return -0.5 * ((y - a) / noise_std) ** 2 - math.log(noise_std) - 0.5 * math.log(2 * math.pi)


def expected_log_likelihood(
    mean: Tensor,
    cov: Tensor,
    x: Tensor,
    y: Tensor,
    likelihood: str,
    n_quad: int = 32,
    noise_std: float = 1.0,
) -> Tensor:
    """``Σ_i E_{w~N(mean,cov)}[log p(y_i | x_iᵀw)]`` by ``n_quad``-point Gauss-Hermite."""
    z, w = gauss_hermite(n_quad, mean.dtype)
    mu = x @ mean
    var = torch.einsum("ni,ij,nj->n", x, cov, x).clamp_min(0)
    a = mu[:, None] + var.sqrt()[:, None] * z
    return (log_likelihood(a, y[:, None], likelihood, noise_std) * w).sum()


def kl_to_prior(mean: Tensor, cov: Tensor, prior_precision: float) -> Tensor:
    """``KL(N(mean, cov) ‖ N(0, α⁻¹I))``."""
    d = mean.shape[0]
    alpha = prior_precision
    return 0.5 * (
        alpha * torch.trace(cov) + alpha * mean @ mean - d - torch.logdet(cov) - d * math.log(alpha)
    )


def elbo(
    mean: Tensor,
    cov: Tensor,
    x: Tensor,
    y: Tensor,
    prior_precision: float,
    likelihood: str = "logistic",
    n_quad: int = 32,
    noise_std: float = 1.0,
) -> Tensor:
    """The evidence lower bound of ``q = N(mean, cov)``."""
    ell = expected_log_likelihood(mean, cov, x, y, likelihood, n_quad, noise_std)
    return ell - kl_to_prior(mean, cov, prior_precision)


def elbo_gradients(
    mean: Tensor, cov: Tensor, objective: Callable[[Tensor, Tensor], Tensor]
) -> tuple[Tensor, Tensor, float]:
    """``(∇_m, ∇_S, value)`` of ``objective(mean, cov)``; ``∇_S`` is symmetrised."""
    m = mean.detach().requires_grad_(True)
    s = cov.detach().requires_grad_(True)
    with torch.enable_grad():
        value = objective(m, s)
        gm, gs = torch.autograd.grad(value, (m, s))
    return gm, 0.5 * (gs + gs.T), float(value.detach())


def _objective(x, y, prior_precision, likelihood, n_quad, noise_std):
    def f(m: Tensor, s: Tensor) -> Tensor:
        return elbo(m, s, x, y, prior_precision, likelihood, n_quad, noise_std)

    return f


def ngvi(
    x: Tensor,
    y: Tensor,
    prior_precision: float = 1.0,
    likelihood: str = "logistic",
    *,
    lr: float = 1.0,
    n_iter: int = 50,
    n_quad: int = 32,
    noise_std: float = 1.0,
    init_mean: Tensor | None = None,
    init_cov: Tensor | None = None,
) -> VIResult:
    """Natural-gradient VI (see the module docstring); ``lr`` in ``(0, 1]`` keeps ``S ≻ 0`` for
    log-concave likelihoods."""
    _check(likelihood)
    if not 0 < lr <= 1:
        raise ValueError(f"lr must be in (0, 1], got {lr}")
    d = x.shape[1]
    mean = torch.zeros(d, dtype=x.dtype) if init_mean is None else init_mean.clone()
    cov = torch.eye(d, dtype=x.dtype) / prior_precision if init_cov is None else init_cov.clone()
    f = _objective(x, y, prior_precision, likelihood, n_quad, noise_std)
    res = VIResult(mean, cov, [mean.clone()], [float(f(mean, cov))])
    for _ in range(n_iter):
        gm, gs, _ = elbo_gradients(mean, cov, f)
        prec = torch.linalg.inv(cov) - 2 * lr * gs
        prec = 0.5 * (prec + prec.T)
        cov = torch.linalg.inv(prec)
        cov = 0.5 * (cov + cov.T)
        mean = mean + lr * cov @ gm
        res.means.append(mean.clone())
        res.elbos.append(float(f(mean, cov)))
    res.mean, res.cov = mean, cov
    return res


def gradient_ascent_vi(
    x: Tensor,
    y: Tensor,
    prior_precision: float = 1.0,
    likelihood: str = "logistic",
    *,
    lr: float = 1e-2,
    n_iter: int = 1000,
    n_quad: int = 32,
    noise_std: float = 1.0,
    init_mean: Tensor | None = None,
    init_cov: Tensor | None = None,
) -> VIResult:
    """Plain gradient ascent on the same ELBO in ``(m, L)``, ``S = LLᵀ`` (``L`` lower
    triangular, initialised by the Cholesky factor of ``init_cov``)."""
    _check(likelihood)
    d = x.shape[1]
    mean = torch.zeros(d, dtype=x.dtype) if init_mean is None else init_mean.clone()
    cov0 = torch.eye(d, dtype=x.dtype) / prior_precision if init_cov is None else init_cov
    chol = torch.linalg.cholesky(cov0)
    mask = torch.tril(torch.ones(d, d, dtype=torch.bool))
    f = _objective(x, y, prior_precision, likelihood, n_quad, noise_std)
    res = VIResult(mean, cov0.clone(), [mean.clone()], [float(f(mean, cov0))])
    for _ in range(n_iter):
        m = mean.detach().requires_grad_(True)
        lo = chol.detach().requires_grad_(True)
        with torch.enable_grad():
            lt = torch.where(mask, lo, torch.zeros_like(lo))
            value = f(m, lt @ lt.T)
            gm, gl = torch.autograd.grad(value, (m, lo))
        mean = mean + lr * gm
        chol = torch.where(mask, chol + lr * gl, torch.zeros_like(chol))
        cov = chol @ chol.T
        res.means.append(mean.clone())
        value_new = float(f(mean, cov))
        res.elbos.append(value_new)
        if not math.isfinite(value_new):
            break
    res.mean, res.cov = mean, chol @ chol.T
    return res


def log_joint(
    w: Tensor, x: Tensor, y: Tensor, prior_precision: float, likelihood: str, noise_std: float = 1.0
) -> Tensor:
    """``log p(y | w) + log p(w)`` up to a constant, for one ``w`` or a batch ``(B, d)``."""
    a = w @ x.T
    ll = log_likelihood(a, y, likelihood, noise_std).sum(-1)
    return ll - 0.5 * prior_precision * (w * w).sum(-1)


def laplace(
    x: Tensor,
    y: Tensor,
    prior_precision: float = 1.0,
    likelihood: str = "logistic",
    noise_std: float = 1.0,
    n_iter: int = 100,
    tol: float = 1e-12,
) -> tuple[Tensor, Tensor]:
    """MAP by Newton's method and the Laplace covariance ``(-∇² log joint)⁻¹`` at it."""
    d = x.shape[1]
    w = torch.zeros(d, dtype=x.dtype)

    def f(v):
        return log_joint(v, x, y, prior_precision, likelihood, noise_std)

    for _ in range(n_iter):
        g = torch.autograd.functional.jacobian(f, w)
        h = torch.autograd.functional.hessian(f, w)
        w = w - torch.linalg.solve(h, g)
        if float(g.norm()) < tol:
            break
    h = torch.autograd.functional.hessian(f, w)
    return w, torch.linalg.inv(-h)


def linear_gaussian_posterior(
    x: Tensor, y: Tensor, prior_precision: float = 1.0, noise_std: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The exact posterior of Bayesian linear regression: ``S = (αI + XᵀX/σ²)⁻¹``,
    ``m = S Xᵀy / σ²``."""
    d = x.shape[1]
    prec = prior_precision * torch.eye(d, dtype=x.dtype) + x.T @ x / noise_std**2
    cov = torch.linalg.inv(prec)
    return cov @ x.T @ y / noise_std**2, cov


def hmc(
    x: Tensor,
    y: Tensor,
    prior_precision: float = 1.0,
    likelihood: str = "logistic",
    *,
    n_samples: int = 20000,
    burn_in: int = 2000,
    step_size: float = 0.1,
    n_leapfrog: int = 20,
    n_chains: int = 8,
    seed: int = 0,
    init: Tensor | None = None,
    noise_std: float = 1.0,
) -> tuple[Tensor, float]:
    """Hamiltonian Monte Carlo with a fixed step size, ``n_chains`` chains run in parallel.

    Returns ``(samples (n_chains·n_samples, d), acceptance rate)``; each step jitters the step
    size uniformly in ``[0.8, 1.2]·step_size`` to avoid periodic orbits.
    """
    gen = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    w = (
        torch.zeros(n_chains, d, dtype=x.dtype)
        if init is None
        else init.expand(n_chains, d).clone()
    )

    def logp_and_grad(v: Tensor) -> tuple[Tensor, Tensor]:
        # closed-form gradient of the log joint (cheaper than autograd in the inner loop)
        a = v @ x.T
        logistic = likelihood == "logistic"
        resid = y - torch.sigmoid(a) if logistic else (y - a) / noise_std**2
        lp = log_joint(v, x, y, prior_precision, likelihood, noise_std)
        return lp, resid @ x - prior_precision * v

    lp, g = logp_and_grad(w)
    out, accepted, total = [], 0, 0
    for it in range(burn_in + n_samples):
        eps = step_size * (0.8 + 0.4 * torch.rand((), generator=gen, dtype=x.dtype))
        p0 = torch.randn(n_chains, d, generator=gen, dtype=x.dtype)
        wn, pn, gn = w, p0 + 0.5 * eps * g, g
        for k in range(n_leapfrog):
            wn = wn + eps * pn
            lpn, gn = logp_and_grad(wn)
            if k < n_leapfrog - 1:
                pn = pn + eps * gn
        pn = pn + 0.5 * eps * gn
        log_accept = (lpn - 0.5 * (pn * pn).sum(-1)) - (lp - 0.5 * (p0 * p0).sum(-1))
        acc = torch.rand(n_chains, generator=gen, dtype=x.dtype).log() < log_accept
        w = torch.where(acc[:, None], wn, w)
        lp = torch.where(acc, lpn, lp)
        g = torch.where(acc[:, None], gn, g)
        if it >= burn_in:
            out.append(w.clone())
            accepted += int(acc.sum())
            total += n_chains
    return torch.cat(out, 0), accepted / max(total, 1)
