"""A functional view of a model restricted to a chosen subset of its parameters.

Every Fisher operator works on ``f(θ_sel, x) -> out`` where ``θ_sel`` is the dict of selected
parameters and all other parameters are held fixed. The view accepts an ``nn.Module`` (called via
``torch.func.functional_call``) or a plain function ``fn(params: dict, inputs) -> out`` together
with its parameter dict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

Inputs = Tensor | tuple[Tensor, ...]
ParamSelection = Iterable[str] | Iterable[Tensor] | Callable[[str, Tensor], bool] | None


class FunctionalModel:
    """``model`` as a function of the selected parameters.

    Args:
        model: an ``nn.Module`` whose forward returns the ``(N, K)`` output, or a function
            ``fn(params, inputs)`` of a parameter dict.
        params: which parameters the Fisher is taken over: names, tensors, a predicate
            ``(name, tensor) -> bool``, or ``None`` for every parameter that requires grad
            (every entry of ``param_dict`` for a function model, whose tensors need not
            require grad). A function model must pass its full parameter dict as ``param_dict``.
        param_dict: the parameter dict of a function model (ignored for modules).
    """

    def __init__(
        self,
        model: nn.Module | Callable[[dict[str, Tensor], Inputs], Tensor],
        params: ParamSelection = None,
        param_dict: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.module = model if isinstance(model, nn.Module) else None
        if self.module is not None:
            all_params = dict(self.module.named_parameters())
        elif param_dict is not None:
            all_params = dict(param_dict)
        else:
            raise TypeError("a function model needs param_dict={name: tensor}")
        self._fn = model
        if self.module is None and params is None:
            params = list(all_params)  # a function model: every entry of its parameter dict
        self.names = _select(all_params, params)
        if not self.names:
            raise ValueError("parameter selection is empty")
        self.params: dict[str, Tensor] = {n: all_params[n] for n in self.names}
        self.frozen: dict[str, Tensor] = {
            n: p.detach() for n, p in all_params.items() if n not in self.params
        }
        self.shapes = [p.shape for p in self.params.values()]
        self.numels = [p.numel() for p in self.params.values()]
        self.dim = sum(self.numels)

    def __call__(self, params: Mapping[str, Tensor], inputs: Inputs) -> Tensor:
        """Evaluate with ``params`` replacing the selected parameters."""
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        if self.module is not None:
            return functional_call(self.module, {**self.frozen, **params}, args)
        return self._fn({**self.frozen, **params}, *args)

    def detached_params(self) -> dict[str, Tensor]:
        """The selected parameters, detached (for forwards that build no graph)."""
        return {n: p.detach() for n, p in self.params.items()}

    # --- flat <-> per-parameter conversions -------------------------------------------------
    def flatten(self, tensors: Sequence[Tensor] | Mapping[str, Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (in selection order) into one flat vector."""
        if isinstance(tensors, Mapping):
            tensors = [tensors[n] for n in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat vector (or a ``(dim, M)`` matrix, columns kept) into parameter shapes."""
        if flat.shape[0] != self.dim:
            raise ValueError(
                f"expected a vector of length {self.dim}, got shape {tuple(flat.shape)}"
            )
        chunks = flat.split(self.numels)
        tail = flat.shape[1:]
        return {
            n: c.reshape(*s, *tail) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)
        }


@contextlib.contextmanager
def batch_norm_for_curvature(
    model: nn.Module, inputs: Inputs, *, per_sample: bool
) -> Iterator[None]:
    """Inside: the curvature of ``model``'s training-mode BatchNorm layers can be built on the
    batch ``inputs``, and no forward pass touches their running statistics.

    A training-mode BatchNorm couples the samples of a batch through its statistics. A Fisher
    built from the batch function (``per_sample=False``: the exact Fisher's jvp/vjp) sees that
    coupling, and the layers stay in training mode. Per-sample gradients, vmap and Kronecker
    factors (``per_sample=True``) need each output to depend on its own input only: the layers
    then run in eval mode with this batch's mean and biased variance as their statistics, held
    constant (each output keeps the value the training forward gives it on this batch). On exit
    the layers get their mode and buffers back unchanged.
    """
    layers = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    if not layers:
        yield
        return
    names = ("running_mean", "running_var", "num_batches_tracked")
    saved = [(m, [getattr(m, n) for n in names]) for m in layers]
    stats: dict[nn.Module, tuple[Tensor, Tensor]] = {}

    def record(module: nn.Module, args: tuple) -> None:
        x = args[0]
        dims = [d for d in range(x.ndim) if d != 1]
        stats[module] = (x.mean(dims), x.var(dims, unbiased=False))

    handles = [m.register_forward_pre_hook(record) for m in layers] if per_sample else []
    try:
        for m in layers:  # forwards in here update clones, not the layers' buffers
            for n in names:
                buffer = getattr(m, n)
                setattr(m, n, None if buffer is None else buffer.clone())
        if per_sample:
            with torch.no_grad():
                model(*(inputs if isinstance(inputs, tuple) else (inputs,)))
            for h in handles:
                h.remove()
            for m in layers:
                m.running_mean, m.running_var = stats[m]
                m.eval()
        yield
    finally:
        for h in handles:
            h.remove()
        for m, buffers in saved:
            for n, buffer in zip(names, buffers, strict=True):
                setattr(m, n, buffer)
            m.train()


def batch_size(inputs: Inputs) -> int:
    """The number of samples ``N`` in a batch of inputs."""
    return (inputs[0] if isinstance(inputs, tuple) else inputs).shape[0]


def index_inputs(inputs: Inputs, idx: Tensor | slice) -> Inputs:
    """The rows ``idx`` of every input tensor."""
    if isinstance(inputs, tuple):
        return tuple(t[idx] for t in inputs)
    return inputs[idx]


def _select(all_params: dict[str, Tensor], params: ParamSelection) -> list[str]:
    if params is None:
        return [n for n, p in all_params.items() if p.requires_grad]
    if callable(params):
        return [n for n, p in all_params.items() if params(n, p)]
    items = list(params)
    if all(isinstance(x, str) for x in items):
        unknown = sorted(set(items) - set(all_params))
        if unknown:
            raise ValueError(f"unknown parameter names {unknown}; known: {sorted(all_params)}")
        wanted = set(items)
        return [n for n in all_params if n in wanted]
    ids = {id(x) for x in items}
    names = [n for n, p in all_params.items() if id(p) in ids]
    if len(names) != len(ids):
        raise ValueError("some selected tensors are not parameters of the model")
    return names


STACK_ACTIVATIONS = {nn.Tanh: "tanh", nn.ReLU: "relu"}


@dataclass
class LinearStack:
    """A module's forward described as an MLP, for exact Fisher products without autograd.

    ``layers`` are ``nn.Linear`` layers (with bias) applied in turn with one elementwise
    ``activation`` (``"tanh"`` or ``"relu"``) between them; with a free ``log_std`` the output is
    ``cat([mlp(x), log_std.expand_as(mlp(x))], -1)`` (a diagonal Gaussian policy). A module opts
    in by returning one from a ``linear_stack()`` method (or declines with ``None``); an
    ``nn.Sequential`` of that shape is recognised as it is (:func:`find_linear_stack`).
    :class:`npg.fisher.ExactFisher` checks that the description reproduces the module's output
    and otherwise uses its generic path.
    """

    layers: list[nn.Linear]
    activation: str
    log_std: Tensor | None = None

    def parameters(self) -> list[Tensor]:
        """The stack's parameters in the order of its flat vector."""
        params = [p for lin in self.layers for p in (lin.weight, lin.bias)]
        return params if self.log_std is None else [*params, self.log_std]


def find_linear_stack(module: nn.Module | None) -> LinearStack | None:
    """The module's :class:`LinearStack`, or ``None`` if it does not describe itself as one."""
    if module is None:
        return None
    if callable(getattr(module, "linear_stack", None)):
        return module.linear_stack()  # may be None: the module declines
    if not isinstance(module, nn.Sequential) or len(module) % 2 != 1:
        return None
    layers, acts = list(module)[::2], {type(m) for m in list(module)[1::2]}
    if not all(type(m) is nn.Linear and m.bias is not None for m in layers) or len(acts) > 1:
        return None
    if acts and not acts <= set(STACK_ACTIVATIONS):
        return None
    return LinearStack(layers, STACK_ACTIVATIONS[acts.pop()] if acts else "tanh")
