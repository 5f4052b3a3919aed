"""Stable-Baselines3 interop: its VecEnvs, callbacks, loggers and ``policy_kwargs``.

Everything here is what an SB3 user's code hands the agents, turned into what the agents run on:

* :func:`as_vector_env`: a single ``gym.Env`` or an SB3 ``VecEnv`` becomes a Gymnasium
  ``VectorEnv`` in ``SAME_STEP`` autoreset mode (the rollout's contract; SB3 VecEnvs already
  reset in the same step and report ``terminal_observation``).
* :class:`SB3Callback`: drives an SB3 ``BaseCallback`` (or a list of them) with SB3's call
  order: ``on_training_start``, per rollout ``on_rollout_start``, ``on_step`` after every
  vector step (``False`` stops training), ``on_rollout_end``, and ``on_training_end``.
* :func:`policy_kwargs_to_config`: SB3's ``policy_kwargs`` (``net_arch``, ``activation_fn``,
  ``ortho_init``, ``log_std_init``) as the agents' own options.
* :func:`record_metrics` / :func:`tensorboard_logger`: an update's metrics into an SB3
  ``Logger``, under SB3's key names where one exists.

SB3 is imported only when one of its objects is actually passed in (an SB3 VecEnv or callback
cannot exist unless SB3 is already imported).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, SyncVectorEnv, VectorEnv
from gymnasium.vector.utils import batch_space

from agents.policies import ACTIVATIONS

SB3_EXTRA = "pip install 'npg[sb3]'"
_FLATTEN = (spaces.Dict, spaces.Tuple, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


def _sb3_module(name: str) -> Any:
    """``stable_baselines3.<name>`` if SB3 has been imported by the caller, else ``None``."""
    return sys.modules.get(f"stable_baselines3.{name}")


def is_sb3_vec_env(env: Any) -> bool:
    """Whether ``env`` is a Stable-Baselines3 ``VecEnv``."""
    mod = _sb3_module("common.vec_env.base_vec_env")
    return mod is not None and isinstance(env, mod.VecEnv)


def is_sb3_callback(callback: Any) -> bool:
    """Whether ``callback`` is an SB3 ``BaseCallback`` or a non-empty list of them."""
    mod = _sb3_module("common.callbacks")
    if mod is None:
        return False
    if isinstance(callback, list | tuple):
        return len(callback) > 0 and all(isinstance(c, mod.BaseCallback) for c in callback)
    return isinstance(callback, mod.BaseCallback)


# --- environments -----------------------------------------------------------------------------
def flatten_batch(space: spaces.Space, obs: Any, n: int) -> np.ndarray:
    """``n`` observations of a non-Box ``space`` (SB3 batches Dict/Tuple per key) as a flat
    ``(n, flatdim)`` float32 array, in ``gymnasium.spaces.flatten``'s layout."""
    if isinstance(space, spaces.Dict):
        rows = [{k: obs[k][i] for k in space.spaces} for i in range(n)]
    elif isinstance(space, spaces.Tuple):
        rows = [tuple(part[i] for part in obs) for i in range(n)]
    else:
        rows = list(np.asarray(obs).reshape(n, *(space.shape or ())))
    return np.stack([spaces.flatten(space, r) for r in rows]).astype(np.float32, copy=False)


class SB3VecEnvAdapter(VectorEnv):
    """A Stable-Baselines3 ``VecEnv`` seen as a Gymnasium ``VectorEnv`` (``SAME_STEP``).

    SB3's ``dones`` split into ``terminated`` / ``truncated`` by ``info["TimeLimit.truncated"]``;
    ``info["terminal_observation"]`` becomes ``infos["final_obs"]`` (mask ``"_final_obs"``).
    Non-Box observations (Dict, Tuple, ...) are flattened as ``envs.make_env`` flattens them.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, venv: Any) -> None:
        self.venv = venv
        self.num_envs = int(venv.num_envs)
        self.raw_observation_space = venv.observation_space
        self._flatten = isinstance(venv.observation_space, _FLATTEN)
        obs_space = (
            spaces.flatten_space(venv.observation_space)
            if self._flatten
            else venv.observation_space
        )
        self.single_observation_space = obs_space
        self.single_action_space = venv.action_space
        self.observation_space = batch_space(obs_space, self.num_envs)
        self.action_space = batch_space(venv.action_space, self.num_envs)
        self.metadata = {**getattr(venv, "metadata", {}), "autoreset_mode": AutoresetMode.SAME_STEP}

    def _obs(self, obs: Any) -> np.ndarray:
        """A batch of observations as the agents read them."""
        if self._flatten:
            return flatten_batch(self.raw_observation_space, obs, self.num_envs)
        return np.asarray(obs)

    def _one(self, obs: Any) -> np.ndarray:
        """One sub-env's observation as the agents read it."""
        if self._flatten:
            return spaces.flatten(self.raw_observation_space, obs).astype(np.float32, copy=False)
        return np.asarray(obs)

    def reset(
        self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset the SB3 VecEnv (``options["reset_mask"]``: only those sub-envs)."""
        mask = None if options is None else options.get("reset_mask")
        if mask is not None:  # reset only these sub-envs (the rollout's drop mode)
            space = self.single_observation_space
            obs = np.zeros((self.num_envs, *space.shape), dtype=space.dtype)
            idx = [int(i) for i in np.flatnonzero(mask)]
            for i, (o, _) in zip(idx, self.venv.env_method("reset", indices=idx), strict=True):
                obs[i] = self._one(o)
            return obs, {}
        if seed is not None:
            self.venv.seed(seed if isinstance(seed, int) else int(seed[0]))
        return self._obs(self.venv.reset()), {}

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        """Step the SB3 VecEnv; its ``dones`` split into terminated/truncated."""
        obs, rewards, dones, infos = self.venv.step(actions)
        dones = np.asarray(dones, dtype=bool)
        truncated = np.array(
            [bool(info.get("TimeLimit.truncated", False)) for info in infos], dtype=bool
        )
        truncated &= dones
        out: dict[str, Any] = {}
        if dones.any():
            final = np.empty(self.num_envs, dtype=object)
            mask = np.zeros(self.num_envs, dtype=bool)
            for i in np.flatnonzero(dones):
                term = infos[i].get("terminal_observation")
                if term is not None:
                    final[i] = self._one(term)
                    mask[i] = True
            out = {"final_obs": final, "_final_obs": mask}
        return self._obs(obs), np.asarray(rewards), dones & ~truncated, truncated, out

    def close_extras(self, **kwargs: Any) -> None:
        """Close the SB3 VecEnv."""
        self.venv.close()


def as_vector_env(env: Any) -> tuple[Any, Any]:
    """``(vector env the agents run on, the env as the user passed it)``.

    A single ``gym.Env`` is wrapped in a one-env ``SyncVectorEnv`` (non-Box observations
    flattened), an SB3 ``VecEnv`` in :class:`SB3VecEnvAdapter`; anything else is returned as is
    (ids and Gymnasium ``VectorEnv`` s are validated by the agent).
    """
    if is_sb3_vec_env(env):
        return SB3VecEnvAdapter(env), env
    if isinstance(env, gym.Env):
        inner = env
        if isinstance(env.observation_space, _FLATTEN):
            inner = gym.wrappers.FlattenObservation(env)
        vec = SyncVectorEnv([lambda: inner], autoreset_mode=AutoresetMode.SAME_STEP)
        vec.raw_observation_space = env.observation_space  # type: ignore[attr-defined]
        return vec, env
    return env, env


def raw_observation_space(vec: VectorEnv) -> spaces.Space | None:
    """The observation space before flattening (``None`` where it cannot be read off)."""
    space = getattr(vec, "raw_observation_space", None)
    if space is not None:
        return space
    if isinstance(vec, SyncVectorEnv):
        e: Any = vec.envs[0]
        while isinstance(e, gym.Wrapper):
            if isinstance(e, gym.wrappers.FlattenObservation):
                return e.env.observation_space
            e = e.env
        return e.observation_space
    return None


# --- policy_kwargs ----------------------------------------------------------------------------
def _activation_name(fn: Any) -> str:
    if isinstance(fn, str):
        return fn
    for name, cls in ACTIVATIONS.items():
        if fn is cls:
            return name
    accepted = ", ".join(f"nn.{c.__name__}" for c in ACTIVATIONS.values())
    raise ValueError(f"policy_kwargs activation_fn={fn!r} is invalid; accepted: {accepted}")


POLICY_KWARGS = (
    "net_arch",
    "activation_fn",
    "ortho_init",
    "log_std_init",
    "normalize_images",
    "features_extractor_kwargs",
)


def policy_kwargs_to_config(policy_kwargs: dict[str, Any]) -> dict[str, Any]:
    """SB3's ``policy_kwargs`` as the agents' options (``net_arch`` as a list or as
    ``dict(pi=[...], vf=[...])``; ``activation_fn`` an ``nn`` activation class; CnnPolicy's
    ``normalize_images`` and ``features_extractor_kwargs=dict(features_dim=...)``)."""
    unknown = sorted(set(policy_kwargs) - set(POLICY_KWARGS))
    if unknown:
        raise ValueError(
            f"policy_kwargs {', '.join(unknown)} not supported; "
            f"accepted: {', '.join(POLICY_KWARGS)}"
        )
    out: dict[str, Any] = {}
    if "net_arch" in policy_kwargs:
        arch = policy_kwargs["net_arch"]
        if isinstance(arch, dict):
            if set(arch) - {"pi", "vf"}:
                raise ValueError(f"policy_kwargs net_arch={arch!r}: a list or dict(pi=..., vf=...)")
            out["net_arch"] = list(arch.get("pi", [64, 64]))
            out["vf_arch"] = list(arch.get("vf", out["net_arch"]))
        else:
            out["net_arch"] = list(arch)
    if "activation_fn" in policy_kwargs:
        out["activation"] = _activation_name(policy_kwargs["activation_fn"])
    for key in ("ortho_init", "log_std_init", "normalize_images"):
        if key in policy_kwargs:
            out[key] = policy_kwargs[key]
    extractor = dict(policy_kwargs.get("features_extractor_kwargs") or {})
    if set(extractor) - {"features_dim"}:
        raise ValueError(
            f"policy_kwargs features_extractor_kwargs={extractor!r}: only features_dim= is "
            "supported (CnnPolicy)"
        )
    if "features_dim" in extractor:
        out["features_dim"] = int(extractor["features_dim"])
    return out


# --- callbacks --------------------------------------------------------------------------------
def _infos_list(infos: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Gymnasium's batched info dict as SB3's list of per-env dicts (masked keys only)."""
    out: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, value in infos.items():
        if key.startswith("_"):
            continue
        mask = infos.get("_" + key)
        per_env = _infos_list(value, n) if isinstance(value, dict) else value
        for i in range(n):
            if mask is None or mask[i]:
                out[i][key] = per_env[i]
    return out


class SB3Callback:
    """Runs an SB3 ``BaseCallback`` (or a list of them, as ``CallbackList``) on an agent."""

    def __init__(self, callback: Any, model: Any) -> None:
        from stable_baselines3.common.callbacks import CallbackList

        self.callback = (
            CallbackList(list(callback)) if isinstance(callback, list | tuple) else callback
        )
        self.callback.init_callback(model)
        self.n_envs = int(model.n_envs)

    def training_start(self, locals_: dict[str, Any]) -> None:
        """SB3's ``on_training_start``."""
        self.callback.on_training_start(locals_, {})

    def rollout_start(self) -> None:
        """SB3's ``on_rollout_start``."""
        self.callback.on_rollout_start()

    def step(
        self, new_obs: np.ndarray, rewards: np.ndarray, dones: np.ndarray, infos: dict
    ) -> bool:
        """After one vector step; ``False`` asks to stop training."""
        self.callback.update_locals(
            {
                "new_obs": new_obs,
                "rewards": rewards,
                "dones": dones,
                "infos": _infos_list(infos, self.n_envs),
            }
        )
        return bool(self.callback.on_step())

    def rollout_end(self) -> None:
        """SB3's ``on_rollout_end``."""
        self.callback.on_rollout_end()

    def training_end(self) -> None:
        """SB3's ``on_training_end``."""
        self.callback.on_training_end()


# --- logging ----------------------------------------------------------------------------------
#: metric -> SB3 logger key, where SB3 has one; other numeric metrics go under ``train/``
SB3_KEYS = {
    "ep_return_mean": "rollout/ep_rew_mean",
    "ep_length_mean": "rollout/ep_len_mean",
    "fps": "time/fps",
    "timesteps": "time/total_timesteps",
    "update": "time/iterations",
    "value_loss": "train/value_loss",
    "explained_variance": "train/explained_variance",
    "entropy": "train/entropy",
    "kl": "train/kl",
}


def sb3_scalars(metrics: dict[str, Any]) -> dict[str, int | float]:
    """One update's numeric, finite metrics (ints stay ints) under SB3's names
    (``rollout/ep_rew_mean``, ``train/kl``, ...; the others as ``train/<name>``)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[SB3_KEYS.get(key, f"train/{key}")] = value
    return out


def record_metrics(logger: Any, metrics: dict[str, Any], step: int) -> None:
    """Record one update's numeric, finite metrics in an SB3 ``Logger`` and dump them."""
    for key, value in sb3_scalars(metrics).items():
        logger.record(key, value)
    logger.dump(step=step)


def default_logger() -> Any:
    """An SB3 ``Logger`` that writes nothing (what SB3 callbacks record into by default)."""
    try:
        from stable_baselines3.common.logger import Logger
    except ImportError as e:
        raise ImportError(f"model.logger is an SB3 Logger: {SB3_EXTRA}") from e
    return Logger(folder=None, output_formats=[])


def tensorboard_logger(root: str | Path, name: str) -> Any:
    """An SB3 ``Logger`` writing TensorBoard events to ``root/name_<i>`` (the next free i)."""
    try:
        from stable_baselines3.common.logger import configure
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (tensorboard present)
    except ImportError as e:
        raise ImportError("tensorboard_log needs SB3: pip install 'npg[sb3]'") from e
    root = Path(root)
    i = 1
    while (root / f"{name}_{i}").exists():
        i += 1
    return configure(str(root / f"{name}_{i}"), ["tensorboard"])


__all__ = [
    "SB3VecEnvAdapter",
    "SB3Callback",
    "as_vector_env",
    "default_logger",
    "flatten_batch",
    "is_sb3_callback",
    "is_sb3_vec_env",
    "policy_kwargs_to_config",
    "raw_observation_space",
    "record_metrics",
    "sb3_scalars",
    "tensorboard_logger",
]
