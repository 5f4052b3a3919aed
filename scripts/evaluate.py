"""Deterministic evaluation of a trained agent: mean ± std return over N episodes.

python scripts/evaluate.py runs/trpo_CartPole-v1_s0 --episodes 20
python scripts/evaluate.py runs/trpo_CartPole-v1_s0/checkpoints/ckpt_00000050.pt
python scripts/evaluate.py RUN_DIR --video videos/   # needs moviepy
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents import CheckpointManager, OnPolicyNaturalAlgorithm, load_checkpoint  # noqa: E402
from agents.evaluation import evaluate_policy  # noqa: E402
from envs import make_env  # noqa: E402


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or for a run directory its ``model.pt`` or newest checkpoint."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "model.pt").is_file():
        return path / "model.pt"
    paths = CheckpointManager(path / "checkpoints").paths()
    if not paths:
        raise SystemExit(f"{path}: no model.pt and no checkpoints/ckpt_*.pt")
    return paths[-1]


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
            raise SystemExit("--video needs moviepy (pip install moviepy)") from None
        env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda i: True)
    try:
        return evaluate_policy(agent, episodes, seed, deterministic, env)
    finally:
        env.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="run directory or checkpoint file")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=10_000, help="first episode seed")
    parser.add_argument("--stochastic", action="store_true", help="sample actions")
    parser.add_argument("--video", default=None, metavar="DIR", help="record videos (moviepy)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    ckpt = resolve_checkpoint(args.path)
    state = load_checkpoint(ckpt)
    agent = OnPolicyNaturalAlgorithm.load(state, num_threads=1)
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
