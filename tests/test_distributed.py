"""Data-parallel Fisher operators: 2 gloo processes on unequal shards vs one process.

Two ranks hold shards of 5 and 8 samples of a 13-sample batch. Each builds its operator through
:mod:`npg.distributed`, evaluates products, diagonals, dense matrices, solves and (K-FAC) factors,
and saves them; the parent process compares them with one-process references in float64:

* exact, empirical, exact/empirical diagonal and K-FAC with exact/empirical labels: the ordinary
  operator on the *concatenated* batch;
* Monte-Carlo flavours (rank ``r`` draws with ``seed + r``): the same per-shard samples, put
  together in one process -- the per-sample gradients of the shard operators concatenated for
  ``mc`` and the ``mc`` diagonal; for K-FAC with sampled labels the batch-weighted mean of the
  shard factors (``A`` does not depend on the labels and is also checked against the
  concatenated batch).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import npg
from npg import distributed as npg_dist
from npg.fisher import KFACFisher

pytestmark = pytest.mark.usefixtures("float64")

SHARDS = (5, 8)
N = sum(SHARDS)
SEED = 3
TOL = dict(rtol=1e-10, atol=1e-10)

# (label, make_fisher name, keyword arguments)
FLAVOURS: list[tuple[str, str, dict]] = [
    ("exact", "exact", {}),
    ("mc", "mc", {"n_samples": 2}),
    ("empirical", "empirical", {}),
    ("diag-exact", "diagonal", {"diagonal": "exact"}),
    ("diag-mc", "diagonal", {"diagonal": "mc", "n_samples": 2}),
    ("diag-empirical", "diagonal", {"diagonal": "empirical"}),
    ("kfac-exact-pi", "kfac", {"kfac_labels": "exact"}),
    ("kfac-exact-eigen", "kfac", {"kfac_labels": "exact", "kfac_inverse": "eigen"}),
    ("kfac-mc", "kfac", {"kfac_labels": "mc", "n_samples": 2, "kfac_inverse": "eigen"}),
    ("kfac-empirical", "kfac", {"kfac_labels": "empirical"}),
]
MC_FLAVOURS = {"mc", "diag-mc", "kfac-mc"}


class GaussPolicy(nn.Module):
    """MLP mean with a free log-std (a non-layer parameter: K-FAC's diagonal block)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
        self.log_std = nn.Parameter(torch.tensor([-0.3, 0.2]))

    def forward(self, x: Tensor) -> Tensor:
        mean = self.body(x)
        return torch.cat([mean, self.log_std.expand_as(mean)], -1)


class ConvNet(nn.Module):
    """A tiny convolutional classifier (K-FAC's convolution blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def make_problem(case: str) -> tuple[nn.Module, Tensor, Tensor, str]:
    """Model, full inputs, full targets and family name, identical in every process."""
    torch.manual_seed(0)
    if case == "gauss":
        model, x = GaussPolicy(), torch.randn(N, 3)
        y = torch.randn(N, 2)
        return model, x, y, "diag_gaussian"
    model, x = ConvNet(), torch.randn(N, 1, 3, 3)
    y = torch.randint(0, 3, (N,))
    return model, x, y, "categorical"


def shard(t: Tensor, rank: int) -> Tensor:
    start = sum(SHARDS[:rank])
    return t[start : start + SHARDS[rank]]


def probes(dim: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(dim, generator=g), torch.randn(dim, 3, generator=g)


def evaluate(op: npg.FisherOperator) -> dict[str, Tensor]:
    """Everything the comparison looks at, for an operator or its data-parallel wrapper."""
    v, m = probes(op.dim)
    res = {
        "mv": op.mv(v),
        "mv_matrix": op.mv(m),
        "dense": op.to_dense(),
        "diagonal": op.diagonal(),
        "solve": op.solve(v, 0.1, max_iter=6, tol=0.0),
    }
    local = op.local if isinstance(op, npg_dist.DataParallelFisher) else op
    if isinstance(local, KFACFisher):
        for i, b in enumerate(local.blocks):
            res[f"A{i}"], res[f"G{i}"] = b.A, b.G
        for i, d in enumerate(local.diag_values):
            res[f"diag_values{i}"] = d
        res["inverse_mv"] = local.inverse_mv(v, 0.1)
    return res


# --- the supervised optimizer under DDP -------------------------------------------------------
NGD_SHARD = 6  # DDP averages gradients uniformly: equal shards
NGD_FLAVOURS = [
    ("exact", dict(max_kl=0.05, adaptive_damping=True, cg_iters=8, cg_tol=0.0)),
    ("empirical", dict(cg_iters=8, cg_tol=0.0)),
    ("diagonal", dict(damping=0.1, adaptive_damping=True)),
    ("kfac", dict(kfac_decay=0.5, kfac_inv_interval=1, kfac_inverse="eigen", max_kl=0.05)),
]


def ngd_problem() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3))
    return model, torch.randn(2 * NGD_SHARD, 3), torch.randint(0, 3, (2 * NGD_SHARD,))


def ngd_run(fisher: str, rank: int | None, steps: int = 3) -> Tensor:
    """Final parameters after ``steps`` NGD steps: under DDP on shard ``rank``, or (``None``)
    one process on the whole batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from npg.optim import NGD

    model, x, y = ngd_problem()
    kw = dict(
        dict(NGD_FLAVOURS)[fisher],
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        fisher=fisher,
        lr=1.0,
    )
    kw.setdefault("damping", 1e-2)
    if rank is None:
        net, opt = model, NGD(model.parameters(), **kw)
    else:
        x, y = (
            x[rank * NGD_SHARD : (rank + 1) * NGD_SHARD],
            y[rank * NGD_SHARD : (rank + 1) * NGD_SHARD],
        )
        net, opt = DDP(model), npg_dist.DistributedNGD(model.parameters(), **kw)
    loss_fn = nn.CrossEntropyLoss()

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure, inputs=x, targets=y)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results: dict[str, dict[str, Tensor]] = {}
        for case in ("gauss", "conv"):
            model, x, y, fam = make_problem(case)
            xs, ys = shard(x, rank), shard(y, rank)
            for label, name, kw in FLAVOURS:
                if name in ("diagonal", "kfac"):
                    # build locally and fill the inverse caches first: the wrapper must drop them
                    local = npg.make_fisher(
                        name, model, xs, fam, targets=ys, seed=SEED + rank, **kw
                    )
                    local.inverse_mv(probes(local.dim)[0], 0.1)
                    op = npg_dist.all_reduce_fisher(local)
                else:
                    op = npg_dist.make_fisher(name, model, xs, fam, targets=ys, seed=SEED, **kw)
                assert op.n == N and op.n_local == SHARDS[rank]
                results[f"{case}/{label}"] = evaluate(op)
            # gradient of the global mean NLL from per-shard mean gradients
            model.zero_grad()
            (-fam_log_prob(fam, model(xs), ys).mean()).backward()
            results[f"{case}/grad"] = {
                "flat": npg_dist.all_reduce_grad(
                    torch.cat([p.grad.reshape(-1) for p in model.parameters()]), len(xs)
                )
            }
            npg_dist.all_reduce_grad(model, len(xs))
            results[f"{case}/grad"]["module"] = torch.cat(
                [p.grad.reshape(-1) for p in model.parameters()]
            )
            with pytest.raises(NotImplementedError, match="EKFAC"):
                npg_dist.make_fisher("ekfac", model, xs, fam, targets=ys)
        results["ngd"] = {f: ngd_run(f, rank) for f, _ in NGD_FLAVOURS}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def fam_log_prob(fam: str, out: Tensor, y: Tensor) -> Tensor:
    return npg.get_family(fam).log_prob(out, y)


def reference(case: str, label: str, name: str, kw: dict) -> dict[str, Tensor]:
    """The one-process operator's results on the concatenated batch (same samples for MC)."""
    model, x, y, fam = make_problem(case)
    if label not in MC_FLAVOURS:
        return evaluate(npg.make_fisher(name, model, x, fam, targets=y, seed=SEED, **kw))
    shards = [
        npg.make_fisher(name, model, shard(x, r), fam, targets=shard(y, r), seed=SEED + r, **kw)
        for r in range(len(SHARDS))
    ]
    if label in ("mc", "diag-mc"):
        # the per-sample gradients of the per-shard MC operators, concatenated into one operator
        per_shard = [
            npg.MCFisher(model, shard(x, r), fam, kw["n_samples"], SEED + r) for r in range(2)
        ]
        op = npg.make_fisher("mc", model, x, fam, n_samples=kw["n_samples"], seed=SEED)
        op._set_gradients(torch.cat([s.grads for s in per_shard]))
        if label == "mc":
            return evaluate(op)
        diag = npg.make_fisher(name, model, x, fam, seed=SEED, **kw)
        diag.diag = op.diagonal()
        return evaluate(diag)
    # K-FAC with sampled labels: the batch-weighted mean of the per-shard factors
    full = npg.make_fisher(name, model, x, fam, seed=SEED, **kw)
    full_a = [b.A.clone() for b in full.blocks]
    for i, b in enumerate(full.blocks):
        b.A = sum(s.blocks[i].A * (n / N) for s, n in zip(shards, SHARDS, strict=True))
        b.G = sum(s.blocks[i].G * (n / N) for s, n in zip(shards, SHARDS, strict=True))
        torch.testing.assert_close(b.A, full_a[i], **TOL)  # A is label-free: concatenated batch
        b._eig = None
    full.diag_values = tuple(
        sum(s.diag_values[i] * (n / N) for s, n in zip(shards, SHARDS, strict=True))
        for i in range(len(full.diag_values))
    )
    full._inverse_cache.clear()
    return evaluate(full)


@pytest.fixture(scope="module")
def distributed_results() -> list[dict[str, dict[str, Tensor]]]:
    """Run the 2-process job once; every rank's saved results."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.parametrize("case", ["gauss", "conv"])
@pytest.mark.parametrize("label,name,kw", FLAVOURS, ids=[f[0] for f in FLAVOURS])
def test_matches_single_process(distributed_results, case, label, name, kw) -> None:
    ref = reference(case, label, name, kw)
    for rank, res in enumerate(distributed_results):
        got = res[f"{case}/{label}"]
        assert set(got) == set(ref)
        for key, value in ref.items():
            torch.testing.assert_close(
                got[key], value, **TOL, msg=lambda m, k=key, r=rank: f"rank {r}, {k}: {m}"
            )


@pytest.mark.parametrize("case", ["gauss", "conv"])
def test_gradient_all_reduce(distributed_results, case) -> None:
    model, x, y, fam = make_problem(case)
    model.zero_grad()
    (-fam_log_prob(fam, model(x), y).mean()).backward()
    ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    for res in distributed_results:
        torch.testing.assert_close(res[f"{case}/grad"]["flat"], ref, **TOL)
        torch.testing.assert_close(res[f"{case}/grad"]["module"], ref, **TOL)


def test_single_process_is_identity() -> None:
    """Without a process group the wrapper is the operator itself."""
    assert not dist.is_initialized()
    model, x, y, fam = make_problem("gauss")
    for label, name, kw in FLAVOURS:
        ref = evaluate(npg.make_fisher(name, model, x, fam, targets=y, seed=SEED, **kw))
        got = evaluate(npg_dist.make_fisher(name, model, x, fam, targets=y, seed=SEED, **kw))
        for key, value in ref.items():
            torch.testing.assert_close(got[key], value, **TOL, msg=f"{label}/{key}")


def test_rejects_ekfac_and_double_wrap() -> None:
    model, x, _, fam = make_problem("gauss")
    with pytest.raises(NotImplementedError, match="EKFAC"):
        npg_dist.all_reduce_fisher(npg.make_fisher("ekfac", model, x, fam))
    op = npg_dist.all_reduce_fisher(npg.make_fisher("exact", model, x, fam))
    with pytest.raises(TypeError, match="already"):
        npg_dist.DataParallelFisher(op)
    with pytest.raises(TypeError, match="closed-form"):
        op.inverse_mv(torch.zeros(op.dim))


@pytest.mark.parametrize("fisher", [f for f, _ in NGD_FLAVOURS])
def test_ddp_ngd_matches_single_process(distributed_results, fisher) -> None:
    """DDP + DistributedNGD on two shards takes the steps one process takes on the whole batch
    (adaptive damping and the KL clip included), and the replicas stay identical."""
    ref = ngd_run(fisher, None)
    start = torch.cat([p.detach().reshape(-1) for p in ngd_problem()[0].parameters()])
    assert not torch.allclose(ref, start)
    for res in distributed_results:
        torch.testing.assert_close(res["ngd"][fisher], ref, **TOL)
