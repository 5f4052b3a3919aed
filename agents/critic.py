"""Fitting the MLP critic with Adam: one TorchScript call per update instead of a Python loop.

The critic fit is ``vf_epochs × (N / vf_minibatch)`` Adam steps on a small MLP (e.g. 320 steps
of a 64×64 network on Hopper). Through ``nn.Module`` + autograd + ``torch.optim.Adam`` each step
is dominated by per-op Python and dispatcher overhead. Here the forward pass, the hand-written
backward pass of a ``Linear``/``tanh``/``relu`` MLP under the mean squared error, and Adam (the
same update as ``torch.optim.Adam``'s default, in the same order of operations) run as one
TorchScript function: it is about 2.5× faster on one thread, and it releases the GIL, so that
the agent runs it in a background thread while the main thread takes the policy step.

The Adam moments live in the ``torch.optim.Adam`` instance's own state, so checkpoints and the
autograd fallback (other activations, other optimizers) see the same optimizer state.
"""

from __future__ import annotations

import threading
import time
from functools import cache

import torch
from torch import Tensor, nn

from npg.model import find_linear_stack


def _fit(
    x: Tensor,
    y: Tensor,
    perms: Tensor,
    minibatch: int,
    weights: list[Tensor],
    biases: list[Tensor],
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    activation: str,
) -> Tensor:
    """Adam on ``mean((mlp(x) - y)²)`` over the minibatches of each row of ``perms``; updates
    ``params`` (= ``[W₁, b₁, W₂, b₂, …]``, the same tensors as ``weights``/``biases``) and the
    moments in place and returns the per-step losses."""
    n = x.shape[0]
    n_layers = len(weights)
    per_epoch = (n + minibatch - 1) // minibatch
    losses = torch.empty(perms.shape[0] * per_epoch, dtype=x.dtype)
    k = 0
    for e in range(perms.shape[0]):
        x_perm, y_perm = x[perms[e]], y[perms[e]]  # one gather per epoch; minibatches are views
        for start in range(0, n, minibatch):
            xb = x_perm[start : start + minibatch]
            yb = y_perm[start : start + minibatch]
            # forward, keeping every layer's input
            hs = [xb]
            for i in range(n_layers - 1):
                z = torch.addmm(biases[i], hs[i], weights[i].t())
                hs.append(torch.tanh(z) if activation == "tanh" else torch.relu(z))
            out = torch.addmm(biases[n_layers - 1], hs[n_layers - 1], weights[n_layers - 1].t())
            diff = out.squeeze(-1) - yb
            losses[k] = (diff * diff).mean()
            # backward of the mean squared error through the layers, last to first
            delta = (diff * (2.0 / xb.shape[0])).unsqueeze(-1)
            grads: list[Tensor] = []
            for i in range(n_layers - 1, -1, -1):
                grads.append(delta.sum(0))
                grads.append(delta.t().mm(hs[i]))
                if i > 0:
                    back = delta.mm(weights[i])
                    if activation == "tanh":
                        delta = torch.ops.aten.tanh_backward(back, hs[i])
                    else:
                        delta = torch.ops.aten.threshold_backward(back, hs[i], 0.0)
            grads.reverse()  # [gW₁, gb₁, …] like params
            # Adam, as torch.optim.Adam's multi-tensor implementation computes it
            step += 1.0
            bias_correction1 = 1.0 - beta1**step
            bias_correction2_sqrt = (1.0 - beta2**step) ** 0.5
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, bias_correction2_sqrt)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, exp_avgs, denom, -lr / bias_correction1)
            k += 1
    return losses


@cache
def _scripted_fit():
    return torch.jit.script(_fit)


def scripted_activation(critic: nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """The activation name if ``critic``/``optimizer`` can use the scripted fit, else ``None``.

    It needs an ``nn.Sequential`` MLP (:func:`npg.model.find_linear_stack`) with a scalar output
    and a plain ``torch.optim.Adam`` (default multi-tensor update, no weight decay, AMSGrad,
    fused or capturable variants) over exactly its parameters.
    """
    stack = find_linear_stack(critic) if isinstance(critic, nn.Sequential) else None
    if stack is None or stack.layers[-1].out_features != 1:
        return None
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return None
    options = optimizer.param_groups[0]
    if (
        [id(p) for p in options["params"]] != [id(p) for p in critic.parameters()]
        or options["weight_decay"] != 0
        or options["amsgrad"]
        or options["maximize"]
        or options.get("fused")
        or options.get("capturable")
        or options.get("differentiable")
        or options.get("decoupled_weight_decay")
        or isinstance(options["lr"], Tensor)
    ):
        return None
    return stack.activation


def fit_critic(
    critic: nn.Sequential,
    optimizer: torch.optim.Adam,
    activation: str,
    obs: Tensor,
    returns: Tensor,
    perms: Tensor,
    minibatch: int,
) -> Tensor:
    """Run the scripted fit (one epoch per row of ``perms``); returns the per-step losses."""
    params = list(critic.parameters())
    state = optimizer.state
    for p in params:
        if not state[p]:  # torch.optim.Adam's lazy state, created the same way
            state[p] = {
                "step": torch.tensor(0.0, dtype=torch.float32),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
    step = float(state[params[0]]["step"])
    options = optimizer.param_groups[0]
    beta1, beta2 = options["betas"]
    with torch.no_grad():
        detached = [p.detach() for p in params]
        losses = _scripted_fit()(
            obs,
            returns,
            perms,
            minibatch,
            detached[0::2],
            detached[1::2],
            detached,
            [state[p]["exp_avg"] for p in params],
            [state[p]["exp_avg_sq"] for p in params],
            step,
            float(options["lr"]),
            float(beta1),
            float(beta2),
            float(options["eps"]),
            activation,
        )
    for p in params:
        state[p]["step"].fill_(step + losses.numel())
    return losses


class BackgroundFit:
    """:func:`fit_critic` in a thread (the scripted function runs without the GIL).

    ``result()`` joins, re-raises the thread's exception if any, and returns
    ``(losses, seconds the fit took)``; ``wait()`` only joins (for error paths).
    """

    def __init__(self, *args: object) -> None:
        self._args = args
        self._threads = torch.get_num_threads()  # intra-op threads are set per thread
        _scripted_fit()  # compile here, in the caller's thread, never concurrently
        self._out: tuple[Tensor, float] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="critic-fit", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            torch.set_num_threads(self._threads)
            t0 = time.perf_counter()
            losses = fit_critic(*self._args)  # type: ignore[arg-type]
            self._out = (losses, time.perf_counter() - t0)
        except BaseException as e:
            self._error = e

    def wait(self) -> None:
        """Block until the fit has finished (successfully or not)."""
        self._thread.join()

    def result(self) -> tuple[Tensor, float]:
        """The fit's per-step losses and its wall time (re-raises its error)."""
        self.wait()
        if self._error is not None:
            raise self._error
        assert self._out is not None
        return self._out
