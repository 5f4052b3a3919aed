"""Image-observation tasks: a synthetic image bandit with a known answer, and MinAtar's ids.

* ``npg/ImageBandit-v0``: every step shows a ``uint8`` HWC image (``size x size x 3``, dim noise)
  with one of its four quadrants lit (255); the action names a quadrant and pays 1 if it is the
  lit one. Episodes are ``horizon`` steps: a random policy returns ``horizon / 4``, the optimal
  one ``horizon``.
* ``MinAtar/<Game>-v0`` / ``-v1`` (Young & Tian 2019; the ``minatar`` extra): registered here
  as MinAtar's own ``minatar.gym.register_envs`` does (``-v1``: the minimal action set), without
  importing ``minatar`` until an env is made. Observations are ``10x10xC`` boolean channels.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

MINATAR_GAMES = ("asterix", "breakout", "freeway", "seaquest", "space_invaders")


class ImageBanditEnv(gym.Env):
    """Which quadrant of the image is lit? ``Discrete(4)`` actions, reward 1 for the lit one."""

    metadata = {"render_modes": []}

    def __init__(self, size: int = 8, horizon: int = 8, noise: int = 64) -> None:
        if size < 2 or size % 2:
            raise ValueError(f"size must be an even int >= 2, got {size}")
        self.size, self.horizon, self.noise = int(size), int(horizon), int(noise)
        self.action_space = spaces.Discrete(4)
        self.observation_space = spaces.Box(0, 255, (self.size, self.size, 3), np.uint8)
        self.optimal_return = float(self.horizon)
        self._t = 0
        self._lit = 0

    def _image(self) -> np.ndarray:
        self._lit = int(self.np_random.integers(4))
        img = self.np_random.integers(0, self.noise, (self.size, self.size, 3), dtype=np.uint8)
        h = self.size // 2
        r, c = divmod(self._lit, 2)
        img[r * h : (r + 1) * h, c * h : (c + 1) * h] = 255
        return img

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._t = 0
        return self._image(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        reward = float(int(action) == self._lit)
        self._t += 1
        return self._image(), reward, self._t >= self.horizon, False, {}


def minatar_available() -> bool:
    """Whether the ``minatar`` package is installed (``pip install -e '.[minatar]'``)."""
    return importlib.util.find_spec("minatar") is not None


def register_image_envs() -> None:
    """Register the image bandit, and MinAtar's ids when it is installed (idempotent)."""
    if "npg/ImageBandit-v0" not in gym.registry:
        gym.register("npg/ImageBandit-v0", entry_point=ImageBanditEnv)
    if not minatar_available():
        return
    for game in MINATAR_GAMES:
        name = game.title().replace("_", "")
        for version, minimal in (("v0", False), ("v1", True)):
            env_id = f"MinAtar/{name}-{version}"
            if env_id not in gym.registry:
                gym.register(
                    env_id,
                    entry_point="minatar.gym:BaseEnv",
                    kwargs=dict(game=game, use_minimal_action_set=minimal),
                )
