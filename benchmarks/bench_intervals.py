"""Coverage and width of the conformal prediction intervals (issue 16), and their cost.

Three protocols, each a small model trained with ``simmstnet train`` and then scored with
``simmstnet evaluate --intervals 0.8,0.95`` with ``--interval-method aci`` (the default: per-cell
adaptive conformal inference) and ``--interval-method split`` (split conformal):

- ``milano-1h``: the shared real Milano block (5x5 cells, Net), resampled to 1 h, input 24,
  horizon 6;
- ``milano-10min``: the same block at 10 minutes, input 6, horizon 3;
- ``sim-shift``: a simulated milano-like 10x10 city with ``--shift 0.5`` (parameters outside the
  usual ranges: drift), 21 days, hourly, Call/SMS/Net, input 24, horizon 6.

Per protocol and service it prints test coverage of the nominal 80 % and 95 % intervals, mean
width (original units), the 10th percentile of per-cell coverage, the Winkler score and CRPS,
and the time calibration and interval metrics add to ``evaluate`` (the default method; wall
time of the whole command against the same command without ``--intervals``, median of
``--repeat`` runs, and the share measured inside the evaluation). Writes ``OUT/bench_intervals.json`` and
``OUT/bench_intervals.md``.

Skips (exit 0) when ``../shared/data`` is absent (the real block is not part of the project).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_intervals.py
    .venv/bin/python benchmarks/bench_intervals.py --out /tmp/bench-iv --epochs 3 --only milano-1h
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "telecom-italia"
CSV = SHARED / "milano-internet-r41-45-c41-45-10min-2013-11-01-to-21.csv"
PY = [sys.executable, "-m", "simmstnet"]


def sh(args: list[str]) -> str:
    res = subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{res.stderr[-3000:]}")
    return res.stdout


def protocols(out: Path, epochs: int, windows: int) -> dict[str, tuple[Path, list[str]]]:
    real = out / "milano-net-5x5.npz"
    sim = out / "sim-shift.npz"
    small = [f"train.epochs={epochs}", f"train.max_windows_per_epoch={windows}", "train.device=cpu",
             "model.d_model=16", "train.patience=0", "train.seed=0"]
    return {
        "milano-1h": (real, ["model.name=stnet", "data.step=1h", "data.input_len=24", "data.label_len=12",
                             "data.horizon=6", *small]),
        "milano-10min": (real, ["model.name=stnet", "data.input_len=6", "data.label_len=3", "data.horizon=3",
                                *small]),
        "sim-shift": (sim, ["model.name=sim-mstnet", "model.d_ff=32", "data.input_len=24", "data.label_len=12",
                            "data.horizon=6", *small]),
    }


def prepare(out: Path) -> None:
    real = out / "milano-net-5x5.npz"
    if not real.is_file():
        sh(PY + ["data", "import", "--csv", str(CSV), "--layout", "wide", "--grid", "5x5", "--service", "net",
                 "--start", "2013-11-01 00:00", "--tz", "Europe/Rome", "--step", "10min", "--origin", "41,41",
                 "--out", str(real)])
    sim = out / "sim-shift.npz"
    if not sim.is_file():
        sh(PY + ["simulate", "--preset", "milano-like", "--shift", "0.5", "--rows", "10", "--cols", "10",
                 "--days", "21", "--seed", "7", "--out", str(sim)])


def evaluate(run: Path, extra: list[str]) -> tuple[dict, float]:
    t0 = time.perf_counter()
    res = json.loads(sh(PY + ["evaluate", "--run", str(run), "--device", "cpu", *extra]))
    return res, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/simmstnet-bench-intervals")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--windows", type=int, default=2048, help="train.max_windows_per_epoch")
    ap.add_argument("--repeat", type=int, default=3, help="evaluate timings per variant (median)")
    ap.add_argument("--only", nargs="*", help="protocol names to run")
    args = ap.parse_args()
    if not CSV.is_file():
        print(f"skipped: {CSV} is absent (the shared real data is not part of the project)")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    prepare(out)
    results = {}
    for name, (data, overrides) in protocols(out, args.epochs, args.windows).items():
        if args.only and name not in args.only:
            continue
        run = out / "runs" / name
        t0 = time.perf_counter()
        if not (run / "metrics.json").is_file():
            sh(PY + ["train", "--no-progress", f"data.path={data}", f"out={run}", *overrides])
        train_s = time.perf_counter() - t0
        levels = ["--intervals", "0.8,0.95"]
        plain_t, aci_t = [], []
        aci = None
        for _ in range(args.repeat):
            _, t = evaluate(run, [])
            plain_t.append(t)
            aci, t = evaluate(run, levels + ["--interval-method", "aci"])
            aci_t.append(t)
        split, split_s = evaluate(run, levels + ["--interval-method", "split"])
        metrics = json.loads((run / "metrics.json").read_text())
        plain, with_iv = statistics.median(plain_t), statistics.median(aci_t)
        inner = aci["intervals"]
        results[name] = {
            "data": str(data), "overrides": overrides, "train_seconds": round(train_s, 1),
            "evaluate_seconds_plain": round(plain, 3), "evaluate_seconds_intervals": round(with_iv, 3),
            "added_share_wall": round((with_iv - plain) / plain, 4),
            "added_share_inside": inner["share_of_eval_seconds"],
            "calibration_in_train": metrics.get("intervals", {}).get("share_of_eval_seconds"),
            "split": split["intervals"]["test"], "aci": inner["test"], "split_seconds": round(split_s, 3),
            "point": {s: v.get("mae") for s, v in split["test"].items()},
        }
        print(f"{name}: trained {train_s:.0f} s; evaluate {plain:.2f} s, with intervals {with_iv:.2f} s",
              flush=True)
    wall = time.perf_counter() - t_all
    (out / "bench_intervals.json").write_text(json.dumps({"wall_seconds": wall, "results": results}, indent=2))
    md = render(results, wall)
    (out / "bench_intervals.md").write_text(md)
    print(md)
    return 0


def render(results: dict, wall: float) -> str:
    lines = ["| protocol | service | method | cov 80 | width 80 | p10 cell cov 80 | cov 95 | width 95 | "
             "p10 cell cov 95 | Winkler 95 | CRPS | MAE |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        for method in ("split", "aci"):
            for s, v in r[method].items():
                if s == "overall" and len(r[method]) == 2:
                    continue
                lines.append(f"| {name} | {s} | {method} | {100 * v['coverage_80']:.1f} | {v['width_80']:.4g} | "
                             f"{100 * v['cell_coverage_p10_80']:.1f} | {100 * v['coverage_95']:.1f} | "
                             f"{v['width_95']:.4g} | {100 * v['cell_coverage_p10_95']:.1f} | "
                             f"{v['winkler_95']:.4g} | {v['crps']:.4g} | {r['point'][s]:.4g} |")
    lines += ["", "| protocol | evaluate s (plain) | evaluate s (intervals) | added, wall | added, inside evaluate | "
              "calibration + metrics share in train |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['evaluate_seconds_plain']:.2f} | {r['evaluate_seconds_intervals']:.2f} | "
                     f"{100 * r['added_share_wall']:.1f} % | {100 * r['added_share_inside']:.1f} % | "
                     f"{100 * (r['calibration_in_train'] or 0):.1f} % |")
    lines += ["", f"Wall time {wall:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
