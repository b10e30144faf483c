"""Speed of the lazy window dataset: creation time and get_batch throughput.

Builds a random 100x100 grid with 1,488 hourly steps (62 days, the size of the full Milano
data) and 3 services, then prints the time to build a WindowDataset (the one scaled, padded
copy of the grid included) and the windows/s that get_batch delivers for batch 256 and 1024.

    OMP_NUM_THREADS=1 python benchmarks/bench_windows.py [--steps 1488] [--size 100] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from simmstnet.data.grid import TrafficGrid
from simmstnet.data.scaling import Scaler
from simmstnet.data.windows import WindowDataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1488)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one core)")
    ap.add_argument("--seconds", type=float, default=3.0, help="time spent per batch size")
    ap.add_argument("--missing", type=float, default=0.0, help="share of unobserved entries")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    shape = (args.steps, args.size, args.size, 3)
    values = rng.gamma(2.0, 10.0, size=shape).astype(np.float32)
    mask = rng.random(shape) >= args.missing if args.missing else np.ones(shape, bool)
    grid = TrafficGrid.from_values(values, start=1383260400, step=3600, services=("call", "sms", "net"),
                                   mask=mask, meta={"timezone": "Europe/Rome"})
    print(f"grid {shape} ({values.nbytes / 2**20:.0f} MiB float32), torch threads {args.threads}")

    t0 = time.perf_counter()
    scaler = Scaler.fit(grid, (0, int(0.7 * args.steps)))
    t1 = time.perf_counter()
    ds = WindowDataset(grid, input_len=24, label_len=12, horizon=6, patch=5, scaler=scaler)
    t2 = time.perf_counter()
    print(f"Scaler.fit on 70% of the steps: {t1 - t0:.3f} s")
    print(f"WindowDataset creation: {t2 - t1:.3f} s for {len(ds):,} windows "
          f"(skipped {ds.n_skipped:,})")

    for batch in (256, 1024):
        order = rng.permutation(len(ds))
        ds.get_batch(order[:batch])  # warm-up
        n, lo, t_start = 0, 0, time.perf_counter()
        while time.perf_counter() - t_start < args.seconds:
            ds.get_batch(order[lo:lo + batch])
            lo = (lo + batch) % (len(ds) - batch)
            n += batch
        rate = n / (time.perf_counter() - t_start)
        print(f"get_batch batch={batch}: {rate:,.0f} windows/s (L=24, k=5, C=3, random order)")


if __name__ == "__main__":
    main()
