"""The empirical Fisher: outer products of per-sample gradients of the *observed* labels.

This is not the Fisher. It uses the data's labels instead of the model's, so it changes with the
residuals and can be far from the true Fisher away from a perfect fit (Kunstner et al., 2019). It
is also not the outer product of the batch-mean gradient: that matrix has rank one.
"""

from __future__ import annotations

from torch import Tensor

from npg.fisher._per_sample import OuterProductFisher, output_scores, per_sample_grads


class EmpiricalFisher(OuterProductFisher):
    """``(1/N) Σ_i ∇log p(y_i|x_i) ∇log p(y_i|x_i)ᵀ`` with the observed targets ``y``."""

    def __init__(self, model, inputs, family, targets: Tensor, params=None, param_dict=None):
        super().__init__(model, inputs, family, params, param_dict)
        out = self._checked_output(self.fmodel(self.fmodel.detached_params(), inputs).detach())
        w = output_scores(self.family, out, targets).unsqueeze(1)  # (N, 1, K)
        self._set_gradients(per_sample_grads(self.fmodel, inputs, w))
