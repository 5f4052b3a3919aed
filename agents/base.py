"""The on-policy natural-gradient machinery shared by NPG and TRPO (SB3-style API).

One iteration: collect ``n_steps × n_envs`` transitions (:mod:`agents.rollout`), compute GAE
advantages (:mod:`agents.gae`), take a natural-gradient policy step (the subclass's
:meth:`OnPolicyNaturalAlgorithm._policy_update`), fit the critic with Adam on minibatches.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from gymnasium.vector import SyncVectorEnv, VectorEnv
from torch import Tensor

import envs as envs_mod
from agents.checkpoint import (
    FORMAT,
    CheckpointManager,
    load_checkpoint,
    save_atomic,
    tensors_to,
)
from agents.config import AgentConfig, resolve_device
from agents.critic import BackgroundFit, fit_critic, scripted_activation
from agents.gae import compute_gae
from agents.guard import DivergenceError, divergence_cause, returns_too_large
from agents.normalize import ObsNormalizer, RewardScaler
from agents.policies import ActorCriticPolicy
from agents.rng_state import capture_rng, restore_rng
from agents.rollout import NonFiniteError, RolloutBatch, RolloutCollector
from agents.sb3_compat import (
    SB3Callback,
    as_vector_env,
    default_logger,
    flatten_batch,
    is_sb3_callback,
    policy_kwargs_to_config,
    raw_observation_space,
    record_metrics,
    tensorboard_logger,
)
from agents.signals import TrainingInterrupted, deferred_signals
from npg import make_fisher, natural_step
from npg.fisher.base import FisherOperator
from npg.optim import NGD

Callback = Callable[[dict[str, Any]], bool | None]
# metrics that depend on the wall clock (everything else is reproducible from the seed)
TIMING_KEYS = (
    "steps_per_s",
    "fps",
    "time_rollout",
    "time_fisher_cg",
    "time_line_search",
    "time_step",
    "time_kl_enforce",
    "time_critic",
    "time_total",
)


class NonFiniteParametersError(DivergenceError):
    """An update produced NaN/inf parameters; they were rolled back before raising."""


def flat_params(module: torch.nn.Module) -> Tensor:
    """All parameters of ``module`` concatenated into one new flat tensor."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


@torch.no_grad()
def set_flat_params(module: torch.nn.Module, flat: Tensor) -> None:
    """Copy ``flat`` into the parameters of ``module`` in place (bit-exact)."""
    start = 0
    for p in module.parameters():
        n = p.numel()
        p.copy_(flat[start : start + n].view_as(p))
        start += n


def _mean_loss(losses: Tensor) -> float:
    """The mean of per-step losses in float64 (NaN when there were none)."""
    return float(losses.double().mean()) if losses.numel() else float("nan")


def normalized_advantages(advantages: Tensor) -> Tensor:
    """Advantages shifted to mean 0 and scaled to std 1; all-equal advantages give exact zeros.

    ``A - A.mean()`` is not exactly zero for equal entries (the mean's reduction rounds), and
    dividing that noise by a tiny std would turn "no signal" into a full-size random step.
    """
    if bool(advantages.max() == advantages.min()):
        return torch.zeros_like(advantages)
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)


def explained_variance(pred: Tensor, target: Tensor) -> float:
    """``1 - Var[target - pred] / Var[target]`` (NaN when the target is constant)."""
    var = float(target.var())
    return float("nan") if var == 0 else 1.0 - float((target - pred).var()) / var


@dataclass
class _Update:
    """One update between its policy step and the end of its critic fit."""

    number: int
    metrics: dict[str, Any]  # the policy step's; the critic's are added when the fit is done
    background: BackgroundFit | None  # the critic fit in flight (None: it runs when finished)
    obs: Tensor
    returns: Tensor
    perms: Tensor
    values_flat: Tensor
    actor_before: Tensor
    critic_before: Tensor
    t_start: float = 0.0  # perf_counter when its rollout began
    t_rollout: float = 0.0
    t_total: float | None = None  # rollout + update, if it was measured before the fit ended
    #: overlap_critic: the update boundary's state but for the models (``_capture_progress``)
    progress: dict[str, Any] | None = None


class OnPolicyNaturalAlgorithm:
    """Base class: rollouts, GAE, critic fitting, checkpoints; subclasses do the policy step.

    The keyword options build the algorithm's :attr:`config_class` (:mod:`agents.config`),
    validated there before any env starts; ``agent.cfg`` holds it and ``agent.<option>``
    reads it.

    Args:
        policy: ``"MlpPolicy"``, or ``"CnnPolicy"`` for rank-3 ``Box`` image observations
            (HWC images transposed to CHW, ``uint8`` 0-255 images scaled by 1/255, never
            running-normalized: ``normalize_obs`` must stay ``False``); its own options are
            ``cnn_arch`` (``auto``, ``nature``, ``small``), ``features_dim`` and
            ``normalize_images`` (:mod:`agents.policies`).
        env: a Gymnasium env id, a Gymnasium ``VectorEnv`` (built by the caller), a single
            ``gym.Env`` or a Stable-Baselines3 ``VecEnv``.
        n_envs, n_steps: transitions per update are ``n_envs × n_steps``.
        gamma, gae_lambda: discount and GAE λ.
        max_kl: the trust-region radius δ (mean KL(old‖new) over the batch).
        fisher: ``exact``, ``mc``, ``empirical``, ``diagonal``, ``kfac`` or ``ekfac``.
        fisher_kwargs: extra :func:`npg.make_fisher` options (``diagonal``, ``kfac_labels``,
            ``kfac_inverse``).
        fisher_samples: labels per input for the Monte-Carlo flavours.
        fisher_subsample: fraction of the batch the Fisher is built on (the gradient uses all).
        cg_iters, cg_damping, cg_tol: CG on ``(F + λI) x = g``.
        preconditioner: ``None``/``"none"``, ``"diagonal"`` or ``"kfac"`` (for CG flavours).
        vf_lr, vf_epochs, vf_minibatch: Adam fit of the critic on the λ-returns.
        normalize_advantage, normalize_obs, normalize_reward, clip_obs: data normalization.
        net_arch, vf_arch, activation, ortho_init, log_std_init: the MLP policy.
        vectorization: ``"sync"``, ``"async"`` or ``"envpool"`` vector env
            (:func:`envs.make_vec_env`).
        env_kwargs: passed to ``gym.make`` (EnvPool: its task options).
        on_nonfinite: ``"raise"`` (default) or ``"drop"`` transitions with NaN/inf.
        stats_window: episodes in the running mean return.
        policy_kwargs: SB3's ``net_arch`` (list, or ``dict(pi=, vf=)``), ``activation_fn``,
            ``ortho_init``, ``log_std_init``; they override the options of the same meaning.
        tensorboard_log: a folder: :meth:`learn` logs to ``<folder>/<tb_log_name>_<i>`` through
            an SB3 ``Logger`` (needs the ``sb3`` and ``logging`` extras).
        device: where the update runs (``"cpu"``, ``"cuda"``, ``"cuda:<i>"``): the policy,
            critic, Fisher products and CG live there; rollouts act with a CPU copy of the
            policy, synchronized after every update, and checkpoints hold CPU tensors.
        seed, num_threads, verbose: as usual (``num_threads`` sets torch's intra-op
            threads; ``None`` leaves it alone).
    """

    algo_name = "base"
    #: the typed configuration of this algorithm (built from the constructor's keywords)
    config_class: type[AgentConfig] = AgentConfig

    def __init__(
        self,
        policy: str = "MlpPolicy",
        env: str | VectorEnv | Any = "CartPole-v1",
        *,
        policy_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.update(policy_kwargs_to_config(dict(policy_kwargs or {})))
        self.cfg = self.config_class.from_kwargs({**kwargs, "policy": policy})
        env, self._user_env = as_vector_env(env)
        env_id = env if isinstance(env, str) else getattr(env, "env_id", None)
        self._env_id = env_id
        self.cfg.validate(policy, env)  # before any env starts
        cfg = self.cfg
        if cfg.num_threads is not None:
            torch.set_num_threads(int(cfg.num_threads))
        self.device = resolve_device(cfg.device)
        self.env_id = env_id or "env"

        self.env: VectorEnv = (
            envs_mod.make_vec_env(
                env, cfg.n_envs, None, cfg.vectorization, step_infos=False, **cfg.env_kwargs
            )
            if isinstance(env, str)
            else env
        )
        if isinstance(self._user_env, str):
            self._user_env = self.env
        cfg.n_envs = self.env.num_envs
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        obs_space = self.env.single_observation_space
        # The rollout acts with a CPU policy; the update runs on ``self.device``. On the CPU
        # both are the same module; otherwise the CPU copy follows every update.
        self.rollout_policy = ActorCriticPolicy.from_config(
            obs_space, self.env.single_action_space, cfg.to_dict()
        )
        self.policy = (
            self.rollout_policy
            if self.device.type == "cpu"
            else copy.deepcopy(self.rollout_policy).to(self.device)
        )
        self.family = self.policy.family
        self.vf_optimizer = torch.optim.Adam(self.policy.critic.parameters(), lr=cfg.vf_lr)
        self.obs_normalizer = ObsNormalizer((self.policy.obs_dim,), cfg.normalize_obs, cfg.clip_obs)
        self.reward_scaler = RewardScaler(self.n_envs, cfg.gamma, cfg.normalize_reward)
        self.collector = RolloutCollector(
            self.env,
            self.rollout_policy,
            self.obs_normalizer,
            self.reward_scaler,
            cfg.n_steps,
            self.generator,
            self.env_id,
            cfg.on_nonfinite,
            cfg.stats_window,
        )
        self.num_timesteps = 0
        self.num_updates = 0
        self._logger: Any = None
        self._started = False
        self._interrupt: int | None = None
        self._boundary: dict[str, Any] | None = None
        self._pending: _Update | None = None  # an update whose critic fit may be in flight
        self._fps_origin = (0.0, 0)

    def __getattr__(self, name: str) -> Any:
        """Options read as attributes (``agent.max_kl``) come from :attr:`cfg`."""
        cfg = self.__dict__.get("cfg")
        if cfg is not None and name in cfg.__dataclass_fields__:
            return getattr(cfg, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def config(self) -> dict[str, Any]:
        """The resolved options as a JSON-able dict, with ``env_id`` (``None``: a custom env)."""
        return {**self.cfg.to_dict(), "env_id": self._env_id}

    def _sync_rollout_policy(self, critic: bool = True) -> None:
        """Copy the updated parameters into the CPU policy the rollout acts with (the actor's
        only with ``critic=False``: the critic fit is still running)."""
        if self.rollout_policy is not self.policy:
            dst_policy, src_policy = (
                (self.rollout_policy, self.policy)
                if critic
                else (self.rollout_policy.actor, self.policy.actor)
            )
            with torch.no_grad():
                for dst, src in zip(dst_policy.parameters(), src_policy.parameters(), strict=True):
                    dst.copy_(src)

    # --- the training loop --------------------------------------------------------------------
    def _start(self) -> None:
        """Reset the envs (seeded) once, before the first rollout."""
        obs, _ = self.env.reset(seed=self.seed)
        self.env.action_space.seed(self.seed)
        self.collector.start(obs)
        self._started = True

    def learn(
        self,
        total_timesteps: int,
        callback: Callback | Any | None = None,
        reset_num_timesteps: bool = True,
        checkpoints: CheckpointManager | None = None,
        checkpoint_every: int = 0,
        tb_log_name: str | None = None,
    ) -> OnPolicyNaturalAlgorithm:
        """Train for ``total_timesteps`` env steps (more, when ``reset_num_timesteps=False``:
        that many *additional* steps, as in SB3).

        ``callback(metrics)`` runs after every update; returning ``False`` stops training. An
        SB3 ``BaseCallback`` (or a list of them) gets SB3's calls instead: ``on_step`` after
        every vector env step (``False`` stops training there, the partial rollout unused).
        With ``tensorboard_log``, metrics go to ``<tensorboard_log>/<tb_log_name>_<i>``.
        With ``checkpoints``, a checkpoint is written every ``checkpoint_every`` updates (0:
        never periodically) and on SIGINT/SIGTERM, which then raise
        :class:`TrainingInterrupted` after saving.

        With ``overlap_critic`` (and no SB3 callback), the scripted critic fit of update k runs
        during rollout k+1, and update k ends after it: its metrics, callback, boundary state and
        checkpoint come then (all as without the option, bit for bit; ``save()`` meanwhile waits
        for the fit). A callback's ``False`` drops rollout k+1 by restoring update k's boundary
        (exact where the envs support state snapshots, as on SIGINT), and a diverged critic is
        raised there. The last update of a ``learn()`` ends before it returns.
        """
        if reset_num_timesteps:
            self.num_timesteps = 0
            self.num_updates = 0
            target = int(total_timesteps)
        else:
            target = self.num_timesteps + int(total_timesteps)
        if self.tensorboard_log is not None and self._logger is None:
            self._logger = tensorboard_logger(self.tensorboard_log, tb_log_name or self.algo_name)
        sb3_callback = SB3Callback(callback, self) if is_sb3_callback(callback) else None
        if sb3_callback is not None:
            callback = None
        if not self._started:
            self._start()
        self._interrupt = None
        self._boundary = self._capture_state()
        t_start, steps_start = time.perf_counter(), self.num_timesteps
        self._fps_origin = (t_start, steps_start)
        if sb3_callback is not None:
            sb3_callback.training_start(locals())
        # overlap_critic: update k's critic fit runs during rollout k+1 (nothing in a rollout
        # reads the critic); update k is finished and reported right after that rollout. SB3
        # callbacks see the model at every env step, so they keep the fit inside the update.
        overlap = self.overlap_critic and sb3_callback is None
        with deferred_signals(lambda: self._interrupt is not None, self._record_signal):
            try:
                while self.num_timesteps < target:
                    t0 = time.perf_counter()
                    steps_before = self.num_timesteps
                    if sb3_callback is None:
                        batch = self.collector.collect(lambda: self._interrupt is not None)
                    else:
                        batch = self._collect_with(sb3_callback)
                    t_rollout = time.perf_counter() - t0
                    if self._pending is not None:  # the last update's critic fit ran meanwhile
                        keep_going = self._end_update(callback, checkpoints, checkpoint_every)
                        if keep_going is False:  # drop this rollout: stop after that update
                            self._restore_state(self._boundary)
                            break
                    if batch is None and self._interrupt is None:  # an SB3 callback said stop
                        self._boundary = self._capture_state()
                        break
                    if batch is None:
                        self._stop_on_signal(checkpoints)
                    # fewer than n_steps × n_envs if a Ray worker was lost
                    self.num_timesteps = steps_before + batch.rewards.numel()
                    if sb3_callback is not None:
                        sb3_callback.rollout_end()
                    update = self._start_update(batch)
                    self.num_updates += 1
                    update.metrics = {**self._rollout_metrics(batch), **update.metrics}
                    update.t_start, update.t_rollout = t0, t_rollout
                    self._pending = update
                    if (
                        overlap
                        and update.background is not None  # the scripted fit is running
                        and self.num_timesteps < target  # another rollout follows
                        and self._interrupt is None
                        and divergence_cause(self.policy, update.metrics, self.max_kl, False)
                        is None  # the actor is sound (the critic is checked when it is fitted)
                    ):
                        # The update ends after the next rollout; all of its boundary state
                        # but the models is captured now (the models when the fit is done).
                        self._sync_rollout_policy(critic=False)
                        update.progress = self._capture_progress()
                        update.t_total = time.perf_counter() - t0
                        continue
                    keep_going = self._end_update(callback, checkpoints, checkpoint_every)
                    if keep_going is False:
                        break
            finally:
                if self._pending is not None:  # an error: leave the critic fitted, not changing
                    if self._pending.background is not None:
                        self._pending.background.wait()
                    self._pending = None
        if sb3_callback is not None:
            sb3_callback.training_end()
        return self

    def _end_update(
        self,
        callback: Callback | None,
        checkpoints: CheckpointManager | None,
        checkpoint_every: int,
    ) -> bool | None:
        """Finish the pending update (its critic fit and the divergence guard), report it
        (verbose, logger, callback), record the update boundary and checkpoint it; returns the
        callback's answer (``False``: stop training)."""
        update, self._pending = self._pending, None
        assert update is not None
        metrics = self._finish_update(update)
        self._sync_rollout_policy()
        t_total = update.t_total or time.perf_counter() - update.t_start
        t_start, steps_start = self._fps_origin
        metrics = {
            **metrics,
            "time_rollout": update.t_rollout,
            "time_total": t_total,
            "steps_per_s": self.n_steps * self.n_envs / t_total,
            "fps": (self.num_timesteps - steps_start) / (time.perf_counter() - t_start),
        }
        if self.verbose:
            print(self._format(metrics), flush=True)
        if self._logger is not None:
            record_metrics(self._logger, metrics, self.num_timesteps)
        keep_going = callback(metrics) if callback is not None else True
        if update.progress is None:
            self._boundary = self._capture_state()
        else:
            self._boundary = self._complete_state(update.progress)
        if (
            checkpoints is not None
            and checkpoint_every
            and self.num_updates % checkpoint_every == 0
        ):
            checkpoints.save(self._boundary, self.num_updates)
        if self._interrupt is not None:
            self._stop_on_signal(checkpoints)
        return keep_going

    def _rollout_metrics(self, batch: RolloutBatch) -> dict[str, Any]:
        """The first columns of an update's metrics: counters and episode statistics."""
        eps = self.collector.episodes
        return {
            "update": self.num_updates,
            "timesteps": self.num_timesteps,
            "ep_return_mean": float(np.mean([r for r, _ in eps])) if eps else float("nan"),
            "ep_length_mean": float(np.mean([n for _, n in eps])) if eps else float("nan"),
            "episodes": self.collector.episodes_in_rollout,
            "dropped": batch.dropped,
        }

    def _record_signal(self, signum: int) -> None:
        """A SIGINT/SIGTERM arrived: stop at the next update boundary."""
        self._interrupt = signum

    def _collect_with(self, callback: SB3Callback) -> RolloutBatch | None:
        """One rollout with ``callback.step`` after every vector step (``num_timesteps``
        counting as it goes, as SB3 callbacks read it); ``None`` if it or a signal stopped."""
        if not isinstance(self.collector, RolloutCollector):
            raise ValueError("SB3 callbacks need the in-process rollout (not the Ray collector)")
        callback.rollout_start()

        def on_step(
            new_obs: np.ndarray, rewards: np.ndarray, dones: np.ndarray, infos: dict
        ) -> bool:
            self.num_timesteps += self.n_envs
            return not callback.step(new_obs, rewards, dones, infos)

        return self.collector.collect(lambda: self._interrupt is not None, on_step)

    # --- SB3-style accessors ------------------------------------------------------------------
    @property
    def logger(self) -> Any:
        """The SB3 ``Logger`` metrics are recorded into (one that writes nothing by default)."""
        if self._logger is None:
            self._logger = default_logger()
        return self._logger

    def set_logger(self, logger: Any) -> None:
        """Record every update's metrics into this SB3 ``Logger`` (as SB3's ``set_logger``)."""
        self._logger = logger

    def get_env(self) -> Any:
        """The training env as it was passed in (an SB3 ``VecEnv`` stays one)."""
        return self._user_env

    def get_vec_normalize_env(self) -> None:
        """``None``: observations are normalized inside the agent, never by a ``VecNormalize``
        of SB3's (SB3's ``EvalCallback`` asks)."""
        return None

    def _stop_on_signal(self, checkpoints: CheckpointManager | None) -> None:
        """Save the last update-boundary state and raise :class:`TrainingInterrupted`."""
        assert self._boundary is not None and self._interrupt is not None
        path = None
        if checkpoints is not None:
            path = checkpoints.save(self._boundary, int(self._boundary["num_updates"]))
        # The envs have moved past the boundary: continue from the saved state if asked again.
        self._restore_state(self._boundary)
        raise TrainingInterrupted(self._interrupt, path, int(self._boundary["num_timesteps"]))

    @staticmethod
    def _format(m: dict[str, Any]) -> str:
        return (
            f"update {m['update']:4d} | steps {m['timesteps']:8d} | return "
            f"{m['ep_return_mean']:9.2f} | kl {m['kl']:.4f} | ls {m['ls_backtracks']} "
            f"{'ok' if m['ls_success'] else 'FAIL'} | cg {m['cg_iterations']} | "
            f"{m['steps_per_s']:.0f} steps/s"
        )

    def train_on_batch(self, batch: RolloutBatch) -> dict[str, Any]:
        """GAE, the policy step and the critic fit on one rollout; returns metrics."""
        return self._finish_update(self._start_update(batch))

    def _start_update(self, batch: RolloutBatch) -> _Update:
        """GAE and the policy step on one rollout, the critic fit started (in a background
        thread where it is the scripted Adam fit; :meth:`_finish_update` completes it)."""
        policy, critic = self.policy, self.policy.critic
        t, e = batch.rewards.shape
        dev = self.device
        obs_all = batch.obs.reshape(t * e, -1).to(dev)
        with torch.no_grad():
            values = critic(obs_all).reshape(t, e).cpu()
            last_values = critic(batch.last_obs.to(dev)).squeeze(-1).cpu()
            final_values = torch.zeros(t, e)
            if len(batch.final_index):
                fv = critic(batch.final_obs.to(dev)).squeeze(-1).cpu()
                final_values[batch.final_index[:, 0], batch.final_index[:, 1]] = fv
        adv, ret = compute_gae_t(
            batch, values, last_values, final_values, self.gamma, self.gae_lambda
        )
        too_large = returns_too_large(ret[batch.valid], self.env_id)
        if too_large:  # before any parameter changes
            raise NonFiniteError(f"update {self.num_updates + 1}: {too_large}")
        valid = batch.valid.reshape(-1)
        keep = None if bool(valid.all()) else valid.nonzero().squeeze(-1)
        obs = obs_all if keep is None else obs_all[keep.to(dev)]
        if self.overlap_critic and obs.data_ptr() == batch.obs.data_ptr():
            obs = obs.clone()  # the critic fit may outlast the batch: the next rollout refills it
        actions = batch.actions.reshape(t * e, *batch.actions.shape[2:])
        advantages = adv.reshape(-1)
        returns = ret.reshape(-1)
        values_flat = values.reshape(-1)
        if keep is not None:
            actions, advantages = actions[keep], advantages[keep]
            returns, values_flat = returns[keep], values_flat[keep]
        actions, advantages, returns = actions.to(dev), advantages.to(dev), returns.to(dev)
        if self.normalize_advantage and advantages.numel() > 1:
            advantages = normalized_advantages(advantages)

        actor_before = flat_params(policy.actor).clone()
        critic_before = flat_params(critic).clone()
        # The critic fit does not depend on the policy step: where it is the scripted Adam fit of
        # this class's own _critic_update, it runs in a background thread (without the GIL)
        # while this thread takes the step (and, with overlap_critic, the next rollout).
        perms = self._critic_perms(obs.shape[0], obs.device)
        activation = scripted_activation(critic, self.vf_optimizer)
        background = None
        own_critic_fit = type(self)._critic_update is not OnPolicyNaturalAlgorithm._critic_update
        if activation is not None and self.vf_epochs > 0 and not own_critic_fit:
            background = BackgroundFit(
                critic, self.vf_optimizer, activation, obs, returns, perms, self.vf_minibatch
            )
        try:
            metrics = self._policy_update(obs, actions, advantages)
        except BaseException:
            if background is not None:
                background.wait()  # never leave the critic changing behind the caller's back
            raise
        return _Update(
            self.num_updates + 1,
            metrics,
            background,
            obs,
            returns,
            perms,
            values_flat,
            actor_before,
            critic_before,
        )

    def _finish_update(self, u: _Update) -> dict[str, Any]:
        """The critic fit of update ``u`` (joined, or run here), its metrics and the divergence
        guard; returns the update's metrics."""
        metrics = u.metrics
        if u.background is not None:
            losses, metrics["time_critic"] = u.background.result()  # re-raises the fit's error
            metrics["value_loss"] = _mean_loss(losses)
        else:
            t0 = time.perf_counter()
            metrics.update(self._critic_update(u.obs, u.returns, u.perms))
            metrics["time_critic"] = time.perf_counter() - t0
        metrics["explained_variance"] = explained_variance(u.values_flat, u.returns.cpu())
        self._check_update(u, metrics)
        return metrics

    # --- the two halves of an update ----------------------------------------------------------
    def _policy_update(self, obs: Tensor, actions: Tensor, advantages: Tensor) -> dict[str, Any]:
        """The natural-gradient policy step (implemented by NPG and TRPO)."""
        raise NotImplementedError

    def _surrogate_and_grad(
        self, obs: Tensor, actions: Tensor, advantages: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, float]:
        """At θ_old: ``(old_out, old_logp, g, L(θ_old))`` with ``g = ∇_θ L`` flat, where
        ``L(θ) = mean_t[π_θ(a_t|s_t) / π_old(a_t|s_t) · A_t]`` (Schulman et al. 2015, eq. 14)."""
        actor = self.policy.actor
        out = actor(obs)
        logp = self.family.log_prob(out, actions)
        old_logp = logp.detach()
        surrogate = (torch.exp(logp - old_logp) * advantages).mean()
        grads = torch.autograd.grad(surrogate, list(actor.parameters()))
        g = torch.cat([gr.reshape(-1) for gr in grads])
        return out.detach(), old_logp, g, float(surrogate.detach())

    @torch.no_grad()
    def _kl_and_improvement(
        self,
        obs: Tensor,
        actions: Tensor,
        advantages: Tensor,
        old_out: Tensor,
        old_logp: Tensor,
        surrogate_old: float,
    ) -> tuple[float, float]:
        """At the actor's current parameters: the mean KL(π_old ‖ π_θ) over the batch and the
        surrogate improvement ``L(θ) - L(θ_old)``."""
        new_out = self.policy.actor(obs)
        kl = float(self.family.kl(old_out, new_out).mean())
        ratio = torch.exp(self.family.log_prob(new_out, actions) - old_logp)
        return kl, float((ratio * advantages).mean()) - surrogate_old

    def _fisher(self, obs: Tensor, actions: Tensor) -> tuple[FisherOperator, FisherOperator | None]:
        """The Fisher operator of the configured flavour on (a subsample of) the batch, and the
        preconditioner operator if one is configured."""
        n = obs.shape[0]
        if self.fisher_subsample < 1.0:
            m = max(1, int(round(n * self.fisher_subsample)))
            idx = torch.randperm(n, generator=self.generator)[:m].sort().values.to(obs.device)
            obs, actions = obs[idx], actions[idx]
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
        common = dict(targets=actions, n_samples=self.fisher_samples, seed=seed)
        fisher = make_fisher(
            self.fisher, self.policy.actor, obs, self.family, **common, **self.fisher_kwargs
        )
        pre = None
        if self.preconditioner is not None:
            pre = make_fisher(self.preconditioner, self.policy.actor, obs, self.family, **common)
        return fisher, pre

    def _natural_step(self, obs: Tensor, actions: Tensor, g: Tensor) -> tuple[Any, dict[str, Any]]:
        """Build the Fisher and solve for the step with ``½ sᵀ(F+λI)s = δ``."""
        fisher, pre = self._fisher(obs, actions)
        ns = natural_step(
            fisher,
            g,
            self.max_kl,
            damping=self.cg_damping,
            cg_iters=self.cg_iters,
            cg_tol=self.cg_tol,
            preconditioner=pre,
        )
        info = {
            "step_status": ns.status,
            "predicted_improvement": ns.predicted_improvement,
            "cg_iterations": ns.cg.iterations if ns.cg is not None else 0,
            "cg_residual": ns.cg.residual if ns.cg is not None else 0.0,
            "grad_norm": float(g.norm()),
        }
        return ns, info

    def _distribution_metrics(self, old_out: Tensor) -> dict[str, float]:
        m = {"entropy": float(self.family.entropy(old_out).mean())}
        actor = self.policy.actor
        m["log_std_mean"] = float(actor.log_std.detach().mean()) if actor.gaussian else float("nan")
        return m

    def _critic_perms(self, n: int, device: torch.device) -> Tensor:
        """One shuffle of the ``n`` rows per critic epoch, ``(vf_epochs, n)``."""
        perms = [torch.randperm(n, generator=self.generator) for _ in range(self.vf_epochs)]
        return torch.stack(perms).to(device) if perms else torch.zeros(0, n, dtype=torch.long)

    def _critic_update(self, obs: Tensor, returns: Tensor, perms: Tensor) -> dict[str, float]:
        """Fit ``V`` to the λ-returns: one epoch of Adam on minibatches per row of ``perms``
        (the scripted fit of :mod:`agents.critic` where the critic allows it)."""
        critic, opt, mb = self.policy.critic, self.vf_optimizer, self.vf_minibatch
        activation = scripted_activation(critic, opt)
        if activation is not None:
            return {
                "value_loss": _mean_loss(
                    fit_critic(critic, opt, activation, obs, returns, perms, mb)
                )
            }
        losses = []
        for perm in perms:
            obs_perm, returns_perm = obs[perm], returns[perm]  # one gather; minibatches are views
            for start in range(0, obs.shape[0], mb):
                pred = critic(obs_perm[start : start + mb]).squeeze(-1)
                loss = F.mse_loss(pred, returns_perm[start : start + mb])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
        return {"value_loss": _mean_loss(torch.stack(losses) if losses else torch.zeros(0))}

    def _check_update(self, u: _Update, metrics: dict[str, Any]) -> None:
        """The divergence guard: roll the parameters back and raise, naming the cause, if the
        update diverged (:func:`agents.guard.divergence_cause`)."""
        cause = divergence_cause(self.policy, metrics, self.max_kl)
        if cause is None:
            return
        set_flat_params(self.policy.actor, u.actor_before)
        set_flat_params(self.policy.critic, u.critic_before)
        error = NonFiniteParametersError if cause.startswith("non-finite") else DivergenceError
        raise error(
            f"update {u.number} diverged: {cause}; rolled back to the previous "
            f"parameters. Lower max_kl (now {self.max_kl:g}) or vf_lr, or raise cg_damping"
        )

    # --- inference ----------------------------------------------------------------------------
    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = True,
    ) -> tuple[np.ndarray, Any]:
        """Actions for raw observations (one, or a batch); ``(actions, state)`` as in SB3.

        ``state``/``episode_start`` are SB3's recurrent-policy arguments: the policies here are
        feed-forward, so ``state`` is passed back unchanged. Dict/Tuple observations (one, or
        batched per key as SB3 VecEnvs give them) are flattened as training flattened them.
        """
        observation = self._flat_observation(observation)
        obs = np.asarray(observation, dtype=np.float32)
        single = obs.ndim <= 1 or obs.shape == self.env.single_observation_space.shape
        batch = obs.reshape(-1, self.policy.obs_dim)
        norm = self.obs_normalizer(batch, update=False)
        with torch.inference_mode():
            a = self.policy.act(torch.from_numpy(norm).to(self.device), deterministic).cpu()
        env_actions = self.policy.to_env_actions(a)
        return (env_actions[0] if single else env_actions), state

    def _flat_observation(self, observation: Any) -> Any:
        """A raw Dict/Tuple/Discrete observation as the flat array the policy reads."""
        raw = raw_observation_space(self.env)
        if raw is None or isinstance(raw, spaces.Box):
            return observation
        flat_shape = self.env.single_observation_space.shape
        if isinstance(observation, np.ndarray) and observation.shape[-1:] == flat_shape:
            return observation  # already flat
        if isinstance(raw, spaces.Dict):
            first = np.asarray(observation[next(iter(raw.spaces))])
            inner = raw.spaces[next(iter(raw.spaces))].shape or ()
            n = first.shape[0] if first.ndim > len(inner) else None
        elif isinstance(raw, spaces.Tuple):
            first = np.asarray(observation[0])
            n = first.shape[0] if first.ndim > len(raw.spaces[0].shape or ()) else None
        else:
            arr = np.asarray(observation)
            n = arr.shape[0] if arr.ndim > len(raw.shape or ()) else None
        if n is None:
            return spaces.flatten(raw, observation).astype(np.float32, copy=False)
        return flatten_batch(raw, observation, n)

    # --- checkpoints --------------------------------------------------------------------------
    def _env_states(self) -> list[dict[str, Any]] | None:
        env = self.env
        if not isinstance(env, SyncVectorEnv) or not all(
            envs_mod.supports_state(e) for e in env.envs
        ):
            return None
        return [envs_mod.get_env_state(e) for e in env.envs]

    def _capture_state(self) -> dict[str, Any]:
        """Everything needed to continue training bit-identically (deep copies)."""
        return self._complete_state(self._capture_progress())

    def _complete_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Fill the config and the models into a :meth:`_capture_progress` dict (after waiting
        for a critic fit in flight: the saved critic is the fitted one)."""
        if self._pending is not None and self._pending.background is not None:
            self._pending.background.wait()
        state["config"] = copy.deepcopy(self.config)
        state["policy"] = {k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items()}
        state["vf_optimizer"] = tensors_to(self.vf_optimizer.state_dict(), "cpu")
        return state

    def _capture_progress(self) -> dict[str, Any]:
        """:meth:`_capture_state` but for the config and models (``None`` until
        :meth:`_complete_state`): the normalizers, counters, RNG, envs and rollout."""
        state = {
            "format": FORMAT,
            "version": 1,
            "algo": self.algo_name,
            "config": None,
            "policy": None,
            "vf_optimizer": None,
            "obs_normalizer": self.obs_normalizer.state_dict(),
            "reward_scaler": self.reward_scaler.state_dict(),
            "num_timesteps": self.num_timesteps,
            "num_updates": self.num_updates,
            "rng": capture_rng(self.generator),
            "started": self._started,
        }
        if self._started:
            state["rollout"] = self.collector.state_dict()
            state["env_states"] = self._env_states()
        return state

    def _restore_state(self, state: dict[str, Any]) -> None:
        """Load a :meth:`_capture_state` dict (envs restored exactly where supported)."""
        self.policy.load_state_dict(state["policy"])
        self._sync_rollout_policy()
        self._load_optimizer(self.vf_optimizer, state["vf_optimizer"])
        self.obs_normalizer.load_state_dict(state["obs_normalizer"])
        self.reward_scaler.load_state_dict(state["reward_scaler"])
        self.num_timesteps = int(state["num_timesteps"])
        self.num_updates = int(state["num_updates"])
        restore_rng(self.generator, state["rng"])
        if not state.get("started"):
            return
        env_states = state.get("env_states")
        exact = (
            env_states is not None
            and isinstance(self.env, SyncVectorEnv)
            and len(env_states) == self.n_envs
        )
        if not self._started:
            self.env.reset(seed=self.seed)  # the envs exist but were never reset
        if exact:
            for sub, s in zip(self.env.envs, env_states, strict=True):
                envs_mod.set_env_state(sub, s)
            self.collector.load_state_dict(state["rollout"], with_obs=True)
        else:
            # Fallback for envs without a state adapter: restart the episodes in flight.
            obs, _ = self.env.reset(seed=self.seed + 7919 * self.num_updates)
            self.collector.load_state_dict(state["rollout"], with_obs=False)
            self.reward_scaler.ret[:] = 0.0  # the discounted return of the restarted episodes
            self.collector.cur_obs = self.obs_normalizer(obs.reshape(self.n_envs, -1), update=False)
        self._started = True

    def _load_optimizer(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a checkpoint's (CPU) optimizer state: torch's optimizers cast their per-parameter
        state to the parameters' device themselves; NGD's curvature state is moved here."""
        optimizer.load_state_dict(
            tensors_to(state, self.device) if isinstance(optimizer, NGD) else state
        )

    def save(self, path: str | Path) -> Path:
        """Write a resumable checkpoint atomically (``torch.load(weights_only=True)``-safe)."""
        return save_atomic(self._capture_state(), path)

    @classmethod
    def load(
        cls, path: str | Path, env: str | VectorEnv | None = None, **overrides: Any
    ) -> OnPolicyNaturalAlgorithm:
        """Rebuild an agent from a checkpoint file (or a state dict already loaded).

        ``env`` defaults to a new vector env of the saved id; ``overrides`` replace config
        entries that do not change the model (e.g. ``verbose``, ``vectorization``).
        """
        state = path if isinstance(path, dict) else load_checkpoint(path)
        algo_cls = cls
        if state["algo"] != cls.algo_name:
            from agents import ALGORITHMS

            if cls.algo_name != "base" and state["algo"] in ALGORITHMS:
                raise ValueError(
                    f"checkpoint holds a {state['algo']!r} agent, not {cls.algo_name!r}"
                )
            algo_cls = ALGORITHMS[state["algo"]]
        config = dict(state["config"])
        config.update(overrides)
        env_id = config.pop("env_id")
        if env is None:
            if env_id is None:
                raise ValueError("this checkpoint was trained on a custom env: pass env=")
            env = env_id
        agent = algo_cls(config.pop("policy", "MlpPolicy"), env, **config)
        agent._restore_state(state)
        return agent

    def close(self) -> None:
        """Close the vector env."""
        self.env.close()


def compute_gae_t(
    batch: RolloutBatch,
    values: Tensor,
    last_values: Tensor,
    final_values: Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[Tensor, Tensor]:
    """:func:`agents.gae.compute_gae` on a rollout's tensors."""
    adv, ret = compute_gae(
        batch.rewards.numpy(),
        values.numpy(),
        last_values.numpy(),
        batch.terminated.numpy(),
        batch.truncated.numpy(),
        final_values.numpy(),
        gamma,
        gae_lambda,
        batch.valid.numpy(),
    )
    return torch.from_numpy(adv), torch.from_numpy(ret)
