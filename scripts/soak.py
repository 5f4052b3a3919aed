"""Soak test: one training run, killed at random (SIGKILL / SIGTERM / SIGINT) and resumed with
``scripts/train.py --resume`` again and again, must end complete and with continuous metrics.

    python scripts/soak.py --minutes 30                  # TRPO on CartPole-v1, checkpoint every 3
    python scripts/soak.py --minutes 10 --env Pendulum-v1 --checkpoint-every 2 --seed 1

The run's total steps are sized (from a short calibration run) so that training alone takes about
``--budget-fraction`` of ``--minutes``; kills continue until the run finishes or the time is up,
after which the run is resumed without kills until it completes (hard stop at 2× ``--minutes``).
SIGKILL gives the process no chance to save: resume starts from the last periodic checkpoint
and drops the metrics rows written after it. The final check: ``metrics.csv`` has updates
``1..K`` exactly once each, env steps increasing by ``n_steps × n_envs`` per update, ``K`` equal to
the newest checkpoint's ``num_updates`` and the total reached; ``model.pt`` loads. A summary (kills
survived by signal, restarts, updates) is printed and written to ``RUN_DIR/soak.json``; the exit
code is 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}


def _read_metrics(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _launch(args: argparse.Namespace, run_dir: Path, total: int, resume: bool) -> subprocess.Popen:
    """Start ``train.py`` (fresh or ``--resume``) with one torch thread, output to a log."""
    if resume:
        cmd = [str(TRAIN), "--resume", str(run_dir)]
    else:
        cmd = [str(TRAIN), "--env", args.env, "--algo", args.algo, "--seed", str(args.seed)]
        cmd += ["--total-steps", str(total), "--run-dir", str(run_dir)]
        cmd += ["--checkpoint-every", str(args.checkpoint_every), "--keep-last", "3"]
        cmd += ["--threads", "1", *args.train_args]
    log = open(run_dir.parent / f"{run_dir.name}.soak.log", "a")  # noqa: SIM115 - child owns it
    log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n")
    log.flush()
    return subprocess.Popen(
        [sys.executable, *cmd, "--no-progress"], cwd=ROOT, stdout=log, stderr=log, text=True
    )


def _calibrate(args: argparse.Namespace) -> tuple[float, int]:
    """Steps/s of an uninterrupted run (``--calibrate-s`` seconds) and the steps per update."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "cal"
        run.parent.mkdir(exist_ok=True)
        proc = _launch(args, run, 10**9, resume=False)
        t0 = time.time()
        while time.time() - t0 < args.calibrate_s and proc.poll() is None:
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        rows = _read_metrics(run)
        if len(rows) < 2:
            raise SystemExit(f"calibration produced {len(rows)} updates; raise --calibrate-s")
        per_update = int(rows[1]["timesteps"]) - int(rows[0]["timesteps"])
        return float(rows[-1]["fps"]), per_update


def check_run(run_dir: Path, total: int) -> dict[str, Any]:
    """Continuity and completeness of a finished run; ``{"ok": bool, "problems": [...]}``."""
    import torch

    from agents import CheckpointManager

    torch.set_num_threads(1)

    problems: list[str] = []
    rows = _read_metrics(run_dir)
    updates = [int(r["update"]) for r in rows]
    steps = [int(r["timesteps"]) for r in rows]
    k = len(rows)
    if updates != list(range(1, k + 1)):
        dup = sorted({u for u in updates if updates.count(u) > 1})
        gaps = sorted(set(range(1, max(updates, default=0) + 1)) - set(updates))
        problems.append(f"update column is not 1..{k}: duplicates {dup[:10]}, gaps {gaps[:10]}")
    diffs = {b - a for a, b in zip(steps, steps[1:], strict=False)}
    if len(diffs) > 1 or (diffs and min(diffs) <= 0):
        problems.append(f"env steps not increasing by a constant batch: increments {diffs}")
    if not steps or steps[-1] < total:
        problems.append(f"incomplete: last row at {steps[-1] if steps else 0} < {total} steps")
    paths = CheckpointManager(run_dir / "checkpoints").paths()
    newest = torch.load(paths[-1], weights_only=True) if paths else None
    if newest is None or int(newest["num_updates"]) != k:
        got = None if newest is None else newest["num_updates"]
        problems.append(f"newest checkpoint has num_updates={got}, metrics have {k} rows")
    try:
        from agents import TRPO

        TRPO.load(run_dir / "model.pt").close()
    except Exception as e:
        problems.append(f"model.pt does not load: {type(e).__name__}: {e}")
    return {"ok": not problems, "problems": problems, "updates": k, "final_steps": steps[-1:]}


TIMING = {"steps_per_s", "fps", "time_rollout", "time_fisher_cg", "time_line_search"}
TIMING |= {"time_critic", "time_total"}


def compare_with_reference(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """Train the same config uninterrupted into ``RUN_DIR_ref`` and compare every per-update
    metric except wall-clock ones (bit-identical expected with the sync vector env on CPU)."""
    config = json.loads((run_dir / "config.json").read_text())
    ref = run_dir.with_name(run_dir.name + "_ref")
    if ref.exists():
        shutil.rmtree(ref)
    ref.mkdir(parents=True)
    proc = _launch(args, ref, int(config["total_timesteps"]), resume=False)
    code = proc.wait()
    if code != 0:
        return {"identical": False, "problem": f"reference run exited with {code}"}
    a, b = _read_metrics(run_dir), _read_metrics(ref)
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in a]
    strip_ref = [{k: v for k, v in r.items() if k not in TIMING} for r in b]
    first = next(
        (i for i, (x, y) in enumerate(zip(strip, strip_ref, strict=False)) if x != y), None
    )
    same = len(strip) == len(strip_ref) and first is None
    return {"identical": same, "rows": len(strip), "rows_ref": len(strip_ref), "first_diff": first}


def main(argv: list[str] | None = None) -> int:
    """Run the soak; exit code 0 iff the final run is continuous and complete."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="kill phase length")
    p.add_argument("--env", default="CartPole-v1")
    p.add_argument("--algo", default="trpo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=3, help="updates between checkpoints")
    p.add_argument("--run-dir", default="runs/soak")
    p.add_argument("--total-steps", type=int, default=None, help="default: from calibration")
    p.add_argument("--budget-fraction", type=float, default=0.5, help="of --minutes, training")
    p.add_argument("--calibrate-s", type=float, default=30.0)
    p.add_argument("--min-gap", type=float, default=5.0, help="s after a launch before its kill")
    p.add_argument("--max-gap", type=float, default=40.0)
    p.add_argument("--stop-timeout", type=float, default=120.0, help="s to wait after a kill")
    p.add_argument("--signals", nargs="+", default=list(SIGNALS), choices=list(SIGNALS))
    p.add_argument("--rng-seed", type=int, default=0, help="seed of the kill schedule")
    p.add_argument(
        "--reference",
        action="store_true",
        help="also train uninterrupted into RUN_DIR_ref and compare the metrics bit for bit",
    )
    p.add_argument("--check-only", action="store_true", help="only (re)check an existing run")
    p.add_argument("train_args", nargs="*", help="extra train.py flags (after --)")
    args = p.parse_args(argv)
    # Children inherit an *ignored* SIGINT (e.g. when this script runs as a background job of a
    # non-interactive shell); with a handler here, exec resets it to the default in the child.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    run_dir = Path(args.run_dir)
    if args.check_only:
        config = json.loads((run_dir / "config.json").read_text())
        for key in ("env", "algo", "seed", "checkpoint_every"):
            setattr(args, key, config[key])
        result = json.loads((run_dir / "soak.json").read_text())
        result["check"] = check_run(run_dir, int(config["total_timesteps"]))
        if args.reference:
            result["reference"] = compare_with_reference(args, run_dir)
        (run_dir / "soak.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({k: result[k] for k in ("check", "reference") if k in result}, indent=2))
        ok = result["check"]["ok"] and result.get("reference", {}).get("identical", True)
        return 0 if ok else 1
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.rng_seed)
    t_start = time.time()
    if args.total_steps is None:
        fps, per_update = _calibrate(args)
        budget = fps * args.minutes * 60 * args.budget_fraction
        total = max(per_update, int(budget) // per_update * per_update)
        print(f"calibration: {fps:.0f} steps/s -> total {total} steps", flush=True)
    else:
        total = args.total_steps
    deadline = time.time() + args.minutes * 60
    hard_stop = t_start + 2 * args.minutes * 60 + 600
    kills: list[dict[str, Any]] = []
    restarts_from_scratch = 0
    launches = 0
    ignored = 0
    finished = False
    while not finished and time.time() < hard_stop:
        resumable = (run_dir / "config.json").exists() and any(
            (run_dir / "checkpoints").glob("ckpt_*.pt")
        )
        if not resumable and run_dir.exists():
            shutil.rmtree(run_dir)  # killed before its first checkpoint: start over
            restarts_from_scratch += 1
        rows_before = len(_read_metrics(run_dir))
        proc = _launch(args, run_dir, total, resume=resumable)
        launched = time.time()
        launches += 1
        kill_at = (
            launched + rng.uniform(args.min_gap, args.max_gap) if launched < deadline else None
        )
        sig_name = rng.choice(args.signals)
        killed = False
        while proc.poll() is None:
            if kill_at is not None and time.time() >= kill_at:
                rows_at_kill = len(_read_metrics(run_dir))
                proc.send_signal(SIGNALS[sig_name])
                try:
                    proc.wait(timeout=args.stop_timeout)
                except subprocess.TimeoutExpired:  # the signal was not acted on: note, escalate
                    ignored += 1
                    print(f"{sig_name} ignored for {args.stop_timeout}s; SIGKILL", flush=True)
                    proc.kill()
                    proc.wait()
                killed = True
                break
            if time.time() > hard_stop:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=300)
                break
            time.sleep(0.1)
        code = proc.returncode
        if code == 0:
            finished = True
        elif not killed:
            print(f"train.py exited with {code} without a kill; see the .soak.log", flush=True)
            break
        else:
            sig = SIGNALS[sig_name]
            graceful = code == 128 + sig
            if code == -signal.SIGKILL and sig != signal.SIGKILL:
                sig_name = f"{sig_name} (ignored, then SIGKILL)"
            entry = {
                "signal": sig_name,
                "t_after_launch_s": round(kill_at - launched, 1),
                "resumed_launch": resumable,
                "rows_before_launch": rows_before,
                "rows_at_kill": rows_at_kill,
                "during_training": rows_at_kill > rows_before,
                "exit_code": code,
                "kind": "graceful" if graceful else ("abrupt" if code == -sig else "other"),
            }
            if graceful:  # a graceful stop saved a checkpoint matching the flushed metrics
                paths = sorted((run_dir / "checkpoints").glob("ckpt_*.pt"))
                rows = len(_read_metrics(run_dir))
                entry["checkpoint_matches_metrics"] = (
                    bool(paths) and int(paths[-1].stem.split("_")[1]) == rows
                )
            kills.append(entry)
        elapsed = (time.time() - t_start) / 60
        what = "finished" if finished else f"{sig_name} -> exit {code}"
        print(f"[{elapsed:5.1f} min] launch {launches}: {what}", flush=True)
    result: dict[str, Any] = {
        "env": args.env,
        "algo": args.algo,
        "total_steps": total,
        "minutes": args.minutes,
        "wall_min": round((time.time() - t_start) / 60, 2),
        "launches": launches,
        "kills": len(kills),
        "kills_by_signal": {s: sum(k["signal"] == s for k in kills) for s in args.signals},
        "kills_by_outcome": {
            o: sum(k["kind"] == o for k in kills) for o in ("graceful", "abrupt", "other")
        },
        "kills_during_training": sum(k["during_training"] for k in kills),
        "graceful_with_matching_checkpoint": sum(
            bool(k.get("checkpoint_matches_metrics")) for k in kills
        ),
        "signals_ignored": ignored,
        "restarts_from_scratch": restarts_from_scratch,
        "finished": finished,
    }
    if finished:
        result["check"] = check_run(run_dir, total)
        result["kills_survived"] = len(kills) if result["check"]["ok"] else 0
    else:
        result["check"] = {"ok": False, "problems": ["the run did not finish"]}
        result["kills_survived"] = 0
    if args.reference and finished:
        result["reference"] = compare_with_reference(args, run_dir)
        result["check"]["ok"] = result["check"]["ok"] and result["reference"]["identical"]
    result["kill_log"] = kills
    (run_dir / "soak.json").write_text(json.dumps(result, indent=2))
    summary = {k: v for k, v in result.items() if k != "kill_log"}
    print(json.dumps(summary, indent=2), flush=True)
    return 0 if result["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
