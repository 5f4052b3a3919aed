"""Trust Region Policy Optimization (Schulman et al. 2015) with a pluggable Fisher."""

from __future__ import annotations

import time
from typing import Any

from torch import Tensor

from agents.base import OnPolicyNaturalAlgorithm, flat_params, set_flat_params
from agents.config import TRPOConfig


class TRPO(OnPolicyNaturalAlgorithm):
    """TRPO: natural-gradient direction by CG, scaled to the KL radius δ, then a backtracking
    line search that accepts only if mean KL(old‖new) ≤ δ and the surrogate improves; if no
    candidate passes, the actor parameters are restored bit-identically.

    Example::

        model = TRPO("MlpPolicy", "CartPole-v1", n_envs=2, n_steps=512).learn(100_000)
        action, _ = model.predict(obs, deterministic=True)
    """

    algo_name = "trpo"
    config_class = TRPOConfig

    def _policy_update(self, obs: Tensor, actions: Tensor, advantages: Tensor) -> dict[str, Any]:
        actor = self.policy.actor
        t0 = time.perf_counter()
        # 1. Surrogate L(θ) = E[π_θ(a|s)/π_old(a|s) · A] and its gradient g at θ_old (eq. 14).
        old_out, old_logp, g, surrogate_old = self._surrogate_and_grad(obs, actions, advantages)
        # 2. Step s = sqrt(2δ / xᵀFx) x with x ≈ (F + λI)⁻¹ g by CG: the maximizer of the linear
        #    surrogate under the quadratic KL constraint ½ sᵀFs ≤ δ (eq. 12, Appendix C).
        ns, info = self._natural_step(obs, actions, g)
        t_fisher = time.perf_counter() - t0
        t0 = time.perf_counter()
        old_params = flat_params(actor).clone()
        kl = 0.0
        improvement = 0.0
        backtracks = 0
        accepted = False
        if ns.ok:
            # 3. Backtracking line search on θ_old + shrinkᵏ s (Appendix C): accept the first
            #    candidate with mean KL(π_old ‖ π_new) ≤ δ (eq. 12) and L(θ_new) > L(θ_old).
            for k in range(self.line_search_max_iter):
                coef = self.line_search_shrink**k
                set_flat_params(actor, old_params + coef * ns.step)
                kl_k, improvement_k = self._kl_and_improvement(
                    obs, actions, advantages, old_out, old_logp, surrogate_old
                )
                if kl_k <= self.max_kl and improvement_k > 0:
                    accepted, kl, improvement, backtracks = True, kl_k, improvement_k, k
                    break
            else:
                backtracks = self.line_search_max_iter
        if not accepted:
            # 4. No acceptable step: restore θ_old exactly (copy of the flat parameters).
            set_flat_params(actor, old_params)
        return {
            "kl": kl,
            "surrogate_improvement": improvement,
            **info,
            "ls_backtracks": backtracks,
            "ls_success": accepted,
            **self._distribution_metrics(old_out),
            "time_fisher_cg": t_fisher,
            "time_line_search": time.perf_counter() - t0,
        }
