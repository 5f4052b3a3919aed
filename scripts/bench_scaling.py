"""Scaling measurements for docs/scaling.md: rollout throughput, communication volume, update time.

    .venv/bin/python scripts/bench_scaling.py rollout    # env steps/s: in-process, 1, 2 workers
    .venv/bin/python scripts/bench_scaling.py comm       # bytes out (weights) / back (trajectories)
    .venv/bin/python scripts/bench_scaling.py update     # learner update time vs batch size
    .venv/bin/python scripts/bench_scaling.py estimate --inputs a.json b.json c.json

Every section prints a markdown table and, with ``--out FILE``, writes its raw numbers as JSON;
``estimate`` combines the three JSON files into the 8 / 64 / 512-worker projection. All runs use
one torch thread per process (a shared 2-core machine); the load average is printed with each
table because other jobs on the machine change the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import time
from typing import Any

import numpy as np
import torch

from agents import TRPO

ENV = "CartPole-v1"


def load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def _agent(n_envs: int, n_steps: int, net_arch=(64, 64), **kw: Any) -> TRPO:
    return TRPO(
        "MlpPolicy",
        ENV,
        n_envs=n_envs,
        n_steps=n_steps,
        vf_minibatch=n_steps * n_envs,
        net_arch=net_arch,
        seed=0,
        **kw,
    )


def _timed_collects(
    collect, steps_per_collect: int, repeats: int, cpu_time=None
) -> dict[str, float]:
    """Median wall time of ``collect()``, and the env steps per CPU-second of the rollout
    process(es) (``cpu_time()`` after a collect: the workers' own CPU seconds; default: this
    process's), which depends much less than the wall time on the load of the shared machine."""
    collect()  # warm-up: env resets, worker start-up, first weights
    times, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        collect()
        times.append(time.perf_counter() - t0)
        cpus.append(cpu_time() if cpu_time is not None else time.process_time() - c0)
    med = statistics.median(times)
    return {
        "seconds_median": med,
        "seconds_min": min(times),
        "steps": steps_per_collect,
        "steps_per_s": steps_per_collect / med,
        "cpu_s_median": statistics.median(cpus),
        "steps_per_cpu_s": steps_per_collect / statistics.median(cpus),
    }


# --- sections --------------------------------------------------------------------------------
def bench_rollout(args: argparse.Namespace) -> dict[str, Any]:
    """Env steps/s of one rollout (no update) in-process and with 1 and 2 Ray workers."""
    import ray

    from agents.ray_rollout import attach_ray_workers

    e, t = args.envs, args.steps
    rows: dict[str, Any] = {}
    agent = _agent(e, t)
    agent._start()
    rows["in-process"] = _timed_collects(agent.collector.collect, e * t, args.repeats)
    agent.close()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for w in (1, 2):
            agent = _agent(e, t)
            col = attach_ray_workers(agent, w)
            rows[f"ray-{w}"] = _timed_collects(
                col.collect,
                w * e * t,
                args.repeats,
                # summed CPU seconds of the workers
                cpu_time=lambda col=col: sum(c for c, _ in col.last_worker_times),
            )
            rows[f"ray-{w}"]["payload_bytes"] = col.last_payload_bytes
            rows[f"ray-{w}"]["batch_bytes"] = col.last_batch_bytes
            agent.close()
    finally:
        ray.shutdown()
    print(
        f"\nRollout throughput, {ENV}, {e} envs x {t} steps per worker, median of "
        f"{args.repeats} (load average {load()})\n"
    )
    print(
        "| collector | transitions per rollout | wall s (median / min) | env steps/s "
        "| env steps per CPU-second of the rollout processes |"
    )
    print("|---|---|---|---|---|")
    for k, r in rows.items():
        print(
            f"| {k} | {r['steps']} | {r['seconds_median']:.3f} / {r['seconds_min']:.3f} | "
            f"{r['steps_per_s']:.0f} | {r['steps_per_cpu_s']:.0f} |"
        )
    return {"rollout": rows, "envs": e, "steps": t, "load": load()}


def bench_comm(args: argparse.Namespace) -> dict[str, Any]:
    """Serialized sizes (pickle protocol 5, what Ray's object store holds, ±headers) of the
    broadcast (actor weights + normalization moments) and of one worker's returned rollout."""
    from agents.ray_rollout import RolloutWorker

    out: dict[str, Any] = {"weights": [], "trajectories": []}
    for arch in ((64, 64), (256, 256), (1024, 1024)):
        agent = _agent(1, 8, net_arch=arch, normalize_obs=True)
        rms = agent.obs_normalizer.rms
        payload = {
            "actor": {k: v.detach() for k, v in agent.policy.actor.state_dict().items()},
            "obs_rms": (rms.mean, rms.var, rms.count),
            "reward_rms": (np.zeros(()), np.ones(()), 1.0),
        }
        n_params = sum(v.numel() for v in payload["actor"].values())
        out["weights"].append(
            {
                "net_arch": list(arch),
                "params": n_params,
                "bytes": len(pickle.dumps(payload, protocol=5)),
            }
        )
        agent.close()
    for e, t in ((1, 512), (8, 512), (8, 2048)):
        agent = _agent(e, t, normalize_obs=True)
        payload = {
            "actor": agent.policy.actor.state_dict(),
            "obs_rms": (agent.obs_normalizer.rms.mean, agent.obs_normalizer.rms.var, 1e-4),
            "reward_rms": (np.zeros(()), np.ones(()), 1e-4),
        }
        res = RolloutWorker(dict(agent.config), ENV, 0).collect(payload, 0)
        nbytes = len(pickle.dumps(res, protocol=5))
        out["trajectories"].append(
            {
                "envs": e,
                "steps": t,
                "transitions": e * t,
                "bytes": nbytes,
                "bytes_per_transition": nbytes / (e * t),
            }
        )
        agent.close()
    out["transfer"] = _ray_transfer(args)
    print(f"\nBroadcast per update (actor weights, float32, {ENV}: obs 4, 2 actions)\n")
    print("| net_arch | parameters | bytes |")
    print("|---|---|---|")
    for r in out["weights"]:
        print(f"| {r['net_arch']} | {r['params']} | {r['bytes']} |")
    print(f"\nTrajectories back per worker per update ({ENV})\n")
    print("| envs x steps | transitions | bytes | bytes/transition |")
    print("|---|---|---|---|")
    for r in out["trajectories"]:
        print(
            f"| {r['envs']} x {r['steps']} | {r['transitions']} | {r['bytes']} | "
            f"{r['bytes_per_transition']:.1f} |"
        )
    print(
        f"\nRay object transfer worker -> learner (local object store, median of "
        f"{args.repeats}, load average {load()})\n"
    )
    print("| bytes | seconds | MB/s |")
    print("|---|---|---|")
    for r in out["transfer"]:
        mbps = r["bytes"] / r["seconds_median"] / 1e6
        print(f"| {r['bytes']} | {r['seconds_median']:.5f} | {mbps:.0f} |")
    return out


def _ray_transfer(args: argparse.Namespace) -> list[dict[str, float]]:
    """Round trip of an actor call returning ``n`` bytes (numpy) to the learner."""
    import ray

    @ray.remote(num_cpus=1)
    class Echo:
        def blob(self, n: int) -> np.ndarray:
            return np.ones(n, np.uint8)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actor = Echo.remote()
        rows = []
        for n in (1_000, 100_000, 1_000_000, 10_000_000):
            ray.get(actor.blob.remote(n))
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ray.get(actor.blob.remote(n))
                times.append(time.perf_counter() - t0)
            rows.append({"bytes": n, "seconds_median": statistics.median(times)})
        return rows
    finally:
        ray.shutdown()


def bench_update(args: argparse.Namespace) -> dict[str, Any]:
    """Learner time of one update (GAE, Fisher + CG + line search, critic) vs batch size."""
    rows = []
    for b in args.batches:
        e = max(1, b // 512)
        agent = _agent(e, b // e, vf_epochs=10)
        agent.cfg.vf_minibatch = 128
        agent._start()
        batch = agent.collector.collect()
        times, cpus, parts = [], [], []
        for _ in range(args.repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            m = agent.train_on_batch(batch)
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            parts.append((m["time_fisher_cg"], m["time_line_search"], m["time_critic"]))
        med = statistics.median(times)
        rows.append(
            {
                "batch": b,
                "seconds_median": med,
                "cpu_s_median": statistics.median(cpus),
                "fisher_cg": statistics.median(p[0] for p in parts),
                "line_search": statistics.median(p[1] for p in parts),
                "critic": statistics.median(p[2] for p in parts),
            }
        )
        agent.close()
    print(
        f"\nLearner update time, TRPO {ENV} 64x64, exact Fisher + CG(15), 10 critic epochs of "
        f"128-minibatches, median of {args.repeats} (load average {load()})\n"
    )
    print(
        "| batch | update wall s | update CPU s | Fisher+CG wall s | line search wall s "
        "| critic wall s | samples per CPU-second |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['seconds_median']:.3f} | {r['cpu_s_median']:.3f} | "
            f"{r['fisher_cg']:.3f} | {r['line_search']:.3f} | {r['critic']:.3f} | "
            f"{r['batch'] / r['cpu_s_median']:.0f} |"
        )
    return {"update": rows, "load": load()}


def estimate(args: argparse.Namespace) -> dict[str, Any]:
    """Synchronous-update projection at 8/64/512 workers from the measured figures.

    Per update: one worker's rollout (the workers run in parallel, each at the measured 1-worker
    rate ``r_w``), the learner's sequential gather of ``W`` trajectory objects (the measured
    transfer time ``τ(bytes) = τ0 + bytes/β``, fitted), and the learner's update on the whole
    batch (``U(B) = a + b·B``, fitted to the measured update times):
    ``t(W) = n_w/r_w + W·τ(bytes(n_w)) + U(W·n_w)`` with ``n_w`` transitions per worker
    (``r_w`` and ``U`` per CPU-second: every process on a core of its own);
    throughput ``W·n_w / t(W)``, bounded by ``B/U(B)`` (the learner's update as the limit).
    """
    data: dict[str, Any] = {}
    for path in args.inputs:
        with open(path) as f:
            data.update(json.load(f))
    ro, up, tr = data["rollout"], data["update"], data["transfer"]
    e, t = data["envs"], data["steps"]
    r_w = ro["ray-1"]["steps_per_cpu_s"]  # one worker on a core of its own
    bs = np.array([r["batch"] for r in up], float)
    us = np.array([r["cpu_s_median"] for r in up], float)  # one dedicated core
    b_slope, a_icpt = np.polyfit(bs, us, 1)
    if a_icpt < 0:  # noise: refit through the origin
        b_slope, a_icpt = float(bs @ us / (bs @ bs)), 0.0
    inv_beta, tau0 = np.polyfit([r["bytes"] for r in tr], [r["seconds_median"] for r in tr], 1)
    per_transition = statistics.median(r["bytes_per_transition"] for r in data["trajectories"])

    def row(w: int, per_worker: float) -> dict[str, float]:
        batch = w * per_worker
        t_roll = per_worker / r_w
        t_comm = w * (tau0 + per_transition * per_worker * inv_beta)
        t_upd = a_icpt + b_slope * batch
        total = t_roll + t_comm + t_upd
        return {
            "workers": w,
            "batch": batch,
            "rollout_s": t_roll,
            "comm_s": t_comm,
            "update_s": t_upd,
            "steps_per_s": batch / total,
            "update_bound": batch / t_upd,
        }

    workers = (1, 2, 8, 64, 512)
    grow = [row(w, e * t) for w in workers]  # fixed rollout per worker: the batch grows
    fixed = [row(w, args.global_batch / w) for w in workers]  # fixed global batch
    print(
        f"\nU(B) = {a_icpt:.4f} s + {b_slope * 1e6:.2f} us * B; r_w = {r_w:.0f} steps/s; "
        f"transfer = {tau0 * 1e3:.2f} ms + bytes / {1 / inv_beta / 1e6:.0f} MB/s; "
        f"{per_transition:.1f} bytes/transition"
    )
    for title, table in (
        (f"Fixed rollout per worker ({e} envs x {t} steps): the batch grows with W", grow),
        (f"Fixed global batch {args.global_batch}: each worker collects B/W", fixed),
    ):
        print(f"\n{title}\n")
        print("| workers | batch | rollout s | gather s | update s | steps/s | bound B/U(B) |")
        print("|---|---|---|---|---|---|---|")
        for r in table:
            print(
                f"| {r['workers']} | {r['batch']:.0f} | {r['rollout_s']:.3f} | "
                f"{r['comm_s']:.3f} | {r['update_s']:.3f} | {r['steps_per_s']:.0f} | "
                f"{r['update_bound']:.0f} |"
            )
    return {
        "estimate": grow,
        "estimate_fixed_batch": fixed,
        "fit_update": [a_icpt, b_slope],
        "r_w": r_w,
        "fit_transfer": [tau0, inv_beta],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("section", choices=["rollout", "comm", "update", "estimate"])
    p.add_argument("--envs", type=int, default=2, help="sub-envs per worker (rollout)")
    p.add_argument("--steps", type=int, default=512, help="steps per rollout (rollout)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", type=int, nargs="*", default=[1024, 4096, 16384])
    p.add_argument("--inputs", nargs="*", default=[])
    p.add_argument("--global-batch", type=int, default=65536, help="estimate: fixed batch")
    p.add_argument("--out", default=None, help="write the raw numbers here (JSON)")
    args = p.parse_args()
    torch.set_num_threads(1)
    fn = {
        "rollout": bench_rollout,
        "comm": bench_comm,
        "update": bench_update,
        "estimate": estimate,
    }[args.section]
    res = fn(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
