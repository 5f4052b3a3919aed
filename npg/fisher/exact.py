"""The exact Fisher as a generalized Gauss-Newton matrix ``(1/N) Σ_i J_iᵀ F_out(out_i) J_i``."""

from __future__ import annotations

import torch
from torch import Tensor

from npg.fisher._stack import StackJacobian, reproduces
from npg.fisher.base import FisherOperator
from npg.model import find_linear_stack


class ExactFisher(FisherOperator):
    """True Fisher from Jacobian-vector and vector-Jacobian products with cached graphs.

    The constructor runs the forward pass once and builds ``g(u) = Jᵀ u`` with
    ``create_graph=True`` at a dummy output cotangent ``u``. A product then costs two backward
    sweeps and no forward pass: ``J v = ∂(g(u)·v)/∂u`` (the "double-vjp" trick: ``g`` is linear
    in ``u``, so this is the transposed map), followed by ``Jᵀ (F_out J v) / N`` through the
    forward graph. For exponential families this GGN *is* the Fisher, not an approximation.

    Plain autograd rather than ``torch.func``: the same arithmetic, with less per-call overhead
    (measured in ``scripts/bench_fisher.py``).

    A module that describes itself as an MLP (:class:`npg.model.LinearStack`: an
    ``nn.Sequential`` of ``Linear`` and tanh/ReLU layers, or a ``linear_stack()`` method), with
    exactly its parameters selected, gets the same products from forward- and backward-mode
    sweeps written out in TorchScript instead (``npg/fisher/_stack.py``), once the constructor
    has checked that the description reproduces the module's output.
    """

    def __init__(self, model, inputs, family, params=None, param_dict=None) -> None:
        super().__init__(model, inputs, family, params, param_dict)
        fm = self.fmodel
        self._stack = self._stack_jacobian()
        if self._stack is not None:
            return
        # a snapshot of the parameters: the operator stays the Fisher at construction time even if
        # the caller updates the parameters in place (a line search) before its last product
        leaves = {n: p.detach().clone().requires_grad_(True) for n, p in fm.params.items()}
        with torch.enable_grad():
            out = fm(leaves, inputs)
            if out.ndim != 2:
                raise ValueError(f"model output must be (N, K), got shape {tuple(out.shape)}")
            self._checked_output(out.detach())
            u = torch.zeros_like(out, requires_grad=True)
            grads = torch.autograd.grad(
                out, list(leaves.values()), u, create_graph=True, allow_unused=True
            )
        self.out = out.detach()
        self._graph_out, self._u = out, u
        self._leaves = list(leaves.values())
        # parameters the output does not depend on have a zero Jacobian: skipped in J v
        self._used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._grads = [grads[i] for i in self._used]

    def _stack_jacobian(self) -> StackJacobian | None:
        """The autograd-free Jacobian if the model is a verified :class:`LinearStack`."""
        fm = self.fmodel
        stack = find_linear_stack(fm.module)
        if not StackJacobian.applies(stack, self.inputs, fm.params):
            return None
        jac = StackJacobian(stack, self.inputs, fm.params)
        with torch.no_grad():
            out = fm(fm.detached_params(), self.inputs)
        if not reproduces(jac.out, self._checked_output(out)):
            return None  # the module computes something else: use the generic path
        self.out = out
        return jac

    def _jv(self, v: Tensor) -> Tensor:
        """``J v`` (shape ``(N, K)``) for a flat ``v``."""
        if self._stack is not None:
            return self._stack.jv(self.fmodel.unflatten(v))
        if not self._grads:
            return torch.zeros_like(self.out)
        chunks = v.split(self.fmodel.numels)
        vs = [chunks[i].reshape(self._grads[k].shape) for k, i in enumerate(self._used)]
        with torch.enable_grad():
            (jv,) = torch.autograd.grad(
                self._grads, self._u, vs, retain_graph=True, allow_unused=True
            )
        return torch.zeros_like(self.out) if jv is None else jv

    def _jtw(self, w: Tensor) -> Tensor:
        """``Jᵀ w`` (flat) for an output-space ``w`` of shape ``(N, K)``."""
        if self._stack is not None:
            return self._stack.jtw(w)
        with torch.enable_grad():
            g = torch.autograd.grad(
                self._graph_out, self._leaves, w, retain_graph=True, allow_unused=True
            )
        return torch.cat(
            [
                torch.zeros(p.numel(), dtype=w.dtype, device=w.device)
                if t is None
                else t.reshape(-1)
                for p, t in zip(self._leaves, g, strict=True)
            ]
        )

    def _mv(self, v: Tensor) -> Tensor:
        u = self._jv(v)  # J v, shape (N, K)
        w = self.family.fisher_out_mv(self.out, u) / self.n  # F_out J v / N
        return self._jtw(w)  # Jᵀ F_out J v / N

    def _mm(self, m: Tensor, chunk: int = 32) -> Tensor:
        """Columns in chunks of ``chunk`` through vmapped backward passes
        (``is_grads_batched``); column by column on the stack path or if an op has no batching
        rule."""
        if self._stack is not None:
            return super()._mm(m)
        if not self._grads:
            return torch.zeros_like(m)
        try:
            return torch.cat([self._mm_batched(c) for c in m.split(chunk, 1)], 1)
        except RuntimeError:
            return super()._mm(m)

    def _mm_batched(self, m: Tensor) -> Tensor:
        k = m.shape[1]
        chunks = m.T.split(self.fmodel.numels, 1)  # (k, numel) each
        vs = [chunks[i].reshape(k, *self._grads[j].shape) for j, i in enumerate(self._used)]
        with torch.enable_grad():
            (jv,) = torch.autograd.grad(
                self._grads, self._u, vs, retain_graph=True, is_grads_batched=True
            )
            n, width = self.out.shape
            out = self.out.unsqueeze(0).expand(k, n, width).reshape(k * n, width)
            w = self.family.fisher_out_mv(out, jv.reshape(k * n, width)) / self.n
            g = torch.autograd.grad(
                self._graph_out,
                self._leaves,
                w.reshape(k, n, width),
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        cols = [
            torch.zeros(k, p.numel(), dtype=m.dtype, device=m.device)
            if t is None
            else t.reshape(k, -1)
            for p, t in zip(self._leaves, g, strict=True)
        ]
        return torch.cat(cols, 1).T
