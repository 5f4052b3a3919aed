"""The Fisher benchmark's matmul-work count, on products whose work is known by hand."""

from __future__ import annotations

import torch

from npg.fisher import ExactFisher
from scripts import bench_fisher as bf


def test_matmul_work_counts_mm_and_addmm() -> None:
    a, b, bias = torch.randn(3, 4), torch.randn(4, 5), torch.randn(5)
    c = torch.randn(5, 2)
    assert bf.matmul_work(lambda: torch.addmm(bias, a, b) @ c) == (3 * 4 * 5 + 3 * 5 * 2, 2)
    assert bf.matmul_work(lambda: a + 1) == (0, 0)
    batched, vec = torch.randn(2, 3, 4), torch.randn(4)
    assert bf.matmul_work(lambda: torch.bmm(batched, torch.randn(2, 4, 5))) == (2 * 3 * 4 * 5, 1)
    assert bf.matmul_work(lambda: torch.mv(a, vec)) == (3 * 4, 1)


def test_exact_product_work_is_one_jvp_and_one_vjp() -> None:
    """17→64→64→6 policy at batch 2048: the forward sweep costs ``N·(17·64 + 2·64·64 + 2·64·6)``
    (the first layer has no input tangent), the backward sweep the same (weight gradients of
    every layer, input gradients of all but the first)."""
    model, x, family = bf.make_case("policy", 2048, "cpu")
    op = ExactFisher(model, x, family)
    v = torch.randn(op.dim)
    sweep = 2048 * (17 * 64 + 2 * 64 * 64 + 2 * 64 * 6)
    assert bf.matmul_work(lambda: op.mv(v)) == (2 * sweep, 10)
