"""Natural-gradient VI against closed forms, Laplace and HMC on tiny Bayesian GLMs."""

from __future__ import annotations

import math

import pytest
import torch

from npg.vi import (
    elbo,
    elbo_gradients,
    gauss_hermite,
    gradient_ascent_vi,
    hmc,
    laplace,
    linear_gaussian_posterior,
    ngvi,
)

pytestmark = pytest.mark.usefixtures("float64", "one_thread")


def _linear_data(n=30, d=3, noise=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + noise * torch.randn(n, generator=g)
    return x, y


def _logistic_data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(n, 2, generator=g), torch.ones(n, 1)], 1)
    p = torch.sigmoid(x @ torch.tensor([1.5, -1.0, 0.3]))
    return x, (torch.rand(n, generator=g) < p).double()


def test_gauss_hermite_moments():
    z, w = gauss_hermite(10)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-14)
    assert float((w * z**2).sum()) == pytest.approx(1.0, abs=1e-13)
    assert float((w * z**4).sum()) == pytest.approx(3.0, abs=1e-12)


def test_ngvi_is_exact_in_one_step_for_linear_gaussian():
    x, y = _linear_data()
    mean, cov = linear_gaussian_posterior(x, y, prior_precision=2.0, noise_std=0.5)
    res = ngvi(x, y, 2.0, "gaussian", lr=1.0, n_iter=1, noise_std=0.5)
    torch.testing.assert_close(res.mean, mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(res.cov, cov, rtol=0, atol=1e-12)
    # the closed form is a fixed point, and the Laplace approximation coincides with it
    res = ngvi(x, y, 2.0, "gaussian", lr=0.5, n_iter=60, noise_std=0.5)
    torch.testing.assert_close(res.mean, mean, rtol=0, atol=1e-10)
    lap_mean, lap_cov = laplace(x, y, 2.0, "gaussian", noise_std=0.5)
    torch.testing.assert_close(lap_mean, mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(lap_cov, cov, rtol=0, atol=1e-10)


def test_ngvi_reaches_an_elbo_stationary_point_that_gradient_ascent_also_finds():
    x, y = _logistic_data()
    res = ngvi(x, y, 1.0, "logistic", lr=1.0, n_iter=30)
    gm, gs, _ = elbo_gradients(res.mean, res.cov, lambda m, s: elbo(m, s, x, y, 1.0, "logistic"))
    assert float(gm.norm()) < 1e-9 and float(gs.norm()) < 1e-9
    assert all(b >= a - 1e-10 for a, b in zip(res.elbos, res.elbos[1:], strict=False))
    ga = gradient_ascent_vi(x, y, 1.0, "logistic", lr=0.1, n_iter=400)
    torch.testing.assert_close(ga.mean, res.mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(ga.cov, res.cov, rtol=0, atol=1e-6)
    assert ga.elbos[-1] <= res.elbos[-1] + 1e-9


def test_ngvi_close_to_laplace_with_many_observations():
    """With many observations the posterior is nearly Gaussian: VI mean ≈ MAP, cov ≈ Laplace."""
    x, y = _logistic_data(n=2000, seed=1)
    res = ngvi(x, y, 1.0, "logistic", lr=1.0, n_iter=15)
    lap_mean, lap_cov = laplace(x, y, 1.0, "logistic")
    sd = lap_cov.diagonal().sqrt()
    assert float(((res.mean - lap_mean) / sd).abs().max()) < 0.1
    assert float((res.cov.diagonal() / lap_cov.diagonal() - 1).abs().max()) < 0.02


def test_hmc_matches_closed_form_posterior():
    x, y = _linear_data(n=20)
    mean, cov = linear_gaussian_posterior(x, y, 1.0, 0.5)
    samples, acc = hmc(
        x,
        y,
        1.0,
        "gaussian",
        noise_std=0.5,
        n_samples=1500,
        burn_in=200,
        step_size=0.05,
        n_leapfrog=10,
        n_chains=4,
        seed=0,
    )
    assert 0.5 < acc <= 1.0
    se = cov.diagonal().sqrt() / math.sqrt(samples.shape[0] / 5)  # generous autocorrelation
    assert bool(((samples.mean(0) - mean).abs() < 5 * se).all())
    torch.testing.assert_close(torch.cov(samples.T), cov, rtol=0.15, atol=1e-3)


def test_bad_arguments():
    x, y = _logistic_data()
    with pytest.raises(ValueError, match="likelihood"):
        ngvi(x, y, 1.0, "poisson")
    with pytest.raises(ValueError, match="lr"):
        ngvi(x, y, 1.0, "logistic", lr=1.5)
