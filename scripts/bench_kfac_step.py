"""How fast can a K-FAC step be here? A bare K-FAC against NGD's and SGD's steps on digits.

``BareKFAC`` does exactly what the headline K-FAC of ``scripts/supervised_mlp.py`` does (MC
labels, factor decay, factors and π-damped Cholesky inverses refreshed every ``interval`` steps,
``lr = 1`` clipped by ACKTR's damped KL model) for an MLP of biased ``nn.Linear`` layers, and
nothing else: no options, no checks, no diagnostics, two products and one dot product per layer.
``tests/test_bench_kfac_step.py`` checks that its steps equal ``NGD``'s. Its per-step time is
therefore close to the floor of an eager-mode K-FAC step on this machine, and it tells how much
of NGD's cost is its generality and how much is K-FAC's own work.

    .venv/bin/python scripts/bench_kfac_step.py --out docs/supervised  # ~15 s: mlp_bare_kfac.csv
"""

from __future__ import annotations

import math
import statistics

import torch
from torch import Tensor, nn

from npg.fisher._per_sample import _categorical_draws
from npg.fisher.kfac import _spd_inverse
from npg.optim import NGD
from scripts._supervised_common import parser as common_parser
from scripts._supervised_common import print_table, setup, write_csv
from scripts.supervised_mlp import BATCH, load, time_per_step

LAMBDA, MAX_KL, INTERVAL, DECAY = 3e-3, 1e-2, 20, 0.95  # the headline K-FAC's settings


class BareKFAC(torch.optim.Optimizer):
    """K-FAC for an MLP of biased ``nn.Linear`` layers, with the headline's settings only.

    The MC labels of refresh step ``k`` are drawn with seed ``k`` by NGD's own sampler, as
    ``NGD(seed=0)`` draws them; the inverses use NGD's own Cholesky inverse.
    """

    def __init__(self, model: nn.Module, interval: int = INTERVAL) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        params = [t for layer in self.layers for t in (layer.weight, layer.bias)]
        super().__init__(params, {})
        self.model, self.params, self.interval = model, params, interval
        self.k = 0
        self.factors: list[Tensor] | None = None  # running A, G per layer
        self.inverses: list[tuple[Tensor, Tensor]] = []  # (Ĝ⁻¹, Â⁻¹) per layer
        self._batch_factors: list[Tensor] = []

    def _capture(self, module: nn.Module, args: tuple, out: Tensor) -> None:
        """At the model's output: backpropagate the sampled labels' scores to the layer outputs
        through the closure's graph, and form this batch's factors."""
        p = torch.softmax(out.detach(), -1)
        y = _categorical_draws(p, torch.Generator().manual_seed(self.k))
        scores = p.neg().scatter_add_(-1, y.unsqueeze(-1), p.new_ones(y.shape + (1,)))
        grads = torch.autograd.grad(out, [o for _, o in self._io], scores, retain_graph=True)
        n = out.shape[0]
        for (a, _), g in zip(self._io, grads, strict=True):
            a1 = torch.cat((a, a.new_ones(n, 1)), 1)
            self._batch_factors += [torch.mm(a1.T, a1), torch.mm(g.T, g)]
        torch._foreach_div_(self._batch_factors, n)

    def _closure_with_factors(self, closure):
        self._io, self._batch_factors = [], []
        hooks = [
            layer.register_forward_hook(lambda m, a, o: self._io.append((a[0].detach(), o)))
            for layer in self.layers
        ]
        hooks.append(self.model.register_forward_hook(self._capture))
        try:
            with torch.enable_grad():
                return closure()
        finally:
            for h in hooks:
                h.remove()

    def _refresh_inverses(self) -> None:
        gamma = math.sqrt(LAMBDA)
        traces = torch.stack([f.trace() for f in self.factors]).tolist()
        self.inverses = []
        for i in range(0, len(self.factors), 2):
            a, g = self.factors[i], self.factors[i + 1]
            pi = math.sqrt((traces[i] / a.shape[0]) / (traces[i + 1] / g.shape[0]))
            self.inverses.append((_spd_inverse(g, gamma / pi), _spd_inverse(a, pi * gamma)))

    @torch.no_grad()
    def step(self, closure):  # type: ignore[override]
        refresh = self.k % self.interval == 0
        if refresh:
            loss = self._closure_with_factors(closure)
            if self.factors is None:
                self.factors = self._batch_factors
            else:
                torch._foreach_lerp_(self.factors, self._batch_factors, 1 - DECAY)
            self._refresh_inverses()
        else:
            with torch.enable_grad():
                loss = closure()
        self.k += 1
        parts, g_dot_x = [], None
        for layer, (g_inv, a_inv) in zip(self.layers, self.inverses, strict=True):
            m = torch.cat((layer.weight.grad, layer.bias.grad.unsqueeze(1)), 1)
            x = g_inv @ m @ a_inv
            dot = torch.dot(m.view(-1), x.view(-1))
            g_dot_x = dot if g_dot_x is None else g_dot_x + dot
            parts += [x[:, :-1], x[:, -1]]
        kl_quad = float(g_dot_x)  # the damped KL model is ½α²gᵀx
        alpha = min(1.0, math.sqrt(2 * MAX_KL / kl_quad)) if kl_quad > 0 else 1.0
        torch._foreach_add_(self.params, parts, alpha=-alpha)
        return loss


def headline_ngd(model: nn.Module, loss_fn: nn.Module, interval: int = INTERVAL) -> NGD:
    """``NGD`` with the settings ``BareKFAC`` hard-codes."""
    return NGD(
        model.parameters(),
        model=model,
        loss_fn=loss_fn,
        fisher="kfac",
        lr=1.0,
        damping=LAMBDA,
        max_kl=MAX_KL,
        kl_model="damped",
        kfac_labels="mc",
        kfac_decay=DECAY,
        kfac_cov_interval=interval,
        kfac_inv_interval=interval,
    )


def main() -> None:
    parser = common_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=BATCH)
    args = parser.parse_args()
    setup(args.out)
    data = load()
    never = 10**9  # refresh interval that means "after step 0, never"
    configs = {
        "NGD headline K-FAC": lambda m, lf: headline_ngd(m, lf),
        "bare K-FAC": lambda m, lf: BareKFAC(m),
        "NGD headline K-FAC, no refresh after step 0": lambda m, lf: headline_ngd(m, lf, never),
        "bare K-FAC, no refresh after step 0": lambda m, lf: BareKFAC(m, never),
    }
    sgd = lambda m, lf: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)  # noqa: E731
    sgd_times, ratios = [], {name: [] for name in configs}
    for _ in range(args.rounds):  # interleaved, so the median ratio is robust to other jobs
        t_sgd = time_per_step(sgd, data, args.steps, args.batch)
        sgd_times.append(t_sgd)
        for name, make in configs.items():
            ratios[name].append(time_per_step(make, data, args.steps, args.batch) / t_sgd)
    rows = [
        dict(
            batch=args.batch,
            optimizer=name,
            sgd_ms=1e3 * statistics.median(sgd_times),
            ratio=statistics.median(r),
            ratio_min=min(r),
            ratio_max=max(r),
        )
        for name, r in ratios.items()
    ]
    print(
        f"\nPer-step time vs SGD (momentum 0.9) at batch {args.batch}, median of "
        f"{args.rounds} interleaved rounds of {args.steps} steps (refreshes every {INTERVAL}):"
    )
    fmt = {"sgd_ms": "{:.3f}", "ratio": "{:.2f}", "ratio_min": "{:.2f}", "ratio_max": "{:.2f}"}
    print_table(rows, ["batch", "optimizer", "sgd_ms", "ratio", "ratio_min", "ratio_max"], fmt)
    write_csv("mlp_bare_kfac.csv", rows)


if __name__ == "__main__":
    main()
