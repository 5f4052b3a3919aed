"""The exact Fisher as a generalized Gauss-Newton matrix ``(1/N) Σ_i J_iᵀ F_out(out_i) J_i``."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from npg.fisher._linear import LinearJacobian, LinearRecorder, linear_layers
from npg.fisher.base import FisherOperator


class _DoubleVJP:
    """``J v`` and ``Jᵀ w`` over some leaves by autograd on the cached graph of ``out``.

    Builds ``g(u) = Jᵀ u`` once with ``create_graph=True`` at a dummy output cotangent ``u``; then
    ``J v = ∂(g(u)·v)/∂u`` (``g`` is linear in ``u``, so this is the transposed map) and ``Jᵀ w``
    are one backward sweep each. Autograd visits only the part of the graph that leads to the
    leaves, so a shallow leaf (a free log-std) is cheap.
    """

    def __init__(self, out: Tensor, leaves: list[Tensor]) -> None:
        self.out, self.leaves = out, leaves
        self.u = torch.zeros_like(out, requires_grad=True)
        grads = torch.autograd.grad(out, leaves, self.u, create_graph=True, allow_unused=True)
        # leaves the output does not depend on have a zero Jacobian: skipped in J v
        self.used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self.grads = [grads[i] for i in self.used]

    def jv(self, vs: list[Tensor], batched: bool = False) -> Tensor | None:
        """``J v`` (``(N, K)``, or ``(k, N, K)`` for ``batched`` ``(k, *shape)`` parts); ``None``
        when it is zero."""
        if not self.grads:
            return None
        with torch.enable_grad():
            (jv,) = torch.autograd.grad(
                self.grads,
                self.u,
                [vs[i] for i in self.used],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=batched,
            )
        return jv

    def jtw(self, w: Tensor, batched: bool = False) -> tuple[Tensor | None, ...]:
        """``Jᵀ w`` per leaf (``None`` where zero), ``w`` of shape ``(N, K)`` or ``(k, N, K)``."""
        with torch.enable_grad():
            return torch.autograd.grad(
                self.out,
                self.leaves,
                w,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=batched,
            )


class ExactFisher(FisherOperator):
    """True Fisher from Jacobian-vector and vector-Jacobian products on one cached forward pass.

    Two ways to apply the Jacobian ``J`` of the output, picked per parameter:

    * weights and biases of ``nn.Linear`` layers: from per-sample output Jacobians cached at
      construction (:mod:`npg.fisher._linear`): per product, matmuls of the minimum
      ``2 N Σ_l in_l out_l`` multiply-adds plus memory-bound contractions with those Jacobians;
    * every other parameter: a double-vjp on the cached autograd graph (:class:`_DoubleVJP`).

    ``fast=True`` takes the Linear path where it is valid (a module model, every selected Linear
    called once on a 2-D input, no BatchNorm, no parameter shared between modules; otherwise
    ``ValueError``); it assumes that samples do not interact in the forward pass. It is off by
    default: its products are cheaper only for wide layers (0.66× the generic product for a
    64→512→512→10 MLP, about 1× for the benchmark networks of ``docs/fisher_benchmark.md``), and
    its construction runs ``K`` batched backward passes, about ``K/2`` products' worth, which a
    10-iteration CG solve does not earn back.

    For exponential families this GGN *is* the Fisher, not an approximation.
    """

    def __init__(
        self, model, inputs, family, params=None, param_dict=None, *, fast: bool = False
    ) -> None:
        super().__init__(model, inputs, family, params, param_dict)
        fm = self.fmodel
        # a snapshot of the parameters: the operator stays the Fisher at construction time even if
        # the caller updates the parameters in place (a line search) before its last product
        leaves = {n: p.detach().clone().requires_grad_(True) for n, p in fm.params.items()}
        recorder = LinearRecorder(fm.module) if fast and fm.module is not None else None
        with torch.enable_grad():
            with recorder or nullcontext():
                out = fm(leaves, inputs)
            if out.ndim != 2:
                raise ValueError(f"model output must be (N, K), got shape {tuple(out.shape)}")
            self.linear = self._linear_path(out, recorder) if fast else None
            done = set() if self.linear is None else set(self.linear.weights + self.linear.biases)
            self._rest = [n for n in fm.names if n not in done]
            rest = [leaves[n] for n in self._rest]
            self._autograd = _DoubleVJP(out, rest) if rest else None
        self.out = out.detach()

    def _linear_path(self, out: Tensor, recorder: LinearRecorder | None) -> LinearJacobian:
        """The Jacobian of the selected Linear layers' parameters (see the class docstring)."""
        if recorder is None:
            raise ValueError("fast=True needs an nn.Module model")
        layers = linear_layers(recorder.module, self.fmodel.names, recorder.calls)
        if not layers:
            raise ValueError(
                "fast=True needs selected nn.Linear parameters, each layer called once on a "
                "2-D input, no BatchNorm and no parameter shared between modules"
            )
        return LinearJacobian(out, layers, recorder.calls)

    def _jv(self, vs: dict[str, Tensor]) -> Tensor:
        """``J v`` (shape ``(N, K)``) for ``v`` given per parameter."""
        jv = torch.zeros_like(self.out)
        if self.linear is not None:
            jv = jv + self.linear.jv(vs)
        if self._autograd is not None:
            part = self._autograd.jv([vs[n] for n in self._rest])
            if part is not None:
                jv = jv + part
        return jv

    def _jtw(self, w: Tensor) -> Tensor:
        """``Jᵀ w`` (flat) for an output-space ``w`` of shape ``(N, K)``."""
        grads = {} if self.linear is None else self.linear.jtw(w)
        if self._autograd is not None:
            grads.update(zip(self._rest, self._autograd.jtw(w), strict=True))
        return torch.cat(
            [
                w.new_zeros(numel) if grads.get(n) is None else grads[n].reshape(-1)
                for n, numel in zip(self.fmodel.names, self.fmodel.numels, strict=True)
            ]
        )

    def _mv(self, v: Tensor) -> Tensor:
        vs = self.fmodel.unflatten(v)
        u = self._jv(vs)  # J v, shape (N, K)
        w = self.family.fisher_out_mv(self.out, u) / self.n  # F_out J v / N
        return self._jtw(w)  # Jᵀ F_out J v / N

    def _mm(self, m: Tensor, chunk: int = 32) -> Tensor:
        """On the generic path, columns in chunks of ``chunk`` through vmapped backward passes
        (``is_grads_batched``); column by column on the Linear path or if an op has no batching
        rule."""
        if self.linear is not None:
            return super()._mm(m)
        if not self._autograd.grads:
            return torch.zeros_like(m)
        try:
            return torch.cat([self._mm_batched(c) for c in m.split(chunk, 1)], 1)
        except RuntimeError:
            return super()._mm(m)

    def _mm_batched(self, m: Tensor) -> Tensor:
        k = m.shape[1]
        vs = [t.movedim(-1, 0) for t in self.fmodel.unflatten(m).values()]  # (k, *shape) each
        jv = self._autograd.jv(vs, batched=True)
        n, width = self.out.shape
        out = self.out.unsqueeze(0).expand(k, n, width).reshape(k * n, width)
        w = self.family.fisher_out_mv(out, jv.reshape(k * n, width)) / self.n
        g = self._autograd.jtw(w.reshape(k, n, width), batched=True)
        cols = [
            m.new_zeros(k, numel) if t is None else t.reshape(k, -1)
            for numel, t in zip(self.fmodel.numels, g, strict=True)
        ]
        return torch.cat(cols, 1).T
