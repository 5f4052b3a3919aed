"""Which Fisher is worth its cost in RL: a resumable grid of tasks × variants × seeds.

Every variant is an agent from :mod:`agents` (TRPO with each Fisher flavour, with and without
K-FAC-preconditioned CG, and the K-FAC natural actor-critic). At every update the exact direction
(below) is computed and the run's own step compared with it; at every ``--diag-every``-th update,
*before* the agent's own step and on the same batch, the study also measures for each flavour:
its natural-gradient direction ``x_f ≈ (F_f + λI)⁻¹ g`` (the run's damping λ and CG budget), the
cosine between ``x_f`` and the exact direction (exact Fisher, CG to 100 iterations / tol 1e-10),
the KL actually realized by the δ-scaled step ``s_f`` and its predicted (``gᵀs_f``) versus actual
surrogate improvement, and the solve time. The run's own accepted step is compared with the same
exact direction. Diagnostics use their own random seeds and are timed separately, so training
(and its wall-clock) is the same as without them.

Output (``--out``): ``cells/<cell>.csv`` per finished run (written atomically; a cell whose file
exists is never redone) and ``fisher_study.csv``, their concatenation: one tidy table with a
``record`` column — ``update`` (the run's own per-update metrics), ``flavour`` (one flavour's
diagnostics on that update's batch) and ``final`` (deterministic evaluation return).

    python scripts/compare_fisher.py --out docs/fisher_comparison --workers 2   # the study
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from agents import TRPO  # noqa: E402
from agents.base import OnPolicyNaturalAlgorithm, flat_params, set_flat_params  # noqa: E402
from agents.evaluation import evaluate_policy  # noqa: E402
from agents.kfac_nac import KFACNAC  # noqa: E402
from agents.presets import get_preset  # noqa: E402
from npg import make_fisher  # noqa: E402

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
}
#: the study as run for docs/fisher_comparison.md (trpo-mc-pcg trimmed for time)
DEFAULT_VARIANTS = list(VARIANTS)[:9]
DEFAULT_BUDGETS = ["20480", "Hopper-v5=32768", "HalfCheetah-v5=32768"]
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
ALGOS: dict[str, type[OnPolicyNaturalAlgorithm]] = {"trpo": TRPO, "kfac-nac": KFACNAC}


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
    if hasattr(op, "inverse_mv"):
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
            all_flavours = self.num_updates % self.diag_every == 0
            t0 = time.perf_counter()
            ref, op = self._diagnose(obs, actions, advantages, all_flavours)
            t_diag = time.perf_counter() - t0
            actor = self.policy.actor
            before = flat_params(actor).clone()
            m = super()._policy_update(obs, actions, advantages)
            step = flat_params(actor) - before
            m["time_diag"] = t_diag
            m["cos_exact"] = math.nan
            m["quad_exact"] = math.nan
            if float(step.abs().max()) > 0:
                t0 = time.perf_counter()
                m["cos_exact"] = cosine(step, ref)
                m["quad_exact"] = 0.5 * float(step @ op.mv(step))
                m["time_diag"] += time.perf_counter() - t0
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

        def _diagnose(
            self, obs: Tensor, actions: Tensor, advantages: Tensor, all_flavours: bool
        ) -> tuple:
            actor, family = self.policy.actor, self.family
            lam, iters = self._damping(), int(self.cg_iters)
            old_out, old_logp, g, _ = self._surrogate_and_grad(obs, actions, advantages)
            t0 = time.perf_counter()
            ref, op = exact_direction(actor, family, obs, g, lam)
            t_ref = time.perf_counter() - t0
            delta = float(self.max_kl)
            base = dict(update=self.num_updates + 1, timesteps=self.num_timesteps)
            self.diag_rows.append(dict(base, flavour="exact-ref", cos=1.0, time_solve=t_ref))
            for i, fl in enumerate(self.diag_flavours if all_flavours else ()):
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
    "time_critic", "time_diag", "time_total",
)  # fmt: skip


def run_cell(cell: Cell, out: str, diag_every: int, eval_episodes: int) -> str:
    """Train one cell and write ``cells/<key>.csv`` atomically; returns the key."""
    torch.set_num_threads(1)
    cls, params = cell_config(cell)
    agent = with_diagnostics(cls)("MlpPolicy", cell.task, seed=cell.seed, num_threads=1, **params)
    agent.diag_every = diag_every
    algo = VARIANTS[cell.variant][0]
    ident = dict(task=cell.task, variant=cell.variant, algo=algo, seed=cell.seed,
                 budget=cell.budget, max_kl=float(agent.max_kl))  # fmt: skip
    rows: list[dict[str, Any]] = []
    wall = [0.0]

    def callback(m: dict[str, Any]) -> None:
        wall[0] += m["time_total"] - m.get("time_diag", 0.0)
        row = dict(ident, record="update", update=m["update"], timesteps=m["timesteps"],
                   wall_s=wall[0])  # fmt: skip
        row.update({k: m.get(k, math.nan) for k in UPDATE_KEYS})
        row["kl_ratio"] = m["kl"] / agent.max_kl
        rows.append(row)

    agent.learn(cell.budget, callback=callback)
    for d in getattr(agent, "diag_rows", []):
        rows.append(dict(ident, record="flavour", **d))
    ret = evaluate_policy(agent, eval_episodes)
    final = dict(eval_return=float(np.mean(ret)), eval_std=float(np.std(ret)))
    rows.append(dict(ident, record="final", timesteps=agent.num_timesteps, wall_s=wall[0], **final))
    agent.close()
    write_rows(Path(out) / "cells" / f"{cell.key}.csv", rows)
    return cell.key


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
        w.writerows(rows)
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


def _worker(args: tuple[Cell, str, int, int]) -> tuple[str, float, str | None]:
    t0 = time.perf_counter()
    try:
        return run_cell(*args), time.perf_counter() - t0, None
    except Exception as e:  # noqa: BLE001 — report and keep the grid going
        return args[0].key, time.perf_counter() - t0, f"{type(e).__name__}: {e}"


def run_grid(
    cells: list[Cell], out: Path, workers: int, diag_every: int, eval_episodes: int
) -> list[str]:
    """Run the cells not yet finished (``workers`` processes); returns the keys trained."""
    todo = pending(cells, out)
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run",
          flush=True)  # fmt: skip
    args = [(c, str(out), diag_every, eval_episodes) for c in todo]
    done: list[str] = []
    if workers <= 1:
        results: Iterable = map(_worker, args)
    else:
        pool = mp.get_context("spawn").Pool(workers, maxtasksperchild=1)
        results = pool.imap_unordered(_worker, args)
    for key, secs, err in results:
        status = "FAILED " + err if err else "ok"
        print(f"{key}: {secs:.0f}s {status}", flush=True)
        if not err:
            done.append(key)
            merge(out)
    if workers > 1:
        pool.close()
        pool.join()
    merge(out)
    return done


def build_cells(tasks: list[str], variants: list[str], seeds: list[int],
                budgets: dict[str, int]) -> list[Cell]:  # fmt: skip
    """The grid: variants in the given priority order, within one the longest tasks first."""
    cells = [Cell(t, v, s, budgets[t]) for t in tasks for v in variants for s in seeds]
    mujoco = {"Hopper-v5", "HalfCheetah-v5", "Walker2d-v5"}
    return sorted(cells, key=lambda c: (variants.index(c.variant), c.task not in mujoco))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/fisher_comparison")
    p.add_argument("--tasks", nargs="*", default=list(TASKS))
    p.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--budget", nargs="*", default=DEFAULT_BUDGETS,
                   help="env steps per run: N, or TASK=N entries (later ones win)")  # fmt: skip
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--diag-every", type=int, default=4)
    p.add_argument("--eval-episodes", type=int, default=5)
    a = p.parse_args(argv)
    budgets: dict[str, int] = {}
    for b in a.budget:
        if "=" in b:
            t, n = b.split("=")
            budgets[t] = int(n)
        else:
            budgets = {t: int(b) for t in a.tasks} | budgets
    cells = build_cells(a.tasks, a.variants, a.seeds, budgets)
    run_grid(cells, Path(a.out), a.workers, a.diag_every, a.eval_episodes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
