"""K-FAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions) and EKFAC.

Each ``nn.Linear`` / ``nn.Conv2d`` layer with weight ``W`` (and bias ``b``) gets the block
``G ⊗ A`` over ``[W | b]`` (row-major), with

* ``A = (1/(N·R)) Σ_i Σ_r ā_ir ā_irᵀ``, ``ā = [layer input, 1]`` (patches for a convolution),
* ``G = (1/N) Σ_i Σ_r g_ir g_irᵀ``, ``g`` the gradient of ``log p`` w.r.t. the layer output,

where ``r`` runs over the ``R`` positions that share the weight (1 for a plain linear layer:
the "expand" approximation otherwise). The label source picks the Fisher it approximates:
``exact`` backpropagates the columns of ``√F_out`` (type-2, no sampling noise), ``mc`` sampled
labels, ``empirical`` the observed ones. Selected parameters outside such layers (a free log-std,
say) get the matching diagonal block.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from npg.fisher._per_sample import output_scores, per_sample_grads, sampled_scores
from npg.fisher._stack import reproduces, stack_output, usable
from npg.fisher.base import DirectlyInvertible
from npg.model import FunctionalModel, find_linear_stack

LABELS = ("exact", "mc", "empirical")
INVERSES = ("pi", "eigen")


@dataclass(frozen=True)
class PiDampedInverse:
    """``(G + c_G I)⁻¹ ⊗ (A + c_A I)⁻¹`` of one block, ``c_G = γ/π``, ``c_A = πγ``, ``γ = √λ``.

    ``form_weights`` weigh ``⟨X, M⟩, ⟨X, ĜX⟩, ⟨X, XÂ⟩, ⟨X, X⟩`` into ``[⟨X, M⟩, ⟨X, GXA⟩]``
    (see :meth:`apply_with_form`).
    """

    g_inv: Tensor
    a_inv: Tensor
    form_weights: Tensor

    def apply(self, m: Tensor) -> Tensor:
        """``Ĝ⁻¹ M Â⁻¹`` for a ``(dG, dA)`` matrix view ``M``."""
        return self.g_inv @ m @ self.a_inv

    def apply_with_form(self, m: Tensor) -> tuple[Tensor, Tensor]:
        """``X`` of :meth:`apply` and ``[⟨X, M⟩, ⟨X, G X A⟩]`` for the block inverted, with no
        product by ``G`` or ``A``: with ``Y = Ĝ⁻¹M = XÂ`` and ``Z = MÂ⁻¹ = ĜX``,
        ``⟨X, GXA⟩ = ⟨X,M⟩ - c_A⟨X,Z⟩ - c_G⟨X,Y⟩ + c_G c_A⟨X,X⟩``: three products (``X`` from
        the cheaper of ``YÂ⁻¹`` and ``Ĝ⁻¹Z``) instead of four."""
        y, z = self.g_inv @ m, m @ self.a_inv
        x = y @ self.a_inv if m.shape[0] >= m.shape[1] else self.g_inv @ z
        dots = torch.stack((m, z, y, x)).view(4, -1) @ x.view(-1)
        return x, dots @ self.form_weights


@dataclass(frozen=True)
class EigenInverse:
    """``(block + λI)⁻¹`` in the Kronecker eigenbasis ``Q_G ⊗ Q_A``: ``denom = scale + λ`` with
    ``scale`` the Kronecker (or EKFAC) eigenvalues, ``(dG, dA)``."""

    qg: Tensor
    qa: Tensor
    denom: Tensor
    scale: Tensor

    def apply(self, m: Tensor) -> Tensor:
        """``Q_G ((Q_Gᵀ M Q_A) / denom) Q_Aᵀ`` for a ``(dG, dA)`` matrix view ``M``."""
        return self.qg @ ((self.qg.T @ m @ self.qa) / self.denom) @ self.qa.T

    def apply_with_form(self, m: Tensor) -> tuple[Tensor, Tensor]:
        """``X`` of :meth:`apply` and ``[⟨X, M⟩, Σ_ij U_ij² s_ij]`` with ``U = Q_Gᵀ X Q_A``, the
        block's form ``⟨X, G X A⟩`` at no extra product."""
        m_eig = self.qg.T @ m @ self.qa
        u = m_eig / self.denom
        forms = torch.stack((torch.sum(u * m_eig), torch.sum(u * u * self.scale)))
        return self.qg @ u @ self.qa.T, forms


BlockInverse = PiDampedInverse | EigenInverse


def inverse_state(inverse: BlockInverse) -> dict[str, Tensor | str]:
    """A plain dict of tensors for checkpoints (loadable with ``weights_only=True``)."""
    kind = "pi" if isinstance(inverse, PiDampedInverse) else "eigen"
    return {"kind": kind, **{k: getattr(inverse, k) for k in inverse.__dataclass_fields__}}


def inverse_from_state(state: dict[str, Tensor | str]) -> BlockInverse:
    """The inverse :func:`inverse_state` stored."""
    fields = {k: v for k, v in state.items() if k != "kind"}
    return PiDampedInverse(**fields) if state["kind"] == "pi" else EigenInverse(**fields)


@dataclass
class KroneckerBlock:
    """``G ⊗ A`` over one layer's ``[W | b]``; ``weight``/``bias`` are flat-vector slices."""

    module: nn.Module
    weight: slice
    bias: slice | None
    A: Tensor
    G: Tensor
    ekfac_scale: Tensor | None = None  # (dG, dA) eigenvalues in the Kronecker eigenbasis
    #: the damped inverse of the last :meth:`refresh_inverse`, and the ``(A, G)`` it inverted
    inverse: BlockInverse | None = field(default=None, repr=False)
    inverted: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    _eig: tuple[Tensor, Tensor, Tensor, Tensor] | None = field(default=None, repr=False)
    _eig_source: tuple | None = field(default=None, repr=False)

    def matrix_view(self, v: Tensor) -> Tensor:
        """The ``(dG, dA)`` matrix ``[V_W | V_b]`` of a flat vector's slice of this layer."""
        vw = v[self.weight].reshape(self.G.shape[0], -1)
        if self.bias is None:
            return vw
        return torch.cat([vw, v[self.bias].unsqueeze(1)], 1)

    def scatter(self, m: Tensor, out: Tensor) -> None:
        """Write the ``(dG, dA)`` matrix ``m`` back into this layer's slices of ``out``."""
        n_in = m.shape[1] - (self.bias is not None)
        out[self.weight] = m[:, :n_in].reshape(-1)
        if self.bias is not None:
            out[self.bias] = m[:, n_in]

    def eig(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(λ_A, Q_A, λ_G, Q_G)``, recomputed whenever ``A`` or ``G`` changed (replaced or
        modified in place) since the last call."""
        src = self._eig_source
        fresh = (
            src is not None
            and src[0] is self.A
            and src[1] == self.A._version
            and src[2] is self.G
            and src[3] == self.G._version
        )
        if self._eig is None or not fresh:
            la, qa = torch.linalg.eigh(self.A)
            lg, qg = torch.linalg.eigh(self.G)
            self._eig = (la.clamp_min(0), qa, lg.clamp_min(0), qg)
            # keep the factors themselves (not their ids, which can be reused once freed)
            self._eig_source = (self.A, self.A._version, self.G, self.G._version)
        return self._eig

    def mv(self, m: Tensor) -> Tensor:
        """The block applied to a ``(dG, dA)`` matrix view: ``G M A`` (EKFAC: rescaled in the
        Kronecker eigenbasis)."""
        if self.ekfac_scale is None:
            return self.G @ m @ self.A
        _, qa, _, qg = self.eig()
        return qg @ ((qg.T @ m @ qa) * self.ekfac_scale) @ qa.T

    def _inversion_error(self, damping: float) -> ValueError:
        """Why ``block + λI`` could not be inverted, and what to do about it."""
        name = type(self.module).__name__
        if not all(bool(torch.isfinite(f).all()) for f in (self.A, self.G)):
            return ValueError(
                f"K-FAC factors of a {name} layer hold NaN/inf: its inputs or output gradients "
                "overflowed, so the parameters are diverging; bound the steps (NGD's max_kl=, a "
                "smaller lr) or raise the damping"
            )
        if damping <= 0:
            return ValueError("K-FAC factors are singular; pass damping > 0 to invert them")
        size = float(torch.stack((self.A.abs().max(), self.G.abs().max())).max())
        return ValueError(
            f"K-FAC factors of a {name} layer are numerically singular at damping={damping:g} "
            f"(entries up to {size:.3g}): the parameters are likely diverging; bound the steps "
            "(NGD's max_kl=, a smaller lr) or raise the damping"
        )

    def refresh_inverse(self, damping: float, method: str) -> None:
        """Invert the current factors (``block + λI``) and keep them as :attr:`inverted`."""
        self.inverse = self.damped_inverse(damping, method)
        self.inverted = (self.A.clone(), self.G.clone())

    def inverted_block(self) -> KroneckerBlock:
        """The block as of the last :meth:`refresh_inverse` (the curvature its inverse inverts)."""
        if self.inverted is None:
            raise RuntimeError("refresh_inverse was never called on this block")
        return KroneckerBlock(self.module, self.weight, self.bias, *self.inverted)

    def damped_inverse(self, damping: float, method: str) -> BlockInverse:
        """A reusable ``(block + λI)⁻¹``.

        ``"pi"``: ``(G + γ/π I)⁻¹ ⊗ (A + πγ I)⁻¹`` with ``γ = √λ`` and
        ``π = sqrt((tr A / d_A) / (tr G / d_G))`` (Martens & Grosse 2015, §6.3).
        ``"eigen"``: the exact damped inverse in the Kronecker eigenbasis (EKFAC's own
        eigenvalues when present); an eigendecomposition failure falls back to ``"pi"``.
        """
        if method == "eigen":
            try:
                la, qa, lg, qg = self.eig()
            except torch.linalg.LinAlgError:
                warnings.warn(
                    f"K-FAC: eigendecomposition failed for {self.module}; using the π-damped "
                    "inverse instead",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return self.damped_inverse(max(damping, 1e-8), "pi")
            scale = self.ekfac_scale if self.ekfac_scale is not None else torch.outer(lg, la)
            denom = scale + damping
            if not bool((denom > 0).all()):
                raise self._inversion_error(damping)
            return EigenInverse(qg, qa, denom, scale)
        da, dg = self.A.shape[0], self.G.shape[0]
        trace_a, trace_g = torch.stack((self.A.trace(), self.G.trace())).tolist()
        ta, tg = trace_a / da, trace_g / dg
        pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
        gamma = math.sqrt(damping)
        try:  # the damped factors are symmetric positive definite: invert by Cholesky
            a_inv = _spd_inverse(self.A, pi * gamma)
            g_inv = _spd_inverse(self.G, gamma / pi)
        except torch.linalg.LinAlgError:
            raise self._inversion_error(damping) from None
        c_g, c_a = gamma / pi, pi * gamma
        weights = [[1.0, 1.0], [0.0, -c_a], [0.0, -c_g], [0.0, c_g * c_a]]
        return PiDampedInverse(g_inv, a_inv, self.A.new_tensor(weights))


class KFACFisher(DirectlyInvertible):
    """Kronecker-factored Fisher for the Linear/Conv2d layers of an ``nn.Module``.

    Args:
        model: the module; its forward maps ``inputs`` to the ``(N, K)`` output.
        inputs, family, params: as for every Fisher operator.
        labels: ``"exact"`` (type-2), ``"mc"`` (``n_samples`` sampled labels, ``seed``) or
            ``"empirical"`` (needs ``targets``).
        inverse: ``"pi"`` for ``(G + γ/π I)⁻¹ ⊗ (A + πγ I)⁻¹`` with ``γ = √λ`` (π-damping), or
            ``"eigen"`` for the exact damped inverse ``(G ⊗ A + λI)⁻¹`` via eigendecompositions.
        ekfac: replace the Kronecker eigenvalues by per-sample second moments in the Kronecker
            eigenbasis (George et al. 2018); implies ``inverse="eigen"``.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs,
        family,
        labels: str = "exact",
        targets: Tensor | None = None,
        n_samples: int = 1,
        seed: int = 0,
        inverse: str = "pi",
        ekfac: bool = False,
        params=None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError("K-FAC needs an nn.Module (it reads layer inputs through hooks)")
        if labels not in LABELS:
            raise ValueError(f"unknown K-FAC labels {labels!r}; accepted: {', '.join(LABELS)}")
        if inverse not in INVERSES:
            raise ValueError(f"unknown K-FAC inverse {inverse!r}; accepted: {', '.join(INVERSES)}")
        if labels == "empirical" and targets is None:
            raise ValueError("K-FAC with labels='empirical' needs targets=")
        super().__init__(model, inputs, family, params)
        self.labels, self.inverse, self.ekfac = labels, "eigen" if ekfac else inverse, ekfac
        self._inverse_cache: dict[float, list] = {}

        offsets = _offsets(self.fmodel)
        candidates = _kfac_layers(model, offsets)
        out, captured, calls = _forward_with_capture(model, inputs, [m for m, _, _ in candidates])
        self._checked_output(out.detach())
        # a layer called more than once per forward (weight sharing across calls) or not at all
        # gets no Kronecker block: its parameters join the diagonal block
        layers = [lay for lay in candidates if calls.get(id(lay[0]), 0) == 1]
        captured = [captured[id(m)] for m, _, _ in layers]
        covered = {p for m, _, _ in layers for p in _param_names(model, m)}
        other = [n for n in self.fmodel.names if n not in covered]
        w, norm = _output_vectors(self.family, labels, out.detach(), targets, n_samples, seed)
        diag = {}  # diagonal blocks by parameter name
        log_std = _free_log_std(model, self.fmodel, inputs, out, other)
        w_layers = w
        if log_std is not None:
            # per-sample ∂⟨out_i, w_ic⟩/∂log_std = w_ic's log-std part: the block in closed form;
            # columns that are zero on the MLP's part (the log-std columns of √F_out) reach no
            # layer and are not backpropagated
            width = out.shape[1] // 2
            diag[log_std] = w[:, :, width:].pow(2).sum((0, 1)) / (self.n * norm)
            reach = w[:, :, :width].abs().amax((0, 2)) > 0
            if bool(reach.any()):
                w_layers = w[:, reach]
        grads = _backward_columns(out, [o for _, o in captured], w_layers)

        self.blocks: list[KroneckerBlock] = []
        for (module, wslice, bslice), (layer_in, _), g in zip(layers, captured, grads, strict=True):
            a, g, A, G = _factors(module, layer_in, g, bslice is not None, norm)
            block = KroneckerBlock(module, wslice, bslice, A, G)
            if ekfac:
                _, qa, _, qg = block.eig()
                m = torch.einsum("ncro,op,nri,ij->ncpj", g, qg, a, qa)  # per-sample, eigenbasis
                block.ekfac_scale = m.pow(2).sum((0, 1)) / (self.n * norm)
            self.blocks.append(block)

        rest = [n for n in other if n not in diag]
        if rest:
            sub = FunctionalModel(model, rest)
            d = per_sample_grads(sub, inputs, w).pow(2).sum((0, 1)) / (self.n * norm)
            sizes = [offsets[n].stop - offsets[n].start for n in rest]
            diag.update(zip(rest, d.split(sizes), strict=True))
        self.diag_slices = [offsets[n] for n in other]
        self.diag_values = tuple(diag[n] for n in other)

    # --- products ------------------------------------------------------------------------------
    def _mv(self, v: Tensor) -> Tensor:
        return block_diagonal_mv(self.blocks, self.diag_slices, self.diag_values, v)

    def inverse_mv(self, g: Tensor, damping: float = 0.0) -> Tensor:
        """``(F̂ + λI)⁻¹ g`` blockwise, with π-damping or the exact eigen-damped inverse."""
        if not (damping >= 0 and math.isfinite(damping)):
            raise ValueError(f"damping must be a finite float >= 0, got {damping}")
        inverses = self._inverse_cache.get(damping)
        if inverses is None:
            if len(self._inverse_cache) >= 4:  # adaptive damping: keep the latest few only
                self._inverse_cache.pop(next(iter(self._inverse_cache)))
            inverses = self._inverse_cache[damping] = [
                b.damped_inverse(damping, self.inverse) for b in self.blocks
            ]
        out = torch.zeros_like(g)
        for b, inv in zip(self.blocks, inverses, strict=True):
            b.scatter(inv.apply(b.matrix_view(g)), out)
        for s, d in zip(self.diag_slices, self.diag_values, strict=True):
            denom = d + damping
            if not bool((denom > 0).all()):
                raise ValueError("K-FAC diagonal block is singular; pass damping > 0")
            out[s] = g[s] / denom
        return out

    def kronecker_factors(self) -> list[tuple[nn.Module, Tensor, Tensor]]:
        """``(module, A, G)`` for every Kronecker block."""
        return [(b.module, b.A, b.G) for b in self.blocks]


class ClosureFactors:
    """K-FAC factors of known layers from the forward pass that an optimizer's closure makes.

    A context manager: while it is active, forward hooks record the layers' inputs and outputs,
    and when ``model`` is called on exactly ``inputs`` (the same tensor objects) the label
    vectors of its output are backpropagated to the layer outputs through the closure's own
    graph (kept for the closure's backward), giving the factors :class:`KFACFisher` would build
    on that batch without a forward pass of its own. :attr:`factors` stays ``None`` when that
    did not happen (the model called on other inputs first, a layer not called exactly once,
    no graph); the caller then builds the factors the general way.

    Args:
        model: the module the closure calls.
        layers: ``(module, with_bias)`` per Kronecker block, in block order.
        inputs, family, labels, targets, n_samples, seed: as for :class:`KFACFisher`.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[tuple[nn.Module, bool]],
        inputs,
        family,
        labels: str,
        targets: Tensor | None,
        n_samples: int,
        seed: int,
    ) -> None:
        self.model, self.layers = model, layers
        self.inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        self.label_args = (family, labels, targets, n_samples, seed)
        self.factors: list[tuple[Tensor, Tensor]] | None = None
        self._captured: dict[int, tuple[Tensor, Tensor]] = {}
        self._calls: dict[int, int] = {}
        self._model_called = False
        self._handles: list = []

    def __enter__(self) -> ClosureFactors:
        self._handles = [m.register_forward_hook(self._on_layer) for m, _ in self.layers]
        self._handles.append(self.model.register_forward_hook(self._on_model))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._captured = [], {}

    def _on_layer(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not self._model_called:
            self._calls[id(module)] = self._calls.get(id(module), 0) + 1
            self._captured.setdefault(id(module), (args[0].detach(), output))

    def _on_model(self, module: nn.Module, args: tuple, out: Tensor) -> None:
        if self._model_called:
            return
        self._model_called = True
        same_inputs = len(args) == len(self.inputs) and all(
            a is b for a, b in zip(args, self.inputs, strict=False)
        )
        once = all(self._calls.get(id(m)) == 1 for m, _ in self.layers)
        if not (same_inputs and once and out.ndim == 2 and out.requires_grad):
            return
        family, labels, targets, n_samples, seed = self.label_args
        w, norm = _output_vectors(family, labels, out.detach(), targets, n_samples, seed)
        captured = [self._captured[id(m)] for m, _ in self.layers]
        grads = _backward_columns(out, [o for _, o in captured], w)
        self.factors = [
            _factors(m, layer_in, g, with_bias, norm)[2:]
            for (m, with_bias), (layer_in, _), g in zip(self.layers, captured, grads, strict=True)
        ]


# --- helpers -------------------------------------------------------------------------------------
def _spd_inverse(m: Tensor, shift: float) -> Tensor:
    """``(m + shift·I)⁻¹`` of a symmetric positive semi-definite ``m`` (Cholesky)."""
    shifted = m.clone()
    shifted.diagonal().add_(shift)
    return torch.cholesky_inverse(torch.linalg.cholesky(shifted))


def _output_vectors(
    family, labels: str, out: Tensor, targets: Tensor | None, n_samples: int, seed: int
) -> tuple[Tensor, int]:
    """Output-space vectors ``w_ic`` (N, C, K) to backpropagate, and the 1/C normaliser."""
    if labels == "exact":
        return family.fisher_out_sqrt(out).transpose(1, 2), 1
    if labels == "mc":
        gen = torch.Generator(device=out.device).manual_seed(seed)
        return sampled_scores(family, out, n_samples, gen), n_samples
    return output_scores(family, out, targets).unsqueeze(1), 1


def _factors(
    module: nn.Module, layer_in: Tensor, g: Tensor, with_bias: bool, norm: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(a, g, A, G)``: one layer's input rows ``a`` (N, R, dA), output-gradient rows ``g``
    (N, C, R, dG) from its ``(C, N, ...)`` output gradients, and its factors ``A``, ``G``."""
    n = layer_in.shape[0]
    a = _layer_rows(module, layer_in, with_bias)
    g = _grad_rows(module, g, n, g.shape[0])
    a_rows, g_rows = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    a_factor = torch.mm(a_rows.T, a_rows).div_(n * a.shape[1])
    return a, g, a_factor, torch.mm(g_rows.T, g_rows).div_(n * norm)


def block_diagonal_mv(
    blocks: list[KroneckerBlock], diag_slices: list[slice], diag_values, v: Tensor
) -> Tensor:
    """``F̂ v`` for Kronecker blocks plus diagonal blocks (the K-FAC block-diagonal product)."""
    out = torch.zeros_like(v)
    for b in blocks:
        b.scatter(b.mv(b.matrix_view(v)), out)
    for s, d in zip(diag_slices, diag_values, strict=True):
        out[s] = d * v[s]
    return out


def _offsets(fmodel: FunctionalModel) -> dict[str, slice]:
    offsets, start = {}, 0
    for name, numel in zip(fmodel.names, fmodel.numels, strict=True):
        offsets[name] = slice(start, start + numel)
        start += numel
    return offsets


def _param_names(model: nn.Module, module: nn.Module) -> list[str]:
    ids = {id(p) for p in module.parameters(recurse=False)}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def _kfac_layers(model: nn.Module, offsets: dict[str, slice]):
    """``(module, weight slice, bias slice or None)`` for every supported layer whose weight is
    selected. Grouped or non-zero-padded convolutions are left to the diagonal block."""
    layers = []
    names = {id(p): n for n, p in model.named_parameters()}
    for module in model.modules():
        supported = isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
        )
        if not supported or names.get(id(module.weight)) not in offsets:
            continue
        bias_name = names.get(id(module.bias)) if module.bias is not None else None
        if module.bias is not None and bias_name not in offsets:
            continue  # weight selected without its bias: leave both to the diagonal
        layers.append((module, offsets[names[id(module.weight)]], offsets.get(bias_name)))
    return layers


def _free_log_std(
    model: nn.Module, fmodel: FunctionalModel, inputs, out: Tensor, names: list[str]
) -> str | None:
    """The name, among ``names``, of the free log-std of a model that describes itself as a
    :class:`~npg.model.LinearStack` with one, if the description reproduces ``out``; else
    ``None``. Its output is then ``[mlp(x), log_std]`` per row, which fixes its diagonal block."""
    stack = find_linear_stack(model)
    if not usable(stack, inputs) or stack.log_std is None:
        return None
    name = next((n for n in names if fmodel.params[n] is stack.log_std), None)
    if name is None or not reproduces(stack_output(stack, inputs), out):
        return None
    return name


def _forward_with_capture(
    model: nn.Module, inputs, modules: list[nn.Module]
) -> tuple[Tensor, dict[int, tuple[Tensor, Tensor]], dict[int, int]]:
    """One forward pass; per module id its first ``(input, output)`` and its number of calls."""
    captured: dict[int, tuple[Tensor, Tensor]] = {}
    calls: dict[int, int] = {}

    def hook(module, args, output):
        calls[id(module)] = calls.get(id(module), 0) + 1
        captured.setdefault(id(module), (args[0].detach(), output))

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.enable_grad():
            args = inputs if isinstance(inputs, tuple) else (inputs,)
            out = model(*args)
    finally:
        for h in handles:
            h.remove()
    if out.ndim != 2:
        raise ValueError(f"model output must be (N, K), got shape {tuple(out.shape)}")
    return out, captured, calls


def _backward_columns(out: Tensor, layer_outputs: list[Tensor], w: Tensor) -> list[Tensor]:
    """Gradients of ``Σ_i out_i · w_ic`` w.r.t. every layer output, stacked over ``c``: each
    ``(C, *layer_output.shape)``. Rows are per-sample because samples do not interact."""
    if not layer_outputs:
        return []
    if w.shape[1] == 1:  # one column: a plain backward pass (vmap costs more than it saves)
        grads = torch.autograd.grad(out, layer_outputs, w[:, 0], retain_graph=True)
        return [g.unsqueeze(0) for g in grads]
    try:  # all columns in one vmapped backward pass
        grads = torch.autograd.grad(
            out, layer_outputs, w.transpose(0, 1), retain_graph=True, is_grads_batched=True
        )
        return list(grads)
    except RuntimeError:  # an op without a batching rule: one backward pass per column
        cols = []
        for c in range(w.shape[1]):
            cols.append(torch.autograd.grad(out, layer_outputs, w[:, c], retain_graph=True))
        return [torch.stack([col[k] for col in cols]) for k in range(len(layer_outputs))]


def _layer_rows(module: nn.Module, x: Tensor, with_bias: bool) -> Tensor:
    """Layer inputs as ``(N, R, d_in [+1])`` rows (patches for a convolution)."""
    n = x.shape[0]
    if isinstance(module, nn.Conv2d):
        rows = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        rows = rows.transpose(1, 2)  # (N, L, C_in·kh·kw)
    else:
        rows = x.reshape(n, -1, x.shape[-1])
    if with_bias:
        rows = torch.cat([rows, rows.new_ones(*rows.shape[:2], 1)], -1)
    return rows


def _grad_rows(module: nn.Module, g: Tensor, n: int, c: int) -> Tensor:
    """Layer-output gradients ``(C, N, ...)`` as ``(N, C, R, d_out)`` rows."""
    if isinstance(module, nn.Conv2d):
        g = g.flatten(3).transpose(2, 3)  # (C, N, L, C_out)
    else:
        g = g.reshape(c, n, -1, g.shape[-1])
    return g.transpose(0, 1)
