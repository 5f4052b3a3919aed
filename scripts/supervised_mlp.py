"""MLP classifier on sklearn's digits: SGD, Adam, exact NGD (CG), diagonal, empirical and K-FAC.

Standardised 8x8 digits (load_digits, no download), fixed stratified 75/25 split, a
64-128-10 ReLU MLP, batches of 64, float32. Writes mlp_*.{csv,png} into --out (the committed
ones: ``--out docs/supervised``).

    (add --out docs/supervised to rewrite the committed results)
    .venv/bin/python scripts/supervised_mlp.py            # about 1 minute on one quiet core
    .venv/bin/python scripts/supervised_mlp.py --timing-only  # per-step timing and breakdown
    .venv/bin/python scripts/supervised_mlp.py --seeds 0 1 2  # Adam vs K-FAC over init seeds
"""

from __future__ import annotations

import statistics
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

from npg.fisher.kfac import KroneckerBlock, PiDampedInverse
from npg.optim import NGD
from scripts._supervised_common import make_closure, plot_curves, print_table, setup, write_csv
from scripts._supervised_common import parser as common_parser

BATCH, HIDDEN = 64, 128
ACCURACY_BAR = 0.97  # the test accuracy the issue asks of K-FAC; Adam's tuning is held to it too
TUNING_SEEDS = (0, 1, 2, 3, 4)  # init seeds that choose Adam's rate and the headline K-FAC
ADAM_LRS = ("3e-4", "1e-3", "3e-3", "1e-2", "1.5e-2", "2e-2", "3e-2", "5e-2", "1e-1")
# Adam's tuned rate, as the seed study's rule (:func:`tuned_adam`) chose it
TUNED_ADAM = "Adam lr=2e-2"
# the headline K-FAC, as the seed study's rule (:func:`kfac_by_rule`) chose it on the tuning
# seeds (checked on seeds 5-9), not by the single seed-0 run, whose epoch counts are chaotic:
# ACKTR's damped KL model (kl_model="damped"), factors refreshed with the inverses
HEADLINE_KFAC = "K-FAC lr=1 damped-KL<=1e-2 damping=3e-3 factors/20"
# K-FAC clipped with the exact KL model (NGD's default kl_model)
EXACT_KL_KFAC = "K-FAC lr=1 KL<=1e-3 damping=1e-2"
# the headline's clip with the exact damped Kronecker inverse (kfac_inverse="eigen")
EIGEN_KFAC = "K-FAC lr=1 damped-KL<=1e-2 damping=2e-3 factors/20 eigen"


def load() -> tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    scaler = StandardScaler().fit(xtr)
    as_x = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
    return as_x(xtr), torch.tensor(ytr), as_x(xte), torch.tensor(yte)


def new_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


def evaluate(model, x, y, loss_fn) -> tuple[float, float]:
    with torch.no_grad():
        out = model(x)
        return float(loss_fn(out, y)), float((out.argmax(1) == y).float().mean())


def train(name: str, make_opt, data, epochs: int, seed: int = 0) -> list[dict]:
    """Per-epoch metrics of one run; ``seed`` initialises the model (the shuffles are fixed)."""
    xtr, ytr, xte, yte = data
    loss_fn = nn.CrossEntropyLoss()
    model = new_model(seed)
    opt = make_opt(model, loss_fn)
    gen = torch.Generator().manual_seed(1)
    n = xtr.shape[0]

    def record(epoch, step, elapsed):
        tl, ta = evaluate(model, xtr, ytr, loss_fn)
        vl, va = evaluate(model, xte, yte, loss_fn)
        return dict(
            optimizer=name,
            epoch=epoch,
            step=step,
            time=elapsed,
            train_loss=tl,
            train_acc=ta,
            test_loss=vl,
            test_acc=va,
        )

    rows = [record(0, 0, 0.0)]
    step, elapsed = 0, 0.0
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, BATCH):
            idx = perm[i : i + BATCH]
            xb, yb = xtr[idx], ytr[idx]
            t0 = time.perf_counter()
            closure = make_closure(opt, model, loss_fn, xb, yb)
            try:
                if isinstance(opt, NGD):
                    opt.step(closure, inputs=xb, targets=yb)
                else:
                    opt.step(closure)
            except ValueError as err:  # a diverged run (NaN curvature) stops here
                print(f"{name}: stopped at step {step}: {err}")
                rows.append(record(epoch, step, elapsed))
                return rows
            elapsed += time.perf_counter() - t0
            step += 1
        rows.append(record(epoch, step, elapsed))
        if not rows[-1]["train_loss"] < 1e3:
            break
    return rows


def epochs_to(rows: list[dict], target: float) -> int | None:
    """First epoch at or below ``target``."""
    return next((r["epoch"] for r in rows if r["train_loss"] <= target), None)


def epochs_to_stay(rows: list[dict], target: float) -> int | None:
    """First epoch from which the train loss stays at or below ``target`` to the end."""
    below = [r["train_loss"] <= target for r in rows]
    return next((r["epoch"] for i, r in enumerate(rows) if all(below[i:])), None)


def tuned_adam(runs: dict[tuple[str, int], list[dict]], names: list[str]) -> str:
    """Adam's tuned learning rate: the lowest median final train loss over :data:`TUNING_SEEDS`
    among the learning rates whose median test accuracy there meets :data:`ACCURACY_BAR` (the
    bar K-FAC must meet too; larger rates reach lower training loss by overfitting)."""

    def median(name: str, key: str) -> float:
        return statistics.median(runs[name, s][-1][key] for s in TUNING_SEEDS)

    eligible = [n for n in names if median(n, "test_acc") >= ACCURACY_BAR]
    return min(eligible, key=lambda n: median(n, "train_loss"))


def kfac_by_rule(rows: list[dict]) -> str:
    """The K-FAC config the headline rule picks from the seed-study rows: test accuracy at or
    above :data:`ACCURACY_BAR` on every tuning seed, then the fewest epochs to stay below
    Adam's loss in the worst tuning seed, ties broken by the median."""
    per: dict[str, list[dict]] = {}
    for r in rows:
        if r["seed"] in TUNING_SEEDS:
            per.setdefault(r["optimizer"], []).append(r)
    eligible = [n for n, rs in per.items() if all(r["test_acc"] >= ACCURACY_BAR for r in rs)]
    return min(
        eligible,
        key=lambda n: (
            max(r["epoch_staying"] for r in per[n]),
            statistics.median(r["epoch_staying"] for r in per[n]),
        ),
    )


def seed_study(configs: dict, data, epochs: int, seeds: list[int]) -> None:
    """Adam's learning-rate grid on the tuning seeds and ``seeds``, Adam's tuned rate by
    :func:`tuned_adam`, then per seed the epochs every K-FAC config needs to get (and stay)
    below the tuned Adam's final train loss on that seed; medians over the seeds, and the
    config the headline rule picks."""
    adam_names = [n for n in configs if n.startswith("Adam")]
    adam_runs = {
        (n, s): train(n, configs[n], data, epochs, s)
        for n in adam_names
        for s in sorted(set(seeds) | set(TUNING_SEEDS))
    }
    adam_rows = []
    for n in adam_names:
        for label, group in (("tuning seeds", TUNING_SEEDS), ("study seeds", seeds)):
            finals = [adam_runs[n, s][-1] for s in group]
            adam_rows.append(
                dict(
                    optimizer=n,
                    seeds=label,
                    median_final_train_loss=statistics.median(r["train_loss"] for r in finals),
                    median_test_acc=statistics.median(r["test_acc"] for r in finals),
                    min_test_acc=min(r["test_acc"] for r in finals),
                )
            )
    tuned = tuned_adam(adam_runs, adam_names)
    print(f"\nAdam's grid (tuned: {tuned}):")
    print_table(
        adam_rows,
        ["optimizer", "seeds", "median_final_train_loss", "median_test_acc", "min_test_acc"],
        {
            "median_final_train_loss": "{:.2e}",
            "median_test_acc": "{:.4f}",
            "min_test_acc": "{:.4f}",
        },
    )
    write_csv("mlp_seeds_adam.csv", adam_rows)
    rows = []
    for seed in seeds:
        target = adam_runs[tuned, seed][-1]["train_loss"]
        adam_acc = adam_runs[tuned, seed][-1]["test_acc"]
        for name in (n for n in configs if n.startswith("K-FAC")):
            run = train(name, configs[name], data, epochs, seed)
            rows.append(
                dict(
                    seed=seed,
                    adam=tuned,
                    adam_final_loss=target,
                    adam_test_acc=adam_acc,
                    optimizer=name,
                    final_train_loss=run[-1]["train_loss"],
                    test_acc=run[-1]["test_acc"],
                    epoch_first=epochs_to(run, target) or epochs + 1,
                    epoch_staying=epochs_to_stay(run, target) or epochs + 1,
                )
            )
            print(
                f"seed {seed}: {tuned} final {target:.3e}; {name}: first "
                f"{rows[-1]['epoch_first']} staying {rows[-1]['epoch_staying']} test acc "
                f"{rows[-1]['test_acc']:.4f}",
                flush=True,
            )
    if set(TUNING_SEEDS) <= set(seeds):
        pick = kfac_by_rule(rows)
        note = "" if pick == HEADLINE_KFAC else f" (differs from HEADLINE_KFAC = {HEADLINE_KFAC})"
        print(f"\nThe headline rule picks {pick}{note}")
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        mine = [r for r in rows if r["optimizer"] == name]
        rows.append(
            dict(
                seed="median",
                optimizer=name,
                final_train_loss=statistics.median(r["final_train_loss"] for r in mine),
                test_acc=statistics.median(r["test_acc"] for r in mine),
                epoch_first=statistics.median(r["epoch_first"] for r in mine),
                epoch_staying=statistics.median(r["epoch_staying"] for r in mine),
            )
        )
    print(f"\nEpochs to Adam's final train loss per seed ({epochs + 1} = not within {epochs}):")
    print_table(
        rows,
        [
            "seed",
            "adam",
            "adam_final_loss",
            "adam_test_acc",
            "optimizer",
            "final_train_loss",
            "test_acc",
            "epoch_first",
            "epoch_staying",
        ],
        {
            "adam_final_loss": "{:.2e}",
            "adam_test_acc": "{:.4f}",
            "final_train_loss": "{:.2e}",
            "test_acc": "{:.4f}",
        },
    )
    write_csv("mlp_seeds.csv", rows)


def time_per_step(make_opt, data, steps: int, batch: int = BATCH) -> float:
    """Seconds per optimizer step (closure included) over ``steps`` steps on fixed batches,
    after one untimed first step (which builds every optimizer's state: K-FAC's first factors
    and inverses), so the mean holds one refresh per refresh interval."""
    xtr, ytr = data[0], data[1]
    loss_fn = nn.CrossEntropyLoss()
    model = new_model()
    opt = make_opt(model, loss_fn)
    starts = range(0, xtr.shape[0] - batch + 1, batch)
    batches = [(xtr[i : i + batch], ytr[i : i + batch]) for i in starts]

    def step(k: int) -> None:
        xb, yb = batches[k % len(batches)]
        closure = make_closure(opt, model, loss_fn, xb, yb)
        if isinstance(opt, NGD):
            opt.step(closure, inputs=xb, targets=yb)
        else:
            opt.step(closure)

    step(0)
    t0 = time.perf_counter()
    for k in range(1, steps + 1):
        step(k)
    return (time.perf_counter() - t0) / steps


def step_timing(sgd_cfg, kfac_cfgs: dict, data, rounds: int = 5, steps: int = 200) -> list[dict]:
    """Per-step time of each K-FAC config relative to SGD, in interleaved rounds (the median
    ratio is robust to other jobs on the machine), for batches of 64 and 512."""
    rows = []
    for batch in (BATCH, 512):
        per = {name: [] for name in kfac_cfgs}
        sgd_times = []
        for _ in range(rounds):
            t_sgd = time_per_step(sgd_cfg, data, steps, batch)
            sgd_times.append(t_sgd)
            for name, cfg in kfac_cfgs.items():
                per[name].append((t_sgd, time_per_step(cfg, data, steps, batch)))
        for name, pairs in per.items():
            rows.append(
                dict(
                    batch=batch,
                    optimizer=name,
                    sgd_ms=1e3 * statistics.median(sgd_times),
                    kfac_ms=1e3 * statistics.median(k for _, k in pairs),
                    ratio=statistics.median(k / s for s, k in pairs),
                )
            )
    print(
        f"\nPer-step time vs SGD (momentum 0.9), median of {rounds} interleaved rounds of "
        f"{steps} steps:"
    )
    print_table(
        rows,
        ["batch", "optimizer", "sgd_ms", "kfac_ms", "ratio"],
        {"sgd_ms": "{:.3f}", "kfac_ms": "{:.3f}", "ratio": "{:.2f}"},
    )
    write_csv("mlp_step_time.csv", rows)
    return rows


def step_breakdown(sgd_cfg, kfac_cfgs: dict, data, steps: int = 2000) -> None:
    """Where a K-FAC step's time goes at batch 64: median microseconds of the closure alone,
    of a whole SGD step, of each K-FAC config's steps by kind (factors and inverses refreshed
    or not), and of the per-layer preconditioning products on their own: the step
    ``Ĝ⁻¹ M Â⁻¹`` (2 products per layer; the damped KL model needs nothing more) and the step
    with the exact KL model ``⟨X, G X A⟩`` (3 products per layer and four dot products).
    Steps of one kind are timed one by one, so these are medians of single steps (timer
    overhead included), not the per-round means of :func:`step_timing`."""
    xb, yb = data[0][:BATCH], data[1][:BATCH]
    loss_fn = nn.CrossEntropyLoss()

    def median_us(fn, n: int) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e6 * statistics.median(times)

    rows = []
    model = new_model()
    sgd = sgd_cfg(model, loss_fn)
    closure = make_closure(sgd, model, loss_fn, xb, yb)
    rows.append(
        dict(part="closure (zero_grad, forward, loss, backward)", us=median_us(closure, steps))
    )
    rows.append(
        dict(part="SGD step (closure included)", us=median_us(lambda: sgd.step(closure), steps))
    )
    for name, cfg in kfac_cfgs.items():
        model = new_model()
        opt = cfg(model, loss_fn)
        closure = make_closure(opt, model, loss_fn, xb, yb)
        by_kind: dict[str, list[float]] = {}
        for _ in range(steps):
            t0 = time.perf_counter()
            opt.step(closure, inputs=xb, targets=yb)
            dt = time.perf_counter() - t0
            info = opt.last_info
            kind = ("factors" if info.get("kfac_factors_updated") else "") + (
                "+inverses" if info.get("kfac_inverses_updated") else ""
            )
            by_kind.setdefault(kind or "neither", []).append(dt)
        for kind, times in by_kind.items():
            rows.append(
                dict(
                    part=f"{name}: step, {kind} refreshed ({len(times)} of {steps})",
                    us=1e6 * statistics.median(times),
                )
            )
        rows.append(
            dict(part=f"{name}: mean step", us=1e6 * sum(map(sum, by_kind.values())) / steps)
        )
    gen = torch.Generator().manual_seed(0)
    layers = []  # (damped inverse, gradient matrix) per layer, on random factors
    for layer in (m for m in model.modules() if isinstance(m, nn.Linear)):
        dg, da = layer.out_features, layer.in_features + 1
        a, g = torch.randn(256, da, generator=gen), torch.randn(256, dg, generator=gen)
        block = KroneckerBlock(layer, slice(0), slice(0), a.T @ a / 256, g.T @ g / 256)
        layers.append((block.damped_inverse(1e-2, "pi"), torch.randn(dg, da, generator=gen)))
    for part, apply in (
        ("the step's products alone (Ĝ⁻¹MÂ⁻¹, 2 per layer)", PiDampedInverse.apply),
        ("with the exact KL form (3 per layer + dots)", PiDampedInverse.apply_with_form),
    ):
        rows.append(
            dict(part=part, us=median_us(lambda f=apply: [f(inv, m) for inv, m in layers], steps))
        )
    print(f"\nWhere the time of a K-FAC step goes (batch {BATCH}, medians of single steps, us):")
    print_table(rows, ["part", "us"], {"us": "{:.0f}"})
    write_csv("mlp_step_breakdown.csv", rows)


def main() -> None:
    parser = common_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument(
        "--timing-only", action="store_true", help="only the per-step timing and its breakdown"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="only the seed study: Adam's grid and the K-FAC configs for these init seeds",
    )
    args = parser.parse_args()
    setup(args.out)
    data = load()
    epochs = args.epochs

    def sgd(lr):
        return lambda m, lf: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)

    def adam(lr):
        return lambda m, lf: torch.optim.Adam(m.parameters(), lr=lr)

    def ngd(fisher, lr, damping, **kw):
        return lambda m, lf: NGD(
            m.parameters(),
            model=m,
            loss_fn=lf,
            fisher=fisher,
            lr=lr,
            damping=damping,
            **{"max_kl": None, **kw},
        )

    kfac_kw = dict(kfac_labels="mc", kfac_decay=0.95, kfac_cov_interval=10, kfac_inv_interval=20)

    def damped_kfac(damping: float = 1e-2, max_kl: float = 1e-2, **intervals):
        """K-FAC with lr 1 and ACKTR's damped KL model."""
        return ngd(
            "kfac", 1.0, damping, max_kl=max_kl, kl_model="damped", **{**kfac_kw, **intervals}
        )

    headline_options = dict(damping=3e-3, kfac_cov_interval=20)  # HEADLINE_KFAC's
    eigen_options = dict(damping=2e-3, kfac_cov_interval=20, kfac_inverse="eigen")  # EIGEN_KFAC's
    configs = {
        "SGD lr=0.01": sgd(0.01),
        "SGD lr=0.03": sgd(0.03),
        "SGD lr=0.1": sgd(0.1),
        "SGD lr=0.3": sgd(0.3),
        **{f"Adam lr={lr}": adam(float(lr)) for lr in ADAM_LRS},
        "NGD-exact (CG 10) lr=0.3": ngd("exact", 0.3, 1e-2, cg_iters=10),
        "NGD-exact (CG 10) lr=1 KL<=1e-3": ngd("exact", 1.0, 1e-3, cg_iters=10, max_kl=1e-3),
        "NGD-diagonal lr=0.03": ngd("diagonal", 0.03, 1e-2),
        "NGD-empirical (CG 10) lr=0.3": ngd("empirical", 0.3, 1e-2, cg_iters=10),
        "K-FAC lr=0.3": ngd("kfac", 0.3, 1e-1, **kfac_kw),
        EXACT_KL_KFAC: ngd("kfac", 1.0, 1e-2, max_kl=1e-3, **kfac_kw),
        "K-FAC lr=1 KL<=1e-3 damping=1e-3": ngd("kfac", 1.0, 1e-3, max_kl=1e-3, **kfac_kw),
        "K-FAC lr=1 KL<=1e-3 damping=1e-2 factors/20": ngd(
            "kfac", 1.0, 1e-2, max_kl=1e-3, **{**kfac_kw, "kfac_cov_interval": 20}
        ),
        # ACKTR's KL estimate ½α²gᵀd (kl_model="damped"): no product by the factors
        "K-FAC lr=1 damped-KL<=1e-2 damping=1e-2": damped_kfac(),
        "K-FAC lr=1 damped-KL<=1e-2 damping=1e-2 factors/20": damped_kfac(kfac_cov_interval=20),
        HEADLINE_KFAC: damped_kfac(**headline_options),
        "K-FAC lr=1 damped-KL<=3e-2 damping=1e-2 factors/20": damped_kfac(
            max_kl=3e-2, kfac_cov_interval=20
        ),
        "K-FAC lr=1 damped-KL<=3e-2 damping=3e-3 factors/20": damped_kfac(
            max_kl=3e-2, damping=3e-3, kfac_cov_interval=20
        ),
        # the exact damped Kronecker inverse (G ⊗ A + λI)⁻¹ from eigendecompositions instead of
        # π-damping's (G + γ/π I)⁻¹ ⊗ (A + πγ I)⁻¹, which adds cross terms to the damping
        EIGEN_KFAC: damped_kfac(**eigen_options),
        "K-FAC lr=1 damped-KL<=1e-2 damping=3e-3 factors/20 eigen": damped_kfac(
            **{**eigen_options, "damping": 3e-3}
        ),
    }

    headline_timing = f"{HEADLINE_KFAC} (inverses/20)"
    exact_kl_timing = f"{EXACT_KL_KFAC} (factors/10, inverses/20)"
    eigen_timing = f"{EIGEN_KFAC} (inverses/20)"
    timing_configs = {
        headline_timing: configs[HEADLINE_KFAC],
        exact_kl_timing: configs[EXACT_KL_KFAC],
        eigen_timing: configs[EIGEN_KFAC],
        "K-FAC lr=0.3 damping=0.1, no KL clip (factors/20, inverses/20)": ngd(
            "kfac", 0.3, 1e-1, **{**kfac_kw, "kfac_cov_interval": 20}
        ),
        # diagnostic, not a training config: the headline's plain step alone (factors and
        # inverses built at the untimed step 0 only), i.e. the ratio if refreshes cost nothing
        f"{HEADLINE_KFAC} (no refresh after step 0)": damped_kfac(
            **{**headline_options, "kfac_cov_interval": 10**9, "kfac_inv_interval": 10**9}
        ),
    }
    breakdown_configs = {
        "headline (damped KL, λ 3e-3, factors/20)": configs[HEADLINE_KFAC],
        "exact KL, factors/10": configs[EXACT_KL_KFAC],
    }

    if args.seeds:
        seed_study(configs, data, epochs, args.seeds)
        return
    if args.timing_only:
        step_timing(configs["SGD lr=0.1"], timing_configs, data)
        step_breakdown(configs["SGD lr=0.1"], breakdown_configs, data)
        return
    runs = {}
    for name, make in configs.items():
        runs[name] = train(name, make, data, epochs)
        r = runs[name][-1]
        print(
            f"{name:32s} epoch {r['epoch']:3d} train loss {r['train_loss']:.3e} "
            f"test acc {r['test_acc']:.4f} ({r['time']:.1f}s)",
            flush=True,
        )
    write_csv("mlp_curves.csv", [r for rows in runs.values() for r in rows])

    # --- summary -------------------------------------------------------------------------------
    def best(prefix):
        names = [n for n in runs if n.startswith(prefix)]
        return min(names, key=lambda n: runs[n][-1]["train_loss"])

    best_adam = TUNED_ADAM  # fixed by the seed study, not by this run
    adam_final = runs[best_adam][-1]["train_loss"]

    headline = HEADLINE_KFAC  # fixed by the seed study, not by this run

    summary = []
    for name, rows in runs.items():
        r = rows[-1]
        summary.append(
            dict(
                optimizer=name,
                epochs=r["epoch"],
                final_train_loss=r["train_loss"],
                test_acc=r["test_acc"],
                best_test_acc=max(x["test_acc"] for x in rows),
                epochs_to_adam_final=epochs_to(runs[name], adam_final) or f"> {r['epoch']}",
                epochs_to_stay_below=epochs_to_stay(runs[name], adam_final) or f"> {r['epoch']}",
                ms_per_step=1e3 * r["time"] / r["step"],
            )
        )
    print(f"\nDigits MLP, {epochs} epochs, batch {BATCH}; tuned Adam = {best_adam}")
    print_table(
        summary,
        [
            "optimizer",
            "final_train_loss",
            "test_acc",
            "best_test_acc",
            "epochs_to_adam_final",
            "epochs_to_stay_below",
            "ms_per_step",
        ],
        {
            "final_train_loss": "{:.2e}",
            "test_acc": "{:.4f}",
            "best_test_acc": "{:.4f}",
            "ms_per_step": "{:.2f}",
        },
    )
    write_csv("mlp_summary.csv", summary)

    timing = step_timing(configs["SGD lr=0.1"], timing_configs, data)
    step_breakdown(configs["SGD lr=0.1"], breakdown_configs, data)
    print(f"\nAdam's final train loss ({best_adam}, {epochs} epochs): {adam_final:.3e}")
    at_batch = {r["optimizer"]: r for r in timing if r["batch"] == BATCH}
    for name, timing_name in (
        (headline, headline_timing),
        (EXACT_KL_KFAC, exact_kl_timing),
        (EIGEN_KFAC, eigen_timing),
    ):
        row = at_batch[timing_name]
        kfac_epochs = epochs_to_stay(runs[name], adam_final)
        share = "n/a" if kfac_epochs is None else f"{kfac_epochs / epochs:.2f}"
        print(
            f"{name} gets below it for good at epoch {kfac_epochs} ({share} of Adam's "
            f"epochs); final test accuracy {runs[name][-1]['test_acc']:.4f}; per-step time "
            f"ratio K-FAC/SGD at batch {BATCH}: {row['ratio']:.2f}."
        )

    shown = [
        best("SGD"),
        best_adam,
        *[n for n in runs if n.startswith("NGD")],
        headline,
        EXACT_KL_KFAC,
        EIGEN_KFAC,
    ]
    for key, label in (("epoch", "epoch"), ("time", "wall-clock (s)")):
        plot_curves(
            f"mlp_train_loss_vs_{key}.png",
            {n: ([r[key] for r in runs[n]], [r["train_loss"] for r in runs[n]]) for n in shown},
            label,
            "train loss (full training set)",
            "Digits MLP",
            logy=True,
        )
        plot_curves(
            f"mlp_test_acc_vs_{key}.png",
            {n: ([r[key] for r in runs[n]], [r["test_acc"] for r in runs[n]]) for n in shown},
            label,
            "test accuracy",
            "Digits MLP",
        )


if __name__ == "__main__":
    main()
