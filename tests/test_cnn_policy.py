"""CnnPolicy: image preprocessing, its Fishers against dense references, and the agents on images.

The Fisher references are the suite's own (``tests/conftest.py``, ``tests/test_fisher_kfac.py``):
K-FAC's factors from patches cut out by slicing and per-sample Jacobians of the layer outputs,
the exact Fisher ``(1/N) Σ J_iᵀ F_out J_i`` from ``torch.autograd.functional.jacobian``, the
empirical / Monte-Carlo Fishers from a loop of ``autograd.grad`` on ``torch.distributions``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_close, dense_fisher, dense_outer, torch_sample
from gymnasium import spaces
from test_fisher_exact import _check_operator, _mc_labels
from test_fisher_kfac import kfac_dense_reference, kfac_reference
from torch import nn

from agents import KFACNAC, TRPO
from agents.policies import ActorCriticPolicy, ImageInput, image_layout, is_image_space
from npg import make_fisher

IMAGE = spaces.Box(0, 255, (6, 6, 2), np.uint8)  # channel-last, as Atari / MinAtar give them


def _policy(action_space: spaces.Space, obs_space: spaces.Space = IMAGE) -> ActorCriticPolicy:
    """A small conv policy: 16·3x3 conv, 6 features, one tanh layer of 5 (about 1.9k weights)."""
    torch.manual_seed(0)
    return ActorCriticPolicy(
        obs_space, action_space, [5], None, "tanh", True, 0.0, "CnnPolicy", "small", 6
    )


def _images(n: int, space: spaces.Box = IMAGE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *space.shape), dtype=np.uint8)


def _obs(n: int, seed: int = 0) -> torch.Tensor:
    """A batch as the rollout stores it: flat raw 0-255 values in the default float dtype."""
    return torch.from_numpy(_images(n, seed=seed).reshape(n, -1)).to(torch.get_default_dtype())


# --- observations --------------------------------------------------------------------------------
def test_uint8_hwc_images_reach_the_conv_as_float_chw_over_255() -> None:
    policy = _policy(spaces.Discrete(3))
    conv = next(m for m in policy.actor.net if isinstance(m, nn.Conv2d))
    seen = []
    conv.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    imgs = _images(4)
    policy.actor(torch.from_numpy(imgs.reshape(4, -1)))  # the raw uint8 bytes, flat
    policy.actor(torch.from_numpy(imgs.reshape(4, -1)).float())  # as the rollout buffers hold them
    expected = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    for x in seen:
        assert x.dtype == torch.float32 and x.shape == (4, 2, 6, 6)
        assert_close(x, expected, rtol=1e-6, atol=1e-7)
    assert float(seen[0].max()) <= 1.0
    # the critic has its own features, with the same preprocessing
    assert isinstance(policy.critic[0], ImageInput) and policy.critic[0].scale == 1 / 255
    assert not any(p is q for p in policy.actor.parameters() for q in policy.critic.parameters())


def test_image_layouts_and_scaling_follow_sb3() -> None:
    assert is_image_space(IMAGE) and image_layout(IMAGE) == ((2, 6, 6), True)
    chw = spaces.Box(0, 255, (3, 8, 8), np.uint8)
    assert image_layout(chw) == ((3, 8, 8), False)
    boolean = spaces.Box(0, 1, (10, 10, 4), bool)  # MinAtar: 0/1 channels, read as they are
    assert not is_image_space(boolean)
    assert not is_image_space(spaces.Box(0.0, 1.0, (6, 6, 2), np.float32))
    policy = _policy(spaces.Discrete(2), boolean)
    assert policy.actor.net[0].scale == 1.0 and policy.actor.net[0].channels_last
    x = torch.from_numpy(np.eye(10, dtype=bool)[:, :, None].repeat(4, 2)[None].reshape(1, -1))
    assert_close(policy.actor.net[0](x), torch.from_numpy(np.eye(10)).float().expand(1, 4, 10, 10))
    # CHW images are not transposed
    p = _policy(spaces.Discrete(2), chw)
    raw = torch.arange(3 * 64, dtype=torch.float32)[None]
    assert_close(p.actor.net[0](raw), raw.reshape(1, 3, 8, 8) / 255)
    # normalize_images=False keeps the 0-255 values
    q = ActorCriticPolicy(IMAGE, spaces.Discrete(2), policy="CnnPolicy", normalize_images=False)
    assert q.actor.net[0].scale == 1.0


def test_nature_cnn_for_atari_sized_images() -> None:
    atari = spaces.Box(0, 255, (84, 84, 4), np.uint8)
    policy = ActorCriticPolicy(atari, spaces.Discrete(6), [], policy="CnnPolicy")
    convs = [m for m in policy.actor.net if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (32, (8, 8), (4, 4)),
        (64, (4, 4), (2, 2)),
        (64, (3, 3), (1, 1)),
    ]
    linears = [m for m in policy.actor.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3136, 512), (512, 6)]
    obs = torch.from_numpy(_images(2, atari).reshape(2, -1)).float()
    assert policy.actor(obs).shape == (2, 6) and policy.value(obs).shape == (2,)
    with pytest.raises(ValueError, match="at least 36x36"):
        ActorCriticPolicy(IMAGE, spaces.Discrete(2), policy="CnnPolicy", cnn_arch="nature")


def test_mlp_path_is_unchanged_and_cnn_policy_rejects_flat_observations() -> None:
    policy = ActorCriticPolicy(spaces.Box(-1, 1, (4,)), spaces.Discrete(2))
    assert not policy.image and isinstance(policy.actor.net[0], nn.Linear)
    assert policy.actor.linear_stack() is not None and policy._layers is not None
    assert "actor.net.0.weight" in policy.state_dict()
    with pytest.raises(ValueError, match="CnnPolicy needs an image observation space"):
        ActorCriticPolicy(spaces.Box(-1, 1, (4,)), spaces.Discrete(2), policy="CnnPolicy")
    with pytest.raises(ValueError, match="CnnPolicy needs an image observation space"):
        TRPO("CnnPolicy", "CartPole-v1", n_steps=8, vf_minibatch=8)
    with pytest.raises(ValueError, match="normalize_obs"):
        TRPO("CnnPolicy", "npg/ImageBandit-v0", normalize_obs=True)
    with pytest.raises(ValueError, match="policy='Cnn'"):
        TRPO("Cnn", "npg/ImageBandit-v0")


# --- the Fisher flavours on a conv policy -------------------------------------------------------
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("labels", ["exact", "mc", "empirical"])
def test_cnn_policy_kfac_equals_the_kronecker_reference(labels: str) -> None:
    policy = _policy(spaces.Discrete(3))
    actor, family, x = policy.actor, policy.family, _obs(4)
    kwargs: dict = {}
    ys = None
    if labels == "mc":
        ys = _mc_labels(family, actor(x), 2, seed=5)
        kwargs = dict(kfac_labels="mc", n_samples=2, seed=5)
    elif labels == "empirical":
        ys = [torch_sample(family, actor(x), seed=2)]
        kwargs = dict(kfac_labels="empirical", targets=ys[0])
    op = make_fisher("kfac", actor, x, family, **kwargs)
    ref = kfac_reference(actor.net, x, family, ys)
    got = op.kronecker_factors()
    assert [type(m) for m, _, _ in got] == [nn.Conv2d, nn.Linear, nn.Linear, nn.Linear]
    assert [m for m, _, _ in got] == [m for m, _, _ in ref]
    for (_, A, G), (_, A_ref, G_ref) in zip(got, ref, strict=True):
        assert_close(A, A_ref)
        assert_close(G, G_ref)
    dense = kfac_dense_reference(actor, ref)
    assert torch.linalg.matrix_rank(dense[:304, :304]) > 1  # the conv block is not trivial
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
    assert_close(op.mv(v), dense @ v)
    assert_close(op.to_dense(), dense)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("action_space", [spaces.Discrete(3), spaces.Box(-1, 1, (2,))])
def test_cnn_policy_exact_mc_empirical_diagonal_fishers_equal_dense(action_space) -> None:
    policy = _policy(action_space)
    actor, family, x = policy.actor, policy.family, _obs(3, seed=1)
    exact = dense_fisher(actor, x, family)
    assert torch.linalg.matrix_rank(exact) > 1
    _check_operator(make_fisher("exact", actor, x, family), exact)
    _check_operator(
        make_fisher("diagonal", actor, x, family, diagonal="exact"), torch.diag(exact.diagonal())
    )
    y = torch_sample(family, actor(x), seed=3)
    _check_operator(
        make_fisher("empirical", actor, x, family, targets=y), dense_outer(actor, x, family, [y])
    )
    ys = _mc_labels(family, actor(x), 2, seed=11)
    _check_operator(
        make_fisher("mc", actor, x, family, n_samples=2, seed=11), dense_outer(actor, x, family, ys)
    )


# --- the agents ---------------------------------------------------------------------------------
SMALL = dict(n_envs=2, n_steps=32, vf_minibatch=32, vf_epochs=2, net_arch=[], features_dim=32)


@pytest.mark.parametrize(
    ("cls", "options"),
    [(TRPO, dict(fisher="exact", cg_iters=5)), (TRPO, dict(fisher="kfac")), (KFACNAC, {})],
)
def test_agents_train_save_load_and_predict_with_cnn_policy(tmp_path, cls, options) -> None:
    agent = cls("CnnPolicy", "npg/ImageBandit-v0", seed=0, **SMALL, **options)
    assert agent.policy.image and not agent.obs_normalizer.enabled
    seen: list[dict] = []
    agent.learn(128, callback=seen.append)
    assert len(seen) == 2 and all(m["kl"] > 0 for m in seen)
    assert agent.config["policy"] == "CnnPolicy"
    path = agent.save(tmp_path / "cnn.pt")
    loaded = cls.load(path)
    assert loaded.policy.image and loaded.num_timesteps == 128
    for (k, v), (k2, v2) in zip(
        agent.policy.state_dict().items(), loaded.policy.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    imgs = _images(5, agent.env.single_observation_space, seed=3)
    actions, _ = agent.predict(imgs)
    assert actions.shape == (5,) and np.array_equal(actions, loaded.predict(imgs)[0])
    single, _ = loaded.predict(imgs[0])
    assert single.shape == () and single == actions[0]
    loaded.learn(64, reset_num_timesteps=False)  # and it keeps training
    assert loaded.num_timesteps == 192


def test_sb3_policy_kwargs_of_cnn_policy() -> None:
    agent = TRPO(
        "CnnPolicy",
        "npg/ImageBandit-v0",
        n_steps=16,
        vf_minibatch=16,
        policy_kwargs=dict(normalize_images=False, features_extractor_kwargs=dict(features_dim=7)),
    )
    assert agent.policy.actor.net[0].scale == 1.0
    assert [m.out_features for m in agent.policy.actor.net if isinstance(m, nn.Linear)][0] == 7
    with pytest.raises(ValueError, match="features_extractor_kwargs"):
        TRPO(
            "CnnPolicy",
            "npg/ImageBandit-v0",
            policy_kwargs=dict(features_extractor_kwargs=dict(x=1)),
        )


@pytest.mark.slow
@pytest.mark.parametrize(("cls", "options"), [(TRPO, dict(fisher="exact")), (KFACNAC, {})])
def test_cnn_policy_learns_the_image_bandit(cls, options) -> None:
    """The lit quadrant is read off the pixels: a random policy returns 2 of 8, these > 7.5
    (deterministic, 20 fresh episodes) after 15k env steps (about 8 s of CPU each)."""
    from agents.evaluation import evaluate_policy

    agent = cls(
        "CnnPolicy",
        "npg/ImageBandit-v0",
        n_envs=4,
        n_steps=128,
        vf_minibatch=128,
        vf_epochs=2,
        net_arch=[],
        features_dim=32,
        max_kl=0.05,
        seed=0,
        **options,
    )
    before = float(np.mean(evaluate_policy(agent, episodes=20)))
    agent.learn(15_360)
    after = float(np.mean(evaluate_policy(agent, episodes=20)))
    assert before < 4.0 and after > 7.5, (before, after)


def test_train_cli_runs_and_resumes_a_cnn_policy(tmp_path) -> None:
    """The preset of npg/ImageBandit-v0 selects CnnPolicy (``--policy`` is a flag too); the run
    resumes with it and evaluates."""
    from scripts import evaluate as evaluate_cli
    from scripts import train as train_cli

    run = tmp_path / "run"
    argv = ["--env", "npg/ImageBandit-v0", "--n-steps", "32", "--vf-minibatch", "32"]
    assert (
        train_cli.main([*argv, "--total-steps", "256", "--run-dir", str(run), "--no-progress"]) == 0
    )
    config = json.loads((run / "config.json").read_text())
    assert config["hyperparameters"]["policy"] == "CnnPolicy"
    assert config["resolved"]["policy"] == "CnnPolicy"
    assert train_cli.main(["--resume", str(run), "--total-steps", "384", "--no-progress"]) == 0
    assert TRPO.load(run / "model.pt").num_timesteps == 384
    assert evaluate_cli.main([str(run), "--episodes", "2"]) == 0
    with pytest.raises(SystemExit):
        train_cli.main(["--policy", "Cnn", "--run-dir", str(tmp_path / "bad"), "--no-progress"])


def test_minatar_ids_are_registered_and_train_with_cnn_policy() -> None:
    pytest.importorskip("minatar")
    from envs import make_env

    env = make_env("MinAtar/Breakout-v1", seed=0)
    assert env.observation_space.shape == (10, 10, 4) and env.action_space.n == 3
    env.close()
    agent = TRPO("CnnPolicy", "MinAtar/Breakout-v1", seed=0, **SMALL)
    assert agent.policy.actor.net[0].scale == 1.0  # boolean channels are not divided by 255
    assert agent.policy.actor.net[0].chw == (4, 10, 10)
    agent.learn(64)
    assert agent.num_timesteps == 64
