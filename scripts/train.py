"""Train an on-policy natural-gradient agent on a Gymnasium task.

    python scripts/train.py                       # TRPO on CartPole-v1 with its preset
    python scripts/train.py --env Pendulum-v1 --algo npg --seed 3 --fisher kfac
    python scripts/train.py --resume runs/trpo_CartPole-v1_s0    # continue an interrupted run

A run directory holds ``config.json`` (the resolved configuration), ``metrics.csv`` (one row
per update, flushed as it is written), ``checkpoints/`` (the last K resumable checkpoints, the
first at update 0) and ``model.pt`` (the final agent). SIGINT/SIGTERM save a checkpoint and exit
with a message. One process at a time owns a run directory (``.lock``, released by the OS when
the process dies). ``--resume`` may raise ``--total-steps`` (the run is extended); any other
changed flag is refused. Expected errors end the process with one line, no traceback.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import json
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agents import ALGORITHMS, CheckpointManager, TrainingInterrupted
from agents.checkpoint import (
    CheckpointError,
    RunDirInUse,
    RunDirLock,
    replace_durably,
)
from agents.guard import DivergenceError
from agents.loggers import (
    CSVLogger,
    Loggers,
    ProgressBar,
    TensorBoardLogger,
    WandbLogger,
)
from agents.presets import get_preset
from agents.rollout import NonFiniteError

METRICS_FILE = "metrics.csv"
CONFIG_FILE = "config.json"
CONFIG_KEYS = ("algo", "env", "seed", "total_timesteps", "preset", "hyperparameters", "resolved")
CONFIG_KEYS += ("threads", "checkpoint_every", "keep_last")
# flags that may differ on --resume (they do not change what is trained; --total-steps may grow)
RESUME_FREE = {"resume", "total_steps", "no_progress", "verbose", "tensorboard", "wandb"}
RESUME_FREE |= {"wandb_project", "workers", "ray_address"}
# errors that end the process with one line (EnvStepError keeps its worker's traceback)
EXPECTED_ERRORS = (ValueError, OSError, CheckpointError, RunDirInUse, NonFiniteError)
EXPECTED_ERRORS += (DivergenceError,)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` except for flags whose default is ``None`` (their help text
    says what applies: the preset, or the library default)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _flag_kind(hint: Any) -> tuple[type, bool]:
    """``(element type, is a list)`` of a config field's type hint (``X | None`` as ``X``)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_kind(args[0])
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _hyperparameter_flags(
    parser: argparse.ArgumentParser, algo_cls: type, preset: dict[str, Any]
) -> list[str]:
    """One ``--flag`` per option of the algorithm's config class (:mod:`agents.config`): help
    from the field's metadata, choices where it has them, the default it will get (preset or
    library) in the help text; options the algorithm ignores get no flag."""
    config_class = algo_cls.config_class
    hints = typing.get_type_hints(config_class)
    names = []
    group = parser.add_argument_group(
        f"{algo_cls.__name__} hyperparameters (default: the preset of --algo/--env, else the "
        "library default)"
    )
    for f in dataclasses.fields(config_class):
        if f.name in config_class.cli_hidden:
            continue
        flag = "--" + f.name.replace("_", "-")
        library = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = (
            f"{preset[f.name]!r} (preset; library default {library!r})"
            if f.name in preset
            else repr(library)
        )
        help_text = f"{f.metadata['help']} (default: {shown})"
        kind, is_list = _flag_kind(hints[f.name])
        if kind is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif is_list:
            group.add_argument(
                flag, type=kind, nargs="*", default=None, metavar="W", help=help_text
            )
        else:
            group.add_argument(
                flag, type=kind, default=None, choices=f.metadata.get("choices"), help=help_text
            )
        names.append(f.name)
    return names


def build_parser(
    algo: str, env_id: str = "CartPole-v1", preset: str = "auto"
) -> tuple[argparse.ArgumentParser, list[str]]:
    """The full CLI for ``algo`` (its hyperparameter flags come from its config class; their
    help shows the defaults of the preset of ``(algo, env_id)``)."""
    parser = argparse.ArgumentParser(
        description="Train NPG/TRPO (and registered algorithms) with a pluggable Fisher.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--env", default="CartPole-v1", help="Gymnasium env id")
    parser.add_argument("--algo", default="trpo", choices=sorted(ALGORITHMS))
    parser.add_argument(
        "--preset",
        default="auto",
        help="'auto': the tuned preset of (algo, env) if any; 'none': library defaults",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the run")
    parser.add_argument(
        "--total-steps", type=int, default=None, help="env steps (default: the preset's, or 1e5)"
    )
    parser.add_argument(
        "--n-envs", type=int, default=None, help="parallel envs (default: the preset's, or 1)"
    )
    parser.add_argument("--run-dir", default=None, help="default: runs/<algo>_<env>_s<seed>")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="updates (0: never)")
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints kept")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--tensorboard", action="store_true", help="log to RUN_DIR/tb")
    parser.add_argument("--wandb", action="store_true", help="log to W&B (offline by default)")
    parser.add_argument("--wandb-project", default="npg", help="W&B project name")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--verbose", type=int, default=0, help="1: one line per update")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="rollout workers as Ray actors (0: in-process); --n-envs is then per worker",
    )
    parser.add_argument(
        "--ray-address", default=None, help="join this Ray cluster (default: a local instance)"
    )
    presets = get_preset(algo, env_id) if preset == "auto" else {}
    names = _hyperparameter_flags(parser, ALGORITHMS[algo], presets)
    return parser, names


def resolve_config(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """Preset, then explicit flags on top; returns the JSON-able run configuration."""
    preset = get_preset(args.algo, args.env) if args.preset == "auto" else {}
    if args.preset not in ("auto", "none"):
        raise SystemExit(f"--preset {args.preset!r}: accepted 'auto' or 'none'")
    if args.preset == "auto" and not preset:
        print(
            f"note: no preset for {args.algo} on {args.env}; using the library defaults "
            "(agents/config.py) where no flag is given",
            file=sys.stderr,
        )
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


def run_loggers(run_dir: Path, total: int, initial: int, args: argparse.Namespace) -> Loggers:
    """The run's loggers (:mod:`agents.loggers`): ``metrics.csv``, and as asked a progress
    bar, TensorBoard in ``RUN_DIR/tb`` and W&B (offline by default) in ``RUN_DIR/wandb``."""
    loggers: list[Any] = [CSVLogger(run_dir / METRICS_FILE)]
    if not args.no_progress:
        loggers.append(ProgressBar(total, initial))
    if args.tensorboard:
        loggers.append(TensorBoardLogger(run_dir / "tb"))
    if args.wandb:
        config = json.loads((run_dir / CONFIG_FILE).read_text())
        loggers.append(
            WandbLogger(args.wandb_project, run_dir, run_dir.name, config, run_id=run_dir.name)
        )
    return Loggers(*loggers)


def check_metrics_header(header: Sequence[str], path: Path) -> None:
    """A ``ValueError`` naming ``path`` unless ``header`` is a usable metrics header: unique,
    non-empty column names including ``update`` and ``timesteps``."""
    problem = None
    if any(not name.strip() for name in header):
        problem = "an empty column name"
    elif len(set(header)) != len(header):
        problem = "a repeated column name"
    elif not {"update", "timesteps"} <= set(header):
        problem = "no 'update' and 'timesteps' columns"
    if problem:
        raise ValueError(f"{path}: damaged header ({problem}); repair its first line")


def truncate_metrics(path: Path, updates: int) -> None:
    """Drop rows past ``updates`` (written after the checkpoint a resume starts from); a
    damaged header is a ``ValueError`` (the file is left as it is)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    check_metrics_header(rows[0], path)
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


def read_config(run_dir: Path) -> dict[str, Any]:
    """``run_dir/config.json`` as a dict, or a one-line ``SystemExit`` saying what is wrong."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise SystemExit(f"--resume {run_dir}: no {CONFIG_FILE} there")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"--resume {run_dir}: {path} is not valid JSON ({e})") from None
    missing = [k for k in CONFIG_KEYS if k not in config] if isinstance(config, dict) else []
    if not isinstance(config, dict) or missing:
        what = f"lacks {', '.join(missing)}" if missing else "is not a JSON object"
        raise SystemExit(f"--resume {run_dir}: {path} is incomplete ({what})")
    if config["algo"] not in ALGORITHMS:
        raise SystemExit(f"--resume {run_dir}: {path} names an unknown algo {config['algo']!r}")
    return config


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Write ``config.json`` atomically (a temporary file renamed over it)."""
    tmp = run_dir / f".{CONFIG_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2, default=str))
    replace_durably(tmp, run_dir / CONFIG_FILE)


def check_options(args: argparse.Namespace) -> None:
    """One-line ``SystemExit`` for a bad CLI-level option, before anything is built or written."""
    checks = [
        (args.threads >= 1, "--threads", args.threads, "an int >= 1"),
        (args.keep_last >= 1, "--keep-last", args.keep_last, "an int >= 1"),
        (args.checkpoint_every >= 0, "--checkpoint-every", args.checkpoint_every, "an int >= 0"),
        (args.workers >= 0, "--workers", args.workers, "0 (in-process) or a positive count"),
        (
            args.total_steps is None or args.total_steps >= 1,
            "--total-steps",
            args.total_steps,
            "an int >= 1",
        ),
    ]
    for ok, flag, value, accepted in checks:
        if not ok:
            raise SystemExit(f"{flag} {value}: accepted {accepted}")
    for flag, value in (("--run-dir", args.run_dir), ("--resume", args.resume)):
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise SystemExit(f"{flag} {value}: is a file, not a run directory")
    if args.resume and not Path(args.resume).is_dir():
        raise SystemExit(f"--resume {args.resume}: no such run directory")


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, Any]:
    """The options given on the command line (not defaulted), by destination."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        return vars(parser.parse_args(argv))
    finally:
        for a, default in saved:
            a.default = default


def resume_changes(
    flags: dict[str, Any], names: list[str], config: dict[str, Any], run_dir: Path
) -> int | None:
    """The new total of a resumed run if ``--total-steps`` raises it (else ``None``); a one-line
    ``SystemExit`` naming every other flag whose value differs from the run's configuration."""
    resolved = config["resolved"]
    run = {k: config[k] for k in ("env", "algo", "seed", "preset", "threads", "keep_last")}
    run.update(checkpoint_every=config["checkpoint_every"], n_envs=resolved.get("n_envs"))
    run.update({name: resolved.get(name) for name in names})
    changed = []
    for dest, value in flags.items():
        if dest in RESUME_FREE:
            continue
        if dest == "run_dir":
            same = Path(value).resolve() == run_dir.resolve()
            old: Any = str(run_dir)
        else:
            old = run.get(dest, resolved.get(dest))
            new = None if dest == "preconditioner" and value == "none" else value
            same = new == old
        if not same:
            changed.append(f"--{dest.replace('_', '-')} ({old!r} -> {value!r})")
    if changed:
        raise SystemExit(
            f"--resume {run_dir}: changed {', '.join(changed)}; a resumed run keeps its "
            "configuration (only --total-steps may grow): start a new run to change it"
        )
    total, old_total = flags.get("total_steps"), int(config["total_timesteps"])
    if total is None or total == old_total:
        return None
    if total < old_total:
        raise SystemExit(
            f"--resume {run_dir}: --total-steps {total} is below the run's {old_total} "
            f"(accepted: >= {old_total}, which extends the run)"
        )
    return total


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` already holds a run (its config or metrics)."""
    return (run_dir / CONFIG_FILE).exists() or (run_dir / METRICS_FILE).exists()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code. Expected errors (bad options, a run directory
    in use, unusable checkpoints, non-finite env output, divergence) exit with one line."""
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except EXPECTED_ERRORS as e:
        text = f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e)
        raise SystemExit(f"error: {' '.join(text.split())}") from None


def _main(argv: list[str]) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--algo", default="trpo")
    pre.add_argument("--env", default="CartPole-v1")
    pre.add_argument("--preset", default="auto")
    pre.add_argument("--resume", default=None)
    known, _ = pre.parse_known_args(argv)
    config: dict[str, Any] | None = None
    if known.resume:
        if not Path(known.resume).is_dir():
            raise SystemExit(f"--resume {known.resume}: no such run directory")
        config = read_config(Path(known.resume))
        known.algo, known.env, known.preset = config["algo"], config["env"], config["preset"]
    if known.algo not in ALGORITHMS:
        raise SystemExit(f"--algo {known.algo!r}: accepted {', '.join(sorted(ALGORITHMS))}")
    parser, names = build_parser(known.algo, known.env, known.preset)
    args = parser.parse_args(argv)
    check_options(args)
    import torch

    torch.set_num_threads(args.threads)
    algo_cls = ALGORITHMS[known.algo]
    if config is not None:
        run_dir = Path(args.resume)
        extended = resume_changes(explicit_flags(parser, argv), names, config, run_dir)
        lock = RunDirLock(run_dir).acquire()  # before anything is read that a writer changes
    else:
        config = resolve_config(args, names)
        run_dir = Path(
            args.run_dir or f"runs/{args.algo}_{args.env.replace('/', '-')}_s{args.seed}"
        )
        if holds_run(run_dir):
            RunDirLock(run_dir).acquire().release()  # fails at once if a live process owns it
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = run_dir.with_name(f"{run_dir.name}_{stamp}")
        # Builds (and validates) the agent before anything is written.
        hyperparameters = dict(config["hyperparameters"])
        agent = algo_cls(
            hyperparameters.pop("policy", "MlpPolicy"),
            config["env"],
            seed=config["seed"],
            num_threads=config["threads"],
            verbose=args.verbose,
            **hyperparameters,
        )
        lock = RunDirLock(run_dir).acquire()
    try:
        if args.resume:
            ckpts = CheckpointManager(run_dir / "checkpoints", config["keep_last"])
            if not ckpts.paths():
                raise SystemExit(
                    f"--resume {run_dir}: no checkpoints in {ckpts.directory}; start the run "
                    "again without --resume"
                )
            state, path = ckpts.load_latest(fallback=True)
            truncate_metrics(run_dir / METRICS_FILE, int(state["num_updates"]))
            agent = algo_cls.load(state, verbose=args.verbose, num_threads=config["threads"])
            if extended is not None:
                config["total_timesteps"] = extended
                write_config(run_dir, config)
            print(f"resuming {run_dir} from {path} ({agent.num_timesteps} steps)", file=sys.stderr)
        else:
            if holds_run(run_dir):  # another process finished a run here meanwhile
                raise SystemExit(f"--run-dir {run_dir}: already holds a run; pick another")
            ckpts = CheckpointManager(run_dir / "checkpoints", config["keep_last"])
            # update 0 first, then config.json: a directory with a config can always be resumed
            ckpts.save(agent._capture_state(), 0)
            config["resolved"] = agent.config
            write_config(run_dir, config)
        return _train(agent, args, config, run_dir, ckpts)
    finally:
        lock.release()


def _train(
    agent: Any,
    args: argparse.Namespace,
    config: dict[str, Any],
    run_dir: Path,
    ckpts: CheckpointManager,
) -> int:
    """Train to the configured total with metrics, checkpoints and the final ``model.pt``."""
    if args.resume and (args.workers or args.ray_address):  # explicit flags win on resume
        config["workers"], config["ray_address"] = args.workers, args.ray_address
    if config.get("workers"):
        from agents.ray_rollout import attach_ray_workers

        attach_ray_workers(agent, config["workers"], config.get("ray_address"))
    total = int(config["total_timesteps"])
    logger = run_loggers(run_dir, total, agent.num_timesteps, args)
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
