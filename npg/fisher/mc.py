"""The Monte-Carlo Fisher: outer products of per-sample gradients of labels drawn from the model."""

from __future__ import annotations

import torch

from npg.fisher._per_sample import OuterProductFisher, per_sample_grads, sampled_scores


class MCFisher(OuterProductFisher):
    """``(1/(N·S)) Σ_i Σ_s ∇log p(ŷ_is|x_i) ∇log p(ŷ_is|x_i)ᵀ`` with ``ŷ_is ~ p(·|x_i)``.

    An unbiased estimate of the true Fisher. Labels are drawn once, in the constructor, from a
    generator seeded with ``seed``: the operator is a fixed matrix, which CG requires.
    """

    def __init__(
        self,
        model,
        inputs,
        family,
        n_samples: int = 1,
        seed: int = 0,
        params=None,
        param_dict=None,
    ):
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        super().__init__(model, inputs, family, params, param_dict)
        out = self._checked_output(self.fmodel(self.fmodel.detached_params(), inputs).detach())
        gen = torch.Generator(device=out.device).manual_seed(seed)
        w = sampled_scores(self.family, out, n_samples, gen)  # (N, S, K)
        self._set_gradients(per_sample_grads(self.fmodel, inputs, w))
        self.n_samples = n_samples
