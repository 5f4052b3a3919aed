"""The scripted critic fit equals autograd + ``torch.optim.Adam`` on the same minibatches."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agents import TRPO
from agents.critic import BackgroundFit, fit_critic, scripted_activation
from agents.policies import mlp


def _reference_fit(critic, opt, obs, returns, perms, mb) -> torch.Tensor:
    losses = []
    for perm in perms:
        for start in range(0, obs.shape[0], mb):
            idx = perm[start : start + mb]
            loss = F.mse_loss(critic(obs[idx]).squeeze(-1), returns[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("sizes", [[5, 16, 8, 1], [5, 1]])
def test_scripted_fit_matches_autograd_adam(activation, sizes):
    torch.manual_seed(0)
    critic = mlp(sizes, activation, 1.0, ortho_init=False).double()
    twin = copy.deepcopy(critic)
    opt = torch.optim.Adam(critic.parameters(), lr=3e-2)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=3e-2)
    obs = torch.randn(50, 5, dtype=torch.float64)  # 50 rows, minibatch 16: a short last one
    returns = torch.randn(50, dtype=torch.float64)
    perms = torch.stack([torch.randperm(50) for _ in range(3)])
    act = scripted_activation(critic, opt)
    assert act == (activation if len(sizes) > 2 else "tanh")
    for _ in range(2):  # twice: the second call continues Adam's step count and moments
        losses = fit_critic(critic, opt, act, obs, returns, perms, 16)
        ref = _reference_fit(twin, twin_opt, obs, returns, perms, 16)
        torch.testing.assert_close(losses, ref, rtol=1e-10, atol=1e-12)
    for p, q in zip(critic.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        s, t = opt.state[p], twin_opt.state[q]
        assert float(s["step"]) == float(t["step"]) == 2 * 3 * 4
        torch.testing.assert_close(s["exp_avg_sq"], t["exp_avg_sq"], rtol=1e-10, atol=1e-14)
    # the optimizer state is a plain torch.optim.Adam one: it round-trips and keeps working
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert fit_critic(critic, opt, act, obs, returns, perms[:1], 16).shape == (4,)


def test_background_fit_is_the_same_computation():
    torch.manual_seed(1)
    critic = mlp([4, 8, 1], "tanh", 1.0, ortho_init=True)
    twin = copy.deepcopy(critic)
    opt, twin_opt = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (critic, twin))
    obs, returns = torch.randn(64, 4), torch.randn(64)
    perms = torch.stack([torch.randperm(64) for _ in range(2)])
    losses, seconds = BackgroundFit(critic, opt, "tanh", obs, returns, perms, 32).result()
    assert seconds > 0
    assert torch.equal(losses, fit_critic(twin, twin_opt, "tanh", obs, returns, perms, 32))
    assert all(
        torch.equal(p, q) for p, q in zip(critic.parameters(), twin.parameters(), strict=True)
    )


def test_background_fit_reraises():
    critic = mlp([4, 8, 1], "tanh", 1.0, ortho_init=True)
    opt = torch.optim.Adam(critic.parameters())
    bad_obs = torch.randn(8, 3)  # wrong width: the matmul fails inside the thread
    fit = BackgroundFit(critic, opt, "tanh", bad_obs, torch.randn(8), torch.zeros(1, 8).long(), 4)
    with pytest.raises(RuntimeError):
        fit.result()


def test_unsupported_critics_fall_back():
    net = mlp([4, 8, 1], "elu", 1.0, ortho_init=True)
    assert scripted_activation(net, torch.optim.Adam(net.parameters())) is None
    net = mlp([4, 8, 1], "tanh", 1.0, ortho_init=True)
    assert scripted_activation(net, torch.optim.SGD(net.parameters(), lr=0.1)) is None
    assert scripted_activation(net, torch.optim.Adam(net.parameters(), weight_decay=1e-4)) is None
    two_outputs = nn.Sequential(nn.Linear(4, 2))
    assert scripted_activation(two_outputs, torch.optim.Adam(two_outputs.parameters())) is None


def test_agent_critic_paths_agree():
    """TRPO updates with the scripted critic in the background equal those with the sequential
    autograd critic (forced by hiding the scripted path), bit for bit."""
    kw = dict(n_envs=2, n_steps=64, vf_minibatch=32, vf_epochs=3, seed=3)
    fast = TRPO("MlpPolicy", "CartPole-v1", **kw)
    slow = TRPO("MlpPolicy", "CartPole-v1", **kw)
    import agents.base as base

    m_fast = fast.learn(256).policy.state_dict()
    original = base.scripted_activation
    base.scripted_activation = lambda critic, opt: None
    try:
        m_slow = slow.learn(256).policy.state_dict()
    finally:
        base.scripted_activation = original
    for k in m_fast:
        assert torch.equal(m_fast[k], m_slow[k]), k
    fast.close()
    slow.close()


def test_a_failing_policy_step_waits_for_the_critic_fit(monkeypatch) -> None:
    """If the policy step raises, the background fit is finished before the error propagates:
    nothing changes the critic afterwards."""
    agent = TRPO("MlpPolicy", "CartPole-v1", n_envs=2, n_steps=64, vf_minibatch=8, vf_epochs=30)

    def broken(*args, **kwargs):
        raise RuntimeError("policy step failed")

    monkeypatch.setattr(agent, "_policy_update", broken)
    with pytest.raises(RuntimeError, match="policy step failed"):
        agent.learn(128)
    assert not any(t.name == "critic-fit" and t.is_alive() for t in threading.enumerate())
    snapshot = [p.detach().clone() for p in agent.policy.critic.parameters()]
    time.sleep(0.05)
    assert all(
        torch.equal(a, b) for a, b in zip(snapshot, agent.policy.critic.parameters(), strict=True)
    )
    agent.close()
