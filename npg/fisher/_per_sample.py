"""Per-sample gradients ``J_iᵀ w_ic`` for many output-space vectors at once (``torch.func.vmap``).

Empirical, Monte-Carlo and exact-diagonal Fishers all reduce to sums of outer products of
per-sample gradients; they differ only in the output-space vectors ``w_ic``:
the score of the observed label, the score of sampled labels, or the columns of ``√F_out``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap

from npg.families import Bernoulli, Categorical, Family, GaussianRegression
from npg.fisher.base import FisherOperator
from npg.model import FunctionalModel, Inputs


def output_scores(family: Family, out: Tensor, y: Tensor) -> Tensor:
    """``∂ log p(y_i | out_i) / ∂ out_i`` for every row, shape ``(N, K)``.

    In closed form for ``Categorical`` (``onehot(y) - softmax(out)``), ``Bernoulli``
    (``y - sigmoid(out)``) and ``GaussianRegression`` (``(y - out)/σ²``); by autograd through
    ``log_prob`` for any other family (or subclass, which may redefine ``log_prob``).
    """
    out = out.detach()
    kind = type(family)
    if kind is Categorical:
        return F.one_hot(y.long(), out.shape[-1]).to(out.dtype) - torch.softmax(out, -1)
    if kind is Bernoulli:
        return y.to(out.dtype).reshape(out.shape) - torch.sigmoid(out)
    if kind is GaussianRegression:
        return (y.to(out.dtype).reshape(out.shape) - out) / family.sigma**2
    out.requires_grad_(True)
    with torch.enable_grad():
        (score,) = torch.autograd.grad(family.log_prob(out, y).sum(), out)
    return score


def per_sample_grads(fmodel: FunctionalModel, inputs: Inputs, w: Tensor) -> Tensor:
    """Flat per-sample gradients ``g_ic = J_iᵀ w_ic``: ``w`` is ``(N, C, K)``, the result
    ``(N, C, dim)``.

    Each sample is pushed through the model on its own (a batch of one), so the result is a true
    per-sample gradient, never a piece of the batch-mean gradient.
    """
    params = fmodel.detached_params()
    tup = inputs if isinstance(inputs, tuple) else (inputs,)

    def contracted(p, w_ic, *x_i):
        out_i = fmodel(p, tuple(t.unsqueeze(0) for t in x_i)).squeeze(0)
        return (out_i * w_ic).sum()

    per_column = vmap(grad(contracted), in_dims=(None, 0) + (None,) * len(tup))  # over c
    per_sample = vmap(per_column, in_dims=(None, 0) + (0,) * len(tup))  # over i
    grads = per_sample(params, w, *tup)
    n, c = w.shape[:2]
    return torch.cat([grads[name].reshape(n, c, -1) for name in fmodel.names], -1)


def _categorical_draws(p: Tensor, generator: torch.Generator | None) -> Tensor:
    """One label per row of the probabilities ``p`` (..., K), by inverting the row's CDF ``c``
    at a uniform draw ``u`` on ``[0, c_K)``: ``y = #{k : c_k ≤ u}``, so ``P(y = k) = p_k``
    (a class of probability zero has an empty interval, also at ``u = 0``, and scaling by
    ``c_K`` absorbs a cumulative sum that rounds below 1). One uniform per row instead of
    ``torch.multinomial``'s exponential race (K exponentials per row): several times cheaper
    on small batches. The clamp only catches ``u`` rounding up to ``c_K``."""
    c = p.cumsum(-1)
    u = torch.rand(p.shape[:-1] + (1,), generator=generator, dtype=p.dtype, device=p.device)
    return (c <= u * c[..., -1:]).sum(-1).clamp_max_(p.shape[-1] - 1)


def _repeated(out: Tensor, n_samples: int) -> Tensor:
    out = out.detach()
    return out if n_samples == 1 else out.repeat(n_samples, 1)


def _draw(
    family: Family, rows: Tensor, generator: torch.Generator | None
) -> tuple[Tensor, Tensor | None]:
    """One label per row of outputs, and for ``Categorical`` the probabilities it was drawn
    from (``None`` otherwise)."""
    if type(family) is Categorical:
        p = torch.softmax(rows, -1)
        return _categorical_draws(p, generator), p
    return family.sample(rows, generator), None


def sampled_labels(
    family: Family, out: Tensor, n_samples: int, generator: torch.Generator | None
) -> Tensor:
    """The labels the Monte-Carlo Fishers draw: ``n_samples`` per row of ``out`` from one call
    on the batch repeated ``n_samples`` times (row ``s·N + i`` is draw ``s`` for sample ``i``),
    so the cost does not grow with a python loop over draws."""
    return _draw(family, _repeated(out, n_samples), generator)[0]


def sampled_scores(
    family: Family, out: Tensor, n_samples: int, generator: torch.Generator | None
) -> Tensor:
    """Output scores of the :func:`sampled_labels`, ``(N, S, K)``."""
    n, k = out.shape
    rows = _repeated(out, n_samples)
    y, p = _draw(family, rows, generator)
    if p is None:
        scores = output_scores(family, rows, y)
    else:  # onehot(y) - p, with the softmax computed once
        scores = p.neg().scatter_add_(-1, y.unsqueeze(-1), p.new_ones(y.shape + (1,)))
    return scores.reshape(n_samples, n, k).transpose(0, 1)


class OuterProductFisher(FisherOperator):
    """``F = (1/(N·C)) Σ_ic g_ic g_icᵀ`` from stored per-sample gradients ``G`` (N, C, dim).

    Storing ``G`` makes each product two matrix-vector multiplications, which is what CG wants;
    memory is ``N·C·dim`` numbers.
    """

    def _set_gradients(self, g: Tensor) -> None:
        self.grads = g.reshape(-1, self.dim)
        self._scale = 1.0 / self.grads.shape[0]

    def _mv(self, v: Tensor) -> Tensor:
        return self.grads.T @ (self.grads @ v) * self._scale

    def to_dense(self) -> Tensor:
        return self.grads.T @ self.grads * self._scale

    def diagonal(self) -> Tensor:
        return self.grads.pow(2).sum(0) * self._scale
