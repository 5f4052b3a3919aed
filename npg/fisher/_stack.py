"""Jacobian products of a :class:`~npg.model.LinearStack` without autograd, as TorchScript.

For an MLP ``z_i = h_i W_iᵀ + b_i``, ``h_{i+1} = σ(z_i)`` the Jacobian-vector product is the
forward-mode sweep ``dz_i = h_i dW_iᵀ + db_i + (σ'(z_{i-1}) ⊙ dz_{i-1}) W_iᵀ`` and the
vector-Jacobian product the usual backward sweep. Both reuse the activations and ``σ'`` cached
at construction, so a product is the minimum of matmuls a generic double-vjp also does, without
its graph traversal and with TorchScript's lower per-op overhead (about 0.6× of the autograd
product on a 64×64 policy; ``scripts/bench_fisher.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

from npg.model import LinearStack


def _forward(
    x: Tensor, weights: list[Tensor], biases: list[Tensor], activation: str
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Layer inputs ``h_i``, activation derivatives ``σ'(z_i)`` and the output."""
    hs = [x]
    slopes: list[Tensor] = []
    n_layers = len(weights)
    for i in range(n_layers - 1):
        z = torch.addmm(biases[i], hs[i], weights[i].t())
        if activation == "tanh":
            h = torch.tanh(z)
            slopes.append(1.0 - h * h)
        else:
            h = torch.relu(z)
            slopes.append((z > 0).to(z.dtype))
        hs.append(h)
    out = torch.addmm(biases[n_layers - 1], hs[n_layers - 1], weights[n_layers - 1].t())
    return hs, slopes, out


def _jvp(
    hs: list[Tensor],
    slopes: list[Tensor],
    weights: list[Tensor],
    vw: list[Tensor],
    vb: list[Tensor],
) -> Tensor:
    """``J v`` for the weight and bias directions ``vw``, ``vb`` (forward mode)."""
    dz = torch.addmm(vb[0], hs[0], vw[0].t())
    for i in range(1, len(weights)):
        dh = dz * slopes[i - 1]
        dz = torch.addmm(vb[i], hs[i], vw[i].t()).addmm_(dh, weights[i].t())
    return dz


def _vjp(
    hs: list[Tensor], slopes: list[Tensor], weights: list[Tensor], w: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """``Jᵀ w`` as per-layer weight and bias gradients (backward sweep)."""
    n_layers = len(weights)
    gw: list[Tensor] = []
    gb: list[Tensor] = []
    delta = w
    for i in range(n_layers - 1, -1, -1):
        gw.append(delta.t().mm(hs[i]))
        gb.append(delta.sum(0))
        if i > 0:
            delta = delta.mm(weights[i]) * slopes[i - 1]
    gw.reverse()
    gb.reverse()
    return gw, gb


def _with_log_std(mean: Tensor, log_std: Tensor | None) -> Tensor:
    """The stack's output: the MLP's, with a free log-std appended to every row."""
    if log_std is None:
        return mean
    return torch.cat([mean, log_std.detach().expand_as(mean)], 1)


def usable(stack: LinearStack | None, inputs: object) -> bool:
    """Whether the sweeps here can compute ``stack`` on ``inputs``: a described MLP with a
    supported activation, on a 2-D input batch."""
    return (
        stack is not None
        and isinstance(inputs, Tensor)
        and inputs.ndim == 2
        and stack.activation in ("tanh", "relu")
        and len(stack.layers) > 0
    )


def reproduces(described: Tensor, out: Tensor) -> bool:
    """Whether a description's output matches the module's own (float32 tolerance): the
    check a caller makes before it relies on the description."""
    return described.shape == out.shape and torch.allclose(
        described, out.detach(), rtol=1e-5, atol=1e-6
    )


def stack_output(stack: LinearStack, inputs: Tensor) -> Tensor:
    """The output that ``stack`` describes, on ``inputs`` (no gradient): what a caller compares
    with the module's own output before it relies on the description."""
    weights = [lin.weight.detach() for lin in stack.layers]
    biases = [lin.bias.detach() for lin in stack.layers]
    with torch.no_grad():
        _, _, mean = _script(_forward)(inputs, weights, biases, stack.activation)
    return _with_log_std(mean, stack.log_std)


@cache
def _script(fn: Callable) -> torch.jit.ScriptFunction:
    """The TorchScript version of one of the sweeps above, compiled on first use."""
    return torch.jit.script(fn)


class StackJacobian:
    """``J v`` and ``Jᵀ w`` of a module described by a :class:`LinearStack`, on one batch.

    ``params`` are the operator's selected parameters by name, in the order of its flat vectors;
    they must be exactly the stack's parameters (:meth:`applies` checks).
    """

    def __init__(self, stack: LinearStack, inputs: Tensor, params: dict[str, Tensor]) -> None:
        name = {id(p): n for n, p in params.items()}
        self.names = list(params)
        self.weights = [lin.weight.detach().clone() for lin in stack.layers]  # the snapshot
        biases = [lin.bias.detach().clone() for lin in stack.layers]
        self._w_names = [name[id(lin.weight)] for lin in stack.layers]
        self._b_names = [name[id(lin.bias)] for lin in stack.layers]
        self._log_std = None if stack.log_std is None else name[id(stack.log_std)]
        with torch.no_grad():
            self.hs, self.slopes, mean = _script(_forward)(
                inputs, self.weights, biases, stack.activation
            )
        self.width = mean.shape[1]
        self.out = _with_log_std(mean, stack.log_std)

    @staticmethod
    def applies(stack: LinearStack | None, inputs: object, params: dict[str, Tensor]) -> bool:
        """Whether the stack covers exactly the selected parameters, on a 2-D input batch."""
        return usable(stack, inputs) and sorted(map(id, stack.parameters())) == sorted(
            map(id, params.values())
        )

    def jv(self, v: dict[str, Tensor]) -> Tensor:
        """``J v`` with ``v`` given per parameter name; shape ``(N, K)``."""
        jv = _script(_jvp)(
            self.hs,
            self.slopes,
            self.weights,
            [v[n] for n in self._w_names],
            [v[n] for n in self._b_names],
        )
        if self._log_std is None:
            return jv
        return torch.cat([jv, v[self._log_std].expand_as(jv)], 1)

    def jtw(self, w: Tensor) -> Tensor:
        """``Jᵀ w`` for an output-space ``w`` of shape ``(N, K)``, flat in ``names`` order."""
        gw, gb = _script(_vjp)(self.hs, self.slopes, self.weights, w[:, : self.width])
        grads = dict(zip(self._w_names, gw, strict=True)) | dict(
            zip(self._b_names, gb, strict=True)
        )
        if self._log_std is not None:
            grads[self._log_std] = w[:, self.width :].sum(0)
        return torch.cat([grads[n].reshape(-1) for n in self.names])
