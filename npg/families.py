"""Likelihood families: how a model's output tensor parametrises a distribution over targets.

A model maps a batch of inputs to an output tensor ``out`` of shape ``(N, K)``; the family reads
each row as the parameters of ``p(y | x_i)``. Every Fisher flavour needs only a handful of
per-sample quantities of the family, all in output space:

* ``log_prob(out, y)`` and ``sample(out, generator)`` for MC / empirical Fishers,
* ``fisher_out_mv(out, u)``: the analytic output-space Fisher ``F_out(out_i) u_i`` (exact GGN),
* ``fisher_out_sqrt(out)``: ``S_i`` with ``S_i S_iᵀ = F_out(out_i)`` (exact diagonal, K-FAC type-2),
* ``kl(out_p, out_q)`` and ``entropy(out)`` for trust regions and diagnostics.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override


class Family(ABC):
    """A distribution over targets parametrised row-wise by the model output."""

    name: str

    @abstractmethod
    def log_prob(self, out: Tensor, y: Tensor) -> Tensor:
        """Per-sample ``log p(y_i | out_i)``, shape ``(N,)``."""

    @abstractmethod
    def sample(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One target per row drawn from ``p(· | out_i)`` (no gradient)."""

    @abstractmethod
    def fisher_out_sqrt(self, out: Tensor) -> Tensor:
        """``S`` of shape ``(N, K, C)`` with ``S_i S_iᵀ = F_out(out_i)``."""

    @abstractmethod
    def kl(self, out_p: Tensor, out_q: Tensor) -> Tensor:
        """Per-sample ``KL(p ‖ q)``, shape ``(N,)``."""

    @abstractmethod
    def entropy(self, out: Tensor) -> Tensor:
        """Per-sample entropy, shape ``(N,)``."""

    def fisher_out_mv(self, out: Tensor, u: Tensor) -> Tensor:
        """``F_out(out_i) u_i`` for every row; families override with a cheaper closed form."""
        s = self.fisher_out_sqrt(out)
        return torch.einsum("nkc,njc,nj->nk", s, s, u)

    def mode(self, out: Tensor) -> Tensor:
        """The most likely target (deterministic action)."""
        raise NotImplementedError(f"{self.name} has no mode")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Categorical(Family):
    """``K`` unnormalised logits per row; targets are class indices."""

    name = "categorical"

    @override
    def log_prob(self, out: Tensor, y: Tensor) -> Tensor:
        return torch.log_softmax(out, -1).gather(-1, y.long().unsqueeze(-1)).squeeze(-1)

    @override
    def sample(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        probs = torch.softmax(out.detach(), -1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    @override
    def fisher_out_mv(self, out: Tensor, u: Tensor) -> Tensor:
        # (diag(p) - p pᵀ) u
        p = torch.softmax(out, -1)
        pu = p * u
        return pu - p * pu.sum(-1, keepdim=True)

    @override
    def fisher_out_sqrt(self, out: Tensor) -> Tensor:
        # (diag(√p) - p √pᵀ)(diag(√p) - √p pᵀ) = diag(p) - p pᵀ because Σ p = 1.
        p = torch.softmax(out, -1)
        sq = p.sqrt()
        return torch.diag_embed(sq) - p.unsqueeze(-1) * sq.unsqueeze(-2)

    @override
    def kl(self, out_p: Tensor, out_q: Tensor) -> Tensor:
        logp, logq = torch.log_softmax(out_p, -1), torch.log_softmax(out_q, -1)
        return (logp.exp() * (logp - logq)).sum(-1)

    @override
    def entropy(self, out: Tensor) -> Tensor:
        logp = torch.log_softmax(out, -1)
        return -(logp.exp() * logp).sum(-1)

    @override
    def mode(self, out: Tensor) -> Tensor:
        return out.argmax(-1)


class Bernoulli(Family):
    """``K`` independent binary targets, one logit each; targets are 0/1 floats."""

    name = "bernoulli"

    @override
    def log_prob(self, out: Tensor, y: Tensor) -> Tensor:
        y = y.to(out.dtype).reshape(out.shape)
        return -F.binary_cross_entropy_with_logits(out, y, reduction="none").sum(-1)

    @override
    def sample(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(out.detach()), generator=generator)

    @override
    def fisher_out_mv(self, out: Tensor, u: Tensor) -> Tensor:
        p = torch.sigmoid(out)
        return p * (1 - p) * u

    @override
    def fisher_out_sqrt(self, out: Tensor) -> Tensor:
        p = torch.sigmoid(out)
        return torch.diag_embed((p * (1 - p)).sqrt())

    @override
    def kl(self, out_p: Tensor, out_q: Tensor) -> Tensor:
        p = torch.sigmoid(out_p)
        lp1, lp0 = F.logsigmoid(out_p), F.logsigmoid(-out_p)
        lq1, lq0 = F.logsigmoid(out_q), F.logsigmoid(-out_q)
        return (p * (lp1 - lq1) + (1 - p) * (lp0 - lq0)).sum(-1)

    @override
    def entropy(self, out: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(out, torch.sigmoid(out), reduction="none").sum(-1)

    @override
    def mode(self, out: Tensor) -> Tensor:
        return (out > 0).to(out.dtype)


class DiagGaussian(Family):
    """Diagonal Gaussian; each row is ``[mean (d), log_std (d)]``.

    A state-independent log-std (the policy-gradient convention) is a free parameter broadcast
    into the output by the model, so its Fisher block comes out of the same Jacobian. In the
    ``(mean, log_std)`` coordinates the analytic Fisher is ``diag(1/σ², 2)``.
    """

    name = "diag_gaussian"

    @staticmethod
    def split(out: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, log_std)``: the two halves of the output row."""
        mean, log_std = out.chunk(2, dim=-1)
        return mean, log_std

    @override
    def log_prob(self, out: Tensor, y: Tensor) -> Tensor:
        mean, log_std = self.split(out)
        z = (y - mean) * torch.exp(-log_std)
        return (-0.5 * z.pow(2) - log_std).sum(-1) - 0.5 * mean.shape[-1] * math.log(2 * math.pi)

    @override
    def sample(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mean, log_std = self.split(out.detach())
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + log_std.exp() * noise

    @override
    def fisher_out_mv(self, out: Tensor, u: Tensor) -> Tensor:
        _, log_std = self.split(out)
        u_mean, u_log_std = self.split(u)
        return torch.cat([u_mean * torch.exp(-2 * log_std), 2 * u_log_std], -1)

    @override
    def fisher_out_sqrt(self, out: Tensor) -> Tensor:
        _, log_std = self.split(out)
        diag = torch.cat([torch.exp(-log_std), torch.full_like(log_std, math.sqrt(2.0))], -1)
        return torch.diag_embed(diag)

    @override
    def kl(self, out_p: Tensor, out_q: Tensor) -> Tensor:
        mp, lp = self.split(out_p)
        mq, lq = self.split(out_q)
        var_ratio = torch.exp(2 * (lp - lq))
        return (lq - lp + 0.5 * (var_ratio + (mp - mq).pow(2) * torch.exp(-2 * lq) - 1)).sum(-1)

    @override
    def entropy(self, out: Tensor) -> Tensor:
        _, log_std = self.split(out)
        return (log_std + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)

    @override
    def mode(self, out: Tensor) -> Tensor:
        return self.split(out)[0]


class GaussianRegression(Family):
    """Gaussian with the mean from the model and a fixed standard deviation ``sigma``.

    With ``sigma = 1/√2`` the negative log-likelihood is the squared error up to a constant, and
    the (batch-mean) Fisher equals the Gauss-Newton matrix of the summed squared error divided by
    ``N``, i.e. that of the squared error summed over outputs and averaged over the batch.
    """

    name = "gaussian"

    def __init__(self, sigma: float = 1.0) -> None:
        if not sigma > 0:
            raise ValueError(f"GaussianRegression: sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)

    @override
    def log_prob(self, out: Tensor, y: Tensor) -> Tensor:
        y = y.to(out.dtype).reshape(out.shape)
        k = out.shape[-1]
        const = k * (math.log(self.sigma) + 0.5 * math.log(2 * math.pi))
        return -0.5 * ((y - out) / self.sigma).pow(2).sum(-1) - const

    @override
    def sample(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device)
        return out.detach() + self.sigma * noise

    @override
    def fisher_out_mv(self, out: Tensor, u: Tensor) -> Tensor:
        return u / self.sigma**2

    @override
    def fisher_out_sqrt(self, out: Tensor) -> Tensor:
        n, k = out.shape
        eye = torch.eye(k, dtype=out.dtype, device=out.device) / self.sigma
        return eye.expand(n, k, k)

    @override
    def kl(self, out_p: Tensor, out_q: Tensor) -> Tensor:
        return 0.5 * ((out_p - out_q) / self.sigma).pow(2).sum(-1)

    @override
    def entropy(self, out: Tensor) -> Tensor:
        k = out.shape[-1]
        ent = k * (math.log(self.sigma) + 0.5 * math.log(2 * math.pi * math.e))
        return torch.full(out.shape[:1], ent, dtype=out.dtype, device=out.device)

    @override
    def mode(self, out: Tensor) -> Tensor:
        return out

    def __repr__(self) -> str:
        return f"GaussianRegression(sigma={self.sigma})"


class MultiCategorical(Family):
    """Independent categoricals of sizes ``nvec`` (a ``MultiDiscrete`` action); the row is their
    concatenated logits and the target a ``(len(nvec),)`` integer vector."""

    name = "multi_categorical"

    def __init__(self, nvec: list[int] | tuple[int, ...]) -> None:
        self.nvec = [int(k) for k in nvec]
        if not self.nvec or min(self.nvec) < 1:
            raise ValueError(f"MultiCategorical: nvec must be positive sizes, got {nvec}")
        self._cat = Categorical()

    def _split(self, out: Tensor) -> tuple[Tensor, ...]:
        return out.split(self.nvec, -1)

    @override
    def log_prob(self, out: Tensor, y: Tensor) -> Tensor:
        return sum(self._cat.log_prob(o, y[..., j]) for j, o in enumerate(self._split(out)))

    @override
    def sample(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.stack([self._cat.sample(o, generator) for o in self._split(out)], -1)

    @override
    def fisher_out_mv(self, out: Tensor, u: Tensor) -> Tensor:
        parts = zip(self._split(out), u.split(self.nvec, -1), strict=True)
        return torch.cat([self._cat.fisher_out_mv(o, v) for o, v in parts], -1)

    @override
    def fisher_out_sqrt(self, out: Tensor) -> Tensor:
        k = sum(self.nvec)
        s = out.new_zeros(out.shape[0], k, k)
        start = 0
        for o in self._split(out):
            end = start + o.shape[-1]
            s[:, start:end, start:end] = self._cat.fisher_out_sqrt(o)
            start = end
        return s

    @override
    def kl(self, out_p: Tensor, out_q: Tensor) -> Tensor:
        parts = zip(self._split(out_p), self._split(out_q), strict=True)
        return sum(self._cat.kl(p, q) for p, q in parts)

    @override
    def entropy(self, out: Tensor) -> Tensor:
        return sum(self._cat.entropy(o) for o in self._split(out))

    @override
    def mode(self, out: Tensor) -> Tensor:
        return torch.stack([o.argmax(-1) for o in self._split(out)], -1)

    def __repr__(self) -> str:
        return f"MultiCategorical(nvec={self.nvec})"


FAMILIES: dict[str, type[Family]] = {
    "categorical": Categorical,
    "bernoulli": Bernoulli,
    "diag_gaussian": DiagGaussian,
    "gaussian": GaussianRegression,
}


def get_family(family: str | Family) -> Family:
    """Return a family instance from a name or pass an instance through."""
    if isinstance(family, Family):
        return family
    try:
        return FAMILIES[family]()
    except KeyError:
        raise ValueError(
            f"unknown family {family!r}; accepted: {', '.join(sorted(FAMILIES))}"
        ) from None
