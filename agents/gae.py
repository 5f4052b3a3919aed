"""Generalized advantage estimation (Schulman et al. 2016) with termination vs truncation."""

from __future__ import annotations

import numpy as np


def compute_gae(
    rewards: np.ndarray,
    values: np.ndarray,
    last_values: np.ndarray,
    terminated: np.ndarray,
    truncated: np.ndarray,
    final_values: np.ndarray,
    gamma: float,
    gae_lambda: float,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """GAE(γ, λ) advantages and λ-returns over a ``(T, E)`` rollout.

    Args:
        rewards, values: ``r_t`` and ``V(s_t)``, shape ``(T, E)``.
        last_values: ``V(s_T)`` of the observation after the last step, shape ``(E,)``.
        terminated: the episode ended in a terminal state at step ``t``: no bootstrap.
        truncated: the episode was cut by a time limit at step ``t`` (and not terminated):
            bootstrap from ``final_values[t]``, the value of the final observation (with
            ``SAME_STEP`` autoreset the next observation in the buffer is already a reset one).
        final_values: ``V(final_obs_t)``, read only where ``truncated``; shape ``(T, E)``.
        valid: ``False`` for transitions dropped from the losses (non-finite env output): they
            get ``A_t = 0`` and the step before bootstraps from ``V(s_t)``, as at a time limit.

    Returns:
        ``(advantages, returns)`` with ``returns = advantages + values``.

    ``δ_t = r_t + γ V_next,t - V(s_t)``, ``A_t = δ_t + γλ (1 - done_t) A_{t+1}`` where
    ``V_next,t`` is ``0`` on termination, ``V(final_obs_t)`` on truncation, else ``V(s_{t+1})``.
    """
    next_values = np.concatenate([values[1:], last_values[None]])
    next_values = np.where(truncated, final_values, next_values)
    next_values = np.where(terminated, 0.0, next_values)
    not_done = (~(terminated | truncated)).astype(values.dtype)
    delta = rewards + gamma * next_values - values
    decay = gamma * gae_lambda * not_done
    if valid is not None:  # a dropped transition: A_t = 0 and nothing flows back past it
        delta = np.where(valid, delta, 0.0)
        decay = np.where(valid, decay, 0.0)
    # the one sequential part, A_t = δ_t + γλ (1 - done_t) A_{t+1}, two ufunc calls per step,
    # in the inputs' common precision; the advantages are stored in the values' dtype
    adv = np.empty_like(values)
    running = np.zeros(last_values.shape, np.result_type(delta, decay))
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = np.multiply(decay[t], running, out=running)
        running = np.add(delta[t], running, out=running)
        adv[t] = running
    return adv, adv + values
