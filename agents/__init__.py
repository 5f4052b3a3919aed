"""On-policy natural-gradient agents (NPG, TRPO) on Gymnasium, registered by name."""

from __future__ import annotations

from agents.base import NonFiniteParametersError, OnPolicyNaturalAlgorithm
from agents.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from agents.npg_agent import NPG
from agents.rollout import EnvStepError, NonFiniteError
from agents.signals import TrainingInterrupted
from agents.trpo import TRPO

#: Algorithms by CLI name; other agents register here with :func:`register_algorithm`.
ALGORITHMS: dict[str, type[OnPolicyNaturalAlgorithm]] = {"trpo": TRPO, "npg": NPG}


def register_algorithm(name: str, cls: type[OnPolicyNaturalAlgorithm]) -> None:
    """Make ``cls`` available to ``scripts/train.py --algo name`` and to checkpoint loading."""
    ALGORITHMS[name] = cls


__all__ = [
    "ALGORITHMS",
    "KFACNAC",
    "NPG",
    "TRPO",
    "CheckpointError",
    "CheckpointManager",
    "EnvStepError",
    "NonFiniteError",
    "NonFiniteParametersError",
    "OnPolicyNaturalAlgorithm",
    "TrainingInterrupted",
    "load_checkpoint",
    "register_algorithm",
]
from agents.kfac_nac import KFACNAC  # noqa: E402  (registers "kfac-nac")
