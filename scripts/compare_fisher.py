"""Which Fisher is worth its cost in RL: a resumable grid of tasks × variants × seeds.

Every variant is an agent from :mod:`agents` (TRPO with each Fisher flavour, with and without
K-FAC-preconditioned CG, NPG, and the K-FAC natural actor-critic). At every ``--diag-every``-th
update, *before* the agent's own step and on the same batch, the study measures for each flavour:
its natural-gradient direction ``x_f ≈ (F_f + λI)⁻¹ g`` (the run's damping λ and CG budget), the
cosine between ``x_f`` and the exact direction (exact Fisher, CG to 100 iterations / tol 1e-10),
the KL actually realized by the δ-scaled step ``s_f`` and its predicted (``gᵀs_f``) versus actual
surrogate improvement, and the solve time. The run's own accepted step on that update is
compared with the same exact direction. Other updates carry no diagnostic cost. Diagnostics use
their own random seeds and their wall and CPU time are measured and left out of the run's costs,
so training is bit-identical to a run without them.

A grid folder (``--grid``) holds ``cells/<key>.json`` (the agent's config, the code's commit,
the final deterministic evaluation, wall and CPU totals) and ``cells/<key>.csv`` (a tidy table
with a ``record`` column: ``update`` rows with wall and process-CPU time, ``flavour`` rows,
one ``final`` row) per finished cell, each written atomically; a cell whose CSV exists is never
redone, so an interrupted grid continues where it stopped.

    nice -n 19 python scripts/compare_fisher.py run --grid docs/rl_grid --plan full --workers 1
    python scripts/compare_fisher.py report --grid docs/rl_grid    # tables + figures
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from agents import NPG, TRPO
from agents.base import OnPolicyNaturalAlgorithm, flat_params, set_flat_params
from agents.evaluation import evaluate_policy
from agents.kfac_nac import KFACNAC
from agents.presets import get_preset
from npg import make_fisher

TASKS = ("CartPole-v1", "Acrobot-v1", "Pendulum-v1", "Hopper-v5", "HalfCheetah-v5")
#: variant name -> (algorithm, constructor overrides)
#: (in priority order: the grid runs them in this order, so a cut-short study loses the last)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "trpo-exact": ("trpo", dict(fisher="exact")),
    "kfac-nac": ("kfac-nac", dict()),
    "trpo-kfac": ("trpo", dict(fisher="kfac", fisher_kwargs=dict(kfac_labels="mc"))),
    "trpo-mc": ("trpo", dict(fisher="mc")),
    "trpo-empirical": ("trpo", dict(fisher="empirical")),
    "trpo-diagonal": ("trpo", dict(fisher="diagonal")),
    "trpo-exact-pcg": ("trpo", dict(fisher="exact", preconditioner="kfac")),
    # ACKTR's own radius: K-FAC's predicted KL underestimates the realized one (see the report)
    "kfac-nac-d0.001": ("kfac-nac", dict(max_kl=0.001)),
    "kfac-nac-empirical": ("kfac-nac", dict(kfac_labels="empirical")),
    "trpo-mc-pcg": ("trpo", dict(fisher="mc", preconditioner="kfac")),
    "npg-exact": ("npg", dict(fisher="exact")),
    # K-FAC NAC's preset against one change each, for tuning on held-out seeds (kfac_nac.md)
    "kfac-nac-d0.02": ("kfac-nac", dict(max_kl=0.02)),
    "kfac-nac-lr1": ("kfac-nac", dict(lr=1.0)),
    "kfac-nac-damping0.1": ("kfac-nac", dict(damping=0.1)),
}
#: the short-budget study of docs/fisher_comparison.md (trpo-mc-pcg trimmed for time)
DEFAULT_VARIANTS = list(VARIANTS)[:9]
#: flavours measured on every diagnosed batch: name -> (make_fisher name, options, PCG?)
FLAVOURS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "exact": ("exact", {}, False),
    "exact-pcg": ("exact", {}, True),
    "mc": ("mc", {}, False),
    "empirical": ("empirical", {}, False),
    "diagonal": ("diagonal", {}, False),
    "kfac": ("kfac", dict(kfac_labels="mc"), False),
}
REF_ITERS, REF_TOL = 100, 1e-10
#: diagnosed updates: every DIAG_EVERY-th (measured overhead: docs/fisher_comparison.md)
DIAG_EVERY = 60
ALGOS: dict[str, type[OnPolicyNaturalAlgorithm]] = {"trpo": TRPO, "npg": NPG, "kfac-nac": KFACNAC}
#: ``run``'s default folder: outside the repository, so a trial grid never mixes with docs/rl_grid
SCRATCH_GRID = Path(tempfile.gettempdir()) / "npg" / "rl_grid"


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    task: str
    variant: str
    seed: int
    budget: int

    @property
    def key(self) -> str:
        return f"{self.task}__{self.variant}__s{self.seed}__{self.budget}"


# --- diagnostics ----------------------------------------------------------------------------------
def cosine(a: Tensor, b: Tensor) -> float:
    """``aᵀb / (‖a‖‖b‖)`` in float64 (NaN if either vector is zero)."""
    a64, b64 = a.double(), b.double()
    na, nb = float(a64.norm()), float(b64.norm())
    if na == 0.0 or nb == 0.0:
        return math.nan
    return float(a64 @ b64) / (na * nb)


def flavour_direction(
    flavour: str,
    actor: torch.nn.Module,
    family: Any,
    obs: Tensor,
    actions: Tensor,
    g: Tensor,
    damping: float,
    cg_iters: int,
    seed: int,
) -> tuple[Tensor, Any]:
    """``(x, F_f)`` with ``x ≈ (F_f + λI)⁻¹ g`` for a :data:`FLAVOURS` entry (direct solve, or CG
    with the run's budget; ``-pcg`` flavours precondition CG with the batch K-FAC)."""
    name, opts, pcg = FLAVOURS[flavour]
    common = dict(targets=actions, seed=seed)
    op = make_fisher(name, actor, obs, family, **common, **opts)
    if op.direct:
        return op.inverse_mv(g, damping), op
    pre = make_fisher("kfac", actor, obs, family, **common) if pcg else None
    return op.cg(g, damping, max_iter=cg_iters, tol=1e-10, preconditioner=pre).x, op


def exact_direction(
    actor: torch.nn.Module, family: Any, obs: Tensor, g: Tensor, damping: float
) -> tuple[Tensor, Any]:
    """The reference ``(F + λI)⁻¹ g`` with the exact Fisher, CG to ``REF_ITERS``/``REF_TOL``;
    also returns the operator (for ``sᵀFs`` of the taken step)."""
    op = make_fisher("exact", actor, obs, family)
    return op.cg(g, damping, max_iter=REF_ITERS, tol=REF_TOL).x, op


def with_diagnostics(cls: type[OnPolicyNaturalAlgorithm]) -> type[OnPolicyNaturalAlgorithm]:
    """A subclass of ``cls`` that measures every flavour on each diagnosed batch (see module
    docstring) and records the results in ``self.diag_rows``; training is unchanged."""

    class Diagnosed(cls):  # type: ignore[misc, valid-type]
        diag_every: int = 1
        diag_flavours: tuple[str, ...] = tuple(FLAVOURS)

        def _damping(self) -> float:
            return float(self.damping if isinstance(self, KFACNAC) else self.cg_damping)

        def _policy_update(self, obs: Tensor, actions: Tensor, advantages: Tensor) -> dict:
            if not hasattr(self, "diag_rows"):
                self.diag_rows: list[dict[str, Any]] = []
            if self.num_updates % self.diag_every != 0:  # not a diagnosed update: no extra cost
                m = super()._policy_update(obs, actions, advantages)
                return dict(m, time_diag=0.0, cpu_diag=0.0, cos_exact=math.nan,
                            quad_exact=math.nan)  # fmt: skip
            # the diagnostics' CPU is this thread's (the critic is being fitted concurrently in
            # another thread, whose CPU belongs to the training)
            t0, c0 = time.perf_counter(), time.thread_time()
            ref, op = self._diagnose(obs, actions, advantages)
            t_diag, c_diag = time.perf_counter() - t0, time.thread_time() - c0
            actor = self.policy.actor
            before = flat_params(actor).clone()
            m = super()._policy_update(obs, actions, advantages)
            step = flat_params(actor) - before
            m["cos_exact"] = math.nan
            m["quad_exact"] = math.nan
            t0, c0 = time.perf_counter(), time.thread_time()
            if float(step.abs().max()) > 0:
                m["cos_exact"] = cosine(step, ref)
                m["quad_exact"] = 0.5 * float(step @ op.mv(step))
            m["time_diag"] = t_diag + time.perf_counter() - t0
            m["cpu_diag"] = c_diag + time.thread_time() - c0
            return m

        @torch.no_grad()
        def _measure(self, obs, actions, advantages, old_out, old_logp, step) -> tuple:
            actor, family = self.policy.actor, self.family
            before = flat_params(actor).clone()
            set_flat_params(actor, before + step)
            new_out = actor(obs)
            kl = float(family.kl(old_out, new_out).mean())
            ratio = torch.exp(family.log_prob(new_out, actions) - old_logp)
            actual = float((ratio * advantages).mean()) - float(advantages.mean())
            set_flat_params(actor, before)
            return kl, actual

        def _diagnose(self, obs: Tensor, actions: Tensor, advantages: Tensor) -> tuple:
            actor, family = self.policy.actor, self.family
            lam, iters = self._damping(), int(self.cg_iters)
            old_out, old_logp, g, _ = self._surrogate_and_grad(obs, actions, advantages)
            t0 = time.perf_counter()
            ref, op = exact_direction(actor, family, obs, g, lam)
            t_ref = time.perf_counter() - t0
            delta = float(self.max_kl)
            base = dict(update=self.num_updates + 1, timesteps=self.num_timesteps)
            self.diag_rows.append(dict(base, flavour="exact-ref", cos=1.0, time_solve=t_ref))
            for i, fl in enumerate(self.diag_flavours):
                t0 = time.perf_counter()
                seed = 1_000_003 * (self.num_updates + 1) + i + 7 * int(self.seed)
                x, fop = flavour_direction(fl, actor, family, obs, actions, g, lam, iters, seed)
                t_solve = time.perf_counter() - t0
                row = dict(base, flavour=fl, cos=cosine(x, ref), time_solve=t_solve)
                # δ-scaled step with the flavour's own quadratic model (½ sᵀ(F_f+λI)s = δ),
                # measured with the exact Fisher's model too.
                xfx = float(x @ (fop.mv(x) + lam * x))
                if xfx > 0 and math.isfinite(xfx):
                    s = math.sqrt(2 * delta / xfx) * x
                    kl, actual = self._measure(obs, actions, advantages, old_out, old_logp, s)
                    row.update(
                        kl=kl,
                        kl_ratio=kl / delta,
                        quad_exact_ratio=0.5 * float(s @ op.mv(s)) / delta,
                        predicted_improvement=float(g @ s),
                        actual_improvement=actual,
                    )
                self.diag_rows.append(row)
            return ref, op

    Diagnosed.__name__ = f"Diagnosed{cls.__name__}"
    return Diagnosed


# --- one cell ---------------------------------------------------------------------------------
def cell_config(cell: Cell) -> tuple[type[OnPolicyNaturalAlgorithm], dict[str, Any]]:
    """The agent class and keyword arguments of a cell (the algorithm's preset + overrides)."""
    algo, overrides = VARIANTS[cell.variant]
    params = get_preset(algo, cell.task)
    params.pop("total_timesteps", None)
    params.update(overrides)
    return ALGOS[algo], params


UPDATE_KEYS = (
    "ep_return_mean", "kl", "predicted_kl", "step_scale", "surrogate_improvement",
    "predicted_improvement", "cos_exact", "quad_exact", "cg_iterations", "ls_backtracks",
    "ls_success", "explained_variance", "time_rollout", "time_fisher_cg", "time_line_search",
    "time_critic", "time_diag", "cpu_diag", "time_total",
)  # fmt: skip


def code_commit() -> str:
    """``git describe --always --dirty --abbrev=40`` of this checkout (``unknown`` outside git):
    the commit a cell's code came from, ``-dirty`` when tracked files had local changes."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def run_cell(
    cell: Cell, out: str, diag_every: int, eval_episodes: int, commit: str = "unknown"
) -> str:
    """Train one cell and write its record: ``cells/<key>.json`` (config, commit, final
    deterministic evaluation, costs), then ``cells/<key>.csv`` (per-update rows, the flavour
    diagnostics and the final row), each atomically; the CSV marks the cell done. Returns the key.

    ``cpu_s`` of an update is the process CPU time (all threads: the critic is fitted in a
    background thread) since the previous update, less the diagnostics' CPU time (their thread's);
    ``wall_s`` is the cumulative wall-clock of training without the diagnostics."""
    torch.set_num_threads(1)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cls, params = cell_config(cell)
    agent = with_diagnostics(cls)("MlpPolicy", cell.task, seed=cell.seed, num_threads=1, **params)
    agent.diag_every = diag_every
    algo = VARIANTS[cell.variant][0]
    ident = dict(task=cell.task, variant=cell.variant, algo=algo, seed=cell.seed,
                 budget=cell.budget, max_kl=float(agent.max_kl))  # fmt: skip
    rows: list[dict[str, Any]] = []
    clock = dict(wall=0.0, cpu=0.0, cpu_prev=time.process_time(), wall_diag=0.0, cpu_diag=0.0)

    def callback(m: dict[str, Any]) -> None:
        now = time.process_time()
        cpu = now - clock["cpu_prev"] - m["cpu_diag"]
        clock["cpu_prev"] = now
        clock["cpu"] += cpu
        clock["wall"] += m["time_total"] - m["time_diag"]
        clock["wall_diag"] += m["time_diag"]
        clock["cpu_diag"] += m["cpu_diag"]
        row = dict(ident, record="update", update=m["update"], timesteps=m["timesteps"],
                   wall_s=clock["wall"], cpu_s=clock["cpu"], cpu_update=cpu)  # fmt: skip
        row.update({k: m.get(k, math.nan) for k in UPDATE_KEYS})
        row["kl_ratio"] = m["kl"] / agent.max_kl
        rows.append(row)

    agent.learn(cell.budget, callback=callback)
    for d in getattr(agent, "diag_rows", []):
        rows.append(dict(ident, record="flavour", **d))
    t0 = time.perf_counter()
    ret = evaluate_policy(agent, eval_episodes)
    final = dict(eval_return=float(np.mean(ret)), eval_std=float(np.std(ret)))
    rows.append(dict(ident, record="final", timesteps=agent.num_timesteps, wall_s=clock["wall"],
                     cpu_s=clock["cpu"], **final))  # fmt: skip
    record = dict(
        cell=dataclasses.asdict(cell),
        key=cell.key,
        algo=algo,
        agent_class=cls.__name__,
        config=agent.config,
        commit=commit,
        started_utc=started,
        finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        timesteps=agent.num_timesteps,
        updates=agent.num_updates,
        diag_every=diag_every,
        eval=dict(episodes=eval_episodes, seed=10_000, deterministic=True, returns=ret, **final),
        train_wall_s=clock["wall"],
        train_cpu_s=clock["cpu"],
        diag_wall_s=clock["wall_diag"],
        diag_cpu_s=clock["cpu_diag"],
        eval_wall_s=time.perf_counter() - t0,
        versions=dict(
            python=sys.version.split()[0], torch=torch.__version__, numpy=np.__version__
        ),  # fmt: skip
    )
    agent.close()
    cells = Path(out) / "cells"
    write_json(cells / f"{cell.key}.json", record)
    write_rows(cells / f"{cell.key}.csv", rows)
    return cell.key


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _fmt(v: Any) -> Any:
    """Floats with 7 significant digits (the cells are committed: keeps them small)."""
    return f"{v:.7g}" if isinstance(v, float) else v


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write dict rows (union of keys) to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: _fmt(v) for k, v in r.items()} for r in rows)
    os.replace(tmp, path)


def merge(out: Path) -> Path:
    """Concatenate every finished cell into ``fisher_study.csv`` (one tidy table)."""
    rows: list[dict[str, Any]] = []
    for p in sorted((out / "cells").glob("*.csv")):
        with p.open() as f:
            rows += list(csv.DictReader(f))
    target = out / "fisher_study.csv"
    write_rows(target, rows)
    return target


def pending(cells: Iterable[Cell], out: Path) -> list[Cell]:
    """Cells whose result file does not exist yet."""
    return [c for c in cells if not (out / "cells" / f"{c.key}.csv").exists()]


def _worker(args: tuple[Cell, str, int, int, str]) -> tuple[str, float, str | None]:
    t0 = time.perf_counter()
    try:
        return run_cell(*args), time.perf_counter() - t0, None
    except Exception as e:
        return args[0].key, time.perf_counter() - t0, f"{type(e).__name__}: {e}"


def run_grid(
    cells: list[Cell],
    out: Path,
    workers: int,
    diag_every: int,
    eval_episodes: int,
    merge_table: bool = False,
) -> list[str]:
    """Run the cells not yet finished, in order (``workers`` processes); returns the keys
    trained. ``merge_table`` also rewrites ``fisher_study.csv`` (for ``plot_fisher.py``)."""
    todo = pending(cells, out)
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run",
          flush=True)  # fmt: skip
    commit = code_commit()
    args = [(c, str(out), diag_every, eval_episodes, commit) for c in todo]
    done: list[str] = []
    if workers <= 1:
        results: Iterable = map(_worker, args)
    else:
        pool = mp.get_context("spawn").Pool(workers, maxtasksperchild=1)
        results = pool.imap_unordered(_worker, args)
    for key, secs, err in results:
        status = "FAILED " + err if err else "ok"
        print(f"{time.strftime('%H:%M:%S')} {key}: {secs:.0f}s {status}", flush=True)
        if not err:
            done.append(key)
            if merge_table:
                merge(out)
    if workers > 1:
        pool.close()
        pool.join()
    if merge_table:
        merge(out)
    return done


def build_cells(tasks: list[str], variants: list[str], seeds: list[int],
                budgets: dict[str, int]) -> list[Cell]:  # fmt: skip
    """The grid: variants in the given priority order, within one the longest tasks first."""
    cells = [Cell(t, v, s, budgets[t]) for t in tasks for v in variants for s in seeds]
    return sorted(cells, key=lambda c: (variants.index(c.variant), c.task not in MUJOCO))


MUJOCO = ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5")
CLASSIC = ("CartPole-v1", "Acrobot-v1", "Pendulum-v1")
#: the other TRPO flavours of the full-budget grid
TRPO_FLAVOURS = ("trpo-exact-pcg", "trpo-kfac", "trpo-mc", "trpo-empirical", "trpo-diagonal")


def preset_budget(task: str, algo: str = "trpo") -> int:
    """The env steps of ``task``'s tuned preset (1M on MuJoCo, 100k on classic control)."""
    return int(get_preset(algo, task)["total_timesteps"])


def full_budget_grid() -> list[Cell]:
    """The full-budget grid in the order its cells are worth most: TRPO-exact on the MuJoCo
    tasks (seeds 0-4, seed-major, so three tasks × three seeds land first) with the cheap
    classic-control cells interleaved; then K-FAC NAC (seeds 0-2); then the other TRPO flavours
    (seeds 0-2); then NPG-exact (seeds 0-4) and K-FAC NAC's seeds 3-4; then LunarLander-v3.
    Every cell runs its task's preset budget."""

    def rounds(variants: tuple[str, ...], tasks: tuple[str, ...], seeds: range) -> list[Cell]:
        return [Cell(t, v, s, preset_budget(t)) for s in seeds for v in variants for t in tasks]

    cells = rounds(("trpo-exact",), MUJOCO + CLASSIC, range(5))
    cells += rounds(("kfac-nac",), MUJOCO + CLASSIC, range(3))
    cells += rounds(TRPO_FLAVOURS, MUJOCO + CLASSIC, range(3))
    cells += rounds(("npg-exact",), MUJOCO + CLASSIC, range(5))
    cells += rounds(("kfac-nac",), MUJOCO + CLASSIC, range(3, 5))
    cells += rounds(("trpo-exact", "npg-exact", "kfac-nac"), ("LunarLander-v3",), range(5))
    cells += rounds(TRPO_FLAVOURS, ("LunarLander-v3",), range(3))
    assert len(set(cells)) == len(cells) and all(c.variant in VARIANTS for c in cells)
    return cells


def _budgets(entries: list[str], tasks: list[str]) -> dict[str, int]:
    budgets = {t: preset_budget(t) for t in tasks if "total_timesteps" in get_preset("trpo", t)}
    for b in entries:
        t, sep, n = b.rpartition("=")
        if sep:
            budgets[t] = int(n)
        else:
            budgets |= {t: int(n) for t in tasks}
    missing = [t for t in tasks if t not in budgets]
    if missing:
        raise SystemExit(f"--budget: no budget for {', '.join(missing)} (give TASK=N)")
    return budgets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="examples:\n  python scripts/compare_fisher.py run --grid docs/rl_grid --plan full "
        "--workers 1\n  python scripts/compare_fisher.py report --grid docs/rl_grid",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train the cells of a grid not finished yet (resumable)")
    r.add_argument("--grid", "--out", dest="grid", default=str(SCRATCH_GRID),
                   help="grid folder: cells/<key>.json + .csv per finished cell (default: "
                   f"{SCRATCH_GRID}; the committed grid: docs/rl_grid)")  # fmt: skip
    r.add_argument("--plan", choices=("full", "custom"), default="custom",
                   help="full: the full-budget grid of full_budget_grid() in priority order; "
                   "custom: --tasks × --variants × --seeds")  # fmt: skip
    r.add_argument("--tasks", nargs="*", default=list(TASKS), help="custom plan: env ids")
    r.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                   help="custom plan: variants, in priority order")  # fmt: skip
    r.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="custom plan: seeds")
    r.add_argument("--budget", nargs="*", default=[],
                   help="custom plan: env steps per run, N or TASK=N (later ones win; "
                   "default: the task's preset budget)")  # fmt: skip
    r.add_argument("--workers", type=int, default=1, help="cells trained in parallel")
    r.add_argument("--diag-every", type=int, default=DIAG_EVERY,
                   help="diagnose every k-th update (all flavours on the same batch)")  # fmt: skip
    r.add_argument("--eval-episodes", type=int, default=10,
                   help="deterministic evaluation episodes of the final policy")  # fmt: skip
    r.add_argument("--limit", type=int, default=None, help="run at most this many cells")
    r.add_argument("--merge-table", action="store_true",
                   help="also write fisher_study.csv (one table; plot_fisher.py)")  # fmt: skip
    r.add_argument("--list", action="store_true", help="print the pending cells and exit")
    rep = sub.add_parser("report", help="tables and figures from a grid's committed cells")
    rep.add_argument("--grid", default="docs/rl_grid", help="grid folder")
    rep.add_argument("--reps", type=int, default=20_000, help="bootstrap resamples")
    a = p.parse_args(argv)
    if a.command == "report":
        from scripts import grid_report

        print(grid_report.report(Path(a.grid), reps=a.reps))
        return 0
    if a.plan == "full":
        cells = full_budget_grid()
    else:
        cells = build_cells(a.tasks, a.variants, a.seeds, _budgets(a.budget, a.tasks))
    grid = Path(a.grid)
    if a.list:
        for c in pending(cells, grid):
            print(c.key)
        return 0
    if a.limit is not None:
        cells = pending(cells, grid)[: a.limit]
    run_grid(cells, grid, a.workers, a.diag_every, a.eval_episodes, a.merge_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
