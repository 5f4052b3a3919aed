"""The bare K-FAC of ``scripts/bench_kfac_step.py`` takes NGD's steps, so its time is a floor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scripts import bench_kfac_step as bench
from scripts._supervised_common import make_closure


def _train(make_opt, interval: int, steps: int) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    loss_fn = nn.CrossEntropyLoss()
    opt = make_opt(model, loss_fn, interval)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 4, (16,), generator=gen)
        closure = make_closure(opt, model, loss_fn, x, y)
        if isinstance(opt, bench.NGD):
            opt.step(closure, inputs=x, targets=y)
        else:
            opt.step(closure)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("interval", [3, 20])
def test_bare_kfac_takes_ngds_steps(interval: int) -> None:
    """Over several refreshes (factor averages, new inverses, clipped and unclipped steps) the
    parameters of both runs agree to float64 rounding, and they did move."""
    steps = 2 * interval + 5
    start = _train(lambda m, lf, k: bench.BareKFAC(m, k), interval, 0)
    bare = _train(lambda m, lf, k: bench.BareKFAC(m, k), interval, steps)
    ngd = _train(bench.headline_ngd, interval, steps)
    torch.testing.assert_close(bare, ngd, rtol=1e-9, atol=1e-12)
    assert (bare - start).abs().max() > 1e-2
