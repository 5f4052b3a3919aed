"""Supervised natural-gradient descent as a ``torch.optim.Optimizer``.

Usage (the batch is passed to ``step`` because every Fisher is built on the current batch)::

    loss_fn = nn.CrossEntropyLoss()
    opt = NGD(model.parameters(), model=model, loss_fn=loss_fn, fisher="kfac", lr=1.0,
              damping=1e-3)
    for x, y in loader:
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        opt.step(closure, inputs=x, targets=y)   # or opt.set_batch(x, y); opt.step(closure)

The update is ``Δ = -α (C + λI)⁻¹ g`` where ``g`` is the gradient of the closure's loss and
``C = s·F`` is the Fisher ``F`` (the *mean* over the batch of the likelihood's Fisher, as built by
:mod:`npg.fisher`) scaled so that ``C`` is the generalized Gauss-Newton matrix of the loss
itself: ``s = 1`` for mean-reduced cross-entropy / NLL and for mean-reduced MSE (whose Gaussian
has ``σ² = K/2``), ``s = 1/K`` for mean-reduced ``BCEWithLogitsLoss`` over ``K`` outputs and
``s = N`` for any ``reduction="sum"``. With ``lr=1`` and no damping the step is therefore the
Gauss-Newton step of the loss (Newton's method for a GLM with its canonical link).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from npg.families import Family, get_family
from npg.fisher import FisherOperator, get_flavour, make_fisher
from npg.fisher.kfac import ClosureFactors
from npg.likelihood import Likelihood, infer_likelihood, loss_identity
from npg.model import FunctionalModel, Inputs, batch_norm_for_curvature, batch_size
from npg.running_kfac import RunningKFAC

__all__ = ["NGD", "Likelihood", "infer_likelihood"]

_STATE_KEY = "ngd"


# --- the optimizer -------------------------------------------------------------------------------
class NGD(Optimizer):
    """Natural-gradient descent for supervised learning (Amari 1998; Martens 2010/2014/2015).

    Args:
        params: the parameters to optimise (one parameter group: the step couples them all).
        model: the ``nn.Module`` mapping a batch of inputs to the ``(N, K)`` output the loss reads.
        loss_fn: the loss; its likelihood is inferred (see :func:`infer_likelihood`).
        family: alternatively the likelihood family (name or instance); the closure's loss is
            then taken to be the *mean* negative log-likelihood (``s = 1``).
        fisher: ``"exact"`` (GGN, solved by CG), ``"mc"`` / ``"empirical"`` (per-sample
            outer products, CG), ``"diagonal"``, ``"kfac"`` or ``"ekfac"``.
        lr: step multiplier ``α``; ``1`` is the (damped) Gauss-Newton step.
        max_kl: KL trust region: with ``lr=None`` every step is scaled to the boundary
            ``½ ΔᵀFΔ = max_kl`` (mean KL between the model's predictive distributions); with a
            ``lr`` the step ``lr·d`` is shrunk only when it would leave the region (KL clipping).
            On by default (``1e-2``): the unclipped ``lr=1`` step diverges on small minibatches
            (the README's MLP, batches of 25: loss 1.2 -> 60-130 in 200 K-FAC steps; clipped:
            0.24-0.33); ``None`` gives the plain damped Gauss-Newton step. K-FAC measures ``F``
            with the factors its current inverses were built from; the sampled flavours
            (``mc``, ``empirical``) with the exact Fisher, since their rank-``N·samples``
            estimate does not see the directions their damped inverse amplifies.
        kl_model: the quadratic KL model that ``max_kl`` bounds: ``"exact"`` ``½ ΔᵀFΔ``, or
            ``"damped"`` ``½ α² gᵀd / s``, which is ``½ ΔᵀC̃Δ / s`` for the damped curvature
            ``C̃`` that ``d = C̃⁻¹ g`` inverts (K-FAC: the π-damped Kronecker blocks). This is
            the estimate of ACKTR and KFAC-pytorch. It costs no product by ``F``, and it is
            larger than the exact model, so the clip is more conservative. Needs
            ``momentum=0``.
        damping: Tikhonov damping ``λ`` added to the loss curvature ``C``.
        adaptive_damping: Levenberg-Marquardt rule (Martens 2010): after each step the actual
            loss reduction on the batch is compared with the quadratic model's prediction
            ``-(gᵀΔ + ½ΔᵀCΔ)``; ``ρ > 3/4`` multiplies ``λ`` by ``lm_decrease``, ``ρ < 1/4`` by
            ``lm_increase``. Costs one extra forward pass per step.
        damping_bounds: ``λ`` is clamped to this interval by the adaptive rule.
        momentum: heavy-ball coefficient on the natural direction (``0`` disables).
        cg_iters, cg_tol: CG budget for ``exact`` / ``mc`` / ``empirical``.
        n_samples, seed: sampled labels for ``mc`` (and K-FAC/diagonal with MC labels); the seed
            advances by one per step, so runs are reproducible.
        diagonal: variant of the ``diagonal`` flavour (``exact``, ``mc``, ``empirical``).
        kfac_labels: label source of the K-FAC factors (``exact``, ``mc``, ``empirical``).
        kfac_inverse: ``"pi"`` (π-damped Kronecker inverse) or ``"eigen"`` (exact damped inverse).
        kfac_decay: running-average decay of the K-FAC factors (``0`` keeps the last batch only).
        kfac_cov_interval: factors are re-estimated every this many steps.
        kfac_inv_interval: inverses are recomputed (with the current ``λ``) every this many steps.
            ``ekfac`` is rebuilt from the current batch at every step (no averaging).

    Training-mode BatchNorm layers: the gradient is the closure's (through the batch
    statistics); the exact Fisher is the GGN of the batch function, which sees the coupling of
    the samples through those statistics; the per-sample flavours use this batch's statistics
    held constant (:func:`npg.model.batch_norm_for_curvature`). Running statistics are updated
    by the closure's forward only.
    """

    def __init__(
        self,
        params,
        *,
        model: nn.Module,
        loss_fn: Any = None,
        family: str | Family | None = None,
        fisher: str = "kfac",
        lr: float | None = 1.0,
        max_kl: float | None = 1e-2,
        kl_model: str = "exact",
        damping: float = 1e-3,
        adaptive_damping: bool = False,
        damping_bounds: tuple[float, float] = (1e-8, 1e8),
        lm_decrease: float = 2.0 / 3.0,
        lm_increase: float = 1.5,
        momentum: float = 0.0,
        cg_iters: int = 20,
        cg_tol: float = 1e-6,
        n_samples: int = 1,
        seed: int = 0,
        diagonal: str = "exact",
        kfac_labels: str = "exact",
        kfac_inverse: str = "pi",
        kfac_decay: float = 0.95,
        kfac_cov_interval: int = 1,
        kfac_inv_interval: int = 10,
    ) -> None:
        get_flavour(fisher)  # a ValueError naming the registered flavours
        if lr is None and max_kl is None:
            raise ValueError("NGD needs lr, max_kl, or both")
        if lr is not None and not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite float > 0, got {lr}")
        if max_kl is not None and not (max_kl > 0 and math.isfinite(max_kl)):
            raise ValueError(f"max_kl must be a finite float > 0, got {max_kl}")
        if not (damping >= 0 and math.isfinite(damping)):
            raise ValueError(f"damping must be a finite float >= 0, got {damping}")
        if kl_model not in ("exact", "damped"):
            raise ValueError(f"unknown kl_model {kl_model!r}; accepted: exact, damped")
        if kl_model == "damped" and momentum:
            raise ValueError("kl_model='damped' needs momentum=0 (d must be C̃⁻¹g)")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not 0 <= kfac_decay < 1:
            raise ValueError(f"kfac_decay must be in [0, 1), got {kfac_decay}")
        if kfac_cov_interval < 1 or kfac_inv_interval < 1:
            raise ValueError("kfac_cov_interval and kfac_inv_interval must be >= 1")
        if kfac_inverse not in ("pi", "eigen"):
            raise ValueError(f"unknown kfac_inverse {kfac_inverse!r}; accepted: pi, eigen")
        if (loss_fn is None) == (family is None):
            raise ValueError("pass exactly one of loss_fn= (to infer the likelihood) or family=")
        if not isinstance(model, nn.Module):
            raise TypeError("NGD needs the nn.Module as model=")
        defaults = dict(
            lr=lr,
            max_kl=max_kl,
            damping=damping,
            momentum=momentum,
            cg_iters=cg_iters,
            cg_tol=cg_tol,
        )
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("NGD supports a single parameter group (its step couples them all)")
        if loss_fn is not None:
            loss_identity(loss_fn)  # fail early on an unsupported loss
        self.model = model
        self._batch_norm = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
        )
        self.loss_fn = loss_fn
        self.fisher = fisher
        self.adaptive_damping = adaptive_damping
        self.kl_model = kl_model
        self.damping_bounds = (float(damping_bounds[0]), float(damping_bounds[1]))
        self.lm_decrease, self.lm_increase = lm_decrease, lm_increase
        self.n_samples, self.seed = n_samples, seed
        self.diagonal_variant = diagonal
        self.kfac_labels, self.kfac_inverse = kfac_labels, kfac_inverse
        self.kfac_decay = kfac_decay
        self.kfac_cov_interval, self.kfac_inv_interval = kfac_cov_interval, kfac_inv_interval
        self._params = list(self.param_groups[0]["params"])
        self.fmodel = FunctionalModel(model, self._params)
        self._flat_params = [self.fmodel.params[n] for n in self.fmodel.names]  # flat order
        self._likelihood: Likelihood | None = (
            Likelihood(get_family(family), "mean") if family is not None else None
        )
        self._batch: tuple[Inputs | None, Tensor | None] = (None, None)
        self._kfac: RunningKFAC | None = None
        self._pending_kfac_state: Mapping[str, Any] | None = None
        self._captured_factors: list[tuple[Tensor, Tensor]] | None = None
        self.last_info: dict[str, Any] = {}

    # --- batch and likelihood ------------------------------------------------------------------
    def set_batch(self, inputs: Inputs, targets: Tensor | None = None) -> None:
        """Set the batch the next :meth:`step` builds its Fisher on (``targets`` are needed by
        the empirical Fisher and by the adaptive damping's loss re-evaluation)."""
        self._batch = (inputs, targets)

    @property
    def likelihood(self) -> Likelihood | None:
        """The likelihood in use (``None`` until the first step when it depends on ``K``)."""
        return self._likelihood

    def _get_likelihood(self, inputs: Inputs) -> Likelihood:
        if self._likelihood is None:
            with torch.no_grad(), batch_norm_for_curvature(self.model, inputs, per_sample=True):
                args = inputs if isinstance(inputs, tuple) else (inputs,)
                out = self.model(*(a[:1] for a in args))
            self._likelihood = infer_likelihood(self.loss_fn, int(out.shape[-1]))
        return self._likelihood

    @property
    def damping(self) -> float:
        """The current damping ``λ`` (changes under the adaptive rule)."""
        return float(self._gstate().get("damping", self.param_groups[0]["damping"]))

    def kfac_mv(self, v: Tensor) -> Tensor:
        """``F̂ v`` with the running-average K-FAC factors (undamped, unscaled by the loss), for
        a flat vector over the optimised parameters — e.g. the KL model ``½ ΔᵀF̂Δ`` of a step."""
        if self._kfac is None or not self._kfac.blocks:
            raise RuntimeError("no K-FAC factors yet: kfac_mv needs fisher='kfac' and one step()")
        return self._kfac.mv(v)

    def _gstate(self) -> dict[str, Any]:
        if _STATE_KEY not in self.state:
            self.state[_STATE_KEY] = {"step": 0, "damping": self.param_groups[0]["damping"]}
        return self.state[_STATE_KEY]

    def _batch_norm_context(
        self, inputs: Inputs, *, per_sample: bool
    ) -> contextlib.AbstractContextManager:
        """:func:`batch_norm_for_curvature` for a model with BatchNorm layers; no module walk on
        every step for the others."""
        if not self._batch_norm:
            return contextlib.nullcontext()
        return batch_norm_for_curvature(self.model, inputs, per_sample=per_sample)

    # --- curvature -----------------------------------------------------------------------------
    def _closure_factors(
        self, inputs: Inputs, targets: Tensor | None, family: Family, step: int
    ) -> ClosureFactors | None:
        """The capture of this step's K-FAC factors from the closure's forward pass, when the
        running factors are due for a refresh and every parameter is in a Kronecker block.
        A subclass that customises :meth:`_fisher_operator` (``DistributedNGD`` reduces the
        factors across ranks) keeps building them that way."""
        if (
            self.fisher != "kfac"
            or self._batch_norm  # the closure's forward couples the samples of the batch
            or step % self.kfac_cov_interval != 0
            or self._kfac is None
            or self._pending_kfac_state is not None
            or type(self)._fisher_operator is not NGD._fisher_operator
        ):
            return None
        layers = self._kfac.closure_layers()
        if layers is None:
            return None
        return ClosureFactors(
            self.model,
            layers,
            inputs,
            family,
            self.kfac_labels,
            targets,
            self.n_samples,
            self.seed + step,
        )

    def _curvature(
        self, inputs: Inputs, targets: Tensor | None, family: Family, step: int, mu: float
    ) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor, float], Tensor], dict]:
        """``(F mv, (F + μI)⁻¹ solver, info)`` for this step's Fisher flavour; ``mu`` is the
        damping on the Fisher's scale (K-FAC inverses are refreshed with it). The ``F mv`` is
        the one the KL clip and the damping's quadratic model measure steps with: the flavour's
        own, except for sampled flavours, whose low-rank estimate cannot bound a step's KL, and
        for which it is the exact Fisher (built only when a model needs it)."""
        if self.fisher == "kfac":
            return self._running_kfac_curvature(inputs, targets, family, step, mu)
        group = self.param_groups[0]
        info: dict[str, Any] = {}
        op = self._fisher_operator(self.fisher, inputs, targets, family, self.seed + step)
        if op.direct:
            solve = op.inverse_mv
        else:

            def solve(g: Tensor, mu: float) -> Tensor:
                res = op.cg(g, mu, max_iter=group["cg_iters"], tol=group["cg_tol"])
                info.update(cg_iterations=res.iterations, cg_residual=res.residual)
                return res.x

        if not get_flavour(self.fisher).sampled:
            return op.mv, solve, info

        @functools.cache
        def exact() -> FisherOperator:
            return self._fisher_operator("exact", inputs, targets, family, self.seed + step)

        return lambda v: exact().mv(v), solve, info

    def _running_kfac_curvature(
        self, inputs: Inputs, targets: Tensor | None, family: Family, step: int, mu: float
    ) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor, float], Tensor], dict]:
        """:meth:`_curvature` of running-average K-FAC: this batch's factors (from
        :attr:`_captured_factors` when the closure's forward pass gave them) folded into the
        averages every ``kfac_cov_interval`` steps, inverses refreshed every
        ``kfac_inv_interval``; the KL model is the curvature the inverses invert."""
        info: dict[str, Any] = {}
        seed = self.seed + step
        if self._kfac is None:
            self._kfac = RunningKFAC(self.kfac_inverse, self._flat_params)
        due = step % self.kfac_cov_interval == 0
        if self._pending_kfac_state is not None:  # reattach loaded averages to the layers
            op = self._fisher_operator("kfac", inputs, targets, family, seed)
            self._kfac.load(self._pending_kfac_state, op)
            self._pending_kfac_state = None
            if due:
                self._kfac.update(op, self.kfac_decay)
                info["kfac_factors_updated"] = True
        elif self._captured_factors is not None:
            self._kfac.fold(self._captured_factors, (), self.kfac_decay)
            info.update(kfac_factors_updated=True, kfac_factors_from_closure=True)
        elif due or not self._kfac.blocks:
            op = self._fisher_operator("kfac", inputs, targets, family, seed)
            self._kfac.update(op, self.kfac_decay)
            info["kfac_factors_updated"] = True
        if step % self.kfac_inv_interval == 0 or self._kfac.inverse_damping is None:
            self._kfac.refresh_inverses(mu)
            info["kfac_inverses_updated"] = True
        return self._kfac.inverted_mv, self._kfac.solve, info

    def _fisher_operator(
        self, name: str, inputs: Inputs, targets: Tensor | None, family: Family, seed: int
    ) -> FisherOperator:
        """The flavour ``name`` on this batch with this optimizer's options (``DistributedNGD``
        wraps it to reduce across ranks)."""
        return make_fisher(
            name,
            self.model,
            inputs,
            family,
            targets=targets,
            params=self._params,
            n_samples=self.n_samples,
            seed=seed,
            diagonal=self.diagonal_variant,
            kfac_labels=self.kfac_labels,
            kfac_inverse=self.kfac_inverse,
        )

    # --- the step ------------------------------------------------------------------------------
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor] | None = None,
        *,
        inputs: Inputs | None = None,
        targets: Tensor | None = None,
    ) -> Tensor | None:
        """One natural-gradient step on the batch ``inputs`` (``targets``).

        ``closure`` zeroes the gradients, computes the loss on the batch, calls ``backward`` and
        returns the loss. Without a closure the gradients already in ``.grad`` are used (not
        allowed with ``adaptive_damping``, which must re-evaluate the loss). Returns the loss
        before the step. Diagnostics of the step are left in :attr:`last_info`.
        """
        if inputs is None:
            inputs, batch_targets = self._batch
            targets = batch_targets if targets is None else targets
        if inputs is None:
            raise ValueError("NGD.step needs the batch: step(closure, inputs=x, targets=y)")
        if closure is None and self.adaptive_damping:
            raise ValueError("adaptive damping needs a closure to measure the loss reduction")
        group = self.param_groups[0]
        st = self._gstate()
        k, lam = int(st["step"]), float(st["damping"])
        lik = self._get_likelihood(inputs)
        s = lik.scale(batch_size(inputs))
        loss, capture = None, None
        if closure is not None:
            capture = self._closure_factors(inputs, targets, lik.family, k)
            with torch.enable_grad(), capture or contextlib.nullcontext():
                loss = closure()
            if not bool(torch.isfinite(loss.detach()).all()):
                raise ValueError(
                    f"NGD: the closure's loss is {float(loss.detach().reshape(-1)[0])}; no step "
                    "taken (the parameters are unchanged)"
                )

        with self._batch_norm_context(inputs, per_sample=get_flavour(self.fisher).per_sample):
            self._captured_factors = capture.factors if capture is not None else None
            fmv, fsolve, info = self._curvature(inputs, targets, lik.family, k, lam / s)
            self._captured_factors = None
            clip = group["max_kl"] is not None
            # "form" (gᵀd and dᵀFd) for the adaptive damping's model and the exact KL clip, "dot"
            # (gᵀd) for the damped KL clip
            need_form = self.adaptive_damping or (clip and self.kl_model == "exact")
            curvature = "form" if need_form else "dot" if clip else None
            with torch.no_grad():
                params = self._flat_params
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                if self.fisher == "kfac" and not group["momentum"]:
                    # per parameter, no flat vectors: d = x / s with x = (F̂ + (λ/s) I)⁻¹ g
                    parts, curv = self._kfac.precondition(grads, curvature)
                    part_scale = 1.0 / s
                else:
                    parts, curv = self._flat_direction(grads, fmv, fsolve, lam / s, s, curvature)
                    part_scale = 1.0
                dFd = gd = math.nan  # dᵀFd and gᵀd of d = part_scale · parts
                if curv is not None:
                    gp, *pFp = curv.tolist()  # the one host sync of the step
                    gd = gp * part_scale
                    dFd = pFp[0] * part_scale**2 if pFp else math.nan
                kl_quad = gd / s if self.kl_model == "damped" else dFd  # the KL model is ½α²·this
                alpha = group["lr"]
                if clip and kl_quad > 0 and math.isfinite(kl_quad):
                    kl_scale = math.sqrt(2 * group["max_kl"] / kl_quad)
                    alpha = kl_scale if alpha is None else min(alpha, kl_scale)
                if alpha is None:  # max_kl only, but no curvature along d: take no step
                    alpha = 0.0
                torch._foreach_add_(params, parts, alpha=-alpha * part_scale)  # θ -= α d
                info.update(alpha=alpha, damping=lam)
                if curv is not None:
                    info["kl"] = 0.5 * alpha**2 * kl_quad
                if need_form:
                    info["predicted_change"] = -alpha * gd + 0.5 * s * alpha**2 * dFd

        predicted = info.get("predicted_change", 0.0)
        if self.adaptive_damping and loss is not None and predicted != 0:  # 0: no step taken
            with self._batch_norm_context(inputs, per_sample=False):  # buffers kept
                new_loss = self._reevaluate(closure, inputs, targets)
            actual = float(new_loss.detach()) - float(loss.detach())
            rho = actual / predicted if predicted < 0 else -math.inf
            if rho > 0.75:
                lam *= self.lm_decrease
            elif rho < 0.25:
                lam *= self.lm_increase
            lam = min(max(lam, self.damping_bounds[0]), self.damping_bounds[1])
            info.update(rho=rho, actual_change=actual, new_loss=float(new_loss))
        st["damping"] = lam
        st["step"] = k + 1
        self.last_info = info
        return loss

    def _flat_direction(
        self,
        grads: list[Tensor],
        fmv: Callable[[Tensor], Tensor],
        fsolve: Callable[[Tensor, float], Tensor],
        mu: float,
        s: float,
        curvature: str | None,
    ) -> tuple[list[Tensor], Tensor | None]:
        """The direction ``d = (sF + λI)⁻¹ g`` (plus momentum) on flat vectors, per parameter,
        and with ``curvature`` ``"dot"`` the ``(1,)`` tensor ``[gᵀd]``, with ``"form"`` the
        ``(2,)`` tensor ``[gᵀd, dᵀFd]``."""
        group, st = self.param_groups[0], self._gstate()
        g = torch.cat([t.reshape(-1) for t in grads])
        d = fsolve(g, mu) / s  # (sF + λI)⁻¹ g
        if group["momentum"]:
            buf = st.get("momentum_buffer")
            d = d if buf is None else group["momentum"] * buf + d
            st["momentum_buffer"] = d.clone()
        parts = list(self.fmodel.unflatten(d).values())
        if curvature is None:
            return parts, None
        return parts, torch.stack((g @ d, d @ fmv(d)) if curvature == "form" else (g @ d,))

    def _reevaluate(self, closure, inputs: Inputs, targets: Tensor | None) -> Tensor:
        """The loss on the same batch after the step."""
        if self.loss_fn is not None and targets is not None:
            with torch.no_grad():
                args = inputs if isinstance(inputs, tuple) else (inputs,)
                return self.loss_fn(self.model(*args), targets)
        with torch.enable_grad():
            return closure().detach()

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The torch state dict; NGD's own state (step count, damping, momentum, K-FAC
        averages and inverses) is stored under ``state["ngd"]``."""
        st = dict(self._gstate())
        if self._kfac is not None and self._kfac.blocks:
            st["kfac"] = self._kfac.state()
        elif self._pending_kfac_state is not None:
            st["kfac"] = self._pending_kfac_state
        sd = super().state_dict()
        sd["state"] = {**sd["state"], _STATE_KEY: copy.deepcopy(st)}
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (the K-FAC averages are reattached to the
        model's layers at the next step)."""
        sd = dict(state_dict)
        sd["state"] = dict(sd["state"])
        ngd = copy.deepcopy(sd["state"].pop(_STATE_KEY, None))
        super().load_state_dict(sd)
        if ngd is not None:
            kfac = ngd.pop("kfac", None)
            self.state[_STATE_KEY] = ngd
            self._kfac = None
            self._pending_kfac_state = kfac
            if kfac is not None and self.fisher == "kfac":
                self._kfac = RunningKFAC(self.kfac_inverse, self._flat_params)
