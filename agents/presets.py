"""Tuned hyperparameters per (algorithm, task), in the style of rl-baselines3-zoo.

The TRPO entries start from rl-baselines3-zoo's ``hyperparams/trpo.yml`` for sb3-contrib (the
names map as: ``n_critic_updates → vf_epochs``, ``batch_size → vf_minibatch``,
``learning_rate → vf_lr``, ``cg_max_steps → cg_iters``, ``target_kl → max_kl``,
``normalize: true → normalize_obs`` (+ reward scaling)); the zoo's gSDE for Pendulum has no
counterpart here, so that entry was re-tuned. ``total_timesteps`` is the default budget.
"""

from __future__ import annotations

import copy
from typing import Any

_MUJOCO: dict[str, Any] = dict(
    n_envs=2,
    n_steps=1024,
    vf_minibatch=128,
    gamma=0.99,
    gae_lambda=0.95,
    cg_iters=25,
    cg_damping=0.1,
    vf_epochs=20,
    vf_lr=1e-3,
    max_kl=0.01,
    normalize_obs=True,
    normalize_reward=True,
    total_timesteps=1_000_000,
)

_TRPO: dict[str, dict[str, Any]] = {
    "CartPole-v1": dict(
        n_envs=2,
        n_steps=512,
        vf_minibatch=512,
        gamma=0.99,
        gae_lambda=0.98,
        cg_damping=0.1,  # zoo: 1e-3; 0.1 was robust on held-out seeds (docs/rl_results.md)
        vf_epochs=20,
        vf_lr=1e-3,
        max_kl=0.01,
        total_timesteps=100_000,
    ),
    "Acrobot-v1": dict(
        n_envs=2,
        n_steps=1024,
        vf_minibatch=128,
        gamma=0.99,
        gae_lambda=0.95,
        vf_epochs=10,
        vf_lr=1e-3,
        max_kl=0.01,
        normalize_obs=True,
        normalize_reward=True,
        total_timesteps=100_000,
    ),
    "Pendulum-v1": dict(
        n_envs=2,
        n_steps=1024,
        vf_minibatch=128,
        gamma=0.9,
        gae_lambda=0.95,
        vf_epochs=20,
        vf_lr=1e-3,
        max_kl=0.01,
        total_timesteps=100_000,
    ),
    "LunarLander-v3": dict(
        n_envs=2,
        n_steps=512,
        vf_minibatch=128,
        gamma=0.99,
        gae_lambda=0.98,
        vf_epochs=15,
        vf_lr=1e-3,
        max_kl=0.01,
        normalize_obs=True,
        normalize_reward=True,
        total_timesteps=200_000,
    ),
    # image tasks (CnnPolicy): the settings of the runs in docs/rl_results.md, not tuned
    "MinAtar/Breakout-v1": dict(
        policy="CnnPolicy",
        net_arch=[],
        n_envs=8,
        n_steps=256,
        vf_minibatch=256,
        vf_epochs=5,
        total_timesteps=300_000,
    ),
    "npg/ImageBandit-v0": dict(
        policy="CnnPolicy",
        net_arch=[],
        features_dim=32,
        n_envs=4,
        n_steps=128,
        vf_minibatch=128,
        vf_epochs=2,
        max_kl=0.05,
        total_timesteps=15_360,
    ),
    # sb3-contrib's KL is the mean over action dimensions (its target_kl bounds KL / d), ours is
    # the KL of the joint policy: the zoo's target_kl = 0.01 is max_kl = 0.01·d here
    # (measured ‖F v‖ / ‖H_sb3 v‖ = 3.0000 on Hopper; docs/bench_vs_sb3.md).
    "Hopper-v5": dict(_MUJOCO, max_kl=0.03),
    "HalfCheetah-v5": dict(_MUJOCO, max_kl=0.06),
    "Walker2d-v5": dict(_MUJOCO, max_kl=0.06),
}

# NPG shares the TRPO settings except where re-tuned. Its step is not line-searched, so the
# quadratic KL model must be trustworthy: with the zoo's cg_damping = 1e-3 the measured KL of
# a δ-step was often 5-30× δ and runs collapsed (CartPole, 5 seeds: 407 at δ = 0.02); with
# cg_damping = 0.1 the step stays at or below δ. δ = 0.03 was chosen on held-out seeds 10-19
# (δ = 0.05 fell below 475 on 2 of them). See docs/rl_results.md.
_NPG = copy.deepcopy(_TRPO)
_NPG["CartPole-v1"].update(max_kl=0.03, cg_damping=0.1)

PRESETS: dict[str, dict[str, dict[str, Any]]] = {"trpo": _TRPO, "npg": _NPG}


def get_preset(algo: str, env_id: str) -> dict[str, Any]:
    """A copy of the preset of ``algo`` on ``env_id`` (``{}`` if there is none)."""
    return copy.deepcopy(PRESETS.get(algo, {}).get(env_id, {}))


def register_preset(algo: str, env_id: str, params: dict[str, Any]) -> None:
    """Add or replace a preset (e.g. for an algorithm registered by another module)."""
    PRESETS.setdefault(algo, {})[env_id] = dict(params)
