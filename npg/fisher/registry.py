"""The registry of Fisher flavours: one line per flavour.

:func:`make_fisher`, :class:`npg.NGD`, :class:`npg.distributed.DistributedNGD`, the agents' config
validation and the CLI all read :data:`FLAVOURS`, so a new flavour is one module with its
:class:`~npg.fisher.base.FisherOperator` subclass plus one entry here (or one
:func:`register_fisher` call from user code)::

    register_fisher("scaled", Flavour(lambda model, x, family, o: Scaled(model, x, family)))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from npg.families import Family
from npg.fisher.base import FisherOperator
from npg.fisher.diagonal import DiagonalFisher
from npg.fisher.empirical import EmpiricalFisher
from npg.fisher.exact import ExactFisher
from npg.fisher.kfac import KFACFisher
from npg.fisher.mc import MCFisher


@dataclass(frozen=True)
class FisherOptions:
    """The options a flavour may read; each flavour ignores those it has no use for.

    Attributes:
        targets: the observed labels (empirical Fisher; diagonal / K-FAC with empirical labels).
        params: which parameters the operator is over (names, tensors or ``None`` for all).
        param_dict: the parameter values for a functional ``model``.
        n_samples: labels drawn per input by the Monte-Carlo estimates.
        seed: seed of those labels.
        diagonal: the diagonal's variant (``exact``, ``mc``, ``empirical``).
        kfac_labels: the label source of K-FAC's factors (``exact``, ``mc``, ``empirical``).
        kfac_inverse: ``"pi"`` (π-damped Kronecker inverse) or ``"eigen"`` (exact damped inverse).
    """

    targets: Tensor | None = None
    params: Any = None
    param_dict: Mapping[str, Tensor] | None = None
    n_samples: int = 1
    seed: int = 0
    diagonal: str = "exact"
    kfac_labels: str = "exact"
    kfac_inverse: str = "pi"


Builder = Callable[[Any, Any, "str | Family", FisherOptions], FisherOperator]


@dataclass(frozen=True)
class Flavour:
    """How to build one Fisher flavour and what its users need to know about it.

    Attributes:
        build: ``(model, inputs, family, options) -> FisherOperator`` on one batch.
        direct: its operators have a closed-form damped inverse (``FisherOperator.direct``):
            solved by ``inverse_mv``, not CG, and not themselves CG-preconditionable.
        sampled: a sampled estimate of rank at most ``N·samples``: its quadratic form misses the
            directions its damped inverse amplifies, so KL models of a step use the exact Fisher.
        needs_targets: it reads the observed labels.
        per_sample: it is built from per-sample outputs or gradients (vmap, Kronecker factors),
            so training-mode BatchNorm statistics are frozen for it; ``False``: from the batch
            function's jvp/vjp, which sees their coupling
            (:func:`npg.model.batch_norm_for_curvature`).
    """

    build: Builder
    direct: bool = False
    sampled: bool = False
    needs_targets: bool = False
    per_sample: bool = True


def _kfac(ekfac: bool) -> Builder:
    def build(model: Any, inputs: Any, family: str | Family, o: FisherOptions) -> KFACFisher:
        return KFACFisher(
            model,
            inputs,
            family,
            o.kfac_labels,
            o.targets,
            o.n_samples,
            o.seed,
            inverse=o.kfac_inverse,
            ekfac=ekfac,
            params=o.params,
        )

    return build


FLAVOURS: dict[str, Flavour] = {
    "exact": Flavour(
        lambda m, x, f, o: ExactFisher(m, x, f, params=o.params, param_dict=o.param_dict),
        per_sample=False,
    ),
    "mc": Flavour(
        lambda m, x, f, o: MCFisher(m, x, f, o.n_samples, o.seed, o.params, o.param_dict),
        sampled=True,
    ),
    "empirical": Flavour(
        lambda m, x, f, o: EmpiricalFisher(m, x, f, o.targets, o.params, o.param_dict),
        sampled=True,
        needs_targets=True,
    ),
    "diagonal": Flavour(
        lambda m, x, f, o: DiagonalFisher(
            m, x, f, o.diagonal, o.targets, o.n_samples, o.seed, o.params, o.param_dict
        ),
        direct=True,
    ),
    "kfac": Flavour(_kfac(ekfac=False), direct=True),
    "ekfac": Flavour(_kfac(ekfac=True), direct=True),
}


def fisher_names() -> tuple[str, ...]:
    """The registered flavour names, in registration order."""
    return tuple(FLAVOURS)


def get_flavour(name: str) -> Flavour:
    """The registered flavour ``name``; a ``ValueError`` listing the accepted names otherwise."""
    try:
        return FLAVOURS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown Fisher {name!r}; accepted: {', '.join(fisher_names())}"
        ) from None


def register_fisher(name: str, flavour: Flavour, *, replace: bool = False) -> None:
    """Add a flavour under ``name`` (``replace=True`` to overwrite a registered one)."""
    if not isinstance(flavour, Flavour):
        raise TypeError(f"register_fisher needs a Flavour, got {type(flavour).__name__}")
    if name in FLAVOURS and not replace:
        raise ValueError(f"the Fisher flavour {name!r} is already registered")
    FLAVOURS[name] = flavour


def make_fisher(
    name: str, model: Any, inputs: Any, family: str | Family, **options: Any
) -> FisherOperator:
    """Build the Fisher flavour ``name`` on one batch; ``options`` are :class:`FisherOptions`.

    ``targets`` are the observed labels (needed by ``empirical``, and by the diagonal or K-FAC
    when they use empirical labels); ``n_samples`` / ``seed`` drive the Monte-Carlo labels;
    ``diagonal`` is the variant of the diagonal; ``kfac_labels`` the label source of K-FAC's
    factors; ``kfac_inverse`` its damped inverse.
    """
    flavour = get_flavour(name)
    opts = FisherOptions(**options)
    if flavour.needs_targets and opts.targets is None:
        raise ValueError(f"the {name} Fisher needs targets (the observed labels)")
    return flavour.build(model, inputs, family, opts)
