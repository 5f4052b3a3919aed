"""A lean rollout loop over a Gymnasium vector env in ``SAME_STEP`` autoreset mode.

Per step it does only what it must: one batched actor forward under ``torch.inference_mode``,
the env step, a finiteness check, episode bookkeeping, and writes into preallocated buffers.
The buffers are torch tensors written through their numpy views (no copies either way). Values
and log-probs are *not* computed per step: the actor and critic do not change during a rollout,
so the update recomputes them in one batched forward.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import VectorEnv
from torch import Tensor

from agents.normalize import ObsNormalizer, RewardScaler
from agents.policies import ActorCriticPolicy

NONFINITE_MODES = ("raise", "drop")


_F32_MAX = float(np.finfo(np.float32).max)


class NonFiniteError(RuntimeError):
    """An env returned a NaN or inf observation or reward, or one that is not finite once stored
    in the float32 buffers (beyond ±3.4e38), or rewards too large to train a critic on."""


def _storable(x: np.ndarray) -> np.ndarray:
    """Elementwise: finite in float32, the dtype of the rollout buffers (``False`` for NaN)."""
    return np.abs(x) <= _F32_MAX


class EnvStepError(RuntimeError):
    """An env (or an async vector-env worker) raised inside ``step``; the cause is chained."""


@dataclass
class RolloutBatch:
    """One rollout of ``T`` steps over ``E`` envs (all tensors share memory with the buffers).

    Attributes:
        obs: normalized observations ``(T, E, obs_dim)`` the policy acted on.
        actions: sampled (unclipped) actions ``(T, E, ...)``.
        rewards: (scaled) rewards ``(T, E)``.
        terminated, truncated: episode ends at step ``t`` (truncated excludes terminated).
        valid: ``False`` for transitions dropped because the env returned non-finite values.
        final_index: ``(M, 2)`` ``(t, e)`` positions of truncations; ``final_obs`` their
            normalized final observations ``(M, obs_dim)``.
        last_obs: normalized observations after the last step, ``(E, obs_dim)``.
    """

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    terminated: Tensor
    truncated: Tensor
    valid: Tensor
    final_index: np.ndarray
    final_obs: Tensor
    last_obs: Tensor
    dropped: int


class RolloutCollector:
    """Steps ``env`` with ``policy`` and tracks episode returns/lengths across rollouts."""

    def __init__(
        self,
        env: VectorEnv,
        policy: ActorCriticPolicy,
        obs_normalizer: ObsNormalizer,
        reward_scaler: RewardScaler,
        n_steps: int,
        generator: torch.Generator,
        env_id: str = "env",
        on_nonfinite: str = "raise",
        stats_window: int = 100,
    ) -> None:
        if on_nonfinite not in NONFINITE_MODES:
            raise ValueError(
                f"on_nonfinite={on_nonfinite!r}; accepted: {', '.join(NONFINITE_MODES)}"
            )
        self.env, self.policy, self.generator = env, policy, generator
        self.obs_norm, self.reward_scaler = obs_normalizer, reward_scaler
        self.env_id, self.on_nonfinite = env_id, on_nonfinite
        self.n_steps, self.n_envs = n_steps, env.num_envs
        obs_dim = policy.obs_dim
        t, e = n_steps, self.n_envs
        space = policy.action_space
        if isinstance(space, spaces.Discrete):
            act_shape, act_dtype = (t, e), torch.int64
        elif isinstance(space, spaces.MultiDiscrete):
            act_shape, act_dtype = (t, e, policy.action_dim), torch.int64
        else:
            act_shape, act_dtype = (t, e, policy.action_dim), torch.float32
        self.obs = torch.zeros(t, e, obs_dim)
        self.actions = torch.zeros(act_shape, dtype=act_dtype)
        self.rewards = torch.zeros(t, e)
        self.terminated = torch.zeros(t, e, dtype=torch.bool)
        self.truncated = torch.zeros(t, e, dtype=torch.bool)
        self.valid = torch.ones(t, e, dtype=torch.bool)
        self._np = {
            k: getattr(self, k).numpy()
            for k in ("obs", "actions", "rewards", "terminated", "truncated", "valid")
        }
        self.cur_obs: np.ndarray | None = None  # normalized, float32 (E, obs_dim)
        self.ep_return = np.zeros(e, np.float64)
        self.ep_length = np.zeros(e, np.int64)
        self.episodes: deque[tuple[float, int]] = deque(maxlen=stats_window)
        self.episodes_in_rollout = 0
        self.total_steps = 0  # env steps taken (per sub-env step counts n_envs)
        self.dropped_total = 0

    # --- setup --------------------------------------------------------------------------------
    def start(self, obs: np.ndarray) -> None:
        """Begin from raw observations ``obs`` (e.g. just after ``env.reset``)."""
        obs = obs.reshape(self.n_envs, -1)
        self._check(obs, "observation", np.ones(self.n_envs, bool), drop=False)
        self.cur_obs = self.obs_norm(obs, update=True)

    def _error(self, field: str, envs: np.ndarray, row: np.ndarray) -> NonFiniteError:
        value = float(row[~_storable(row)][0])
        note = "" if not np.isfinite(value) else ", beyond float32's range"
        return NonFiniteError(
            f"env {self.env_id!r} returned a non-finite {field} at env step "
            f"{self.total_steps} (sub-env {int(envs[0])}: {value:.3g}{note}); pass "
            "on_nonfinite='drop' to drop and count such transitions instead"
        )

    def _check(self, x: np.ndarray, field: str, rows: np.ndarray, drop: bool) -> np.ndarray:
        """Boolean mask of the sub-envs whose ``x`` row is not finite in float32 (the dtype it is
        stored in), raising unless ``drop``."""
        flat = x.reshape(x.shape[0], -1) if x.ndim > 1 else x[:, None]
        bad = ~_storable(flat).all(1) & rows
        if bad.any() and not drop:
            first = int(np.flatnonzero(bad)[0])
            raise self._error(field, np.flatnonzero(bad), flat[first])
        return bad

    # --- the loop -----------------------------------------------------------------------------
    def collect(
        self,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[np.ndarray, np.ndarray, np.ndarray, dict], bool] | None = None,
    ) -> RolloutBatch | None:
        """Run ``n_steps`` vector steps; ``None`` if ``should_stop()`` became true midway or
        ``on_step(raw next obs, rewards, dones, infos)`` (after each step) returned true."""
        assert self.cur_obs is not None, "call start() first"
        env, policy, gen = self.env, self.policy, self.generator
        obs_buf, act_buf = self._np["obs"], self._np["actions"]
        rew_buf, term_buf = self._np["rewards"], self._np["terminated"]
        trunc_buf, valid_buf = self._np["truncated"], self._np["valid"]
        valid_buf[:] = True
        drop = self.on_nonfinite == "drop"
        all_rows = np.ones(self.n_envs, bool)
        no_rows = np.zeros(self.n_envs, bool)
        final_index: list[tuple[int, int]] = []
        final_obs: list[np.ndarray] = []
        dropped = 0
        self.episodes_in_rollout = 0
        device = next(policy.parameters()).device
        for t in range(self.n_steps):
            if should_stop is not None and should_stop():
                return None
            obs = self.cur_obs
            obs_buf[t] = obs
            with torch.inference_mode():
                actions = policy.act_fast(torch.from_numpy(obs).to(device), gen).cpu()
            act_buf[t] = actions.numpy()
            try:
                next_obs, reward, terminated, truncated, infos = env.step(
                    policy.to_env_actions(actions)
                )
            except Exception as e:
                raise EnvStepError(
                    f"env {self.env_id!r} raised at env step {self.total_steps}: "
                    f"{type(e).__name__}: {e}"
                ) from e
            self.total_steps += self.n_envs
            next_obs = next_obs.reshape(self.n_envs, -1)  # a view; flat Box observations
            reward = np.asarray(reward, dtype=np.float64)
            if _storable(reward).all() and _storable(next_obs).all():
                bad = no_rows
            else:
                bad = self._check(reward, "reward", all_rows, drop)
                bad |= self._check(next_obs, "observation", all_rows, drop)
            done = terminated | truncated
            self.ep_return += reward
            self.ep_length += 1
            trunc_only = truncated & ~terminated
            if done.any():
                if trunc_only.any():
                    fmask = infos["_final_obs"]
                    for i in np.flatnonzero(trunc_only & fmask):
                        fo = np.asarray(infos["final_obs"][i], dtype=np.float64).reshape(1, -1)
                        if not _storable(fo).all():
                            if not drop:
                                raise self._error("final observation", np.array([i]), fo[0])
                            bad = bad.copy()
                            bad[i] = True
                            continue
                        final_index.append((t, int(i)))
                        final_obs.append(self.obs_norm(fo)[0])
                for i in np.flatnonzero(done & ~bad):
                    self.episodes.append((float(self.ep_return[i]), int(self.ep_length[i])))
                    self.episodes_in_rollout += 1
                self.ep_return[done] = 0.0
                self.ep_length[done] = 0
            if bad.any():
                # Drop: exclude the transition from the losses, end its episode (no bootstrap)
                # and restart that sub-env if its next observation is unusable.
                dropped += int(bad.sum())
                valid_buf[t, bad] = False
                reward = np.where(bad, 0.0, reward)
                terminated = terminated | bad
                trunc_only = trunc_only & ~bad
                self.ep_return[bad] = 0.0
                self.ep_length[bad] = 0
                obs_r, _ = env.reset(options={"reset_mask": bad})
                next_obs = np.where(bad[:, None], obs_r.reshape(self.n_envs, -1), next_obs)
                self._check(next_obs, "observation after reset", all_rows, drop=False)
            rew_buf[t] = self.reward_scaler(reward, done | bad)
            term_buf[t] = terminated
            trunc_buf[t] = trunc_only
            self.cur_obs = self.obs_norm(next_obs, update=True)
            if on_step is not None and on_step(next_obs, reward, done, infos):
                self.dropped_total += dropped
                return None
        self.dropped_total += dropped
        idx = np.asarray(final_index, dtype=np.int64).reshape(-1, 2)
        fobs = (
            torch.from_numpy(np.stack(final_obs))
            if final_obs
            else torch.zeros(0, self.obs.shape[-1])
        )
        return RolloutBatch(
            self.obs,
            self.actions,
            self.rewards,
            self.terminated,
            self.truncated,
            self.valid,
            idx,
            fobs,
            torch.from_numpy(self.cur_obs),
            dropped,
        )

    # --- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """The loop's own state at a rollout boundary (``weights_only``-safe)."""
        return {
            "cur_obs": torch.from_numpy(np.array(self.cur_obs, copy=True)),
            "ep_return": torch.from_numpy(self.ep_return.copy()),
            "ep_length": torch.from_numpy(self.ep_length.copy()),
            "episodes": [list(e) for e in self.episodes],
            "total_steps": self.total_steps,
            "dropped_total": self.dropped_total,
        }

    def load_state_dict(self, state: dict[str, object], with_obs: bool = True) -> None:
        """Restore :meth:`state_dict`; without ``with_obs`` the episodes in flight restart."""
        if with_obs:
            self.cur_obs = state["cur_obs"].numpy().copy()  # type: ignore[union-attr]
            self.ep_return = state["ep_return"].numpy().copy()  # type: ignore[union-attr]
            self.ep_length = state["ep_length"].numpy().copy()  # type: ignore[union-attr]
        else:  # fresh episodes: nothing of the interrupted ones carries over
            self.ep_return = np.zeros_like(self.ep_return)
            self.ep_length = np.zeros_like(self.ep_length)
        self.episodes.clear()
        self.episodes.extend((float(r), int(n)) for r, n in state["episodes"])  # type: ignore
        self.total_steps = int(state["total_steps"])  # type: ignore[arg-type]
        self.dropped_total = int(state["dropped_total"])  # type: ignore[arg-type]
