"""Fisher operators, one flavour per module, all behind :class:`FisherOperator`."""

from npg.fisher.base import DirectlyInvertible, FisherOperator
from npg.fisher.diagonal import DiagonalFisher
from npg.fisher.empirical import EmpiricalFisher
from npg.fisher.exact import ExactFisher
from npg.fisher.kfac import KFACFisher
from npg.fisher.mc import MCFisher

__all__ = [
    "DiagonalFisher",
    "DirectlyInvertible",
    "EmpiricalFisher",
    "ExactFisher",
    "FisherOperator",
    "KFACFisher",
    "MCFisher",
]
