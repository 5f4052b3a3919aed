"""Divergence caught at the update that causes it: non-finite or exploding parameters, a realized
KL far beyond the trust region, a non-finite value loss, and returns too large for float32."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from agents.policies import ActorCriticPolicy

#: ``|log σ|`` beyond this (σ outside [2e-9, 5e8]) is an exploded Gaussian policy, not a learned one
LOG_STD_LIMIT = 20.0
#: a realized mean KL above this many times ``max_kl`` is a diverged step (NPG's quadratic model
#: can be off by tens on small problems; TRPO's line search never exceeds 1x)
KL_LIMIT_FACTOR = 1000.0
#: λ-returns beyond this make the critic's squared error overflow float32 (1e30 over 1e6 samples)
RETURN_LIMIT = 1e15


class DivergenceError(RuntimeError):
    """An update diverged (the cause is named); its parameters were rolled back before raising."""


def divergence_cause(
    policy: ActorCriticPolicy, metrics: dict[str, Any], max_kl: float, critic: bool = True
) -> str | None:
    """Why the update that produced ``policy`` and ``metrics`` diverged, or ``None`` if it did
    not: non-finite parameters, ``|log_std| > LOG_STD_LIMIT``, a non-finite realized KL or one
    above ``KL_LIMIT_FACTOR · max_kl``, or an infinite value loss (NaN is the loss of no critic
    step, ``vf_epochs=0``; NaN parameters are caught first). ``critic=False`` checks the actor
    only (while the critic fit is still running)."""
    named = policy.named_parameters() if critic else policy.actor.named_parameters("actor")
    bad = [n for n, p in named if not bool(p.isfinite().all())]
    if bad:
        return f"non-finite parameters ({', '.join(bad)})"
    actor = policy.actor
    if actor.gaussian:
        worst = float(actor.log_std.detach().abs().max())
        if worst > LOG_STD_LIMIT:
            return f"log_std reached ±{worst:.3g} (limit ±{LOG_STD_LIMIT:g})"
    kl = float(metrics.get("kl", 0.0))
    if not math.isfinite(kl) or kl > KL_LIMIT_FACTOR * max_kl:
        return f"realized KL {kl:.3g} is beyond {KL_LIMIT_FACTOR:g}x max_kl={max_kl:g}"
    value_loss = float(metrics.get("value_loss", 0.0))
    if math.isinf(value_loss):
        return f"value_loss={value_loss}"
    return None


def returns_too_large(returns: Tensor, env_id: str) -> str | None:
    """A message naming ``env_id`` if the λ-returns exceed :data:`RETURN_LIMIT` (finite but too
    large: the critic's mean squared error would be inf), else ``None``."""
    worst = float(returns.abs().max()) if returns.numel() else 0.0
    if not worst > RETURN_LIMIT:  # NaN returns are caught by the divergence guard
        return None
    return (
        f"env {env_id!r} gives λ-returns up to {worst:.3g} (limit {RETURN_LIMIT:g}): their squared "
        "error overflows float32 and value_loss would be inf; scale the rewards down or pass "
        "normalize_reward=True"
    )
