"""Prototypes of the two proposed update speed-ups, applied by monkeypatching (agents/ and npg/
untouched), with an A/B of the process CPU time per update.

1. Critic: hand-written backward of the tanh MLP + MSE, and Adam on one flat parameter buffer
   (the module's parameters become views into it), minibatches gathered once per epoch, losses
   kept as tensors (no ``float()`` per step). Replaces ``OnPolicyNaturalAlgorithm._critic_update``.
2. Exact Fisher for the MLP actor: hand-written ``J v`` (forward mode through Linear/tanh) and
   ``Jᵀ w``; same ``F = Jᵀ F_out J / N`` as ``npg.fisher.ExactFisher``. Replaces ``_fisher``.

    python docs/bench/prototype_fixes.py CartPole-v1 9
    python docs/bench/prototype_fixes.py Hopper-v5 5

Prints the relative difference of the Fisher products and the median update CPU time of
the current code, with fix 1, and with fixes 1 + 2 (three agents, interleaved).
"""

from __future__ import annotations

import collections
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_vs_sb3 import _hyperparameters  # noqa: E402

from agents import TRPO  # noqa: E402
from npg import make_fisher  # noqa: E402
from npg.cg import CGResult, conjugate_gradient  # noqa: E402


class FlatAdamCritic:
    """Tanh-MLP critic trained by a hand-written backward and Adam on one flat buffer."""

    def __init__(self, critic: nn.Sequential, lr: float, eps: float = 1e-8) -> None:
        self.lins = [m for m in critic if isinstance(m, nn.Linear)]
        params = [p for lin in self.lins for p in (lin.weight, lin.bias)]
        self.flat = torch.cat([p.detach().reshape(-1) for p in params])
        self.grad = torch.zeros_like(self.flat)
        self.pv: list[Tensor] = []
        self.gv: list[Tensor] = []
        o = 0
        for p in params:
            self.pv.append(self.flat[o : o + p.numel()].view_as(p))
            self.gv.append(self.grad[o : o + p.numel()].view_as(p))
            o += p.numel()
        with torch.no_grad():
            for p, v in zip(params, self.pv, strict=True):
                p.set_(v)  # the module now reads the flat buffer
        self.m = torch.zeros_like(self.flat)
        self.v = torch.zeros_like(self.flat)
        self.t = 0
        self.lr, self.eps, self.b1, self.b2 = lr, eps, 0.9, 0.999

    @torch.no_grad()
    def step(self, x: Tensor, r: Tensor) -> Tensor:
        """One Adam step on the MSE of ``V(x)`` against ``r``; returns the loss (a tensor)."""
        n_layers = len(self.lins)
        hs = [x]
        h = x
        for i in range(n_layers - 1):
            h = torch.tanh(torch.addmm(self.pv[2 * i + 1], h, self.pv[2 * i].t()))
            hs.append(h)
        y = torch.addmm(self.pv[-1], h, self.pv[-2].t()).squeeze(-1)
        d = y - r
        g = (2.0 / x.shape[0]) * d.unsqueeze(1)
        for i in reversed(range(n_layers)):
            torch.mm(g.t(), hs[i], out=self.gv[2 * i])
            torch.sum(g, 0, out=self.gv[2 * i + 1])
            if i > 0:
                g = g.mm(self.pv[2 * i]).mul_(1 - hs[i] * hs[i])
        self.t += 1
        self.m.lerp_(self.grad, 1 - self.b1)
        self.v.mul_(self.b2).addcmul_(self.grad, self.grad, value=1 - self.b2)
        denom = (self.v.sqrt() / math.sqrt(1 - self.b2**self.t)).add_(self.eps)
        self.flat.addcdiv_(self.m, denom, value=-self.lr / (1 - self.b1**self.t))
        return d.dot(d) / x.shape[0]


def critic_update(self: Any, obs: Tensor, returns: Tensor) -> dict[str, float]:
    """Drop-in for ``_critic_update`` (same epochs, minibatches and RNG draws)."""
    fc = self.__dict__.setdefault("_flat_critic", FlatAdamCritic(self.policy.critic, self.vf_lr))
    n, mb = obs.shape[0], self.vf_minibatch
    losses = []
    for _ in range(self.vf_epochs):
        perm = torch.randperm(n, generator=self.generator)
        xs, rs = obs[perm].view(-1, mb, obs.shape[1]), returns[perm].view(-1, mb)
        for j in range(xs.shape[0]):
            losses.append(fc.step(xs[j], rs[j]))
    return {"value_loss": float(torch.stack(losses).mean())}


class MLPExactFisher:
    """``Jᵀ F_out J / N`` for an :class:`agents.policies.Actor` with hand-written products."""

    def __init__(self, actor: nn.Module, x: Tensor, family: Any) -> None:
        self.lins = [m for m in actor.net if isinstance(m, nn.Linear)]
        self.family, self.gauss, self.n = family, actor.gaussian, x.shape[0]
        with torch.no_grad():
            hs, ds, h = [x], [], x
            for i, lin in enumerate(self.lins):
                u = torch.addmm(lin.bias, h, lin.weight.t())
                if i < len(self.lins) - 1:
                    h = torch.tanh(u)
                    ds.append(1 - h * h)
                    hs.append(h)
            self.out = torch.cat([u, actor.log_std.expand_as(u)], -1) if self.gauss else u
        self.hs, self.ds = hs, ds
        named = list(actor.named_parameters())
        self.sizes = [p.numel() for _, p in named]
        self.idx = {name: i for i, (name, _) in enumerate(named)}

    @torch.no_grad()
    def mv(self, v: Tensor) -> Tensor:
        parts = torch.split(v, self.sizes)
        dh = None
        for i, lin in enumerate(self.lins):
            w = parts[self.idx[f"net.{2 * i}.weight"]].view_as(lin.weight)
            du = torch.addmm(parts[self.idx[f"net.{2 * i}.bias"]], self.hs[i], w.t())
            if dh is not None:
                du.addmm_(dh, lin.weight.t())
            dh = du.mul_(self.ds[i]) if i < len(self.lins) - 1 else du
        u = torch.cat([dh, parts[self.idx["log_std"]].expand_as(dh)], -1) if self.gauss else dh
        w = self.family.fisher_out_mv(self.out, u) / self.n
        grads: list[Tensor] = [v] * len(self.sizes)
        if self.gauss:
            k = dh.shape[1]
            g, grads[self.idx["log_std"]] = w[:, :k], w[:, k:].sum(0)
        else:
            g = w
        for i in reversed(range(len(self.lins))):
            grads[self.idx[f"net.{2 * i}.weight"]] = g.t().mm(self.hs[i]).reshape(-1)
            grads[self.idx[f"net.{2 * i}.bias"]] = g.sum(0)
            if i > 0:
                g = g.mm(self.lins[i].weight).mul_(self.ds[i - 1])
        return torch.cat(grads)

    def cg(
        self, g: Tensor, damping: float, max_iter: int, tol: float, preconditioner: Any = None
    ) -> CGResult:
        return conjugate_gradient(self.mv, g, damping=damping, max_iter=max_iter, tol=tol)


def fisher(self: Any, obs: Tensor, actions: Tensor) -> tuple[MLPExactFisher, None]:
    """Drop-in for ``_fisher`` with ``fisher="exact"`` (draws the same RNG number)."""
    torch.randint(0, 2**31 - 1, (1,), generator=self.generator)
    return MLPExactFisher(self.policy.actor, obs, self.family), None


def main() -> None:
    torch.set_num_threads(1)
    env_id, reps = sys.argv[1], int(sys.argv[2])
    hp = _hyperparameters(env_id)
    agents = {}
    for name in ("current", "critic fix", "both fixes"):
        agent = TRPO("MlpPolicy", env_id, seed=0, num_threads=1, **hp)
        agent._start()
        if name != "current":
            agent._critic_update = critic_update.__get__(agent)
        if name == "both fixes":
            agent._fisher = fisher.__get__(agent)
        agents[name] = agent
    ref = agents["current"]
    obs = ref.collector.collect().obs.reshape(-1, ref.policy.obs_dim)
    v = torch.randn(sum(p.numel() for p in ref.policy.actor.parameters()))
    fv = make_fisher("exact", ref.policy.actor, obs, ref.family).mv(v).detach()
    mv = MLPExactFisher(ref.policy.actor, obs, ref.family).mv(v)
    print(f"{env_id} Fisher product relative difference {float((fv - mv).norm() / fv.norm()):.2e}")
    times: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(reps):
        for name, agent in agents.items():
            batch = agent.collector.collect()
            c = time.process_time()
            agent.train_on_batch(batch)
            times[name].append(time.process_time() - c)
    for name, xs in times.items():
        print(f"{env_id} {name:10s} update CPU median {1e3 * sorted(xs)[len(xs) // 2]:.1f} ms")


if __name__ == "__main__":
    main()
