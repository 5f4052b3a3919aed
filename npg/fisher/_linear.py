"""The Jacobian of a model's output with respect to the weights and biases of its ``nn.Linear``
layers, from per-sample output Jacobians cached once per batch.

For a Linear layer ``z_l = h_l W_lᵀ + b_l`` called once per forward pass, with samples that do not
interact, the chain rule gives per sample ``n``::

    J v   = Σ_l M_l[n] (dW_l h_l[n] + db_l)          M_l[n] = ∂out[n] / ∂z_l[n]  (K × out_l)
    Jᵀ w:   δ_l[n] = M_l[n]ᵀ w[n],   ∇W_l = Σ_n δ_l[n] h_l[n]ᵀ,   ∇b_l = Σ_n δ_l[n]

so a product costs one ``(N, in_l) × (in_l, out_l)`` matmul per layer and direction, about
``2 N Σ_l in_l out_l`` multiply-adds, which is the minimum for any Gauss-Newton product. The
contractions with ``M`` take one of two forms:

* *factored* layers, ``M_l[n] = B_l diag(d_l[n])`` with a constant ``B_l`` (the last layer, where
  ``d_l = 1``; and a layer followed by an elementwise activation and a layer of constant ``M``):
  the contraction is a plain ``(N, out_l) × (out_l, K)`` matmul, and nothing per-sample is stored;
* *stored* layers: ``M_l`` is kept as ``(N, K, out_l)`` and contracted by batched products.

Output columns that no layer reaches (a free log-std) are dropped from every contraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass
class LinearCall:
    """One call of an ``nn.Linear`` during the forward pass: its input ``h`` and output ``z``."""

    name: str
    h: Tensor
    z: Tensor


class LinearRecorder:
    """Context manager recording, in call order, every call of a plain ``nn.Linear`` in
    ``module`` (subclasses are skipped: their forward may differ)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.calls: list[LinearCall] = []
        self._handles: list = []

    def __enter__(self) -> LinearRecorder:
        for name, m in self.module.named_modules():
            if type(m) is nn.Linear:
                self._handles.append(m.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def record(_module: nn.Module, args: tuple, output: Tensor) -> None:
            h = args[0] if args else None
            self.calls.append(LinearCall(name, h, output))

        return record

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


def _prefixed(name: str, attr: str) -> str:
    return f"{name}.{attr}" if name else attr


def linear_layers(
    module: nn.Module, selected: list[str], calls: list[LinearCall]
) -> list[tuple[LinearCall, str | None, str | None]] | None:
    """The called Linear layers that own selected parameters, as ``(call, weight name, bias
    name)`` (a name is ``None`` when that parameter is not selected); ``None`` when the chain-rule
    formulas above may not hold: a BatchNorm (samples interact), a selected layer called more than
    once or on a non-2-D input, or a selected parameter shared with another module."""
    if any(isinstance(m, _BatchNorm) for m in module.modules()):
        return None
    owners: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    params = dict(module.named_parameters())
    wanted = set(selected)
    count: dict[str, int] = {}
    for call in calls:
        count[call.name] = count.get(call.name, 0) + 1
    layers = []
    for call in calls:
        names = [_prefixed(call.name, a) for a in ("weight", "bias")]
        names = [n if n in wanted else None for n in names]
        if not any(names):
            continue
        if count[call.name] > 1 or call.h is None or call.h.ndim != 2 or call.z.ndim != 2:
            return None
        if any(owners[id(params[n])] > 1 for n in names if n is not None):
            return None
        layers.append((call, *names))
    return layers


BMM_MIN = 1024  # per-sample block size K·S from which batched matmuls beat multiply-and-sum


def _close(diff: Tensor, ref: Tensor) -> bool:
    """``|diff| ≤ 64 ε |ref|`` in the max norm: equal up to rounding."""
    inf = float("inf")
    scale = 64 * torch.finfo(ref.dtype).eps * torch.linalg.vector_norm(ref, inf)
    return bool(torch.linalg.vector_norm(diff, inf) <= scale)


def _constant(m: Tensor) -> bool:
    """Whether ``m`` of shape ``(K, N, S)`` is the same for every sample (up to rounding)."""
    first = m[:, :1]
    return _close(m[:, -1:] - first, first) and _close(m - first, first)


class LinearJacobian:
    """``J v`` and ``Jᵀ w`` restricted to the selected weights and biases of Linear layers.

    Built from the graph of one forward pass (``out`` and the recorded calls); keeps only
    detached tensors, so the graph can be freed afterwards.
    """

    def __init__(
        self,
        out: Tensor,
        layers: list[tuple[LinearCall, str | None, str | None]],
        calls: list[LinearCall],
    ) -> None:
        n, k = out.shape
        self.n, self.k = n, k
        zs = [c.z for c, _, _ in layers]
        # the input of the Linear called next: a candidate for the factored form
        position = {id(c): i for i, c in enumerate(calls)}
        after = [position[id(c)] + 1 for c, _, _ in layers]
        nexts = [calls[i].h if i < len(calls) else None for i in after]
        nexts = [t if t is not None and t.requires_grad else None for t in nexts]
        targets = zs + [t for t in nexts if t is not None]
        # ∂out/∂t for every target by one batched backward with one-hot output cotangents
        eye = torch.eye(k, dtype=out.dtype, device=out.device).unsqueeze(1).expand(k, n, k)
        grads = torch.autograd.grad(
            out, targets, eye, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        grads = [
            t.new_zeros(k, *t.shape) if g is None else g
            for g, t in zip(grads, targets, strict=True)
        ]
        ms = grads[: len(zs)]  # (K, N, out_l) each
        reached = torch.stack([m.flatten(1).any(1) for m in ms]).any(0)
        self.keep = None if bool(reached.all()) else reached.nonzero().squeeze(1)
        if self.keep is not None:
            grads = [g[self.keep] for g in grads]
            ms = grads[: len(zs)]
        gnext = iter(grads[len(zs) :])

        factors = []
        for m, z, t in zip(ms, zs, nexts, strict=True):
            g = next(gnext) if t is not None else None
            factors.append(self._factor(m, z, t, g))
        # factored layers first, so that each group is one contiguous block of columns
        order = sorted(range(len(layers)), key=lambda i: factors[i] is None)
        self.h = [layers[i][0].h.detach() for i in order]
        self.sizes = [layers[i][0].z.shape[1] for i in order]
        self.weights = [layers[i][1] for i in order]
        self.biases = [layers[i][2] for i in order]
        fac = [(factors[i], self.sizes[j]) for j, i in enumerate(order) if factors[i] is not None]
        self.width = sum(s for _, s in fac)  # of the factored block
        self.b = torch.cat([f[0] for f, _ in fac], 1) if fac else None  # (K', S_f)
        self.d = (
            torch.cat([f[1] if f[1] is not None else f[0].new_ones(n, s) for f, s in fac], 1)
            if any(f[1] is not None for f, _ in fac)
            else None
        )  # (N, S_f), or None when every factored layer is constant
        stored = [ms[i] for i in order if factors[i] is None]
        self.m = torch.cat(stored, 2).permute(1, 0, 2).contiguous() if stored else None
        # batched matmuls pay a fixed cost per sample: for small per-sample blocks a
        # multiply-and-sum is faster; both layouts of M are then the fast ones
        self.bmm = self.m is not None and self.m[0].numel() >= BMM_MIN
        self.mt = self.m.transpose(1, 2).contiguous() if self.bmm else None

    @staticmethod
    def _factor(
        m: Tensor, z: Tensor, t: Tensor | None, g: Tensor | None
    ) -> tuple[Tensor, Tensor | None] | None:
        """``(B, d)`` with ``M[:, n] = B diag(d[n])`` (``d = None``: constant), or ``None``."""
        if _constant(m):
            return m[:, 0], None
        if t is None or t.shape != z.shape or not _constant(g):
            return None
        (d,) = torch.autograd.grad(t, z, torch.ones_like(t), retain_graph=True, allow_unused=True)
        if d is None:
            return None
        b = g[:, 0]
        if not _close(torch.addcmul(m, b.unsqueeze(1), d, value=-1), m):
            return None  # not an elementwise link from z to the next layer's input
        return b, d.detach()

    def jv(self, vs: dict[str, Tensor]) -> Tensor:
        """``J v`` of shape ``(N, K)``, ``vs`` holding the selected weights' and biases' parts."""
        a = []
        for h, w, b, s in zip(self.h, self.weights, self.biases, self.sizes, strict=True):
            if w is None:
                a.append(vs[b].expand(self.n, s))
            elif b is None:
                a.append(h @ vs[w].T)
            else:
                a.append(torch.addmm(vs[b], h, vs[w].T))
        a = torch.cat(a, 1)
        jv = None
        if self.b is not None:
            a_fac = a[:, : self.width]
            jv = (a_fac if self.d is None else a_fac * self.d) @ self.b.T
        if self.m is not None:
            a_sto = a[:, self.width :]
            if self.bmm:
                js = torch.bmm(a_sto.unsqueeze(1), self.mt).squeeze(1)
            else:
                js = (self.m * a_sto.unsqueeze(1)).sum(2)
            jv = js if jv is None else jv + js
        if self.keep is None:
            return jv
        full = jv.new_zeros(self.n, self.k)
        full[:, self.keep] = jv
        return full

    def jtw(self, w: Tensor) -> dict[str, Tensor]:
        """``Jᵀ w`` for an output-space ``w`` of shape ``(N, K)``, per selected parameter."""
        if self.keep is not None:
            w = w[:, self.keep]
        deltas = []
        if self.b is not None:
            delta = w @ self.b
            deltas.append(delta if self.d is None else delta * self.d)
        if self.m is not None:
            if self.bmm:
                deltas.append(torch.bmm(w.unsqueeze(1), self.m).squeeze(1))
            else:
                deltas.append((self.m * w.unsqueeze(2)).sum(1))
        deltas = torch.cat(deltas, 1).split(self.sizes, 1)
        grads = {}
        for h, wn, bn, delta in zip(self.h, self.weights, self.biases, deltas, strict=True):
            if wn is not None:
                grads[wn] = delta.T @ h
            if bn is not None:
                grads[bn] = delta.sum(0)
        return grads
