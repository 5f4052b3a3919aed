"""Running observation normalization and reward scaling (numpy, float64 statistics)."""

from __future__ import annotations

import numpy as np
import torch


class RunningMeanStd:
    """Mean and variance of a stream of batches, merged with the parallel Welford formula
    (Chan et al. 1979)."""

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-4) -> None:
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = float(epsilon)

    def update(self, x: np.ndarray) -> None:
        """Merge a batch ``x`` of shape ``(B, *shape)``."""
        # x.mean(0) and x.var(0) in the same arithmetic, without numpy's generic wrappers (this
        # runs every env step)
        b_count = x.shape[0]
        b_mean = np.add.reduce(x, 0) / b_count
        centered = x - b_mean
        b_var = np.add.reduce(centered * centered, 0) / b_count
        delta = b_mean - self.mean
        tot = self.count + b_count
        self.mean = self.mean + delta * (b_count / tot)
        m2 = self.var * self.count + b_var * b_count + delta**2 * (self.count * b_count / tot)
        self.var = m2 / tot
        self.count = tot

    def state_dict(self) -> dict[str, object]:
        """Tensors and floats only (``torch.load(weights_only=True)``-safe)."""
        return {
            "mean": torch.from_numpy(np.array(self.mean, np.float64)),
            "var": torch.from_numpy(np.array(self.var, np.float64)),
            "count": self.count,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Load a :meth:`state_dict` (copies)."""
        self.mean = state["mean"].numpy().copy()  # type: ignore[union-attr]
        self.var = state["var"].numpy().copy()  # type: ignore[union-attr]
        self.count = float(state["count"])  # type: ignore[arg-type]


class ObsNormalizer:
    """``clip((x - μ) / √(σ² + ε), ±clip)`` with running ``μ, σ²``; identity when disabled."""

    def __init__(self, shape: tuple[int, ...], enabled: bool, clip: float = 10.0) -> None:
        self.enabled = enabled
        self.clip = float(clip)
        self.rms = RunningMeanStd(shape)
        self.eps = 1e-8

    def __call__(self, obs: np.ndarray, update: bool = False) -> np.ndarray:
        """Normalize a batch of raw observations (updating the statistics if ``update``)."""
        if not self.enabled:
            return obs.astype(np.float32, copy=False)
        if update:
            self.rms.update(obs)
        z = (obs - self.rms.mean) / np.sqrt(self.rms.var + self.eps)
        return _clip(z, self.clip).astype(np.float32)

    def state_dict(self) -> dict[str, object]:
        """The normalizer's state (for checkpoints)."""
        return {"enabled": self.enabled, "clip": self.clip, "rms": self.rms.state_dict()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Load a :meth:`state_dict`."""
        self.enabled = bool(state["enabled"])
        self.clip = float(state["clip"])  # type: ignore[arg-type]
        self.rms.load_state_dict(state["rms"])  # type: ignore[arg-type]


class RewardScaler:
    """Divide rewards by the running std of the discounted return (as SB3's ``VecNormalize``)."""

    def __init__(self, n_envs: int, gamma: float, enabled: bool, clip: float = 10.0) -> None:
        self.enabled = enabled
        self.gamma = float(gamma)
        self.clip = float(clip)
        self.rms = RunningMeanStd(())
        self.ret = np.zeros(n_envs, np.float64)
        self.eps = 1e-8

    def __call__(self, reward: np.ndarray, done: np.ndarray) -> np.ndarray:
        """Scale one step's rewards (shape ``(n_envs,)``) and reset returns where ``done``."""
        if not self.enabled:
            return reward
        self.ret = self.ret * self.gamma + reward
        self.rms.update(self.ret)
        scaled = _clip(reward / np.sqrt(self.rms.var + self.eps), self.clip)
        self.ret[done] = 0.0
        return scaled

    def state_dict(self) -> dict[str, object]:
        """The scaler's state, with the running discounted returns."""
        return {
            "enabled": self.enabled,
            "rms": self.rms.state_dict(),
            "ret": torch.from_numpy(self.ret.copy()),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Load a :meth:`state_dict`."""
        self.enabled = bool(state["enabled"])
        self.rms.load_state_dict(state["rms"])  # type: ignore[arg-type]
        self.ret = state["ret"].numpy().copy()  # type: ignore[union-attr]


def _clip(x: np.ndarray, bound: float) -> np.ndarray:
    """``np.clip(x, -bound, bound)`` in place on the new array ``x`` (two ufunc calls instead
    of ``np.clip``'s wrappers)."""
    return np.minimum(np.maximum(x, -bound, out=x), bound, out=x)
