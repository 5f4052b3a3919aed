"""Atomic, ``weights_only``-loadable checkpoints; keep the last K; fall back past corrupt ones."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

FORMAT = "npg-agent"
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not a safe (tensor-only) file."""


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename it over
    ``path`` (:func:`replace_durably`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        replace_durably(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def replace_durably(tmp: Path, path: Path) -> None:
    """``os.replace(tmp, path)``, then fsync the folder so that the rename survives a crash."""
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load with ``torch.load(weights_only=True)``: pickled code objects are refused.

    Raises :class:`CheckpointError` naming the file for any unreadable or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} is truncated, corrupt or unsafe ({type(e).__name__}: {first})"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an npg agent checkpoint")
    return state


class CheckpointManager:
    """``directory/ckpt_<update>.pt`` files, the newest ``keep_last`` kept."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [
            (int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))
        ]
        return [p for _, p in sorted(found)]

    def save(self, state: dict[str, Any], update: int) -> Path:
        """Write ``state`` as the checkpoint of ``update`` and prune the oldest files."""
        path = save_atomic(state, self.directory / f"ckpt_{update:08d}.pt")
        for old in self.paths()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self, fallback: bool = True) -> tuple[dict[str, Any], Path]:
        """The newest loadable checkpoint; with ``fallback`` a corrupt newest one is skipped
        with a warning naming it, otherwise its :class:`CheckpointError` is raised."""
        paths = self.paths()
        if not paths:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        errors = []
        for path in reversed(paths):
            try:
                return load_checkpoint(path), path
            except CheckpointError as e:
                if not fallback:
                    raise
                errors.append(str(e))
                warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=2)
        raise CheckpointError("no loadable checkpoint: " + "; ".join(errors))
