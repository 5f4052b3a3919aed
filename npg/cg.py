"""Damped, optionally preconditioned conjugate gradient for ``(F + λI) x = g``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


@dataclass
class CGResult:
    """The CG iterate and how it got there.

    Attributes:
        x: the approximate solution (always finite).
        iterations: matrix-vector products spent.
        residual: ``‖g - A x‖ / ‖g‖`` of the returned ``x``.
        xAx: ``xᵀ A x`` for the damped operator ``A = F + λI`` (computed as ``xᵀ(g - r)``).
        converged: the relative residual reached ``tol``.
        status: ``"converged"``, ``"max_iter"``, ``"zero_rhs"`` or ``"nonpositive_curvature"``
            (a search direction had ``pᵀAp ≤ 0``, or curvature at rounding level: see
            :func:`conjugate_gradient`).
    """

    x: Tensor
    iterations: int
    residual: float
    xAx: float
    converged: bool
    status: str


def conjugate_gradient(
    matvec: MatVec,
    b: Tensor,
    *,
    damping: float = 0.0,
    max_iter: int = 10,
    tol: float = 1e-10,
    preconditioner: MatVec | None = None,
    x0: Tensor | None = None,
) -> CGResult:
    """Solve ``(A + damping·I) x = b`` for symmetric positive (semi-)definite ``A``.

    Stops when ``‖r‖ ≤ tol·‖b‖`` or after ``max_iter`` products. ``preconditioner`` applies an
    approximation of ``(A + damping·I)⁻¹`` (e.g. a diagonal or K-FAC inverse). If a search
    direction has ``pᵀAp ≤ 0`` (the operator is not positive definite along it), the method stops
    before dividing by it and returns the last finite iterate with status
    ``"nonpositive_curvature"``; it never returns NaN or inf. The same happens when the curvature
    ``pᵀAp / pᵀp`` falls below ``100·eps`` times the largest curvature seen so far: that is
    rounding noise (a singular, undamped ``A`` whose range CG has exhausted, with ``b`` outside it),
    and dividing by it would blow the iterate up by ``1/eps``.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not (damping >= 0 and math.isfinite(damping)):
        raise ValueError(f"damping must be a finite float >= 0, got {damping}")

    def op(v: Tensor) -> Tensor:
        return matvec(v) + damping * v if damping else matvec(v)

    b_norm = torch.linalg.vector_norm(b)
    if not torch.isfinite(b_norm):
        raise ValueError("conjugate_gradient: right-hand side contains NaN or inf")
    if b_norm == 0:
        return CGResult(torch.zeros_like(b), 0, 0.0, 0.0, True, "zero_rhs")

    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - op(x) if x0 is not None else b.clone()
    z = preconditioner(r) if preconditioner else r
    p = z.clone()
    rz = torch.dot(r, z)
    status = "max_iter"
    iterations = 0
    r_norm = torch.linalg.vector_norm(r)
    curvature_floor = 100 * torch.finfo(b.dtype).eps
    max_curvature = 0.0
    for _ in range(max_iter):
        if r_norm <= tol * b_norm:
            status = "converged"
            break
        Ap = op(p)
        iterations += 1
        pAp = torch.dot(p, Ap)
        curvature = float(pAp / torch.dot(p, p))
        if not (curvature > curvature_floor * max_curvature and math.isfinite(curvature)):
            status = "nonpositive_curvature"
            break
        max_curvature = max(max_curvature, curvature)
        alpha = rz / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        r_norm = torch.linalg.vector_norm(r)
        z = preconditioner(r) if preconditioner else r
        rz_new = torch.dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    else:
        if r_norm <= tol * b_norm:
            status = "converged"
    rel = float(r_norm / b_norm)
    xAx = float(torch.dot(x, b - r))
    return CGResult(x, iterations, rel, xAx, status == "converged", status)
