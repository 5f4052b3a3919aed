"""The natural-gradient step inside a KL trust region."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from npg.cg import CGResult
from npg.fisher.base import FisherOperator


@dataclass
class NaturalStep:
    """``step = sqrt(2δ / xᵀ(F + λI)x) · x`` with ``x ≈ (F + λI)⁻¹ g``.

    Attributes:
        step: the parameter step (flat), sized so that ``½ stepᵀ (F + λI) step = δ``.
        direction: the unscaled solve ``x``.
        xFx: ``xᵀ(F + λI)x``.
        predicted_improvement: ``gᵀ step``, the first-order gain of the objective.
        cg: the CG result (``None`` for direct solves).
        status: ``"ok"`` or why no step was taken: ``"zero_gradient"`` or
            ``"nonpositive_curvature"``.
    """

    step: Tensor
    direction: Tensor
    xFx: float
    predicted_improvement: float
    cg: CGResult | None
    status: str

    @property
    def ok(self) -> bool:
        """Whether a step was taken (status ``ok``)."""
        return self.status == "ok"


def natural_step(
    fisher: FisherOperator,
    g: Tensor,
    max_kl: float,
    *,
    damping: float = 0.0,
    cg_iters: int = 10,
    cg_tol: float = 1e-10,
    preconditioner=None,
) -> NaturalStep:
    """Solve ``(F + λI) x = g`` and scale ``x`` to the KL radius ``max_kl`` (Schulman et al. 2015,
    App. C; Kakade 2001). ``g`` is the gradient of the objective to *increase*.

    Flavours with a closed-form inverse (diagonal, K-FAC) are solved directly; the others by
    (optionally preconditioned) CG. A zero gradient or a direction with ``xᵀFx ≤ 0`` gives a zero
    step with a status saying why, never NaN.
    """
    if not (max_kl > 0 and math.isfinite(max_kl)):
        raise ValueError(f"max_kl must be a finite float > 0, got {max_kl}")
    if not (damping >= 0 and math.isfinite(damping)):
        raise ValueError(f"damping must be a finite float >= 0, got {damping}")
    if not bool(torch.isfinite(g).all()):
        raise ValueError("natural_step: the gradient g holds NaN/inf entries")
    if fisher.direct:
        x = fisher.inverse_mv(g, damping)
        xFx = float(x @ (fisher.mv(x) + damping * x))
        cg = None
    else:
        # CG stops before a direction of non-positive curvature; its last iterate stays usable.
        cg = fisher.cg(g, damping, max_iter=cg_iters, tol=cg_tol, preconditioner=preconditioner)
        x, xFx = cg.x, cg.xAx
    if float(g.abs().max()) == 0.0:
        status = "zero_gradient"
    elif not (xFx > 0 and math.isfinite(xFx)):
        status = "nonpositive_curvature"
    else:
        status = "ok"
    if status != "ok":
        return NaturalStep(g.new_zeros(g.shape), x, xFx, 0.0, cg, status)
    step = math.sqrt(2 * max_kl / xFx) * x
    return NaturalStep(step, x, xFx, float(g @ step), cg, status)
