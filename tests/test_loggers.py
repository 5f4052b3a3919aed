"""agents.loggers from the Python API: CSV, TensorBoard and W&B (offline) runs leave their files."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from agents import TRPO
from agents.loggers import CSVLogger, Loggers, TensorBoardLogger, WandbLogger

SMALL = dict(n_envs=2, n_steps=64, vf_minibatch=64, vf_epochs=2)


def test_csv_and_tensorboard_from_the_api(tmp_path: Path) -> None:
    seen: list[dict] = []
    with Loggers(CSVLogger(tmp_path / "m.csv"), TensorBoardLogger(tmp_path / "tb")) as log:
        TRPO("MlpPolicy", "CartPole-v1", **SMALL).learn(
            384, callback=lambda m: (seen.append(m), log(m))[1]
        )
    with open(tmp_path / "m.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["timesteps"]) for r in rows] == [m["timesteps"] for m in seen] == [128, 256, 384]
    assert float(rows[-1]["kl"]) == seen[-1]["kl"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    kl = events.Scalars("train/kl")
    assert [e.step for e in kl] == [128, 256, 384]
    assert kl[-1].value == pytest.approx(seen[-1]["kl"], rel=1e-6)
    assert [e.value for e in events.Scalars("time/total_timesteps")] == [128, 256, 384]


def test_csv_logger_refuses_a_foreign_header(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("update,timesteps,other\n")
    with pytest.raises(ValueError, match="m.csv: its header does not match"):
        CSVLogger(path)({"update": 1, "timesteps": 2, "kl": 0.0})


def test_wandb_offline_run_leaves_its_files(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(project="npg-test", dir=tmp_path / "w", name="tiny")
    assert os.environ["WANDB_MODE"] == "offline"  # set because the user did not
    assert logger.run is not None
    with Loggers(logger) as log:
        TRPO("MlpPolicy", "CartPole-v1", **SMALL).learn(256, callback=log)
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))  # the run's data file, for `wandb sync`


def test_wandb_mode_set_by_the_user_is_kept(monkeypatch, tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = WandbLogger(project="npg-test", dir=tmp_path)
    assert os.environ["WANDB_MODE"] == "disabled"
    logger({"timesteps": 1, "kl": 0.0})
    logger.close()
    assert not list(tmp_path.glob("wandb/offline-run-*"))
