"""Running-average K-FAC curvature: the factors' exponential averages and the blocks' inverses.

Shared by :class:`npg.optim.NGD` (and through it K-FAC NAC and
:class:`npg.KFACPreconditioner`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from npg.fisher import KFACFisher
from npg.fisher.kfac import KroneckerBlock, block_diagonal_mv, inverse_from_state, inverse_state


class RunningKFAC:
    """Exponential moving averages of K-FAC factors with inverses refreshed on demand.

    ``params`` are the optimised parameters in the optimizer's (flat-vector) order; the blocks
    are mapped to them once, so a step works on the per-parameter gradients directly.
    """

    def __init__(self, inverse: str, params: list[Tensor]) -> None:
        self.inverse = inverse
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        starts = itertools.accumulate(self.numels, initial=0)
        self._index = {start: i for i, start in enumerate(starts)}  # flat offset -> parameter
        self.blocks: list[KroneckerBlock] = []
        self.layout: list[tuple[int, int | None]] = []  # per block: weight, bias parameter
        self.diag_slices: list[slice] = []
        self.diag_index: list[int] = []
        self.diag_values: list[Tensor] = []
        self.inverse_damping: float | None = None  # of the blocks' current inverses

    def _attach(self, blocks: list[KroneckerBlock], diag_slices: list[slice]) -> None:
        self.blocks, self.diag_slices = blocks, list(diag_slices)
        self.layout = [
            (self._index[b.weight.start], None if b.bias is None else self._index[b.bias.start])
            for b in blocks
        ]
        self.diag_index = [self._index[s.start] for s in self.diag_slices]

    def update(self, fisher: KFACFisher, decay: float) -> None:
        """Fold one batch's factors into the averages (the first batch initialises them)."""
        if not self.blocks:
            blocks = [
                KroneckerBlock(b.module, b.weight, b.bias, b.A.clone(), b.G.clone())
                for b in fisher.blocks
            ]
            self._attach(blocks, fisher.diag_slices)
            self.diag_values = [d.clone() for d in fisher.diag_values]
            return
        self.fold([(b.A, b.G) for b in fisher.blocks], fisher.diag_values, decay)

    def fold(
        self, factors: Sequence[tuple[Tensor, Tensor]], diag: Sequence[Tensor], decay: float
    ) -> None:
        """Fold one batch's ``(A, G)`` per block and diagonal blocks into the averages, in
        place and in one op for all factors: ``F̂ ← decay·F̂ + (1 - decay)·F_batch``."""
        mine = [t for b in self.blocks for t in (b.A, b.G)] + self.diag_values
        new = [t for pair in factors for t in pair] + list(diag)
        torch._foreach_lerp_(mine, new, 1 - decay)

    def closure_layers(self) -> list[tuple[nn.Module, bool]] | None:
        """``(module, with_bias)`` per block when every parameter is in a Kronecker block (the
        factors can then come from the closure's forward pass), else ``None``."""
        if not self.blocks or self.diag_slices:
            return None
        return [(b.module, b.bias is not None) for b in self.blocks]

    def refresh_inverses(self, damping: float) -> None:
        """Each block inverts its current averages (and keeps them); see
        :meth:`KroneckerBlock.refresh_inverse`."""
        for b in self.blocks:
            b.refresh_inverse(damping, self.inverse)
        self.inverse_damping = damping

    def mv(self, v: Tensor) -> Tensor:
        """``F̂ v`` with the averaged factors."""
        return block_diagonal_mv(self.blocks, self.diag_slices, self.diag_values, v)

    def inverted_mv(self, v: Tensor) -> Tensor:
        """``F̂₀ v`` with the curvature the stored inverses invert (the Kronecker factors of
        their refresh; the diagonal blocks are inverted afresh at every step)."""
        inverted = [b.inverted_block() for b in self.blocks]
        return block_diagonal_mv(inverted, self.diag_slices, self.diag_values, v)

    def precondition(
        self, grads: list[Tensor], curvature: str | None
    ) -> tuple[list[Tensor], Tensor | None]:
        """``x = (F̂₀ + λI)⁻¹ g`` per parameter, for the per-parameter gradients ``grads``, with
        the stored inverses (``F̂₀`` and ``λ`` are those of their refresh); with ``curvature``
        ``"dot"`` also the ``(1,)`` tensor ``[gᵀx]``, with ``"form"`` the ``(2,)`` tensor
        ``[gᵀx, xᵀF̂₀x]`` (see :meth:`inverted_mv`), else ``None``."""
        if self.inverse_damping is None:
            raise RuntimeError("K-FAC inverses were never computed")
        form = curvature == "form"
        parts: list[Tensor] = list(grads)  # every entry is replaced below
        sums: list[Tensor] = []  # per block: gᵀx, or [gᵀx, xᵀF̂₀x]
        for block, (iw, ib) in zip(self.blocks, self.layout, strict=True):
            inv = block.inverse
            g_w = grads[iw]
            gw = g_w.reshape(g_w.shape[0], -1)  # (dG, dA without the bias)
            m = gw if ib is None else torch.cat((gw, grads[ib].unsqueeze(1)), 1)  # [W | b]
            if form:
                x, block_sums = inv.apply_with_form(m)
                sums.append(block_sums)
            else:
                x = inv.apply(m)
                if curvature:
                    sums.append(torch.dot(m.reshape(-1), x.reshape(-1)))
            x_w = x if ib is None else x[:, :-1]
            parts[iw] = x_w if x_w.shape == g_w.shape else x_w.reshape(g_w.shape)
            if ib is not None:
                parts[ib] = x[:, -1]
        for i, d in zip(self.diag_index, self.diag_values, strict=True):
            g, d = grads[i], d.view_as(grads[i])
            parts[i] = x = g / (d + self.inverse_damping)
            if curvature:
                gx = torch.sum(g * x)
                sums.append(torch.stack((gx, torch.sum(d * x * x))) if form else gx)
        if not curvature:
            return parts, None
        return parts, functools.reduce(torch.add, sums).reshape(-1)

    def solve(self, g: Tensor, damping: float) -> Tensor:
        """``(F̂ + λI)⁻¹ g`` for a flat vector (``damping`` is ignored: the stored inverses
        carry the damping of their refresh)."""
        grads = [c.view(s) for c, s in zip(g.split(self.numels), self.shapes, strict=True)]
        parts, _ = self.precondition(grads, curvature=None)
        return torch.cat([p.reshape(-1) for p in parts])

    def state(self) -> dict[str, Any]:
        """The averages and the blocks' inverses as plain tensors (``weights_only`` loadable)."""
        ready = self.inverse_damping is not None
        return {
            "A": [b.A for b in self.blocks],
            "G": [b.G for b in self.blocks],
            "diag": list(self.diag_values),
            "inverses": [inverse_state(b.inverse) for b in self.blocks] if ready else None,
            "inverted": [b.inverted for b in self.blocks] if ready else None,
            "inverse_damping": self.inverse_damping,
        }

    def load(self, state: Mapping[str, Any], fisher_template: KFACFisher) -> None:
        """Restore :meth:`state` onto the layers of ``fisher_template``."""
        blocks = [
            KroneckerBlock(b.module, b.weight, b.bias, a, g)
            for b, a, g in zip(fisher_template.blocks, state["A"], state["G"], strict=True)
        ]
        self._attach(blocks, fisher_template.diag_slices)
        self.diag_values = list(state["diag"])
        self.inverse_damping = state["inverse_damping"]
        if self.inverse_damping is not None:
            for b, inv, (a, g) in zip(blocks, state["inverses"], state["inverted"], strict=True):
                b.inverse, b.inverted = inverse_from_state(inv), (a, g)
