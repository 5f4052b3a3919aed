"""MLP actor-critic policies: the actor's forward returns the ``(N, K)`` output a family reads.

=============== ==================== ==========================================================
action space    family               actor output row
=============== ==================== ==========================================================
Discrete(n)     Categorical          ``n`` logits
Box(d,)         DiagGaussian         ``[mean (d), log_std (d)]``, log-std state-independent
MultiDiscrete   MultiCategorical     concatenated logits
MultiBinary(d)  Bernoulli            ``d`` logits
=============== ==================== ==========================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import Tensor, nn

from npg.families import Bernoulli, Categorical, DiagGaussian, Family, MultiCategorical
from npg.model import LinearStack, find_linear_stack

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
}
_FUNCTIONAL = {"tanh": torch.tanh, "relu": torch.relu, "elu": F.elu, "gelu": F.gelu}
SUPPORTED_ACTION_SPACES = "Discrete, Box (1-D), MultiDiscrete (1-D), MultiBinary (1-D)"


def unsupported_action_space(space: spaces.Space) -> ValueError:
    """The one error raised for any action space the policies cannot handle."""
    return ValueError(f"unsupported action space {space}; supported: {SUPPORTED_ACTION_SPACES}")


def family_for_space(space: spaces.Space) -> tuple[Family, int, int]:
    """``(family, output width K, action width)`` for an action space, or the clear error."""
    if isinstance(space, spaces.Discrete):
        return Categorical(), int(space.n), 1
    if isinstance(space, spaces.Box) and len(space.shape) == 1:
        d = int(space.shape[0])
        return DiagGaussian(), 2 * d, d
    if isinstance(space, spaces.MultiDiscrete) and space.nvec.ndim == 1:
        nvec = [int(k) for k in space.nvec]
        return MultiCategorical(nvec), sum(nvec), len(nvec)
    if isinstance(space, spaces.MultiBinary) and len(space.shape) == 1:
        return Bernoulli(), int(space.shape[0]), int(space.shape[0])
    raise unsupported_action_space(space)


def obs_dim_for_space(space: spaces.Space) -> int:
    """Flat observation width; the observation must be a ``Box`` (envs flatten the rest)."""
    if isinstance(space, spaces.Box):
        return int(np.prod(space.shape))
    raise ValueError(
        f"unsupported observation space {space}; supported: Box, or Dict/Tuple/Discrete/"
        "MultiDiscrete/MultiBinary flattened by envs.make_env"
    )


def mlp(
    sizes: Sequence[int],
    activation: str,
    out_gain: float,
    ortho_init: bool,
) -> nn.Sequential:
    """An MLP ``sizes[0] -> ... -> sizes[-1]`` with ``activation`` between layers.

    With ``ortho_init`` the hidden layers get orthogonal weights of gain √2 and the last layer
    gain ``out_gain``, biases zero (as in Stable-Baselines3).
    """
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        last = i == len(sizes) - 2
        if ortho_init:
            nn.init.orthogonal_(lin.weight, gain=out_gain if last else math.sqrt(2))
            nn.init.zeros_(lin.bias)
        layers.append(lin)
        if not last:
            layers.append(act())
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Maps normalized observations to the family's ``(N, K)`` distribution parameters."""

    def __init__(
        self,
        obs_dim: int,
        out_dim: int,
        family: Family,
        net_arch: Sequence[int],
        activation: str,
        ortho_init: bool,
        log_std_init: float,
    ) -> None:
        super().__init__()
        self.gaussian = isinstance(family, DiagGaussian)
        mean_dim = out_dim // 2 if self.gaussian else out_dim
        self.net = mlp([obs_dim, *net_arch, mean_dim], activation, 0.01, ortho_init)
        if self.gaussian:
            self.log_std = nn.Parameter(torch.full((mean_dim,), float(log_std_init)))

    def forward(self, obs: Tensor) -> Tensor:
        """The family's output for a batch of normalized observations."""
        out = self.net(obs)
        if self.gaussian:
            return torch.cat([out, self.log_std.expand_as(out)], -1)
        return out

    def linear_stack(self) -> LinearStack | None:
        """This actor as an MLP plus free log-std: exact Fisher products skip autograd."""
        stack = find_linear_stack(self.net)
        if stack is None:  # an activation the stack path does not cover
            return None
        return LinearStack(stack.layers, stack.activation, self.log_std if self.gaussian else None)


class ActorCriticPolicy(nn.Module):
    """Separate actor and critic MLPs for one observation / action space pair.

    Attributes:
        actor: the module the Fisher is built on (its forward returns the family's output).
        critic: the value network ``V(s)``, output shape ``(N,)``.
        family: the :mod:`npg.families` family of the action distribution.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        net_arch: Sequence[int] = (64, 64),
        vf_arch: Sequence[int] | None = None,
        activation: str = "tanh",
        ortho_init: bool = True,
        log_std_init: float = 0.0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}; accepted: {', '.join(ACTIVATIONS)}")
        self.family, out_dim, self.action_dim = family_for_space(action_space)
        self.obs_dim = obs_dim_for_space(observation_space)
        self.action_space = action_space
        self.actor = Actor(
            self.obs_dim, out_dim, self.family, net_arch, activation, ortho_init, log_std_init
        )
        vf = net_arch if vf_arch is None else vf_arch
        self.critic = mlp([self.obs_dim, *vf, 1], activation, 1.0, ortho_init)
        self.discrete = not isinstance(action_space, spaces.Box)
        linears = [m for m in self.actor.net if isinstance(m, nn.Linear)]
        self._layers = [(m.weight, m.bias) for m in linears]
        self._act_fn = _FUNCTIONAL[activation]

    def value(self, obs: Tensor) -> Tensor:
        """``V(s)`` for a batch of normalized observations, shape ``(N,)``."""
        return self.critic(obs).squeeze(-1)

    def act(
        self, obs: Tensor, deterministic: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Actions for a batch of normalized observations (unclipped for ``Box``)."""
        out = self.actor(obs)
        if deterministic:
            return self.family.mode(out)
        return self.family.sample(out, generator)

    def act_fast(self, obs: Tensor, generator: torch.Generator) -> Tensor:
        """:meth:`act` for the rollout hot path (call under ``torch.inference_mode``).

        Same distribution, less overhead: the MLP is applied with ``F.linear`` directly
        (no ``nn.Module`` dispatch) and categorical actions are drawn by inverse CDF
        (one uniform per row) instead of ``torch.multinomial``.
        """
        x = obs
        layers = self._layers
        last = len(layers) - 1
        for i, (w, b) in enumerate(layers):
            x = F.linear(x, w, b)
            if i < last:
                x = self._act_fn(x)
        if isinstance(self.family, Categorical):
            cdf = torch.softmax(x, -1).cumsum_(-1)
            u = torch.rand(x.shape[0], 1, generator=generator, dtype=x.dtype)
            return (cdf < u).sum(-1).clamp_(max=x.shape[-1] - 1)
        if self.actor.gaussian:
            x = torch.cat([x, self.actor.log_std.expand_as(x)], -1)
        return self.family.sample(x, generator)

    def to_env_actions(self, actions: Tensor) -> np.ndarray:
        """Convert sampled actions to what the env takes (``Box`` actions clipped to bounds)."""
        if isinstance(self.action_space, spaces.Box):
            return np.clip(actions.numpy(), self.action_space.low, self.action_space.high).astype(
                self.action_space.dtype, copy=False
            )
        if isinstance(self.action_space, spaces.MultiBinary):
            return actions.numpy().astype(np.int8)
        a = actions.numpy()
        start = getattr(self.action_space, "start", 0)  # Discrete(n, start=s) and MultiDiscrete
        return a + start if np.any(start) else a
