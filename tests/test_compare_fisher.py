"""The Fisher study's diagnostics (cosine to the exact direction) and its resumability."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from npg.families import Categorical, GaussianRegression
from scripts import compare_fisher as cf


def test_cosine_hand_values() -> None:
    assert cf.cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(
        1 / math.sqrt(2)
    )
    assert cf.cosine(torch.tensor([1.0, 2.0]), torch.tensor([-2.0, -4.0])) == pytest.approx(-1)
    assert math.isnan(cf.cosine(torch.zeros(2), torch.ones(2)))


def test_diagonal_vs_exact_hand_computed() -> None:
    """Linear model y = wᵀx, unit-variance Gaussian, X = [[1, 0], [1, 1]]: F = XᵀX/2 =
    [[1, ½], [½, ½]], F⁻¹g = (2, -2) and diag(F)⁻¹g = (1, 0) for g = (1, 0), cosine 1/√2."""
    model = nn.Linear(2, 1, bias=False)
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    fam = GaussianRegression(1.0)
    g = torch.tensor([1.0, 0.0])
    ref, _ = cf.exact_direction(model, fam, x, g, 0.0)
    torch.testing.assert_close(ref, torch.tensor([2.0, -2.0]), atol=1e-5, rtol=1e-5)
    diag = cf.flavour_direction("diagonal", model, fam, x, None, g, 0.0, 10, 0)[0]
    torch.testing.assert_close(diag, torch.tensor([1.0, 0.0]), atol=1e-6, rtol=1e-6)
    assert cf.cosine(diag, ref) == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    # the exact flavour (the run's CG budget) against the tight reference: the same direction
    exact = cf.flavour_direction("exact", model, fam, x, None, g, 0.0, 10, 0)[0]
    assert cf.cosine(exact, ref) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("flavour", list(cf.FLAVOURS))
def test_flavour_against_itself_is_one(flavour: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))
    x = torch.randn(64, 3)
    actions = torch.randint(0, 4, (64,))
    g = torch.randn(sum(p.numel() for p in model.parameters()))
    fam = Categorical()
    a = cf.flavour_direction(flavour, model, fam, x, actions, g, 1e-2, 100, 5)[0]
    b = cf.flavour_direction(flavour, model, fam, x, actions, g, 1e-2, 100, 5)[0]
    assert cf.cosine(a, b) == pytest.approx(1.0, abs=1e-9)
    ref, _ = cf.exact_direction(model, fam, x, g, 1e-2)
    c = cf.cosine(a, ref)
    if flavour in ("exact", "exact-pcg"):
        assert c == pytest.approx(1.0, abs=1e-6)
    else:  # an approximation: a different direction
        assert c < 1 - 1e-6


def _records(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_study_resumes_without_redoing(tmp_path: Path) -> None:
    cells = cf.build_cells(["CartPole-v1"], ["trpo-exact", "kfac-nac"], [0], {"CartPole-v1": 64})
    first = cf.run_grid(cells, tmp_path, workers=1, diag_every=1, eval_episodes=1, merge_table=True)
    assert sorted(first) == sorted(c.key for c in cells)
    files = sorted((tmp_path / "cells").glob("*.csv"))
    mtimes = [p.stat().st_mtime_ns for p in files]
    rows = _records(tmp_path / "fisher_study.csv")
    assert {r["record"] for r in rows} == {"update", "flavour", "final"}
    assert {r["variant"] for r in rows} == {"trpo-exact", "kfac-nac"}
    flavours = {r["flavour"] for r in rows if r["record"] == "flavour"}
    assert flavours == {"exact-ref", *cf.FLAVOURS}
    # second run: nothing trained, nothing rewritten, same table
    second = cf.run_grid(
        cells, tmp_path, workers=1, diag_every=1, eval_episodes=1, merge_table=True
    )
    assert second == []
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    assert _records(tmp_path / "fisher_study.csv") == rows
    # a grown grid only runs the new cell
    more = cells + cf.build_cells(["CartPole-v1"], ["trpo-diagonal"], [0], {"CartPole-v1": 64})
    third = cf.run_grid(more, tmp_path, workers=1, diag_every=1, eval_episodes=1, merge_table=True)
    assert third == [more[-1].key]


@pytest.mark.parametrize("variant", ["trpo-mc", "kfac-nac"])
def test_diagnostics_leave_training_unchanged(variant: str) -> None:
    """The report's claim: runs with and without the diagnostics train bit-identically."""
    from agents.base import flat_params

    cls, params = cf.cell_config(cf.Cell("Pendulum-v1", variant, 0, 0))
    params.update(n_steps=64, vf_minibatch=64, net_arch=(8, 8))
    plain = cls("MlpPolicy", "Pendulum-v1", seed=3, **params)
    plain.learn(3 * 128)
    diag = cf.with_diagnostics(cls)("MlpPolicy", "Pendulum-v1", seed=3, **params)
    diag.diag_every = 1
    diag.learn(3 * 128)
    assert len(diag.diag_rows) == 3 * (1 + len(cf.FLAVOURS))
    assert torch.equal(flat_params(plain.policy), flat_params(diag.policy))
    plain.close()
    diag.close()
