"""``device=``: the update on the device, rollouts on the CPU, checkpoints across devices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agents import KFACNAC, NPG, TRPO, OnPolicyNaturalAlgorithm
from agents.base import flat_params
from agents.config import resolve_device

SMALL = dict(n_envs=2, n_steps=64, vf_minibatch=64, vf_epochs=2, seed=1)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available"),
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", [TRPO, NPG, KFACNAC])
def test_update_on_device_rollout_on_cpu(
    tmp_path: Path, algo: type[OnPolicyNaturalAlgorithm], device: str
) -> None:
    agent = algo("MlpPolicy", "Pendulum-v1", device=device, **SMALL).learn(256)
    assert agent.device.type == device
    assert {p.device.type for p in agent.policy.parameters()} == {device}
    assert {p.device.type for p in agent.rollout_policy.parameters()} == {"cpu"}
    # the CPU copy the rollout acts with holds the updated parameters exactly
    assert torch.equal(flat_params(agent.rollout_policy), flat_params(agent.policy).cpu())
    action, _ = agent.predict(agent.env.single_observation_space.sample())
    assert agent.env.single_action_space.contains(action)

    path = agent.save(tmp_path / "model.pt")
    for target in ("cpu", device):
        loaded = algo.load(path, device=target)
        assert {p.device.type for p in loaded.policy.parameters()} == {target}
        assert torch.equal(flat_params(loaded.policy).cpu(), flat_params(agent.policy).cpu())
        assert torch.equal(flat_params(loaded.rollout_policy), flat_params(agent.rollout_policy))
        loaded.learn(128, reset_num_timesteps=False)  # the restored optimizer state steps
        loaded.close()
    agent.close()


def test_explicit_cpu_is_the_default_run() -> None:
    a = TRPO("MlpPolicy", "CartPole-v1", **SMALL).learn(256)
    b = TRPO("MlpPolicy", "CartPole-v1", device="cpu", **SMALL).learn(256)
    assert a.rollout_policy is a.policy  # on the CPU: one module, no copy
    assert torch.equal(flat_params(a.policy), flat_params(b.policy))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_update_matches_cpu_update() -> None:
    """One TRPO update from the same rollout on both devices: the same step (float32 noise)."""
    cpu = TRPO("MlpPolicy", "CartPole-v1", device="cpu", **SMALL)
    gpu = TRPO("MlpPolicy", "CartPole-v1", device="cuda", **SMALL)
    cpu.learn(128)
    gpu.learn(128)
    torch.testing.assert_close(
        flat_params(gpu.policy).cpu(), flat_params(cpu.policy), rtol=1e-4, atol=1e-5
    )


def test_bad_device_one_line_error() -> None:
    with pytest.raises(ValueError, match=r"^device='tpu' is invalid; accepted: 'cpu', 'cuda'"):
        TRPO("MlpPolicy", "CartPole-v1", device="tpu")
    with pytest.raises(ValueError, match=r"^device='cuda:x' is invalid"):
        resolve_device("cuda:x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"CUDA is not available on this machine"):
        TRPO("MlpPolicy", "CartPole-v1", device="cuda")
