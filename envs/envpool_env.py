"""EnvPool (C++ batched envs) behind Gymnasium's ``VectorEnv`` interface, in ``SAME_STEP`` mode.

EnvPool steps all its envs in one C++ call, without Python per sub-env. Its own autoreset is
``NEXT_STEP``-like (the step after an episode end returns the new episode's first observation and
ignores the action); the agents' rollout expects ``SAME_STEP``, so :class:`EnvPoolVectorEnv`
resets the finished envs at once (EnvPool's partial ``reset(env_ids)``) and reports the last
observation of each finished episode in ``infos["final_obs"]`` (mask ``infos["_final_obs"]``),
exactly as :func:`envs.make_vec_env` does.

Only EnvPool's synchronous mode is offered (``batch_size == num_envs``): its asynchronous mode
returns a different subset of envs at each call, which does not fit an on-policy rollout that
stores one step of every env per time index for GAE.

EnvPool cannot snapshot an env's state, so a resumed run restarts the episodes of its envs
(fresh seeds derived from the run's RNG), as for Box2D tasks.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space


def envpool_available() -> bool:
    """Whether the ``envpool`` package imports here (its wheels: Linux/macOS, CPython >= 3.11)."""
    try:
        import envpool  # noqa: F401
    except ImportError:
        return False
    return True


def _envpool() -> Any:
    try:
        import envpool
    except ImportError as e:
        raise ImportError(
            "vectorization='envpool' needs the envpool package (pip install envpool; wheels exist "
            "for Linux and macOS on CPython >= 3.11); use vectorization='sync' elsewhere"
        ) from e
    return envpool


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the warning of every EnvPool spec: it builds float32 Boxes from float64 bounds."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*precision lowered", UserWarning)
        yield


class EnvPoolVectorEnv(VectorEnv):
    """``n_envs`` copies of ``env_id`` stepped by EnvPool; sub-env ``i`` is seeded ``seed + i``.

    The observation and action spaces are Gymnasium's own for ``env_id`` (same shapes and bounds
    as EnvPool's), so a policy trained on one backend runs on the other. ``kwargs`` are EnvPool
    options of the task (e.g. ``max_episode_steps``, ``reset_noise_scale``); an option EnvPool
    does not know is an error.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, env_id: str, n_envs: int, seed: int | None = 0, **kwargs: Any) -> None:
        envpool = _envpool()
        if env_id not in envpool.list_all_envs():
            raise ValueError(
                f"EnvPool has no task {env_id!r}; its tasks: envpool.list_all_envs() "
                "(use vectorization='sync' for other Gymnasium ids)"
            )
        with _quiet():
            known = envpool.make_spec(env_id).config._fields
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise ValueError(f"EnvPool task {env_id!r} has no option(s) {', '.join(unknown)}")
        self.env_id, self.num_envs, self._kwargs = env_id, n_envs, kwargs
        reference = gym.make(env_id)
        self.single_observation_space = reference.observation_space
        self.single_action_space = reference.action_space
        self.spec = reference.spec
        reference.close()
        self.observation_space = batch_space(self.single_observation_space, n_envs)
        self.action_space = batch_space(self.single_action_space, n_envs)
        self._obs_dtype = self.single_observation_space.dtype
        self._pool: Any = None
        self._seed = 0 if seed is None else int(seed)
        self._open(self._seed)

    def _open(self, seed: int) -> None:
        if self._pool is not None:
            self._pool.close()
        with _quiet():
            self._pool = _envpool().make(
                self.env_id,
                env_type="gymnasium",
                num_envs=self.num_envs,
                batch_size=self.num_envs,
                seed=seed,
                **self._kwargs,
            )
            self._pool.observation_space  # noqa: B018 — built (and cached) here, not at recv
        self._seed = seed
        self._needs_reset = True

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start fresh episodes in every env; ``seed`` re-seeds them (``seed + i`` for env ``i``).

        EnvPool fixes its seeds when the pool is made, so a new ``seed`` builds a new pool.
        The infos are EnvPool's (e.g. ``x_position`` of MuJoCo tasks).
        """
        if options:
            raise ValueError("EnvPoolVectorEnv.reset takes no options")
        if seed is not None and (seed != self._seed or not self._needs_reset):
            self._open(int(seed))
        obs, info = self._pool.reset()
        self._needs_reset = False
        return obs.astype(self._obs_dtype, copy=False), dict(info)

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """One step of every env; finished envs are reset in the same step (``SAME_STEP``)."""
        if self._needs_reset:
            raise RuntimeError("EnvPoolVectorEnv.step called before reset")
        actions = np.asarray(actions, dtype=self.single_action_space.dtype)
        obs, reward, terminated, truncated, _ = self._pool.step(actions)
        obs = obs.astype(self._obs_dtype, copy=True)
        done = terminated | truncated
        infos: dict[str, Any] = {}
        if done.any():
            ids = np.flatnonzero(done)
            final = np.empty(self.num_envs, dtype=object)
            for i in ids:
                final[i] = obs[i].copy()
            infos = {"final_obs": final, "_final_obs": done.copy()}
            obs[ids], _ = self._pool.reset(ids.astype(np.int32))
        return obs, reward.astype(np.float64), terminated, truncated, infos

    def close_extras(self, **kwargs: Any) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
