"""Distributed rollouts on Ray: statistics merge, transport, reproducibility, lost workers,
learning. The Ray tests use one local Ray instance (2 CPUs) shared by the module."""

from __future__ import annotations

import os
import signal
import warnings

import numpy as np
import pytest
import torch

from agents import TRPO
from agents.normalize import RunningMeanStd
from agents.presets import get_preset
from agents.ray_rollout import (
    BATCH_FIELDS,
    RolloutWorker,
    WorkerLostWarning,
    _TrackingRMS,
    merge_moments,
    worker_seed,
)

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'npg[dist]')")

from agents.ray_rollout import RayRolloutCollector, attach_ray_workers  # noqa: E402

SMALL = dict(n_envs=2, n_steps=64, vf_minibatch=64, vf_epochs=2, normalize_obs=True)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _actor_params(agent) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in agent.policy.actor.parameters()])


# --- no Ray needed ----------------------------------------------------------------------------
def test_merged_moments_equal_those_of_the_concatenated_stream() -> None:
    rng = np.random.default_rng(0)
    chunks = [rng.normal(i, 1 + i, size=(n, 3)) for i, n in enumerate((7, 1, 30, 12))]
    single = RunningMeanStd((3,))  # one process seeing every batch in turn
    for c in chunks:
        single.update(c)
    learner = RunningMeanStd((3,))  # the learner merging each worker's delta
    for c in chunks:
        worker = _TrackingRMS((3,))
        worker.set_global((learner.mean, learner.var, learner.count))
        for row_block in np.array_split(c, 3):  # workers update step by step
            if len(row_block):
                worker.update(row_block)
        merge_moments(learner, *worker.take_delta())
    np.testing.assert_allclose(learner.mean, single.mean, rtol=1e-12)
    np.testing.assert_allclose(learner.var, single.var, rtol=1e-12)
    assert learner.count == pytest.approx(single.count)
    everything = np.concatenate(chunks)
    np.testing.assert_allclose(learner.mean, everything.mean(0), rtol=1e-5)
    np.testing.assert_allclose(learner.var, everything.var(0), rtol=1e-3)


def test_worker_seeds_are_distinct_and_deterministic() -> None:
    seeds = {worker_seed(s, i, g) for s in range(3) for i in range(8) for g in range(3)}
    assert len(seeds) == 3 * 8 * 3
    assert worker_seed(5, 2, 1) == worker_seed(5, 2, 1)
    assert all(0 <= s < 2**31 for s in seeds)


# --- Ray --------------------------------------------------------------------------------------
def test_ray_batch_equals_in_process_worker(local_ray) -> None:
    """The transport is lossless: a Ray worker returns exactly what the same worker returns
    in-process, and the learner's statistics are those of the worker's observations."""
    agent = TRPO("MlpPolicy", "CartPole-v1", seed=4, **SMALL)
    col = attach_ray_workers(agent, 1)
    try:
        payload = {
            "actor": agent.policy.actor.state_dict(),
            "obs_rms": (agent.obs_normalizer.rms.mean, agent.obs_normalizer.rms.var, 1e-4),
            "reward_rms": (np.zeros(()), np.ones(()), 1e-4),
        }
        dtype = str(torch.get_default_dtype()).removeprefix("torch.")
        ref = RolloutWorker(dict(agent.config), "CartPole-v1", 0, dtype).collect(payload, 0)
        batch = col.collect()
        for k in BATCH_FIELDS:
            assert torch.equal(getattr(batch, k), torch.from_numpy(ref[k])), k
        assert torch.equal(batch.last_obs, torch.from_numpy(ref["last_obs"]))
        # the reset observations plus one per env step, merged into the global statistics
        assert agent.obs_normalizer.rms.count == pytest.approx(1e-4 + 2 + 64 * 2)
        np.testing.assert_allclose(agent.obs_normalizer.rms.mean, ref["obs_delta"][0], atol=1e-4)
        assert batch.obs.shape == (64, 2, 4)
    finally:
        agent.close()


def _run(seed: int, updates: int = 3) -> tuple[torch.Tensor, list[dict]]:
    agent = TRPO("MlpPolicy", "CartPole-v1", seed=seed, **SMALL)
    attach_ray_workers(agent, 2)
    metrics: list[dict] = []
    try:
        agent.learn(updates * 2 * 2 * 64, callback=metrics.append)
        assert agent.n_envs == 4 and agent.num_updates == updates
        return _actor_params(agent), metrics
    finally:
        agent.close()


def test_fixed_seed_reproduces_the_run(local_ray) -> None:
    p1, m1 = _run(seed=7)
    p2, m2 = _run(seed=7)
    p3, _ = _run(seed=8)
    assert torch.equal(p1, p2)
    for a, b in zip(m1, m2, strict=True):
        for k in ("ep_return_mean", "kl", "surrogate_improvement", "value_loss", "episodes"):
            assert a[k] == b[k] or (np.isnan(a[k]) and np.isnan(b[k])), k
    assert not torch.equal(p1, p3)


def test_killed_worker_is_dropped_and_restarted(local_ray) -> None:
    # reference: an undisturbed first rollout of both workers
    agent = TRPO("MlpPolicy", "CartPole-v1", seed=3, **SMALL)
    col = attach_ray_workers(agent, 2, max_restarts=2)
    ref = col.collect()
    agent.close()

    agent = TRPO("MlpPolicy", "CartPole-v1", seed=3, **SMALL)
    col = attach_ray_workers(agent, 2, max_restarts=2)
    try:
        pid = ray.get(col.workers[0].pid.remote())
        col.submit()
        os.kill(pid, signal.SIGKILL)  # worker 0 dies mid-rollout
        with pytest.warns(WorkerLostWarning, match="worker 0 died"):
            results = col.gather()
        batch = col._assemble(results)
        # only worker 1's columns, bit-identical to the undisturbed run's
        assert batch.rewards.shape == (64, 2)
        for k in BATCH_FIELDS:
            assert torch.equal(getattr(batch, k), getattr(ref, k)[:, 2:]), k
        assert col.generations == [1, 0] and col.lost_batches == 1
        assert agent.obs_normalizer.rms.count == pytest.approx(1e-4 + 2 + 64 * 2)
        # the update on the partial batch is sound, and the restarted worker rejoins
        metrics = agent.train_on_batch(batch)
        assert np.isfinite(metrics["value_loss"])
        assert torch.isfinite(_actor_params(agent)).all()
        with warnings.catch_warnings():
            warnings.simplefilter("error", WorkerLostWarning)
            full = col.collect()
        assert full.rewards.shape == (64, 4)
        assert ray.get(col.workers[0].pid.remote()) != pid
    finally:
        agent.close()


def test_training_survives_a_worker_killed_between_updates(local_ray) -> None:
    agent = TRPO("MlpPolicy", "CartPole-v1", seed=1, **SMALL)
    col = attach_ray_workers(agent, 2, max_restarts=2)
    seen: list[int] = []

    def cb(m: dict) -> None:
        seen.append(m["update"])
        if m["update"] == 1:
            os.kill(ray.get(col.workers[1].pid.remote()), signal.SIGKILL)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", WorkerLostWarning)
            agent.learn(4 * 256, callback=cb)
        # the lost half-batch is not counted as collected, so one more update makes up for it
        assert seen == [1, 2, 3, 4, 5]
        assert torch.isfinite(_actor_params(agent)).all()
        assert agent.num_timesteps == col.total_steps == 4 * 256 + 128
    finally:
        agent.close()


def test_rejects_a_bad_worker_count(local_ray) -> None:
    agent = TRPO("MlpPolicy", "CartPole-v1", seed=0, **SMALL)
    try:
        with pytest.raises(ValueError, match="workers"):
            RayRolloutCollector(agent, 0)
    finally:
        agent.close()


def test_training_with_workers_reaches_cartpole_threshold(local_ray) -> None:
    """Same preset and batch size as the single-process loop (2 workers × 1 env × 512 steps):
    the mean return reaches 195 within the preset's budget, as the single-process run does."""
    preset = dict(get_preset("trpo", "CartPole-v1"))
    budget = preset.pop("total_timesteps")
    preset["n_envs"] = 1
    agent = TRPO("MlpPolicy", "CartPole-v1", seed=0, **preset)
    attach_ray_workers(agent, 2)
    best = []
    try:
        agent.learn(budget, callback=lambda m: best.append(m["ep_return_mean"]) or best[-1] < 195)
    finally:
        agent.close()
    assert max(best) >= 195, max(best)


def test_checkpoint_of_a_ray_run_resumes_with_and_without_workers(local_ray, tmp_path) -> None:
    agent = TRPO("MlpPolicy", "CartPole-v1", seed=2, **SMALL)
    attach_ray_workers(agent, 2)
    try:
        agent.learn(2 * 256)
        path = agent.save(tmp_path / "model.pt")
        count = agent.obs_normalizer.rms.count
        episodes = list(agent.collector.episodes)
    finally:
        agent.close()
    plain = TRPO.load(path)  # the in-process collector, fresh episodes on the learner's env
    try:
        assert plain.obs_normalizer.rms.count == count
        assert list(plain.collector.episodes) == episodes
        plain.learn(128, reset_num_timesteps=False)
        assert plain.num_timesteps == 512 + 128
    finally:
        plain.close()
    again = TRPO.load(path)
    col = attach_ray_workers(again, 2)
    try:
        assert list(col.episodes) == episodes and col.generations == [2, 2]
        again.learn(256, reset_num_timesteps=False)
        assert again.num_timesteps == 512 + 256
        assert again.obs_normalizer.rms.count == pytest.approx(
            count + 2 * 2 + 256
        )  # resets + steps
    finally:
        again.close()
