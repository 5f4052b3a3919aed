"""Cost of npg's Fisher products and solves against TRPO's double-backward KL-Hessian product.

The baseline is what sb3-contrib's TRPO does: the gradient of the mean KL between the (detached)
old and the current policy, taken once with ``create_graph=True``, then per product the gradient
of ``grad_kl · v`` (``retain_graph=True``). At the old parameters the KL Hessian is the Fisher,
so both compute the same product (checked here).

Measured per case, in float32 with ``--threads`` intra-op threads (times are medians over
``--repeats`` interleaved rounds; baseline and npg alternate within a round so that machine load
hits both alike):

* ``product``: one Fisher-vector product after the first (the CG inner loop); ``exact`` takes
  its autograd-free path for MLPs (both models describe themselves as a ``LinearStack``), and
  ``exact_autograd_product`` is the generic double-vjp path on the same model,
* ``setup``: what a solve pays once (baseline: forward + KL + create_graph gradient; exact:
  the ``ExactFisher`` constructor; K-FAC: the ``KFACFisher`` constructor),
* ``cg10``: setup + a 10-iteration CG solve (``tol=0``, damping 0.1, npg's CG for both),
* ``kfac``: build + damped solve (factor inverses included), and the solve alone (cached).
* on CPU, the matrix-multiply work of one product of each kind (multiply-adds and number of
  matrix products, from the operand shapes the profiler records). The ratio of the exact
  product's work to the baseline's bounds the ratio of their matmul times at equal
  throughput; the total times also carry each side's elementwise work.

Peak memory (``--memory``): each phase runs in a fresh subprocess; after the model, data and a
warm-up of all three code paths on 8 rows (so that first-use costs such as module imports are
not charged to a phase) the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), and the
number is the peak resident set size during the phase minus the resident size before it: the
extra host memory the phase needed at its peak (retained graphs, temporaries, allocator slack),
not the bytes of live tensors. On CUDA it reports ``torch.cuda.max_memory_allocated`` deltas.

``--timer cpu`` measures process CPU time instead of wall time: on a machine loaded by other
jobs it is far less noisy (the threads' waiting is not counted), at the price of counting
spin-waiting of idle intra-op threads.

Run: ``.venv/bin/python scripts/bench_fisher.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributions import Categorical as TorchCategorical
from torch.distributions import Normal, kl_divergence

from npg.cg import conjugate_gradient
from npg.families import Categorical, DiagGaussian, Family
from npg.fisher import ExactFisher, KFACFisher
from npg.model import LinearStack

DAMPING = 0.1
CG_ITERS = 10


class GaussianPolicy(nn.Module):
    """17→64→64→6 tanh mean network and a free log-std, output ``[mean, log_std]``."""

    def __init__(self, obs: int = 17, act: int = 6, hidden: int = 64) -> None:
        super().__init__()
        self.mean = nn.Sequential(
            nn.Linear(obs, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, act),
        )  # fmt: skip
        self.log_std = nn.Parameter(torch.full((act,), -0.5))

    def forward(self, x: Tensor) -> Tensor:
        mean = self.mean(x)
        return torch.cat([mean, self.log_std.expand_as(mean)], -1)

    def linear_stack(self) -> LinearStack:
        """Opt in to the autograd-free exact products, as ``agents.policies.Actor`` does."""
        return LinearStack(list(self.mean)[::2], "tanh", self.log_std)


class AutogradOnly(nn.Module):
    """The same model without a :class:`LinearStack` description: ``ExactFisher``'s generic
    (double-vjp) path, timed as ``exact_autograd_*``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def make_case(name: str, batch: int, device: str) -> tuple[nn.Module, Tensor, Family]:
    torch.manual_seed(0)
    if name == "policy":
        model, x, family = GaussianPolicy(), torch.randn(batch, 17), DiagGaussian()
    elif name == "classifier":
        model = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
        x, family = torch.randn(batch, 64), Categorical()
    else:
        raise ValueError(name)
    return model.to(device), x.to(device), family


# --- the baseline: sb3-contrib TRPO's double-backward Hessian-of-mean-KL product ---------------
def _torch_distribution(out: Tensor, family: Family):
    """The policy distribution as sb3 builds it (``torch.distributions``)."""
    if isinstance(family, DiagGaussian):
        mean, log_std = out.chunk(2, -1)
        return Normal(mean, log_std.exp())
    return TorchCategorical(logits=out)


def _sb3_kl(new, old) -> Tensor:
    """sb3's ``kl_divergence``: torch's KL, summed over independent action dimensions."""
    kl = kl_divergence(new, old)
    return kl.sum(-1) if isinstance(new, Normal) else kl


def double_backward_hvp(
    model: nn.Module, x: Tensor, family: Family, kl_impl: str = "sb3"
) -> Callable[[Tensor], Tensor]:
    """Build TRPO's KL-Hessian product: one ``create_graph`` gradient of the mean KL, then
    ``v -> ∇(∇KL · v)`` per product.

    ``kl_impl="sb3"`` mirrors sb3-contrib: the old distribution from a separate forward pass
    under ``no_grad``, ``KL(new ‖ old)`` from ``torch.distributions``. ``kl_impl="npg"`` uses
    npg's closed-form ``family.kl`` on one forward pass: a leaner graph, a harder baseline.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if kl_impl == "sb3":
        with torch.no_grad():
            old = _torch_distribution(model(x), family)
        kl = _sb3_kl(_torch_distribution(model(x), family), old).mean()
    else:
        out = model(x)
        kl = family.kl(out.detach(), out).mean()
    grad_kl = torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, params, create_graph=True)])

    def hvp(v: Tensor) -> Tensor:
        hv = torch.autograd.grad(grad_kl @ v, params, retain_graph=True)
        return torch.cat([g.reshape(-1) for g in hv])

    return hvp


# --- matrix-multiply work ------------------------------------------------------------------------
# operand positions (the last two operands of rank >= 1) are read from the recorded shapes
_MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")
_MATVECS = ("aten::mv", "aten::addmv", "aten::addmv_")


def matmul_work(fn: Callable[[], object]) -> tuple[float, int]:
    """Multiply-adds and number of matrix products (``mm``/``addmm``/``bmm``/``baddbmm`` and
    matrix-vector ``mv``/``addmv``) of one call of ``fn``, from the operand shapes the
    profiler records. It is the matmul work of this implementation of a product; the ratio of
    two implementations' work bounds the ratio of their matmul times at equal throughput, not
    the ratio of their total times."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    macs, count = 0, 0
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and parent.name not in _MATMULS + _MATVECS:
            parent = parent.cpu_parent
        if parent is not None:  # inside a counted product (``mv`` runs ``addmv_``)
            continue
        shapes = [s for s in event.input_shapes if isinstance(s, list) and len(s) >= 1]
        if event.name in _MATMULS:
            a, b = shapes[-2:]
            macs, count = macs + math.prod(a) * b[-1], count + 1
        elif event.name in _MATVECS:
            a = shapes[-2]
            macs, count = macs + math.prod(a), count + 1
    return float(macs), count


# --- timing --------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device: str, timer: Callable[[], float]) -> float:
    _sync(device)
    t = timer()
    fn()
    _sync(device)
    return timer() - t


def bench_case(
    name: str, batch: int, repeats: int, device: str, timer: Callable[[], float]
) -> dict:
    model, x, family = make_case(name, batch, device)
    dim = sum(p.numel() for p in model.parameters())
    g = torch.randn(dim, generator=torch.Generator().manual_seed(1)).to(device)
    v = torch.randn(dim, generator=torch.Generator().manual_seed(2)).to(device)

    # warm-up and agreement check
    hvp = double_backward_hvp(model, x, family)
    op = ExactFisher(model, x, family)
    generic = AutogradOnly(model)
    assert op._stack is not None and ExactFisher(generic, x, family)._stack is None
    ref = hvp(v)
    rel_err = 0.0
    for ours in (op.mv(v), ExactFisher(generic, x, family).mv(v)):
        rel_err = max(rel_err, float(torch.linalg.norm(ours - ref) / torch.linalg.norm(ref)))
    lean = double_backward_hvp(model, x, family, kl_impl="npg")(v)
    rel_err = max(rel_err, float(torch.linalg.norm(lean - ref) / torch.linalg.norm(ref)))
    kfac = KFACFisher(model, x, family)
    kfac.inverse_mv(g, DAMPING)

    def db_cg10() -> None:
        hvp = double_backward_hvp(model, x, family)
        conjugate_gradient(hvp, g, damping=DAMPING, max_iter=CG_ITERS, tol=0.0)

    def exact_cg10() -> None:
        ExactFisher(model, x, family).cg(g, DAMPING, max_iter=CG_ITERS, tol=0.0)

    def kfac_build_solve() -> None:
        KFACFisher(model, x, family).inverse_mv(g, DAMPING)

    n_products = 10

    def products(mv: Callable[[Tensor], Tensor]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(n_products):
                mv(v)

        return run

    t: dict[str, list[float]] = {}

    def record(key: str, fn: Callable[[], object], per: int = 1) -> None:
        t.setdefault(key, []).append(_timed(fn, device, timer) / per)

    for _ in range(repeats):  # baseline and npg interleaved within each round
        record("db_setup", lambda: double_backward_hvp(model, x, family))
        h = double_backward_hvp(model, x, family)
        h(v)
        record("db_product", products(h), n_products)
        lean = double_backward_hvp(model, x, family, kl_impl="npg")
        lean(v)
        record("db_npgkl_product", products(lean), n_products)
        record("db_cg10", db_cg10)
        record("exact_setup", lambda: ExactFisher(model, x, family))
        e = ExactFisher(model, x, family)
        e.mv(v)
        record("exact_product", products(e.mv), n_products)
        record("exact_cg10", exact_cg10)
        a = ExactFisher(generic, x, family)
        a.mv(v)
        record("exact_autograd_product", products(a.mv), n_products)
        record("kfac_build", lambda: KFACFisher(model, x, family))
        record("kfac_build_solve", kfac_build_solve)
        k = KFACFisher(model, x, family)
        k.inverse_mv(g, DAMPING)
        record("kfac_solve_cached", lambda k=k: k.inverse_mv(g, DAMPING))

    res = {"case": name, "batch": batch, "dim": dim, "rel_err_vs_db": rel_err}
    if device == "cpu":
        products = {
            "db_product": double_backward_hvp(model, x, family),
            "exact_product": ExactFisher(model, x, family).mv,
        }
        res["matmul_work"] = {
            key: dict(zip(("macs", "matmuls"), matmul_work(lambda mv=mv: mv(v)), strict=True))
            for key, mv in products.items()
        }
    for stat, fn in (("median", statistics.median), ("min", min)):
        val = {key: fn(vals) for key, vals in t.items()}
        res[f"{stat}_ms"] = {key: 1e3 * x for key, x in val.items()}
        res[f"{stat}_ratios"] = {
            "exact_product / db_product": val["exact_product"] / val["db_product"],
            "exact_product / db_npgkl_product": val["exact_product"] / val["db_npgkl_product"],
            "exact_autograd_product / db_product": val["exact_autograd_product"]
            / val["db_product"],
            "exact_cg10 / db_cg10": val["exact_cg10"] / val["db_cg10"],
            "kfac_build_solve / db_cg10": val["kfac_build_solve"] / val["db_cg10"],
            "kfac_solve_cached / db_product": val["kfac_solve_cached"] / val["db_product"],
        }
    return res


# --- memory: one subprocess per phase ------------------------------------------------------------
def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def _reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark (``VmHWM``) and return the current RSS (MiB); falls
    back to the never-reset ``ru_maxrss`` where ``/proc/self/clear_refs`` is unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _peak_rss() -> float:
    try:
        return _status_mib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory_probe(name: str, phase: str, batch: int, device: str) -> float:
    """Peak-memory rise (MiB) of one phase, measured in the current (fresh) process."""
    model, x, family = make_case(name, batch, device)
    dim = sum(p.numel() for p in model.parameters())
    g = torch.randn(dim, device=device)
    # warm-up on 8 rows, all three code paths: first-use costs (module imports, kernel and
    # allocator initialisation) would otherwise be charged to whichever phase runs first
    small = x[:8]
    conjugate_gradient(double_backward_hvp(model, small, family), g, damping=DAMPING, max_iter=2)
    ExactFisher(model, small, family).cg(g, DAMPING, max_iter=2)
    KFACFisher(model, small, family).inverse_mv(g, DAMPING)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated() / 2**20
    else:
        base = _reset_peak_rss()
    if phase == "db_cg10":
        conjugate_gradient(
            double_backward_hvp(model, x, family), g, damping=DAMPING, max_iter=CG_ITERS, tol=0.0
        )
    elif phase == "exact_cg10":
        ExactFisher(model, x, family).cg(g, DAMPING, max_iter=CG_ITERS, tol=0.0)
    elif phase == "kfac_build_solve":
        KFACFisher(model, x, family).inverse_mv(g, DAMPING)
    else:
        raise ValueError(phase)
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20 - base
    return _peak_rss() - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=["policy", "classifier"])
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--timer", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--probe", nargs=2, metavar=("CASE", "PHASE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        print(memory_probe(*args.probe, args.batch, args.device))
        return

    timer = time.process_time if args.timer == "cpu" else time.perf_counter
    print(
        f"torch {torch.__version__}, device {args.device}, threads {args.threads}, "
        f"timer {args.timer}, batch {args.batch}, repeats {args.repeats}, "
        f"load avg {os.getloadavg()[0]:.1f}"
    )
    results = []
    for name in args.cases:
        res = bench_case(name, args.batch, args.repeats, args.device, timer)
        if args.memory:
            res["peak_mem_mib"] = {}
            for phase in ("db_cg10", "exact_cg10", "kfac_build_solve"):
                cmd = [sys.executable, __file__, "--probe", name, phase, "--batch",
                       str(args.batch), "--threads", str(args.threads), "--device",
                       args.device]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                res["peak_mem_mib"][phase] = float(out.strip().splitlines()[-1])
        results.append(res)
        print(
            f"\n== {name}: dim {res['dim']}, batch {res['batch']}, "
            f"npg vs double-backward product rel. error {res['rel_err_vs_db']:.1e}"
        )
        print(f"  {'':<20} {'median ms':>10} {'min ms':>10}")
        for key, val in res["median_ms"].items():
            print(f"  {key:<20} {val:10.3f} {res['min_ms'][key]:10.3f}")
        print(f"  {'ratio':<32} {'median':>7} {'min':>7}")
        for key, val in res["median_ratios"].items():
            print(f"  {key:<32} {val:7.3f} {res['min_ratios'][key]:7.3f}")
        for key, val in res.get("peak_mem_mib", {}).items():
            print(f"  peak memory rise {key:<18} {val:8.1f} MiB")
        work = res.get("matmul_work")
        if work:
            db, ex = work["db_product"], work["exact_product"]
            print(
                f"  matmul work per product: double-backward {db['macs'] / 1e6:.1f} M "
                f"multiply-adds in {db['matmuls']} matmuls, exact {ex['macs'] / 1e6:.1f} M in "
                f"{ex['matmuls']}; ratio {ex['macs'] / db['macs']:.3f}"
            )
    print(f"\nload avg at end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
