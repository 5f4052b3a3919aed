"""Atomic, checksummed, ``weights_only``-loadable checkpoints; keep the last K; fall back past
corrupt ones; an exclusive lock on a run directory."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

FORMAT = "npg-agent"
CHECKSUM_KEY = "sha256"
LOCK_FILE = ".lock"
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt, non-finite or not a safe (tensor-only)
    file."""


class RunDirInUse(RuntimeError):
    """Another live process holds the lock of a run directory."""


def tensors_to(obj: Any, device: torch.device | str) -> Any:
    """A copy of nested dicts/lists/tuples with every tensor detached and copied to ``device``
    (checkpoints hold CPU tensors; a restore moves them to the agent's device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device, copy=True)
    if isinstance(obj, dict):
        return {k: tensors_to(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(tensors_to(v, device) for v in obj)
    return obj


def content_digest(obj: Any) -> str:
    """SHA-256 of a nested structure of dicts, lists, tuples, tensors and scalars: keys, types,
    dtypes, shapes and the raw bytes of every tensor, in order. It changes with any flipped byte
    of tensor data, which ``torch.load`` itself does not notice."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            dense = torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1))  # stride 1
            h.update(dense.view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k, v in x.items():
                h.update(repr(k).encode())
                walk(v)
        elif isinstance(x, list | tuple):
            h.update(f"{type(x).__name__}{len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    walk(obj)
    return h.hexdigest()


def nonfinite_entries(obj: Any, prefix: str = "") -> list[str]:
    """Paths (``policy/actor.log_std``) of the floating-point tensors in ``obj`` that hold NaN
    or inf."""
    if isinstance(obj, torch.Tensor):
        bad = obj.is_floating_point() and not bool(torch.isfinite(obj).all())
        return [prefix or "<tensor>"] if bad else []
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    else:
        return []
    paths = (nonfinite_entries(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in items)
    return [p for sub in paths for p in sub]


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` (with a :func:`content_digest` under ``"sha256"``) to a temporary file in
    the same folder, fsync, then rename it over ``path`` (:func:`replace_durably`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    payload = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    payload[CHECKSUM_KEY] = content_digest(payload)
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
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
    """Load with ``torch.load(weights_only=True)`` (pickled code objects are refused), verify the
    content checksum and that every floating-point tensor is finite.

    Raises :class:`CheckpointError` naming the file for any unreadable, foreign, altered or
    non-finite file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} is truncated, corrupt or unsafe ({type(e).__name__}: {first})"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an npg agent checkpoint")
    stored = state.pop(CHECKSUM_KEY, None)
    if stored is None:
        raise CheckpointError(f"checkpoint {path} has no content checksum ({CHECKSUM_KEY!r})")
    if stored != content_digest(state):
        raise CheckpointError(f"checkpoint {path} is corrupt: its content checksum does not match")
    bad = nonfinite_entries(state)
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite values in {', '.join(bad[:5])}")
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


class RunDirLock:
    """An exclusive ``flock`` on ``run_dir/.lock``, held while the object is open.

    The OS releases it when the holding process dies (even by SIGKILL), so a stale lock of a dead
    process never blocks; a live holder makes :meth:`acquire` raise :class:`RunDirInUse` at once,
    naming the directory and the holder's pid.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        """Create the folder if needed and take the lock (non-blocking)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirInUse(
                f"run directory {self.run_dir} is in use by another process (pid {holder}); "
                "wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (closing the file releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
