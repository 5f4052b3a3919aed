"""NGD's defaults on small minibatches: the README's MLP with and without the default KL clip,
a BatchNorm MLP, and KFACPreconditioner behind SGD and Adam.

The README's "Fisher module in ten lines" model (10 -> 32 tanh -> 3, inputs scaled over two
decades, random labels), 256 points, 200 steps on minibatches of 25, seeds 0-4, every flavour:
`NGD(fisher=f)` with its defaults (`lr=1`, `damping=1e-3`, `max_kl=1e-2`) against the same with
`max_kl=None`. Then 100 steps of each flavour's defaults on a 10 -> 32 BatchNorm tanh -> 3 MLP with
learnable labels, and 200 steps of SGD / Adam behind `KFACPreconditioner` on that task without
BatchNorm. Writes `ngd_defaults.csv` (one row per run: initial and final full-batch loss).

    python scripts/supervised_defaults.py --out docs/supervised
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Sequence

import torch
from torch import nn

from npg import KFACPreconditioner, fisher_names
from npg.optim import NGD
from scripts._supervised_common import parser, print_table, setup, write_csv

STEPS, BATCH, SEEDS = 200, 25, range(5)


def readme_data(seed: int, learnable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The README's inputs; random labels, or labels a small MLP can learn."""
    torch.manual_seed(seed)
    x = torch.randn(256, 10) * torch.logspace(-1, 1, 10)
    if learnable:
        return x, (x[:, 0] + x[:, 9] > 0).long() + (x[:, 5] > 1).long()
    return x, torch.randint(0, 3, (256,))


def mlp(seed: int, batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    hidden: list[nn.Module] = [nn.BatchNorm1d(32)] if batch_norm else []
    return nn.Sequential(nn.Linear(10, 32), *hidden, nn.Tanh(), nn.Linear(32, 3))


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    steps: int,
    step: Callable[[torch.Tensor, torch.Tensor, Callable[[], torch.Tensor]], None],
) -> tuple[float, float]:
    """``(initial, final)`` full-batch loss around ``steps`` minibatch steps (``nan`` final if a
    step raised)."""
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        initial = float(loss_fn(model(x), y))
    try:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (BATCH,), generator=gen)
            xb, yb = x[idx], y[idx]

            def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                model.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                return loss

            step(xb, yb, closure)
        with torch.no_grad():
            final = float(loss_fn(model(x), y))
    except ValueError:
        final = math.nan
    return initial, final


def ngd_run(fisher: str, seed: int, batch_norm: bool = False, **options) -> tuple[float, float]:
    model = mlp(seed, batch_norm)
    x, y = readme_data(seed, learnable=batch_norm)
    opt = NGD(
        model.parameters(), model=model, loss_fn=nn.CrossEntropyLoss(), fisher=fisher, **options
    )
    steps = 100 if batch_norm else STEPS
    return train(model, x, y, seed, steps, lambda xb, yb, c: opt.step(c, inputs=xb, targets=yb))


def preconditioned_run(name: str, seed: int, precondition: bool = True) -> tuple[float, float]:
    """SGD (lr 0.3, momentum 0.9) or Adam (lr 1e-2), with or without the preconditioner."""
    model = mlp(seed)
    x, y = readme_data(seed, learnable=True)
    if name == "SGD":
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pre = KFACPreconditioner(model, loss_fn=nn.CrossEntropyLoss(), optimizer=opt)

    def step(xb: torch.Tensor, yb: torch.Tensor, closure: Callable[[], torch.Tensor]) -> None:
        closure()
        if precondition:
            pre.step(xb, yb)
        opt.step()

    return train(model, x, y, seed, STEPS, step)


def span(values: Sequence[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "error"
    text = f"{min(finite):.3g}–{max(finite):.3g}" if len(finite) > 1 else f"{finite[0]:.3g}"
    return text + (f" ({len(values) - len(finite)} raised)" if len(finite) < len(values) else "")


def main(argv: Sequence[str] | None = None) -> None:
    setup(parser(__doc__).parse_args(argv).out)
    rows: list[dict] = []
    cases: list[tuple[str, str, Callable[[int], tuple[float, float]]]] = []
    for f in fisher_names():
        cases.append(
            ("README MLP, random labels", f"NGD {f}, defaults", lambda s, f=f: ngd_run(f, s))
        )
        cases.append(
            (
                "README MLP, random labels",
                f"NGD {f}, max_kl=None",
                lambda s, f=f: ngd_run(f, s, max_kl=None),
            )
        )
    for f in fisher_names():
        cases.append(("BatchNorm MLP", f"NGD {f}, defaults", lambda s, f=f: ngd_run(f, s, True)))
    for name in ("SGD", "Adam"):
        for pre in (False, True):
            config = f"{name} + KFACPreconditioner" if pre else name
            run = functools.partial(preconditioned_run, name, precondition=pre)
            cases.append(("MLP, learnable labels", config, run))
    table: list[dict] = []
    for task, config, run in cases:
        results = [run(s) for s in SEEDS]
        rows += [
            dict(task=task, config=config, seed=s, initial=a, final=b)
            for s, (a, b) in zip(SEEDS, results, strict=True)
        ]
        initial, final = zip(*results, strict=True)
        ok = [b for b in final if math.isfinite(b)]
        median = f"{statistics.median(ok):.3g}" if ok else "-"
        table.append(
            dict(task=task, config=config, initial=span(initial), final=span(final), median=median)
        )
        print(*table[-1].values(), sep=" | ", flush=True)
    write_csv("ngd_defaults.csv", rows)
    print_table(table, ["task", "config", "initial", "final", "median"])


if __name__ == "__main__":
    main()
