"""Deterministic evaluation of a trained agent: mean ± std return over N episodes.

python scripts/evaluate.py runs/trpo_CartPole-v1_s0 --episodes 20
python scripts/evaluate.py runs/trpo_CartPole-v1_s0/checkpoints/ckpt_00000050.pt
python scripts/evaluate.py RUN_DIR --video videos/   # needs the 'video' extra (moviepy)
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from agents import (
    CheckpointError,
    CheckpointManager,
    OnPolicyNaturalAlgorithm,
    load_checkpoint,
)
from agents.evaluation import evaluate_policy
from envs import make_env


def load_state(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The verified state of a checkpoint file, or of a run directory's ``model.pt``; a corrupt,
    truncated or non-finite ``model.pt`` (also when named directly) falls back, with a warning
    naming it, to the newest good checkpoint of its run."""
    path = Path(path)
    if path.is_file() and path.name != "model.pt":
        return load_checkpoint(path), path
    run_dir = path.parent if path.is_file() else path
    if not run_dir.is_dir():
        raise SystemExit(f"{path}: no such run directory or checkpoint file")
    model = run_dir / "model.pt"
    if model.is_file():
        try:
            return load_checkpoint(model), model
        except CheckpointError as e:
            warnings.warn(f"{e}; falling back to the newest good checkpoint", stacklevel=2)
    ckpts = CheckpointManager(run_dir / "checkpoints")
    if not ckpts.paths():
        raise SystemExit(f"{run_dir}: no usable model.pt and no checkpoints/ckpt_*.pt")
    return ckpts.load_latest(fallback=True)


def evaluate(
    agent: OnPolicyNaturalAlgorithm,
    episodes: int = 10,
    seed: int = 10_000,
    deterministic: bool = True,
    video_dir: str | None = None,
) -> list[float]:
    """Returns of ``episodes`` episodes on a fresh env (seeds ``seed, seed+1, ...``)."""
    env_id = agent.config["env_id"]
    kwargs = dict(agent.config.get("env_kwargs") or {})
    if video_dir:
        kwargs["render_mode"] = "rgb_array"
    env = make_env(env_id, None, **kwargs)
    if video_dir:
        import gymnasium as gym

        try:
            import moviepy  # noqa: F401
        except ImportError:
            raise SystemExit(
                "--video needs moviepy: pip install -e '.[video]' (or pip install moviepy)"
            ) from None
        env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda i: True)
    try:
        return evaluate_policy(agent, episodes, seed, deterministic, env)
    finally:
        env.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point; unusable checkpoints and bad options exit with one line."""
    try:
        return _main(argv)
    except (CheckpointError, ValueError, OSError) as e:
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="run directory or checkpoint file")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=10_000, help="first episode seed")
    parser.add_argument("--stochastic", action="store_true", help="sample actions")
    parser.add_argument("--video", default=None, metavar="DIR", help="record videos (moviepy)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        raise SystemExit(f"--episodes {args.episodes}: accepted an int >= 1")
    state, ckpt = load_state(args.path)
    agent = OnPolicyNaturalAlgorithm.load(state, num_threads=1, device="cpu")
    returns = evaluate(agent, args.episodes, args.seed, not args.stochastic, args.video)
    agent.close()
    mean, std = float(np.mean(returns)), float(np.std(returns))
    if args.json:
        print(json.dumps({"checkpoint": str(ckpt), "mean": mean, "std": std, "returns": returns}))
    else:
        print(
            f"{ckpt}: {state['config']['env_id']} {len(returns)} episodes, "
            f"{'stochastic' if args.stochastic else 'deterministic'} return {mean:.2f} ± {std:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
