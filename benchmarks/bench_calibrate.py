"""Calibration benchmark (issue 13): ``simmstnet calibrate`` on the shared Milano 5x5 block.

Part ``block``: fit on the block's first ``--fit-days`` (7) days at 10-minute steps, check against
the remaining 14 days.

* wall time of the ABC-SMC calibration on ``--workers`` processes (pyabc's multicore sampler);
* per statistic of issue 13's table (spatial CV, off-day spread, peak-hour spread, shape
  correlation, SVD shares, residual spatial correlation at 2-4 squares, 10-minute increment
  kurtosis, the Nov 1-3 holiday/weekend drop): the real value on the fitted days and the 90 %
  band of ``--draws`` posterior-predictive simulations, beside the same band for the uncalibrated
  ``milano-like`` preset (same grid, dates and step);
* held-out MMD^2 of day windows (realism.compare) of both families against the 14 held-out days,
  at 10 minutes and hourly, with the real data's own first-half vs second-half MMD^2 over the 21
  days for scale (hourly 0.020: the issue's target).

Part ``scarce``: the scarce-data protocol of bench_sim2real_evidence.py (hourly, input 24, horizon
6, split 0.6/0.1/0.3, ``data.train_days=D``) with two source families side by side, same seeds:
``milano-like`` and the calibration fitted on exactly the D real days the trainer keeps (the last D
days before the validation span). Each family trains every mode of ``--modes`` over ``--seeds``;
the comparison (mean +- std over seeds, and paired by seed) is written to comparison.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_calibrate.py --part block --out runs/cal-block
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_calibrate.py --part scarce --days 3 --seeds 5 \\
        --out runs/cal-scarce

Skips (exit 0 with a message) when the shared data folder is absent.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT.parent / "shared" / "data" / "telecom-italia" / "milano-internet-r41-45-c41-45-10min-2013-11-01-to-21.csv"
# issue 13's table, as statistics of simmstnet.sim.calibrate.service_stats (Net)
TABLE = {"log_cv_space": "log CV over space of square means",
         "offday_spread": "per-square off-day / working-day ratio, std of log",
         "peak_spread": "peak hours across squares, circular std (h)",
         "shape_corr": "square profile vs block profile, median correlation",
         "svd2": "SVD variance share, component 2",
         "svd3": "SVD variance share, component 3",
         "resid_corr_2": "residual spatial correlation, 2 squares",
         "resid_corr_3": "residual spatial correlation, 3 squares",
         "resid_corr_4": "residual spatial correlation, 4 squares",
         "inc_kurt": "log-increment excess kurtosis (grid step)",
         "log_offday": "log off-day / working-day mean (Nov 1-3 holiday + weekend)"}


def load_block():
    from simmstnet.data.importers import import_wide_csv

    if not CSV.is_file():
        print(f"shared data not found at {CSV}: skipped")
        sys.exit(0)
    return import_wide_csv(CSV, "5x5", "net", "2013-11-01 00:00", tz="Europe/Rome", step="10min", origin=(41, 41))


def fitted_params(args, services=("net",)) -> list[str] | None:
    """--params: None (calibrate's default), ["full"], a list, or '+a,b' (the default plus a and b)."""
    from simmstnet.sim import calibrate as cb

    if not args.params:
        return None
    names = [x.strip() for x in args.params.lstrip("+").split(",") if x.strip()]
    return cb.default_params(services) + names if args.params.startswith("+") else names


def _band(vals) -> tuple[float, float, float]:
    v = np.asarray([x for x in vals if np.isfinite(x)])
    return tuple(float(q) for q in np.quantile(v, [0.05, 0.5, 0.95])) if v.size else (np.nan,) * 3


def family_check(name, simulate_fit, simulate_hold, real_fit, holdout, draws: int, seed: int,
                 repeats: int = 1) -> dict:
    """Statistic bands on the fitted span (``draws`` simulations of a family) and held-out MMD^2,
    ``repeats`` times over independent sets of ``draws`` simulations (the MMD^2 of one set moves by
    a few thousandths with the draws: mean and std over the sets)."""
    from simmstnet.sim import calibrate as cb

    stats = [cb.summary_stats(simulate_fit(k), ["net"]) for k in range(draws)]
    real = cb.summary_stats(real_fit, ["net"])
    rows = {}
    for key in TABLE:
        lo, med, hi = _band([s[f"net.{key}"] for s in stats])
        r = real[f"net.{key}"]
        rows[key] = {"real": r, "q05": lo, "median": med, "q95": hi, "inside": bool(lo <= r <= hi)}
    checks = [cb.holdout_check(holdout, [simulate_hold(r * draws + k) for k in range(draws)], seed + r)
              for r in range(repeats)]
    mmd = {tag: [c[tag]["net"] for c in checks] for tag in ("mmd2", "mmd2_1h")}
    return {"name": name, "stats": rows, "holdout": checks[0], "holdout_repeats": mmd,
            "mmd2_mean": {t: float(np.mean(v)) for t, v in mmd.items()},
            "mmd2_std": {t: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for t, v in mmd.items()}}


def part_block(args) -> None:
    from simmstnet.sim import calibrate as cb
    from simmstnet.sim import realism
    from simmstnet.sim.randomization import build_space
    from simmstnet.sim.simulator import simulate_scenario

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    real = load_block()
    per_day = 86400 // real.step
    cut = int(real.timestamps[args.fit_days * per_day])
    fit, hold = real.slice_time(None, cut), real.slice_time(cut, None)
    hold_days = hold.shape[0] / per_day
    t0 = time.perf_counter()
    res = cb.calibrate(real, preset="milano-like", days=args.fit_days, params=fitted_params(args),
                       population=args.population,
                       generations=args.generations, max_minutes=args.max_minutes, workers=args.workers,
                       seed=args.seed, db=out / "abc.db", log=lambda m: print(m, file=sys.stderr, flush=True),
                       method=args.method, simulations=args.simulations)
    wall = time.perf_counter() - t0
    check = cb.predictive_check(res, draws=args.draws, seed=args.seed, holdout=hold)
    cb.write_outputs(res, out / "calibration", check)
    t_check = time.perf_counter() - t0 - wall

    rng = np.random.default_rng(args.seed)
    R = args.mmd_repeats
    draws = res.draw(args.draws * R, rng)
    m = res.model
    hold_at = dict(days=hold_days, start=int(hold.timestamps[0]))
    cal = family_check("calibrated",
                       lambda k: m.simulate(draws[k], seed=30_000 + k),
                       lambda k: m.simulate(draws[k], seed=40_000 + k, **hold_at),
                       fit, hold, args.draws, args.seed, R)
    # the posterior median as one parameter set (the family's centre, without its spread)
    centre = {p.name: float(np.median(res.particles[p.name])) for p in res.priors}
    med = family_check("calibrated, posterior median",
                       lambda k: m.simulate(centre, seed=30_000 + k),
                       lambda k: m.simulate(centre, seed=40_000 + k, **hold_at),
                       fit, hold, args.draws, args.seed, R)
    space = build_space("milano-like")
    H, W = real.shape[1:3]

    def preset_sim(k, days, start):
        return simulate_scenario(space, H, W, days=days, step=real.step, seed=50_000 + k, index=0, start=start,
                                 services=("net",), preset="milano-like")
    pre = family_check("milano-like",
                       lambda k: preset_sim(k, args.fit_days, int(fit.timestamps[0])),
                       lambda k: preset_sim(k, hold_days, int(hold.timestamps[0])),
                       fit, hold, args.draws, args.seed, R)
    ref = realism.compare(real.resample(3600), [real.resample(3600)], seed=args.seed)["services"]["net"]
    ref10 = realism.compare(real, [real], seed=args.seed)["services"]["net"]
    lines = [f"# Calibration on the shared Milano block: first {args.fit_days} days fitted, {hold_days:g} held out", "",
             f"Method {res.method} ({'pyabc ABC-SMC' if res.method == 'abc' else 'sbi NPE'}), {args.workers} worker "
             f"processes: {res.generations} generation(s), {res.simulations} simulations, **{wall:.0f} s** wall "
             f"(+ {t_check:.0f} s posterior-predictive check); population / posterior samples {args.population}, "
             f"{len(res.priors)} parameters, {len(res.observed)} statistics; effective sample size "
             f"{cb._ess(res.weights):.0f}.", "",
             f"Held-out MMD^2 of day windows against the {hold_days:g} held-out days, mean ± std over {R} "
             f"independent sets of {args.draws} simulations per family; for scale, the real block's own "
             f"first-half vs second-half MMD^2 over its 21 days: **{ref['mmd2_real_halves']:.4f} hourly**, "
             f"{ref10['mmd2_real_halves']:.4f} at 10 min.", "",
             "| family | MMD^2 10 min | MMD^2 hourly | held-out real halves 10 min / hourly |", "|---|---:|---:|---|"]
    for fam in (cal, med, pre):
        h, mu, sd = fam["holdout"], fam["mmd2_mean"], fam["mmd2_std"]
        lines.append(f"| {fam['name']} | {mu['mmd2']:.4f} ± {sd['mmd2']:.4f} | {mu['mmd2_1h']:.4f} ± {sd['mmd2_1h']:.4f} | "
                     f"{h['mmd2_real_halves']['net']:.4f} / {h['mmd2_real_halves_1h']['net']:.4f} |")
    lines += ["", f"Issue 13's statistics on the {args.fit_days} fitted days (Net, 10 min): real value and 90 % "
              f"predictive band of {args.draws} simulations.", "",
              "| statistic | real | calibrated 90 % band | inside | milano-like 90 % band | inside |",
              "|---|---:|---|---|---|---|"]
    for key, label in TABLE.items():
        c, p = cal["stats"][key], pre["stats"][key]
        lines.append(f"| {label} (`{key}`) | {c['real']:.3g} | {c['q05']:.3g} .. {c['q95']:.3g} | "
                     f"{'yes' if c['inside'] else '**no**'} | {p['q05']:.3g} .. {p['q95']:.3g} | "
                     f"{'yes' if p['inside'] else '**no**'} |")
    for fam in (cal, pre):
        n = sum(r["inside"] for r in fam["stats"].values())
        lines.append(f"\n{fam['name']}: {n} of {len(TABLE)} inside.")
    lines.append(f"\nAll {len(res.observed)} fitted statistics inside their band (calibration report): "
                 f"{check['inside_share']:.0%}.")
    text = "\n".join(lines) + "\n"
    (out / "block.md").write_text(text)
    (out / "block.json").write_text(json.dumps({"wall_s": wall, "generations": res.generations,
                                                "simulations": res.simulations, "calibrated": cal,
                                                "posterior_median": med, "milano_like": pre, "real_halves_1h": ref["mmd2_real_halves"],
                                                "real_halves_10min": ref10["mmd2_real_halves"]},
                                               indent=1, default=float))
    print(text)


def part_scarce(args) -> None:
    from simmstnet.data.windows import split_ranges
    from simmstnet.sim import calibrate as cb

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    real = load_block().resample(3600)
    L, H = 24, 6
    results, refs = {}, {}
    for d in [int(x) for x in args.days.split(",")]:
        lo, a = split_ranges(real, (0.6, 0.1, 0.3), L, H, train_days=d)["train"]
        kept = real.slice_time(int(real.timestamps[lo - L]), int(real.timestamps[a]))
        cal_dir = out / f"calibration-d{d}"
        if not (cal_dir / "params.yaml").exists():
            t0 = time.perf_counter()
            res = cb.calibrate(kept, preset="milano-like", params=fitted_params(args),
                               population=args.population, generations=args.generations,
                               max_minutes=args.max_minutes, workers=args.workers, seed=args.seed,
                               method=args.method, simulations=args.simulations,
                               db=out / f"abc-d{d}.db", log=lambda m: print(m, file=sys.stderr, flush=True))
            print(f"D={d}: calibrated on {kept.shape[0]} hourly steps in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)
            cb.write_outputs(res, cal_dir, cb.predictive_check(res, draws=args.draws, seed=args.seed))
        for family, extra in (("milano-like", []), ("calibrated", ["--source-config", str(cal_dir / "params.yaml")])):
            cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_sim2real_evidence.py"), "--targets", "real",
                   "--days", str(d), "--seeds", str(args.seeds), "--modes", args.modes, "--jobs", str(args.workers),
                   "--out", str(out / f"evidence-{family}-d{d}"), *extra]
            print(" ".join(cmd), file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True)
            rows = list(csv.DictReader(open(out / f"evidence-{family}-d{d}" / "results.csv")))
            refs.update({(d, r["mode"]): r["test_mae"] for r in rows if r["kind"] == "reference"})
            for r in rows:
                if r["mode"] in args.modes.split(",") and r["test_mae"]:
                    results.setdefault((d, r["mode"]), {}).setdefault(family, {})[int(r["seed"])] = float(r["test_mae"])
    lines = [f"# Scarce-data protocol: milano-like sources against sources from the calibration on the kept days",
             "", f"Test MAE on the real block (hourly, input 24, horizon 6), mean ± std over {args.seeds} seeds; "
             "paired = calibrated minus milano-like, per seed.", "",
             "| D | mode | milano-like | calibrated | paired difference | ratio |", "|---|---|---:|---:|---:|---:|"]
    for (d, mode), fam in sorted(results.items()):
        a, b = fam.get("milano-like", {}), fam.get("calibrated", {})
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        va, vb = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
        diff = vb - va
        lines.append(f"| {d} | {mode} | {va.mean():.2f} ± {va.std():.2f} | {vb.mean():.2f} ± {vb.std():.2f} | "
                     f"{diff.mean():+.2f} ± {diff.std():.2f} | {vb.mean() / va.mean():.3f} |")
    lines += ["", "Simple references on the same split (no simulated data; ridge fitted on the D kept days):", ""]
    lines += [f"- D={d} {mode}: test MAE {float(v):.2f}" if v else f"- D={d} {mode}: n/a"
              for (d, mode), v in sorted(refs.items())]
    text = "\n".join(lines) + "\n"
    (out / "comparison.md").write_text(text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("block", "scarce"), default="block")
    ap.add_argument("--fit-days", type=int, default=7)
    ap.add_argument("--days", default="3", help="scarce: data.train_days values")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--modes", default="off,mix,bilevel")
    ap.add_argument("--method", choices=("abc", "npe"), default="abc")
    ap.add_argument("--simulations", type=int, default=6000, help="npe: simulations from the prior")
    ap.add_argument("--params", default=None,
                    help="comma-separated parameters to fit (default: calibrate's compact set; 'full'; "
                         "'+a,b' adds a and b to the compact set)")
    ap.add_argument("--population", type=int, default=300)
    ap.add_argument("--generations", type=int, default=10)
    ap.add_argument("--max-minutes", type=float, default=12.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--draws", type=int, default=60)
    ap.add_argument("--mmd-repeats", type=int, default=5,
                    help="block: independent sets of --draws simulations for the held-out MMD^2 (mean ± std)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/cal-block")
    args = ap.parse_args()
    (part_block if args.part == "block" else part_scarce)(args)


if __name__ == "__main__":
    main()
