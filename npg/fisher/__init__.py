"""Fisher operators, one flavour per module, all behind :class:`FisherOperator`."""

from npg.fisher.base import DirectlyInvertible, FisherOperator
from npg.fisher.diagonal import DiagonalFisher
from npg.fisher.empirical import EmpiricalFisher
from npg.fisher.exact import ExactFisher
from npg.fisher.kfac import KFACFisher
from npg.fisher.mc import MCFisher
from npg.fisher.registry import (
    FLAVOURS,
    FisherOptions,
    Flavour,
    fisher_names,
    get_flavour,
    make_fisher,
    register_fisher,
)

__all__ = [
    "FLAVOURS",
    "DiagonalFisher",
    "DirectlyInvertible",
    "EmpiricalFisher",
    "ExactFisher",
    "FisherOperator",
    "FisherOptions",
    "Flavour",
    "KFACFisher",
    "MCFisher",
    "fisher_names",
    "get_flavour",
    "make_fisher",
    "register_fisher",
]
