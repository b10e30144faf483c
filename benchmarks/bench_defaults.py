"""Sim-MSTNet variants under the quick hourly profile: the measurement behind the defaults of the
linear highway's initialization, the seasonal history and its anchoring (issue 11).

Each variant is trained on the same target, split, windows and seeds (0, 1, 2), with the keys of
``configs/bench-quick.yaml`` for sim-mstnet written out here; the historical average and ridge
run once (they do not depend on the seed). Targets as in docs/benchmarks.md:

    simmstnet simulate --preset milano-like --rows 20 --cols 20 --days 28 --step 1h --seed 101 --out milano20.npz
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_defaults.py --data milano20.npz --out runs/defaults

Prints one line per run and a summary (test overall MAE / RMSE, mean ± sample std over seeds).
"""
from __future__ import annotations

import argparse
import os
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

BASE = ["data.input_len=24", "data.label_len=12", "data.horizon=6", "data.patch=3", "data.split=[0.7,0.1,0.2]",
        "train.epochs=4", "train.batch_size=64", "train.eval_batch_size=2048", "train.lr=0.002",
        "train.max_windows_per_epoch=2048", "train.max_val_windows=2048", "train.patience=0",
        "train.lr_schedule=cosine"]
NET = ["model.name=sim-mstnet", "model.d_model=16", "model.n_heads=2", "model.enc_layers=1", "model.dec_layers=1",
       "model.d_ff=32"]
OLD = ["data.season_days=0", "model.highway_init=uniform"]  # the previous defaults
VARIANTS = {
    "historical-average": ["model.name=historical-average"],
    "ridge": ["model.name=ridge"],
    "previous": NET + OLD,                                               # uniform highway, no season
    "no-highway": NET + OLD + ["model.highway=false"],
    "zero-highway": NET + OLD + ["model.highway_init=zero"],
    "season": NET + OLD + ["data.season_days=7", "model.season_anchor=false"],
    "season-zero-highway": NET + ["data.season_days=7", "model.season_anchor=false"],
    "current": NET,                                                      # package defaults
}
DETERMINISTIC = ("historical-average", "ridge")


def job(args):
    data, out, name, seed = args
    import torch

    torch.set_num_threads(1)
    from _runs import run_one

    m = run_one(Path(out) / name / f"seed{seed}", [f"data.path={data}", *BASE, *VARIANTS[name], f"train.seed={seed}"])
    return name, seed, m["test"]["overall"]["mae"], m["test"]["overall"]["rmse"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="hourly TrafficGrid .npz with call, sms, net")
    ap.add_argument("--out", default="runs/defaults")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    chosen = args.variants.split(",")
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    jobs = [(args.data, args.out, v, s) for v in chosen for s in ((0,) if v in DETERMINISTIC else (0, 1, 2))]
    res: dict[str, list] = {}
    with Pool(args.jobs) as pool:
        for name, seed, mae, rmse in pool.imap_unordered(job, jobs):
            print(f"{name:22s} seed{seed} MAE {mae:.3f} RMSE {rmse:.3f}", flush=True)
            res.setdefault(name, []).append((mae, rmse))
    for name in chosen:
        a = np.array(res[name])
        sd = a.std(0, ddof=1) if len(a) > 1 else np.zeros(2)
        print(f"SUMMARY {name:22s} MAE {a[:, 0].mean():.3f} ± {sd[0]:.3f}  RMSE {a[:, 1].mean():.3f} ± {sd[1]:.3f}  "
              f"n={len(a)}")


if __name__ == "__main__":
    main()
