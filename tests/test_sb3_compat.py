"""Stable-Baselines3 interop: its evaluate_policy, callbacks, VecEnvs, loggers on our agents."""

from __future__ import annotations

import csv

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from torch import nn

pytest.importorskip("stable_baselines3")
from conftest import DictObsEnv
from stable_baselines3.common.callbacks import (
    BaseCallback,
    CheckpointCallback,
    EvalCallback,
)
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import DummyVecEnv

import agents.kfac_nac
from agents import KFACNAC, TRPO
from tests.test_agents import SMALL, _same_metrics


def test_kfacnac_is_exported() -> None:
    assert KFACNAC is agents.kfac_nac.KFACNAC


def test_sb3_evaluate_policy_matches_a_plain_episode_loop() -> None:
    agent = TRPO("MlpPolicy", "CartPole-v1", **SMALL).learn(256)
    venv = DummyVecEnv([lambda: gym.make("CartPole-v1")])
    venv.seed(123)
    got, _ = evaluate_policy(agent, venv, n_eval_episodes=3, return_episode_rewards=True)
    # reference: the same episodes stepped one raw observation at a time (seed only at first)
    env, want = gym.make("CartPole-v1"), []
    obs, _ = env.reset(seed=123)
    for _ in range(3):
        total, done = 0.0, False
        while not done:
            action, _ = agent.predict(obs, deterministic=True)
            obs, r, term, trunc, _ = env.step(action)
            total += float(r)
            done = term or trunc
        want.append(total)
        obs, _ = env.reset()
    assert got == want


def test_sb3_callbacks_are_called_per_vector_step(tmp_path) -> None:
    agent = TRPO("MlpPolicy", "CartPole-v1", **SMALL)
    eval_cb = EvalCallback(
        gym.make("CartPole-v1"), eval_freq=50, n_eval_episodes=2, log_path=str(tmp_path)
    )
    ckpt = CheckpointCallback(save_freq=64, save_path=str(tmp_path / "ckpt"))
    agent.learn(256, callback=[eval_cb, ckpt])  # 128 vector steps of 2 envs
    assert eval_cb.evaluations_timesteps == [100, 200]
    assert np.isfinite(eval_cb.last_mean_reward)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "rl_model_128_steps.zip",
        "rl_model_256_steps.zip",
    ]
    TRPO.load(tmp_path / "ckpt" / "rl_model_128_steps.zip")


def test_sb3_callback_returning_false_stops_before_the_update() -> None:
    class StopAt(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def _on_training_start(self) -> None:
            self.calls.append("start")

        def _on_rollout_end(self) -> None:
            self.calls.append("rollout_end")

        def _on_step(self) -> bool:
            assert self.locals["dones"].shape == (2,)
            return self.n_calls < 40  # the second rollout (32 vector steps each) stops midway

        def _on_training_end(self) -> None:
            self.calls.append("end")

    agent = TRPO("MlpPolicy", "CartPole-v1", **{**SMALL, "n_steps": 32, "vf_minibatch": 64})
    cb = StopAt()
    agent.learn(10_000, callback=cb)
    assert (agent.num_updates, agent.num_timesteps) == (1, 80)
    assert cb.calls == ["start", "rollout_end", "end"]


def test_a_dummy_vec_env_trains_as_the_gymnasium_vector_env() -> None:
    full, sb3 = [], []
    TRPO("MlpPolicy", "CartPole-v1", **SMALL).learn(6 * 128, callback=full.append)
    venv = DummyVecEnv([lambda: gym.make("CartPole-v1")] * 2)
    agent = TRPO("MlpPolicy", venv, **SMALL)
    agent.learn(6 * 128, callback=sb3.append)
    _same_metrics(full, sb3)
    assert agent.get_env() is venv


def test_sb3_dones_split_into_terminated_and_truncated_as_gymnasium_does() -> None:
    """Same seeds, same actions: the adapted DummyVecEnv and our Gymnasium vector env agree on
    every step's observations, terminations, truncations and final observations. Env 0 balances
    the pole (its episodes hit the 20-step limit: truncated), env 1 pushes right (it falls:
    terminated), so both kinds of episode end occur."""
    import envs
    from agents.sb3_compat import SB3VecEnvAdapter

    make = lambda: gym.make("CartPole-v1", max_episode_steps=20)  # noqa: E731
    adapted = SB3VecEnvAdapter(DummyVecEnv([make, make]))
    reference = envs.make_vec_env("CartPole-v1", 2, None, max_episode_steps=20)
    obs_a, _ = adapted.reset(seed=5)
    obs_r, _ = reference.reset(seed=5)
    ends = {"terminated": 0, "truncated": 0}
    for _ in range(100):
        np.testing.assert_array_equal(obs_a, obs_r)
        actions = np.array([int(obs_r[0, 2] + obs_r[0, 3] > 0), 1])
        obs_a, _, term_a, trunc_a, info_a = adapted.step(actions)
        obs_r, _, term_r, trunc_r, info_r = reference.step(actions)
        np.testing.assert_array_equal(term_a, term_r)
        np.testing.assert_array_equal(trunc_a, trunc_r)
        for i in np.flatnonzero(term_r | trunc_r):
            np.testing.assert_array_equal(info_a["final_obs"][i], info_r["final_obs"][i])
        ends["terminated"] += int(term_r.sum())
        ends["truncated"] += int(trunc_r.sum())
    assert ends["terminated"] > 0 and ends["truncated"] > 0


def test_a_single_gym_env_trains_as_one_env_of_the_vector_env() -> None:
    one = {**SMALL, "n_envs": 1, "vf_minibatch": 64}
    a, b = [], []
    KFACNAC("MlpPolicy", "CartPole-v1", **one).learn(4 * 64, callback=a.append)
    env = gym.make("CartPole-v1")
    agent = KFACNAC("MlpPolicy", env, **one).learn(4 * 64, callback=b.append)
    _same_metrics(a, b)
    assert agent.get_env() is env


@pytest.mark.parametrize("make", ["id", "gym", "sb3"])
def test_predict_on_raw_dict_observations(make: str) -> None:
    if "test/DictObsSB3-v0" not in gym.registry:
        gym.register("test/DictObsSB3-v0", entry_point=DictObsEnv)
    env = {
        "id": "test/DictObsSB3-v0",
        "gym": DictObsEnv(),
        "sb3": DummyVecEnv([DictObsEnv] * 2),
    }[make]
    n_envs = 2 if make == "sb3" else 1
    agent = TRPO("MlpPolicy", env, **{**SMALL, "n_envs": n_envs, "vf_minibatch": 32}).learn(128)
    space = DictObsEnv.observation_space
    space.seed(0)
    rows = [space.sample() for _ in range(3)]
    flat = np.stack([spaces.flatten(space, r) for r in rows]).astype(np.float32)
    want, _ = agent.predict(flat)
    assert [int(agent.predict(r)[0]) for r in rows] == list(want)
    batched = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in space.spaces}
    got, state = agent.predict(batched, state="s", episode_start=np.ones(3, bool))
    assert list(got) == list(want) and state == "s"


def test_policy_kwargs_set_the_architecture() -> None:
    kw = dict(net_arch=dict(pi=[16], vf=[8, 8]), activation_fn=nn.ReLU, log_std_init=-1.0)
    agent = TRPO("MlpPolicy", "Pendulum-v1", **SMALL, policy_kwargs=kw)
    assert [m.out_features for m in agent.policy.actor.net if isinstance(m, nn.Linear)] == [16, 1]
    assert [m.out_features for m in agent.policy.critic if isinstance(m, nn.Linear)] == [8, 8, 1]
    assert any(isinstance(m, nn.ReLU) for m in agent.policy.actor.net)
    assert agent.policy.actor.log_std.tolist() == [-1.0]
    with pytest.raises(ValueError, match="policy_kwargs share_features_extractor not supported"):
        TRPO("MlpPolicy", "CartPole-v1", policy_kwargs={"share_features_extractor": True})
    with pytest.raises(ValueError, match="activation_fn"):
        TRPO("MlpPolicy", "CartPole-v1", policy_kwargs={"activation_fn": nn.Sigmoid})


def test_set_logger_records_each_update(tmp_path) -> None:
    agent = TRPO("MlpPolicy", "CartPole-v1", **SMALL)
    agent.set_logger(configure(str(tmp_path), ["csv"]))
    metrics = []
    agent.learn(3 * 128, callback=metrics.append)
    with open(tmp_path / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["time/total_timesteps"]) for r in rows] == [m["timesteps"] for m in metrics]
    assert [float(r["train/kl"]) for r in rows] == pytest.approx([m["kl"] for m in metrics])


def test_tensorboard_log_writes_event_files(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    agent = TRPO("MlpPolicy", "CartPole-v1", **SMALL, tensorboard_log=str(tmp_path))
    agent.learn(128, tb_log_name="run")
    agent2 = TRPO("MlpPolicy", "CartPole-v1", **SMALL, tensorboard_log=str(tmp_path))
    agent2.learn(128, tb_log_name="run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_1", "run_2"]
    assert list((tmp_path / "run_1").glob("events.out.tfevents.*"))


def test_a_bad_env_names_every_accepted_kind() -> None:
    with pytest.raises(ValueError, match="a gym.Env or an SB3 VecEnv"):
        TRPO("MlpPolicy", 42)
