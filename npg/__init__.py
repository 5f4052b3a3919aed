"""npg: Fisher-vector products, damped conjugate gradient and natural-gradient steps.

Knows nothing of RL: a model maps inputs to an ``(N, K)`` output that a :mod:`npg.families`
family reads as a distribution, and the Fisher operators are built on one batch.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from npg.cg import CGResult, conjugate_gradient
from npg.families import (
    Bernoulli,
    Categorical,
    DiagGaussian,
    Family,
    GaussianRegression,
    MultiCategorical,
    get_family,
)
from npg.fisher import (
    DiagonalFisher,
    EmpiricalFisher,
    ExactFisher,
    FisherOperator,
    KFACFisher,
    MCFisher,
)
from npg.model import FunctionalModel
from npg.natural import NaturalStep, natural_step
from npg.optim import NGD, infer_likelihood

FISHER_NAMES = ("exact", "mc", "empirical", "diagonal", "kfac", "ekfac")


def make_fisher(
    name: str,
    model,
    inputs,
    family: str | Family,
    *,
    targets: Tensor | None = None,
    params=None,
    param_dict: Mapping[str, Tensor] | None = None,
    n_samples: int = 1,
    seed: int = 0,
    diagonal: str = "exact",
    kfac_labels: str = "exact",
    kfac_inverse: str = "pi",
) -> FisherOperator:
    """Build the Fisher flavour ``name`` on one batch.

    ``targets`` are the observed labels (needed by ``empirical``, and by the diagonal or K-FAC
    when they use empirical labels); ``n_samples`` / ``seed`` drive the Monte-Carlo labels;
    ``diagonal`` is the variant of the diagonal (``exact``, ``mc``, ``empirical``);
    ``kfac_labels`` the label source of K-FAC's factors.
    """
    common = dict(params=params)
    if name == "exact":
        return ExactFisher(model, inputs, family, param_dict=param_dict, **common)
    if name == "mc":
        return MCFisher(model, inputs, family, n_samples, seed, param_dict=param_dict, **common)
    if name == "empirical":
        if targets is None:
            raise ValueError("the empirical Fisher needs targets (the observed labels)")
        return EmpiricalFisher(model, inputs, family, targets, param_dict=param_dict, **common)
    if name == "diagonal":
        return DiagonalFisher(
            model,
            inputs,
            family,
            diagonal,
            targets,
            n_samples,
            seed,
            param_dict=param_dict,
            **common,
        )
    if name in ("kfac", "ekfac"):
        return KFACFisher(
            model,
            inputs,
            family,
            kfac_labels,
            targets,
            n_samples,
            seed,
            inverse=kfac_inverse,
            ekfac=name == "ekfac",
            **common,
        )
    raise ValueError(f"unknown Fisher {name!r}; accepted: {', '.join(FISHER_NAMES)}")


__all__ = [
    "FISHER_NAMES",
    "Bernoulli",
    "CGResult",
    "Categorical",
    "DiagGaussian",
    "DiagonalFisher",
    "EmpiricalFisher",
    "ExactFisher",
    "Family",
    "FisherOperator",
    "FunctionalModel",
    "GaussianRegression",
    "KFACFisher",
    "MCFisher",
    "MultiCategorical",
    "NGD",
    "NaturalStep",
    "conjugate_gradient",
    "get_family",
    "infer_likelihood",
    "make_fisher",
    "natural_step",
]
