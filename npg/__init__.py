"""npg: Fisher-vector products, damped conjugate gradient and natural-gradient steps.

Knows nothing of RL: a model maps inputs to an ``(N, K)`` output that a :mod:`npg.families`
family reads as a distribution, and the Fisher operators are built on one batch.
"""

from __future__ import annotations

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
    FLAVOURS,
    DiagonalFisher,
    EmpiricalFisher,
    ExactFisher,
    FisherOperator,
    FisherOptions,
    Flavour,
    KFACFisher,
    MCFisher,
    fisher_names,
    get_flavour,
    make_fisher,
    register_fisher,
)
from npg.model import FunctionalModel
from npg.natural import NaturalStep, natural_step
from npg.optim import NGD, infer_likelihood
from npg.precondition import KFACPreconditioner

__all__ = [
    "FLAVOURS",
    "Bernoulli",
    "CGResult",
    "Categorical",
    "DiagGaussian",
    "DiagonalFisher",
    "EmpiricalFisher",
    "ExactFisher",
    "Family",
    "FisherOperator",
    "FisherOptions",
    "Flavour",
    "FunctionalModel",
    "GaussianRegression",
    "KFACFisher",
    "KFACPreconditioner",
    "MCFisher",
    "MultiCategorical",
    "NGD",
    "NaturalStep",
    "conjugate_gradient",
    "fisher_names",
    "get_family",
    "get_flavour",
    "infer_likelihood",
    "make_fisher",
    "natural_step",
    "register_fisher",
]
