"""Speed and memory of the simulator (issue 3 targets, on 2 cores):

- small:    20x20 grid, 30 days hourly, 3 services            target < 2 s
- full:     100x100 grid (Milano raster), 62 days hourly, 3 services   target < 60 s, peak RSS < 4 GB
- parallel: 8 scenarios of the small case, 1 worker vs 2 workers (scenarios per second)

Each case runs in a fresh Python process so its peak RSS is its own (imports included). Wall
time is the simulation call only (not imports), best of ``--repeat`` runs.

    .venv/bin/python benchmarks/bench_sim.py                 # all cases
    .venv/bin/python benchmarks/bench_sim.py --cases small --repeat 5
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CASES = {
    "small": dict(rows=20, cols=20, days=30, scenarios=1, workers=1),
    "full": dict(rows=100, cols=100, days=62, scenarios=1, workers=1),
    "parallel-1": dict(rows=20, cols=20, days=30, scenarios=8, workers=1),
    "parallel-2": dict(rows=20, cols=20, days=30, scenarios=8, workers=2),
}
TARGETS = {"small": 2.0, "full": 60.0}


def run_one(name: str, repeat: int, preset: str) -> dict:
    from simmstnet.sim.simulator import simulate

    kw = CASES[name]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        grids = simulate(preset=preset, step=3600, seed=0, **kw)
        times.append(time.perf_counter() - t0)
        shape = list(grids[0].shape)
        del grids
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
    return {"case": name, "preset": preset, "shape": shape, "scenarios": kw["scenarios"],
            "workers": kw["workers"], "best_s": min(times), "times_s": times,
            "scenarios_per_s": kw["scenarios"] / min(times),
            "peak_rss_gb": rss_gb}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="small,full,parallel-1,parallel-2")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--preset", default="milano-like")
    ap.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP threads per process")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.repeat, args.preset)))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    print(f"cpu cores visible: {os.cpu_count()}, threads per process: {args.threads}")
    for name in args.cases.split(","):
        if name not in CASES:
            ap.error(f"unknown case {name!r}; cases: {', '.join(CASES)}")
        repeat = 1 if name == "full" else args.repeat
        out = subprocess.run([sys.executable, __file__, "--one", name, "--repeat", str(repeat),
                              "--preset", args.preset], env=env, capture_output=True, text=True)
        if out.returncode:
            sys.stderr.write(out.stderr)
            return out.returncode
        r = json.loads(out.stdout.strip().splitlines()[-1])
        target = TARGETS.get(name)
        verdict = "" if target is None else (" (target < %.0f s: %s)" % (target, "met" if r["best_s"] < target else "MISSED"))
        print(f"{name:11s} {r['shape']} x{r['scenarios']} workers={r['workers']}: best {r['best_s']:.2f} s"
              f"{verdict}, {r['scenarios_per_s']:.2f} scenarios/s, peak RSS {r['peak_rss_gb']:.2f} GB"
              + (" (parent only; workers fork from a forkserver)" if r["workers"] > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
