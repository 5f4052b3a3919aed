"""Snapshot and restore a sub-env's dynamic state, for bit-identical resume of training.

Gymnasium envs cannot be serialized in general. This adapter covers what the presets use:

* every env: the RNG (``np_random`` bit-generator state) and ``TimeLimit``'s step counter;
* classic control (CartPole, Acrobot, Pendulum, MountainCar, ...): the ``state`` attribute and the
  small bookkeeping fields next to it;
* MuJoCo: ``qpos``, ``qvel``, ``act``, ``time`` and the solver warm start;
* the analytic tasks of :mod:`envs.analytic` (stateless beyond the RNG).

Other envs (e.g. Box2D) are reported unsupported by :func:`supports_state`; a resumed run then
restarts their episodes (documented fallback) instead of continuing them.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

_CLASSIC_EXTRA = ("steps_beyond_terminated", "last_u")


def _kind(env: gym.Env) -> str | None:
    u = env.unwrapped
    module = type(u).__module__
    if module.startswith("gymnasium.envs.classic_control"):
        return "classic"
    if module.startswith("gymnasium.envs.mujoco") and hasattr(u, "data"):
        return "mujoco"
    if module.startswith("envs.analytic"):
        return "stateless"
    return None


def supports_state(env: gym.Env) -> bool:
    """Whether :func:`get_env_state` / :func:`set_env_state` can snapshot this env exactly."""
    return _kind(env) is not None


def _to_tensor(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.array(x, copy=True))
    if isinstance(x, tuple | list):
        return torch.as_tensor(np.asarray(x, dtype=np.float64))
    return x


def _to_numpy(x: Any) -> Any:
    return x.numpy().copy() if isinstance(x, torch.Tensor) else x


def _wrappers(env: gym.Env) -> list[gym.Env]:
    chain = []
    while isinstance(env, gym.Wrapper):
        chain.append(env)
        env = env.env
    return chain


def get_env_state(env: gym.Env) -> dict[str, Any]:
    """A ``torch.load(weights_only=True)``-safe dict of the env's dynamic state.

    Raises ``ValueError`` for envs without an adapter (check :func:`supports_state`).
    """
    kind = _kind(env)
    if kind is None:
        raise ValueError(f"no state adapter for {type(env.unwrapped).__name__}")
    u = env.unwrapped
    state: dict[str, Any] = {"kind": kind, "rng": u.np_random.bit_generator.state}
    state["wrappers"] = [
        {"elapsed": int(w._elapsed_steps)} if isinstance(w, gym.wrappers.TimeLimit) else {}
        for w in _wrappers(env)
    ]
    if kind == "classic":
        cur = getattr(u, "state", None)
        state["state"] = None if cur is None else _to_tensor(np.asarray(cur))
        state["state_is_tuple"] = isinstance(cur, tuple)
        for name in _CLASSIC_EXTRA:
            if hasattr(u, name):
                value = getattr(u, name)
                state[name] = None if value is None else _to_tensor(np.asarray(value))
    elif kind == "mujoco":
        d = u.data
        state["qpos"] = _to_tensor(d.qpos)
        state["qvel"] = _to_tensor(d.qvel)
        state["act"] = _to_tensor(d.act)
        state["time"] = float(d.time)
        state["qacc_warmstart"] = _to_tensor(d.qacc_warmstart)
    return state


def set_env_state(env: gym.Env, state: dict[str, Any]) -> None:
    """Restore a state captured by :func:`get_env_state` into an env of the same id."""
    kind = _kind(env)
    if kind != state["kind"]:
        raise ValueError(f"env state of kind {state['kind']!r} cannot go into a {kind!r} env")
    u = env.unwrapped
    u.np_random.bit_generator.state = state["rng"]
    for w, ws in zip(_wrappers(env), state["wrappers"], strict=True):
        if "elapsed" in ws:
            w._elapsed_steps = ws["elapsed"]
    if kind == "classic":
        s = state["state"]
        if s is None:
            u.state = None
        else:
            arr = _to_numpy(s)
            u.state = tuple(arr.tolist()) if state["state_is_tuple"] else arr
        for name in _CLASSIC_EXTRA:
            if name in state:
                v = state[name]
                if v is None:
                    setattr(u, name, None)
                else:
                    arr = _to_numpy(v)
                    setattr(u, name, arr if arr.ndim else arr.item())
    elif kind == "mujoco":
        u.set_state(_to_numpy(state["qpos"]), _to_numpy(state["qvel"]))
        d = u.data
        d.act[:] = _to_numpy(state["act"])
        d.time = state["time"]
        d.qacc_warmstart[:] = _to_numpy(state["qacc_warmstart"])
