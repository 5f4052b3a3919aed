"""Exact, Monte-Carlo, empirical and diagonal Fishers against brute-force dense references.

References (``tests/conftest.py``): per-sample Jacobians from ``torch.autograd.functional``,
hand-written output Fishers, and per-sample gradients of ``torch.distributions`` log-likelihoods
in a python loop of ``autograd.grad``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import (
    ARCHS,
    FAMILY_IDS,
    assert_close,
    dense_fisher,
    dense_outer,
    make_case,
    torch_sample,
)
from torch import Tensor, nn

from npg import make_fisher
from npg.families import Categorical, GaussianRegression
from npg.fisher import DiagonalFisher, EmpiricalFisher, ExactFisher, MCFisher
from npg.fisher._per_sample import output_scores, sampled_labels, sampled_scores

pytestmark = pytest.mark.usefixtures("float64")

CASES = list(itertools.product(ARCHS, FAMILY_IDS))


def _check_operator(op, dense_ref: Tensor) -> None:
    """Products with vectors and matrices, ``to_dense`` and ``diagonal`` all match ``dense_ref``."""
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1))
    assert_close(op.to_dense(), dense_ref)
    assert_close(op.mv(v), dense_ref @ v)
    assert_close(op @ v, dense_ref @ v)
    m = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(2))
    assert_close(op.mv(m), dense_ref @ m)
    assert_close(op.diagonal(), torch.diagonal(dense_ref))
    per_param = op.mv_params(op.fmodel.unflatten(v))
    assert_close(torch.cat([t.reshape(-1) for t in per_param]), dense_ref @ v)


@pytest.mark.parametrize(("arch", "fid"), CASES)
def test_exact_matches_bruteforce(arch: str, fid: str) -> None:
    model, x, family = make_case(arch, fid)
    ref = dense_fisher(model, x, family)
    assert torch.linalg.matrix_rank(ref) > 1  # a non-trivial reference
    _check_operator(make_fisher("exact", model, x, family), ref)
    diag = make_fisher("diagonal", model, x, family, diagonal="exact")
    _check_operator(diag, torch.diag(torch.diagonal(ref)))


@pytest.mark.parametrize(("arch", "fid"), CASES)
def test_empirical_matches_loop_of_autograd_grad(arch: str, fid: str) -> None:
    model, x, family = make_case(arch, fid)
    y = torch_sample(family, model(x), seed=3)
    ref = dense_outer(model, x, family, [y])
    _check_operator(make_fisher("empirical", model, x, family, targets=y), ref)
    diag = make_fisher("diagonal", model, x, family, targets=y, diagonal="empirical")
    _check_operator(diag, torch.diag(torch.diagonal(ref)))


def _mc_labels(family, out: Tensor, n_samples: int, seed: int) -> list[Tensor]:
    """The labels MCFisher draws: one draw on the batch repeated ``n_samples`` times from a
    seeded generator; draw ``s`` of sample ``i`` is row ``s·N + i``."""
    draws = sampled_labels(family, out, n_samples, torch.Generator().manual_seed(seed))
    return list(draws.split(out.shape[0]))


@pytest.mark.parametrize(("arch", "fid"), CASES)
def test_mc_matches_loop_of_autograd_grad(arch: str, fid: str) -> None:
    model, x, family = make_case(arch, fid)
    ys = _mc_labels(family, model(x), 3, seed=11)
    ref = dense_outer(model, x, family, ys)
    _check_operator(make_fisher("mc", model, x, family, n_samples=3, seed=11), ref)
    diag = make_fisher("diagonal", model, x, family, n_samples=3, seed=11, diagonal="mc")
    _check_operator(diag, torch.diag(torch.diagonal(ref)))


@pytest.mark.parametrize("fid", ["categorical", "gauss_free_std", "multi"])
def test_mc_converges_to_exact_like_one_over_sqrt_samples(fid: str) -> None:
    """The MC Fisher is unbiased with i.i.d. labels, so its mean squared Frobenius error is
    ``V/S``: the root-mean-square relative error over seeds shrinks like ``1/√S``."""
    model, x, family = make_case("mlp_tanh", fid, n=4)
    exact = dense_fisher(model, x, family)
    rms = {}
    for s in (4, 64, 1024):
        errs = [
            torch.linalg.norm(MCFisher(model, x, family, s, seed).to_dense() - exact)
            / torch.linalg.norm(exact)
            for seed in range(16)
        ]
        rms[s] = float(torch.stack(errs).pow(2).mean().sqrt())
    # 16x more samples should cut the error by 4x and 256x by 16x; the bands allow for the
    # noise of 16 seeds (Gaussian scores are heavy-tailed)
    for small, big in ((4, 64), (64, 1024)):
        assert 2.5 < rms[small] / rms[big] < 6.5, rms
    assert 10.0 < rms[4] / rms[1024] < 26.0, rms
    assert rms[1024] < 0.1


def test_exact_fisher_is_not_the_empirical_fisher_off_the_fit() -> None:
    model, x, family = make_case("mlp_tanh", "categorical", n=6)
    y = torch.zeros(6, dtype=torch.long)  # labels the model does not predict
    exact = ExactFisher(model, x, family).to_dense()
    emp = EmpiricalFisher(model, x, family, y).to_dense()
    assert torch.linalg.norm(exact - emp) > 0.1 * torch.linalg.norm(exact)


def test_pitfall_outer_product_of_mean_gradient_is_not_the_empirical_fisher() -> None:
    """``ḡ ḡᵀ`` (batch-mean gradient) has rank one; the empirical Fisher ``(1/N) Σ g_i g_iᵀ`` is
    built from per-sample gradients and has rank ``min(N, dim)``; they differ numerically."""
    model, x, family = make_case("mlp_relu", "categorical", n=6)
    y = torch_sample(family, model(x), seed=0)
    params = list(model.parameters())
    loss = torch_log_prob_mean(family, model(x), y)
    g_mean = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
    wrong = torch.outer(g_mean, g_mean)
    emp = EmpiricalFisher(model, x, family, y).to_dense()
    assert torch.linalg.matrix_rank(wrong) == 1
    assert torch.linalg.matrix_rank(emp) == 6
    assert torch.linalg.norm(emp - wrong) > 0.5 * torch.linalg.norm(emp)
    # the empirical Fisher dominates the outer product of the mean (variance is PSD) ...
    assert torch.linalg.eigvalsh(emp - wrong).min() > -1e-12
    # ... and differs from it by exactly the per-sample gradient covariance
    per = torch.stack(
        [
            torch.cat(
                [
                    t.reshape(-1)
                    for t in torch.autograd.grad(
                        torch_log_prob_mean(family, model(x[i : i + 1]), y[i : i + 1]), params
                    )
                ]
            )
            for i in range(6)
        ]
    )
    cov = (per - g_mean).T @ (per - g_mean) / 6
    assert_close(emp - wrong, cov)


def torch_log_prob_mean(family, out: Tensor, y: Tensor) -> Tensor:
    from conftest import torch_log_prob

    return torch_log_prob(family, out, y).mean()


@pytest.mark.parametrize("flavour", ["exact", "mc", "empirical", "diagonal"])
def test_parameter_subset_is_the_sub_block(flavour: str) -> None:
    model, x, family = make_case("mlp_tanh", "gauss_free_std")
    names = [n for n, _ in model.named_parameters()]
    chosen = ["body.2.weight", "log_std", "body.0.bias"]
    idx, start = [], 0
    for n, p in model.named_parameters():
        if n in chosen:
            idx.extend(range(start, start + p.numel()))
        start += p.numel()
    idx = torch.tensor(idx)
    y = torch_sample(family, model(x), seed=1)
    kw = dict(targets=y, n_samples=2, seed=4, diagonal="mc")
    full = make_fisher(flavour, model, x, family, **kw).to_dense()
    sub_block = full[idx][:, idx]
    by_name = make_fisher(flavour, model, x, family, params=chosen, **kw)
    assert by_name.fmodel.names == [n for n in names if n in chosen]
    assert_close(by_name.to_dense(), sub_block)
    params = dict(model.named_parameters())
    by_tensor = make_fisher(flavour, model, x, family, params=[params[n] for n in chosen], **kw)
    assert_close(by_tensor.to_dense(), sub_block)
    by_pred = make_fisher(flavour, model, x, family, params=lambda n, p: n in chosen, **kw)
    assert_close(by_pred.to_dense(), sub_block)
    if flavour == "exact":
        assert_close(by_name.to_dense(), dense_fisher(model, x, family, by_name.fmodel.names))


def test_function_model_path() -> None:
    """A ``fn(param_dict, x)`` model gives the same Fishers as the equivalent module."""
    model, x, family = make_case("mlp_tanh", "categorical")
    pd = {n: p.detach().clone() for n, p in model.named_parameters()}

    def fn(p: dict[str, Tensor], inp: Tensor) -> Tensor:
        h = torch.tanh(inp @ p["0.weight"].T + p["0.bias"])
        h = torch.tanh(h @ p["2.weight"].T + p["2.bias"])
        return h @ p["4.weight"].T + p["4.bias"]

    y = torch_sample(family, model(x), seed=2)
    for flavour in ("exact", "mc", "empirical", "diagonal"):
        kw = dict(targets=y, n_samples=2, seed=3)
        ref = make_fisher(flavour, model, x, family, **kw).to_dense()
        got = make_fisher(flavour, fn, x, family, param_dict=pd, **kw).to_dense()
        assert_close(got, ref)
    sub = make_fisher("exact", fn, x, family, param_dict=pd, params=["2.weight", "4.bias"])
    assert_close(sub.to_dense(), dense_fisher(model, x, family, ["2.weight", "4.bias"]))
    with pytest.raises(TypeError):
        ExactFisher(fn, x, family)


def test_tuple_inputs_and_frozen_parameters() -> None:
    """Tuple inputs reach the model unpacked; parameters with ``requires_grad=False`` are left
    out of the default selection but still used in the forward pass."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(2, 3)

        def forward(self, u: Tensor, w: Tensor) -> Tensor:
            return self.a(u) + self.b(w)

    torch.manual_seed(0)
    model = Two()
    model.b.weight.requires_grad_(False)
    u, w = torch.randn(5, 3), torch.randn(5, 2)
    op = ExactFisher(model, (u, w), Categorical())
    assert op.fmodel.names == ["a.weight", "a.bias", "b.bias"]
    # independent reference: concatenating inputs makes it one linear layer [a.W | b.W]
    lin = nn.Linear(5, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.cat([model.a.weight, model.b.weight], 1))
        lin.bias.copy_(model.a.bias + model.b.bias)
    ref = dense_fisher(lin, torch.cat([u, w], 1), Categorical())  # over [W (3x5), bias]
    w_idx = torch.arange(15).reshape(3, 5)[:, :3].reshape(-1)
    got = op.to_dense()
    assert_close(got[:9, :9], ref[w_idx][:, w_idx])
    assert_close(got[9:12, 9:12], ref[15:, 15:])
    assert_close(got[12:, 12:], ref[15:, 15:])


def test_errors() -> None:
    model, x, family = make_case("linear", "regression")
    with pytest.raises(ValueError):
        make_fisher("nope", model, x, family)
    with pytest.raises(ValueError):
        make_fisher("empirical", model, x, family)
    with pytest.raises(ValueError):
        make_fisher("exact", model, x[:0], family)
    with pytest.raises(ValueError):
        make_fisher("exact", model, x, family, params=["missing"])
    with pytest.raises(ValueError):
        MCFisher(model, x, family, n_samples=0)
    with pytest.raises(ValueError):
        DiagonalFisher(model, x, family, "nope")
    op = make_fisher("exact", model, x, GaussianRegression(1.0))
    with pytest.raises(ValueError):
        op.mv(torch.zeros(op.dim + 1))


@pytest.mark.parametrize("flavour", ["exact", "mc", "empirical", "diagonal", "kfac"])
def test_operator_is_a_snapshot_of_the_parameters(flavour: str) -> None:
    """Updating the parameters in place after building (a line search does) neither breaks the
    operator nor changes it: it stays the Fisher at construction time."""
    model, x, family = make_case("mlp_tanh", "categorical")
    y = torch_sample(family, model(x), seed=1)
    op = make_fisher(flavour, model, x, family, targets=y, n_samples=2)
    before = op.to_dense()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5).add_(0.1)
    assert_close(op.to_dense(), before)
    with torch.no_grad():  # back to the construction-time parameters
        for p in model.parameters():
            p.sub_(0.1).div_(1.5)
    if flavour == "exact":
        assert_close(before, dense_fisher(model, x, family))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mc_labels_follow_the_model_and_match_their_scores(dtype: torch.dtype) -> None:
    """The MC Fishers' Categorical labels (inverse-CDF draws) have the model's class
    frequencies (every class within 5 standard errors over 100 000 draws per row), never a
    class of probability zero (first and last class here), and the scores the operators use
    are those of the same draws."""
    family = Categorical()
    inf = float("inf")
    out = torch.tensor(
        [[2.0, -1.0, 0.5, -30.0], [0.0, 0.0, 0.0, 0.0], [-inf, 1.0, 0.0, -inf]], dtype=dtype
    )
    draws = sampled_labels(family, out, 100_000, torch.Generator().manual_seed(4)).view(-1, 3)
    p = torch.softmax(out.double(), -1)
    for i in range(3):
        freq = torch.bincount(draws[:, i], minlength=4).double() / 100_000
        se = (p[i] * (1 - p[i]) / 100_000).sqrt()
        assert bool(((freq - p[i]).abs() <= 5 * se + 1e-12).all()), (freq, p[i])
    assert not bool((draws[:, 2] == 0).any() or (draws[:, 2] == 3).any())
    scores = sampled_scores(family, out, 3, torch.Generator().manual_seed(9))
    labels = sampled_labels(family, out, 3, torch.Generator().manual_seed(9))
    ref = output_scores(family, out.repeat(3, 1), labels).view(3, 3, 4).transpose(0, 1)
    assert torch.equal(scores, ref)
