"""Benchmark our TRPO against sb3-contrib's TRPO with identical hyperparameters.

Both sides get the same task preset (:mod:`agents.presets`): ``n_envs``, ``n_steps``, the
(64, 64) tanh MLPs with orthogonal init, CG iterations and damping, line-search shrink and
iterations, critic epochs / minibatch / Adam lr (and Adam ``eps=1e-8`` on both), the KL radius
(below), and the same observation/reward normalization (sb3: ``VecNormalize``, ours:
the built-in running normalizers). KL radius: sb3-contrib's TRPO averages the per-dimension
Gaussian KL over the action dimensions (``kl_divergence(...).mean()`` on an ``(N, d)`` tensor),
so for a ``Box`` action space of dimension ``d`` its ``target_kl`` bounds KL/d, and its
Fisher-vector product is F/d; ours bounds the KL itself. The presets hold our joint-KL
``max_kl`` (0.01·d on MuJoCo) and sb3 gets ``target_kl = max_kl / d``: ``--kl-match sum``
(default) is then the same trust region on both sides; ``--kl-match nominal`` also gives ours
the per-dimension number (a trust region d times smaller than sb3's). Both are the same for
discrete actions. Vectorization: sb3's ``DummyVecEnv`` vs our ``LeanSyncVectorEnv``
(a Gymnasium ``SyncVectorEnv``; both in-process, one env after the other). Threads: both sides
run torch with one intra-op thread; ours fits the critic in a second Python thread (one
TorchScript call, no GIL) while the main thread takes the policy step, so its update can use
both cores; its process CPU time counts both threads.

Every run is a fresh subprocess (``torch.set_num_threads(1)``); sb3 and ours alternate (the order
flips on every repeat) so that load from other jobs on a shared machine hits both alike. Reported
per run: wall time of ``learn()``, the median time of one update (sb3: the ``train()`` call;
ours: ``time_total - time_rollout``, i.e. GAE + policy step + critic), and the deterministic
return of the final policy (mean over ``--eval-episodes`` episodes on separately seeded envs).
Both wall-clock (``perf_counter``) and process CPU time (``process_time``, far less sensitive to
other jobs on a shared machine) are recorded for the whole ``learn()`` and for each update.

    python scripts/bench_vs_sb3.py --envs CartPole-v1 Hopper-v5 --steps 100000 200000 \
        --seeds 0 1 2 --out docs/bench
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

EVAL_SEED = 10_000


def _hyperparameters(env_id: str) -> dict[str, Any]:
    """Our preset for ``env_id`` (TRPO), with the library defaults for what it leaves out."""
    from agents.config import TRPOConfig
    from agents.presets import get_preset

    defaults = TRPOConfig().to_dict()
    hp = get_preset("trpo", env_id)
    hp.pop("total_timesteps", None)
    for k in (
        "n_envs", "n_steps", "gamma", "gae_lambda", "max_kl", "cg_iters", "cg_damping",
        "line_search_max_iter", "line_search_shrink", "vf_lr", "vf_epochs", "vf_minibatch",
        "normalize_advantage", "normalize_obs", "normalize_reward", "clip_obs", "net_arch",
        "activation", "ortho_init", "log_std_init",
    ):  # fmt: skip
        hp.setdefault(k, defaults[k])
    hp["net_arch"] = [int(x) for x in hp["net_arch"]]
    return hp


def _evaluate(act: Any, env_id: str, episodes: int) -> list[float]:
    """Deterministic returns of ``act(raw_obs) -> action`` on ``episodes`` fresh episodes."""
    import gymnasium as gym

    env = gym.make(env_id)
    returns = []
    for k in range(episodes):
        obs, _ = env.reset(seed=EVAL_SEED + k)
        done, total = False, 0.0
        while not done:
            obs, r, term, trunc, _ = env.step(act(obs))
            total += float(r)
            done = term or trunc
        returns.append(total)
    env.close()
    return returns


def run_sb3(env_id: str, steps: int, seed: int, episodes: int) -> dict[str, Any]:
    """sb3-contrib TRPO on a ``DummyVecEnv`` (+ ``VecNormalize`` when the preset normalizes)."""
    import torch
    from sb3_contrib import TRPO as SB3TRPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    torch.set_num_threads(1)
    hp = _hyperparameters(env_id)
    venv = make_vec_env(env_id, n_envs=hp["n_envs"], seed=seed, vec_env_cls=DummyVecEnv)
    if hp["normalize_obs"] or hp["normalize_reward"]:
        venv = VecNormalize(
            venv,
            norm_obs=hp["normalize_obs"],
            norm_reward=hp["normalize_reward"],
            clip_obs=hp["clip_obs"],
            gamma=hp["gamma"],
        )
    activations = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}
    train_times: list[float] = []
    train_cpu: list[float] = []

    class TimedTRPO(SB3TRPO):
        def train(self) -> None:
            t0, c0 = time.perf_counter(), time.process_time()
            super().train()
            train_times.append(time.perf_counter() - t0)
            train_cpu.append(time.process_time() - c0)

    model = TimedTRPO(
        "MlpPolicy",
        venv,
        learning_rate=hp["vf_lr"],
        n_steps=hp["n_steps"],
        batch_size=hp["vf_minibatch"],
        gamma=hp["gamma"],
        cg_max_steps=hp["cg_iters"],
        cg_damping=hp["cg_damping"],
        line_search_shrinking_factor=hp["line_search_shrink"],
        line_search_max_iter=hp["line_search_max_iter"],
        n_critic_updates=hp["vf_epochs"],
        gae_lambda=hp["gae_lambda"],
        normalize_advantage=hp["normalize_advantage"],
        target_kl=hp["max_kl"] / _action_dim(env_id),  # sb3's KL is per action dimension
        policy_kwargs=dict(
            net_arch=dict(pi=hp["net_arch"], vf=hp["net_arch"]),
            activation_fn=activations[hp["activation"]],
            ortho_init=hp["ortho_init"],
            log_std_init=hp["log_std_init"],
            optimizer_kwargs=dict(eps=1e-8),  # torch's default, as our critic's Adam
        ),
        seed=seed,
        device="cpu",
    )
    t0, c0 = time.perf_counter(), time.process_time()
    model.learn(steps)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if isinstance(venv, VecNormalize):
        venv.training = False

    def act(obs: np.ndarray) -> Any:
        o = obs[None]
        if isinstance(venv, VecNormalize):
            o = venv.normalize_obs(o)
        return model.predict(o, deterministic=True)[0][0]

    returns = _evaluate(act, env_id, episodes)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "updates": len(train_times),
        "timesteps": int(model.num_timesteps),
        "update_s_median": statistics.median(train_times),
        "update_cpu_s_median": statistics.median(train_cpu),
        "update_s_total": sum(train_times),
        "eval_return": float(np.mean(returns)),
    }


def _action_dim(env_id: str) -> int:
    """``d`` of a ``Box`` action space, 1 for anything else."""
    import gymnasium as gym

    env = gym.make(env_id)
    space = env.action_space
    env.close()
    return int(np.prod(space.shape)) if isinstance(space, gym.spaces.Box) else 1


def run_ours(
    env_id: str,
    steps: int,
    seed: int,
    episodes: int,
    kl_match: str = "sum",
    overlap_critic: bool = False,
) -> dict[str, Any]:
    """Our TRPO (exact Fisher) on a Gymnasium ``SyncVectorEnv``."""
    import torch

    from agents import TRPO
    from agents.checkpoint import content_digest

    torch.set_num_threads(1)
    hp = _hyperparameters(env_id)
    if kl_match == "nominal":  # sb3's per-dimension number, taken as our joint KL
        hp["max_kl"] = hp["max_kl"] / _action_dim(env_id)
    train_cpu: list[float] = []

    class TimedTRPO(TRPO):
        # an update's CPU time: GAE + policy step, then joining (or running) the critic fit
        # (with overlap_critic, the part of the fit that ran during the next rollout is not in it)
        def _start_update(self, batch: Any) -> Any:
            c0 = time.process_time()
            out = super()._start_update(batch)
            train_cpu.append(time.process_time() - c0)
            return out

        def _finish_update(self, update: Any) -> dict[str, Any]:
            c0 = time.process_time()
            out = super()._finish_update(update)
            train_cpu[update.number - 1] += time.process_time() - c0
            return out

    model = TimedTRPO(
        "MlpPolicy",
        env_id,
        seed=seed,
        vectorization="sync",
        num_threads=1,
        overlap_critic=overlap_critic,
        **hp,
    )
    metrics: list[dict[str, Any]] = []
    clocks: list[tuple[float, float]] = []  # (wall, process CPU) at every update's report

    def record(m: dict[str, Any]) -> None:
        metrics.append(m)
        clocks.append((time.perf_counter(), time.process_time()))

    t0, c0 = time.perf_counter(), time.process_time()
    model.learn(steps, callback=record)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # one iteration (rollout + update) in the steady state: between consecutive reports
    between = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(clocks, clocks[1:], strict=False)]
    update = [m["time_total"] - m["time_rollout"] for m in metrics]

    def act(obs: np.ndarray) -> Any:
        return model.predict(obs, deterministic=True)[0]

    nan = float("nan")
    returns = _evaluate(act, env_id, episodes) if episodes else [nan]
    split = {
        f"{k}_total": sum(m[k] for m in metrics)
        for k in ("time_rollout", "time_fisher_cg", "time_line_search", "time_critic")
    }
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "updates": len(metrics),
        "timesteps": int(model.num_timesteps),
        "update_s_median": statistics.median(update),
        "update_cpu_s_median": statistics.median(train_cpu),
        "update_s_total": sum(update),
        "iteration_s_median": statistics.median(w for w, _ in between) if between else nan,
        "iteration_cpu_s_median": statistics.median(c for _, c in between) if between else nan,
        "eval_return": float(np.mean(returns)),
        "max_kl": hp["max_kl"],
        "params_digest": content_digest(
            {"policy": model.policy.state_dict(), "vf": model.vf_optimizer.state_dict()}
        ),
        **split,
    }


def _worker(args: argparse.Namespace) -> None:
    if args.worker == "sb3":
        out = run_sb3(args.env, args.steps[0], args.seed, args.eval_episodes)
    else:
        out = run_ours(
            args.env,
            args.steps[0],
            args.seed,
            args.eval_episodes,
            args.kl_match,
            args.overlap_critic,
        )
    print("RESULT " + json.dumps(out), flush=True)


def _spawn(
    impl: str,
    env_id: str,
    steps: int,
    seed: int,
    episodes: int,
    kl_match: str,
    overlap_critic: bool = False,
) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--worker", impl, "--env", env_id, "--steps", str(steps),
        "--seed", str(seed), "--eval-episodes", str(episodes), "--kl-match", kl_match,
    ] + (["--overlap-critic"] if overlap_critic else [])  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{impl} {env_id} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def overlap_compare(args: argparse.Namespace, out: Path) -> int:
    """Ours with ``overlap_critic`` off and on (the order flips on every seed): per update, the
    whole ``learn()``'s wall and process CPU time over its updates, and the steady-state medians
    of one iteration (rollout + update: the intervals between consecutive update reports, so the
    first update with TorchScript's compilation is left out); the 1-minute load average before
    each run; and whether both modes end with bit-identical parameters."""
    rows: list[dict[str, Any]] = []
    for env_id, steps in zip(args.envs, args.steps, strict=True):
        for i, seed in enumerate(args.seeds):
            for overlap in (False, True) if i % 2 == 0 else (True, False):
                load = os.getloadavg()[0]
                r = _spawn("ours", env_id, steps, seed, args.eval_episodes, args.kl_match, overlap)
                row = {"env": env_id, "steps": steps, "seed": seed, "overlap_critic": overlap}
                row.update(r, load_before=load)
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(out / f"bench_overlap{args.tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("ms per update, overlap_critic off / on (learn: whole run / updates; iter: median)")
    print("env         seed  learn wall     learn CPU      iter wall      iter CPU       load")
    for env_id in args.envs:
        for seed in args.seeds:
            off, on = (
                next(r for r in rows if (r["env"], r["seed"], r["overlap_critic"]) == key)
                for key in ((env_id, seed, False), (env_id, seed, True))
            )
            cells = [
                f"{1e3 * off[k] / n(off):6.0f} / {1e3 * on[k] / n(on):<4.0f}"
                for k, n in (
                    ("wall_s", lambda r: r["updates"]),
                    ("cpu_s", lambda r: r["updates"]),
                    ("iteration_s_median", lambda r: 1),
                    ("iteration_cpu_s_median", lambda r: 1),
                )
            ]
            same = off["params_digest"] == on["params_digest"]
            print(
                f"{env_id:10s} {seed:4d}  {'  '.join(cells)}  "
                f"{off['load_before']:.2f} / {on['load_before']:.2f}  bit-identical {same}"
            )
    return 0


def _summary(rows: list[dict[str, Any]], env_id: str) -> dict[str, Any]:
    def med(impl: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["impl"] == impl and r["env"] == env_id)

    def mean_sd(impl: str) -> tuple[float, float]:
        xs = [r["eval_return"] for r in rows if r["impl"] == impl and r["env"] == env_id]
        return float(np.mean(xs)), float(np.std(xs))

    ours_ret, sb3_ret = mean_sd("ours"), mean_sd("sb3")
    return {
        "env": env_id,
        "runs_per_impl": sum(1 for r in rows if r["impl"] == "ours" and r["env"] == env_id),
        "sb3_wall_s": med("sb3", "wall_s"),
        "ours_wall_s": med("ours", "wall_s"),
        "wall_ratio": med("ours", "wall_s") / med("sb3", "wall_s"),
        "sb3_update_s": med("sb3", "update_s_median"),
        "ours_update_s": med("ours", "update_s_median"),
        "update_ratio": med("ours", "update_s_median") / med("sb3", "update_s_median"),
        "sb3_cpu_s": med("sb3", "cpu_s"),
        "ours_cpu_s": med("ours", "cpu_s"),
        "cpu_ratio": med("ours", "cpu_s") / med("sb3", "cpu_s"),
        "sb3_update_cpu_s": med("sb3", "update_cpu_s_median"),
        "ours_update_cpu_s": med("ours", "update_cpu_s_median"),
        "update_cpu_ratio": med("ours", "update_cpu_s_median") / med("sb3", "update_cpu_s_median"),
        "sb3_return_mean": sb3_ret[0],
        "sb3_return_sd": sb3_ret[1],
        "ours_return_mean": ours_ret[0],
        "ours_return_sd": ours_ret[1],
    }


def breakdown(env_id: str, updates: int = 6) -> dict[str, float]:
    """CPU milliseconds per update / per vector step, sb3 and ours alternating in one process on
    equal rollouts: ours split by phase (GAE, surrogate + gradient, Fisher + CG, line search +
    rest of the policy step: main-thread CPU; the critic fit runs in a second thread, so the
    update is given as CPU of both threads, of the main thread and as wall time), sb3's
    ``train()`` whole, the rollout cost per vector step of both, and the bare env step
    (``gym.make`` envs, random actions) as a floor."""
    import collections

    import gymnasium as gym
    import torch
    from sb3_contrib import TRPO as SB3TRPO
    from stable_baselines3.common.callbacks import CallbackList
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    import agents.base as base
    from agents import TRPO

    torch.set_num_threads(1)
    hp = _hyperparameters(env_id)
    acc: dict[str, float] = collections.defaultdict(float)

    def timed(obj: Any, name: str, key: str) -> None:
        f = getattr(obj, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            c = time.thread_time()  # this thread only: the critic fits in another one
            out = f(*a, **k)
            acc[key] += time.thread_time() - c
            return out

        setattr(obj, name, wrapper)

    ours = TRPO("MlpPolicy", env_id, seed=0, num_threads=1, **hp)
    ours._start()
    for name, key in [
        ("_surrogate_and_grad", "ours surrogate+grad"),
        ("_natural_step", "ours Fisher build + CG"),
        ("_policy_update", "ours policy step (all)"),
    ]:
        timed(ours, name, key)
    timed(base, "compute_gae_t", "ours GAE")
    venv = make_vec_env(env_id, n_envs=hp["n_envs"], seed=0)
    if hp["normalize_obs"] or hp["normalize_reward"]:
        venv = VecNormalize(venv, hp["normalize_obs"], hp["normalize_reward"], gamma=hp["gamma"])
    sb3 = SB3TRPO(
        "MlpPolicy", venv, learning_rate=hp["vf_lr"], n_steps=hp["n_steps"],
        batch_size=hp["vf_minibatch"], gamma=hp["gamma"], cg_max_steps=hp["cg_iters"],
        cg_damping=hp["cg_damping"], n_critic_updates=hp["vf_epochs"], gae_lambda=hp["gae_lambda"],
        target_kl=hp["max_kl"] / _action_dim(env_id), seed=0, device="cpu",
        policy_kwargs=dict(optimizer_kwargs=dict(eps=1e-8)),
    )  # fmt: skip
    sb3._setup_learn(10**9, None)
    cb = CallbackList([])
    cb.init_callback(sb3)
    n = hp["n_steps"]
    for _ in range(updates):
        c = time.process_time()
        batch = ours.collector.collect()
        acc["ours rollout / vec step"] += (time.process_time() - c) / n
        c, m, w = time.process_time(), time.thread_time(), time.perf_counter()
        metrics = ours.train_on_batch(batch)
        acc["ours update (train_on_batch), both threads"] += time.process_time() - c
        acc["ours update, main thread"] += time.thread_time() - m
        acc["ours update, wall"] += time.perf_counter() - w
        acc["ours critic fit (its thread), wall"] += metrics["time_critic"]
        c = time.process_time()
        sb3.collect_rollouts(sb3.env, cb, sb3.rollout_buffer, n_rollout_steps=n)
        acc["sb3 rollout / vec step"] += (time.process_time() - c) / n
        c = time.process_time()
        sb3.train()
        acc["sb3 update (train)"] += time.process_time() - c
    acc["ours line search + rest of policy step"] = (
        acc["ours policy step (all)"] - acc["ours surrogate+grad"] - acc["ours Fisher build + CG"]
    )
    envs = [gym.make(env_id) for _ in range(hp["n_envs"])]
    for i, e in enumerate(envs):
        e.reset(seed=i)
        e.action_space.seed(i)
    c = time.process_time()
    for _ in range(updates * n):
        for e in envs:
            _, _, term, trunc, _ = e.step(e.action_space.sample())
            if term or trunc:
                e.reset()
    acc["bare env step / vec step"] = (time.process_time() - c) / n
    return {k: 1e3 * v / updates for k, v in sorted(acc.items())}


def kl_scale_check(env_id: str, n: int = 256) -> dict[str, float]:
    """Our exact Fisher-vector product vs sb3-contrib's KL-Hessian-vector product with the same
    actor weights on the same ``n`` observations: ``{"norm_ratio": ‖Fv‖/‖Hv‖, "rel_diff_d":
    ‖Fv - d·Hv‖/‖d·Hv‖, "d": d}`` (``d`` = action dimension for ``Box``, else 1)."""
    import copy

    import torch
    from sb3_contrib import TRPO as SB3TRPO
    from stable_baselines3.common.distributions import kl_divergence

    from agents import TRPO
    from npg import make_fisher

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ours = TRPO("MlpPolicy", env_id, n_envs=1, n_steps=64, vf_minibatch=64, seed=0)
    sb3 = SB3TRPO("MlpPolicy", env_id, n_steps=64, batch_size=64, device="cpu", seed=0)
    actor, sp = ours.policy.actor, sb3.policy
    with torch.no_grad():
        for p in actor.parameters():  # move away from the init, then copy into sb3
            p.add_(0.3 * torch.randn_like(p))
        m = dict(actor.named_parameters())
        pairs = [
            (sp.mlp_extractor.policy_net[0], "net.0"),
            (sp.mlp_extractor.policy_net[2], "net.2"),
            (sp.action_net, "net.4"),
        ]
        for layer, name in pairs:
            layer.weight.copy_(m[f"{name}.weight"])
            layer.bias.copy_(m[f"{name}.bias"])
        if "log_std" in m:
            sp.log_std.copy_(m["log_std"])
    obs = torch.randn(n, ours.policy.obs_dim)
    with torch.no_grad():
        old = copy.copy(sp.get_distribution(obs))
    kl = kl_divergence(sp.get_distribution(obs), old).mean()
    params = [p for name, p in sp.named_parameters() if "value" not in name]
    grads = torch.autograd.grad(kl, params, create_graph=True, allow_unused=True)
    used = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
    gkl = torch.cat([g.reshape(-1) for _, g in used])  # same order as ours: log_std, W1, b1, ...
    v = torch.randn(gkl.numel())
    hv = torch.cat([h.reshape(-1) for h in torch.autograd.grad(gkl @ v, [p for p, _ in used])])
    fv = make_fisher("exact", actor, obs, ours.family).mv(v)
    d = _action_dim(env_id)
    ours.close()
    return {
        "d": float(d),
        "norm_ratio": float(fv.norm() / hv.norm()),
        "rel_diff_d": float((fv - d * hv).norm() / (d * hv).norm()),
    }


def _load_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``bench_runs*.csv`` with numbers parsed."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in r.items():
                try:
                    row[k] = float(v) if v != "" else float("nan")
                except ValueError:
                    row[k] = v
            rows.append(row)
    return rows


def _plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Bar chart of the median run and update times (wall and CPU), ours / sb3-contrib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    keys = [
        ("whole run", [("wall", "wall_s"), ("CPU", "cpu_s")], "s"),
        ("one update", [("wall", "update_s"), ("CPU", "update_cpu_s")], "s"),
    ]
    x = np.arange(len(summary))
    for ax, (title, pairs, unit) in zip(axes, keys, strict=True):
        width = 0.2
        for j, (label, key) in enumerate(pairs):
            for k, impl in enumerate(("sb3", "ours")):
                vals = [s[f"{impl}_{key}"] for s in summary]
                off = (2 * j + k - 1.5) * width
                bars = ax.bar(x + off, vals, width, label=f"{impl} {label}", alpha=0.9 - 0.4 * j)
                if impl == "ours":
                    for b, s in zip(bars, summary, strict=True):
                        ratio = s[f"ours_{key}"] / s[f"sb3_{key}"]
                        ax.annotate(f"{ratio:.2f}x", (b.get_x() + width / 2, b.get_height()),
                                    ha="center", va="bottom", fontsize=7)  # fmt: skip
        ax.set_xticks(x, [s["env"] for s in summary])
        ax.set_yscale("log")
        ax.set_ylabel(unit)
        ax.set_title(f"{title} (median over runs; label: ours/sb3)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the alternating benchmark and write the per-run and summary CSVs."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--envs", nargs="+", default=["CartPole-v1", "Hopper-v5"])
    p.add_argument("--steps", nargs="+", type=int, default=[100_000, 200_000])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument(
        "--out",
        default=str(Path(tempfile.gettempdir()) / "npg" / "bench"),
        help="folder for bench_runs.csv / summary (default: outside the repository; the "
        "committed results: docs/bench)",
    )
    p.add_argument("--tag", default="", help="suffix of the CSV names")
    p.add_argument("--check-kl", action="store_true", help="only compare Fv with sb3's Hv")
    p.add_argument("--breakdown", action="store_true", help="only the CPU-time split per phase")
    p.add_argument("--kl-match", choices=["nominal", "sum"], default="sum")
    p.add_argument("--impls", nargs="+", default=["sb3", "ours"], choices=["sb3", "ours"])
    p.add_argument("--from-csv", default=None, help="only summarize/plot this bench_runs CSV")
    p.add_argument(
        "--overlap-critic",
        action="store_true",
        help="only ours, overlap_critic off vs on (bench_overlap.csv and a table per seed)",
    )
    p.add_argument("--worker", choices=["sb3", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--env", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.check_kl:
        for env_id in args.envs:
            print(env_id, json.dumps(kl_scale_check(env_id)), flush=True)
        return 0
    if args.breakdown:
        for env_id in args.envs:
            for k, v in breakdown(env_id).items():
                print(f"{env_id:12s} {k:40s} {v:9.3f} ms", flush=True)
        return 0
    if not args.from_csv and len(args.steps) != len(args.envs):
        p.error("--steps needs one value per --envs entry")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.overlap_critic:
        return overlap_compare(args, out)
    rows: list[dict[str, Any]] = []
    runs_path = out / f"bench_runs{args.tag}.csv"
    if args.from_csv:
        rows = _load_rows(Path(args.from_csv))
        args.envs = [e for e in args.envs if any(r["env"] == e for r in rows)]
        args.seeds = []
    for env_id, steps in zip(args.envs, args.steps, strict=False):
        for i, seed in enumerate(args.seeds):
            order = ("sb3", "ours") if i % 2 == 0 else ("ours", "sb3")
            for impl in order:
                if impl not in args.impls:
                    continue
                r = _spawn(impl, env_id, steps, seed, args.eval_episodes, args.kl_match)
                row = {"env": env_id, "steps": steps, "seed": seed, "impl": impl, **r}
                rows.append(row)
                print(json.dumps(row), flush=True)
                fields = sorted({k for x in rows for k in x}, key=lambda k: (k not in row, k))
                with open(runs_path, "w", newline="") as f:
                    csv.DictWriter(f, fields).writeheader()
                    csv.DictWriter(f, fields).writerows(rows)
    if {r["impl"] for r in rows} != {"sb3", "ours"}:
        return 0  # one side only: no ratios (merge the CSVs and use --from-csv)
    summary = [_summary(rows, e) for e in args.envs]
    with open(out / f"bench_summary{args.tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    _plot(summary, out / f"bench_vs_sb3{args.tag}.png")
    for s in summary:
        print(
            f"{s['env']}: wall {s['ours_wall_s']:.1f}s vs {s['sb3_wall_s']:.1f}s "
            f"(ratio {s['wall_ratio']:.3f}); update {s['ours_update_s'] * 1e3:.1f}ms vs "
            f"{s['sb3_update_s'] * 1e3:.1f}ms (ratio {s['update_ratio']:.3f}); CPU ratios "
            f"run {s['cpu_ratio']:.3f}, update {s['update_cpu_ratio']:.3f}; return "
            f"{s['ours_return_mean']:.1f}±{s['ours_return_sd']:.1f} vs "
            f"{s['sb3_return_mean']:.1f}±{s['sb3_return_sd']:.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
