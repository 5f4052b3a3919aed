"""Typed, validated configurations of the agents (one dataclass per algorithm).

Each agent builds its config from its keyword arguments (``TRPO("MlpPolicy", env, max_kl=0.02)``
makes a :class:`TRPOConfig`) and validates it in :meth:`AgentConfig.validate`, before any env
starts. ``scripts/train.py`` generates its flags from the same fields: the help text is each
field's ``help`` metadata, the choices its ``choices`` metadata, and fields listed in
:attr:`AgentConfig.cli_hidden` (set per algorithm) get no flag.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from gymnasium.vector import AutoresetMode, VectorEnv

import envs as envs_mod
from agents.policies import ACTIVATIONS, CNN_ARCHS, POLICIES
from agents.rollout import NONFINITE_MODES
from npg import fisher_names, get_flavour

PRECONDITIONERS = ("none", "diagonal", "kfac")
KFAC_LABELS = ("mc", "exact", "empirical")
CRITIC_OPTIMIZERS = ("kfac", "adam")
KL_CLIPS = ("exact", "kfac-model", "kfac-model-damped")


def _opt(default: Any, help: str, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with its CLI help text (and choices) as metadata."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy_default(default), metadata=meta)
    return field(default=default, metadata=meta)


def copy_default(value: Any) -> Any:
    """A fresh copy of a mutable default (one per config)."""
    return list(value) if isinstance(value, list) else dict(value)


def _bad(option: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"{option}={value!r} is invalid; accepted: {accepted}")


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; a one-line ``ValueError`` if it is unknown or absent."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise _bad("device", device, "'cpu', 'cuda' or 'cuda:<index>'") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise _bad("device", device, "'cpu', 'cuda' or 'cuda:<index>'")
    if not torch.cuda.is_available():
        raise _bad("device", device, "'cpu' (CUDA is not available on this machine)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise _bad("device", device, f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return dev


@dataclass
class AgentConfig:
    """The options shared by the on-policy natural-gradient agents (NPG, TRPO, K-FAC NAC)."""

    policy: str = _opt(
        "MlpPolicy", "policy network (CnnPolicy: rank-3 image observations)", POLICIES
    )
    n_envs: int = _opt(1, "parallel envs; transitions per update are n_envs * n_steps")
    n_steps: int = _opt(2048, "vector env steps per rollout")
    gamma: float = _opt(0.99, "discount factor")
    gae_lambda: float = _opt(0.95, "GAE lambda")
    max_kl: float = _opt(0.01, "trust-region radius delta (mean KL(old||new) over the batch)")
    fisher: str = _opt("exact", "Fisher flavour of the policy step", fisher_names())
    fisher_kwargs: dict[str, Any] = _opt({}, "extra npg.make_fisher options")
    fisher_samples: int = _opt(1, "sampled labels per input for the Monte-Carlo Fishers")
    fisher_subsample: float = _opt(1.0, "fraction of the batch the Fisher is built on")
    cg_iters: int = _opt(15, "conjugate-gradient iterations on (F + damping I) x = g")
    cg_damping: float = _opt(0.1, "Tikhonov damping of the Fisher in CG")
    cg_tol: float = _opt(1e-10, "CG residual tolerance")
    preconditioner: str | None = _opt(None, "CG preconditioner ('none': none)", PRECONDITIONERS)
    line_search_max_iter: int = _opt(10, "TRPO backtracking line-search steps")
    line_search_shrink: float = _opt(0.8, "step shrink factor per backtracking step")
    vf_lr: float = _opt(1e-3, "critic learning rate (Adam)")
    vf_epochs: int = _opt(10, "critic epochs per update (0: the critic is not fitted)")
    vf_minibatch: int = _opt(128, "critic minibatch (a divisor of n_envs * n_steps)")
    normalize_advantage: bool = _opt(True, "standardize the advantages per batch")
    normalize_obs: bool = _opt(False, "running mean/std observation normalization")
    normalize_reward: bool = _opt(False, "scale rewards by the running std of the return")
    clip_obs: float = _opt(10.0, "clip normalized observations to [-clip_obs, clip_obs]")
    net_arch: list[int] = _opt([64, 64], "hidden layer widths of the actor")
    vf_arch: list[int] | None = _opt(None, "hidden layer widths of the critic (default: net_arch)")
    activation: str = _opt("tanh", "hidden-layer activation", ACTIVATIONS)
    ortho_init: bool = _opt(True, "orthogonal initialization of the MLPs")
    log_std_init: float = _opt(0.0, "initial log standard deviation of Gaussian policies")
    cnn_arch: str = _opt(
        "auto", "CnnPolicy features (auto: nature from 36x36 up, else small)", CNN_ARCHS
    )
    features_dim: int | None = _opt(None, "CnnPolicy features width (None: nature 512, small 128)")
    normalize_images: bool = _opt(True, "CnnPolicy: scale uint8 0-255 images by 1/255")
    vectorization: str = _opt("sync", "vector env kind", envs_mod.VECTORIZATIONS)
    env_kwargs: dict[str, Any] = _opt({}, "options passed to gym.make (EnvPool: its task options)")
    on_nonfinite: str = _opt("raise", "NaN/inf transitions: raise or drop them", NONFINITE_MODES)
    stats_window: int = _opt(100, "episodes in the running mean return")
    seed: int = _opt(0, "seed of the envs, the torch generator and the Fisher sampling")
    device: str = _opt("cpu", "device of the update (rollouts stay on the CPU)")
    num_threads: int | None = _opt(1, "torch intra-op threads (None: leave torch's setting)")
    tensorboard_log: str | None = _opt(None, "TensorBoard folder (SB3 style)")
    verbose: int = _opt(0, "1: print one line per update")
    overlap_critic: bool = _opt(
        False,
        "run the critic's scripted Adam fit of update k during rollout k+1 (bit-identical; "
        "update k is reported, and its callback runs, after that rollout)",
    )

    #: options that get no flag in scripts/train.py (set there, or not options of this algorithm)
    cli_hidden: ClassVar[frozenset[str]] = frozenset(
        {"verbose", "env_kwargs", "fisher_kwargs", "num_threads", "seed", "n_envs"}
        | {"tensorboard_log"}
    )

    def __post_init__(self) -> None:
        self.net_arch = [int(x) for x in self.net_arch]
        self.vf_arch = None if self.vf_arch is None else [int(x) for x in self.vf_arch]
        self.fisher_kwargs = dict(self.fisher_kwargs or {})
        self.env_kwargs = dict(self.env_kwargs or {})
        if self.preconditioner == "none":
            self.preconditioner = None
        self.device = str(self.device)

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> AgentConfig:
        """The config of these keyword arguments; a one-line ``ValueError`` names unknown ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)}; accepted: {', '.join(sorted(names))}"
            )
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-able dict (what checkpoints and ``config.json`` store)."""
        return dataclasses.asdict(self)

    def validate(self, policy: str, env: Any) -> None:
        """One-line ``ValueError`` naming the first bad option and the accepted values."""
        if policy not in POLICIES:
            raise _bad("policy", policy, ", ".join(repr(p) for p in POLICIES))
        if policy == "CnnPolicy" and self.normalize_obs:
            raise _bad(
                "normalize_obs", True, "False with CnnPolicy (images are scaled by 1/255 instead)"
            )
        if self.cnn_arch not in CNN_ARCHS:
            raise _bad("cnn_arch", self.cnn_arch, ", ".join(CNN_ARCHS))
        if self.features_dim is not None and int(self.features_dim) < 1:
            raise _bad("features_dim", self.features_dim, "None or an int >= 1")
        if not (
            isinstance(self.max_kl, int | float) and self.max_kl > 0 and math.isfinite(self.max_kl)
        ):
            raise _bad("max_kl", self.max_kl, "a finite float > 0")
        self._validate_policy_step()
        if not 0 <= self.gamma <= 1:
            raise _bad("gamma", self.gamma, "a float in [0, 1]")
        if not 0 <= self.gae_lambda <= 1:
            raise _bad("gae_lambda", self.gae_lambda, "a float in [0, 1]")
        if not (self.vf_lr > 0 and math.isfinite(self.vf_lr)):
            raise _bad("vf_lr", self.vf_lr, "a finite float > 0")
        if int(self.vf_epochs) < 0:
            raise _bad("vf_epochs", self.vf_epochs, "an int >= 0")
        if int(self.n_steps) < 1:
            raise _bad("n_steps", self.n_steps, "an int >= 1")
        n_envs = env.num_envs if isinstance(env, VectorEnv) else int(self.n_envs)
        if n_envs < 1:
            raise _bad("n_envs", self.n_envs, "an int >= 1")
        batch = int(self.n_steps) * n_envs
        mb = int(self.vf_minibatch)
        if mb < 1 or batch % mb != 0:
            divisors = [d for d in (32, 64, 128, 256, 512, 1024, batch) if batch % d == 0]
            raise _bad(
                "vf_minibatch",
                self.vf_minibatch,
                f"a divisor of n_steps*n_envs={batch} (e.g. {', '.join(map(str, divisors))})",
            )
        if self.activation not in ACTIVATIONS:
            raise _bad("activation", self.activation, ", ".join(ACTIVATIONS))
        if self.vectorization not in envs_mod.VECTORIZATIONS:
            raise _bad("vectorization", self.vectorization, ", ".join(envs_mod.VECTORIZATIONS))
        if self.on_nonfinite not in NONFINITE_MODES:
            raise _bad("on_nonfinite", self.on_nonfinite, ", ".join(NONFINITE_MODES))
        if not self.clip_obs > 0:
            raise _bad("clip_obs", self.clip_obs, "a float > 0")
        if any(int(h) < 1 for h in self.net_arch):
            raise _bad("net_arch", self.net_arch, "positive layer widths")
        if self.vf_arch is not None and any(int(h) < 1 for h in self.vf_arch):
            raise _bad("vf_arch", self.vf_arch, "None or positive layer widths")
        if not math.isfinite(float(self.log_std_init)):
            raise _bad("log_std_init", self.log_std_init, "a finite float")
        if int(self.stats_window) < 1:
            raise _bad("stats_window", self.stats_window, "an int >= 1")
        if self.num_threads is not None and int(self.num_threads) < 1:
            raise _bad("num_threads", self.num_threads, "None or an int >= 1")
        resolve_device(self.device)
        _validate_env(env)

    def _validate_policy_step(self) -> None:
        """The options of the CG natural step (NPG, TRPO)."""
        if not (self.cg_damping >= 0 and math.isfinite(self.cg_damping)):
            raise _bad("cg_damping", self.cg_damping, "a finite float >= 0")
        if int(self.cg_iters) < 1:
            raise _bad("cg_iters", self.cg_iters, "an int >= 1")
        if not self.cg_tol >= 0:
            raise _bad("cg_tol", self.cg_tol, "a float >= 0")
        if self.fisher not in fisher_names():
            raise _bad("fisher", self.fisher, ", ".join(fisher_names()))
        direct = get_flavour(self.fisher).direct  # solved directly: no CG to precondition
        pre = self.preconditioner
        if pre is not None and pre not in PRECONDITIONERS:
            raise _bad("preconditioner", pre, "None, " + ", ".join(PRECONDITIONERS))
        if pre is not None and direct:
            raise _bad(
                "preconditioner", pre, f"None with fisher={self.fisher!r} (solved directly, no CG)"
            )
        if self.cg_damping == 0 and (direct or pre is not None):
            # their inverses divide by Kronecker/diagonal factors that can be exactly singular
            raise _bad("cg_damping", 0, f"> 0 with fisher={self.fisher!r}, preconditioner={pre!r}")
        if not 0 < self.fisher_subsample <= 1:
            raise _bad("fisher_subsample", self.fisher_subsample, "a fraction in (0, 1]")
        if int(self.fisher_samples) < 1:
            raise _bad("fisher_samples", self.fisher_samples, "an int >= 1")
        if int(self.line_search_max_iter) < 1:
            raise _bad("line_search_max_iter", self.line_search_max_iter, "an int >= 1")
        if not 0 < self.line_search_shrink < 1:
            raise _bad("line_search_shrink", self.line_search_shrink, "a float in (0, 1)")


def _validate_env(env: Any) -> None:
    """A Gymnasium id that exists, or a SAME_STEP-autoreset ``VectorEnv``."""
    if isinstance(env, str):
        envs_mod.check_env_id(env)
    elif not isinstance(env, VectorEnv):
        accepted = "a Gymnasium env id, a gymnasium.vector.VectorEnv, a gym.Env or an SB3 VecEnv"
        raise _bad("env", env, accepted)
    elif env.metadata.get("autoreset_mode") != AutoresetMode.SAME_STEP:
        # the rollout reads final observations from infos["final_obs"] (SAME_STEP); NEXT_STEP
        # would insert fake reset transitions and bootstrap across episodes
        raise _bad(
            "env",
            f"a VectorEnv with autoreset_mode={env.metadata.get('autoreset_mode')}",
            "a VectorEnv with autoreset_mode=AutoresetMode.SAME_STEP "
            "(envs.make_vec_env builds one)",
        )


@dataclass
class NPGConfig(AgentConfig):
    """NPG: the shared options (its step is not line-searched)."""

    cli_hidden: ClassVar[frozenset[str]] = AgentConfig.cli_hidden | {
        "line_search_max_iter",
        "line_search_shrink",
    }


@dataclass
class TRPOConfig(AgentConfig):
    """TRPO: the shared options (with the backtracking line search)."""


@dataclass
class KFACNACConfig(AgentConfig):
    """K-FAC NAC (ACKTR-style): K-FAC steps for actor and critic; no CG, no line search."""

    fisher: str = _opt("kfac", "Fisher flavour of the policy step (K-FAC only)", ("kfac",))
    lr: float = _opt(0.25, "policy step multiplier of s = lr * d (ACKTR: 0.25)")
    damping: float = _opt(0.01, "Tikhonov damping of the actor's K-FAC inverse (pi-damped)")
    kfac_labels: str = _opt("mc", "labels of the actor's K-FAC factors", KFAC_LABELS)
    kfac_decay: float = _opt(0.99, "running-average decay of the Kronecker factors")
    kfac_inv_interval: int = _opt(10, "recompute the factor inverses every this many updates")
    kfac_samples: int = _opt(1, "sampled actions per state for the 'mc' factors")
    critic_optimizer: str = _opt("kfac", "K-FAC Gauss-Newton or Adam", CRITIC_OPTIMIZERS)
    vf_max_kl: float | None = _opt(None, "KL clipping radius of the critic step (None: none)")
    vf_damping: float = _opt(0.01, "damping of the critic's K-FAC inverse")
    vf_kfac_decay: float = _opt(0.5, "the critic's K-FAC factor decay")
    vf_inv_interval: int = _opt(1, "the critic's K-FAC inverse interval (updates)")
    kl_clip: str = _opt("exact", "the KL model the step is clipped with", KL_CLIPS)
    kl_enforce: bool = _opt(True, "rescale the step until the realized mean KL <= max_kl")

    cli_hidden: ClassVar[frozenset[str]] = AgentConfig.cli_hidden | {
        "fisher",
        "fisher_samples",
        "fisher_subsample",
        "cg_iters",
        "cg_damping",
        "cg_tol",
        "preconditioner",
        "line_search_max_iter",
        "line_search_shrink",
        "overlap_critic",  # its critic fits (K-FAC or Adam) run in order, in this thread
    }

    def _validate_policy_step(self) -> None:
        """The K-FAC step's own options (instead of CG's)."""
        if self.fisher != "kfac":
            raise _bad("fisher", self.fisher, "'kfac'")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise _bad("lr", self.lr, "a finite float > 0")
        if not self.damping >= 0:
            raise _bad("damping", self.damping, "a float >= 0")
        if self.kfac_labels not in KFAC_LABELS:
            raise _bad("kfac_labels", self.kfac_labels, ", ".join(KFAC_LABELS))
        if not 0 <= self.kfac_decay < 1:
            raise _bad("kfac_decay", self.kfac_decay, "[0, 1)")
        if int(self.kfac_inv_interval) < 1:
            raise _bad("kfac_inv_interval", self.kfac_inv_interval, "an int >= 1")
        if int(self.kfac_samples) < 1:
            raise _bad("kfac_samples", self.kfac_samples, "an int >= 1")
        if self.critic_optimizer not in CRITIC_OPTIMIZERS:
            raise _bad("critic_optimizer", self.critic_optimizer, ", ".join(CRITIC_OPTIMIZERS))
        if self.vf_max_kl is not None and not self.vf_max_kl > 0:
            raise _bad("vf_max_kl", self.vf_max_kl, "None or a float > 0")
        if not 0 <= self.vf_kfac_decay < 1:
            raise _bad("vf_kfac_decay", self.vf_kfac_decay, "[0, 1)")
        if int(self.vf_inv_interval) < 1:
            raise _bad("vf_inv_interval", self.vf_inv_interval, "an int >= 1")
        if self.kl_clip not in KL_CLIPS:
            raise _bad("kl_clip", self.kl_clip, ", ".join(KL_CLIPS))
        if not self.vf_damping >= 0:
            raise _bad("vf_damping", self.vf_damping, "a float >= 0")
