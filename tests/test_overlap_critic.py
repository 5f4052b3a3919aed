"""``overlap_critic``: update k's critic fit runs during rollout k+1, bit-identically."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

import agents.critic
from agents import KFACNAC, NPG, TRPO, CheckpointManager, TrainingInterrupted, load_checkpoint
from agents.base import TIMING_KEYS

SMALL = dict(n_envs=2, n_steps=64, vf_minibatch=32, vf_epochs=3, seed=0)


def _rows(rows: list[dict]) -> list[dict]:
    """The metrics rows without their timing columns (NaN made comparable)."""
    out = []
    for r in rows:
        out.append(
            {
                k: ("nan" if isinstance(v, float) and math.isnan(v) else v)
                for k, v in r.items()
                if k not in TIMING_KEYS
            }
        )
    return out


def _equal(x, y) -> bool:
    """Bit-equality of nested dicts/lists of tensors and plain values."""
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and list(x) == list(y) and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, list | tuple):
        return len(x) == len(y) and all(_equal(u, v) for u, v in zip(x, y, strict=True))
    return x == y


def _assert_same(a, b) -> None:
    """Same policy (actor and critic) parameters and critic optimizer state, bit for bit."""
    sa, sb = a.policy.state_dict(), b.policy.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert _equal(a.vf_optimizer.state_dict(), b.vf_optimizer.state_dict())


@pytest.fixture
def slow_fit(monkeypatch):
    """Start every background critic fit 50 ms late, so that it reads its inputs while the
    next rollout runs (a fit sharing a buffer with the rollout would then differ)."""
    real_fit = agents.critic.fit_critic

    def fit(*args):
        time.sleep(0.05)
        return real_fit(*args)

    monkeypatch.setattr(agents.critic, "fit_critic", fit)


def _watch_overlap(agent) -> list[bool]:
    """Record, per rollout, whether it started with the last update's critic fit pending."""
    seen: list[bool] = []
    real = agent.collector.collect

    def collect(*args, **kwargs):
        seen.append(agent._pending is not None)
        return real(*args, **kwargs)

    agent.collector.collect = collect
    return seen


@pytest.mark.parametrize(
    "cls,env_id,extra",
    [
        (TRPO, "CartPole-v1", {}),
        (TRPO, "Pendulum-v1", {"normalize_obs": True, "normalize_reward": True}),
        (NPG, "Pendulum-v1", {"fisher": "mc", "fisher_subsample": 0.5}),
    ],
)
def test_whole_run_is_bit_identical_with_and_without_overlap(cls, env_id, extra, slow_fit) -> None:
    runs = []
    for overlap in (False, True):
        rows: list[dict] = []
        agent = cls("MlpPolicy", env_id, overlap_critic=overlap, **SMALL, **extra)
        seen = _watch_overlap(agent)
        agent.learn(5 * 128, callback=rows.append)
        runs.append((agent, rows, seen))
    (a, rows_a, seen_a), (b, rows_b, seen_b) = runs
    assert seen_a == [False] * 5 and seen_b == [False] + [True] * 4  # it did overlap
    assert b._pending is None  # learn() returned with the critic fitted
    _assert_same(a, b)
    assert _rows(rows_a) == _rows(rows_b)
    assert list(rows_a[0]) == list(rows_b[0])  # same columns, same order


def test_save_mid_run_and_resume_match_an_uninterrupted_run(tmp_path: Path, slow_fit) -> None:
    full: list[dict] = []
    ref = TRPO("MlpPolicy", "Pendulum-v1", normalize_obs=True, **SMALL)
    ref.learn(6 * 128, callback=full.append)
    first: list[dict] = []
    a = TRPO("MlpPolicy", "Pendulum-v1", normalize_obs=True, overlap_critic=True, **SMALL)
    a.learn(2 * 128, callback=first.append)
    a.save(tmp_path / "c.pt")
    b = TRPO.load(tmp_path / "c.pt")
    assert b.overlap_critic
    rest: list[dict] = []
    b.learn(4 * 128, callback=rest.append, reset_num_timesteps=False)
    _assert_same(ref, b)
    assert _rows(full) == _rows(first + rest)


def test_save_while_the_fit_is_in_flight_saves_the_fitted_critic(monkeypatch, tmp_path) -> None:
    ref = TRPO("MlpPolicy", "CartPole-v1", **SMALL).learn(2 * 128)
    real_fit = agents.critic.fit_critic

    def slow_fit(*args):
        time.sleep(0.3)  # still in flight when save() is called
        return real_fit(*args)

    monkeypatch.setattr(agents.critic, "fit_critic", slow_fit)
    agent = TRPO("MlpPolicy", "CartPole-v1", overlap_critic=True, **SMALL)
    real = agent.collector.collect
    calls = {"n": 0}

    def collect(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # update 2's fit was started just now
            assert agent._pending is not None and agent._pending.background is not None
            agent.save(tmp_path / "mid.pt")
        return real(*args, **kwargs)

    agent.collector.collect = collect
    agent.learn(4 * 128)
    saved = TRPO.load(tmp_path / "mid.pt")
    for k, v in ref.policy.critic.state_dict().items():
        assert torch.equal(saved.policy.critic.state_dict()[k], v), k


def test_periodic_checkpoints_and_sigint_in_a_rollout_resume_exactly(
    tmp_path: Path, slow_fit
) -> None:
    full: list[dict] = []
    ref = TRPO("MlpPolicy", "CartPole-v1", **SMALL)
    ref.learn(6 * 128, callback=full.append)
    agent = TRPO("MlpPolicy", "CartPole-v1", overlap_critic=True, **SMALL)
    real_step = agent.env.step
    calls = {"n": 0}

    def step(actions):
        calls["n"] += 1
        if calls["n"] == 64 * 3 + 10:  # inside the 4th rollout, update 3's fit pending
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(actions)

    agent.env.step = step
    got: list[dict] = []
    ckpts = CheckpointManager(tmp_path / "ck", keep_last=10)
    with pytest.raises(TrainingInterrupted, match="SIGINT"):
        agent.learn(6 * 128, callback=got.append, checkpoints=ckpts, checkpoint_every=2)
    assert [r["update"] for r in got] == [1, 2, 3]
    state, _ = ckpts.load_latest()
    assert state["num_updates"] == 3
    b = TRPO.load(state)
    b.learn(3 * 128, callback=got.append, reset_num_timesteps=False)
    _assert_same(ref, b)
    assert _rows(full) == _rows(got)
    # the periodic checkpoint of update 2 (written after rollout 3) resumes exactly too
    (periodic,) = [s for s in map(load_checkpoint, ckpts.paths()) if s["num_updates"] == 2]
    c = TRPO.load(periodic)
    c.learn(4 * 128, reset_num_timesteps=False)
    _assert_same(ref, c)


def test_callback_stop_leaves_the_agent_at_that_update(slow_fit) -> None:
    def stop_at_3(m: dict) -> bool:
        return m["update"] < 3

    agents_ = []
    for overlap in (False, True):
        agent = TRPO("MlpPolicy", "CartPole-v1", overlap_critic=overlap, **SMALL)
        agent.learn(6 * 128, callback=stop_at_3)
        assert agent.num_updates == 3 and agent.num_timesteps == 3 * 128
        agent.learn(2 * 128, reset_num_timesteps=False)  # continues from the same state
        agents_.append(agent)
    _assert_same(*agents_)


def test_an_error_in_the_background_fit_reaches_the_caller(monkeypatch) -> None:
    real = agents.critic.fit_critic
    calls = {"n": 0}

    def fit(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("critic fit failed")
        return real(*args)

    monkeypatch.setattr(agents.critic, "fit_critic", fit)
    agent = TRPO("MlpPolicy", "CartPole-v1", overlap_critic=True, **SMALL)
    seen = _watch_overlap(agent)
    with pytest.raises(RuntimeError, match="critic fit failed"):
        agent.learn(5 * 128)
    assert seen == [False, True, True] and agent._pending is None


def test_kfac_nac_keeps_its_critic_fit_in_the_update() -> None:
    """K-FAC NAC's critic steps (its own NGD, or Adam through autograd) hold the GIL: they
    stay sequential, and the option changes nothing."""
    for critic_optimizer in ("kfac", "adam"):
        runs = []
        for overlap in (False, True):
            agent = KFACNAC(
                "MlpPolicy",
                "Pendulum-v1",
                critic_optimizer=critic_optimizer,
                overlap_critic=overlap,
                **SMALL,
            )
            seen = _watch_overlap(agent)
            agent.learn(3 * 128)
            assert seen == [False] * 3
            runs.append(agent)
        _assert_same(*runs)


def test_an_error_in_the_next_rollout_leaves_the_critic_fitted(monkeypatch) -> None:
    ref = TRPO("MlpPolicy", "CartPole-v1", **SMALL).learn(2 * 128)
    real_fit = agents.critic.fit_critic

    def slow_fit(*args):
        time.sleep(0.3)  # still in flight when the rollout fails
        return real_fit(*args)

    monkeypatch.setattr(agents.critic, "fit_critic", slow_fit)
    agent = TRPO("MlpPolicy", "CartPole-v1", overlap_critic=True, **SMALL)
    real_step = agent.env.step
    calls = {"n": 0}

    def step(actions):
        calls["n"] += 1
        if calls["n"] == 64 * 2 + 5:  # inside the 3rd rollout, update 2's fit in flight
            raise OSError("env crashed")
        return real_step(actions)

    agent.env.step = step
    with pytest.raises(Exception, match="env crashed"):
        agent.learn(5 * 128)
    assert agent._pending is None
    for k, v in ref.policy.critic.state_dict().items():
        assert torch.equal(agent.policy.critic.state_dict()[k], v), k
