"""The rollout loop: buffers, SAME_STEP episode bookkeeping, final observations, NaN errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents import TRPO, NonFiniteError
from agents.rollout import RolloutCollector
from envs import make_env


def _collector(
    env_id: str, n_envs: int, n_steps: int, seed: int = 0
) -> tuple[TRPO, RolloutCollector]:
    agent = TRPO(
        "MlpPolicy", env_id, n_envs=n_envs, n_steps=n_steps, vf_minibatch=n_steps, seed=seed
    )
    agent.collector.start(agent.env.reset(seed=seed)[0])
    return agent, agent.collector


def test_episode_returns_match_an_independent_replay() -> None:
    agent, col = _collector("CartPole-v1", 3, 200)
    batch = col.collect()
    actions = batch.actions.numpy()
    # Replay each sub-env alone with the same seed and actions; SAME_STEP autoreset means the
    # env resets (unseeded, continuing its RNG) right after an episode ends.
    expected = []
    for i in range(3):
        env = make_env("CartPole-v1")
        env.reset(seed=i)
        ret, length = 0.0, 0
        for t in range(200):
            _, r, term, trunc, _ = env.step(int(actions[t, i]))
            ret += r
            length += 1
            if term or trunc:
                expected.append((t, i, ret, length))
                env.reset()
                ret, length = 0.0, 0
    expected.sort()
    assert [(r, n) for _, _, r, n in expected] == list(col.episodes)
    done = (batch.terminated | batch.truncated).numpy()
    assert done.sum() == len(expected)
    # episodes in flight carry over to the next rollout
    assert col.ep_length.sum() > 0


def test_buffers_are_preallocated_and_reused() -> None:
    _, col = _collector("CartPole-v1", 2, 16)
    b1 = col.collect()
    ptr = b1.obs.data_ptr(), b1.actions.data_ptr(), b1.rewards.data_ptr()
    b2 = col.collect()
    assert (b2.obs.data_ptr(), b2.actions.data_ptr(), b2.rewards.data_ptr()) == ptr
    assert b2.obs.shape == (16, 2, 4) and b2.actions.dtype == torch.int64


def test_truncations_carry_their_final_observation() -> None:
    agent, col = _collector("Pendulum-v1", 2, 450)  # Pendulum truncates at 200 steps
    batch = col.collect()
    trunc = batch.truncated.numpy()
    assert trunc.sum() == 4 and not batch.terminated.any()
    idx = batch.final_index
    assert sorted(map(tuple, idx.tolist())) == sorted(zip(*np.nonzero(trunc), strict=True))
    # the final observation is the one *before* the reset: a valid Pendulum obs (cos, sin, ω)
    # and not the reset observation stored in the next row of the buffer
    fo = batch.final_obs.numpy()
    np.testing.assert_allclose(fo[:, 0] ** 2 + fo[:, 1] ** 2, 1.0, rtol=1e-5)
    for k, (t, e) in enumerate(idx):
        assert not np.array_equal(fo[k], batch.obs[t + 1, e].numpy())
    assert all(n == 200 for _, n in col.episodes)


def test_box_actions_clipped_only_for_the_env() -> None:
    agent, col = _collector("Pendulum-v1", 2, 64)
    with torch.no_grad():
        agent.policy.actor.log_std.fill_(2.0)  # σ ≈ 7.4 ≫ the bound 2
    batch = col.collect()
    a = batch.actions.numpy()
    assert np.abs(a).max() > 2.0  # the buffer keeps the unclipped sample (its log-prob is used)
    clipped = agent.policy.to_env_actions(batch.actions[0])
    assert np.abs(clipped).max() <= 2.0


def test_nan_error_names_env_step_and_field() -> None:
    import tests.test_agents  # noqa: F401  (registers test/NaNObs-v0)

    _, col = _collector("test/NaNObs-v0", 1, 32)
    with pytest.raises(NonFiniteError) as e:
        col.collect()
    msg = str(e.value)
    assert "'test/NaNObs-v0'" in msg and "observation" in msg and "env step 5" in msg
