"""Every runnable script answers ``--help`` with its usage and exit 0, and writes no file."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}
SCRIPTS = sorted(
    p.name for p in (ROOT / "scripts").glob("*.py") if 'if __name__ == "__main__":' in p.read_text()
)


def _snapshot(root: Path) -> dict[str, int]:
    """Every file under ``root`` (build and cache folders aside) with its modification time."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for f in filenames:
            p = Path(dirpath) / f
            files[str(p.relative_to(root))] = p.stat().st_mtime_ns
    return files


def test_every_script_is_covered() -> None:
    assert {"train.py", "evaluate.py", "supervised_logreg.py", "supervised_ngvi.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_and_writes_nothing(script: str, tmp_path: Path) -> None:
    scratch = Path(tempfile.gettempdir()) / "npg"
    before_repo, before_scratch = _snapshot(ROOT), _snapshot(scratch) if scratch.exists() else {}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
    assert list(tmp_path.iterdir()) == []
    assert _snapshot(ROOT) == before_repo
    assert (_snapshot(scratch) if scratch.exists() else {}) == before_scratch
