"""Injected faults (issue 6): signals, bad checkpoints, non-finite envs and curvature, crashing
async workers and bad configuration. Each test injects the fault and checks that nothing is lost
and nothing is silent.

Complements tests/test_agents.py and tests/test_train_cli.py (in-process signals, truncated newest
checkpoint, pickled code in a bare file, NaN obs / inf reward, drop mode, parameter rollback, the
agent's config validation), which are not repeated here.
"""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

import envs as envs_mod  # noqa: E402
from agents import (  # noqa: E402
    TRPO,
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
)
from agents.base import TIMING_KEYS  # noqa: E402
from agents.rollout import NonFiniteError  # noqa: E402
from scripts import train as train_cli  # noqa: E402

SMALL = dict(n_envs=2, n_steps=64, vf_minibatch=64, vf_epochs=2, seed=0)
FAST = ["--n-steps", "64", "--n-envs", "2", "--vf-minibatch", "64", "--vf-epochs", "2"]
SIG_RUN = [*FAST, "--total-steps", str(10 * 128), "--checkpoint-every", "4", "--seed", "5"]


def _rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv rows without the wall-clock columns."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in csv.DictReader(f)]


def _params(agent: TRPO) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in agent.policy.named_parameters()}


def _all_finite(agent: TRPO) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in agent.policy.parameters())


# --- 1. SIGINT / SIGTERM in a real scripts/train.py process -----------------------------------
# The child patches the agent so that it signals *itself* at a known point: in the rollout of
# update ``at`` (10 env steps in), or in update ``at`` (at its GAE); then runs train.main.
_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import agents.base as base
    import agents.rollout as rollout
    from scripts import train
    phase, sig, at = {phase!r}, signal.{sig}, {at}
    calls = {{"collect": 0, "update": 0}}
    if phase == "rollout":
        real_collect = rollout.RolloutCollector.collect
        def collect(self, should_stop=None):
            calls["collect"] += 1
            steps = {{"n": 0}}
            def stop():
                steps["n"] += 1
                if calls["collect"] == at and steps["n"] == 10:
                    os.kill(os.getpid(), sig)
                return should_stop() if should_stop is not None else False
            return real_collect(self, stop)
        rollout.RolloutCollector.collect = collect
    else:
        real_gae = base.compute_gae_t
        def gae(*args):
            calls["update"] += 1
            if calls["update"] == at:
                os.kill(os.getpid(), sig)
            return real_gae(*args)
        base.compute_gae_t = gae
    sys.exit(train.main(sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """The uninterrupted run every interrupted + resumed run must reproduce."""
    run = tmp_path_factory.mktemp("ref") / "run"
    assert train_cli.main([*SIG_RUN, "--run-dir", str(run), "--no-progress"]) == 0
    return _rows(run)


@pytest.mark.parametrize(
    "phase,sig",
    [
        ("rollout", "SIGINT"),
        ("update", "SIGTERM"),
        pytest.param("rollout", "SIGTERM", marks=pytest.mark.slow),
        pytest.param("update", "SIGINT", marks=pytest.mark.slow),
    ],
)
def test_signal_in_train_cli_saves_flushes_and_resumes_bit_identically(
    tmp_path: Path, reference_run: list[dict[str, str]], phase: str, sig: str
) -> None:
    at = 6
    run = tmp_path / "run"
    code = _CHILD.format(phase=phase, sig=sig, at=at)
    proc = subprocess.run(
        [sys.executable, "-c", code, *SIG_RUN, "--run-dir", str(run), "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    signum = getattr(signal, sig)
    assert proc.returncode == 128 + signum, proc.stderr[-2000:]
    # a clear message that names the signal, the checkpoint and how to resume
    done = at if phase == "update" else at - 1  # an update in progress is finished first
    ckpt = run / "checkpoints" / f"ckpt_{done:08d}.pt"
    assert f"interrupted by {sig}" in proc.stderr
    assert f"checkpoint saved to {ckpt}" in proc.stderr
    assert f"--resume {run}" in proc.stderr
    # the checkpoint is the newest, loads safely, and matches the flushed metrics
    assert CheckpointManager(run / "checkpoints").paths()[-1] == ckpt
    assert load_checkpoint(ckpt)["num_updates"] == done
    rows = _rows(run)
    assert [int(r["update"]) for r in rows] == list(range(1, done + 1))
    assert rows == reference_run[:done]
    # resume: the continued metrics equal the uninterrupted run's, bit for bit
    assert train_cli.main(["--resume", str(run), "--no-progress"]) == 0
    assert _rows(run) == reference_run


# --- 2. checkpoints: corrupt, leftover temporaries, pickled code -------------------------------
@pytest.fixture
def checkpoints(tmp_path: Path) -> CheckpointManager:
    ckpts = CheckpointManager(tmp_path / "ck", keep_last=3)
    TRPO("MlpPolicy", "CartPole-v1", **SMALL).learn(3 * 128, checkpoints=ckpts, checkpoint_every=1)
    return ckpts


@pytest.mark.parametrize("damage", ["garbage", "empty", "header_only", "bitflip"])
def test_corrupt_newest_checkpoint_names_file_and_falls_back(
    checkpoints: CheckpointManager, damage: str
) -> None:
    newest = checkpoints.paths()[-1]
    data = bytearray(newest.read_bytes())
    if damage == "garbage":
        data = bytearray(np.random.default_rng(0).integers(0, 256, len(data), np.uint8).tobytes())
    elif damage == "empty":
        data = bytearray()
    elif damage == "header_only":
        data = data[:64]
    else:  # flip bytes inside the zip's central directory at the end of the file
        for i in range(len(data) - 40, len(data) - 20):
            data[i] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=newest.name):
        load_checkpoint(newest)
    with pytest.raises(CheckpointError, match=newest.name):
        checkpoints.load_latest(fallback=False)
    with pytest.warns(UserWarning, match=newest.name):
        state, path = checkpoints.load_latest()
    assert path == checkpoints.paths()[-2] and state["num_updates"] == 2
    TRPO.load(state).learn(128, reset_num_timesteps=False)  # the fallback is usable


def test_every_checkpoint_corrupt_lists_them_all(checkpoints: CheckpointManager) -> None:
    for p in checkpoints.paths():
        p.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError) as e:
        checkpoints.load_latest()
    assert all(p.name in str(e.value) for p in checkpoints.paths())


def test_leftover_temporary_from_a_killed_save_is_ignored(checkpoints: CheckpointManager) -> None:
    # a save killed before its rename leaves only the temporary; it must never be picked up
    newest = checkpoints.paths()[-1]
    tmp = newest.with_name(f".ckpt_{99:08d}.pt.tmp12345")
    tmp.write_bytes(newest.read_bytes()[:100])
    assert tmp not in checkpoints.paths()
    state, path = checkpoints.load_latest(fallback=False)
    assert path == newest and state["num_updates"] == 3


class _RunsCode:
    """Unpickling this runs ``open(marker, 'w')`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def test_real_checkpoint_with_a_code_object_is_refused(
    checkpoints: CheckpointManager, tmp_path: Path
) -> None:
    marker = tmp_path / "code_ran"
    newest = checkpoints.paths()[-1]
    state = load_checkpoint(newest)
    state["extra"] = _RunsCode(str(marker))  # an otherwise valid checkpoint, one bad entry
    torch.save(state, newest)
    with pytest.raises(CheckpointError, match=newest.name):
        TRPO.load(newest)
    with pytest.raises(CheckpointError, match=newest.name):
        checkpoints.load_latest(fallback=False)
    with pytest.warns(UserWarning, match="falling back"):
        _, path = checkpoints.load_latest()
    assert path == checkpoints.paths()[-2]
    assert not marker.exists()


def test_resume_with_no_loadable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*FAST, "--total-steps", "256", "--checkpoint-every", "1", "--run-dir", str(run)]
    assert train_cli.main([*args, "--no-progress"]) == 0
    for p in (run / "checkpoints").glob("ckpt_*.pt"):
        p.write_bytes(p.read_bytes()[:200])
    with pytest.warns(UserWarning), pytest.raises(SystemExit, match="no loadable checkpoint"):
        train_cli.main(["--resume", str(run), "--no-progress"])


# --- 3. non-finite env output -----------------------------------------------------------------
class BadValueEnv(gym.Env):
    """A 3-dim observation task that injects ``value`` into ``field`` at its ``at``-th step;
    episodes are truncated every 16 steps (so the final observation is exercised)."""

    def __init__(
        self, at: int = 7, field: str = "obs", value: float = float("nan"), dtype: type = np.float32
    ) -> None:
        self.action_space = gym.spaces.Discrete(2)
        self.observation_space = gym.spaces.Box(-5.0, 5.0, (3,), dtype)
        self.at, self.field, self.value, self.n, self.t = at, field, value, 0, 0
        self.dtype = dtype

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
        super().reset(seed=seed)
        self.t = 0
        return self.np_random.normal(size=3).astype(self.dtype), {}

    def step(self, action: int) -> tuple:
        self.n += 1
        self.t += 1
        obs = self.np_random.normal(size=3).astype(self.dtype)
        reward = float(action)
        truncated = self.t % 16 == 0
        if self.n == self.at:
            if self.field == "reward":
                reward = self.value
            else:
                obs[0] = self.value
        return obs, reward, False, truncated, {}


for _id, _kw in {
    "faults/NegInfObs-v0": dict(at=7, field="obs", value=-math.inf),
    "faults/NaNFinalObs-v0": dict(at=16, field="obs"),  # step 16 ends the first episode
    "faults/NaNObsLate-v0": dict(at=40, field="obs"),
    # finite in float64, inf once stored in the float32 buffers
    "faults/Reward1e39-v0": dict(at=7, field="reward", value=1e39),
    "faults/Obs1e39-v0": dict(at=7, field="obs", value=-1e39, dtype=np.float64),
    # finite in float32, but the critic's squared error of such returns is inf
    "faults/Reward1e30-v0": dict(at=70, field="reward", value=1e30),
}.items():
    if _id not in gym.registry:
        gym.register(_id, entry_point=BadValueEnv, kwargs=_kw)


@pytest.mark.parametrize(
    "env_id,vectorization,field,step",
    [
        ("faults/NegInfObs-v0", "sync", "observation", 7),
        ("faults/NaNFinalObs-v0", "sync", "final observation", 16),
        ("faults/NaNObsLate-v0", "async", "observation", 40),
        ("faults/Reward1e39-v0", "sync", "reward", 7),
        ("faults/Obs1e39-v0", "sync", "observation", 7),
    ],
)
def test_nonfinite_env_output_error_names_env_step_field(
    env_id: str, vectorization: str, field: str, step: int
) -> None:
    agent = TRPO("MlpPolicy", env_id, vectorization=vectorization, **{**SMALL, "n_envs": 1})
    try:
        before = _params(agent)
        with pytest.raises(NonFiniteError) as e:
            agent.learn(4 * 64)
    finally:
        agent.close()
    msg = str(e.value)
    assert f"{env_id!r}" in msg and f"non-finite {field} " in msg and f"env step {step}" in msg
    assert "on_nonfinite='drop'" in msg  # says how to drop-and-count instead
    if "1e39" in env_id:
        assert "e+39, beyond float32's range" in msg
    if step < 64:  # failed in the first rollout: nothing was updated
        assert all(torch.equal(p, before[k]) for k, p in _params(agent).items())
    assert _all_finite(agent)


def test_huge_finite_rewards_stop_before_an_update_with_inf_value_loss() -> None:
    agent = TRPO("MlpPolicy", "faults/Reward1e30-v0", **{**SMALL, "n_envs": 1})
    metrics: list[dict] = []
    agent.learn(64, callback=metrics.append)  # the reward comes in the second rollout
    before = _params(agent)
    with pytest.raises(NonFiniteError) as e:
        agent.learn(64, callback=metrics.append, reset_num_timesteps=False)
    msg = str(e.value)
    assert "update 2: env 'faults/Reward1e30-v0' gives λ-returns up to 1" in msg
    assert "value_loss would be inf" in msg and "normalize_reward=True" in msg
    assert all(torch.equal(p, before[k]) for k, p in _params(agent).items())
    assert len(metrics) == 1
    # scaled rewards train on
    scaled = TRPO("MlpPolicy", "faults/Reward1e30-v0", normalize_reward=True, **SMALL)
    scaled.learn(2 * 128, callback=metrics.append)
    assert all(math.isfinite(m["value_loss"]) for m in metrics)
    agent.close()
    scaled.close()


def test_drop_mode_counts_a_nonfinite_final_observation() -> None:
    agent = TRPO("MlpPolicy", "faults/NaNFinalObs-v0", on_nonfinite="drop", **SMALL)
    metrics: list[dict] = []
    agent.learn(2 * 128, callback=metrics.append)
    # each of the 2 sub-envs hits its NaN final observation once
    assert sum(m["dropped"] for m in metrics) == 2 and agent.collector.dropped_total == 2
    assert _all_finite(agent)


# --- 4. degenerate curvature ------------------------------------------------------------------
def _one_update(monkeypatch: pytest.MonkeyPatch, mv, **kwargs) -> tuple[TRPO, dict, dict]:
    from npg.fisher.exact import ExactFisher

    if mv is not None:
        monkeypatch.setattr(ExactFisher, "_mv", mv)
    agent = TRPO("MlpPolicy", "CartPole-v1", **{**SMALL, **kwargs})
    before = _params(agent)
    metrics: list[dict] = []
    agent.learn(128, callback=metrics.append)
    return agent, before, metrics[0]


@pytest.mark.parametrize(
    "name,mv",
    [
        ("negative", lambda self, v: -v),  # sᵀFs < 0 along every direction
        ("zero", lambda self, v: torch.zeros_like(v)),  # sᵀ(F+λI)s = λ‖s‖², with λ = 0 below
        ("nan", lambda self, v: v * float("nan")),  # a broken product
    ],
)
def test_nonpositive_or_broken_curvature_skips_the_update(monkeypatch, name, mv) -> None:
    agent, before, m = _one_update(monkeypatch, mv, cg_damping=0.0)
    assert m["step_status"] == "nonpositive_curvature"  # logged, with why
    assert m["ls_success"] is False and m["kl"] == 0.0
    for k, p in agent.policy.actor.named_parameters():
        assert torch.equal(p, before["actor." + k]), k  # skipped: actor bit-identical
    assert _all_finite(agent)
    assert math.isfinite(m["value_loss"])  # the critic still trained


def test_cg_not_converging_is_logged_and_the_step_stays_in_the_trust_region(monkeypatch) -> None:
    # a badly scaled Fisher (eigenvalues spread over 8 decades) and 2 CG iterations
    from npg.fisher.exact import ExactFisher

    real = ExactFisher._mv

    def ill(self, v):
        scale = torch.logspace(-4, 4, v.numel(), dtype=v.dtype)
        return real(self, v) + scale * v

    agent, _, m = _one_update(monkeypatch, ill, cg_iters=2, cg_tol=1e-12)
    assert m["cg_iterations"] == 2 and m["cg_residual"] > 1e-3  # logged as not converged
    assert m["step_status"] == "ok" and math.isfinite(m["predicted_improvement"])
    if m["ls_success"]:
        assert m["kl"] <= agent.max_kl
    assert _all_finite(agent)


def test_kfac_eigendecomposition_failure_falls_back_to_damped_inverse(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("injected eigh failure")

    monkeypatch.setattr(torch.linalg, "eigh", fail)
    agent = TRPO(
        "MlpPolicy",
        "CartPole-v1",
        fisher="kfac",
        fisher_kwargs={"kfac_inverse": "eigen"},
        cg_damping=1e-2,
        **SMALL,
    )
    metrics: list[dict] = []
    with pytest.warns(RuntimeWarning, match="eigendecomposition failed.*damped inverse"):
        agent.learn(2 * 128, callback=metrics.append)
    assert [m["step_status"] for m in metrics] == ["ok", "ok"]
    assert all(m["kl"] <= agent.max_kl for m in metrics if m["ls_success"])
    assert _all_finite(agent)


def test_kfac_on_ill_conditioned_inputs_stays_finite() -> None:
    # observations spanning 10 decades make K-FAC's input factor A badly conditioned
    env = gym.vector.SyncVectorEnv(
        [
            lambda: gym.wrappers.TransformObservation(
                gym.make("CartPole-v1"),
                lambda o: (o * np.array([1e-5, 1.0, 1e5, 1e-5])).astype(np.float32),
                gym.spaces.Box(-np.inf, np.inf, (4,), np.float32),
            )
            for _ in range(2)
        ],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    agent = TRPO("MlpPolicy", env, fisher="kfac", cg_damping=1e-3, **SMALL)
    metrics: list[dict] = []
    agent.learn(3 * 128, callback=metrics.append)
    assert all(m["step_status"] in ("ok", "nonpositive_curvature") for m in metrics)
    assert all(m["kl"] <= agent.max_kl for m in metrics if m["ls_success"])
    assert _all_finite(agent)


# --- 5. an env that raises inside an async vector-env worker ----------------------------------
class CrashEnv(gym.Env):
    """Raises ``RuntimeError`` at its ``at``-th step (in whatever process steps it)."""

    def __init__(self, at: int = 200) -> None:
        self.action_space = gym.spaces.Discrete(2)
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
        self.at, self.n = at, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
        super().reset(seed=seed)
        return np.zeros(3, np.float32), {}

    def step(self, action: int) -> tuple:
        self.n += 1
        if self.n == self.at:
            raise RuntimeError(f"injected crash in CrashEnv.step at step {self.n}")
        return (
            np.full(3, 0.1 * (self.n % 7), np.float32),
            float(action),
            self.n % 25 == 0,
            False,
            {},
        )


if "faults/Crash-v0" not in gym.registry:
    gym.register("faults/Crash-v0", entry_point=CrashEnv)


def test_async_worker_exception_surfaces_with_traceback_and_checkpoint_intact(
    tmp_path: Path,
) -> None:
    ckpts = CheckpointManager(tmp_path / "ck")
    agent = TRPO("MlpPolicy", "faults/Crash-v0", vectorization="async", **SMALL)
    metrics: list[dict] = []
    try:
        with warnings.catch_warnings(record=True):  # gymnasium also logs the worker error
            warnings.simplefilter("always")
            with pytest.raises(Exception, match="injected crash in CrashEnv.step at step 200") as e:
                agent.learn(
                    10 * 128, callback=metrics.append, checkpoints=ckpts, checkpoint_every=1
                )
    finally:
        agent.close()
    # the worker's traceback (file, function, line of the raise) is in the exception itself
    text = str(e.value)
    assert "Traceback" in text and __file__ in text and "in step" in text and "sub-env" in text
    # 200 steps per sub-env = 3 full updates of 64 steps, the crash is in the 4th rollout
    assert len(metrics) == 3
    state, path = ckpts.load_latest(fallback=False)
    assert path.name == "ckpt_00000003.pt" and state["num_updates"] == 3
    resumed = TRPO.load(state, env=envs_mod.make_vec_env("faults/Crash-v0", 2, 0, "sync"))
    resumed.learn(64 * 2, reset_num_timesteps=False)  # the intact checkpoint trains on
    assert resumed.num_updates == 4


# --- 6. bad configuration through the CLI: one line, before any env starts --------------------
@pytest.mark.parametrize(
    "flags,option,accepted",
    [
        (["--max-kl", "0"], "max_kl", "a finite float > 0"),
        (["--max-kl", "-0.01"], "max_kl", "a finite float > 0"),
        (["--cg-damping", "-1"], "cg_damping", "a finite float >= 0"),
        (["--cg-iters", "0"], "cg_iters", "an int >= 1"),
        (["--n-steps", "100", "--vf-minibatch", "64"], "vf_minibatch", "a divisor of"),
    ],
)
def test_cli_bad_option_one_line_error_before_any_env(
    monkeypatch, tmp_path: Path, flags: list[str], option: str, accepted: str
) -> None:
    def no_env(*args, **kwargs):
        raise AssertionError("an env was created before validation")

    monkeypatch.setattr(envs_mod, "make_vec_env", no_env)
    monkeypatch.setattr(gym, "make", no_env)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:  # the CLI turns the agent's ValueError into one line
        train_cli.main([*flags, "--n-envs", "2", "--run-dir", str(run), "--no-progress"])
    msg = str(e.value)
    assert "\n" not in msg and f"{option}=" in msg and f"is invalid; accepted: {accepted}" in msg
    assert not run.exists()


def test_cli_fisher_outside_its_choices(capsys, tmp_path: Path) -> None:
    """``--fisher`` lists its choices: argparse refuses others before anything is built."""
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--fisher", "hessian", "--run-dir", str(run), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --fisher: invalid choice: 'hessian'" in err and "'ekfac'" in err
    assert not run.exists()


def test_cli_unknown_env_id_one_line_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"unknown env id 'NoSuchEnv-v9'[^\n]*$"):
        train_cli.main(["--env", "NoSuchEnv-v9", "--run-dir", str(run), "--no-progress"])
    assert not run.exists()


def test_cli_process_prints_the_error_as_its_last_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--cg-iters", "0"]
        + ["--run-dir", str(run), "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "cg_iters=0 is invalid; accepted: an int >= 1" in last
    assert not run.exists()
