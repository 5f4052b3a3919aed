"""The exact Fisher as a generalized Gauss-Newton matrix ``(1/N) Σ_i J_iᵀ F_out(out_i) J_i``."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import vjp

from npg.fisher.base import FisherOperator


class ExactFisher(FisherOperator):
    """True Fisher via Jacobian-vector and vector-Jacobian products (``torch.func``).

    The forward pass and both linearizations are built once in the constructor: ``J v`` comes
    from the transpose of the cached vector-Jacobian map (the "double-vjp" trick), so a product
    inside CG costs two backward sweeps and no forward pass. For exponential families this GGN
    *is* the Fisher, not an approximation.
    """

    def __init__(self, model, inputs, family, params=None, param_dict=None) -> None:
        super().__init__(model, inputs, family, params, param_dict)
        fm = self.fmodel
        out, self._vjp = vjp(lambda p: fm(p, inputs), fm.detached_params())
        self.out = out.detach()
        if self.out.ndim != 2:
            raise ValueError(f"model output must be (N, K), got shape {tuple(self.out.shape)}")
        w0 = torch.zeros_like(self.out, requires_grad=True)
        _, self._jvp = vjp(lambda w: self._vjp(w)[0], w0)

    def _mv(self, v: Tensor) -> Tensor:
        u = self._jvp(self.fmodel.unflatten(v))[0]  # J v, shape (N, K)
        w = self.family.fisher_out_mv(self.out, u) / self.n  # F_out J v / N
        return self.fmodel.flatten(self._vjp(w)[0])  # Jᵀ F_out J v / N
