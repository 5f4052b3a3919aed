"""Small analytic tasks whose optimal policy and natural gradient are known in closed form.

* ``npg/Bandit-v0``: a ``k``-armed bandit, one-step episodes, deterministic reward ``means[a]``;
  the optimal arm is ``argmax(means)``. The observation is a constant ``[1.0]``.
* ``npg/GaussianBandit-v0``: one-step episodes with a continuous action ``a ∈ [-2, 2]`` and
  reward ``-(a - target)²``; the optimal deterministic action is ``target``.

For a softmax policy ``π = softmax(θ)`` on the bandit, with ``J(θ) = Σ_a π_a r_a``:
``∇J = π ⊙ (r - πᵀr)``, ``F = diag(π) - ππᵀ``, and ``F⁺∇J = r - πᵀr`` up to the null direction
``1`` (see :func:`bandit_natural_gradient`).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces


class BanditEnv(gym.Env):
    """``k``-armed bandit with deterministic rewards ``means``; every episode is one step."""

    metadata = {"render_modes": []}

    def __init__(self, means: tuple[float, ...] = (0.0, 0.5, 1.0, 0.2)) -> None:
        self.means = np.asarray(means, dtype=np.float64)
        self.action_space = spaces.Discrete(len(self.means))
        self.observation_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.optimal_action = int(np.argmax(self.means))
        self.optimal_return = float(self.means.max())

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        return np.ones(1, dtype=np.float32), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        reward = float(self.means[int(action)])
        return np.ones(1, dtype=np.float32), reward, True, False, {}


class GaussianBanditEnv(gym.Env):
    """One-step continuous-action task: reward ``-(a - target)²`` for ``a ∈ [-2, 2]``."""

    metadata = {"render_modes": []}

    def __init__(self, target: float = 0.7) -> None:
        self.target = float(target)
        self.action_space = spaces.Box(-2.0, 2.0, shape=(1,), dtype=np.float32)
        self.observation_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.optimal_return = 0.0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        return np.ones(1, dtype=np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = float(np.asarray(action).reshape(-1)[0])
        return np.ones(1, dtype=np.float32), -((a - self.target) ** 2), True, False, {}


def bandit_natural_gradient(logits: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Closed-form natural gradient of ``J = Σ π_a r_a`` for ``π = softmax(logits)``.

    ``F = diag(π) - ππᵀ`` is singular along ``1`` (adding a constant to every logit changes
    nothing); the minimum-norm solution of ``F x = ∇J`` is ``r - mean(r)`` projected to be
    orthogonal to ``1``, i.e. ``r - r̄`` with ``r̄`` the plain average of ``r``.
    """
    del logits  # the natural gradient of a softmax bandit does not depend on π
    return means - means.mean()


def register_analytic_envs() -> None:
    """Register the analytic tasks with Gymnasium (idempotent)."""
    if "npg/Bandit-v0" not in gym.registry:
        gym.register("npg/Bandit-v0", entry_point=BanditEnv)
    if "npg/GaussianBandit-v0" not in gym.registry:
        gym.register("npg/GaussianBandit-v0", entry_point=GaussianBanditEnv)
