"""Small helpers shared by the ``scripts/supervised_*.py`` examples: CSV, figures, tables."""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn

#: where the outputs go by default: outside the repository, so that trying a script does not
#: overwrite the committed results (regenerate those with ``--out docs/supervised``)
DEFAULT_OUT = Path(tempfile.gettempdir()) / "npg" / "supervised"
OUT_DIR = DEFAULT_OUT


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the script's docstring as help and the common ``--out``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"folder for the CSVs and figures (default: {DEFAULT_OUT}; the committed results: "
        "docs/supervised)",
    )
    return p


def setup(out: Path = DEFAULT_OUT) -> None:
    """One thread (shared machine); outputs go to ``out`` (created)."""
    global OUT_DIR
    torch.set_num_threads(1)
    OUT_DIR = Path(out)
    os.makedirs(OUT_DIR, exist_ok=True)


def write_csv(name: str, rows: Sequence[dict]) -> Path:
    """Write ``rows`` (dicts with the same keys, in order of the first) to the output folder."""
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
    """One figure of labelled ``(x, y)`` curves saved as ``<output folder>/<name>``."""
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
