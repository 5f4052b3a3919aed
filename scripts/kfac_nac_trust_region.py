"""Does K-FAC NAC keep its trust region? Realized KL / δ per update, clip against clip.

For each configuration and seed, K-FAC NAC trains ``--updates`` updates on ``--env`` with its
preset and records, per update: the realized mean KL(π_old ‖ π_new) / δ of the taken step, the
KL that the running K-FAC model predicts for that same step (½ sᵀF̂s) and the true Fisher's
quadratic (½ sᵀFs at θ_old), the step's scale, the realized-KL rescales, and, every
``--cos-every``-th update, the cosine between the step and the exact natural gradient
(F + λI)⁻¹g (CG to 100 iterations on the exact Fisher, λ the run's damping). The diagnostics
run outside the update's timers; the cell's CPU time per update excludes them.

Configurations (``CONFIGS``): ``kfac-model`` is ACKTR's clip with the K-FAC model and no check
of the realized KL; ``exact`` is the default clip (true Fisher at θ_old, realized KL enforced);
``exact-fresh`` adds fresh factors each update (``kfac_decay=0``) instead of the running average,
``exact-fresh-lr1`` also a step multiplier of 1 (so that the clip, not lr, sets the step length).

    python scripts/kfac_nac_trust_region.py --out docs/kfac_nac   # Hopper-v5, 3 seeds, 50 updates
    python scripts/kfac_nac_trust_region.py --out docs/kfac_nac --report-only

Cells (``<out>/cells/<config>_s<seed>.csv``) are written atomically when a run finishes and are
never redone; ``<out>/summary.md`` is regenerated from the cells.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from agents.base import flat_params
from agents.kfac_nac import KFACNAC
from agents.presets import get_preset
from npg import make_fisher
from scripts.compare_fisher import write_rows

CONFIGS: dict[str, dict[str, Any]] = {
    "kfac-model": dict(kl_clip="kfac-model-damped", kl_enforce=False),
    "exact": dict(kl_clip="exact"),
    "exact-fresh": dict(kl_clip="exact", kfac_decay=0.0),
    "exact-fresh-lr1": dict(kl_clip="exact", kfac_decay=0.0, lr=1.0),
}


class Diagnosed(KFACNAC):
    """K-FAC NAC that measures each taken step against the K-FAC model and the true Fisher."""

    cos_every = 5

    def _policy_update(self, obs: Tensor, actions: Tensor, advantages: Tensor) -> dict[str, Any]:
        old = copy.deepcopy(self.policy.actor)
        want_cos = self.num_updates % self.cos_every == 0
        g = self._surrogate_and_grad(obs, actions, advantages)[2] if want_cos else None
        cpu0 = time.process_time()
        m = super()._policy_update(obs, actions, advantages)
        m["cpu_update_s"] = time.process_time() - cpu0
        step = flat_params(self.policy.actor) - flat_params(old)
        exact = make_fisher("exact", old, obs, self.family)
        with torch.no_grad():
            m["kfac_model_quad"] = 0.5 * float(step @ self.actor_optimizer.kfac_mv(step))
            m["exact_quad"] = 0.5 * float(step @ exact.mv(step))
        m["cos_exact"] = math.nan
        if g is not None and float(step.abs().max()) > 0:
            ref = exact.cg(g, self.damping, max_iter=100, tol=1e-10).x
            m["cos_exact"] = float(step.double() @ ref.double()) / float(
                step.double().norm() * ref.double().norm()
            )
        return m


def run_cell(env: str, config: str, seed: int, updates: int, cos_every: int) -> list[dict]:
    """Train one configuration on one seed for ``updates`` updates; one row per update."""
    params = get_preset("kfac-nac", env)
    params.pop("total_timesteps", None)
    params.update(CONFIGS[config])
    agent = Diagnosed("MlpPolicy", env, seed=seed, **params)
    agent.cos_every = cos_every
    delta = float(agent.max_kl)
    rows: list[dict] = []

    def record(m: dict[str, Any]) -> None:
        rows.append(
            dict(
                update=m["update"],
                timesteps=m["timesteps"],
                ep_return_mean=m["ep_return_mean"],
                kl_ratio=m["kl"] / delta,
                kfac_model_kl_ratio=m["kfac_model_quad"] / delta,
                exact_quad_kl_ratio=m["exact_quad"] / delta,
                step_scale=m["step_scale"],
                rescales=m["kl_rescales"],
                step_status=m["step_status"],
                cos_exact=m["cos_exact"],
                cpu_update_s=m["cpu_update_s"],
            )
        )

    agent.learn(updates * agent.n_envs * agent.n_steps, callback=record)
    agent.close()
    return rows


def summarize(cells: Path) -> str:
    """The summary table (markdown) of every finished cell, per configuration."""
    by_config: dict[str, list[list[dict]]] = {}
    for path in sorted(cells.glob("*.csv")):
        config = path.stem.rsplit("_s", 1)[0]
        with path.open() as f:
            by_config.setdefault(config, []).append(list(csv.DictReader(f)))
    lines = [
        "| config | seeds | updates | realized KL/δ: median | max | updates > 1.05 δ | "
        "realized / K-FAC-model KL: median | rejected steps | mean cos to exact NG | "
        "return at last update (per seed) | CPU s per policy step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in CONFIGS:
        runs = by_config.get(config)
        if not runs:
            continue
        rows = [r for run in runs for r in run]
        taken = [r for r in rows if r["step_status"] == "ok"]
        ratio = [float(r["kl_ratio"]) for r in taken]
        under = [
            float(r["kl_ratio"]) / float(r["kfac_model_kl_ratio"])
            for r in taken
            if float(r["kfac_model_kl_ratio"]) > 0
        ]
        cos = [float(r["cos_exact"]) for r in rows if r["cos_exact"] not in ("", "nan")]
        finals = ", ".join(f"{float(run[-1]['ep_return_mean']):.0f}" for run in runs)
        lines.append(
            f"| {config} | {len(runs)} | {len(rows)} | {statistics.median(ratio):.2f} | "
            f"{max(ratio):.2f} | {sum(x > 1.05 for x in ratio)} | {statistics.median(under):.1f} "
            f"| {len(rows) - len(taken)} | {statistics.fmean(cos):.3f} | {finals} | "
            f"{statistics.median(float(r['cpu_update_s']) for r in rows):.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/kfac_nac_trust_region"))
    p.add_argument("--env", default="Hopper-v5")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--updates", type=int, default=50)
    p.add_argument("--cos-every", type=int, default=5)
    p.add_argument("--report-only", action="store_true", help="only regenerate summary.md")
    args = p.parse_args(argv)
    cells = args.out / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for config in [] if args.report_only else args.configs:
        for seed in args.seeds:
            path = cells / f"{config}_s{seed}.csv"
            if path.exists():
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            write_rows(path, run_cell(args.env, config, seed, args.updates, args.cos_every))
            print(f"{path.name}: {time.perf_counter() - t0:.0f} s wall, "
                  f"{time.process_time() - c0:.0f} s CPU", flush=True)  # fmt: skip
    (args.out / "summary.md").write_text(summarize(cells))
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
