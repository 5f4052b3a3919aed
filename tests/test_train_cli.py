"""scripts/train.py and scripts/evaluate.py end to end, including SIGTERM and --resume."""

from __future__ import annotations

import csv
import importlib.util
import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

from agents.base import TIMING_KEYS  # noqa: E402
from scripts import evaluate as evaluate_cli  # noqa: E402
from scripts import train as train_cli  # noqa: E402

FAST = ["--n-steps", "64", "--n-envs", "2", "--vf-minibatch", "64", "--vf-epochs", "2"]


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in csv.DictReader(f)]


def test_train_writes_run_directory_with_preset(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code = train_cli.main(["--total-steps", "2048", "--run-dir", str(run), "--no-progress"])
    assert code == 0
    config = json.loads((run / "config.json").read_text())
    assert config["algo"] == "trpo" and config["env"] == "CartPole-v1"
    assert config["hyperparameters"]["n_steps"] == 512  # the CartPole preset
    assert config["resolved"]["cg_damping"] == 0.1
    rows = _rows(run)
    assert len(rows) == 2 and rows[-1]["timesteps"] == "2048"
    for key in ("ep_return_mean", "kl", "cg_iterations", "ls_backtracks", "explained_variance"):
        assert key in rows[0]
    assert (run / "model.pt").is_file() and list((run / "checkpoints").glob("ckpt_*.pt"))
    assert evaluate_cli.main([str(run), "--episodes", "2"]) == 0


def test_bad_option_fails_before_run_dir(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match="max_kl=-1.0 is invalid"):
        train_cli.main(["--max-kl", "-1", "--run-dir", str(run), "--no-progress"])
    assert not run.exists()


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args, "--no-progress"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("corrupt_newest", [False, True])
def test_sigterm_then_resume_matches_uninterrupted(tmp_path: Path, corrupt_newest: bool) -> None:
    common = [*FAST, "--total-steps", "6400", "--checkpoint-every", "3", "--seed", "3"]
    ref = tmp_path / "ref"
    assert train_cli.main([*common, "--run-dir", str(ref), "--no-progress"]) == 0

    run = tmp_path / "run"
    proc = _spawn([*common, "--run-dir", str(run)])
    deadline = time.time() + 60
    while time.time() < deadline:
        if (run / "metrics.csv").exists() and len(_rows(run)) >= 10:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "--resume" in err
    rows_at_stop = len(_rows(run))
    ckpts = sorted((run / "checkpoints").glob("ckpt_*.pt"))
    assert ckpts and int(ckpts[-1].stem.split("_")[1]) == rows_at_stop  # metrics flushed
    if corrupt_newest:
        if len(ckpts) < 2:
            pytest.skip("only one checkpoint")
        ckpts[-1].write_bytes(ckpts[-1].read_bytes()[:100])
    with pytest.warns(UserWarning, match="falling back") if corrupt_newest else _null():
        assert train_cli.main(["--resume", str(run), "--no-progress"]) == 0
    assert _rows(run) == _rows(ref)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def test_registered_algorithm_and_optional_loggers(tmp_path: Path) -> None:
    from agents import ALGORITHMS, TRPO, register_algorithm

    class MyTRPO(TRPO):
        algo_name = "my-trpo"

    register_algorithm("my-trpo", MyTRPO)
    try:
        run = tmp_path / "run"
        args = ["--algo", "my-trpo", *FAST, "--total-steps", "128", "--run-dir", str(run)]
        with warnings.catch_warnings(record=True) as rec:  # neither logger is required
            warnings.simplefilter("always")
            code = train_cli.main([*args, "--no-progress", "--tensorboard", "--wandb"])
        assert code == 0
        msgs = " ".join(str(w.message) for w in rec)
        for name, written in (("tensorboard", run / "tb"), ("wandb", run / "wandb")):
            if importlib.util.find_spec(name) is None:
                assert f"--{name} ignored" in msgs
            else:  # installed: it logged offline into the run directory
                assert f"--{name} ignored" not in msgs and any(written.iterdir())
        assert json.loads((run / "config.json").read_text())["algo"] == "my-trpo"
        assert len(_rows(run)) == 1
    finally:
        ALGORITHMS.pop("my-trpo")


def test_plot_mean_and_ci_over_seeds(tmp_path: Path) -> None:
    from scripts import plot as plot_cli

    runs = []
    for seed in (0, 1):
        run = tmp_path / f"trpo_s{seed}"
        args = [*FAST, "--total-steps", "640", "--seed", str(seed), "--run-dir", str(run)]
        assert train_cli.main([*args, "--no-progress"]) == 0
        runs.append(str(run))
    out = tmp_path / "fig.png"
    assert plot_cli.main([*runs, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_cli.t_quantile(1) == 12.706 and plot_cli.t_quantile(100) == 1.96


def _help(algo: str) -> str:
    parser, _ = train_cli.build_parser(algo)
    return " ".join(parser.format_help().split())  # one line: argparse wraps at any width


def test_help_shows_defaults_and_choices() -> None:
    text = _help("trpo")
    assert "--fisher {exact,mc,empirical,diagonal,kfac,ekfac}" in text
    assert "--preconditioner {none,diagonal,kfac}" in text
    # the CartPole preset's value, and the library's
    assert "vector env steps per rollout (default: 512 (preset; library default 2048))" in text
    assert "discount factor" in text and "--cg-iters CG_ITERS" in text
    assert "--device DEVICE" in text and "(default: 'cpu')" in text


def test_kfac_nac_help_lacks_flags_it_ignores() -> None:
    text = _help("kfac-nac")
    for flag in ("--cg-iters", "--cg-damping", "--cg-tol", "--fisher", "--preconditioner"):
        assert f"{flag} " not in text and f"[{flag}" not in text
    assert "--line-search" not in text
    assert "--kfac-labels {mc,exact,empirical}" in text and "--vf-max-kl VF_MAX_KL" in text


def test_vf_max_kl_parses_as_float(tmp_path: Path) -> None:
    parser, names = train_cli.build_parser("kfac-nac")
    args = parser.parse_args(["--algo", "kfac-nac", "--vf-max-kl", "0.01"])
    assert args.vf_max_kl == 0.01 and isinstance(args.vf_max_kl, float)
    run = tmp_path / "run"
    argv = ["--algo", "kfac-nac", "--vf-max-kl", "0.01", *FAST, "--total-steps", "128"]
    assert train_cli.main([*argv, "--run-dir", str(run), "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["resolved"]["vf_max_kl"] == 0.01


def test_notice_when_env_has_no_preset(capsys) -> None:
    parser, names = train_cli.build_parser("trpo", "MountainCar-v0")
    args = parser.parse_args(["--env", "MountainCar-v0"])
    config = train_cli.resolve_config(args, names)
    assert config["hyperparameters"] == {}
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "note: no preset for trpo on MountainCar-v0; using the library defaults "
        "(agents/config.py) where no flag is given"
    ]
    args = parser.parse_args([])  # CartPole-v1 has a preset: no notice
    train_cli.resolve_config(args, names)
    assert capsys.readouterr().err == ""


def test_device_flag(tmp_path: Path) -> None:
    parser, names = train_cli.build_parser("trpo")
    assert (
        train_cli.resolve_config(parser.parse_args(["--device", "cpu"]), names)["hyperparameters"][
            "device"
        ]
        == "cpu"
    )
    run = tmp_path / "run"
    argv = ["--device", "cpu", *FAST, "--total-steps", "128", "--run-dir", str(run)]
    assert train_cli.main([*argv, "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["resolved"]["device"] == "cpu"
    with pytest.raises(SystemExit, match=r"^error: device='tpu' is invalid; accepted: 'cpu'"):
        train_cli.main(["--device", "tpu", "--run-dir", str(tmp_path / "bad"), "--no-progress"])
    assert not (tmp_path / "bad").exists()
