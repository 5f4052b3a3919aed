"""Property test (issue 6.7): on random small MLPs, batch sizes and families every Fisher operator
is symmetric and PSD, and CG's answer satisfies the residual it reports."""

from __future__ import annotations

import os

import torch
from conftest import FreeLogStd, make_family, torch_sample
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from npg import fisher_names, make_fisher


@st.composite
def cases(draw):
    """A random MLP (0-2 hidden layers of width 1-5, tanh or relu), batch, family and Fisher."""
    in_dim = draw(st.integers(1, 4))
    hidden = draw(st.lists(st.integers(1, 5), max_size=2))
    act = draw(st.sampled_from([nn.Tanh, nn.ReLU]))
    fid = draw(
        st.sampled_from(
            ["categorical", "bernoulli", "gauss_free_std", "gauss_out_std", "regression", "multi"]
        )
    )
    return dict(
        in_dim=in_dim,
        hidden=hidden,
        act=act,
        fid=fid,
        n=draw(st.integers(1, 6)),
        flavour=draw(st.sampled_from(fisher_names())),
        seed=draw(st.integers(0, 2**16)),
        damping=draw(st.sampled_from([0.0, 1e-3, 0.1])),
        cg_iters=draw(st.integers(1, 30)),
    )


# NPG_HYPOTHESIS_EXAMPLES=400 for a longer search than the default suite's 25 examples
@settings(max_examples=int(os.environ.get("NPG_HYPOTHESIS_EXAMPLES", "25")), deadline=None)
@given(case=cases())
def test_fisher_is_symmetric_psd_and_cg_reports_its_residual(case: dict) -> None:
    torch.manual_seed(case["seed"])
    family, k, free_std = make_family(case["fid"])
    widths = [case["in_dim"], *case["hidden"]]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), case["act"]()]
    body = nn.Sequential(*layers, nn.Linear(widths[-1], k))
    model = (FreeLogStd(body, k) if free_std else body).double()
    x = torch.randn(case["n"], case["in_dim"], dtype=torch.float64)
    y = torch_sample(family, model(x), case["seed"])
    op = make_fisher(case["flavour"], model, x, family, targets=y, n_samples=2, seed=case["seed"])

    dense = op.to_dense()
    scale = max(1.0, float(dense.abs().max()))
    torch.testing.assert_close(dense, dense.T, rtol=0, atol=1e-12 * scale)
    assert float(torch.linalg.eigvalsh(dense).min()) >= -1e-10 * scale
    v = torch.randn(op.dim, 4, dtype=torch.float64)
    fv = op.mv(v)
    torch.testing.assert_close(fv, dense @ v, rtol=1e-9, atol=1e-12 * scale)
    assert bool(((v * fv).sum(0) >= -1e-10 * scale * (v * v).sum(0)).all())

    g = torch.randn(op.dim, dtype=torch.float64)
    lam = case["damping"]
    res = op.cg(g, lam, max_iter=case["cg_iters"], tol=1e-10)
    assert bool(torch.isfinite(res.x).all())
    a = dense + lam * torch.eye(op.dim, dtype=torch.float64)
    g_norm, x_norm = float(torch.linalg.norm(g)), float(torch.linalg.norm(res.x))
    true_res = float(torch.linalg.norm(g - a @ res.x)) / g_norm
    # rounding allowance: undamped singular systems can legitimately give a huge x (components
    # g_i / λ_i along tiny eigenvalues), and products with it lose ~eps·‖A‖·‖x‖ absolutely
    rounding = 1e-12 * scale * x_norm
    assert true_res <= res.residual * (1 + 1e-6) + 1e-9 + rounding / g_norm, (true_res, res)
    xax = float(res.x @ a @ res.x)
    assert abs(res.xAx - xax) <= 1e-8 * max(1.0, abs(xax)) + rounding * x_norm
    if res.converged:
        assert true_res <= 1e-10 + 1e-9
