"""The random-number state a bit-identical resume needs: the agent's torch generator and the
global torch, NumPy and Python generators, as checkpoint-safe tensors and plain values."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """The state of ``generator`` and of the global torch/NumPy/Python generators (copies,
    storable with ``torch.save`` and loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def restore_rng(generator: torch.Generator, rng: dict[str, Any]) -> None:
    """Set ``generator`` and the global generators to a :func:`capture_rng` state."""
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = rng["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
