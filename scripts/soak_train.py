"""Soak test: train with random kills (SIGINT/SIGTERM/SIGKILL) and resumes for a while, then
check that the run's metrics are continuous and complete.

    python scripts/soak_train.py --minutes 30 --run-dir runs/soak
    python scripts/soak_train.py --minutes 3 --verify-reference   # also compare bit-for-bit

SIGINT/SIGTERM make train.py save a checkpoint and exit; SIGKILL gives it no chance, so the
resume starts from the last periodic checkpoint and drops the metric rows written after it.
With ``--verify-reference`` an uninterrupted run of the same length is trained afterwards and
every non-timing metric must be equal (sync vector env on CPU).
"""

from __future__ import annotations

import argparse
import csv
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "scripts"))

from agents import CheckpointManager  # noqa: E402
from agents.base import TIMING_KEYS  # noqa: E402

SIGNALS = {"INT": signal.SIGINT, "TERM": signal.SIGTERM, "KILL": signal.SIGKILL}


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv rows without the wall-clock columns."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in csv.DictReader(f)]


def train_cmd(args: argparse.Namespace, run_dir: Path, resume: bool, total: int) -> list[str]:
    base = [sys.executable, str(ROOT / "scripts" / "train.py"), "--no-progress"]
    if resume:
        return [*base, "--resume", str(run_dir)]
    return [
        *base,
        "--env", args.env,
        "--algo", args.algo,
        "--seed", str(args.seed),
        "--total-steps", str(total),
        "--checkpoint-every", str(args.checkpoint_every),
        "--run-dir", str(run_dir),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit code 0 when the metrics check passes."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--env", default="CartPole-v1")
    p.add_argument("--algo", default="trpo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--total-steps", type=int, default=50_000_000)
    p.add_argument("--checkpoint-every", type=int, default=3)
    p.add_argument("--kill-after", type=float, nargs=2, default=(2.0, 20.0), metavar=("MIN", "MAX"))
    p.add_argument("--signals", default="INT,TERM,KILL")
    p.add_argument("--run-dir", default="runs/soak")
    p.add_argument("--verify-reference", action="store_true")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    run_dir = Path(args.run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"{run_dir} exists; pick a new --run-dir")
    sigs = [SIGNALS[s.strip().upper()] for s in args.signals.split(",")]
    deadline = time.time() + 60 * args.minutes
    kills: dict[str, int] = {}
    started = False
    while time.time() < deadline:
        proc = subprocess.Popen(
            train_cmd(args, run_dir, started, args.total_steps),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait = min(rng.uniform(*args.kill_after), max(0.0, deadline - time.time()))
        try:
            proc.wait(timeout=wait)
            _, err = proc.communicate()
            if proc.returncode != 0:
                print(err, file=sys.stderr)
                raise SystemExit(f"train.py failed on its own (exit {proc.returncode})")
            break  # finished the whole budget
        except subprocess.TimeoutExpired:
            pass
        # the first start must have written its config before we may resume it
        started = started or (run_dir / "config.json").exists()
        sig = rng.choice(sigs)
        proc.send_signal(sig)
        _, err = proc.communicate()
        name = signal.Signals(sig).name
        # before learn() installs its handlers a signal acts as usual (-sig / KeyboardInterrupt)
        expected = proc.returncode in (0, 128 + sig, -sig) or "KeyboardInterrupt" in err
        if not expected:
            print(err, file=sys.stderr)
            raise SystemExit(f"train.py exited {proc.returncode} after {name}")
        kills[name] = kills.get(name, 0) + 1
        if not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir()):
            started = False  # killed before its first checkpoint: start over
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    # end where a resume would start: drop metric rows written after the newest checkpoint
    if started:
        import train  # scripts/train.py

        state, _ = CheckpointManager(run_dir / "checkpoints").load_latest()
        train.truncate_metrics(run_dir / "metrics.csv", int(state["num_updates"]))
    rows = read_rows(run_dir)
    updates = [int(r["update"]) for r in rows]
    ok = updates == list(range(1, len(updates) + 1))
    n_batch = int(rows[0]["timesteps"]) if rows else 0
    ok &= all(int(r["timesteps"]) == n_batch * int(r["update"]) for r in rows)
    total_kills = sum(kills.values())
    print(
        f"soak: {total_kills} kills survived ({kills}); {len(rows)} updates, "
        f"{rows[-1]['timesteps'] if rows else 0} env steps; metrics continuous: {ok}"
    )
    if args.verify_reference and rows:
        ref = run_dir.with_name(run_dir.name + "_reference")
        subprocess.run(["rm", "-rf", str(ref)], check=True)
        cmd = train_cmd(args, ref, False, n_batch * len(rows))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        same = read_rows(ref) == rows
        print(f"soak: identical to an uninterrupted run of {len(rows)} updates: {same}")
        ok &= same
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
