"""Figures and tables of the Fisher study (reads ``fisher_study.csv`` from compare_fisher.py).

    python scripts/plot_fisher.py --out docs/fisher_comparison

Writes into ``--out``: ``return_vs_steps.png``, ``return_vs_wallclock.png`` (mean ± 95% CI over
seeds), ``cosine.png`` (cosine to the exact direction over training, per flavour on the same
batches and for each run's own step), ``kl_ratio.png`` (realized KL / δ), ``cost_per_update.png``,
``improvement.png`` (predicted vs actual surrogate improvement), and the tables
``summary_variants.csv``, ``summary_flavours.csv`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
TASK_ORDER = ("CartPole-v1", "Acrobot-v1", "Pendulum-v1", "Hopper-v5", "HalfCheetah-v5")
FLAVOUR_ORDER = ("exact", "exact-pcg", "mc", "empirical", "diagonal", "kfac")


def num(x: str | None) -> float:
    """CSV cell to float (empty → NaN)."""
    try:
        return float(x) if x not in (None, "") else math.nan
    except ValueError:
        return math.nan


def load(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def ci95(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean and half-width of the 95% Student-t interval (NaN-free values)."""
    v = np.array([x for x in values if math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, 0
    if len(v) == 1:
        return float(v[0]), 0.0, 1
    return (
        float(v.mean()),
        T95.get(len(v) - 1, 1.96) * float(v.std(ddof=1)) / math.sqrt(len(v)),
        len(v),
    )


def ordered(names: Iterable[str], order: Iterable[str]) -> list[str]:
    names = set(names)
    first = [n for n in order if n in names]
    return first + sorted(names - set(first))


def curves(rows: list[dict[str, str]]) -> dict[tuple[str, str], dict[int, list[tuple]]]:
    """``(task, variant) -> seed -> [(timesteps, wall_s, return, row)]``."""
    out: dict[tuple[str, str], dict[int, list[tuple]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["record"] == "update":
            out[(r["task"], r["variant"])][int(r["seed"])].append(
                (int(r["timesteps"]), num(r["wall_s"]), num(r["ep_return_mean"]), r)
            )
    for per_seed in out.values():
        for lst in per_seed.values():
            lst.sort(key=lambda t: t[0])
    return out


def _grid(n: int) -> tuple[Any, np.ndarray]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat


def plot_returns(cur: dict, tasks: list[str], variants: list[str], out: Path) -> None:
    """Return vs env steps and vs wall-clock: mean ± 95% CI over seeds."""
    for xkey, fname, label in (
        (0, "return_vs_steps.png", "env steps"),
        (1, "return_vs_wallclock.png", "wall-clock s (no diagnostics)"),
    ):
        fig, axes = _grid(len(tasks))
        for ax, task in zip(axes, tasks, strict=False):
            for v in variants:
                seeds = cur.get((task, v))
                if not seeds:
                    continue
                n = min(len(s) for s in seeds.values())
                ys = np.array([[t[2] for t in s[:n]] for s in seeds.values()])
                xs = np.array([[t[xkey] for t in s[:n]] for s in seeds.values()]).mean(0)
                m = ys.mean(0)
                k = ys.shape[0]
                hw = T95.get(k - 1, 1.96) * ys.std(0, ddof=1) / math.sqrt(k) if k > 1 else 0 * m
                (line,) = ax.plot(xs, m, label=f"{v} (n={k})")
                ax.fill_between(xs, m - hw, m + hw, alpha=0.15, color=line.get_color())
            ax.set_title(task)
            ax.set_xlabel(label)
            ax.set_ylabel("mean training return (last 100 ep.)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


def plot_cosine(
    rows: list[dict[str, str]], cur: dict, tasks: list[str], variants: list[str], out: Path
) -> None:
    """Top: each flavour's cosine to the exact direction on the same batches (all runs of the
    task pooled, binned by env steps). Bottom: the cosine of each run's own accepted step."""
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 7), squeeze=False)
    for j, task in enumerate(tasks):
        ax = axes[0, j]
        by: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r["record"] == "flavour" and r["task"] == task and r["flavour"] != "exact-ref":
                by[r["flavour"]][int(r["timesteps"])].append(num(r["cos"]))
        for fl in ordered(by, FLAVOUR_ORDER):
            xs = sorted(by[fl])
            stats = [ci95(by[fl][x]) for x in xs]
            m = np.array([s[0] for s in stats])
            hw = np.array([s[1] for s in stats])
            (line,) = ax.plot(xs, m, marker=".", label=fl)
            ax.fill_between(xs, m - hw, m + hw, alpha=0.15, color=line.get_color())
        ax.set_title(f"{task}: flavours, same batch")
        ax.set_ylim(-0.1, 1.05)
        ax.grid(alpha=0.3)
        ax = axes[1, j]
        for v in variants:
            seeds = cur.get((task, v))
            if not seeds:
                continue
            n = min(len(s) for s in seeds.values())
            ys = np.array([[num(t[3]["cos_exact"]) for t in s[:n]] for s in seeds.values()])
            xs = [t[0] for t in next(iter(seeds.values()))[:n]]
            ax.plot(xs, np.nanmean(ys, 0), label=v)
        ax.set_title(f"{task}: each run's own step")
        ax.set_xlabel("env steps")
        ax.set_ylim(-0.1, 1.05)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("cos(direction, exact)")
    axes[1, 0].set_ylabel("cos(step, exact)")
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "cosine.png", dpi=110)
    plt.close(fig)


def _bars(ax: Any, labels: list[str], groups: list[str], values: dict, log: bool) -> None:
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(labels))
    for i, g in enumerate(groups):
        m = [values.get((lab, g), (math.nan, 0))[0] for lab in labels]
        e = [values.get((lab, g), (math.nan, 0))[1] for lab in labels]
        ax.bar(x + i * width - 0.4 + width / 2, m, width, yerr=e, label=g, capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=20, fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")


def plot_kl_cost(
    rows: list[dict[str, str]], tasks: list[str], variants: list[str], out: Path
) -> None:
    """Realized KL / δ and cost per update, per task and variant (and per flavour)."""
    agg: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["record"] == "update":
            key = (r["task"], r["variant"])
            agg["kl"][key].append(num(r["kl_ratio"]))
            agg["policy"][key].append(num(r["time_fisher_cg"]) + num(r["time_line_search"]))
            agg["total"][key].append(num(r["time_total"]) - num(r["time_diag"]))
        elif r["record"] == "flavour" and r["flavour"] != "exact-ref":
            key = (r["task"], r["flavour"])
            agg["fkl"][key].append(num(r["kl_ratio"]))
            agg["solve"][key].append(num(r["time_solve"]))
    stat = {k: {kk: ci95(vv)[:2] for kk, vv in d.items()} for k, d in agg.items()}
    flavours = ordered({k[1] for k in agg["fkl"]}, FLAVOUR_ORDER)
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.5))
    _bars(axes[0], tasks, variants, stat["kl"], True)
    axes[0].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[0].set_title("each run's realized KL / δ (mean ± 95% CI over updates)")
    axes[0].legend(fontsize=7)
    _bars(axes[1], tasks, flavours, stat["fkl"], True)
    axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[1].set_title("KL / δ of each flavour's δ-scaled step, same batches")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "kl_ratio.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(20, 4.5))
    _bars(axes[0], tasks, variants, stat["policy"], True)
    axes[0].set_title("policy step time per update, s (Fisher + solve + line search)")
    axes[0].legend(fontsize=7)
    _bars(axes[1], tasks, variants, stat["total"], False)
    axes[1].set_title("whole update incl. rollout and critic, s")
    _bars(axes[2], tasks, flavours, stat["solve"], True)
    axes[2].set_title("direction solve per flavour, same batches, s")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "cost_per_update.png", dpi=110)
    plt.close(fig)


def plot_improvement(rows: list[dict[str, str]], out: Path) -> None:
    """Actual vs predicted (first-order) surrogate improvement of each flavour's δ-step."""
    fig, ax = plt.subplots(figsize=(6, 5))
    by: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for r in rows:
        if r["record"] == "flavour" and r["flavour"] != "exact-ref":
            p, a = num(r["predicted_improvement"]), num(r["actual_improvement"])
            if math.isfinite(p) and math.isfinite(a):
                by[r["flavour"]][0].append(p)
                by[r["flavour"]][1].append(a)
    for fl in ordered(by, FLAVOUR_ORDER):
        ax.scatter(*by[fl], s=6, alpha=0.5, label=fl)
    lim = max([max(v[0] + v[1]) for v in by.values()] or [1.0])
    ax.plot([0, lim], [0, lim], "k--", lw=0.8)
    ax.set_xlabel("predicted improvement gᵀs")
    ax.set_ylabel("actual surrogate improvement")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "improvement.png", dpi=110)
    plt.close(fig)


def mean_curve(seeds: dict[int, list[tuple]]) -> list[tuple]:
    """The seed-mean training curve, as ``(timesteps, wall, return, None)`` tuples."""
    n = min(len(s) for s in seeds.values())
    out = []
    for i in range(n):
        pts = [s[i] for s in seeds.values()]
        out.append((pts[0][0], float(np.mean([p[1] for p in pts])),
                    float(np.mean([p[2] for p in pts])), None))  # fmt: skip
    return out


def first_crossing(seq: list[tuple], threshold: float) -> float:
    """Env steps at which the training return first reaches ``threshold`` (NaN: never)."""
    for t, _, ret, _ in seq:
        if math.isfinite(ret) and ret >= threshold:
            return float(t)
    return math.nan


def summaries(
    rows: list[dict[str, str]], cur: dict, tasks: list[str], variants: list[str], out: Path
) -> str:
    """Write the two summary CSVs and return the markdown tables."""
    finals: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        if r["record"] == "final":
            finals[(r["task"], r["variant"])].append(num(r["eval_return"]))
    vrows: list[dict[str, Any]] = []
    md = []
    for task in tasks:
        ref = cur.get((task, "trpo-exact"), {})
        thr = float(np.mean([s[-1][2] for s in ref.values()])) if ref else math.nan
        ref_steps = first_crossing(mean_curve(ref), thr) if ref else math.nan
        md.append(f"\n#### {task} (threshold: TRPO-exact's final training return {thr:.1f})\n")
        md.append(
            "| variant | final det. return | final train return | steps for the seed-mean "
            "curve to reach it (seeds reaching) | × TRPO-exact | cos(step, exact) | "
            "realized KL/δ | policy step s | critic s | rollout s (load) | run wall s |"
        )
        md.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for v in variants:
            seeds = cur.get((task, v))
            if not seeds:
                continue
            ups = [t[3] for s in seeds.values() for t in s]
            fr = finals.get((task, v), [])
            tr = [s[-1][2] for s in seeds.values()]
            cross = [first_crossing(s, thr) for s in seeds.values()]
            reached = [c for c in cross if math.isfinite(c)]
            steps = first_crossing(mean_curve(seeds), thr)
            row = dict(
                task=task,
                variant=v,
                seeds=len(seeds),
                final_det_return_mean=float(np.mean(fr)) if fr else math.nan,
                final_det_return_std=float(np.std(fr)) if fr else math.nan,
                final_train_return_mean=float(np.mean(tr)),
                final_train_return_std=float(np.std(tr)),
                threshold=thr,
                steps_to_threshold_mean=steps,
                seeds_reaching=len(reached),
                steps_ratio_vs_trpo_exact=steps / ref_steps,
                cos_step_exact_mean=float(np.nanmean([num(u["cos_exact"]) for u in ups])),
                kl_ratio_mean=float(np.nanmean([num(u["kl_ratio"]) for u in ups])),
                kl_ratio_max=float(np.nanmax([num(u["kl_ratio"]) for u in ups])),
                policy_step_s=float(
                    np.nanmean([num(u["time_fisher_cg"]) + num(u["time_line_search"]) for u in ups])
                ),
                critic_s=float(np.nanmean([num(u["time_critic"]) for u in ups])),
                rollout_s=float(np.nanmean([num(u["time_rollout"]) for u in ups])),
                update_s=float(
                    np.nanmean([num(u["time_total"]) - num(u["time_diag"]) for u in ups])
                ),
                run_wall_s=float(np.mean([s[-1][1] for s in seeds.values()])),
                budget=max(s[-1][0] for s in seeds.values()),
            )
            vrows.append(row)
            shown = f"{steps:.0f}" if math.isfinite(steps) else "never"
            reach = f"{shown} ({len(reached)}/{len(seeds)})"
            ratio = row["steps_ratio_vs_trpo_exact"]
            md.append(
                f"| {v} | {row['final_det_return_mean']:.1f} ± {row['final_det_return_std']:.1f} "
                f"| {row['final_train_return_mean']:.1f} ± {row['final_train_return_std']:.1f} "
                f"| {reach} | {ratio:.2f} | {row['cos_step_exact_mean']:.3f} "
                f"| {row['kl_ratio_mean']:.2f} (max {row['kl_ratio_max']:.1f}) "
                f"| {row['policy_step_s']:.3f} | {row['critic_s']:.3f} | {row['rollout_s']:.2f} "
                f"| {row['run_wall_s']:.0f} |"
            )
    write_csv(out / "summary_variants.csv", vrows)
    # per task × damping × flavour, on the same batches
    agg: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["record"] == "flavour":
            a = agg[(r["task"], damping_of(r["task"], r["variant"]), r["flavour"])]
            for k in ("cos", "kl_ratio", "quad_exact_ratio", "time_solve"):
                a[k].append(num(r[k]))
            p, q = num(r["predicted_improvement"]), num(r["actual_improvement"])
            if math.isfinite(p) and p > 0 and math.isfinite(q):
                a["actual_over_predicted"].append(q / p)
    frows = []
    md.append(
        "\n#### Every flavour on the same batches (pooled over the runs of a task that share the "
        "damping λ: TRPO runs use the TRPO preset's λ, K-FAC NAC runs λ = 0.01)\n"
    )
    md.append(
        "| task | λ | flavour | n batches | cos to exact (mean, min) | realized KL/δ of its "
        "δ-step | ½sᵀFs/δ (exact F) | actual/predicted improvement | solve s |"
    )
    md.append("|---|---|---|---|---|---|---|---|---|")
    for task, lam in sorted({k[:2] for k in agg}, key=lambda k: (tasks.index(k[0]), k[1])):
        names = {k[2] for k in agg if k[:2] == (task, lam)}
        for fl in ordered(names, ("exact-ref", *FLAVOUR_ORDER)):
            a = agg[(task, lam, fl)]
            ratios = a["actual_over_predicted"]
            row = dict(
                task=task,
                damping=lam,
                flavour=fl,
                n=len(a["cos"]),
                cos_mean=_nanmean(a["cos"]),
                cos_min=min([c for c in a["cos"] if math.isfinite(c)], default=math.nan),
                kl_ratio_mean=_nanmean(a["kl_ratio"]),
                quad_exact_ratio_mean=_nanmean(a["quad_exact_ratio"]),
                actual_over_predicted_median=float(np.median(ratios)) if ratios else math.nan,
                time_solve_s=_nanmean(a["time_solve"]),
            )
            frows.append(row)
            head = f"| {task} | {lam:g} "
            if fl == "exact-ref":
                md.append(
                    head + f"| exact (reference, CG 100 it. / tol 1e-10) | {row['n']} "
                    f"| 1 | — | — | — | {row['time_solve_s']:.3f} |"
                )
                continue
            md.append(
                head + f"| {fl} | {row['n']} | {row['cos_mean']:.3f}, {row['cos_min']:.3f} "
                f"| {row['kl_ratio_mean']:.2f} | {row['quad_exact_ratio_mean']:.2f} "
                f"| {row['actual_over_predicted_median']:.2f} | {row['time_solve_s']:.3f} |"
            )
    write_csv(out / "summary_flavours.csv", frows)
    md += kfac_nac_table(rows, tasks)
    text = "\n".join(md) + "\n"
    (out / "summary.md").write_text(text)
    return text


def kfac_nac_table(rows: list[dict[str, str]], tasks: list[str]) -> list[str]:
    """K-FAC NAC's KL bookkeeping: how often the clip was active, the K-FAC-predicted KL
    ½sᵀF̂s, the exact quadratic ½sᵀFs and the realized KL of its steps."""
    by: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        if r["record"] == "update" and r["algo"] == "kfac-nac":
            by[(r["task"], r["variant"])].append(r)
    md = [
        "\n#### K-FAC NAC: predicted vs realized KL of its steps (all updates, 3 seeds)\n",
        "| task | variant | δ | updates clipped | realized KL | K-FAC ½sᵀF̂s | exact ½sᵀFs "
        "| median realized / K-FAC-predicted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (task, v), us in sorted(by.items(), key=lambda kv: (tasks.index(kv[0][0]), kv[0][1])):
        lr = float(cell_lr(task, v))
        clipped = sum(num(u["step_scale"]) < lr * (1 - 1e-9) for u in us)
        kl = [num(u["kl"]) for u in us]
        pk = [num(u["predicted_kl"]) for u in us]
        qe = [num(u["quad_exact"]) for u in us]
        ratio = float(np.median([a / b for a, b in zip(kl, pk, strict=True) if b > 0]))
        md.append(
            f"| {task} | {v} | {num(us[0]['max_kl']):g} | {clipped}/{len(us)} "
            f"| {_nanmean(kl):.5f} | {_nanmean(pk):.5f} | {_nanmean(qe):.5f} | {ratio:.1f} |"
        )
    return md


def cell_lr(task: str, variant: str) -> float:
    """The policy learning rate of a K-FAC NAC cell."""
    from scripts.compare_fisher import Cell, cell_config

    return float(cell_config(Cell(task, variant, 0, 0))[1].get("lr", 0.25))


def damping_of(task: str, variant: str) -> float:
    """The damping λ of a cell's natural step (its Fisher diagnostics use the same)."""
    from scripts.compare_fisher import Cell, cell_config

    cls, params = cell_config(Cell(task, variant, 0, 0))
    return float(
        params.get("damping", 0.01)
        if variant.startswith("kfac-nac")
        else params.get("cg_damping", 0.1)
    )


def _nanmean(v: list[float]) -> float:
    v = [x for x in v if math.isfinite(x)]
    return float(np.mean(v)) if v else math.nan


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="the table comes from `compare_fisher.py run --merge-table`; full-budget grids "
        "are reported by `compare_fisher.py report --grid DIR`",
    )
    p.add_argument("--out", default="docs/fisher_comparison",
                   help="study folder: figures and summary tables are written here")  # fmt: skip
    p.add_argument("--csv", default=None,
                   help="the study's tidy table (default: OUT/fisher_study.csv)")  # fmt: skip
    a = p.parse_args(argv)
    out = Path(a.out)
    rows = load(Path(a.csv) if a.csv else out / "fisher_study.csv")
    cur = curves(rows)
    tasks = ordered({t for t, _ in cur}, TASK_ORDER)
    from scripts.compare_fisher import VARIANTS

    variants = ordered({v for _, v in cur}, VARIANTS)
    plot_returns(cur, tasks, variants, out)
    plot_cosine(rows, cur, tasks, variants, out)
    plot_kl_cost(rows, tasks, variants, out)
    plot_improvement(rows, out)
    print(summaries(rows, cur, tasks, variants, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
