"""Speed of Sim-MSTNet: one-step forecast for every Milano cell, and training throughput.

Inference: a forecast for all 10,000 cells x 3 services at once (10,000 windows, input 24,
label 12, horizon 6, patch 5 by default), under torch.inference_mode, in chunks. Target on CPU:
under 2 s on 2 cores. Training: windows per second of full train steps (forward, masked
losses, dynamic weighting, backward, Adam) at batch 256.

The batches are fabricated (``simmstnet.models.fake_batch``): speed does not depend on values.

    python benchmarks/bench_model.py                       # CPU: 2 workers x 1 thread, defaults
    python benchmarks/bench_model.py --workers 1 --threads 2 --chunk 2500
    python benchmarks/bench_model.py --set d_model=64 --set enc_layers=3
    python benchmarks/bench_model.py --device cuda --bf16 --chunk 10000

On a machine shared with other jobs, wall times with 2 threads are meaningless (OpenMP threads
wait for each other); read the "process CPU" figure of a --workers 1 --threads 1 run instead,
and set OMP_WAIT_POLICY=PASSIVE for multi-threaded runs.
"""
from __future__ import annotations

import argparse
import ast
import json
import statistics
import sys
import time

import torch

from simmstnet.models import DataDims, build_model
from simmstnet.models.registry import resolve_season_days
from simmstnet.models.fake_batch import fake_batch
from simmstnet.train.loss_weighting import DynamicLossWeighting
from simmstnet.train.losses import masked_task_losses


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _slice(batch: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] for k, v in batch.items()}


def bench_inference(model, batch, chunk: int, device, bf16: bool, repeats: int, workers: int = 1):
    """Wall and process-CPU seconds to forecast every window of ``batch`` (already on
    ``device``), one pair per repeat. CPU seconds are the load-robust figure on a shared
    machine: with T threads and free cores, wall is about CPU / T.

    ``workers`` > 1 forecasts that many chunks at once from Python threads (torch releases the
    GIL inside its kernels), each op single-threaded: on small models this scales better than
    splitting every op over OpenMP threads."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(workers) if workers > 1 else None

    def run_chunk(lo: int):
        # inference_mode and autocast are thread-local: enter them in the worker thread.
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(_slice(batch, lo, min(lo + chunk, n)))

    model.eval()
    n = batch["x"].shape[0]
    times, cpu = [], []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        model(_slice(batch, 0, min(chunk, n)))  # warm-up (allocator, kernels)
        for _ in range(repeats):
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            starts = range(0, n, chunk)
            outs = list(pool.map(run_chunk, starts)) if pool else [run_chunk(lo) for lo in starts]
            _sync(device)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    assert torch.cat(outs).shape[0] == n
    return times, cpu


def bench_train(model, batch, steps: int, device, bf16: bool) -> list[float]:
    """Seconds per full train step on ``batch``."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    weighting = DynamicLossWeighting(batch["y"].shape[-1])
    times = []
    for i in range(steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = model(batch)
        losses = masked_task_losses(pred.float(), batch["y"], batch["y_mask"])
        total = weighting.combine(losses)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        _sync(device)
        if i:  # the first step pays one-off costs
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sim-mstnet")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op CPU threads per worker")
    p.add_argument("--workers", type=int, default=None,
                   help="chunks forecast concurrently (Python threads); default 2 on CPU, 1 on CUDA")
    p.add_argument("--train-threads", type=int, default=2, help="torch CPU threads for the train steps")
    p.add_argument("--cells", type=int, default=10_000, help="windows in the inference batch")
    p.add_argument("--services", type=int, default=3)
    p.add_argument("--input-len", type=int, default=24)
    p.add_argument("--label-len", type=int, default=12)
    p.add_argument("--horizon", type=int, default=6)
    p.add_argument("--patch", type=int, default=5)
    p.add_argument("--season-days", type=int, default=None,
                   help="seasonal history days (default: the model's data.season_days=null value, "
                        "7 for sim-mstnet; 0 runs the form without it)")
    p.add_argument("--chunk", type=int, default=1000, help="windows per forward pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model option override")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.workers is None:
        args.workers = 2 if device.type == "cpu" else 1
    season = resolve_season_days(args.model, args.season_days, None, args.horizon)
    dims = DataDims(args.services, args.input_len, args.label_len, args.horizon, args.patch, 5,
                    season_days=season)
    torch.manual_seed(0)
    model = build_model(args.model, dims, **_parse_set(args.set)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model} {model.config if hasattr(model, 'config') else ''}", file=sys.stderr)
    print(f"device {device} threads {torch.get_num_threads()} workers {args.workers} params {n_params:,} "
          f"bf16 {args.bf16} season_days {season}")

    batch = fake_batch(dims, args.cells, seed=0, device=device)
    inf, inf_cpu = bench_inference(model, batch, args.chunk, device, args.bf16, args.repeats, args.workers)
    print(f"inference: {args.cells} windows x {args.services} services in chunks of {args.chunk}: "
          f"best {min(inf):.3f} s, median {statistics.median(inf):.3f} s wall "
          f"({args.cells / min(inf):,.0f} windows/s); process CPU best {min(inf_cpu):.3f} s")

    torch.set_num_threads(args.train_threads)
    train_batch = fake_batch(dims, args.train_batch, seed=1, device=device)
    tr = bench_train(model, train_batch, args.train_steps, device, args.bf16)
    step = statistics.median(tr)
    print(f"train ({torch.get_num_threads()} threads): batch {args.train_batch}, median step {step * 1000:.1f} ms "
          f"({args.train_batch / step:,.0f} windows/s)")
    if args.json:
        from simmstnet.utils import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({
                "model": args.model, "device": str(device), "threads": args.threads,
                "workers": args.workers, "train_threads": args.train_threads,
                "params": n_params, "bf16": args.bf16, "season_days": season, "cells": args.cells, "chunk": args.chunk,
                "inference_s": inf, "inference_cpu_s": inf_cpu, "train_step_s": tr,
                "train_batch": args.train_batch}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
