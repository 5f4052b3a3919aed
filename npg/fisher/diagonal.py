"""Diagonal Fisher approximations, from the exact, Monte-Carlo or empirical Fisher."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from typing_extensions import override

from npg.fisher._per_sample import output_scores, per_sample_grads, sampled_scores
from npg.fisher.base import DirectlyInvertible

VARIANTS = ("exact", "mc", "empirical")


class DiagonalFisher(DirectlyInvertible):
    """``diag(F)`` of the chosen variant, applied and inverted elementwise.

    * ``exact``: ``Σ_c (J_iᵀ S_ic)²`` with ``S_i S_iᵀ = F_out`` — the exact diagonal of the GGN,
    * ``mc``: squared per-sample gradients of ``n_samples`` labels drawn from the model,
    * ``empirical``: squared per-sample gradients of the observed ``targets``.
    """

    def __init__(
        self,
        model,
        inputs,
        family,
        variant: str = "exact",
        targets: Tensor | None = None,
        n_samples: int = 1,
        seed: int = 0,
        params=None,
        param_dict=None,
    ):
        if variant not in VARIANTS:
            raise ValueError(
                f"unknown diagonal variant {variant!r}; accepted: {', '.join(VARIANTS)}"
            )
        super().__init__(model, inputs, family, params, param_dict)
        out = self._checked_output(self.fmodel(self.fmodel.detached_params(), inputs).detach())
        if variant == "exact":
            w = self.family.fisher_out_sqrt(out).transpose(1, 2)  # (N, C, K)
            scale = 1.0 / self.n
        elif variant == "mc":
            gen = torch.Generator(device=out.device).manual_seed(seed)
            w = sampled_scores(self.family, out, n_samples, gen)
            scale = 1.0 / (self.n * n_samples)
        else:
            if targets is None:
                raise ValueError("the empirical diagonal needs targets=")
            w = output_scores(self.family, out, targets).unsqueeze(1)
            scale = 1.0 / self.n
        self.variant = variant
        self.diag = per_sample_grads(self.fmodel, inputs, w).pow(2).sum((0, 1)) * scale

    def _mv(self, v: Tensor) -> Tensor:
        return self.diag * v

    @override
    def to_dense(self) -> Tensor:
        return torch.diag(self.diag)

    @override
    def diagonal(self) -> Tensor:
        return self.diag.clone()

    @override
    def inverse_mv(self, g: Tensor, damping: float = 0.0) -> Tensor:
        if not (damping >= 0 and math.isfinite(damping)):
            raise ValueError(f"damping must be a finite float >= 0, got {damping}")
        if not bool(torch.isfinite(self.diag).all()):
            raise ValueError("diagonal Fisher has NaN/inf entries (non-finite model output?)")
        denom = self.diag + damping
        if not bool((denom > 0).all()):
            raise ValueError("diagonal Fisher has zero entries; pass damping > 0 to invert it")
        return g / denom
