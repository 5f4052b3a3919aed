"""K-FAC natural actor-critic: the KL-clipped step, both action types, both critics, the CLI."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from agents import ALGORITHMS
from agents.base import flat_params
from agents.kfac_nac import KFACNAC
from agents.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(n_envs=1, n_steps=64, vf_minibatch=64, net_arch=(8, 8), seed=0)


def _kfac_quadratic(agent: KFACNAC, step: Tensor) -> float:
    """``sᵀF̂s`` from the running factors, written out with explicit Kronecker products:
    per Linear layer ``vec([ΔW | Δb])ᵀ (A ⊗ G) vec([ΔW | Δb])`` (column-major vec), plus the
    diagonal part (log-std) as ``Σ d_i s_i²``."""
    kfac = agent.actor_optimizer._kfac
    names = [n for n, _ in agent.policy.actor.named_parameters()]
    shapes = [p.shape for p in agent.policy.actor.parameters()]
    parts = dict(zip(names, torch.split(step, [math.prod(s) for s in shapes]), strict=True))
    linears = [m for m in agent.policy.actor.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == len(kfac.blocks)
    total = 0.0
    mod_names = {m: n for n, m in agent.policy.actor.named_modules()}
    for lin, block in zip(linears, kfac.blocks, strict=True):
        prefix = mod_names[lin]
        dw = parts[f"{prefix}.weight"].reshape(lin.out_features, lin.in_features)
        db = parts[f"{prefix}.bias"].reshape(-1, 1)
        s = torch.cat([dw, db], 1).double()
        vec = s.T.reshape(-1)  # column-major
        big = torch.kron(block.A.double(), block.G.double())
        total += float(vec @ big @ vec)
    if "log_std" in parts:
        (d,) = kfac.diag_values
        total += float((d.double() * parts["log_std"].double() ** 2).sum())
    return total


@pytest.mark.parametrize("env", ["CartPole-v1", "Pendulum-v1"])
@pytest.mark.parametrize("lr", [50.0, 1e-3])
def test_kfac_model_clip_respects_its_model(env: str, lr: float) -> None:
    """With ``kl_clip="kfac-model-damped"`` (enforcement off) ½ sᵀF̂s ≤ δ for every step; a huge
    lr is clipped onto ½ sᵀ(F̂+λI)s = δ, a tiny one is taken as lr·d unclipped."""
    delta = 0.005
    agent = KFACNAC("MlpPolicy", env, lr=lr, max_kl=delta, kl_clip="kfac-model-damped",
                    kl_enforce=False, **SMALL)  # fmt: skip
    prev = [flat_params(agent.policy.actor).clone()]
    seen: list[dict] = []

    def callback(m: dict) -> None:
        now = flat_params(agent.policy.actor).clone()
        step = now - prev[0]
        prev[0] = now
        quad = _kfac_quadratic(agent, step)
        damped = quad + agent.damping * float(step.double() @ step.double())
        assert 0.5 * quad <= delta * (1 + 1e-4)
        if lr > 1:
            assert m["kl_clipped"]
            assert 0.5 * damped == pytest.approx(delta, rel=1e-3)
            assert m["predicted_kl"] == pytest.approx(0.5 * damped, rel=1e-3)
        else:
            assert not m["kl_clipped"] and m["step_scale"] == lr
        seen.append(m)

    agent.learn(4 * 64, callback=callback)
    assert len(seen) == 4
    agent.close()


def test_undamped_kfac_model_clip_hits_the_bound() -> None:
    agent = KFACNAC("MlpPolicy", "CartPole-v1", lr=50.0, max_kl=0.005, kl_clip="kfac-model",
                    kl_enforce=False, **SMALL)  # fmt: skip
    kls = []
    agent.learn(2 * 64, callback=lambda m: kls.append(m["predicted_kl"]))
    assert kls == pytest.approx([0.005, 0.005], rel=1e-4)
    agent.close()


def _torch_kl(actor: nn.Module, old: nn.Module, obs: Tensor) -> float:
    """Mean KL(π_old ‖ π_new) in float64 with ``torch.distributions`` (independent of
    :mod:`npg.families`)."""
    with torch.no_grad():
        new_out, old_out = actor.double()(obs.double()), old.double()(obs.double())
        if actor.gaussian:  # the output is [mean | log_std]
            (m_old, ls_old), (m_new, ls_new) = old_out.chunk(2, -1), new_out.chunk(2, -1)
            p = torch.distributions.Normal(m_old, ls_old.exp())
            q = torch.distributions.Normal(m_new, ls_new.exp())
            return float(torch.distributions.kl_divergence(p, q).sum(-1).mean())
        p = torch.distributions.Categorical(logits=old_out)
        q = torch.distributions.Categorical(logits=new_out)
        return float(torch.distributions.kl_divergence(p, q).mean())


class _Recorded(KFACNAC):
    """Records, per update, the batch, the actor before and after and the metrics."""

    def _policy_update(self, obs: Tensor, actions: Tensor, advantages: Tensor) -> dict:
        old = copy.deepcopy(self.policy.actor)
        m = super()._policy_update(obs, actions, advantages)
        self.records.append((obs.clone(), old, copy.deepcopy(self.policy.actor), m))
        return m


@pytest.mark.parametrize("env", ["CartPole-v1", "Acrobot-v1", "Pendulum-v1"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kl_clip", ["exact", "kfac-model"])
def test_every_accepted_step_keeps_the_realized_kl(env: str, seed: int, kl_clip: str) -> None:
    """Oversized steps (lr 50) are fitted into the trust region: the realized mean KL of every
    accepted step, recomputed in float64 with torch.distributions, is at most 1.05 δ."""
    delta = 0.005
    agent = _Recorded("MlpPolicy", env, lr=50.0, max_kl=delta, kl_clip=kl_clip,
                      **(SMALL | dict(seed=seed)))  # fmt: skip
    agent.records = []
    agent.learn(4 * 64)
    accepted = [r for r in agent.records if r[3]["step_status"] == "ok"]
    assert len(accepted) >= 3
    for obs, old, new, m in accepted:
        kl = _torch_kl(new, old, obs)
        assert 0 < kl <= 1.05 * delta
        assert m["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-7)
    agent.close()


def test_an_oversize_step_is_rescaled_or_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """A K-FAC model that predicts no curvature lets lr·d through the clip untouched: the
    realized-KL check rescales it into the trust region, and with no rescales allowed the step
    is rejected and the actor left bit-identical."""
    delta = 0.005
    agent = _Recorded("MlpPolicy", "CartPole-v1", lr=50.0, max_kl=delta, kl_clip="kfac-model",
                      **SMALL)  # fmt: skip
    agent.records = []
    monkeypatch.setattr(agent.actor_optimizer, "kfac_mv", lambda v: 1e-12 * v)
    agent.learn(2 * 64)
    for *_, m in agent.records:
        assert m["step_status"] == "ok"
        assert m["kl_rescales"] >= 1 and m["kl"] <= delta
    monkeypatch.setattr("agents.kfac_nac.MAX_RESCALES", 0)
    agent.learn(2 * 64, reset_num_timesteps=False)
    for _, old, new, m in agent.records[2:]:
        assert m["step_status"] == "kl_rejected" and m["kl"] == 0.0
        for p_old, p_new in zip(old.parameters(), new.parameters(), strict=True):
            assert torch.equal(p_old, p_new)
    agent.close()


def _dense_kl_hessian(actor: nn.Module, obs: Tensor, family) -> Tensor:
    """The Hessian of θ ↦ mean KL(π_actor ‖ π_θ) at θ = actor's parameters, float64, by autograd:
    the Fisher, computed without any of :mod:`npg`'s Fisher code."""
    actor, obs = copy.deepcopy(actor).double(), obs.double()
    names = [n for n, _ in actor.named_parameters()]
    shapes = [p.shape for p in actor.parameters()]
    with torch.no_grad():
        old_out = actor(obs)

    def mean_kl(theta: Tensor) -> Tensor:
        parts = torch.split(theta, [math.prod(s) for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return family.kl(old_out, torch.func.functional_call(actor, params, (obs,))).mean()

    return torch.autograd.functional.hessian(mean_kl, flat_params(actor))


@pytest.mark.parametrize("env", ["CartPole-v1", "Pendulum-v1"])
def test_exact_clip_is_half_sFs_of_the_dense_fisher(env: str) -> None:
    """The exact clip's ``predicted_kl`` is ½ sᵀFs of the taken step with F the Hessian of the
    mean KL(π_old ‖ π_θ) at θ_old (the Fisher), built densely in float64 by autograd."""
    agent = _Recorded("MlpPolicy", env, lr=50.0, max_kl=0.005, kl_clip="exact", kl_enforce=False,
                      **SMALL)  # fmt: skip
    agent.records = []
    agent.learn(2 * 64)
    for obs, old, new, m in agent.records:
        step = (flat_params(new) - flat_params(old)).double()
        fisher = _dense_kl_hessian(old, obs, agent.family)
        assert m["kl_clipped"]
        assert m["predicted_kl"] == pytest.approx(0.5 * float(step @ fisher @ step), rel=1e-3)
    agent.close()


@pytest.mark.parametrize("critic", ["kfac", "adam"])
def test_learns_cartpole_quickly(critic: str) -> None:
    """Both critics: the mean return of CartPole rises within 12k steps."""
    p = get_preset("kfac-nac", "CartPole-v1")
    p.pop("total_timesteps")
    p["critic_optimizer"] = critic
    if critic == "adam":
        p.update(vf_lr=1e-3, vf_epochs=5, vf_minibatch=256)
    agent = KFACNAC("MlpPolicy", "CartPole-v1", seed=1, **p)
    returns: list[float] = []
    agent.learn(12_288, callback=lambda m: returns.append(m["ep_return_mean"]))
    assert returns[-1] > 1.5 * returns[0] and returns[-1] > 40
    agent.close()


def test_checkpoint_roundtrip_continues_identically(tmp_path: Path) -> None:
    a = KFACNAC("MlpPolicy", "Pendulum-v1", **SMALL)
    a.learn(2 * 64)
    a.save(tmp_path / "a.pt")
    b = KFACNAC.load(tmp_path / "a.pt")
    a.learn(2 * 64, reset_num_timesteps=False)
    b.learn(2 * 64, reset_num_timesteps=False)
    torch.testing.assert_close(flat_params(a.policy), flat_params(b.policy), rtol=0, atol=0)
    a.close()
    b.close()


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="kfac_labels"):
        KFACNAC("MlpPolicy", "CartPole-v1", kfac_labels="bogus", **SMALL)
    with pytest.raises(ValueError, match="critic_optimizer"):
        KFACNAC("MlpPolicy", "CartPole-v1", critic_optimizer="sgd", **SMALL)
    with pytest.raises(ValueError, match="fisher"):
        KFACNAC("MlpPolicy", "CartPole-v1", fisher="exact", **SMALL)


def test_registered_and_cli(tmp_path: Path) -> None:
    assert ALGORITHMS["kfac-nac"] is KFACNAC
    assert get_preset("kfac-nac", "Hopper-v5")["lr"] == 0.25
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--algo", "kfac-nac",
           "--env", "CartPole-v1", "--total-steps", "128", "--n-steps", "64", "--vf-minibatch",
           "64", "--n-envs", "1", "--kfac-decay", "0.5", "--run-dir", str(run)]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (run / "model.pt").exists()
    assert "kfac_decay" in (run / "config.json").read_text()


def test_metrics_are_its_own() -> None:
    """K-FAC NAC reports what it computes: no CG or line-search columns."""
    m: list[dict] = []
    KFACNAC("MlpPolicy", "CartPole-v1", **SMALL).learn(128, callback=m.append)
    foreign = {"cg_iterations", "cg_residual", "ls_backtracks", "ls_success"}
    foreign |= {"time_fisher_cg", "time_line_search"}
    assert not foreign & set(m[0])
    assert {"kl_rescales", "step_status", "predicted_kl", "time_step", "time_kl_enforce"} <= set(
        m[0]
    )
