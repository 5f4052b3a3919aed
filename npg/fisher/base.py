"""The one interface every Fisher flavour implements (curvlinops-style)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from npg.cg import CGResult, conjugate_gradient
from npg.families import Family, get_family
from npg.model import FunctionalModel, Inputs, ParamSelection, batch_size


class FisherOperator(ABC):
    """A symmetric PSD curvature matrix over the selected parameters, for one batch.

    Subclasses implement :meth:`_mv` on flat vectors; everything else derives from it:

    * ``op.mv(v)`` / ``op @ v``: product with a flat vector (or a ``(dim, M)`` matrix),
    * ``op.mv_params(vs)``: product with per-parameter tensors, returned per parameter,
    * ``op.solve(g, damping)``: ``(F + λI)⁻¹ g`` (CG here; direct for diagonal and K-FAC),
    * ``op.to_dense()``: the ``(dim, dim)`` matrix, for small models and tests,
    * ``op.diagonal()``: the diagonal (overridden where it is cheap).

    The Fisher is the *mean* over the batch: ``F = (1/N) Σ_i E_y[∇log p ∇log pᵀ]``.
    """

    #: has a closed-form damped inverse ``inverse_mv`` (solved directly, not by CG)
    direct: bool = False

    def __init__(
        self,
        model,
        inputs: Inputs,
        family: str | Family,
        params: ParamSelection = None,
        param_dict: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.fmodel = (
            model
            if isinstance(model, FunctionalModel)
            else FunctionalModel(model, params, param_dict)
        )
        self.family = get_family(family)
        self.inputs = inputs
        self.n = batch_size(inputs)
        if self.n == 0:
            raise ValueError("cannot build a Fisher on an empty batch")
        self.dim = self.fmodel.dim
        first = next(iter(self.fmodel.params.values()))
        self.dtype, self.device = first.dtype, first.device

    def _checked_output(self, out: Tensor) -> Tensor:
        """``out`` (the model's output on the batch) if it is finite, else a ``ValueError`` naming
        this operator, the bad rows, and whether the inputs or the model produced them: the
        Fisher of a NaN/inf output is undefined (and would come back as a zero solve or as
        "non-positive curvature")."""
        finite_rows = torch.isfinite(out.reshape(out.shape[0], -1)).all(1)
        if bool(finite_rows.all()):
            return out
        rows = (~finite_rows).nonzero().reshape(-1).tolist()
        inputs = self.inputs if isinstance(self.inputs, tuple) else (self.inputs,)
        bad_inputs = any(
            isinstance(x, Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all())
            for x in inputs
        )
        source = (
            "the inputs hold NaN/inf"
            if bad_inputs
            else "the inputs are finite: the parameters or the model's arithmetic are not"
        )
        raise ValueError(
            f"{type(self).__name__}: the model output is non-finite in {len(rows)} of {self.n} "
            f"rows (first: row {rows[0]}); {source}"
        )

    # --- the core product --------------------------------------------------------------------
    @abstractmethod
    def _mv(self, v: Tensor) -> Tensor:
        """``F v`` for a flat vector ``v`` of length ``dim``."""

    def mv(self, v: Tensor) -> Tensor:
        """``F v`` for a flat vector, or column-wise for a ``(dim, M)`` matrix."""
        if v.shape[0] != self.dim:
            raise ValueError(f"expected leading dimension {self.dim}, got {tuple(v.shape)}")
        if v.ndim == 2:
            return self._mm(v)
        return self._mv(v)

    def _mm(self, m: Tensor) -> Tensor:
        """``F M`` for a ``(dim, M)`` matrix; column by column unless a flavour batches it."""
        return torch.stack([self._mv(c) for c in m.T], 1)

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.mv(v)

    def mv_params(self, vs: Sequence[Tensor] | Mapping[str, Tensor]) -> list[Tensor]:
        """``F v`` where ``v`` is given per parameter; returns one tensor per parameter."""
        out = self.mv(self.fmodel.flatten(vs))
        return list(self.fmodel.unflatten(out).values())

    def to_dense(self) -> Tensor:
        """The dense ``(dim, dim)`` matrix (``dim`` products; small models only)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return self.mv(eye)

    def diagonal(self) -> Tensor:
        """The diagonal of ``F`` (dense fallback; cheap flavours override)."""
        return torch.diagonal(self.to_dense()).clone()

    def solve(
        self,
        g: Tensor,
        damping: float = 0.0,
        *,
        max_iter: int = 10,
        tol: float = 1e-10,
        preconditioner=None,
    ) -> Tensor:
        """``(F + damping·I)⁻¹ g`` by CG; see :meth:`cg` for the diagnostics."""
        return self.cg(g, damping, max_iter=max_iter, tol=tol, preconditioner=preconditioner).x

    def cg(
        self,
        g: Tensor,
        damping: float = 0.0,
        *,
        max_iter: int = 10,
        tol: float = 1e-10,
        preconditioner=None,
    ) -> CGResult:
        """Run (preconditioned) CG on ``(F + damping·I) x = g`` and return its full result.

        ``preconditioner`` is a callable ``r -> M⁻¹ r`` or an operator with ``inverse_mv``
        (diagonal, K-FAC), which is then applied with the same damping.
        """
        precond = preconditioner
        if isinstance(precond, FisherOperator) and precond.direct:
            op = precond

            def precond(r: Tensor) -> Tensor:
                return op.inverse_mv(r, damping)

        return conjugate_gradient(
            self._mv, g, damping=damping, max_iter=max_iter, tol=tol, preconditioner=precond
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, n={self.n}, family={self.family!r})"


class DirectlyInvertible(FisherOperator):
    """A Fisher approximation with a cheap closed-form damped inverse (diagonal, K-FAC)."""

    direct = True

    @abstractmethod
    def inverse_mv(self, g: Tensor, damping: float = 0.0) -> Tensor:
        """``(F + damping·I)⁻¹ g`` in closed form."""

    def solve(self, g: Tensor, damping: float = 0.0, **_: object) -> Tensor:
        """Direct solve; CG options are accepted and ignored."""
        return self.inverse_mv(g, damping)
