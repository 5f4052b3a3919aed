"""envs: make/vectorize by id, flattening, analytic tasks, state snapshots."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from conftest import DictObsEnv
from gymnasium import spaces

import envs
from envs import get_env_state, make_env, make_vec_env, set_env_state, supports_state


def test_unknown_env_id_one_line_error() -> None:
    with pytest.raises(ValueError, match="unknown env id 'NoSuchEnv-v9'") as e:
        make_env("NoSuchEnv-v9")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="NoSuchEnv-v9"):
        make_vec_env("NoSuchEnv-v9", 2)


def test_vec_env_same_step_autoreset_and_seeding() -> None:
    a = make_vec_env("CartPole-v1", 3, seed=5)
    b = make_vec_env("CartPole-v1", 3, seed=5)
    single = make_env("CartPole-v1")
    obs_single, _ = single.reset(seed=6)
    obs_a, _ = a.reset(seed=5)
    obs_b, _ = b.reset(seed=5)
    np.testing.assert_array_equal(obs_a, obs_b)
    np.testing.assert_array_equal(obs_a[1], obs_single)  # sub-env i is seeded with seed + i
    assert a.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    # push env 0 to the end of an episode: the final obs is in infos, obs is a reset one
    for _ in range(500):
        obs, _, term, trunc, infos = a.step(np.zeros(3, dtype=np.int64))
        if term[0] or trunc[0]:
            assert infos["_final_obs"][0]
            assert abs(infos["final_obs"][0][2]) > 0.2 or abs(infos["final_obs"][0][0]) > 2.4
            assert abs(obs[0]).max() <= 0.05
            break
    else:
        pytest.fail("no episode ended")
    a.close()
    b.close()


def test_dict_observations_are_flattened() -> None:
    gym.register("test/DictObs-v0", entry_point=DictObsEnv)
    env = make_env("test/DictObs-v0", seed=0)
    assert isinstance(env.observation_space, spaces.Box)
    assert env.observation_space.shape == (5,)


def test_analytic_bandit() -> None:
    env = make_env("npg/Bandit-v0", seed=0)
    obs, _ = env.reset()
    u = env.unwrapped
    assert u.optimal_action == int(np.argmax(u.means))
    _, r, term, trunc, _ = env.step(u.optimal_action)
    assert r == u.optimal_return and term and not trunc
    g = make_env("npg/GaussianBandit-v0", seed=0)
    g.reset()
    _, r, term, _, _ = g.step(np.array([g.unwrapped.target], np.float32))
    assert r == pytest.approx(0.0, abs=1e-12) and term


@pytest.mark.parametrize(
    "env_id", ["CartPole-v1", "Pendulum-v1", "Acrobot-v1", "MountainCar-v0", "Hopper-v5"]
)
def test_env_state_roundtrip_continues_identically(env_id: str) -> None:
    if env_id == "Hopper-v5":
        pytest.importorskip("mujoco")
    env = make_env(env_id, seed=1)
    assert supports_state(env)
    env.reset(seed=1)
    actions = [env.action_space.sample() for _ in range(40)]
    if env_id == "CartPole-v1":
        actions = [i % 2 for i in range(40)]  # keeps the pole up: no stepping past the end
    for a in actions[:10]:
        env.step(a)
    state = get_env_state(env)
    ref = [env.step(a)[:2] for a in actions[10:]]
    other = make_env(env_id, seed=99)
    other.reset(seed=99)
    set_env_state(other, state)
    got = [other.step(a)[:2] for a in actions[10:]]
    for (o1, r1), (o2, r2) in zip(ref, got, strict=True):
        np.testing.assert_array_equal(o1, o2)
        assert r1 == r2
    assert envs.get_env_state(other)["wrappers"] == envs.get_env_state(env)["wrappers"]


def test_box2d_has_no_state_adapter() -> None:
    pytest.importorskip("Box2D")
    assert not supports_state(make_env("LunarLander-v3"))


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1", "Acrobot-v1"])
def test_lean_sync_vector_env_steps_like_gymnasium(env_id: str) -> None:
    """Same observations, rewards, flags and infos (final observations included) as
    Gymnasium's ``SyncVectorEnv`` over episodes that terminate and that are truncated."""
    from gymnasium.vector import AutoresetMode, SyncVectorEnv

    from envs import LeanSyncVectorEnv

    fns = [lambda: make_env(env_id, None)] * 3
    lean = LeanSyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP)
    ref = SyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP)
    for v in (lean, ref):
        v.reset(seed=5)
    lean.action_space.seed(1)
    ends = 0
    for _ in range(520):
        actions = lean.action_space.sample()
        a, b = lean.step(actions), ref.step(actions)
        for x, y in zip(a[:4], b[:4], strict=True):
            np.testing.assert_array_equal(x, y)
        assert a[0] is not lean._observations  # a copy, as with copy=True
        assert sorted(a[4]) == sorted(b[4])
        if "final_obs" in b[4]:
            ends += int(b[4]["_final_obs"].sum())
            np.testing.assert_array_equal(a[4]["_final_obs"], b[4]["_final_obs"])
            for i in np.flatnonzero(b[4]["_final_obs"]):
                np.testing.assert_array_equal(a[4]["final_obs"][i], b[4]["final_obs"][i])
    assert ends >= 3  # episode ends were exercised
    assert isinstance(make_vec_env(env_id, 2), LeanSyncVectorEnv)
    quiet = make_vec_env(env_id, 2, seed=0, step_infos=False)
    for _ in range(250):
        _, _, term, trunc, info = quiet.step(quiet.action_space.sample())
        assert set(info) <= {"final_obs", "_final_obs", "final_info", "_final_info"}
        assert ("final_obs" in info) == bool((term | trunc).any())
