"""K-FAC as a gradient preconditioner in front of any ``torch.optim`` optimizer.

kfac-pytorch's pattern: keep your optimizer (SGD with momentum, Adam, a scheduler) and let K-FAC
rewrite the gradients before its step::

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pre = KFACPreconditioner(model, loss_fn=loss_fn, optimizer=opt)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        pre.step(x, y)     # .grad <- (C + λI)⁻¹ .grad, K-FAC's running curvature of the loss
        opt.step()

The curvature, its running averages and inverses are :class:`npg.optim.NGD`'s (``C = s·F̂`` is
the K-FAC Fisher scaled to the loss's Gauss-Newton matrix). The KL clip (ACKTR; kfac-pytorch's
``kl_clip``) scales the preconditioned gradient ``d`` by ``min(1, √(2δ / (η² gᵀd)))`` so that
the optimizer's plain step ``-η d`` stays within the damped quadratic KL model ``δ``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from npg.families import Family
from npg.model import Inputs, batch_size
from npg.optim import NGD


class KFACPreconditioner:
    """Replaces the gradients of ``model``'s parameters by K-FAC-preconditioned ones.

    Args:
        model: the module; its forward maps a batch to the ``(N, K)`` output the loss reads.
        loss_fn / family: the loss whose likelihood is inferred, or the likelihood family (as
            for :class:`npg.optim.NGD`).
        optimizer: the optimizer whose learning rate (of its first group) the KL clip reads at
            every step; or pass ``lr`` (a float or a function returning the current rate).
        damping: Tikhonov damping ``λ`` on the loss curvature.
        kl_clip: the KL radius ``δ`` of the clip; ``None`` disables it.
        labels, n_samples, seed: label source of the factors (``exact``, ``mc``, ``empirical``).
        factor_decay, factor_interval, inv_interval, inverse: running averages of the factors,
            re-estimated every ``factor_interval`` steps, inverted (``"pi"`` or ``"eigen"``)
            every ``inv_interval`` steps.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss_fn: Any = None,
        family: str | Family | None = None,
        optimizer: Optimizer | None = None,
        lr: float | Callable[[], float] | None = None,
        damping: float = 1e-3,
        kl_clip: float | None = 1e-3,
        labels: str = "exact",
        n_samples: int = 1,
        seed: int = 0,
        factor_decay: float = 0.95,
        factor_interval: int = 1,
        inv_interval: int = 10,
        inverse: str = "pi",
    ) -> None:
        if kl_clip is not None:
            if not (kl_clip > 0 and math.isfinite(kl_clip)):
                raise ValueError(f"kl_clip must be a finite float > 0 or None, got {kl_clip}")
            if (optimizer is None) == (lr is None):
                raise ValueError(
                    "the KL clip scales the optimizer's step: pass exactly one of optimizer= "
                    "(its lr is read at every step) or lr=, or disable it with kl_clip=None"
                )
        self.optimizer, self.lr, self.kl_clip = optimizer, lr, kl_clip
        # the curvature machinery is NGD's; it never steps (no lr of its own)
        self._ngd = NGD(
            [p for p in model.parameters() if p.requires_grad],
            model=model,
            loss_fn=loss_fn,
            family=family,
            fisher="kfac",
            lr=1.0,
            max_kl=None,
            damping=damping,
            n_samples=n_samples,
            seed=seed,
            kfac_labels=labels,
            kfac_inverse=inverse,
            kfac_decay=factor_decay,
            kfac_cov_interval=factor_interval,
            kfac_inv_interval=inv_interval,
        )
        self.last_info: dict[str, float] = {}

    def current_lr(self) -> float:
        """The learning rate the KL clip assumes for the coming optimizer step."""
        if self.optimizer is not None:
            return float(self.optimizer.param_groups[0]["lr"])
        return float(self.lr() if callable(self.lr) else self.lr)

    @torch.no_grad()
    def step(self, inputs: Inputs, targets: Tensor | None = None) -> None:
        """Precondition the ``.grad`` of every parameter in place, from the batch ``inputs``
        (``targets``: for empirical labels) that the gradients were computed on."""
        ngd = self._ngd
        params = ngd._flat_params
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            raise ValueError("KFACPreconditioner: the gradients hold NaN/inf; nothing changed")
        st = ngd._gstate()
        step, lam = int(st["step"]), float(st["damping"])
        lik = ngd._get_likelihood(inputs)
        s = lik.scale(batch_size(inputs))
        with torch.enable_grad(), ngd._batch_norm_context(inputs, per_sample=True):
            ngd._curvature(inputs, targets, lik.family, step, lam / s)
        clip = self.kl_clip is not None
        parts, curv = ngd._kfac.precondition(grads, "dot" if clip else None)
        scale = 1.0 / s  # d = (sF̂ + λI)⁻¹ g = (1/s) (F̂ + (λ/s) I)⁻¹ g
        info = {"scale": 1.0}
        if clip:
            g_dot_d = float(curv) * scale
            lr = self.current_lr()
            if g_dot_d > 0 and lr > 0:
                nu = min(1.0, math.sqrt(2 * self.kl_clip / (lr**2 * g_dot_d)))
                scale *= nu
                info.update(scale=nu, kl=0.5 * (lr * nu) ** 2 * g_dot_d)
        for p, d in zip(params, parts, strict=True):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(d).mul_(scale)
        st["step"] = step + 1
        self.last_info = info

    def state_dict(self) -> dict[str, Any]:
        """The running factors, inverses and step count (``weights_only`` loadable)."""
        return self._ngd.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._ngd.load_state_dict(state_dict)
