"""Least squares: the Gauss-Newton matrix of the MSE loss is the Fisher of a Gaussian.

For ``L = (1/(N·K)) Σ_ik (y_ik - f_k(x_i))²`` the generalized Gauss-Newton matrix is
``(2/(N·K)) Σ_i J_iᵀ J_i`` and the mean Fisher of ``N(f(x), σ²I)`` is ``(1/(N·σ²)) Σ_i J_iᵀ J_i``,
so ``GGN = (2σ²/K) · F_σ``; NGD's inferred family has ``σ² = K/2`` and constant 1. The GGN is
built here independently: the autograd Hessian of the loss for a linear model (where the GGN is
the Hessian) and ``J ᵀJ`` from explicit Jacobians for an MLP. Then Gauss-Newton (NGD with the
exact Fisher) is compared with gradient descent. Writes lstsq_*.{csv,png} into --out (the
committed ones: ``--out docs/supervised``).

    .venv/bin/python scripts/supervised_lstsq.py --out docs/supervised
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.func import functional_call

from npg.families import GaussianRegression
from npg.fisher import ExactFisher
from npg.optim import NGD
from scripts._supervised_common import (
    keep_step,
    make_closure,
    parser,
    plot_curves,
    print_table,
    setup,
    write_csv,
)

N, D_IN, K = 60, 5, 3


def flat_loss(model: nn.Module, loss_fn, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [s.numel() for s in shapes]

    def f(theta):
        params = {
            n: c.reshape(s) for n, c, s in zip(names, theta.split(sizes), shapes, strict=True)
        }
        return loss_fn(functional_call(model, params, (x,)), y)

    def out(theta):
        params = {
            n: c.reshape(s) for n, c, s in zip(names, theta.split(sizes), shapes, strict=True)
        }
        return functional_call(model, params, (x,))

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return f, out, theta


def make_models():
    torch.manual_seed(0)
    linear = nn.Linear(D_IN, K)
    mlp = nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, K))
    return {"linear": linear, "mlp": mlp}


def make_data(kind: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D_IN, generator=g) * torch.tensor([3.0, 1.0, 1.0, 0.3, 0.1])
    if kind == "linear":
        w = torch.randn(D_IN, K, generator=g)
        y = x @ w + 0.1 * torch.randn(N, K, generator=g)
    else:
        torch.manual_seed(5)
        teacher = nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, K))
        with torch.no_grad():
            y = teacher(x) + 0.05 * torch.randn(N, K, generator=g)
    return x, y


def curvature_checks() -> list[dict]:
    rows = []
    loss_fn = nn.MSELoss()
    for kind, model in make_models().items():
        x, y = make_data(kind)
        f, out, theta = flat_loss(model, loss_fn, x, y)
        hess = torch.autograd.functional.hessian(f, theta)
        jac = torch.autograd.functional.jacobian(out, theta).reshape(N * K, -1)  # (N·K, P)
        ggn = 2.0 / (N * K) * jac.T @ jac
        sigma = math.sqrt(K / 2)
        fisher_inferred = ExactFisher(model, x, GaussianRegression(sigma)).to_dense()
        fisher_unit = ExactFisher(model, x, GaussianRegression(1.0)).to_dense()
        ref = hess if kind == "linear" else ggn
        ref_name = "autograd Hessian of the MSE" if kind == "linear" else "(2/NK) JᵀJ"
        rows.append(
            dict(
                model=kind,
                reference=ref_name,
                params=theta.numel(),
                max_abs_ggn=float(ref.abs().max()),
                diff_inferred_sigma=float((fisher_inferred - ref).abs().max()),
                diff_unit_sigma_times_2_over_K=float((2.0 / K * fisher_unit - ref).abs().max()),
                diff_hessian_vs_ggn=float((hess - ggn).abs().max()),
            )
        )
    return rows


def gd_run(kind: str, lr: float, steps: int, l_star: float | None):
    model = make_models()[kind]
    x, y = make_data(kind)
    loss_fn = nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, times, t0 = [], [], time.perf_counter()
    for _ in range(steps + 1):
        with torch.no_grad():
            losses.append(float(loss_fn(model(x), y)))
        times.append(time.perf_counter() - t0)
        if not math.isfinite(losses[-1]) or losses[-1] > 1e6:
            break
        opt.step(make_closure(opt, model, loss_fn, x, y))
    return losses, times


def ngd_run(kind: str, steps: int, **kw):
    model = make_models()[kind]
    x, y = make_data(kind)
    loss_fn = nn.MSELoss()
    opt = NGD(
        model.parameters(),
        model=model,
        loss_fn=loss_fn,
        fisher="exact",
        cg_iters=200,
        **{"max_kl": None, **kw},
    )
    losses, times, t0 = [], [], time.perf_counter()
    for _ in range(steps + 1):
        with torch.no_grad():
            losses.append(float(loss_fn(model(x), y)))
        times.append(time.perf_counter() - t0)
        opt.step(make_closure(opt, model, loss_fn, x, y), inputs=x, targets=y)
    return losses, times


def first_below(losses, target):
    return next((k for k, v in enumerate(losses) if v <= target), None)


def main(argv: list[str] | None = None) -> None:
    setup(parser(__doc__).parse_args(argv).out)
    torch.set_default_dtype(torch.float64)
    checks = curvature_checks()
    print("GGN of the MSE loss vs the exact Fisher operator (dense), max abs differences:")
    print_table(
        checks,
        [
            "model",
            "reference",
            "params",
            "max_abs_ggn",
            "diff_inferred_sigma",
            "diff_unit_sigma_times_2_over_K",
            "diff_hessian_vs_ggn",
        ],
        {
            "max_abs_ggn": "{:.3g}",
            "diff_inferred_sigma": "{:.1e}",
            "diff_unit_sigma_times_2_over_K": "{:.1e}",
            "diff_hessian_vs_ggn": "{:.1e}",
        },
    )
    write_csv("lstsq_curvature_check.csv", checks)

    # --- convergence ---------------------------------------------------------------------------
    x, y = make_data("linear")
    xa = torch.cat([x, torch.ones(N, 1)], 1)
    sol = torch.linalg.lstsq(xa, y).solution
    l_star_lin = float(((xa @ sol - y) ** 2).mean())
    targets = {"linear": (l_star_lin, 1e-10)}
    conv_rows, curves_csv = [], []
    steps = {"linear": 20000, "mlp": 20000}
    for kind in ("linear", "mlp"):
        if kind == "linear":
            ngd_l, ngd_t = ngd_run(kind, 5, lr=1.0, damping=0.0)
            l_star, tol = targets[kind]
        else:
            ngd_l, ngd_t = ngd_run(kind, 300, lr=1.0, damping=1e-3, adaptive_damping=True)
            l_star, tol = min(ngd_l), 1e-6  # gap to the best loss Gauss-Newton found
        best = None
        for lr in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0):
            losses, times = gd_run(kind, lr, steps[kind], l_star)
            reach = first_below(losses, l_star + tol * max(1.0, l_star))
            key = (0, reach) if reach is not None else (1, min(losses))
            if best is None or key < best[0]:
                best = (key, lr, losses, times, reach)
        _, gd_lr, gd_l, gd_t, gd_reach = best
        target = l_star + tol * max(1.0, l_star)
        ngd_reach = first_below(ngd_l, target)
        conv_rows += [
            dict(
                model=kind,
                optimizer="Gauss-Newton (NGD exact, lr=1)",
                target=f"L - L* <= {tol:g}",
                steps_to_target=ngd_reach,
                final_loss=ngd_l[-1],
            ),
            dict(
                model=kind,
                optimizer=f"GD best fixed lr={gd_lr}",
                target=f"L - L* <= {tol:g}",
                steps_to_target=gd_reach if gd_reach is not None else f"> {steps[kind]}",
                final_loss=gd_l[-1],
            ),
        ]
        curves_csv += [
            dict(model=kind, optimizer="NGD", step=k, time=t, loss=v)
            for k, (v, t) in enumerate(zip(ngd_l, ngd_t, strict=True))
        ]
        curves_csv += [
            dict(model=kind, optimizer=f"GD lr={gd_lr}", step=k, time=t, loss=v)
            for k, (v, t) in enumerate(zip(gd_l, gd_t, strict=True))
            if keep_step(k, len(gd_l) - 1)
        ]
        gap = lambda ls, ref=l_star: [max(v - ref, 1e-16) for v in ls]  # noqa: E731
        ngd_x = list(range(len(ngd_l)))
        plot_curves(
            f"lstsq_{kind}_loss_vs_step.png",
            {
                "Gauss-Newton / NGD": ([k + 1 for k in ngd_x], gap(ngd_l)),
                f"GD lr={gd_lr}": (list(range(1, len(gd_l) + 1)), gap(gd_l)),
            },
            "step + 1",
            "L - L*",
            f"Least squares, {kind} model",
            logy=True,
            logx=True,
        )
        plot_curves(
            f"lstsq_{kind}_loss_vs_time.png",
            {"Gauss-Newton / NGD": (ngd_t, gap(ngd_l)), f"GD lr={gd_lr}": (gd_t, gap(gd_l))},
            "wall-clock (s)",
            "L - L*",
            f"Least squares, {kind} model",
            logy=True,
        )
    print("\nConvergence (linear: L* from torch.linalg.lstsq; MLP: L* = best Gauss-Newton loss):")
    print_table(
        conv_rows,
        ["model", "optimizer", "target", "steps_to_target", "final_loss"],
        {"final_loss": "{:.6e}"},
    )
    write_csv("lstsq_convergence.csv", conv_rows)
    write_csv("lstsq_curves.csv", curves_csv)


if __name__ == "__main__":
    main()
