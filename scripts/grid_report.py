"""Tables and figures of a full-budget grid (``compare_fisher.py run``), from its cells alone.

    python scripts/compare_fisher.py report --grid docs/rl_grid

Writes into the grid folder: ``summary.md`` (final deterministic return per task × variant:
mean ± std, mean ± 95% Student-t CI, interquartile mean with a 95% stratified-bootstrap CI (the
estimator of rliable, :func:`iqm_ci`); costs and diagnostics; the flavours on the same batches;
the cells still to run), ``returns.md`` (the final-return table of docs/rl_results.md),
``efficiency.md`` (env steps each variant takes to reach TRPO-exact's final training return,
against TRPO-exact's own), ``summary.csv``, ``summary_flavours.csv``, ``status.md`` (how many
cells are done),
``return_vs_steps.png`` and ``return_vs_cpu.png`` (training return, mean ± 95% CI over seeds).

Then it refreshes every page next to the grid folder (``docs/*.md``) that quotes one of those
markdown files between ``<!-- begin: rl_grid/returns.md -->`` and ``<!-- end: rl_grid/returns.md
-->`` markers (the folder's name, then the file), so the pages never hold a stale copy.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy.stats import trim_mean

from scripts.plot_fisher import (
    FLAVOUR_ORDER,
    T95,
    ci95,
    first_crossing,
    num,
    ordered,
    write_csv,
)

#: sb3-contrib TRPO, documented (rl-baselines3-zoo benchmark: 1M steps, 3 seeds, v3 envs)
SB3_DOCUMENTED = {"Hopper": (3372, 215), "HalfCheetah": (1803, 46), "Walker2d": (4502, 234)}
TASK_ORDER = ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5", "CartPole-v1", "Acrobot-v1",
              "Pendulum-v1", "LunarLander-v3")  # fmt: skip


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean of all scores: the mean of the middle 50% (``scipy.stats.trim_mean``
    with 25% cut from each end, as rliable's ``aggregate_iqm``)."""
    return float(trim_mean(np.asarray(scores, dtype=float).reshape(-1), 0.25))


def iqm_ci(
    scores: np.ndarray, reps: int = 20_000, seed: int = 0, size: float = 0.95
) -> tuple[float, float, float]:
    """``(IQM, low, high)`` of ``scores`` (runs × tasks, or one task's runs) with the
    percentile interval of the stratified bootstrap of Agarwal et al. (2021): each resample
    draws the runs with replacement within every task (column) independently.

    The ``rliable`` package implements the same estimator, but its release (1.2) cannot run
    here: it needs ``arch < 8``, which fails to import with pandas 3, and ``arch >= 8`` no
    longer accepts the ``random_state`` rliable passes."""
    s = np.asarray(scores, dtype=float)
    s = s.reshape(-1, 1) if s.ndim == 1 else s
    n, m = s.shape
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(reps, n, m))
    resampled = np.take_along_axis(s[None].repeat(reps, 0), idx, axis=1).reshape(reps, -1)
    stats = trim_mean(resampled, 0.25, axis=1)
    lo, hi = np.quantile(stats, [(1 - size) / 2, (1 + size) / 2])
    return iqm(s), float(lo), float(hi)


def load_grid(grid: Path) -> list[dict[str, Any]]:
    """Every finished cell: its JSON record plus ``rows`` (the CSV's rows)."""
    cells = []
    for p in sorted((grid / "cells").glob("*.csv")):
        rec = json.loads(p.with_suffix(".json").read_text())
        with p.open() as f:
            rec["rows"] = list(csv.DictReader(f))
        cells.append(rec)
    return cells


def _band(ax: Any, x: np.ndarray, ys: np.ndarray, label: str) -> None:
    m = ys.mean(0)
    k = ys.shape[0]
    hw = T95.get(k - 1, 1.96) * ys.std(0, ddof=1) / math.sqrt(k) if k > 1 else 0 * m
    (line,) = ax.plot(x, m, label=f"{label} (n={k})")
    ax.fill_between(x, m - hw, m + hw, alpha=0.15, color=line.get_color())


def plot_curves(by: dict[tuple[str, str], list[dict]], tasks: list[str], out: Path) -> None:
    """Training return (last 100 episodes) vs env steps and vs process CPU time."""
    for xkey, fname, label in (
        ("timesteps", "return_vs_steps.png", "env steps"),
        ("cpu_s", "return_vs_cpu.png", "process CPU s (diagnostics excluded; seed mean)"),
    ):
        cols = min(len(tasks), 3)
        nrows = math.ceil(len(tasks) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
        for ax in axes.flat[len(tasks) :]:
            ax.axis("off")
        for ax, task in zip(axes.flat, tasks, strict=False):
            for (t, v), cells in by.items():
                if t != task:
                    continue
                ups = [[r for r in c["rows"] if r["record"] == "update"] for c in cells]
                n = min(len(u) for u in ups)
                ys = np.array([[num(r["ep_return_mean"]) for r in u[:n]] for u in ups])
                xs = np.array([[num(r[xkey]) for r in u[:n]] for u in ups]).mean(0)
                _band(ax, xs, ys, v)
            ax.set_title(task)
            ax.set_xlabel(label)
            ax.set_ylabel("training return (last 100 ep.)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)


def _fmt_ci(m: float, hw: float, n: int) -> str:
    """``m ± hw``; a spread of one seed is undefined: ``m (1 seed)``."""
    return f"{m:.1f} ± {hw:.1f}" if n > 1 else f"{m:.1f} (1 seed)"


def _curve(cell: dict[str, Any]) -> list[tuple]:
    """A cell's training curve as ``(timesteps, cpu_s, return, None)`` (``first_crossing``'s)."""
    return [
        (int(r["timesteps"]), num(r["cpu_s"]), num(r["ep_return_mean"]), None)
        for r in cell["rows"]
        if r["record"] == "update"
    ]


def thresholds(by: dict[tuple[str, str], list[dict]]) -> dict[str, float]:
    """Per task: TRPO-exact's final training return (last 100 episodes), mean over its seeds."""
    return {
        task: float(np.mean([_curve(c)[-1][2] for c in cells]))
        for (task, v), cells in by.items()
        if v == "trpo-exact"
    }


def mean_curve(cells: list[dict[str, Any]]) -> list[tuple]:
    """The seed-mean training curve of ``cells`` as ``(timesteps, None, return, None)`` rows
    (``first_crossing``'s), over the updates all of them reached (the cells of one variant share
    their env-step grid)."""
    curves = [_curve(c) for c in cells]
    n = min(len(c) for c in curves)
    returns = np.array([[r for _, _, r, _ in c[:n]] for c in curves]).mean(0)
    return [(row[0], None, float(y), None) for row, y in zip(curves[0][:n], returns, strict=True)]


def efficiency_rows(by: dict[tuple[str, str], list[dict]]) -> list[dict[str, Any]]:
    """Per task × variant other than TRPO-exact: the env steps at which the variant's seed-mean
    training curve first reaches TRPO-exact's seed-mean final training return, against the
    steps TRPO-exact's own seed-mean curve takes to reach it (ratio < 1: fewer samples)."""
    thr = thresholds(by)
    rows = []
    for (task, v), cells in by.items():
        if v == "trpo-exact" or task not in thr:
            continue
        curve = mean_curve(cells)
        ours = first_crossing(curve, thr[task])
        ref = first_crossing(mean_curve(by[(task, "trpo-exact")]), thr[task])
        rows.append(
            dict(
                task=task,
                variant=v,
                seeds=len(cells),
                reference_seeds=len(by[(task, "trpo-exact")]),
                threshold=thr[task],
                steps=ours,
                reference_steps=ref,
                ratio=ours / ref,
                best_mean_return=max(y for _, _, y, _ in curve),
            )
        )
    return rows


def variant_rows(by: dict[tuple[str, str], list[dict]], reps: int) -> list[dict[str, Any]]:
    """One summary row per task × variant with cells."""
    rows = []
    thr = thresholds(by)
    for (task, v), cells in by.items():
        cross = [first_crossing(_curve(c), thr.get(task, math.nan)) for c in cells]
        reached = [x for x in cross if math.isfinite(x)]
        finals = np.array([c["eval"]["eval_return"] for c in cells])
        m, hw, n = ci95(finals)
        point, lo, hi = iqm_ci(finals, reps)
        ups = [r for c in cells for r in c["rows"] if r["record"] == "update"]
        diag = [r for r in ups if num(r["time_diag"]) > 0]
        cpu_upd = [num(r["cpu_update"]) for r in ups]
        wall_upd = [num(r["time_total"]) - num(r["time_diag"]) for r in ups]
        rows.append(
            dict(
                task=task,
                variant=v,
                seeds=n,
                seed_list=" ".join(str(c["cell"]["seed"]) for c in cells),
                budget=cells[0]["cell"]["budget"],
                final_mean=m,
                final_std=float(finals.std(ddof=1)) if n > 1 else 0.0,
                final_ci95=hw,
                iqm=point,
                iqm_lo=lo,
                iqm_hi=hi,
                per_seed=" ".join(f"{x:.1f}" for x in finals),
                threshold=thr.get(task, math.nan),
                steps_to_threshold=float(np.mean(reached)) if reached else math.nan,
                seeds_reaching=len(reached),
                cpu_per_update_s=float(np.nanmean(cpu_upd)),
                wall_per_update_s=float(np.nanmean(wall_upd)),
                train_wall_s=float(np.mean([c["train_wall_s"] for c in cells])),
                diag_cpu_overhead=float(
                    np.sum([c["diag_cpu_s"] for c in cells])
                    / np.sum([c["train_cpu_s"] for c in cells])
                ),
                cos_step_exact=float(np.nanmean([num(r["cos_exact"]) for r in diag]))
                if diag
                else math.nan,
                kl_ratio_mean=float(np.nanmean([num(r["kl_ratio"]) for r in ups])),
                kl_ratio_max=float(np.nanmax([num(r["kl_ratio"]) for r in ups])),
                commits=" ".join(sorted({c["commit"][:10] for c in cells})),
            )
        )
    return rows


def flavour_rows(by: dict[tuple[str, str], list[dict]]) -> list[dict[str, Any]]:
    """Every flavour on the same diagnosed batches, pooled per task over its runs."""
    agg: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (task, _), cells in by.items():
        for c in cells:
            for r in c["rows"]:
                if r["record"] != "flavour" or r["flavour"] == "exact-ref":
                    continue
                a = agg[(task, r["flavour"])]
                for k in ("cos", "kl_ratio", "time_solve"):
                    a[k].append(num(r[k]))
                p, q = num(r["predicted_improvement"]), num(r["actual_improvement"])
                if math.isfinite(p) and p > 0 and math.isfinite(q):
                    a["ratio"].append(q / p)
    out = []
    for (task, fl), a in agg.items():
        cm, chw, n = ci95(a["cos"])
        out.append(
            dict(
                task=task,
                flavour=fl,
                batches=n,
                cos_mean=cm,
                cos_ci95=chw,
                kl_ratio_mean=ci95(a["kl_ratio"])[0],
                actual_over_predicted_median=float(np.median(a["ratio"]))
                if a["ratio"]
                else math.nan,
                solve_s=ci95(a["time_solve"])[0],
            )
        )
    return out


def report(grid: Path, reps: int = 20_000) -> str:
    """Write the summary tables and figures of ``grid``; returns the markdown."""
    from scripts import compare_fisher as cf

    cells = load_grid(grid)
    by: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for c in cells:
        by[(c["cell"]["task"], c["cell"]["variant"])].append(c)
    tasks = ordered({t for t, _ in by}, TASK_ORDER)
    order = {v: i for i, v in enumerate(cf.VARIANTS)}
    by = dict(sorted(by.items(), key=lambda kv: (tasks.index(kv[0][0]), order.get(kv[0][1], 99))))
    vrows = variant_rows(by, reps)
    frows = flavour_rows(by)
    write_csv(grid / "summary.csv", vrows)
    write_csv(grid / "summary_flavours.csv", frows)
    if by:
        plot_curves(by, tasks, grid)
    md = [
        f"{len(cells)} finished cells in `{grid}/cells/`. Final return: deterministic policy, "
        "10 episodes (seeds 10000-10009) per cell; over seeds: mean ± std, mean ± 95% "
        "Student-t CI, IQM [95% stratified-bootstrap percentile CI, "
        f"{reps} resamples]. CPU s / update: process CPU time (all threads) per update of "
        "the training, diagnostics excluded; diag: the diagnostics' CPU time as a fraction of "
        "the training's; cos: the run's own step against the exact natural gradient on the "
        "diagnosed updates; steps to thr.: env steps until a seed's training return (last 100 "
        "episodes) first reaches TRPO-exact's seed-mean final training return, mean over the "
        "seeds reaching it.\n",
        "| task | variant | seeds | budget | mean ± std | mean ± 95% CI | IQM [95% CI] "
        "| per seed | steps to thr. (seeds) | CPU s / update | wall s / run | diag "
        "| cos(step, exact) | KL/δ (max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in vrows:
        md.append(
            f"| {r['task']} | {r['variant']} | {r['seeds']} | {r['budget']} "
            f"| {_fmt_ci(r['final_mean'], r['final_std'], r['seeds'])} "
            f"| {_fmt_ci(r['final_mean'], r['final_ci95'], r['seeds'])} "
            f"| {r['iqm']:.1f} [{r['iqm_lo']:.1f}, {r['iqm_hi']:.1f}] | {r['per_seed']} "
            f"| {r['steps_to_threshold']:.0f} ({r['seeds_reaching']}/{r['seeds']}) "
            f"| {r['cpu_per_update_s']:.3f} | {r['train_wall_s']:.0f} "
            f"| {100 * r['diag_cpu_overhead']:.1f}% | {r['cos_step_exact']:.3f} "
            f"| {r['kl_ratio_mean']:.2f} ({r['kl_ratio_max']:.2f}) |"
        )
    md += [
        "\nsb3-contrib TRPO, documented (rl-baselines3-zoo, 1M steps, 3 seeds, v3 envs): "
        + ", ".join(f"{k} {m} ± {s}" for k, (m, s) in SB3_DOCUMENTED.items())
        + ".\n",
        "#### Every flavour on the same diagnosed batches (pooled over a task's runs)\n",
        "| task | flavour | batches | cos to exact (mean ± 95% CI) | realized KL/δ of its "
        "δ-step | actual/predicted improvement (median) | solve s |",
        "|---|---|---|---|---|---|---|",
    ]
    fl_rank = {f: i for i, f in enumerate(FLAVOUR_ORDER)}
    frows.sort(key=lambda r: (tasks.index(r["task"]), fl_rank.get(r["flavour"], 99)))
    for r in frows:
        md.append(
            f"| {r['task']} | {r['flavour']} | {r['batches']} "
            f"| {r['cos_mean']:.3f} ± {r['cos_ci95']:.3f} | {r['kl_ratio_mean']:.2f} "
            f"| {r['actual_over_predicted_median']:.2f} | {r['solve_s']:.3f} |"
        )
    todo = cf.pending(cf.full_budget_grid(), grid)
    count: dict[tuple[str, str], list[int]] = defaultdict(list)
    for c in todo:
        count[(c.task, c.variant)].append(c.seed)
    md += [
        f"\n#### Cells of the full grid still to run ({len(todo)})\n",
        "| task | variant | seeds |",
        "|---|---|---|",
    ]
    md += [f"| {t} | {v} | {' '.join(map(str, s))} |" for (t, v), s in count.items()]
    text = "\n".join(md) + "\n"
    n_plan = len(cf.full_budget_grid())
    status = (
        f"{n_plan - len(todo)} of the full grid's {n_plan} cells are finished and committed; "
        f"{len(todo)} are still to run (listed at the end of [{grid.name}/summary.md]"
        f"({grid.name}/summary.md), and by "
        "`compare_fisher.py run --plan full --list`).\n"
    )
    generated = {
        "summary.md": text,
        "returns.md": returns_table(vrows),
        "efficiency.md": efficiency_table(efficiency_rows(by)),
        "status.md": status,
    }
    for name, content in generated.items():
        (grid / name).write_text(content)
    for page in sorted(grid.parent.glob("*.md")):
        fill_page(page, grid.name, generated)
    return text


def fill_page(page: Path, folder: str, generated: dict[str, str]) -> bool:
    """Replace each ``<!-- begin: FOLDER/NAME -->…<!-- end: FOLDER/NAME -->`` block of ``page``
    by ``generated[NAME]``; returns whether the page changed. An unknown NAME is an error (a
    page must not quote a file the report does not write)."""
    old = page.read_text()
    pattern = re.compile(
        rf"(<!-- begin: {re.escape(folder)}/(?P<name>[\w.]+) -->\n)(?:.*?\n)?"
        rf"(<!-- end: {re.escape(folder)}/(?P=name) -->)",
        re.S,
    )

    def body(m: re.Match[str]) -> str:
        name = m["name"]
        if name not in generated:
            raise ValueError(f"{page}: quotes {folder}/{name}, which the report does not write")
        return m[1] + generated[name].rstrip("\n") + "\n" + m[3]

    new = pattern.sub(body, old)
    if new != old:
        page.write_text(new)
    return new != old


def returns_table(vrows: list[dict[str, Any]]) -> str:
    """The final-return table of docs/rl_results.md, next to sb3-contrib's documented TRPO."""
    md = [
        "| task | algorithm | seeds | env steps | final det. return, mean ± std | mean ± 95% CI "
        "| IQM [95% CI] | sb3-contrib TRPO, documented (v3, 3 seeds) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in vrows:
        ref = SB3_DOCUMENTED.get(r["task"].split("-")[0])
        md.append(
            f"| {r['task']} | {r['variant']} | {r['seeds']} | {r['budget']} "
            f"| {_fmt_ci(r['final_mean'], r['final_std'], r['seeds'])} "
            f"| {_fmt_ci(r['final_mean'], r['final_ci95'], r['seeds'])} "
            f"| {r['iqm']:.1f} [{r['iqm_lo']:.1f}, {r['iqm_hi']:.1f}] "
            f"| {f'{ref[0]} ± {ref[1]}' if ref else '—'} |"
        )
    return "\n".join(md) + "\n"


def efficiency_table(erows: list[dict[str, Any]]) -> str:
    """The sample-efficiency table: env steps to TRPO-exact's final training return."""
    md = [
        "| task | variant | seeds (TRPO-exact) | TRPO-exact's final training return "
        "| env steps to reach it: variant | TRPO-exact | ratio | variant's best seed-mean "
        "training return |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in erows:
        reached = math.isfinite(r["steps"])
        steps = f"{r['steps']:.0f}" if reached else "not reached"
        ratio = f"{r['ratio']:.3f}" if reached else "—"
        md.append(
            f"| {r['task']} | {r['variant']} | {r['seeds']} ({r['reference_seeds']}) "
            f"| {r['threshold']:.1f} | {steps} | {r['reference_steps']:.0f} | {ratio} "
            f"| {r['best_mean_return']:.1f} |"
        )
    return "\n".join(md) + "\n"
