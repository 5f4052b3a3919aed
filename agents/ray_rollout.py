"""Distributed rollouts on Ray: N rollout workers (Ray actors), the update on the learner.

Each worker owns a Gymnasium vector env of ``n_envs`` sub-envs, a copy of the policy, its own
observation normalizer / reward scaler and the ordinary :class:`agents.rollout.RolloutCollector`.
Per update the learner

1. puts the actor weights and the *global* normalization statistics in the object store once
   (``ray.put``) and hands the same reference to every worker;
2. gathers the workers' rollouts in worker order and concatenates them along the env axis, so the
   learner sees one ``(n_steps, workers·n_envs)`` :class:`~agents.rollout.RolloutBatch` -- GAE,
   the Fisher/CG/line-search step and the critic fit are unchanged;
3. merges each worker's *new* observation (and return) moments into the global statistics with
   the parallel mean/variance formula (Chan et al.), in worker order.

Seeds: worker ``i`` seeds its envs and its action sampler from ``SeedSequence([seed, i, g])``,
``g`` its restart generation, so a run with the same seed and worker count is reproducible.

Faults: workers are Ray actors with ``max_restarts``. When one dies during a rollout, its partial
batch is dropped with a :class:`WorkerLostWarning`, the update goes on with the other workers'
data, and the restarted actor starts fresh episodes (generation ``g + 1``) at the next rollout.
Exceptions *raised* inside a worker (e.g. a non-finite observation) are not faults: they
propagate.

Use :func:`attach_ray_workers` on a built agent, or :class:`RayRolloutCollector` directly.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from agents.normalize import ObsNormalizer, RewardScaler, RunningMeanStd
from agents.policies import ActorCriticPolicy
from agents.rollout import RolloutBatch, RolloutCollector

try:  # Ray is the optional ``dist`` extra
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
except ImportError:  # pragma: no cover - exercised only without the extra
    ray = None
    RayActorError = ActorDiedError = ActorUnavailableError = None  # type: ignore[assignment,misc]

Moments = tuple[np.ndarray, np.ndarray, float]  # (mean, var, count)


class WorkerLostWarning(RuntimeWarning):
    """A rollout worker died; its partial batch was dropped."""


def require_ray() -> Any:
    """The ``ray`` module, or an ImportError naming the extra to install."""
    if ray is None:
        raise ImportError(
            "distributed rollouts need Ray: pip install 'npg[dist]' (ray[default]>=2.9)"
        )
    return ray


def worker_seed(seed: int, index: int, generation: int = 0) -> int:
    """The 31-bit seed of worker ``index`` in its ``generation`` (restarts bump it)."""
    return int(np.random.SeedSequence([seed, index, generation]).generate_state(1)[0] >> 1)


# --- statistics -----------------------------------------------------------------------------------
def merge_moments(rms: RunningMeanStd, mean: np.ndarray, var: np.ndarray, count: float) -> None:
    """Fold a batch's ``(mean, var, count)`` into ``rms`` in place (Chan et al. 1979).

    Merging the moments of disjoint batches this way gives exactly the moments of their
    concatenation, whatever the split: this is how the workers' statistics are combined.
    """
    if count <= 0:
        return
    delta = mean - rms.mean
    tot = rms.count + count
    m2 = rms.var * rms.count + var * count + delta**2 * (rms.count * count / tot)
    rms.mean = rms.mean + delta * (count / tot)
    rms.var = m2 / tot
    rms.count = tot


class _TrackingRMS(RunningMeanStd):
    """A running mean/var that also accumulates the moments of the data since the last
    :meth:`take_delta` (what a worker reports back)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__(shape)
        self.delta = RunningMeanStd(shape, epsilon=0.0)

    def update(self, x: np.ndarray) -> None:
        super().update(x)
        self.delta.update(x)

    def set_global(self, moments: Moments) -> None:
        self.mean, self.var, self.count = moments[0].copy(), moments[1].copy(), float(moments[2])

    def take_delta(self) -> Moments:
        d = self.delta
        out = (d.mean.copy(), d.var.copy(), float(d.count))
        self.delta = RunningMeanStd(d.mean.shape, epsilon=0.0)
        return out


def _moments(rms: RunningMeanStd) -> Moments:
    return rms.mean.copy(), rms.var.copy(), float(rms.count)


# --- the worker -----------------------------------------------------------------------------------
BATCH_FIELDS = ("obs", "actions", "rewards", "terminated", "truncated", "valid")


class RolloutWorker:
    """One rollout worker: a vector env, a policy copy and a :class:`RolloutCollector`.

    Plain Python (testable without Ray); :class:`RayRolloutCollector` runs it as a Ray actor.
    ``config`` is the agent's ``config`` dict (network, normalization, env options).
    """

    def __init__(
        self, config: dict[str, Any], env_id: str, index: int, dtype: str = "float32"
    ) -> None:
        import envs as envs_mod

        torch.set_num_threads(1)
        torch.set_default_dtype(getattr(torch, dtype))  # the learner's, for identical buffers
        self.index, self.seed = index, int(config["seed"])
        self.generation: int | None = None
        c = config
        self.env = envs_mod.make_vec_env(
            env_id, int(c["n_envs"]), None, c["vectorization"], step_infos=False, **c["env_kwargs"]
        )
        n_envs = self.env.num_envs
        self.policy = ActorCriticPolicy.from_config(
            self.env.single_observation_space, self.env.single_action_space, c
        )
        self.obs_norm = ObsNormalizer((self.policy.obs_dim,), c["normalize_obs"], c["clip_obs"])
        self.obs_norm.rms = _TrackingRMS((self.policy.obs_dim,))
        self.reward_scaler = RewardScaler(n_envs, c["gamma"], c["normalize_reward"])
        self.reward_scaler.rms = _TrackingRMS(())
        self.generator = torch.Generator()
        self.collector = RolloutCollector(
            self.env,
            self.policy,
            self.obs_norm,
            self.reward_scaler,
            int(c["n_steps"]),
            self.generator,
            env_id,
            c["on_nonfinite"],
            c["stats_window"],
        )

    def _begin(self, generation: int) -> None:
        """(Re)start the episodes with the seeds of ``generation``."""
        s = worker_seed(self.seed, self.index, generation)
        self.generator.manual_seed(s)
        self.reward_scaler.ret[:] = 0.0
        obs, _ = self.env.reset(seed=s)
        self.env.action_space.seed(s)
        self.collector.ep_return[:] = 0.0
        self.collector.ep_length[:] = 0
        self.collector.start(obs)
        self.generation = generation

    def collect(self, payload: dict[str, Any], generation: int) -> dict[str, Any]:
        """Load the broadcast weights and statistics, run one rollout and return it.

        ``generation`` is the learner's count of this worker's restarts: a mismatch (a fresh or
        restarted actor) restarts the episodes with that generation's seeds.
        """
        self.policy.actor.load_state_dict(payload["actor"])
        self.obs_norm.rms.set_global(payload["obs_rms"])
        self.reward_scaler.rms.set_global(payload["reward_rms"])
        if self.generation != generation:
            self._begin(generation)  # observes the reset observations with the global stats
        cpu0, wall0 = time.process_time(), time.perf_counter()
        batch = self.collector.collect()
        cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
        assert batch is not None
        n_new = self.collector.episodes_in_rollout  # the newest entries of the episode deque
        episodes = list(self.collector.episodes)[-n_new:] if n_new else []
        return {
            **{k: getattr(batch, k).numpy().copy() for k in BATCH_FIELDS},
            "final_index": batch.final_index.copy(),
            "final_obs": batch.final_obs.numpy().copy(),
            "last_obs": batch.last_obs.numpy().copy(),
            "dropped": int(batch.dropped),
            "episodes": episodes,
            "obs_delta": self.obs_norm.rms.take_delta(),
            "reward_delta": self.reward_scaler.rms.take_delta(),
            "steps": int(batch.rewards.numel()),
            "cpu_s": cpu_s,
            "wall_s": wall_s,
        }

    def pid(self) -> int:
        """The worker's process id (tests kill it)."""
        return os.getpid()

    def close(self) -> None:
        """Close the worker's vector env."""
        self.env.close()


# --- the learner side -------------------------------------------------------------------------
class RayRolloutCollector:
    """Drop-in replacement for an agent's :class:`RolloutCollector` that collects on Ray.

    Args:
        agent: the built agent (its ``config``, ``policy``, ``obs_normalizer`` and
            ``reward_scaler``: the latter two hold the global statistics).
        workers: number of rollout workers; each runs ``agent.config["n_envs"]`` sub-envs.
        ray_address: ``None`` starts an embedded local Ray instance (unless Ray is already
            initialised); otherwise the address of an existing cluster (``"auto"``, ``ip:port``
            or ``ray://...``).
        max_restarts: Ray actor restarts allowed per worker; a worker past them is retired
            (with a warning) and the others go on.
        restart_timeout: seconds to wait for a restarting worker before the next rollout.
        ray_init_kwargs: extra :func:`ray.init` options for the embedded instance.
    """

    def __init__(
        self,
        agent: Any,
        workers: int,
        ray_address: str | None = None,
        max_restarts: int = 3,
        ray_init_kwargs: dict[str, Any] | None = None,
        restart_timeout: float = 120.0,
    ) -> None:
        ray_mod = require_ray()
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        env_id = agent.config.get("env_id")
        if env_id is None:
            raise ValueError("Ray workers build their envs from an env id; pass env as a string")
        if not ray_mod.is_initialized():
            opts: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if ray_address is None:
                opts["num_cpus"] = max(workers, os.cpu_count() or 1)
            opts.update(ray_init_kwargs or {})
            ray_mod.init(address=ray_address, **opts)
            self._owns_ray = True
        else:
            self._owns_ray = False
        self.agent, self.n_workers = agent, workers
        self.per_worker_envs = int(agent.config["n_envs"])
        self.n_steps = int(agent.config["n_steps"])
        self.n_envs = workers * self.per_worker_envs
        self.max_restarts = max_restarts
        remote_cls = ray_mod.remote(RolloutWorker).options(
            num_cpus=1, max_restarts=max_restarts, max_task_retries=0
        )
        cfg = dict(agent.config)
        dtype = str(torch.get_default_dtype()).removeprefix("torch.")
        self.workers = [remote_cls.remote(cfg, env_id, i, dtype) for i in range(workers)]
        self.generations = [0] * workers
        self.alive = [True] * workers
        self.restart_timeout = restart_timeout
        self._restarting: set[int] = set()
        self.episodes: deque[tuple[float, int]] = deque(maxlen=int(agent.config["stats_window"]))
        self.episodes_in_rollout = 0
        self.total_steps = 0
        self.dropped_total = 0
        self.lost_batches = 0
        self.last_payload_bytes = 0
        self.last_batch_bytes = 0
        self.last_worker_times: list[tuple[float, float]] = []  # (CPU s, wall s) per worker
        self._pending: list[Any] | None = None
        self._learner_obs: np.ndarray | None = None  # raw
        self._learner_norm_obs: np.ndarray | None = None  # normalized

    # --- the RolloutCollector interface used by the agents ------------------------------------
    def start(self, obs: np.ndarray | None = None) -> None:
        """The workers reset their own envs at their first rollout. ``obs`` (the learner's own
        env after its reset) is kept only so that checkpoints stay loadable without Ray."""
        if obs is not None:
            self._learner_obs = np.array(obs, copy=True)

    def collect(self, should_stop: Callable[[], bool] | None = None) -> RolloutBatch | None:
        """One rollout on every worker, concatenated along the env axis (``None`` if
        ``should_stop()`` is true once the workers are back)."""
        for _ in range(self.max_restarts + 2):
            if self._pending is None:
                self.submit()
            results = self.gather()
            if should_stop is not None and should_stop():
                return None
            if results:
                return self._assemble(results)
        raise RuntimeError("every Ray rollout worker failed repeatedly; giving up")

    # --- the two halves of collect (separate so that tests can inject faults in between) ------
    def submit(self) -> None:
        """Broadcast the weights and statistics (one ``ray.put``) and start every worker."""
        payload = {
            "actor": {k: v.detach().cpu() for k, v in self.agent.policy.actor.state_dict().items()},
            "obs_rms": _moments(self.agent.obs_normalizer.rms),
            "reward_rms": _moments(self.agent.reward_scaler.rms),
        }
        self.last_payload_bytes = sum(
            t.numel() * t.element_size() for t in payload["actor"].values()
        )
        ref = ray.put(payload)
        self._await_restarts()
        self._pending = [
            w.collect.remote(ref, g) if ok else None
            for w, g, ok in zip(self.workers, self.generations, self.alive, strict=True)
        ]

    def _await_restarts(self) -> None:
        """Block until the workers lost at the last rollout are back (Ray restarts them); retire
        those that are past ``max_restarts`` or do not come back within ``restart_timeout``."""
        for i in sorted(self._restarting):
            deadline = time.monotonic() + self.restart_timeout
            while True:
                try:
                    ray.get(self.workers[i].pid.remote(), timeout=self.restart_timeout)
                    break
                except ActorUnavailableError:
                    if time.monotonic() > deadline:
                        self._retire(i, "did not restart in time")
                        break
                    time.sleep(0.1)
                except (ActorDiedError, RayActorError, ray.exceptions.GetTimeoutError):
                    self._retire(i, "cannot be restarted (max_restarts reached)")
                    break
        self._restarting.clear()
        if not any(self.alive):
            raise RuntimeError("every Ray rollout worker is dead")

    def _retire(self, i: int, why: str) -> None:
        self.alive[i] = False
        warnings.warn(
            f"Ray rollout worker {i} {why}; continuing with {sum(self.alive)} worker(s)",
            WorkerLostWarning,
            stacklevel=4,
        )

    def gather(self) -> list[dict[str, Any]]:
        """The surviving workers' results in worker order; lost workers are warned about."""
        assert self._pending is not None, "submit() first"
        pending, self._pending = self._pending, None
        results = []
        for i, ref in enumerate(pending):
            if ref is None:  # retired
                continue
            try:
                results.append(ray.get(ref))
            except RayActorError as err:
                self.generations[i] += 1
                self.lost_batches += 1
                self._restarting.add(i)
                warnings.warn(
                    f"Ray rollout worker {i} died during a rollout ({type(err).__name__}); its "
                    "partial batch is dropped and the update uses the other workers' data. "
                    "The actor restarts (max_restarts="
                    f"{self.max_restarts}) with fresh episodes.",
                    WorkerLostWarning,
                    stacklevel=3,
                )
        return results

    def _assemble(self, results: list[dict[str, Any]]) -> RolloutBatch:
        """Concatenate along the env axis and merge the statistics, in worker order."""
        obs_rms, rew_rms = self.agent.obs_normalizer.rms, self.agent.reward_scaler.rms
        self.episodes_in_rollout = 0
        final_index, offset = [], 0
        for r in results:
            if self.agent.obs_normalizer.enabled:
                merge_moments(obs_rms, *r["obs_delta"])
            if self.agent.reward_scaler.enabled:
                merge_moments(rew_rms, *r["reward_delta"])
            self.episodes.extend(r["episodes"])
            self.episodes_in_rollout += len(r["episodes"])
            idx = r["final_index"].copy()
            idx[:, 1] += offset
            final_index.append(idx)
            offset += r["rewards"].shape[1]
        cat = {
            k: torch.from_numpy(np.concatenate([r[k] for r in results], 1)) for k in BATCH_FIELDS
        }
        dropped = sum(r["dropped"] for r in results)
        steps = sum(r["steps"] for r in results)
        self.total_steps += steps
        self.dropped_total += dropped
        self.last_worker_times = [(r["cpu_s"], r["wall_s"]) for r in results]
        self.last_batch_bytes = sum(
            v.nbytes for r in results for k, v in r.items() if isinstance(v, np.ndarray)
        )
        return RolloutBatch(
            cat["obs"],
            cat["actions"],
            cat["rewards"],
            cat["terminated"],
            cat["truncated"],
            cat["valid"],
            np.concatenate(final_index, 0),
            torch.from_numpy(np.concatenate([r["final_obs"] for r in results], 0)),
            torch.from_numpy(np.concatenate([r["last_obs"] for r in results], 0)),
            dropped,
        )

    # --- checkpoints: episode statistics only (workers restart their episodes on resume) ------
    def state_dict(self) -> dict[str, object]:
        """Episode statistics and worker generations, plus an in-process-collector view of the
        learner's own env (fresh episodes) so that the checkpoint also resumes without Ray."""
        n = self.agent.env.num_envs
        if self._learner_norm_obs is not None:
            cur = self._learner_norm_obs
        elif self._learner_obs is not None:
            cur = self.agent.obs_normalizer(self._learner_obs, update=False)
        else:
            cur = np.zeros((n, self.agent.policy.obs_dim), np.float32)
        return {
            "cur_obs": torch.from_numpy(np.array(cur, dtype=np.float32, copy=True)),
            "ep_return": torch.zeros(n, dtype=torch.float64),
            "ep_length": torch.zeros(n, dtype=torch.int64),
            "episodes": [list(e) for e in self.episodes],
            "total_steps": self.total_steps,
            "dropped_total": self.dropped_total,
            "generations": list(self.generations),
        }

    def load_state_dict(self, state: dict[str, object], with_obs: bool = True) -> None:
        """Load a :meth:`state_dict` (``with_obs``: the observations in flight too)."""
        self.episodes.clear()
        self.episodes.extend((float(r), int(n)) for r, n in state["episodes"])  # type: ignore
        self.total_steps = int(state["total_steps"])  # type: ignore[arg-type]
        self.dropped_total = int(state["dropped_total"])  # type: ignore[arg-type]
        # fresh episodes on every worker, with seeds that differ from the interrupted run's
        gens = state.get("generations")
        base = list(gens) if gens is not None else list(self.generations)  # type: ignore
        self.generations = [int(g) + 1 for g in base]

    def close(self) -> None:
        """Stop the workers (and the embedded Ray instance, if this collector started it)."""
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
        if self._owns_ray:
            ray.shutdown()


def attach_ray_workers(
    agent: Any,
    workers: int,
    ray_address: str | None = None,
    max_restarts: int = 3,
    **ray_init_kwargs: Any,
) -> RayRolloutCollector:
    """Make ``agent`` collect its rollouts on ``workers`` Ray actors (before ``learn``).

    Each worker runs ``n_envs`` sub-envs, so an update sees ``workers · n_envs · n_steps``
    transitions; ``agent.n_envs`` is set to ``workers · n_envs`` for the step accounting. The
    agent's own vector env is then used only for spaces and :meth:`predict`. On an agent that
    has already trained (e.g. loaded from a checkpoint) the episode statistics carry over and
    the workers start fresh episodes with seeds of generation ``num_updates``.
    """
    old = agent.collector
    collector = RayRolloutCollector(agent, workers, ray_address, max_restarts, ray_init_kwargs)
    if getattr(agent, "_started", False):
        collector.episodes.extend(old.episodes)
        collector.total_steps = int(getattr(old, "total_steps", 0))
        collector.dropped_total = int(getattr(old, "dropped_total", 0))
        collector.generations = [int(agent.num_updates)] * workers
        cur = getattr(old, "cur_obs", None)
        if cur is not None:  # the learner env's current observation, already normalized
            collector._learner_norm_obs = np.array(cur, copy=True)
    agent.collector = collector
    agent.n_envs = collector.n_envs
    close = agent.close

    def close_all() -> None:
        collector.close()
        close()

    agent.close = close_all
    return collector


__all__ = [
    "RayRolloutCollector",
    "RolloutWorker",
    "WorkerLostWarning",
    "attach_ray_workers",
    "merge_moments",
    "worker_seed",
]
