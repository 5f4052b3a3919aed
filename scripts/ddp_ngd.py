"""Data-parallel natural-gradient training: DDP + :class:`npg.distributed.DistributedNGD`.

    torchrun --nproc_per_node 2 scripts/ddp_ngd.py                  # K-FAC, gloo on CPU
    torchrun --nproc_per_node 2 scripts/ddp_ngd.py --fisher exact --check

Each rank trains on its own shard (``DistributedSampler``: equal shards, as DDP's plain gradient
average requires); DDP all-reduces the gradient in ``backward`` and the optimizer all-reduces
the Fisher (products for exact/MC/empirical, the diagonal or the K-FAC factors), so every
replica takes the step that one process would take on the global batch. ``--check`` replays the
same global batches in one process on rank 0 and prints the largest parameter difference.
NCCL is used when CUDA is available (one GPU per rank), gloo otherwise.

The data is a synthetic 3-class problem labelled by a random teacher MLP (no download).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from npg.distributed import DistributedNGD
from npg.optim import NGD


def make_data(n: int, dim: int = 10, classes: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    teacher = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, classes))
    for p in teacher.parameters():
        p.data = torch.randn(p.shape, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(-1)
    return x, y


def new_model(dim: int = 10, classes: int = 3) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(dim, 32), nn.Tanh(), nn.Linear(32, classes))


def optimizer_kwargs(args: argparse.Namespace, model: nn.Module) -> dict:
    kw = dict(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        fisher=args.fisher,
        lr=args.lr,
        damping=args.damping,
        max_kl=args.max_kl,
    )
    if args.fisher == "kfac":
        kw.update(kfac_inv_interval=1)
    return kw


def make_closure(opt, net: nn.Module, loss_fn, x: Tensor, y: Tensor):
    """The closure NGD calls: zero the gradients, loss on the batch, backward."""

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        return loss

    return closure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--fisher", default="kfac", choices=["exact", "mc", "empirical", "diagonal", "kfac"]
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64, help="per-rank batch size")
    p.add_argument("--n", type=int, default=2048, help="training set size")
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--damping", type=float, default=1e-2)
    p.add_argument("--max-kl", type=float, default=0.01)
    p.add_argument("--float64", action="store_true")
    p.add_argument("--check", action="store_true", help="compare with one process on rank 0")
    args = p.parse_args()

    torch.set_num_threads(1)
    if args.float64:
        torch.set_default_dtype(torch.float64)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    x, y = make_data(args.n)
    x = x.to(torch.get_default_dtype())
    data = TensorDataset(torch.arange(args.n))
    sampler = DistributedSampler(data, world, rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(data, batch_size=args.batch, sampler=sampler, drop_last=True)

    model = new_model().to(device)
    ddp = DDP(model, device_ids=[device.index] if cuda else None)
    opt = DistributedNGD(model.parameters(), **optimizer_kwargs(args, model))
    loss_fn = nn.CrossEntropyLoss()
    ref_model = ref_opt = None
    if args.check and rank == 0:
        ref_model = new_model().to(device)
        ref_opt = NGD(ref_model.parameters(), **optimizer_kwargs(args, ref_model))

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros(2, device=device)
        for (idx,) in loader:
            xb, yb = x[idx].to(device), y[idx].to(device)

            closure = make_closure(opt, ddp, loss_fn, xb, yb)  # backward through DDP
            loss = opt.step(closure, inputs=xb, targets=yb)  # the global-batch mean loss
            total += torch.stack([loss.detach(), torch.ones((), device=device)])
            if args.check:  # the same global batch, in one process
                all_idx = [torch.empty_like(idx) for _ in range(world)]
                dist.all_gather(all_idx, idx.to(device) if cuda else idx)
                if rank == 0:
                    gi = torch.cat(all_idx).cpu()
                    gx, gy = x[gi].to(device), y[gi].to(device)
                    ref_closure = make_closure(ref_opt, ref_model, loss_fn, gx, gy)
                    ref_opt.step(ref_closure, inputs=gx, targets=gy)
        with torch.no_grad():
            acc = (model(x.to(device)).argmax(-1) == y.to(device)).double().mean()
        if rank == 0:
            print(
                f"epoch {epoch + 1}: mean loss {float(total[0] / total[1]):.4f}, "
                f"accuracy {float(acc):.4f}, damping {opt.damping:.3g}",
                flush=True,
            )

    flat = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        spread = max(float((g - flat).abs().max()) for g in gathered)
        print(f"max parameter difference between the {world} replicas: {spread:.3g}")
        if ref_model is not None:
            ref = torch.cat([q.detach().reshape(-1) for q in ref_model.parameters()])
            print(
                f"max parameter difference vs one process on the global batches: "
                f"{float((ref - flat).abs().max()):.3g}"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
