"""The full-budget grid: a cell's record, the plan, and the aggregate statistics of the report
(IQM and its stratified-bootstrap interval against exhaustive enumeration)."""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from scripts import compare_fisher as cf
from scripts import grid_report as gr
from scripts import plot_fisher as pf


def test_iqm_hand_computed() -> None:
    # 8 scores: drop the 2 lowest and 2 highest, mean of 3, 4, 5, 6
    assert gr.iqm(np.arange(1.0, 9.0)) == pytest.approx(4.5)
    # 4 scores: drop one each side -> mean(2, 3); the outlier 100 does not move it
    assert gr.iqm(np.array([3.0, 1.0, 100.0, 2.0])) == pytest.approx(2.5)
    # runs × tasks: the IQM pools every score
    assert gr.iqm(np.array([[1.0, 5.0], [2.0, 6.0], [3.0, 7.0], [4.0, 8.0]])) == pytest.approx(4.5)


def test_student_t_interval_hand_computed() -> None:
    m, hw, n = pf.ci95([1.0, 2.0, 3.0])  # sd 1, t_{0.975, 2} = 4.303
    assert (m, n) == (2.0, 3)
    assert hw == pytest.approx(4.303 / math.sqrt(3))


def _exact_quantiles(values: list[float], lo: float, hi: float) -> tuple[float, float]:
    """Quantiles of the uniform distribution on ``values`` (all resamples equally likely),
    asserting each lies on a step of the CDF that straddles q with a margin (so the quantile of
    a large bootstrap sample equals it)."""
    v = np.asarray(values)
    out = []
    for q in (lo, hi):
        x = float(np.sort(v)[int(np.ceil(q * len(v))) - 1])
        assert np.mean(v < x) < q - 0.003 and np.mean(v <= x) > q + 0.003
        out.append(x)
    return out[0], out[1]


def test_stratified_bootstrap_matches_enumeration() -> None:
    """Two tasks × three runs: the bootstrap distribution of the IQM is the IQM over all
    3³ · 3³ = 729 equally likely stratified resamples (runs drawn within each task)."""
    scores = np.array([[0.0, 20.0], [2.0, 21.0], [9.0, 23.0]])
    stats = []
    for a in itertools.product(range(3), repeat=3):
        for b in itertools.product(range(3), repeat=3):
            stats.append(gr.iqm(np.stack([scores[list(a), 0], scores[list(b), 1]], 1)))
    lo, hi = _exact_quantiles(stats, 0.025, 0.975)
    point, blo, bhi = gr.iqm_ci(scores, reps=100_000, seed=1)
    assert point == pytest.approx(gr.iqm(scores))
    assert (blo, bhi) == pytest.approx((lo, hi))
    # pooling the tasks (an unstratified bootstrap over all six scores) gives another interval
    pooled = [gr.iqm(scores.reshape(-1)[list(i)]) for i in itertools.product(range(6), repeat=6)]
    assert _exact_quantiles(pooled, 0.025, 0.975) != (lo, hi)


def test_bootstrap_of_equal_scores_is_a_point() -> None:
    assert gr.iqm_ci(np.full(5, 7.0), reps=1000) == (7.0, 7.0, 7.0)


def test_full_grid_plan() -> None:
    cells = cf.full_budget_grid()
    assert len(set(cells)) == len(cells)
    first = cells[:3]
    assert [(c.task, c.variant, c.seed) for c in first] == [
        ("Hopper-v5", "trpo-exact", 0),
        ("HalfCheetah-v5", "trpo-exact", 0),
        ("Walker2d-v5", "trpo-exact", 0),
    ]
    # TRPO-exact on MuJoCo, 5 seeds at 1M, all before any other variant
    n_exact = sum(c.variant == "trpo-exact" and c.task in cf.MUJOCO for c in cells)
    assert n_exact == 15 and all(c.budget == 1_000_000 for c in cells if c.task in cf.MUJOCO)
    assert cells.index(next(c for c in cells if c.variant != "trpo-exact")) == 30
    assert all(c.budget == 100_000 for c in cells if c.task in cf.CLASSIC)
    # K-FAC NAC's first three seeds come next, before the other TRPO flavours
    assert {c.variant for c in cells[30:48]} == {"kfac-nac"}
    seeds = {v: {c.seed for c in cells if c.variant == v} for v in {c.variant for c in cells}}
    assert seeds["trpo-exact"] == seeds["npg-exact"] == seeds["kfac-nac"] == set(range(5))
    assert all(seeds[v] == {0, 1, 2} for v in cf.TRPO_FLAVOURS)


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two CartPole cells of 3 updates (2 × 512 steps each), diagnosed every 2nd update."""
    out = tmp_path_factory.mktemp("grid")
    cells = cf.build_cells(["CartPole-v1"], ["trpo-exact"], [0, 1], {"CartPole-v1": 3 * 1024})
    assert cf.run_grid(cells, out, workers=1, diag_every=2, eval_episodes=3) == [
        c.key for c in cells
    ]
    return out


def test_cell_record(tiny_grid: Path) -> None:
    key = cf.Cell("CartPole-v1", "trpo-exact", 0, 3 * 1024).key
    rec = json.loads((tiny_grid / "cells" / f"{key}.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", rec["commit"])
    assert rec["cell"] == dict(task="CartPole-v1", variant="trpo-exact", seed=0, budget=3072)
    _, params = cf.cell_config(cf.Cell("CartPole-v1", "trpo-exact", 0, 0))
    assert {k: rec["config"][k] for k in params} == params  # the preset, as run
    assert rec["config"]["seed"] == 0 and rec["config"]["env_id"] == "CartPole-v1"
    ev = rec["eval"]
    assert ev["deterministic"] and ev["episodes"] == len(ev["returns"]) == 3
    assert ev["eval_return"] == pytest.approx(np.mean(ev["returns"]))
    assert rec["updates"] == 3 and rec["timesteps"] == 3072 and rec["diag_every"] == 2
    assert rec["train_cpu_s"] > 0 and rec["train_wall_s"] > 0 and rec["diag_cpu_s"] > 0
    with (tiny_grid / "cells" / f"{key}.csv").open() as f:
        rows = list(csv.DictReader(f))
    ups = [r for r in rows if r["record"] == "update"]
    assert [int(r["update"]) for r in ups] == [1, 2, 3]
    # diagnosed updates 1 and 3 (every 2nd, from the first): the others cost nothing extra
    assert [float(r["time_diag"]) > 0 for r in ups] == [True, False, True]
    assert [math.isfinite(float(r["cos_exact"])) for r in ups] == [True, False, True]
    assert sum(r["record"] == "flavour" for r in rows) == 2 * (1 + len(cf.FLAVOURS))
    cpu = [float(r["cpu_update"]) for r in ups]
    assert all(c > 0 for c in cpu)
    assert float(ups[-1]["cpu_s"]) == pytest.approx(sum(cpu), rel=1e-5)
    assert rec["train_cpu_s"] == pytest.approx(sum(cpu), rel=1e-5)
    (final,) = [r for r in rows if r["record"] == "final"]
    assert float(final["eval_return"]) == pytest.approx(ev["eval_return"], rel=1e-6)


def test_resume_redoes_nothing(tiny_grid: Path) -> None:
    cells = cf.build_cells(["CartPole-v1"], ["trpo-exact"], [0, 1], {"CartPole-v1": 3 * 1024})
    files = sorted((tiny_grid / "cells").iterdir())
    stamps = [p.stat().st_mtime_ns for p in files]
    assert cf.pending(cells, tiny_grid) == []
    assert cf.run_grid(cells, tiny_grid, workers=1, diag_every=2, eval_episodes=3) == []
    assert sorted((tiny_grid / "cells").iterdir()) == files
    assert [p.stat().st_mtime_ns for p in files] == stamps


def test_report_from_cells(tiny_grid: Path) -> None:
    text = gr.report(tiny_grid, reps=2000)
    for name in (
        "summary.md",
        "returns.md",
        "summary.csv",
        "return_vs_steps.png",
        "return_vs_cpu.png",
    ):
        assert (tiny_grid / name).stat().st_size > 0
    with (tiny_grid / "summary.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    evals = [
        json.loads(p.read_text())["eval"]["eval_return"]
        for p in sorted((tiny_grid / "cells").glob("*.json"))
    ]
    assert int(row["seeds"]) == 2
    assert float(row["final_mean"]) == pytest.approx(np.mean(evals))
    assert float(row["final_std"]) == pytest.approx(np.std(evals, ddof=1))
    assert "| CartPole-v1 | trpo-exact | 2 |" in text
    assert f"still to run ({len(cf.full_budget_grid())})" in text


def test_report_refreshes_the_pages_that_quote_it(tmp_path: Path) -> None:
    page = tmp_path / "results.md"
    page.write_text(
        "intro\n<!-- begin: g/returns.md -->\nstale table\n<!-- end: g/returns.md -->\n"
        "middle\n<!-- begin: g/status.md -->\n<!-- end: g/status.md -->\noutro\n"
    )
    generated = {"returns.md": "| new | table |\n", "status.md": "3 of 5 done.\n"}
    assert gr.fill_page(page, "g", generated)
    assert page.read_text() == (
        "intro\n<!-- begin: g/returns.md -->\n| new | table |\n<!-- end: g/returns.md -->\n"
        "middle\n<!-- begin: g/status.md -->\n3 of 5 done.\n<!-- end: g/status.md -->\noutro\n"
    )
    assert not gr.fill_page(page, "g", generated)  # idempotent
    assert not gr.fill_page(page, "other", generated)  # another grid's markers only
    page.write_text("<!-- begin: g/nope.md -->\n<!-- end: g/nope.md -->\n")
    with pytest.raises(ValueError, match="g/nope.md"):
        gr.fill_page(page, "g", generated)


def _synthetic_cell(returns: list[float], step: int = 10) -> dict:
    rows = [
        dict(record="update", timesteps=str(step * (i + 1)), cpu_s="0", ep_return_mean=str(r))
        for i, r in enumerate(returns)
    ]
    return {"rows": rows}


def test_efficiency_against_a_hand_computed_case() -> None:
    by = {
        ("T", "trpo-exact"): [_synthetic_cell([0, 1, 2, 4]), _synthetic_cell([0, 1, 3, 4])],
        ("T", "fast"): [_synthetic_cell([0, 4, 5, 5]), _synthetic_cell([0, 2, 5, 6])],
        ("T", "slow"): [_synthetic_cell([0, 1, 1, 3])],
    }
    # threshold: TRPO-exact's mean final return 4, which its mean curve (0, 1, 2.5, 4) reaches
    # at step 40; "fast"'s mean curve (0, 3, 5, 5.5) reaches it at step 30; "slow" never does
    fast, slow = gr.efficiency_rows(by)
    assert (fast["variant"], fast["threshold"], fast["steps"], fast["reference_steps"]) == (
        "fast", 4.0, 30.0, 40.0,
    )  # fmt: skip
    assert fast["ratio"] == 0.75 and fast["best_mean_return"] == 5.5
    assert math.isnan(slow["steps"]) and slow["reference_steps"] == 40.0
    table = gr.efficiency_table([fast, slow])
    assert "| T | fast | 2 (2) | 4.0 | 30 | 40 | 0.750 | 5.5 |" in table
    assert "| T | slow | 1 (2) | 4.0 | not reached | 40 | — | 3.0 |" in table
