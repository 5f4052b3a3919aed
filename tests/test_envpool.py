"""EnvPool backend (``vectorization="envpool"``) against Gymnasium's own envs.

Transitions: Gymnasium's env is put into EnvPool's initial state (recovered from EnvPool's first
observation), then both take the same random actions; observations, rewards and episode ends
must agree. MuJoCo observations are float64 in both, so they agree to 1e-9 over
``MUJOCO_STEPS`` steps (a few ulps at first, growing through the contacts); classic-control
observations are float32, so the recovered state is rounded and they agree to 1e-5. EnvPool
returns rewards in float32: they agree to a relative 1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest

import envs
from agents import TRPO

pytest.importorskip("envpool")
gym = pytest.importorskip("gymnasium")

MUJOCO_STEPS, CLASSIC_STEPS = 20, 40


def _pool_and_twin(env_id: str, seed: int = 3) -> tuple[envs.EnvPoolVectorEnv, gym.Env]:
    """An EnvPool env after its first reset, and a Gymnasium env put into the same state."""
    pool = envs.make_vec_env(env_id, 1, None, "envpool")
    obs, info = pool.reset(seed=seed)
    twin = gym.make(env_id)
    twin.reset(seed=0)
    u = twin.unwrapped
    o = obs[0].astype(np.float64)
    if env_id.endswith("-v5"):  # MuJoCo: obs = qpos[1:] ++ qvel; qpos[0] (x) is not observed
        nq = u.model.nq
        u.set_state(np.concatenate([info["x_position"][:1], o[: nq - 1]]), o[nq - 1 :])
    elif env_id == "CartPole-v1":
        u.state = o.copy()
    elif env_id == "Pendulum-v1":
        u.state = np.array([np.arctan2(o[1], o[0]), o[2]])
    elif env_id == "Acrobot-v1":
        u.state = np.array([np.arctan2(o[1], o[0]), np.arctan2(o[3], o[2]), o[4], o[5]])
    return pool, twin


@pytest.mark.parametrize(
    "env_id, steps, atol",
    [
        ("Hopper-v5", MUJOCO_STEPS, 1e-9),
        ("HalfCheetah-v5", MUJOCO_STEPS, 1e-9),
        ("Walker2d-v5", MUJOCO_STEPS, 1e-9),
        ("CartPole-v1", CLASSIC_STEPS, 1e-5),
        ("Pendulum-v1", CLASSIC_STEPS, 1e-5),
        ("Acrobot-v1", CLASSIC_STEPS, 1e-5),
    ],
)
def test_transitions_match_gymnasium(env_id: str, steps: int, atol: float) -> None:
    pool, twin = _pool_and_twin(env_id)
    rng = np.random.default_rng(0)
    space = twin.action_space
    for t in range(steps):
        if isinstance(space, gym.spaces.Discrete):
            a = np.array([rng.integers(space.n)])
        else:
            a = rng.uniform(space.low, space.high, size=(1, *space.shape)).astype(space.dtype)
        obs, reward, terminated, truncated, infos = pool.step(a)
        g_obs, g_reward, g_term, g_trunc, _ = twin.step(a[0])
        assert (terminated[0], truncated[0]) == (g_term, g_trunc), f"episode end at step {t}"
        if terminated[0] or truncated[0]:
            np.testing.assert_allclose(infos["final_obs"][0], g_obs, rtol=0, atol=atol)
            break
        np.testing.assert_allclose(obs[0], g_obs, rtol=0, atol=atol, err_msg=f"step {t}")
        assert reward[0] == pytest.approx(g_reward, rel=1e-6, abs=1e-6)  # EnvPool: float32
    pool.close()


def test_episode_ends_like_the_gymnasium_vector_env() -> None:
    """Pendulum truncates every episode at 200 steps: both backends flag step 200 truncated (not
    terminated), report its last observation in ``final_obs`` and return a reset one."""
    pool = envs.make_vec_env("Pendulum-v1", 3, 0, "envpool")
    sync = envs.make_vec_env("Pendulum-v1", 3, 0, "sync")
    for vec in (pool, sync):
        actions = np.zeros((3, 1), np.float32)
        for _ in range(199):
            obs, _, terminated, truncated, infos = vec.step(actions)
            assert not (terminated.any() or truncated.any()) and "_final_obs" not in infos
        obs, _, terminated, truncated, infos = vec.step(actions)
        assert truncated.all() and not terminated.any() and infos["_final_obs"].all()
        for i in range(3):
            final = infos["final_obs"][i]
            assert final.shape == (3,) and not np.allclose(final, obs[i])
            # a reset Pendulum starts with |theta_dot| <= 1; 200 zero-torque steps later it swings
        assert np.all(np.abs(obs[:, 2]) <= 1.0)
        vec.close()


def test_seeding_is_reproducible() -> None:
    a = envs.make_vec_env("CartPole-v1", 2, 7, "envpool")
    b = envs.make_vec_env("CartPole-v1", 2, 7, "envpool")
    first, _ = a.reset(seed=7)
    np.testing.assert_array_equal(first, b.reset(seed=7)[0])
    for _ in range(30):
        oa, ra, *_ = a.step(np.array([1, 0]))
        ob, rb, *_ = b.step(np.array([1, 0]))
        np.testing.assert_array_equal(oa, ob)
    np.testing.assert_array_equal(a.reset(seed=7)[0], first)  # re-seeding restarts the sequence
    assert not np.array_equal(a.reset(seed=8)[0], first)


def test_bad_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="EnvPool has no task"):
        envs.make_vec_env("npg/Bandit-v0", 1, 0, "envpool")
    with pytest.raises(ValueError, match="no option"):
        envs.make_vec_env("CartPole-v1", 1, 0, "envpool", not_an_option=3)
    pool = envs.EnvPoolVectorEnv("CartPole-v1", 1, None)
    with pytest.raises(RuntimeError, match="before reset"):
        pool.step(np.array([0]))


def test_agent_trains_saves_and_resumes_on_envpool(tmp_path) -> None:
    model = TRPO("MlpPolicy", "CartPole-v1", n_envs=2, n_steps=128, vectorization="envpool", seed=0)
    model.learn(512)
    assert model.num_timesteps == 512 and model._env_states() is None  # no state snapshot
    path = model.save(tmp_path / "m.pt")
    again = TRPO.load(path)
    again.learn(256, reset_num_timesteps=False)
    assert again.num_timesteps == 768
