"""Nothing lost, nothing silent (issue 17): one writer per run directory, verified checkpoints,
honest resume, a checkpoint at update 0, divergence caught at its update, non-finite inputs
named by NGD and the Fisher operators, and every option checked before anything is written.

Complements tests/test_faults.py (signals, corrupt files, non-finite env output, degenerate
curvature, option errors of the agent), which is not repeated here.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

import envs as envs_mod  # noqa: E402
from agents import NPG, TRPO, CheckpointError, CheckpointManager, load_checkpoint  # noqa: E402
from agents.base import TIMING_KEYS  # noqa: E402
from agents.checkpoint import RunDirInUse, RunDirLock, save_atomic  # noqa: E402
from agents.guard import (  # noqa: E402
    KL_LIMIT_FACTOR,
    LOG_STD_LIMIT,
    DivergenceError,
    divergence_cause,
)
from npg import natural_step  # noqa: E402
from npg.fisher import DiagonalFisher, EmpiricalFisher, ExactFisher, KFACFisher, MCFisher  # noqa: E402
from npg.optim import NGD  # noqa: E402
from scripts import evaluate as evaluate_cli  # noqa: E402
from scripts import train as train_cli  # noqa: E402

SMALL = dict(n_envs=2, n_steps=64, vf_minibatch=64, vf_epochs=2, seed=0)
FAST = ["--n-steps", "64", "--n-envs", "2", "--vf-minibatch", "64", "--vf-epochs", "2"]
TRAIN = str(ROOT / "scripts" / "train.py")


def _rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv rows without the wall-clock columns."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in csv.DictReader(f)]


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file under ``run_dir`` (except the lock) by relative path, with its bytes."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _train(run: Path, *flags: str) -> int:
    return train_cli.main([*FAST, *flags, "--run-dir", str(run), "--no-progress"])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-update run (checkpoint every update) that tests copy before damaging."""
    run = tmp_path_factory.mktemp("fin") / "run"
    assert _train(run, "--total-steps", "512", "--checkpoint-every", "1") == 0
    return run


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


# --- 1. one writer per run directory ----------------------------------------------------------
def test_second_writer_fails_at_once_and_a_dead_holders_lock_is_stale(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, TRAIN, *FAST, "--total-steps", "10000000", "--run-dir", str(run)]
        + ["--checkpoint-every", "1", "--no-progress"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "metrics.csv").exists():
            time.sleep(0.05)
        assert (run / "metrics.csv").exists(), "the first writer never started training"
        for cmd in (
            [*FAST, "--total-steps", "10000000", "--run-dir", str(run), "--seed", "1"],
            ["--resume", str(run)],
        ):
            t0 = time.time()
            second = subprocess.run(
                [sys.executable, TRAIN, *cmd, "--no-progress"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert second.returncode != 0 and "Traceback" not in second.stderr
            last = second.stderr.strip().splitlines()[-1]
            assert f"run directory {run} is in use by another process (pid {first.pid})" in last
            assert time.time() - t0 < 60  # at once, not after training
        assert first.poll() is None  # the owner was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock: the OS releases it
        first.wait()
    assert [p for p in run.parent.iterdir() if p.name != "run"] == []  # no stamped twin dir
    with open(run / "metrics.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert sum(r[:1] == ["update"] for r in lines) == 1  # one header, one writer
    with RunDirLock(run):  # the lock of the SIGKILLed owner was released by the OS
        pass


def test_lock_is_exclusive_within_and_released_after(tmp_path: Path) -> None:
    with RunDirLock(tmp_path / "d"), pytest.raises(RunDirInUse, match=f"pid {os.getpid()}"):
        RunDirLock(tmp_path / "d").acquire()
    RunDirLock(tmp_path / "d").acquire().release()


# --- 2. verified checkpoints ------------------------------------------------------------------
def _flip_weight_byte(path: Path) -> torch.Tensor:
    """Flip one byte inside the stored bytes of the actor's first weight; returns the weight."""
    weight = load_checkpoint(path)["policy"]["actor.net.0.weight"]
    data = bytearray(path.read_bytes())
    at = data.find(weight.numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))
    return weight


def test_byte_flip_in_tensor_data_is_caught_and_skipped(run_copy: Path) -> None:
    ckpts = CheckpointManager(run_copy / "checkpoints")
    newest = ckpts.paths()[-1]
    weight = _flip_weight_byte(newest)
    # torch itself loads the flipped file without complaint, with a changed weight ...
    raw = torch.load(newest, weights_only=True)["policy"]["actor.net.0.weight"]
    assert not torch.equal(raw, weight)
    # ... the checksum does not
    with pytest.raises(CheckpointError, match=f"{newest.name} is corrupt: its content checksum"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match=f"{newest.name}.*falling back"):
        state, path = ckpts.load_latest()
    assert path == ckpts.paths()[-2] and state["num_updates"] == 3


def test_nan_weight_checkpoint_is_refused_by_load_resume_and_evaluate(
    run_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpts = CheckpointManager(run_copy / "checkpoints")
    newest = ckpts.paths()[-1]
    for path in (newest, run_copy / "model.pt"):
        state = load_checkpoint(path)
        state["policy"]["critic.2.bias"][0] = float("nan")
        save_atomic(state, path)  # a valid checksum over a NaN weight
        with pytest.raises(CheckpointError, match=r"non-finite values in policy/critic.2.bias"):
            load_checkpoint(path)
    # evaluate: model.pt is skipped, named in a warning, and so is the NaN checkpoint
    with pytest.warns(UserWarning) as caught:
        assert evaluate_cli.main([str(run_copy), "--episodes", "1"]) == 0
    text = " ".join(str(w.message) for w in caught)
    assert "model.pt" in text and newest.name in text
    assert capsys.readouterr().out.startswith(str(ckpts.paths()[-2]))
    # resume (extended by one update) starts from the newest good checkpoint
    with pytest.warns(UserWarning, match=newest.name):
        code = train_cli.main(["--resume", str(run_copy), "--total-steps", "640", "--no-progress"])
    assert code == 0
    assert [int(r["update"]) for r in _rows(run_copy)] == [1, 2, 3, 4, 5]


def test_evaluate_falls_back_past_a_truncated_model_and_names_a_bad_file(
    run_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    model = run_copy / "model.pt"
    model.write_bytes(model.read_bytes()[:300])
    for target in (run_copy, model):
        with pytest.warns(UserWarning, match="model.pt is truncated"):
            assert evaluate_cli.main([str(target), "--episodes", "1"]) == 0
        assert capsys.readouterr().out.startswith(str(run_copy / "checkpoints" / "ckpt_00000004"))
    bad = run_copy / "checkpoints" / "ckpt_00000004.pt"
    bad.write_bytes(b"")
    with pytest.raises(SystemExit, match=r"^error: checkpoint .*ckpt_00000004.pt is truncated"):
        evaluate_cli.main([str(bad)])


# --- 3. honest resume -------------------------------------------------------------------------
def test_resume_extends_the_run_exactly_as_a_longer_run(run_copy: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    assert _train(ref, "--total-steps", "1024", "--checkpoint-every", "1") == 0
    # explicit flags with the run's own values are not changes
    argv = ["--resume", str(run_copy), "--total-steps", "1024", "--n-steps", "64", "--seed", "0"]
    assert train_cli.main([*argv, "--no-progress"]) == 0
    assert _rows(run_copy) == _rows(ref)
    assert json.loads((run_copy / "config.json").read_text())["total_timesteps"] == 1024
    assert load_checkpoint(run_copy / "model.pt")["num_timesteps"] == 1024


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--total-steps", "2048", "--max-kl", "0.5"], ["--max-kl (0.01 -> 0.5)"]),
        (["--seed", "3", "--fisher", "kfac"], ["--seed (0 -> 3)", "--fisher ('exact' -> 'kfac')"]),
        (["--net-arch", "8", "--keep-last", "5"], ["--net-arch ([64, 64] -> [8])", "--keep-last"]),
        (["--total-steps", "256"], ["--total-steps 256 is below the run's 512"]),
    ],
)
def test_resume_refuses_changed_flags_in_one_line_and_writes_nothing(
    run_copy: Path, flags: list[str], named: list[str]
) -> None:
    before = _snapshot(run_copy)
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--resume", str(run_copy), *flags, "--no-progress"])
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in named), msg
    assert _snapshot(run_copy) == before


_KILL_BEFORE_FIRST_UPDATE = textwrap.dedent(
    """
    import os, signal, sys
    import agents.base as base
    from scripts import train
    def learn(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    base.OnPolicyNaturalAlgorithm.learn = learn
    sys.exit(train.main(sys.argv[1:]))
    """
)


def test_run_killed_before_its_first_update_resumes_from_update_0(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    assert _train(ref, "--total-steps", "384") == 0
    run = tmp_path / "run"
    code = _KILL_BEFORE_FIRST_UPDATE
    proc = subprocess.run(
        [sys.executable, "-c", code, *FAST, "--total-steps", "384", "--run-dir", str(run)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in CheckpointManager(run / "checkpoints").paths()] == ["ckpt_00000000.pt"]
    assert train_cli.main(["--resume", str(run), "--no-progress"]) == 0
    assert _rows(run) == _rows(ref)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref", "run"]  # nothing left behind


# --- 4. every option checked before anything is written, one line -----------------------------
@pytest.mark.parametrize(
    "flags,message",
    [
        (["--threads", "0"], "--threads 0: accepted an int >= 1"),
        (["--keep-last", "0"], "--keep-last 0: accepted an int >= 1"),
        (["--checkpoint-every", "-1"], "--checkpoint-every -1: accepted an int >= 0"),
        (["--total-steps", "-5"], "--total-steps -5: accepted an int >= 1"),
        (["--vf-arch", "-3"], "vf_arch=[-3] is invalid; accepted: None or positive layer widths"),
        (["--vf-arch", "0"], "vf_arch=[0] is invalid"),
        (["--stats-window", "0"], "stats_window=0 is invalid; accepted: an int >= 1"),
        (["--log-std-init", "nan"], "log_std_init=nan is invalid; accepted: a finite float"),
        (["--log-std-init", "inf"], "log_std_init=inf is invalid"),
    ],
)
def test_bad_option_one_line_and_no_run_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flags: list[str], message: str
) -> None:
    def no_env(*args: object, **kwargs: object) -> None:
        raise AssertionError("an env was created before validation")

    monkeypatch.setattr(envs_mod, "make_vec_env", no_env)
    monkeypatch.setattr(gym, "make", no_env)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--env", "Pendulum-v1", *flags, "--run-dir", str(run), "--no-progress"])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not run.exists()


def test_run_dir_that_is_a_file_is_refused_before_any_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(envs_mod, "make_vec_env", lambda *a, **k: pytest.fail("env built"))
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(SystemExit, match="is a file, not a run directory"):
        train_cli.main(["--run-dir", str(target), "--no-progress"])
    assert target.read_text() == "keep me"


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda c: c.write_text('{"algo": "trpo", '), "config.json is not valid JSON"),
        (lambda c: c.write_text('{"algo": "trpo"}'), "config.json is incomplete (lacks env, seed"),
        (lambda c: c.write_text("[1, 2]"), "config.json is incomplete (is not a JSON object)"),
    ],
)
def test_resume_of_a_damaged_config_is_one_line_without_traceback(
    run_copy: Path, damage, message: str
) -> None:
    damage(run_copy / "config.json")
    before = _snapshot(run_copy)
    proc = subprocess.run(
        [sys.executable, TRAIN, "--resume", str(run_copy), "--total-steps", "640"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    assert _snapshot(run_copy) == before


@pytest.mark.parametrize(
    "header,message",
    [
        ("upd,timesteps", "damaged header (no 'update' and 'timesteps' columns)"),
        ("update,timesteps,,kl", "damaged header (an empty column name)"),
        ("update,timesteps,kl,kl", "damaged header (a repeated column name)"),
    ],
)
def test_resume_with_a_damaged_metrics_header_is_one_line_and_writes_nothing(
    run_copy: Path, header: str, message: str
) -> None:
    path = run_copy / "metrics.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(header + "\n" + "".join(lines[1:]))
    before = _snapshot(run_copy)
    with pytest.raises(SystemExit, match=re.escape(f"metrics.csv: {message}")):
        train_cli.main(["--resume", str(run_copy), "--total-steps", "640", "--no-progress"])
    assert _snapshot(run_copy) == before


def test_metrics_header_with_renamed_columns_stops_before_a_row_is_written(run_copy: Path) -> None:
    path = run_copy / "metrics.csv"
    text = path.read_text()
    path.write_text(text.replace(",kl,", ",kl_typo,", 1))
    with pytest.raises(SystemExit, match=r"header does not match this run's metrics \(missing"):
        train_cli.main(["--resume", str(run_copy), "--total-steps", "640", "--no-progress"])
    assert path.read_text() == text.replace(",kl,", ",kl_typo,", 1)
    assert CheckpointManager(run_copy / "checkpoints").paths()[-1].name == "ckpt_00000004.pt"


# --- 5. divergence caught at its update -------------------------------------------------------
def _params(agent: TRPO) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in agent.policy.named_parameters()}


def test_exploding_log_std_is_rolled_back_and_named() -> None:
    agent = NPG("MlpPolicy", "Pendulum-v1", max_kl=1e6, **SMALL)
    before = _params(agent)
    with pytest.raises(DivergenceError, match=r"update 1 diverged: log_std reached ±\d+"):
        agent.learn(4 * 128)
    assert all(torch.equal(p, before[k]) for k, p in _params(agent).items())
    agent.close()


def test_realized_kl_far_beyond_max_kl_is_rolled_back_and_named(monkeypatch) -> None:
    real = ExactFisher._mv
    monkeypatch.setattr(ExactFisher, "_mv", lambda self, v: 1e-6 * real(self, v))  # KL model off
    agent = NPG("MlpPolicy", "CartPole-v1", max_kl=1e-3, cg_damping=0.0, **SMALL)
    before = _params(agent)
    with pytest.raises(DivergenceError, match=r"realized KL \S+ is beyond 1000x max_kl=0.001"):
        agent.learn(4 * 128)
    assert all(torch.equal(p, before[k]) for k, p in _params(agent).items())


def test_divergence_cause_thresholds() -> None:
    agent = NPG("MlpPolicy", "Pendulum-v1", **SMALL)
    policy = agent.policy
    assert divergence_cause(policy, {"kl": 0.01, "value_loss": 3.0}, 0.01) is None
    assert divergence_cause(policy, {"kl": 0.01, "value_loss": math.nan}, 0.01) is None  # no fit
    assert "value_loss=inf" in divergence_cause(policy, {"value_loss": math.inf}, 0.01)
    assert "realized KL" in divergence_cause(policy, {"kl": 1.01 * KL_LIMIT_FACTOR * 0.01}, 0.01)
    assert divergence_cause(policy, {"kl": 0.99 * KL_LIMIT_FACTOR * 0.01}, 0.01) is None
    assert "realized KL nan" in divergence_cause(policy, {"kl": math.nan}, 0.01)
    with torch.no_grad():
        policy.actor.log_std.fill_(-LOG_STD_LIMIT - 1)
    assert "log_std reached" in divergence_cause(policy, {}, 0.01)
    with torch.no_grad():
        policy.actor.log_std.fill_(math.nan)
    assert "non-finite parameters (actor.log_std)" in divergence_cause(policy, {}, 0.01)
    agent.close()


# --- 6. NGD and the Fisher operators name non-finite inputs -----------------------------------
def _regression(nan_input: bool = False, nan_param: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    if nan_input:
        x[2, 1] = float("nan")
    if nan_param:
        with torch.no_grad():
            model[2].bias[1] = float("nan")
    return model, x, y


@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical", "diagonal", "kfac", "ekfac"])
def test_ngd_refuses_a_nan_loss_and_leaves_the_parameters(fisher: str) -> None:
    model, x, y = _regression()
    opt = NGD(model.parameters(), model=model, loss_fn=nn.MSELoss(), fisher=fisher, lr=0.5)
    before = [p.detach().clone() for p in model.parameters()]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) * float("nan")
        loss.backward()
        return loss

    with pytest.raises(ValueError, match=r"NGD: the closure's loss is nan; no step taken"):
        opt.step(closure, inputs=x, targets=y)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(lr=math.inf), "lr must be a finite float > 0, got inf"),
        (dict(lr=math.nan), "lr must be a finite float > 0, got nan"),
        (dict(damping=math.nan), "damping must be a finite float >= 0, got nan"),
        (dict(damping=math.inf), "damping must be a finite float >= 0, got inf"),
        (dict(lr=None, max_kl=math.inf), "max_kl must be a finite float > 0, got inf"),
    ],
)
def test_ngd_refuses_non_finite_settings(kwargs: dict, message: str) -> None:
    model, _, _ = _regression()
    with pytest.raises(ValueError, match=message):
        NGD(model.parameters(), model=model, loss_fn=nn.MSELoss(), fisher="kfac", **kwargs)


OPERATORS = {
    "exact": lambda m, x, y: ExactFisher(m, x, "gaussian"),
    "mc": lambda m, x, y: MCFisher(m, x, "gaussian", n_samples=2),
    "empirical": lambda m, x, y: EmpiricalFisher(m, x, "gaussian", y),
    "diagonal": lambda m, x, y: DiagonalFisher(m, x, "gaussian"),
    "kfac": lambda m, x, y: KFACFisher(m, x, "gaussian"),
}


@pytest.mark.parametrize("name", list(OPERATORS))
@pytest.mark.parametrize(
    "where,source",
    [("input", "the inputs hold NaN/inf"), ("param", "the inputs are finite: the parameters")],
)
def test_fisher_operator_on_a_nan_output_names_it(name: str, where: str, source: str) -> None:
    model, x, y = _regression(nan_input=where == "input", nan_param=where == "param")
    rows = "in 1 of 8 rows (first: row 2)" if where == "input" else "in 8 of 8 rows (first: row 0)"
    with pytest.raises(ValueError, match=re.escape(f"model output is non-finite {rows}; {source}")):
        OPERATORS[name](model, x, y)


def test_direct_inverses_and_natural_step_refuse_non_finite_inputs() -> None:
    model, x, _ = _regression()
    g = torch.randn(sum(p.numel() for p in model.parameters()))
    for op in (KFACFisher(model, x, "gaussian"), DiagonalFisher(model, x, "gaussian")):
        with pytest.raises(ValueError, match="damping must be a finite float >= 0, got nan"):
            op.inverse_mv(g, math.nan)
    bad = g.clone()
    bad[3] = math.inf
    with pytest.raises(ValueError, match="natural_step: the gradient g holds NaN/inf"):
        natural_step(ExactFisher(model, x, "gaussian"), bad, 0.01, damping=0.1)
    with pytest.raises(ValueError, match="damping must be a finite float >= 0, got nan"):
        natural_step(ExactFisher(model, x, "gaussian"), g, 0.01, damping=math.nan)
