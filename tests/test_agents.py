"""NPG / TRPO agents: trust region, exact rollback, closed-form natural gradient, checkpoints."""

from __future__ import annotations

import copy
import math
import os
import pickle
import signal
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

import agents.base
import envs as envs_mod
from agents import (
    ALGORITHMS,
    NPG,
    TRPO,
    CheckpointError,
    CheckpointManager,
    NonFiniteParametersError,
    TrainingInterrupted,
    load_checkpoint,
)
from agents.base import TIMING_KEYS
from agents.policies import ActorCriticPolicy
from envs import bandit_natural_gradient
from npg.families import Categorical

SMALL = dict(n_envs=2, n_steps=64, vf_minibatch=64, vf_epochs=2, seed=0)


def _params(agent) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in agent.policy.named_parameters()}


def _same_metrics(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ma, mb in zip(a, b, strict=True):
        for k in ma:
            if k in TIMING_KEYS:
                continue
            va, vb = ma[k], mb[k]
            if isinstance(va, float) and math.isnan(va):
                assert isinstance(vb, float) and math.isnan(vb), k
            else:
                assert va == vb, (k, va, vb)


# --- the trust region -------------------------------------------------------------------------
def test_every_accepted_trpo_step_has_kl_within_delta(monkeypatch) -> None:
    agent = TRPO("MlpPolicy", "CartPole-v1", max_kl=0.01, **SMALL)
    original = TRPO._policy_update
    checked = []

    def wrapped(self, obs, actions, advantages):
        before = copy.deepcopy(self.policy.actor)
        m = original(self, obs, actions, advantages)
        with torch.no_grad():  # recompute independently with the family's KL
            kl = float(Categorical().kl(before(obs), self.policy.actor(obs)).mean())
        if m["ls_success"]:
            assert kl <= self.max_kl
            assert kl == pytest.approx(m["kl"], rel=1e-5)
        else:
            assert kl == 0.0
        checked.append(m["ls_success"])
        return m

    monkeypatch.setattr(TRPO, "_policy_update", wrapped)
    agent.learn(8 * 128)
    assert len(checked) == 8 and any(checked)


@pytest.mark.parametrize("how", ["kl", "surrogate"])
def test_failed_line_search_restores_parameters_bit_identically(monkeypatch, how) -> None:
    agent = TRPO("MlpPolicy", "CartPole-v1", normalize_advantage=False, **SMALL)
    fam = agent.family
    if how == "kl":  # every candidate leaves the trust region
        monkeypatch.setattr(fam, "kl", lambda p, q: torch.full(p.shape[:1], float("inf")))
    else:  # no candidate improves the surrogate (ratios → 0, advantages mostly > 0 here)
        real = type(fam).log_prob

        def log_prob(out, y):
            lp = real(fam, out, y)
            return lp if torch.is_grad_enabled() else lp - 1e9

        monkeypatch.setattr(fam, "log_prob", log_prob)
    agent.collector.start(agent.env.reset(seed=0)[0])
    agent._started = True
    batch = agent.collector.collect()
    before = _params(agent)
    original = TRPO._policy_update
    seen = {}

    def spy(self, obs, actions, advantages):
        m = original(self, obs, actions, advantages)
        seen.update(m)
        for name, p in self.policy.actor.named_parameters():
            assert torch.equal(p, before["actor." + name]), name
        return m

    monkeypatch.setattr(TRPO, "_policy_update", spy)
    agent.train_on_batch(batch)
    assert seen["ls_success"] is False
    assert seen["ls_backtracks"] == agent.line_search_max_iter
    assert seen["step_status"] == "ok"


# --- closed form on the analytic bandit -------------------------------------------------------
def test_bandit_natural_gradient_matches_closed_form() -> None:
    agent = TRPO(
        "MlpPolicy",
        "npg/Bandit-v0",
        net_arch=[],
        cg_damping=0.0,
        cg_tol=1e-12,
        cg_iters=50,
        **SMALL,
    )
    actor = agent.policy.actor  # logits = W·1 + b  (2k parameters, rank-(k-1) Fisher)
    means = torch.as_tensor(agent.env.envs[0].unwrapped.means, dtype=torch.float32)
    obs = torch.ones(32, 1)
    logits = actor(obs[:1])[0]
    j = (torch.softmax(logits, -1) * means).sum()  # J(θ) = Σ_a π_a r_a, exactly
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(j, list(actor.parameters()))])
    actions = torch.zeros(32, dtype=torch.long)
    ns, info = agent._natural_step(obs, actions, g.detach())
    assert info["cg_residual"] < 1e-5
    k = means.numel()
    x_w, x_b = ns.direction[:k], ns.direction[k:]
    closed = bandit_natural_gradient(logits.detach(), means)  # r - mean(r), in logit space
    torch.testing.assert_close(x_w + x_b, closed, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x_w, x_b, atol=1e-4, rtol=1e-4)  # minimum-norm split


@pytest.mark.parametrize("algo", ["trpo", "npg"])
def test_agent_learns_the_bandit(algo) -> None:
    agent = ALGORITHMS[algo](
        "MlpPolicy", "npg/Bandit-v0", n_envs=4, n_steps=32, vf_minibatch=32, max_kl=0.05, seed=1
    )
    agent.learn(40 * 128)
    action, _ = agent.predict(np.ones(1, np.float32))
    assert int(action) == agent.env.envs[0].unwrapped.optimal_action
    probs = torch.softmax(agent.policy.actor(torch.ones(1, 1)), -1)[0]
    assert float(probs[int(action)].detach()) > 0.9


def test_trpo_learns_gaussian_bandit() -> None:
    agent = TRPO(
        "MlpPolicy",
        "npg/GaussianBandit-v0",
        n_envs=4,
        n_steps=32,
        vf_minibatch=32,
        max_kl=0.05,
        seed=0,
    )
    agent.learn(40 * 128)
    action, _ = agent.predict(np.ones(1, np.float32))
    assert float(action[0]) == pytest.approx(0.7, abs=0.15)
    assert float(agent.policy.actor.log_std.detach().mean()) < 0  # it got more certain


def test_zero_gradient_skips_the_update() -> None:
    if "test/FlatBandit-v0" not in gym.registry:
        gym.register(
            "test/FlatBandit-v0", entry_point=envs_mod.BanditEnv, kwargs={"means": (1.0,) * 3}
        )
    agent = TRPO("MlpPolicy", "test/FlatBandit-v0", **SMALL)
    before = _params(agent)
    metrics = []
    agent.learn(128, callback=metrics.append)
    assert metrics[0]["step_status"] == "zero_gradient"
    for name, p in agent.policy.actor.named_parameters():
        assert torch.equal(p, before["actor." + name])


# --- save / load / resume -----------------------------------------------------------------------
def test_save_load_predict_identical(tmp_path: Path) -> None:
    agent = TRPO("MlpPolicy", "Pendulum-v1", normalize_obs=True, **SMALL)
    agent.learn(256)
    path = agent.save(tmp_path / "m.pt")
    loaded = TRPO.load(path)
    obs = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    a1, _ = agent.predict(obs)
    a2, _ = loaded.predict(obs)
    np.testing.assert_array_equal(a1, a2)
    for (n, p), (_, q) in zip(
        agent.policy.state_dict().items(), loaded.policy.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), n
    assert loaded.num_timesteps == agent.num_timesteps
    # the generic loader finds the class from the checkpoint
    from agents import OnPolicyNaturalAlgorithm

    assert type(OnPolicyNaturalAlgorithm.load(path)) is TRPO
    with pytest.raises(ValueError, match="'trpo' agent, not 'npg'"):
        NPG.load(path)


@pytest.mark.parametrize(
    "env_id,extra",
    [
        ("CartPole-v1", {}),
        ("Pendulum-v1", {"normalize_obs": True, "normalize_reward": True}),  # truncations
        ("Acrobot-v1", {"fisher": "mc", "fisher_subsample": 0.5}),
        ("Hopper-v5", {"normalize_obs": True, "preconditioner": "kfac"}),
    ],
)
def test_resumed_run_matches_uninterrupted(tmp_path: Path, env_id: str, extra: dict) -> None:
    if env_id == "Hopper-v5":
        pytest.importorskip("mujoco")
    full: list[dict] = []
    TRPO("MlpPolicy", env_id, **SMALL, **extra).learn(8 * 128, callback=full.append)
    first: list[dict] = []
    a = TRPO("MlpPolicy", env_id, **SMALL, **extra).learn(3 * 128, callback=first.append)
    a.save(tmp_path / "c.pt")
    a.close()
    b = TRPO.load(tmp_path / "c.pt")
    rest: list[dict] = []
    b.learn(5 * 128, callback=rest.append, reset_num_timesteps=False)
    _same_metrics(full, first + rest)
    assert rest[-1]["timesteps"] == 8 * 128


def test_sigint_in_rollout_saves_resumable_checkpoint(tmp_path: Path) -> None:
    full: list[dict] = []
    TRPO("MlpPolicy", "CartPole-v1", **SMALL).learn(6 * 128, callback=full.append)

    agent = TRPO("MlpPolicy", "CartPole-v1", **SMALL)
    real_step = agent.env.step
    calls = {"n": 0}

    def step(actions):
        calls["n"] += 1
        if calls["n"] == 64 * 3 + 10:  # inside the 4th rollout
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(actions)

    agent.env.step = step
    got: list[dict] = []
    ckpts = CheckpointManager(tmp_path / "ck")
    with pytest.raises(TrainingInterrupted, match="SIGINT") as e:
        agent.learn(6 * 128, callback=got.append, checkpoints=ckpts)
    assert e.value.checkpoint is not None and len(got) == 3
    state, _ = ckpts.load_latest()
    assert state["num_updates"] == 3
    b = TRPO.load(state)
    b.learn(3 * 128, callback=got.append, reset_num_timesteps=False)
    _same_metrics(full, got)


def test_sigterm_in_update_finishes_update_then_saves(tmp_path: Path) -> None:
    agent = TRPO("MlpPolicy", "CartPole-v1", **SMALL)
    got: list[dict] = []

    def cb(m):
        got.append(m)
        if m["update"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    ckpts = CheckpointManager(tmp_path / "ck")
    with pytest.raises(TrainingInterrupted, match="SIGTERM"):
        agent.learn(10 * 128, callback=cb, checkpoints=ckpts)
    assert [p.name for p in ckpts.paths()] == ["ckpt_00000002.pt"]
    assert load_checkpoint(ckpts.paths()[0])["num_updates"] == 2


def test_checkpoints_keep_last_and_fall_back_past_corrupt(tmp_path: Path) -> None:
    agent = TRPO("MlpPolicy", "CartPole-v1", **SMALL)
    ckpts = CheckpointManager(tmp_path, keep_last=2)
    agent.learn(4 * 128, checkpoints=ckpts, checkpoint_every=1)
    paths = ckpts.paths()
    assert [p.name for p in paths] == ["ckpt_00000003.pt", "ckpt_00000004.pt"]
    data = paths[-1].read_bytes()
    paths[-1].write_bytes(data[: len(data) // 2])  # truncated newest
    with pytest.raises(CheckpointError, match="ckpt_00000004.pt"):
        load_checkpoint(paths[-1])
    with pytest.raises(CheckpointError, match="ckpt_00000004.pt"):
        ckpts.load_latest(fallback=False)
    with pytest.warns(UserWarning, match="ckpt_00000004.pt"):
        state, path = ckpts.load_latest()
    assert path.name == "ckpt_00000003.pt" and state["num_updates"] == 3


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/npg_evil_ran",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "npg-agent", "payload": _Evil()}, path, pickle_protocol=2)
    if os.path.exists("/tmp/npg_evil_ran"):
        os.remove("/tmp/npg_evil_ran")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)
    assert not os.path.exists("/tmp/npg_evil_ran")
    assert pickle  # (the payload above is a pickle REDUCE of os.system)


# --- faults -----------------------------------------------------------------------------------
class NaNEnv(gym.Env):
    """CartPole-like stub that returns a NaN observation (or reward) at step ``at``."""

    observation_space = spaces.Box(-1, 1, (2,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, at: int = 5, field: str = "obs") -> None:
        self.at, self.field, self.t = at, field, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        obs = np.full(2, 0.1 * (self.t % 5), np.float32)
        reward = 1.0
        if self.t == self.at:
            if self.field == "obs":
                obs[1] = np.nan
            else:
                reward = float("inf")
        return obs, reward, self.t % 7 == 0, False, {}


if "test/NaNObs-v0" not in gym.registry:
    gym.register("test/NaNObs-v0", entry_point=NaNEnv, kwargs={"at": 5, "field": "obs"})
    gym.register("test/InfReward-v0", entry_point=NaNEnv, kwargs={"at": 9, "field": "reward"})


@pytest.mark.parametrize(
    "env_id,field", [("test/NaNObs-v0", "observation"), ("test/InfReward-v0", "reward")]
)
def test_nonfinite_env_output_raises_clear_error(env_id: str, field: str) -> None:
    from agents import NonFiniteError

    agent = TRPO("MlpPolicy", env_id, n_envs=1, n_steps=32, vf_minibatch=32, seed=0)
    with pytest.raises(
        NonFiniteError, match=rf"env '{env_id}' returned a non-finite {field} at env step"
    ):
        agent.learn(64)


def test_nonfinite_drop_mode_counts_and_stays_finite() -> None:
    agent = TRPO(
        "MlpPolicy",
        "test/NaNObs-v0",
        n_envs=1,
        n_steps=32,
        vf_minibatch=32,
        seed=0,
        on_nonfinite="drop",
    )
    metrics: list[dict] = []
    agent.learn(64, callback=metrics.append)
    assert metrics[0]["dropped"] == 1 and agent.collector.dropped_total == 1
    assert all(torch.isfinite(p).all() for p in agent.policy.parameters())


def test_nonfinite_parameters_are_rolled_back(monkeypatch) -> None:
    agent = TRPO("MlpPolicy", "CartPole-v1", **SMALL)
    agent.learn(128)
    before = _params(agent)

    real_gae = agents.base.compute_gae_t

    def nan_returns(*args, **kwargs):  # the (background) critic fit then produces NaN weights
        adv, ret = real_gae(*args, **kwargs)
        return adv, torch.full_like(ret, float("nan"))

    monkeypatch.setattr(agents.base, "compute_gae_t", nan_returns)
    with pytest.raises(NonFiniteParametersError, match="rolled back"):
        agent.learn(128, reset_num_timesteps=False)
    for name, p in agent.policy.named_parameters():
        assert torch.equal(p, before[name]), name


# --- spaces and configuration -------------------------------------------------------------------
@pytest.mark.parametrize(
    "space",
    [
        spaces.Tuple((spaces.Discrete(2), spaces.Discrete(3))),
        spaces.Dict({"a": spaces.Discrete(2)}),
        spaces.Box(-1, 1, (2, 2)),
        spaces.Text(5),
        spaces.MultiDiscrete([[2, 3], [2, 2]]),
    ],
)
def test_unsupported_action_space_clear_error(space) -> None:
    obs = spaces.Box(-1, 1, (3,))
    with pytest.raises(ValueError, match="unsupported action space") as e:
        ActorCriticPolicy(obs, space)
    assert "supported: Discrete, Box" in str(e.value)


def test_unsupported_observation_space_clear_error() -> None:
    with pytest.raises(ValueError, match="unsupported observation space Text"):
        ActorCriticPolicy(spaces.Text(4), spaces.Discrete(2))


@pytest.mark.parametrize(
    "action_space",
    [
        spaces.Discrete(3),
        spaces.Box(-1, 1, (2,)),
        spaces.MultiDiscrete([2, 3]),
        spaces.MultiBinary(3),
    ],
)
def test_supported_action_spaces_sample_and_score(action_space) -> None:
    policy = ActorCriticPolicy(spaces.Box(-1, 1, (4,)), action_space)
    obs = torch.randn(5, 4)
    a = policy.act(obs, generator=torch.Generator().manual_seed(0))
    lp = policy.family.log_prob(policy.actor(obs), a)
    assert lp.shape == (5,) and torch.isfinite(lp).all()
    env_a = policy.to_env_actions(a)
    for row in env_a:
        assert action_space.contains(np.asarray(row, dtype=action_space.dtype))


@pytest.mark.parametrize(
    "kwargs,option",
    [
        ({"max_kl": 0.0}, "max_kl"),
        ({"max_kl": -1.0}, "max_kl"),
        ({"cg_damping": -0.1}, "cg_damping"),
        ({"cg_iters": 0}, "cg_iters"),
        ({"fisher": "hessian"}, "fisher"),
        ({"preconditioner": "jacobi"}, "preconditioner"),
        ({"fisher": "kfac", "preconditioner": "diagonal"}, "preconditioner"),
        ({"fisher": "kfac", "cg_damping": 0.0}, "cg_damping"),
        ({"fisher": "diagonal", "cg_damping": 0.0}, "cg_damping"),
        ({"preconditioner": "kfac", "cg_damping": 0.0}, "cg_damping"),
        ({"n_steps": 100, "n_envs": 2, "vf_minibatch": 64}, "vf_minibatch"),
        ({"fisher_subsample": 0.0}, "fisher_subsample"),
        ({"line_search_shrink": 1.0}, "line_search_shrink"),
        ({"gamma": 1.5}, "gamma"),
        ({"vf_lr": float("inf")}, "vf_lr"),
        ({"activation": "swish"}, "activation"),
        ({"vectorization": "ray"}, "vectorization"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite"),
    ],
)
def test_bad_config_one_line_error_before_env(monkeypatch, kwargs, option) -> None:
    def no_env(*a, **k):
        raise AssertionError("an env was created before validation")

    monkeypatch.setattr(envs_mod, "make_vec_env", no_env)
    with pytest.raises(ValueError, match=rf"^{option}=.* is invalid; accepted: ") as e:
        TRPO("MlpPolicy", "CartPole-v1", **kwargs)
    assert "\n" not in str(e.value)


def test_unknown_env_id_in_agent() -> None:
    with pytest.raises(ValueError, match="unknown env id 'NoSuchEnv-v9'"):
        TRPO("MlpPolicy", "NoSuchEnv-v9")


@pytest.mark.parametrize(
    "fisher,pre",
    [
        ("empirical", None),
        ("diagonal", None),
        ("kfac", None),
        ("exact", "kfac"),
        ("exact", "diagonal"),
    ],
)
def test_fisher_flavours_run(fisher, pre) -> None:
    m: list[dict] = []
    TRPO("MlpPolicy", "Pendulum-v1", fisher=fisher, preconditioner=pre, **SMALL).learn(
        256, callback=m.append
    )
    assert all(math.isfinite(x["kl"]) for x in m)
    assert all(x["kl"] <= 0.01 for x in m if x["ls_success"])


def test_npg_takes_fixed_kl_steps_without_line_search() -> None:
    m: list[dict] = []
    NPG("MlpPolicy", "CartPole-v1", max_kl=0.01, cg_damping=0.1, **SMALL).learn(
        6 * 128, callback=m.append
    )
    assert all(x["ls_backtracks"] == 0 for x in m)
    # the quadratic model says ½sᵀ(F+λI)s = δ; the measured KL is close to (and below) it
    assert all(0.002 < x["kl"] < 0.012 for x in m)


class BoomEnv(gym.Env):
    """Raises inside ``step`` at its ``at``-th step."""

    observation_space = spaces.Box(-1, 1, (2,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, at: int = 40) -> None:
        self.at, self.t = at, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        if self.t == self.at:
            raise RuntimeError("boom inside the worker")
        return np.full(2, 0.01 * self.t, np.float32), 1.0, self.t % 9 == 0, False, {}


if "test/Boom-v0" not in gym.registry:
    gym.register("test/Boom-v0", entry_point=BoomEnv)


def test_async_worker_error_surfaces_and_checkpoint_survives(tmp_path: Path) -> None:
    from agents import EnvStepError

    agent = TRPO(
        "MlpPolicy", "test/Boom-v0", n_envs=2, n_steps=16, vf_minibatch=32, vectorization="async"
    )
    ckpts = CheckpointManager(tmp_path)
    with pytest.raises(EnvStepError, match="'test/Boom-v0' raised at env step") as e:
        agent.learn(10 * 32, checkpoints=ckpts, checkpoint_every=1)
    assert "boom inside the worker" in str(e.value)
    state, path = ckpts.load_latest(fallback=False)
    assert state["num_updates"] == 2 and path.name == "ckpt_00000002.pt"
    assert state["env_states"] is None  # async envs: a resume restarts the episodes


class OffsetImageEnv(gym.Env):
    """2-D Box observations and a ``Discrete(3, start=-1)`` action; reward for action +1."""

    observation_space = spaces.Box(-1, 1, (2, 3), np.float32)
    action_space = spaces.Discrete(3, start=-1)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros((2, 3), np.float32), {}

    def step(self, action):
        assert self.action_space.contains(action), action
        return np.ones((2, 3), np.float32), float(action == 1), True, False, {}


if "test/OffsetImage-v0" not in gym.registry:
    gym.register("test/OffsetImage-v0", entry_point=OffsetImageEnv)


def test_multidim_box_obs_and_discrete_start() -> None:
    agent = TRPO("MlpPolicy", "test/OffsetImage-v0", max_kl=0.05, **SMALL)
    agent.learn(20 * 128)
    action, _ = agent.predict(np.zeros((2, 3), np.float32))
    assert int(action) == 1


def test_vector_env_with_next_step_autoreset_is_refused() -> None:
    """The rollout needs SAME_STEP autoreset (final observations in the infos); Gymnasium's
    default NEXT_STEP would insert fake reset transitions, so it is refused up front."""
    env = gym.make_vec("CartPole-v1", 2, vectorization_mode="sync")
    try:
        with pytest.raises(ValueError, match="autoreset_mode=AutoresetMode.SAME_STEP"):
            TRPO("MlpPolicy", env, **SMALL)
    finally:
        env.close()


def test_resume_without_env_state_restarts_episode_bookkeeping(tmp_path: Path) -> None:
    """Envs without a state adapter resume with fresh episodes: the episode counters and the
    reward scaler's running return of the interrupted episodes must not carry over."""
    agent = TRPO("MlpPolicy", "CartPole-v1", normalize_reward=True, **SMALL).learn(128)
    state = agent._capture_state()
    state["env_states"] = None  # as for Box2D / async envs
    agent.learn(64, reset_num_timesteps=False)  # episodes move on past the boundary
    agent._restore_state(state)
    assert (agent.collector.ep_length == 0).all() and (agent.collector.ep_return == 0).all()
    assert (agent.reward_scaler.ret == 0).all()
    agent.close()
