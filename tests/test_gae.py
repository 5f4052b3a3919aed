"""GAE against a hand-computed example with a termination and a truncation."""

from __future__ import annotations

import numpy as np
import pytest

from agents.gae import compute_gae


def test_gae_hand_example_termination_and_truncation() -> None:
    gamma, lam = 0.9, 0.8
    # env 0: terminated at t=1 (no bootstrap), truncated at t=3 (bootstrap from V(final)=2.0)
    # env 1: no episode end; bootstraps from last_values = 1.0
    rewards = np.array([[1, 0], [1, 0], [1, 0], [1, 1]], np.float32)
    values = np.array([[0.5, 0], [0.6, 0], [0.7, 0], [0.8, 0]], np.float32)
    last_values = np.array([0.9, 1.0], np.float32)
    terminated = np.zeros((4, 2), bool)
    truncated = np.zeros((4, 2), bool)
    terminated[1, 0] = True
    truncated[3, 0] = True
    final_values = np.zeros((4, 2), np.float32)
    final_values[3, 0] = 2.0
    adv, ret = compute_gae(
        rewards, values, last_values, terminated, truncated, final_values, gamma, lam
    )
    # By hand, env 0:
    #   t=3 truncated: δ = 1 + 0.9·2.0 - 0.8 = 2.0;            A3 = 2.0
    #   t=2:           δ = 1 + 0.9·0.8 - 0.7 = 1.02;           A2 = 1.02 + 0.72·2.0 = 2.46
    #   t=1 terminated: δ = 1 + 0 - 0.6 = 0.4;                 A1 = 0.4
    #   t=0:           δ = 1 + 0.9·0.6 - 0.5 = 1.04;           A0 = 1.04 + 0.72·0.4 = 1.328
    # env 1: δ3 = 1 + 0.9·1.0 = 1.9, then A_t = 0.72·A_{t+1}
    expected0 = [1.328, 0.4, 2.46, 2.0]
    expected1 = [0.72**3 * 1.9, 0.72**2 * 1.9, 0.72 * 1.9, 1.9]
    np.testing.assert_allclose(adv[:, 0], expected0, rtol=1e-6)
    np.testing.assert_allclose(adv[:, 1], expected1, rtol=1e-6)
    np.testing.assert_allclose(ret, adv + values, rtol=1e-6)


def test_termination_wins_over_truncation_value() -> None:
    """A terminated step never bootstraps, whatever final_values holds there."""
    rewards = np.ones((1, 1), np.float32)
    values = np.zeros((1, 1), np.float32)
    adv, _ = compute_gae(
        rewards,
        values,
        np.array([5.0], np.float32),
        np.ones((1, 1), bool),
        np.zeros((1, 1), bool),
        np.full((1, 1), 7.0, np.float32),
        0.99,
        0.95,
    )
    assert adv[0, 0] == pytest.approx(1.0)


def test_gae_lambda_one_is_discounted_return_minus_value() -> None:
    rng = np.random.default_rng(0)
    r = rng.normal(size=(6, 1)).astype(np.float32)
    v = rng.normal(size=(6, 1)).astype(np.float32)
    last = np.array([0.3], np.float32)
    z = np.zeros((6, 1), bool)
    adv, ret = compute_gae(r, v, last, z, z, np.zeros_like(v), 0.9, 1.0)
    g = last[0]
    for t in range(5, -1, -1):
        g = r[t, 0] + 0.9 * g
        assert ret[t, 0] == pytest.approx(g, rel=1e-5)


def test_dropped_transition_gets_no_advantage_and_the_step_before_bootstraps() -> None:
    """A transition dropped for non-finite env output is stored as reward 0 + termination; it
    must not leak ``-V(s_t)`` into earlier steps: the step before bootstraps from ``V(s_t)``."""
    gamma, lam = 0.99, 0.95
    rewards = np.array([[1.0], [1.0], [0.0], [1.0]], np.float32)  # step 2 dropped
    values = np.full((4, 1), 10.0, np.float32)
    terminated = np.zeros((4, 1), bool)
    terminated[2, 0] = True  # how the rollout stores a dropped step
    truncated = np.zeros((4, 1), bool)
    valid = np.ones((4, 1), bool)
    valid[2, 0] = False
    adv, ret = compute_gae(
        rewards,
        values,
        np.array([10.0], np.float32),
        terminated,
        truncated,
        np.zeros((4, 1), np.float32),
        gamma,
        lam,
        valid,
    )
    # t=1: δ = 1 + 0.99·10 - 10 = 0.9, and A2 = 0 adds nothing;  t=0: A0 = 0.9 + γλ·0.9
    np.testing.assert_allclose(adv[:, 0], [0.9 + gamma * lam * 0.9, 0.9, 0.0, 0.9], rtol=1e-6)
    np.testing.assert_allclose(ret[:2, 0], [10.0 + 0.9 + gamma * lam * 0.9, 10.9], rtol=1e-6)


def _reference_gae(
    rewards, values, last_values, terminated, truncated, final_values, g, lam, valid
):
    """The textbook backward loop, one step at a time (the formula in compute_gae's docstring)."""
    adv = np.zeros_like(values)
    running = np.zeros_like(last_values)
    for t in range(rewards.shape[0] - 1, -1, -1):
        nxt = last_values if t == rewards.shape[0] - 1 else values[t + 1]
        nxt = np.where(terminated[t], 0.0, np.where(truncated[t], final_values[t], nxt))
        not_done = (~(terminated[t] | truncated[t])).astype(values.dtype)
        running = rewards[t] + g * nxt - values[t] + g * lam * not_done * running
        running = np.where(valid[t], running, 0.0)
        adv[t] = running
    return adv


@pytest.mark.parametrize("reward_dtype", [np.float32, np.float64])
def test_matches_the_step_by_step_loop_bit_for_bit(reward_dtype) -> None:
    rng = np.random.default_rng(0)
    t, e = 200, 3
    rewards = rng.standard_normal((t, e)).astype(reward_dtype)
    values = rng.standard_normal((t, e)).astype(np.float32)
    last, final = rng.standard_normal(e).astype(np.float32), rng.standard_normal((t, e))
    terminated = rng.random((t, e)) < 0.03
    truncated = (rng.random((t, e)) < 0.03) & ~terminated
    valid = rng.random((t, e)) > 0.05
    args = (rewards, values, last, terminated, truncated, final.astype(np.float32), 0.99, 0.95)
    adv, ret = compute_gae(*args, valid)
    assert adv.dtype == values.dtype
    np.testing.assert_array_equal(adv, _reference_gae(*args, valid))
    np.testing.assert_array_equal(ret, adv + values)
