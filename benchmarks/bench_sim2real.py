"""Sim2real reweighting on a toy problem: quality of each mode and time per epoch.

Quality: linear regression where the real windows and half of the simulated windows follow
y = x.w and the other half a shifted relation y = x.w' (||w' - w|| ~ 2). Reported per mode:
held-out real test MSE (mean +- std over seeds), mean weight of the good and of the shifted
half, and h / eps at the end (bilevel). Variants of bilevel: the default (G at phi_K, live
constraint) and the literal reconstruction (G at theta, planes only).

Cost: seconds per epoch of each mode on an MLP (compute-bound rather than overhead-bound) with
the same minibatches, and the ratio to ``mix``. Rerun:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sim2real.py [--seeds 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from simmstnet.train.sim2real import Sim2RealConfig, make_reweighter


class Linear(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, 1)

    def forward(self, batch):  # x (B, d) -> (B,)
        return self.lin(batch["x"]).squeeze(-1)


class MLP(nn.Module):
    def __init__(self, d, width):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, width), nn.GELU(), nn.Linear(width, width),
                                 nn.GELU(), nn.Linear(width, 1))

    def forward(self, batch):  # x (B, d) -> (B,)
        return self.net(batch["x"]).squeeze(-1)


def sq_loss(pred, batch):
    return (pred - batch["y"]) ** 2


def toy_data(seed, d=5, n_sim=400, n_real=20, n_test=2000, shift=2.0, noise=0.5, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    w_shift = w + shift * torch.randn(d, generator=g) / math.sqrt(d)
    xs = torch.randn(n_sim, d, generator=g)
    shifted = torch.arange(n_sim) >= n_sim // 2
    ys = torch.where(shifted, xs @ w_shift, xs @ w) + 0.1 * torch.randn(n_sim, generator=g)
    xr = torch.randn(n_real, d, generator=g)
    yr = xr @ w + noise * torch.randn(n_real, generator=g)
    xt = torch.randn(n_test, d, generator=g)
    yt = xt @ w + noise * torch.randn(n_test, generator=g)
    mk = lambda x, y: {"x": x.to(device), "y": y.to(device),
                       "index": torch.arange(len(y), device=device)}
    return mk(xs, ys), shifted, mk(xr, yr), mk(xt, yt)


def run(mode, model, sim, real, epochs, batch, seed, lr=0.05, real_batch=None, **cfg_kw):
    """Train; returns (reweighter, seconds per epoch after the warm start)."""
    n = sim["y"].shape[0]
    spe = n // batch
    cfg = Sim2RealConfig(mode=mode, **cfg_kw)
    rw = make_reweighter(cfg, model, n, sq_loss, steps_per_epoch=spe, total_steps=spe * epochs)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    n_real = real["y"].shape[0]
    times = []
    for e in range(epochs):
        perm = torch.randperm(n, generator=g)
        t0 = time.perf_counter()
        for i in range(spe):
            idx = perm[i * batch:(i + 1) * batch].to(sim["y"].device)
            rb = real
            if real_batch is not None:
                ridx = torch.randint(0, n_real, (real_batch,), generator=g).to(idx.device)
                rb = {k: v[ridx] for k, v in real.items()}
            opt.zero_grad(set_to_none=True)
            rw.step({k: v[idx] for k, v in sim.items()}, rb)
            opt.step()
        if sim["y"].is_cuda:
            torch.cuda.synchronize()
        if getattr(rw, "phase", lambda: "")() != "warm":
            times.append(time.perf_counter() - t0)
        rw.end_epoch()
    return rw, float(np.median(times)) if times else float("nan")


VARIANTS = {
    "off": ("off", {}),
    "mix": ("mix", {}),
    "l2rw": ("l2rw", {}),
    "bilevel": ("bilevel", dict(warm_start_epochs=5)),
    "bilevel literal (G at theta, planes only)": ("bilevel", dict(warm_start_epochs=5,
                                                                  upper="theta",
                                                                  live_constraint=False)),
    "bilevel, G at theta + live": ("bilevel", dict(warm_start_epochs=5, upper="theta")),
    "bilevel, G at phi_K, planes only": ("bilevel", dict(warm_start_epochs=5,
                                                         live_constraint=False)),
}


TOYS = {  # ample: the 20 real windows determine w alone; scarce: 8 real windows for 10 unknowns
    "ample": dict(d=5, n_real=20, noise=0.5),
    "scarce": dict(d=10, n_real=8, noise=0.3),
}


def quality(seeds, device, toy):
    rows = []
    spec = TOYS[toy]
    for name, (mode, kw) in tqdm(VARIANTS.items(), desc=f"toy {toy}", file=sys.stderr):
        losses, good, bad, ratio = [], [], [], []
        for seed in range(seeds):
            sim, shifted, real, test = toy_data(seed, device=device, **spec)
            torch.manual_seed(seed)
            model = Linear(spec["d"]).to(device)
            rw, _ = run(mode, model, sim, real, epochs=60, batch=50, seed=seed, **kw)
            with torch.no_grad():
                losses.append(float(sq_loss(model(test), test).mean()))
            w = rw.weights()
            good.append(float(w[~shifted].nanmean()))
            bad.append(float(w[shifted].nanmean()))
            if mode == "bilevel":  # h over every simulated minibatch at the final point
                hs = [rw.h_value({k: v[idx] for k, v in sim.items()})
                      for idx in torch.arange(400, device=sim["y"].device).split(50)]
                ratio.append(float(np.mean(hs)) / rw.eps)
        rows.append((name, np.mean(losses), np.std(losses), np.mean(good), np.mean(bad),
                     np.mean(ratio) if ratio else float("nan")))
    print(f"\n## Toy '{toy}' (d={spec['d']}, 400 sim windows: 200 good + 200 shifted, "
          f"{spec['n_real']} real with noise {spec['noise']}, 60 epochs, {seeds} seeds)\n")
    print("| mode | real test MSE | mean w good | mean w shifted | h/eps at end |")
    print("|---|---|---|---|---|")
    for name, m, s, wg, wb, r in rows:
        print(f"| {name} | {m:.3f} +- {s:.3f} | {wg:.3f} | {wb:.3f} | "
              f"{'' if math.isnan(r) else f'{r:.2f}'} |")


def cost(device, width, d, n_sim, batch, epochs, k_list):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sim = {"x": torch.randn(n_sim, d, generator=g), "y": torch.randn(n_sim, generator=g),
           "index": torch.arange(n_sim)}
    real = {"x": torch.randn(4 * batch, d, generator=g), "y": torch.randn(4 * batch, generator=g),
            "index": torch.arange(4 * batch)}
    sim = {k: v.to(device) for k, v in sim.items()}
    real = {k: v.to(device) for k, v in real.items()}
    cases = [("mix", {}), ("l2rw", {})] + [
        (f"bilevel K={k}", dict(k_steps=k, warm_start_epochs=1)) for k in k_list]
    results = []
    for name, kw in tqdm(cases, desc="cost", file=sys.stderr):
        model = MLP(d, width).to(device)
        mode = name.split()[0]
        _, sec = run(mode, model, sim, real, epochs=epochs, batch=batch, seed=0,
                     real_batch=batch, **kw)
        results.append((name, sec))
    n_params = sum(p.numel() for p in MLP(d, width).parameters())
    base = results[0][1]
    print(f"\n## Time per epoch ({device}, MLP {d}-{width}-{width}-1 = {n_params} parameters, "
          f"{n_sim} sim windows, batch {batch} sim + {batch} real)\n")
    print("| mode | s / epoch | x mix |")
    print("|---|---|---|")
    for name, sec in results:
        print(f"| {name} | {sec:.3f} | {sec / base:.2f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--n-sim", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=4, help="cost: epochs timed (after 1 warm-start)")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--toys", nargs="*", default=list(TOYS), choices=list(TOYS),
                    help="toy problems for the quality table (none: timing only)")
    args = ap.parse_args(argv)
    for toy in args.toys:
        quality(args.seeds, args.device, toy)
    cost(args.device, args.width, args.dim, args.n_sim, args.batch, args.epochs + 1, args.k)


if __name__ == "__main__":
    main()
