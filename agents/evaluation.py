"""Evaluating a trained agent on fresh episodes."""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from envs import make_env


def evaluate_policy(
    agent: Any,
    episodes: int = 10,
    seed: int = 10_000,
    deterministic: bool = True,
    env: gym.Env | None = None,
) -> list[float]:
    """Undiscounted returns of ``episodes`` episodes seeded ``seed, seed+1, …``.

    ``env`` defaults to a fresh single env of the agent's task (so training envs and their
    normalization statistics are left alone; the agent normalizes observations itself).
    """
    own_env = env is None
    if own_env:
        env = make_env(agent.config["env_id"], None, **dict(agent.config.get("env_kwargs") or {}))
    returns = []
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            total, done = 0.0, False
            while not done:
                action, _ = agent.predict(obs, deterministic=deterministic)
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                done = bool(terminated or truncated)
            returns.append(total)
    finally:
        if own_env:
            env.close()
    return returns
