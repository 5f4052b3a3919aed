"""Learning curves from run directories: mean ± 95% CI over seeds, one curve per group.

    python scripts/plot.py runs/results/trpo_CartPole-v1_s* --out docs/cartpole.png
    python scripts/plot.py runs/a_s* runs/b_s* --group-by algo --metric ep_return_mean

Runs are grouped by (algo, env) from their ``config.json`` (or ``--group-by``); each run's
curve is interpolated onto a common grid of env steps before averaging. The CI is
``mean ± t₀.₉₇₅(n-1) · std / √n``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

# two-sided 95% Student-t quantiles for n-1 = 1..30 degrees of freedom
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]  # fmt: skip


def t_quantile(dof: int) -> float:
    """The 0.975 quantile of Student's t with ``dof`` degrees of freedom (1.96 beyond 30)."""
    return _T975[dof - 1] if 1 <= dof <= len(_T975) else 1.96


def read_run(run_dir: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """``(timesteps, metric)`` of one run, NaN rows (no finished episode yet) dropped."""
    xs, ys = [], []
    with open(run_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            y = float(row[metric])
            if np.isfinite(y):
                xs.append(float(row["timesteps"]))
                ys.append(y)
    return np.asarray(xs), np.asarray(ys)


def group_key(run_dir: Path, group_by: str) -> str:
    """The label of a run: ``algo env`` from config.json, or a config field."""
    cfg_path = run_dir / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    if group_by == "auto":
        return f"{cfg.get('algo', '?').upper()} {cfg.get('env', run_dir.name)}"
    if group_by == "name":
        return run_dir.name.rsplit("_s", 1)[0]
    value = cfg.get(group_by, cfg.get("hyperparameters", {}).get(group_by))
    return f"{group_by}={value}"


def env_of(run_dir: Path) -> str:
    """The env id of a run (its panel in the figure)."""
    cfg_path = run_dir / "config.json"
    return json.loads(cfg_path.read_text()).get("env", "?") if cfg_path.exists() else "?"


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories (with metrics.csv)")
    p.add_argument("--out", default="learning_curves.png")
    p.add_argument("--metric", default="ep_return_mean")
    p.add_argument("--group-by", default="auto", help="'auto' (algo env), 'name', or a field")
    p.add_argument("--points", type=int, default=200, help="interpolation grid size")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)

    groups: dict[str, list[Path]] = defaultdict(list)
    panel_of: dict[str, str] = {}
    for r in args.runs:
        path = Path(r)
        if (path / "metrics.csv").exists():
            label = group_key(path, args.group_by)
            groups[label].append(path)
            panel_of[label] = env_of(path)
        elif path.is_dir():
            print(f"skipping {path}: no metrics.csv", file=sys.stderr)
    if not groups:
        raise SystemExit("no runs with metrics.csv")
    panels = sorted(set(panel_of.values()))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for label, runs in sorted(groups.items()):
        curves = [read_run(r, args.metric) for r in runs]
        curves = [c for c in curves if len(c[0]) > 1]
        if not curves:
            continue
        lo = max(c[0][0] for c in curves)
        hi = min(c[0][-1] for c in curves)
        grid = np.linspace(lo, hi, args.points)
        ys = np.stack([np.interp(grid, x, y) for x, y in curves])
        mean = ys.mean(0)
        n = len(curves)
        half = t_quantile(n - 1) * ys.std(0, ddof=1) / np.sqrt(n) if n > 1 else 0 * mean
        ax = axes[0][panels.index(panel_of[label])]
        (line,) = ax.plot(grid, mean, label=f"{label} (n={n})")
        ax.fill_between(grid, mean - half, mean + half, color=line.get_color(), alpha=0.25)
    for ax, env in zip(axes[0], panels, strict=True):
        ax.set_xlabel("env steps")
        ax.set_ylabel(args.metric)
        ax.set_title(args.title or env)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
