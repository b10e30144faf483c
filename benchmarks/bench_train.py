"""Speed of the training pipeline and of forecasting, through the real code paths.

Unlike ``bench_model.py`` (the network alone on fabricated batches) this times what
`simmstnet train` and `simmstnet predict` do: lazy windows gathered by ``BatchLoader``, the
train step of :class:`~simmstnet.train.trainer.Trainer` (forward, masked task losses, dynamic
weighting, backward, clipping, AdamW, LR schedule), then forecasting from the saved run.

- train throughput: windows per second over ``--steps`` train steps after ``--warmup`` steps
  (timed between consecutive steps with the trainer's ``on_batch`` hook, data gathering included);
- inference latency: one batch of 1 window and one of ``--eval-batch`` windows (median of
  ``--repeat``), through the evaluation path (gather, forward, inverse scaling);
- predict: a forecast for every cell of the grid issued at its last step (`simmstnet predict`).

Defaults are the default protocol (hourly, input 24, label 12, horizon 6, patch 5, 3 services,
Sim-MSTNet defaults, batch 32) on a synthetic 20 x 20 grid of 30 days. On a shared machine
use ``--threads 1``: two spinning OpenMP threads on busy cores make step times erratic.

    .venv/bin/python benchmarks/bench_train.py
    .venv/bin/python benchmarks/bench_train.py --device cuda --batch-size 256 --steps 200
    .venv/bin/python benchmarks/bench_train.py --threads 1 model.d_model=64
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def synthetic_grid(side: int, days: int, seed: int = 0):
    """Hourly traffic with a daily cycle, per-cell levels and gamma noise; 3 services."""
    from simmstnet.data.grid import TrafficGrid

    rng = np.random.default_rng(seed)
    T = days * 24
    hours = np.arange(T)[:, None, None, None] % 24
    level = rng.uniform(5, 50, size=(1, side, side, 3))
    values = level * (1 + 0.6 * np.sin(2 * np.pi * (hours - 8) / 24)) * rng.gamma(20, 1 / 20, (T, side, side, 3))
    return TrafficGrid.from_values(values.astype(np.float32), start=1383260400, step=3600,
                                   services=("call", "sms", "net"), meta={"timezone": "Europe/Rome"})


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (model.d_model=64, ...)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--side", type=int, default=20, help="grid is side x side cells")
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=50, help="timed train steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print the figures as JSON only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from simmstnet.commands.train import forecast_at
    from simmstnet.config import load_config
    from simmstnet.eval.forecast import forecast_batches
    from simmstnet.train.checkpoint import load_run
    from simmstnet.train.trainer import Hooks, Trainer

    grid = synthetic_grid(args.side, args.days)
    ticks: list[float] = []
    n_steps = args.warmup + args.steps + 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cfg = load_config(None, [f"train.device={args.device}", f"train.batch_size={args.batch_size}",
                                 "train.epochs=1", f"train.max_windows_per_epoch={n_steps * args.batch_size}",
                                 f"train.max_val_windows={args.eval_batch}", "train.patience=0",
                                 # Short val/test spans: the run's final evaluation is not what is timed.
                                 "data.split=[0.9,0.05,0.05]",
                                 f"out={out}", *args.overrides])
        trainer = Trainer(cfg, grid=grid, progress=False, quiet=True,
                          hooks=Hooks(on_batch=lambda rank, batch: ticks.append(_now())))
        trainer.run()
        device = trainer.dist.device
        intervals = np.diff(ticks[args.warmup:])
        train_wps = args.batch_size / float(np.median(intervals))

        run = load_run(out, device)
        ds = trainer.data.test
        latency = {}
        for bs in (1, args.eval_batch):
            idx = np.arange(min(bs, len(ds)))
            times = []
            for _ in range(args.repeat + 1):
                t0 = time.perf_counter()
                for _batch, pred in forecast_batches(run.model, ds, idx, bs, device, cfg.train.amp):
                    ds.scaler.inverse(pred)
                times.append(_now() - t0)
            latency[bs] = statistics.median(times[1:])  # the first call warms up
        times = []
        for _ in range(max(1, args.repeat // 2) + 1):
            t0 = time.perf_counter()
            forecast_at(run, grid, grid.shape[0] - 1, device, args.eval_batch)
            times.append(_now() - t0)
        predict_s = statistics.median(times[1:])

    figures = {
        "device": str(device), "threads": args.threads, "grid": f"{args.side}x{args.side}x{args.days * 24}h",
        "model": cfg.model.name, "params": trainer.params, "batch_size": args.batch_size,
        "train_windows_per_s": round(train_wps, 1),
        "train_step_ms": round(1000 * float(np.median(intervals)), 2),
        "latency_ms_batch1": round(1000 * latency[1], 2),
        f"latency_ms_batch{args.eval_batch}": round(1000 * latency[args.eval_batch], 2),
        "inference_windows_per_s": round(args.eval_batch / latency[args.eval_batch], 1),
        "predict_all_cells_s": round(predict_s, 3),
        "cells": args.side * args.side,
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:>28}  {value}")
    return figures


def _now() -> float:
    """Wall clock after pending GPU work (CUDA kernels run asynchronously)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


if __name__ == "__main__":
    main()
