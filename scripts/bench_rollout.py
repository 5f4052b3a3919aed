"""Rollout bookkeeping cost: our collector vs SB3's ``OnPolicyAlgorithm.collect_rollouts``.

    python scripts/bench_rollout.py --env CartPole-v1 --n-envs 1 8 --steps 4096
    python scripts/bench_rollout.py --env Hopper-v5 --n-envs 2 --vectorization sync envpool

For each setting it times (a) the bare vector-env steps with pre-sampled actions (the floor),
(b) our ``RolloutCollector.collect`` on the same backend and (c) sb3-contrib TRPO's
``collect_rollouts`` (if installed; its own ``DummyVecEnv``, so only next to ``sync``), all
single-threaded, and reports process CPU ms per vector step (robust to other jobs on a shared
machine; equal to wall time on a quiet one, every side being single-threaded) and the overhead
over (a). ``--vectorization`` picks our backends: ``sync`` (Gymnasium's envs in-process)
and/or ``envpool`` (EnvPool's C++ executor; its worker threads' CPU counts too).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from agents import TRPO
from envs import make_vec_env


def bare_env(env_id: str, n_envs: int, steps: int, vectorization: str = "sync") -> float:
    """Seconds per vector step of the env alone (actions sampled beforehand)."""
    env = make_vec_env(env_id, n_envs, seed=0, vectorization=vectorization)
    actions = [env.action_space.sample() for _ in range(steps)]
    t = time.process_time()
    for a in actions:
        env.step(a)
    dt = (time.process_time() - t) / steps
    env.close()
    return dt


def ours(env_id: str, n_envs: int, steps: int, repeats: int, vectorization: str = "sync") -> float:
    """Seconds per vector step of our collector (best of ``repeats``)."""
    agent = TRPO(
        "MlpPolicy",
        env_id,
        n_envs=n_envs,
        n_steps=steps,
        vf_minibatch=steps,
        vectorization=vectorization,
    )
    agent.collector.start(agent.env.reset(seed=0)[0])
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        agent.collector.collect()
        best = min(best, (time.process_time() - t) / steps)
    agent.close()
    return best


def sb3(env_id: str, n_envs: int, steps: int, repeats: int) -> float | None:
    """Seconds per vector step of sb3-contrib TRPO's ``collect_rollouts`` (best of repeats)."""
    try:
        from sb3_contrib import TRPO as SB3TRPO
        from stable_baselines3.common.env_util import make_vec_env as sb3_make_vec_env
    except ImportError:
        return None
    model = SB3TRPO(
        "MlpPolicy",
        sb3_make_vec_env(env_id, n_envs, seed=0),
        n_steps=steps,
        batch_size=steps,
        seed=0,
        device="cpu",
    )
    _, callback = model._setup_learn(10**9, None)
    callback.on_training_start(locals(), globals())
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=steps)
        best = min(best, (time.process_time() - t) / steps)
    model.env.close()
    return best


def main(argv: list[str] | None = None) -> int:
    """Entry point: prints one table row per ``n_envs``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="CartPole-v1")
    p.add_argument("--n-envs", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=2048, help="vector steps per rollout")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--vectorization", nargs="+", default=["sync"], choices=["sync", "envpool"],
        help="our vector-env backends to measure",
    )  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{args.env}, CPU ms per vector step (best of {args.repeats} rollouts of {args.steps})")
    print("backend | n_envs | env only | ours  (overhead) | sb3   (overhead) | ours/sb3 overhead")
    for vec in args.vectorization:
        for n in args.n_envs:
            _row(args, vec, n)
    return 0


def _row(args: argparse.Namespace, vec: str, n: int) -> None:
    env_t = bare_env(args.env, n, args.steps, vec)
    our_t = ours(args.env, n, args.steps, args.repeats, vec)
    sb_t = sb3(args.env, n, args.steps, args.repeats) if vec == "sync" else None
    row = (
        f"{vec:7s} | {n:6d} | {env_t * 1e3:8.4f} | {our_t * 1e3:.4f} ({(our_t - env_t) * 1e3:.4f})"
    )
    if sb_t is not None:
        ratio = (our_t - env_t) / max(sb_t - env_t, 1e-12)
        row += f" | {sb_t * 1e3:.4f} ({(sb_t - env_t) * 1e3:.4f}) | {ratio:.2f}"
    print(row, flush=True)


if __name__ == "__main__":
    sys.exit(main())
