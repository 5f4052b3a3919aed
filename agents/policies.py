"""Actor-critic policies (MLP, or CNN on images): the actor's forward returns the ``(N, K)``
output a family reads.

=============== ==================== ==========================================================
action space    family               actor output row
=============== ==================== ==========================================================
Discrete(n)     Categorical          ``n`` logits
Box(d,)         DiagGaussian         ``[mean (d), log_std (d)]``, log-std state-independent
MultiDiscrete   MultiCategorical     concatenated logits
MultiBinary(d)  Bernoulli            ``d`` logits
=============== ==================== ==========================================================

``CnnPolicy`` reads rank-3 ``Box`` image observations (flattened in the rollout buffers): the
first module of the actor and of the critic, :class:`ImageInput`, reshapes them, transposes
channel-last (HWC) images to CHW and scales ``uint8`` 0-255 images by 1/255 (Stable-Baselines3's
``is_image_space`` / ``VecTransposeImage`` / ``preprocess_obs`` conventions). The actor and the
critic each get their own convolutional features (:func:`nature_cnn` for 84x84 Atari-like
inputs, :func:`small_cnn` for small images such as MinAtar's 10x10xC), followed by the MLP head.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

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
POLICIES = ("MlpPolicy", "CnnPolicy")
#: ``auto``: ``nature`` for images of at least 36x36 pixels, ``small`` below
CNN_ARCHS = ("auto", "nature", "small")
CNN_FEATURES = {"nature": 512, "small": 128}
NATURE_MIN_SIZE = 36  # the smallest side NatureCNN's 8/4, 4/2, 3/1 convolutions accept


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


def is_image_space(space: spaces.Space) -> bool:
    """SB3's test of an image that is scaled by 1/255: a rank-3 ``uint8`` ``Box`` in [0, 255]."""
    return (
        isinstance(space, spaces.Box)
        and len(space.shape) == 3
        and space.dtype == np.uint8
        and bool(np.all(space.low == 0))
        and bool(np.all(space.high == 255))
    )


def image_layout(space: spaces.Space) -> tuple[tuple[int, int, int], bool]:
    """``((C, H, W), channels_last)`` of a rank-3 ``Box``, or the clear error for ``CnnPolicy``.

    As SB3's ``is_image_space_channels_first``: the image is channel-first when its first
    dimension is the smallest (ties go to channel-first, e.g. ``(10, 10, 10)``).
    """
    if not (isinstance(space, spaces.Box) and len(space.shape) == 3):
        raise ValueError(
            f"CnnPolicy needs an image observation space (a rank-3 Box, HWC or CHW), got "
            f"{space}; use 'MlpPolicy' for flat observations"
        )
    shape = tuple(int(d) for d in space.shape)
    if int(np.argmin(shape)) == 0:
        return (shape[0], shape[1], shape[2]), False
    return (shape[2], shape[0], shape[1]), True


class ImageInput(nn.Module):
    """Flat ``(N, H·W·C)`` (or ``(N, C·H·W)``) observations as float ``(N, C, H, W)``, scaled."""

    def __init__(self, chw: tuple[int, int, int], channels_last: bool, scale: float) -> None:
        super().__init__()
        self.chw, self.channels_last, self.scale = tuple(chw), bool(channels_last), float(scale)

    def forward(self, obs: Tensor) -> Tensor:
        """Reshape (and transpose HWC to CHW), then scale."""
        c, h, w = self.chw
        if self.channels_last:
            x = obs.reshape(obs.shape[0], h, w, c).permute(0, 3, 1, 2)
        else:
            x = obs.reshape(obs.shape[0], c, h, w)
        if not x.is_floating_point():  # raw uint8/bool images
            x = x.to(torch.get_default_dtype())
        return x * self.scale if self.scale != 1.0 else x

    def extra_repr(self) -> str:
        """The layout, in the module's repr."""
        return f"chw={self.chw}, channels_last={self.channels_last}, scale={self.scale:g}"


def nature_cnn(chw: tuple[int, int, int], features_dim: int) -> list[nn.Module]:
    """NatureCNN (Mnih et al. 2015; SB3's ``NatureCNN``): 32·8x8/4, 64·4x4/2, 64·3x3/1, then a
    ``features_dim`` linear layer, ReLU throughout."""
    c, h, w = chw
    if min(h, w) < NATURE_MIN_SIZE:
        raise ValueError(
            f"cnn_arch='nature' needs images of at least {NATURE_MIN_SIZE}x{NATURE_MIN_SIZE}, "
            f"got {h}x{w}; use cnn_arch='small' (or 'auto')"
        )
    convs = [
        nn.Conv2d(c, 32, 8, stride=4),
        nn.ReLU(),
        nn.Conv2d(32, 64, 4, stride=2),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=1),
        nn.ReLU(),
        nn.Flatten(),
    ]
    return _with_features(convs, chw, features_dim)


def small_cnn(chw: tuple[int, int, int], features_dim: int) -> list[nn.Module]:
    """The MinAtar baselines' network (Young & Tian 2019): 16·3x3/1, then a ``features_dim``
    linear layer, ReLU; for images too small for NatureCNN (at least 3x3)."""
    c, h, w = chw
    if min(h, w) < 3:
        raise ValueError(f"cnn_arch='small' needs images of at least 3x3, got {h}x{w}")
    return _with_features(
        [nn.Conv2d(c, 16, 3, stride=1), nn.ReLU(), nn.Flatten()], chw, features_dim
    )


def _with_features(convs: list[nn.Module], chw: tuple[int, int, int], dim: int) -> list[nn.Module]:
    with torch.no_grad():
        n_flat = nn.Sequential(*convs)(torch.zeros(1, *chw)).shape[1]
    return [*convs, nn.Linear(n_flat, dim), nn.ReLU()]


def cnn_features(
    space: spaces.Space,
    cnn_arch: str = "auto",
    features_dim: int | None = None,
    normalize_images: bool = True,
    ortho_init: bool = True,
) -> tuple[list[nn.Module], int]:
    """``([ImageInput, conv layers..., Linear, ReLU], features_dim)`` for an image space.

    ``uint8`` 0-255 images are scaled by 1/255 when ``normalize_images`` (other rank-3 boxes, such
    as MinAtar's 0/1 channels, are read as they are). With ``ortho_init`` the convolutions and
    the features layer get orthogonal weights of gain √2 and zero biases (as SB3).
    """
    chw, channels_last = image_layout(space)
    if cnn_arch not in CNN_ARCHS:
        raise ValueError(f"cnn_arch={cnn_arch!r}; accepted: {', '.join(CNN_ARCHS)}")
    if cnn_arch == "auto":
        cnn_arch = "nature" if min(chw[1:]) >= NATURE_MIN_SIZE else "small"
    dim = int(features_dim) if features_dim is not None else CNN_FEATURES[cnn_arch]
    build = nature_cnn if cnn_arch == "nature" else small_cnn
    layers = build(chw, dim)
    if ortho_init:
        for m in layers:
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.orthogonal_(m.weight, gain=math.sqrt(2))
                nn.init.zeros_(m.bias)
    scale = 1.0 / 255.0 if normalize_images and is_image_space(space) else 1.0
    return [ImageInput(chw, channels_last, scale), *layers], dim


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
    """Maps normalized observations to the family's ``(N, K)`` distribution parameters.

    ``features`` (e.g. :func:`cnn_features`) run before the MLP head, whose input width is then
    ``obs_dim`` = the features' width.
    """

    def __init__(
        self,
        obs_dim: int,
        out_dim: int,
        family: Family,
        net_arch: Sequence[int],
        activation: str,
        ortho_init: bool,
        log_std_init: float,
        features: Sequence[nn.Module] = (),
    ) -> None:
        super().__init__()
        self.gaussian = isinstance(family, DiagGaussian)
        mean_dim = out_dim // 2 if self.gaussian else out_dim
        head = mlp([obs_dim, *net_arch, mean_dim], activation, 0.01, ortho_init)
        # one flat Sequential (features, then the head): K-FAC and the tests walk it layer by layer
        self.net = nn.Sequential(*features, *head) if features else head
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
    """Separate actor and critic networks for one observation / action space pair.

    ``policy="MlpPolicy"``: MLPs on the flat observations; ``"CnnPolicy"``: each of the actor and
    the critic is its own :func:`cnn_features` (``cnn_arch``, ``features_dim``,
    ``normalize_images``) followed by an MLP head (``net_arch`` / ``vf_arch``; ``[]`` for SB3's
    CnnPolicy layout, features straight to the output).

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
        policy: str = "MlpPolicy",
        cnn_arch: str = "auto",
        features_dim: int | None = None,
        normalize_images: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}; accepted: {', '.join(ACTIVATIONS)}")
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}; accepted: {', '.join(POLICIES)}")
        self.family, out_dim, self.action_dim = family_for_space(action_space)
        self.obs_dim = obs_dim_for_space(observation_space)
        self.action_space = action_space
        self.image = policy == "CnnPolicy"
        vf = net_arch if vf_arch is None else vf_arch
        if self.image:
            cnn = (observation_space, cnn_arch, features_dim, normalize_images, ortho_init)
            features, in_dim = cnn_features(*cnn)
            vf_features, _ = cnn_features(*cnn)
        else:
            features, vf_features, in_dim = [], [], self.obs_dim
        self.actor = Actor(
            in_dim, out_dim, self.family, net_arch, activation, ortho_init, log_std_init, features
        )
        self.critic = nn.Sequential(
            *vf_features, *mlp([in_dim, *vf, 1], activation, 1.0, ortho_init)
        )
        self.discrete = not isinstance(action_space, spaces.Box)
        # the rollout's fast path applies the MLP with F.linear; a CNN goes through its modules
        linears = [m for m in self.actor.net if isinstance(m, nn.Linear)]
        self._layers = None if self.image else [(m.weight, m.bias) for m in linears]
        self._act_fn = _FUNCTIONAL[activation]

    @classmethod
    def from_config(
        cls, observation_space: spaces.Space, action_space: spaces.Space, c: Mapping[str, Any]
    ) -> ActorCriticPolicy:
        """The policy of an agent's config (a dict such as ``agent.config``)."""
        return cls(
            observation_space,
            action_space,
            c["net_arch"],
            c["vf_arch"],
            c["activation"],
            c["ortho_init"],
            c["log_std_init"],
            c.get("policy", "MlpPolicy"),
            c.get("cnn_arch", "auto"),
            c.get("features_dim"),
            c.get("normalize_images", True),
        )

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
        layers = self._layers
        if layers is None:
            x = self.actor.net(obs)
        else:
            x = obs
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
