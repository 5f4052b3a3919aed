"""Small helpers shared by the ``scripts/supervised_*.py`` examples: CSV, figures, tables."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent.parent / "docs" / "supervised"


def setup() -> None:
    """One thread (shared machine), output folder present."""
    torch.set_num_threads(1)
    os.makedirs(OUT_DIR, exist_ok=True)


def write_csv(name: str, rows: Sequence[dict]) -> Path:
    """Write ``rows`` (dicts with the same keys, in order of the first) to ``docs/supervised``."""
    path = OUT_DIR / name
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def keep_step(k: int, last: int) -> bool:
    """Thin long curves for CSV output: every step up to 100, then about 90 per decade."""
    return k <= 100 or k == last or k % (10 ** (len(str(k)) - 2)) == 0


def plot_curves(
    name: str,
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool = False,
    logx: bool = False,
) -> Path:
    """One figure of labelled ``(x, y)`` curves saved as ``docs/supervised/<name>``."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label, lw=1.4)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = OUT_DIR / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(rows: Iterable[dict], columns: Sequence[str], fmt: dict | None = None) -> str:
    """Print (and return) a Markdown table of ``columns`` from ``rows``."""
    fmt = fmt or {}

    def cell(r: dict, c: str) -> str:
        v = r.get(c, "")
        if c in fmt and v != "" and v is not None:
            return fmt[c].format(v)
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    return text


def make_closure(
    opt: torch.optim.Optimizer, model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor
) -> Callable[[], Tensor]:
    """The usual ``zero_grad; loss; backward; return loss`` closure."""

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure
