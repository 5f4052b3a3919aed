"""The likelihood behind a supervised loss, and how the loss's curvature relates to its Fisher.

``infer_likelihood(nn.CrossEntropyLoss())`` is the family whose negative log-likelihood the loss
is, with the scale ``s`` such that the loss's generalized Gauss-Newton matrix is ``s·F``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import nn

from npg.families import Bernoulli, Categorical, Family, GaussianRegression

SUPPORTED_LOSSES = (
    "nn.CrossEntropyLoss / F.cross_entropy (Categorical)",
    "nn.NLLLoss / F.nll_loss on log-probabilities (Categorical)",
    "nn.BCEWithLogitsLoss / F.binary_cross_entropy_with_logits (Bernoulli)",
    "nn.MSELoss / F.mse_loss (Gaussian)",
)


@dataclass(frozen=True)
class Likelihood:
    """The likelihood family behind a loss and how the loss's curvature relates to its Fisher.

    Attributes:
        family: the :class:`~npg.families.Family` whose mean Fisher ``F`` the operators build.
        reduction: ``"mean"`` or ``"sum"`` over the batch.
        per_output_scale: ``s`` for a mean-reduced loss (``1/K`` for BCE over ``K`` outputs,
            ``1`` otherwise); a sum-reduced loss has ``s = N``.
        loss_name: the loss this was inferred from (for messages), or ``"family"``.
    """

    family: Family
    reduction: str
    per_output_scale: float = 1.0
    loss_name: str = "family"

    def scale(self, batch_size: int) -> float:
        """``s`` with ``GGN(loss) = s · F`` for a batch of ``batch_size`` samples."""
        return float(batch_size) if self.reduction == "sum" else self.per_output_scale


def loss_identity(loss_fn: Any) -> tuple[str, dict[str, Any]]:
    """A canonical loss name and its keyword options, for modules, functions and partials."""
    modules = {
        nn.CrossEntropyLoss: "cross_entropy",
        nn.NLLLoss: "nll",
        nn.BCEWithLogitsLoss: "bce_with_logits",
        nn.MSELoss: "mse",
    }
    for cls, name in modules.items():
        if type(loss_fn) is cls:
            opts = {"reduction": loss_fn.reduction}
            for attr in ("weight", "pos_weight", "label_smoothing"):
                opts[attr] = getattr(loss_fn, attr, None)
            return name, opts
    if isinstance(loss_fn, functools.partial):
        name, opts = loss_identity(loss_fn.func)
        return name, {**opts, **loss_fn.keywords}
    functions = {
        F.cross_entropy: "cross_entropy",
        F.nll_loss: "nll",
        F.binary_cross_entropy_with_logits: "bce_with_logits",
        F.mse_loss: "mse",
    }
    for fn, name in functions.items():
        if loss_fn is fn:
            return name, {"reduction": "mean"}
    label = getattr(loss_fn, "__name__", None) or type(loss_fn).__name__
    raise ValueError(
        f"NGD cannot map the loss {label!r} to a likelihood; supported losses: "
        f"{'; '.join(SUPPORTED_LOSSES)}. Otherwise pass family= explicitly."
    )


def infer_likelihood(loss_fn: Any, out_dim: int | None = None) -> Likelihood:
    """The likelihood whose negative log is ``loss_fn`` (up to constants and a scale).

    ``out_dim`` (the model's output width ``K``) is needed for ``MSELoss`` with mean reduction,
    whose Gaussian has ``σ = √(K/2)`` so that its mean Fisher equals the loss's Gauss-Newton
    matrix ``(2/(N·K)) Σ_i J_iᵀJ_i``. Raises ``ValueError`` naming the loss for anything else
    (other losses, ``reduction="none"``, class weights, label smoothing).
    """
    name, opts = loss_identity(loss_fn)
    reduction = opts.get("reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"NGD needs a scalar loss; {name} has reduction={reduction!r}")
    for attr in ("weight", "pos_weight"):
        if opts.get(attr) is not None:
            raise ValueError(f"NGD: {name} with {attr}= is not a likelihood it supports")
    if opts.get("label_smoothing"):
        raise ValueError(f"NGD: {name} with label_smoothing is not a likelihood it supports")
    if name in ("cross_entropy", "nll"):
        return Likelihood(Categorical(), reduction, 1.0, name)
    if name == "bce_with_logits":
        if reduction == "mean" and out_dim is None:
            raise ValueError("BCEWithLogitsLoss with mean reduction needs the output width")
        return Likelihood(Bernoulli(), reduction, 1.0 / (out_dim or 1), name)
    # MSE: loss = c Σ_ik (y - out)²  with c = 1/(NK) (mean) or 1 (sum).
    if reduction == "sum":
        return Likelihood(GaussianRegression(math.sqrt(0.5)), "sum", 1.0, name)
    if out_dim is None:
        raise ValueError("MSELoss with mean reduction needs the output width")
    return Likelihood(GaussianRegression(math.sqrt(out_dim / 2.0)), "mean", 1.0, name)
