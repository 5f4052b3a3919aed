"""Ready per-update loggers for ``learn(..., callback=...)``: CSV, TensorBoard, W&B, progress.

Each logger is a callable taking one update's metrics dict (what ``learn`` passes its
callback) and has ``close()``; :class:`Loggers` runs several as one callback::

    with Loggers(CSVLogger("run/metrics.csv"), TensorBoardLogger("run/tb")) as log:
        TRPO("MlpPolicy", "CartPole-v1").learn(100_000, callback=log)

W&B runs offline unless ``WANDB_MODE`` says otherwise and never stops training: a W&B error
is one warning, after which that logger does nothing.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from agents.sb3_compat import sb3_scalars


class MetricsLogger(Protocol):
    """What :class:`Loggers` combines: called once per update, closed at the end."""

    def __call__(self, metrics: dict[str, Any]) -> bool | None:
        """Log one update's metrics; ``False`` stops training."""

    def close(self) -> None:
        """Flush and release what the logger holds."""


class CSVLogger:
    """One row per update, flushed as it is written (appending to an existing file whose
    header must match the metrics; a mismatch is a ``ValueError`` naming the file)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.fields: list[str] | None = None
        if self.path.exists():
            with open(self.path, newline="") as f:
                self.fields = next(csv.reader(f), None)
        self._file: Any = None
        self._writer: csv.DictWriter | None = None

    def __call__(self, metrics: dict[str, Any]) -> bool:
        """Append one update's row."""
        if self._writer is None:
            if self.fields is not None and set(self.fields) != set(metrics):
                missing = sorted(set(metrics) - set(self.fields))
                extra = sorted(set(self.fields) - set(metrics))
                raise ValueError(
                    f"{self.path}: its header does not match this run's metrics (missing "
                    f"{missing[:5]}, unexpected {extra[:5]}); repair its first line"
                )
            new = self.fields is None
            self.fields = self.fields or list(metrics)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", newline="")  # noqa: SIM115 - open for the run
            self._writer = csv.DictWriter(self._file, self.fields, extrasaction="ignore")
            if new:
                self._writer.writeheader()
        self._writer.writerow(metrics)
        self._file.flush()
        return True

    def close(self) -> None:
        """Flush to disk and close the file."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file, self._writer = None, None


class TensorBoardLogger:
    """TensorBoard scalars (:func:`agents.sb3_compat.sb3_scalars`) at ``step = timesteps``."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(str(self.log_dir))

    def __call__(self, metrics: dict[str, Any]) -> bool:
        """Write one update's scalars."""
        step = int(metrics["timesteps"])
        for key, value in sb3_scalars(metrics).items():
            self._writer.add_scalar(key, value, step)
        return True

    def close(self) -> None:
        """Flush the event file and close it."""
        self._writer.close()


class WandbLogger:
    """Weights & Biases: offline by default (``WANDB_MODE=offline`` unless the user set it),
    never blocking (a short init timeout) and never stopping training (errors disable it)."""

    def __init__(
        self,
        project: str = "npg",
        dir: str | os.PathLike = ".",
        name: str | None = None,
        config: dict[str, Any] | None = None,
        run_id: str | None = None,
    ) -> None:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run: Any = None
        try:
            import wandb

            Path(dir).mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=project,
                dir=str(dir),
                name=name,
                config=config,
                id=run_id,
                resume="allow" if run_id is not None else None,
                mode=os.environ["WANDB_MODE"],  # read now: wandb caches its first settings
                settings=wandb.Settings(init_timeout=10),
            )
        except Exception as e:  # noqa: BLE001 - logging must never stop training
            warnings.warn(f"W&B logging disabled: {e}", stacklevel=2)

    def __call__(self, metrics: dict[str, Any]) -> bool:
        """Log one update's scalars (offline: into the run's files)."""
        if self.run is not None:
            try:
                self.run.log(sb3_scalars(metrics), step=int(metrics["timesteps"]))
            except Exception as e:  # noqa: BLE001 - logging must never stop training
                warnings.warn(f"W&B logging disabled: {e}", stacklevel=2)
                self.run = None
        return True

    def close(self) -> None:
        """Finish the W&B run (its files stay in ``dir/wandb``)."""
        if self.run is not None:
            self.run.finish()
            self.run = None


class ProgressBar:
    """A tqdm bar over env steps with the running mean return."""

    def __init__(self, total: int, initial: int = 0) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def __call__(self, metrics: dict[str, Any]) -> bool:
        """Move the bar to the update's env steps."""
        self._bar.n = int(metrics["timesteps"])
        self._bar.set_postfix(ret=f"{metrics['ep_return_mean']:.1f}", sps=f"{metrics['fps']:.0f}")
        self._bar.refresh()
        return True

    def close(self) -> None:
        """Close the bar."""
        self._bar.close()


class Loggers:
    """Several loggers as one ``learn`` callback (training stops if any returns ``False``)."""

    def __init__(self, *loggers: MetricsLogger) -> None:
        self.loggers: Sequence[MetricsLogger] = loggers

    def __call__(self, metrics: dict[str, Any]) -> bool:
        """Run every logger on one update's metrics."""
        results = [logger(metrics) for logger in self.loggers]
        return all(r is not False for r in results)

    def close(self) -> None:
        """Close every logger (all of them, even if one raises; the first error is raised)."""
        error: BaseException | None = None
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as e:  # noqa: BLE001 - close the others first
                error = error or e
        if error is not None:
            raise error

    def __enter__(self) -> Loggers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = [
    "CSVLogger",
    "Loggers",
    "MetricsLogger",
    "ProgressBar",
    "TensorBoardLogger",
    "WandbLogger",
]
