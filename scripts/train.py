"""Train an on-policy natural-gradient agent on a Gymnasium task.

    python scripts/train.py                       # TRPO on CartPole-v1 with its preset
    python scripts/train.py --env Pendulum-v1 --algo npg --seed 3 --fisher kfac
    python scripts/train.py --resume runs/trpo_CartPole-v1_s0    # continue an interrupted run

A run directory holds ``config.json`` (the resolved configuration), ``metrics.csv`` (one row
per update, flushed as it is written), ``checkpoints/`` (the last K resumable checkpoints) and
``model.pt`` (the final agent). SIGINT/SIGTERM save a checkpoint and exit with a message.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import inspect
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents import ALGORITHMS, CheckpointManager, TrainingInterrupted  # noqa: E402
from agents.checkpoint import replace_durably  # noqa: E402
from agents.presets import get_preset  # noqa: E402

# options of the agents that the CLI does not expose as flags
_HIDDEN = {"verbose", "env_kwargs", "fisher_kwargs", "device", "num_threads", "seed", "n_envs"}
METRICS_FILE = "metrics.csv"


def _hyperparameter_flags(parser: argparse.ArgumentParser, algo_cls: type) -> list[str]:
    """One ``--flag`` per keyword argument of the algorithm's constructor."""
    names = []
    group = parser.add_argument_group(f"{algo_cls.__name__} hyperparameters (default: preset)")
    for name, p in inspect.signature(algo_cls.__init__).parameters.items():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or name in _HIDDEN:
            continue
        flag = "--" + name.replace("_", "-")
        default = p.default
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(default, tuple | list) or name.endswith("_arch"):
            group.add_argument(flag, type=int, nargs="*", default=None, metavar="W")
        elif isinstance(default, int):
            group.add_argument(flag, type=int, default=None)
        elif isinstance(default, float):
            group.add_argument(flag, type=float, default=None)
        else:
            group.add_argument(flag, type=str, default=None)
        names.append(name)
    return names


def build_parser(algo: str) -> tuple[argparse.ArgumentParser, list[str]]:
    """The full CLI for ``algo`` (its hyperparameter flags come from its constructor)."""
    parser = argparse.ArgumentParser(
        description="Train NPG/TRPO (and registered algorithms) with a pluggable Fisher.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--env", default="CartPole-v1", help="Gymnasium env id")
    parser.add_argument("--algo", default="trpo", choices=sorted(ALGORITHMS))
    parser.add_argument(
        "--preset",
        default="auto",
        help="'auto': the tuned preset of (algo, env) if any; 'none': library defaults",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--total-steps", type=int, default=None, help="default: preset or 1e5")
    parser.add_argument("--n-envs", type=int, default=None)
    parser.add_argument("--run-dir", default=None, help="default: runs/<algo>_<env>_s<seed>")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="updates (0: never)")
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints kept")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--tensorboard", action="store_true", help="log to RUN_DIR/tb")
    parser.add_argument("--wandb", action="store_true", help="log to W&B (offline by default)")
    parser.add_argument("--wandb-project", default="npg")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--verbose", type=int, default=0)
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="rollout workers as Ray actors (0: in-process); --n-envs is then per worker",
    )
    parser.add_argument(
        "--ray-address", default=None, help="join this Ray cluster (default: a local instance)"
    )
    names = _hyperparameter_flags(parser, ALGORITHMS[algo])
    return parser, names


def resolve_config(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """Preset, then explicit flags on top; returns the JSON-able run configuration."""
    preset = get_preset(args.algo, args.env) if args.preset == "auto" else {}
    if args.preset not in ("auto", "none"):
        raise SystemExit(f"--preset {args.preset!r}: accepted 'auto' or 'none'")
    total = preset.pop("total_timesteps", 100_000)
    hp = dict(preset)
    for name in names:
        value = getattr(args, name)
        if value is not None:
            hp[name] = value
    if args.n_envs is not None:
        hp["n_envs"] = args.n_envs
    if hp.get("preconditioner") == "none":
        hp["preconditioner"] = None
    return {
        "algo": args.algo,
        "env": args.env,
        "seed": args.seed,
        "total_timesteps": args.total_steps if args.total_steps is not None else total,
        "preset": args.preset,
        "hyperparameters": hp,
        "threads": args.threads,
        "checkpoint_every": args.checkpoint_every,
        "keep_last": args.keep_last,
        "workers": args.workers,
        "ray_address": args.ray_address,
        "command": " ".join(sys.argv),
    }


class MetricsLogger:
    """Per-update metrics to CSV (flushed per row), progress bar, TensorBoard, W&B."""

    def __init__(self, run_dir: Path, total: int, initial: int, args: argparse.Namespace) -> None:
        self.path = run_dir / METRICS_FILE
        self.file = None
        self.writer: csv.DictWriter | None = None
        self.fields: list[str] | None = None
        if self.path.exists():
            with open(self.path, newline="") as f:
                self.fields = next(csv.reader(f), None)
        self.bar = None
        if not args.no_progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.tb = None
        if args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except Exception as e:  # noqa: BLE001 - optional dependency
                warnings.warn(f"--tensorboard ignored: {e}", stacklevel=2)
        self.wandb = None
        if args.wandb:
            try:
                import wandb

                os.environ.setdefault("WANDB_MODE", "offline")
                os.environ.setdefault("WANDB_SILENT", "true")
                self.wandb = wandb.init(
                    project=args.wandb_project,
                    dir=str(run_dir),
                    name=run_dir.name,
                    config=json.loads((run_dir / "config.json").read_text()),
                    resume="allow",
                    id=run_dir.name,
                    settings=wandb.Settings(init_timeout=10),
                )
            except Exception as e:  # noqa: BLE001 - optional and never blocking
                warnings.warn(f"--wandb ignored: {e}", stacklevel=2)

    def __call__(self, m: dict[str, Any]) -> bool:
        if self.writer is None:
            new = self.fields is None
            self.fields = self.fields or list(m)
            self.file = open(self.path, "a", newline="")  # noqa: SIM115 - kept open for the run
            self.writer = csv.DictWriter(self.file, self.fields, extrasaction="ignore")
            if new:
                self.writer.writeheader()
        self.writer.writerow(m)
        self.file.flush()
        if self.bar is not None:
            self.bar.n = int(m["timesteps"])
            self.bar.set_postfix(ret=f"{m['ep_return_mean']:.1f}", sps=f"{m['fps']:.0f}")
            self.bar.refresh()
        scalars = {k: float(v) for k, v in m.items() if isinstance(v, int | float)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, int(m["timesteps"]))
        if self.wandb is not None:
            try:
                self.wandb.log(scalars, step=int(m["timesteps"]))
            except Exception:  # noqa: BLE001 - never let logging stop training
                self.wandb = None
        return True

    def close(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def truncate_metrics(path: Path, updates: int) -> None:
    """Drop rows past ``updates`` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    col = rows[0].index("update")

    def keep(row: list[str]) -> bool:
        # a row cut short by a hard kill (SIGKILL, power loss) is dropped too
        return len(row) == len(rows[0]) and row[col].isdigit() and int(row[col]) <= updates

    kept = [rows[0]] + [r for r in rows[1:] if keep(r)]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
        f.flush()
        os.fsync(f.fileno())
    replace_durably(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--algo", default="trpo")
    pre.add_argument("--resume", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.resume:
        cfg_path = Path(known.resume) / "config.json"
        if not cfg_path.exists():
            raise SystemExit(f"--resume {known.resume}: no config.json there")
        known.algo = json.loads(cfg_path.read_text())["algo"]
    if known.algo not in ALGORITHMS:
        raise SystemExit(f"--algo {known.algo!r}: accepted {', '.join(sorted(ALGORITHMS))}")
    parser, names = build_parser(known.algo)
    args = parser.parse_args(argv)

    if args.workers < 0:
        raise SystemExit(f"--workers {args.workers}: accepted 0 (in-process) or a positive count")
    import torch

    torch.set_num_threads(args.threads)
    algo_cls = ALGORITHMS[known.algo]
    if args.resume:
        run_dir = Path(args.resume)
        config = json.loads((run_dir / "config.json").read_text())
        ckpts = CheckpointManager(run_dir / "checkpoints", config["keep_last"])
        state, path = ckpts.load_latest(fallback=True)
        truncate_metrics(run_dir / METRICS_FILE, int(state["num_updates"]))
        agent = algo_cls.load(state, verbose=args.verbose, num_threads=config["threads"])
        print(f"resuming {run_dir} from {path} ({agent.num_timesteps} steps)", file=sys.stderr)
    else:
        config = resolve_config(args, names)
        run_dir = Path(
            args.run_dir or f"runs/{args.algo}_{args.env.replace('/', '-')}_s{args.seed}"
        )
        if (run_dir / METRICS_FILE).exists():
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = run_dir.with_name(f"{run_dir.name}_{stamp}")
        # Builds (and validates) the agent before anything is written.
        try:
            agent = algo_cls(
                "MlpPolicy",
                config["env"],
                seed=config["seed"],
                num_threads=config["threads"],
                verbose=args.verbose,
                **config["hyperparameters"],
            )
        except ValueError as e:  # bad configuration: one line, no traceback
            raise SystemExit(f"error: {e}") from None
        run_dir.mkdir(parents=True, exist_ok=True)
        config["resolved"] = agent.config
        (run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
        ckpts = CheckpointManager(run_dir / "checkpoints", config["keep_last"])
    if args.resume and (args.workers or args.ray_address):  # explicit flags win on resume
        config["workers"], config["ray_address"] = args.workers, args.ray_address
    if config.get("workers"):
        from agents.ray_rollout import attach_ray_workers

        attach_ray_workers(agent, config["workers"], config.get("ray_address"))
    total = int(config["total_timesteps"])
    logger = MetricsLogger(run_dir, total, agent.num_timesteps, args)
    try:
        agent.learn(
            total - agent.num_timesteps,
            callback=logger,
            reset_num_timesteps=False,
            checkpoints=ckpts,
            checkpoint_every=config["checkpoint_every"],
        )
    except TrainingInterrupted as e:
        logger.close()
        print(f"\n{e}. Resume with: python scripts/train.py --resume {run_dir}", file=sys.stderr)
        return 128 + e.signum
    except BaseException:
        logger.close()
        raise
    logger.close()
    ckpts.save(agent._capture_state(), agent.num_updates)
    agent.save(run_dir / "model.pt")
    agent.close()
    print(f"done: {agent.num_timesteps} steps; run directory {run_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
