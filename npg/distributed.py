"""Data-parallel Fisher operators on ``torch.distributed``.

Each process holds a shard of the batch and builds its usual Fisher operator on it. Because every
flavour is a *mean* over samples, the operator of the concatenated batch is the batch-size
weighted mean of the shard operators::

    F = Σ_r (n_r / N) F_r,        N = Σ_r n_r.

:class:`DataParallelFisher` wraps a local operator and realises that identity:

* products (exact, Monte-Carlo, empirical) are computed locally and all-reduced with the weight
  ``n_r / N`` -- one all-reduce per product (per block of columns for a matrix);
* the diagonal approximation's ``diag`` and K-FAC's factors ``A``, ``G`` and non-layer diagonal
  blocks are all-reduced **once**, at construction, in place on the wrapped operator, whose cached
  eigendecompositions and inverses are dropped; after that its products and inverses need no
  communication;
* EKFAC is refused: its eigenvalue correction needs per-sample statistics in the eigenbasis of the
  *reduced* factors, and the operator keeps only the ones of its local eigenbasis.

Monte-Carlo labels: :func:`make_fisher` seeds rank ``r`` with ``seed + r``, so every shard draws
its own labels. The result then equals the one-process operator built from *those same per-shard
samples* (not ``make_fisher("mc", ..., seed=seed)`` on the concatenated batch, which draws a
different sequence). Exact, empirical, exact/empirical diagonal and K-FAC with exact/empirical
labels equal the one-process operator on the concatenated batch outright.

All collectives run on ``group`` (default: the world); every rank must make the same calls in the
same order, as usual for ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from typing_extensions import override

from npg.fisher import DiagonalFisher, FisherOperator, KFACFisher
from npg.fisher.base import DirectlyInvertible
from npg.likelihood import loss_identity
from npg.model import batch_size
from npg.optim import NGD

ProcessGroup = dist.ProcessGroup | None


def world_info(group: ProcessGroup = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def global_batch_size(n_local: int, group: ProcessGroup = None, device=None) -> int:
    """``Σ_r n_r`` over the ranks of ``group`` (``n_local`` itself without a process group)."""
    if world_info(group)[1] == 1:
        return int(n_local)
    t = torch.tensor([int(n_local)], dtype=torch.int64, device=device)
    dist.all_reduce(t, group=group)
    return int(t.item())


def all_reduce_mean(
    t: Tensor, n_local: int, n_global: int | None = None, group: ProcessGroup = None
) -> Tensor:
    """The batch-weighted mean ``Σ_r (n_r/N) t_r`` of per-shard means ``t_r`` (a new tensor).

    ``n_global`` saves one collective when the global batch size is already known.
    """
    if world_info(group)[1] == 1:
        return t.clone()
    if n_global is None:
        n_global = global_batch_size(n_local, group, t.device)
    out = t * (n_local / n_global)
    dist.all_reduce(out, group=group)
    return out


def all_reduce_grad(
    grads: Tensor | Iterable[Tensor] | nn.Module,
    n_local: int,
    group: ProcessGroup = None,
) -> Tensor | list[Tensor]:
    """All-reduce gradients of per-shard *mean* losses into the gradient of the global mean.

    Accepts a flat gradient (returns the reduced copy), a list of tensors (returns reduced
    copies), or an ``nn.Module``, whose ``.grad`` fields are reduced **in place** (and returned).
    Unlike DDP's plain average, the weighting ``n_r / N`` is exact for unequal shards.
    """
    if isinstance(grads, Tensor):
        return all_reduce_mean(grads, n_local, group=group)
    if isinstance(grads, nn.Module):
        targets = [p.grad for p in grads.parameters() if p.grad is not None]
        if not targets:
            return []
        flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in targets]), n_local, group=group)
        for g, r in zip(targets, flat.split([g.numel() for g in targets]), strict=True):
            g.copy_(r.view_as(g))
        return targets
    tensors = list(grads)
    if not tensors:
        return []
    flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in tensors]), n_local, group=group)
    return [
        r.view_as(g).clone()
        for g, r in zip(tensors, flat.split([g.numel() for g in tensors]), strict=True)
    ]


class DataParallelFisher(FisherOperator):
    """The Fisher of the concatenated batch, from one process's operator on its shard.

    ``n`` is the *global* batch size; ``local`` the wrapped operator (``local.n`` its shard size).
    For the diagonal and K-FAC flavours the wrapped operator itself is reduced in place at
    construction and afterwards *is* the global operator. Every rank must construct the wrapper
    (a collective) and call the product methods the same number of times.
    """

    def __init__(self, op: FisherOperator, group: ProcessGroup = None) -> None:
        # Deliberately no super().__init__: the model, family and batch are the local operator's.
        if isinstance(op, DataParallelFisher):
            raise TypeError("operator is already data-parallel")
        if isinstance(op, KFACFisher) and op.ekfac:
            raise NotImplementedError(
                "EKFAC is not supported data-parallel: its eigenvalue correction needs the "
                "per-sample statistics in the eigenbasis of the all-reduced factors, which the "
                "local operator does not keep. Use 'kfac' (with inverse='eigen' if wanted)."
            )
        self.local = op
        self.group = group
        self.rank, self.world_size = world_info(group)
        self.fmodel, self.family, self.inputs = op.fmodel, op.family, op.inputs
        self.dim, self.dtype, self.device = op.dim, op.dtype, op.device
        self.n_local = op.n
        self.n = global_batch_size(op.n, group, op.device)
        self._weight = self.n_local / self.n
        self.reduced = isinstance(op, (DiagonalFisher, KFACFisher))
        self.direct = self.reduced  # the reduced operator keeps its closed-form inverse
        if isinstance(op, DiagonalFisher):
            op.diag = self._reduce(op.diag)
        elif isinstance(op, KFACFisher):
            self._reduce_kfac(op)
        elif isinstance(op, DirectlyInvertible):
            raise TypeError(
                f"{type(op).__name__}: don't know which statistics to all-reduce; "
                "only DiagonalFisher and KFACFisher are supported among direct inverses"
            )

    # --- reductions ------------------------------------------------------------------------------
    def _reduce(self, t: Tensor) -> Tensor:
        """``Σ_r (n_r/N) t_r``; a no-op copy on one process."""
        return all_reduce_mean(t, self.n_local, self.n, self.group)

    def _reduce_kfac(self, op: KFACFisher) -> None:
        """All-reduce every Kronecker factor and diagonal block in one flat collective."""
        pieces = [t for b in op.blocks for t in (b.A, b.G)] + list(op.diag_values)
        if pieces:
            flat = self._reduce(torch.cat([p.reshape(-1) for p in pieces]))
            out = [
                r.view_as(p)
                for p, r in zip(pieces, flat.split([p.numel() for p in pieces]), strict=True)
            ]
            for i, b in enumerate(op.blocks):
                b.A, b.G = out[2 * i], out[2 * i + 1]
            op.diag_values = tuple(out[2 * len(op.blocks) :])
        op._inverse_cache.clear()  # inverses of the local factors (eigenbases refresh themselves)

    # --- products --------------------------------------------------------------------------------
    def _mv(self, v: Tensor) -> Tensor:
        if self.reduced:
            return self.local._mv(v)
        return self._reduce(self.local._mv(v))

    def mv(self, v: Tensor) -> Tensor:
        """``F v`` (or ``F V`` column-wise) with one all-reduce for the whole block."""
        if self.reduced:
            return self.local.mv(v)
        return self._reduce(self.local.mv(v))

    @override
    def to_dense(self) -> Tensor:
        if self.reduced:
            return self.local.to_dense()
        return self._reduce(self.local.to_dense())

    @override
    def diagonal(self) -> Tensor:
        if self.reduced:
            return self.local.diagonal()
        return self._reduce(self.local.diagonal())

    def inverse_mv(self, g: Tensor, damping: float = 0.0) -> Tensor:
        """Closed-form ``(F + λI)⁻¹ g`` of the reduced diagonal / K-FAC operator."""
        if not self.reduced:
            raise TypeError(f"{type(self.local).__name__} has no closed-form inverse; use solve")
        return self.local.inverse_mv(g, damping)

    def solve(self, g: Tensor, damping: float = 0.0, **cg_options) -> Tensor:
        """Direct solve for diagonal / K-FAC, else CG with all-reduced products.

        ``g`` must be the same on every rank (all-reduce it first, e.g. with
        :func:`all_reduce_grad`); CG then runs in lockstep on identical iterates.
        """
        if self.reduced:
            return self.local.inverse_mv(g, damping)
        return super().solve(g, damping, **cg_options)

    def __getattr__(self, name: str):
        # Only reached for attributes not found normally: expose the reduced local operator's
        # (e.g. K-FAC ``blocks``, the diagonal's ``diag``).
        if name == "local":
            raise AttributeError(name)
        return getattr(self.local, name)

    def __repr__(self) -> str:
        return (
            f"DataParallelFisher({self.local!r}, n_local={self.n_local}, n={self.n}, "
            f"world_size={self.world_size})"
        )


class DistributedNGD(NGD):
    """:class:`npg.optim.NGD` for data-parallel training (DDP under ``torchrun``).

    Every Fisher the optimizer builds on this rank's batch is wrapped in
    :class:`DataParallelFisher` (K-FAC factors all-reduced before they enter the running
    averages), Monte-Carlo labels are drawn with a per-rank seed, and the losses the adaptive
    damping compares are all-reduced -- so every rank computes the same step and the replicas
    stay identical. The gradient must already be the global one: DDP's average (exact when the
    shards have equal size, as with ``DistributedSampler``), or :func:`all_reduce_grad`.

    Pass the *inner* module (``ddp.module``) as ``model=`` and its parameters; compute the
    closure's loss through the DDP wrapper so that ``backward`` all-reduces the gradient.
    ``step`` returns the global mean loss. Losses must be mean-reduced; EKFAC is unsupported
    (see :class:`DataParallelFisher`).

    Extra args: ``group`` (process group, default: the world); ``rank_seed_stride``: rank
    ``r`` samples with ``seed + step + r·stride``.
    """

    def __init__(
        self, params, *, group: ProcessGroup = None, rank_seed_stride: int = 1 << 20, **kwargs
    ) -> None:
        super().__init__(params, **kwargs)
        if self.fisher == "ekfac":
            raise NotImplementedError("DistributedNGD: EKFAC is not supported data-parallel")
        if self.loss_fn is not None and loss_identity(self.loss_fn)[1].get("reduction") == "sum":
            raise ValueError("DistributedNGD needs a mean-reduced loss (reduction='mean')")
        self.group = group
        self.rank, self.world_size = world_info(group)
        self.rank_seed_stride = int(rank_seed_stride)

    def _rank_seed(self, seed: int) -> int:
        return seed + self.rank * self.rank_seed_stride

    def _fisher_operator(self, name, inputs, targets, family, seed):
        """:meth:`NGD._fisher_operator` on this rank's shard with this rank's label seed,
        all-reduced into the operator of the global batch."""
        local = super()._fisher_operator(name, inputs, targets, family, self._rank_seed(seed))
        return DataParallelFisher(local, self.group)

    def _global_loss(self, loss: Tensor, inputs) -> Tensor:
        return all_reduce_mean(loss.detach(), batch_size(inputs), group=self.group)

    def step(self, closure=None, *, inputs=None, targets=None):  # type: ignore[override]
        """:meth:`NGD.step`; the returned loss is the mean over the global batch."""
        batch = inputs if inputs is not None else self._batch[0]
        wrapped = closure
        if closure is not None and batch is not None:

            def wrapped() -> Tensor:
                return self._global_loss(closure(), batch)

        return super().step(wrapped, inputs=inputs, targets=targets)

    def _reevaluate(self, closure, inputs, targets) -> Tensor:
        loss = super()._reevaluate(closure, inputs, targets)
        if self.loss_fn is not None and targets is not None:  # else: the wrapped closure's
            loss = self._global_loss(loss, inputs)
        return loss


def all_reduce_fisher(op: FisherOperator, group: ProcessGroup = None) -> DataParallelFisher:
    """Wrap ``op`` (built on this rank's shard) as the operator of the global batch."""
    return DataParallelFisher(op, group)


def make_fisher(
    name: str, model, inputs, family, *, seed: int = 0, group: ProcessGroup = None, **kwargs
) -> DataParallelFisher:
    """``npg.make_fisher`` on this rank's shard, all-reduced; rank ``r`` samples with ``seed + r``.

    Other keyword arguments go to :func:`npg.make_fisher` unchanged.
    """
    from npg import make_fisher as _make_fisher

    rank, _ = world_info(group)
    op = _make_fisher(name, model, inputs, family, seed=seed + rank, **kwargs)
    return DataParallelFisher(op, group)


__all__ = [
    "DataParallelFisher",
    "DistributedNGD",
    "all_reduce_fisher",
    "all_reduce_grad",
    "all_reduce_mean",
    "global_batch_size",
    "make_fisher",
    "world_info",
]
