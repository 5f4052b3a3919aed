"""Natural policy gradient with a normalized fixed-KL step (Kakade 2001; Rajeswaran et al. 2017)."""

from __future__ import annotations

import time
from typing import Any

from torch import Tensor

from agents.base import OnPolicyNaturalAlgorithm, flat_params, set_flat_params
from agents.config import NPGConfig


class NPG(OnPolicyNaturalAlgorithm):
    """NPG: ``θ ← θ + sqrt(2δ / gᵀF⁻¹g) · F⁻¹g``, no line search (same machinery as TRPO).

    The step is sized so the quadratic model of the KL is exactly δ; the actual mean KL is
    measured and reported but not enforced.
    """

    algo_name = "npg"
    config_class = NPGConfig

    def _policy_update(self, obs: Tensor, actions: Tensor, advantages: Tensor) -> dict[str, Any]:
        actor = self.policy.actor
        t0 = time.perf_counter()
        # 1. Surrogate gradient g = E[∇log π(a|s) A] at θ_old.
        old_out, old_logp, g, surrogate_old = self._surrogate_and_grad(obs, actions, advantages)
        # 2. Normalized natural step: ½ sᵀ(F + λI)s = δ.
        ns, info = self._natural_step(obs, actions, g)
        t_fisher = time.perf_counter() - t0
        t0 = time.perf_counter()
        kl = improvement = 0.0
        if ns.ok:
            # 3. Take the step as is and measure what it did.
            set_flat_params(actor, flat_params(actor) + ns.step)
            kl, improvement = self._kl_and_improvement(
                obs, actions, advantages, old_out, old_logp, surrogate_old
            )
        return {
            "kl": kl,
            "surrogate_improvement": improvement,
            **info,
            "ls_backtracks": 0,
            "ls_success": ns.ok,
            **self._distribution_metrics(old_out),
            "time_fisher_cg": t_fisher,
            "time_line_search": time.perf_counter() - t0,
        }
