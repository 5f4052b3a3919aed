"""Products agree with curvlinops' operators where both exist.

Conventions. npg's Fisher is the *mean over the batch* of the Fisher of ``log p``:
``F = (1/N) Σ_i J_iᵀ F_out J_i``. curvlinops' GGN of a loss with ``reduction='mean'`` is
``(1/N) Σ_i J_iᵀ ∇²_f ℓ_i J_i`` where ``ℓ_i`` is what the loss averages:

* ``CrossEntropyLoss``: ``ℓ_i = -log softmax(f_i)[y_i]``, ``∇²ℓ_i = diag(p) - p pᵀ`` = Categorical.
* ``MSELoss``: the mean runs over ``N·C`` entries, ``ℓ_i = (1/C) ‖f_i - y_i‖²``,
  ``∇²ℓ_i = (2/C) I``;
  ``GaussianRegression(σ)`` has ``F_out = I/σ²``. With ``σ = 1/√2`` (``F_out = 2I``) npg's Fisher
  is ``C`` times curvlinops' GGN (equivalently ``σ = √(C/2)`` matches it exactly).
* ``BCEWithLogitsLoss``: also a mean over ``N·C`` entries, ``∇²ℓ_i = (1/C) diag(p(1-p))``:
  npg's Bernoulli Fisher is ``C`` times curvlinops' GGN.

The empirical Fisher (``EFLinearOperator``) scales the same way: gradients of the per-entry loss
are ``C`` times those of the per-datum mean, and curvlinops divides by ``N·C`` instead of ``N``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, make_case, torch_sample
from torch import Tensor, nn

from npg import make_fisher
from npg.families import Bernoulli, Categorical, Family, GaussianRegression

pytestmark = pytest.mark.usefixtures("float64")

curvlinops = pytest.importorskip("curvlinops")


def _loss_and_targets(family: Family, out: Tensor, k: int) -> tuple[nn.Module, Tensor, float]:
    """curvlinops' loss, targets in its format, and ``npg Fisher / curvlinops GGN``."""
    if isinstance(family, Categorical):
        return nn.CrossEntropyLoss(), torch_sample(family, out, 1), 1.0
    if isinstance(family, Bernoulli):
        return nn.BCEWithLogitsLoss(), torch_sample(family, out, 1), float(k)
    assert isinstance(family, GaussianRegression) and math.isclose(family.sigma, 2**-0.5)
    return nn.MSELoss(), torch_sample(family, out, 1), float(k)


def _dense(op) -> Tensor:
    return op @ torch.eye(op.shape[1])


CASES = [
    ("mlp_tanh", Categorical()),
    ("conv", Categorical()),
    ("mlp_relu", Bernoulli()),
    ("conv", Bernoulli()),
    ("mlp_tanh", GaussianRegression(2**-0.5)),
    ("conv", GaussianRegression(2**-0.5)),
]


def _case(arch: str, family: Family):
    fid = {"Categorical": "categorical", "Bernoulli": "bernoulli"}.get(
        type(family).__name__, "regression"
    )
    model, x, _ = make_case(arch, fid, n=6)
    return model, x


@pytest.mark.parametrize(("arch", "family"), CASES, ids=lambda c: str(c))
def test_ggn_and_empirical_fisher_match_curvlinops(arch: str, family: Family) -> None:
    model, x = _case(arch, family)
    out = model(x).detach()
    loss, y, factor = _loss_and_targets(family, out, out.shape[1])
    params = list(model.parameters())
    data = [(x, y)]
    ggn = curvlinops.GGNLinearOperator(model, loss, params, data, check_deterministic=False)
    ef = curvlinops.EFLinearOperator(model, loss, params, data, check_deterministic=False)
    ours = make_fisher("exact", model, x, family)
    v = torch.randn(ours.dim, generator=torch.Generator().manual_seed(0))
    assert_close(ours.mv(v), factor * (ggn @ v))
    assert_close(ours.to_dense(), factor * _dense(ggn))
    emp = make_fisher("empirical", model, x, family, targets=y)
    assert_close(emp.mv(v), factor * (ef @ v))
    assert_close(emp.to_dense(), factor * _dense(ef))
    if isinstance(family, GaussianRegression):
        # the other way round: sigma = sqrt(C/2) is curvlinops' MSE GGN with no factor
        same = make_fisher("exact", model, x, GaussianRegression(math.sqrt(out.shape[1] / 2)))
        assert_close(same.mv(v), ggn @ v)


@pytest.mark.parametrize(("arch", "family"), CASES, ids=lambda c: str(c))
def test_kfac_type2_matches_curvlinops(arch: str, family: Family) -> None:
    model, x = _case(arch, family)
    out = model(x).detach()
    loss, y, factor = _loss_and_targets(family, out, out.shape[1])
    params = list(model.parameters())
    their = curvlinops.KFACLinearOperator(
        model,
        loss,
        params,
        [(x, y)],
        check_deterministic=False,
        fisher_type=curvlinops.FisherType.TYPE2,
        separate_weight_and_bias=False,
    )
    ours = make_fisher("kfac", model, x, family)
    v = torch.randn(ours.dim, generator=torch.Generator().manual_seed(0))
    assert_close(ours.mv(v), factor * (their @ v))
    assert_close(ours.to_dense(), factor * _dense(their))


@pytest.mark.parametrize("arch", ["mlp_relu", "conv"])
def test_kfac_empirical_and_ekfac_match_curvlinops(arch: str) -> None:
    model, x = _case(arch, Categorical())
    y = torch_sample(Categorical(), model(x), 4)
    params = list(model.parameters())
    kw = dict(check_deterministic=False, separate_weight_and_bias=False)
    their = curvlinops.KFACLinearOperator(
        model, nn.CrossEntropyLoss(), params, [(x, y)], fisher_type="empirical", **kw
    )
    ours = make_fisher("kfac", model, x, Categorical(), kfac_labels="empirical", targets=y)
    assert_close(ours.to_dense(), _dense(their))
    their_e = curvlinops.EKFACLinearOperator(
        model, nn.CrossEntropyLoss(), params, [(x, y)], fisher_type="type-2", **kw
    )
    ours_e = make_fisher("ekfac", model, x, Categorical())
    assert_close(ours_e.to_dense(), _dense(their_e), rtol=1e-6, atol=1e-9)
