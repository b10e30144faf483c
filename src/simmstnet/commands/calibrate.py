"""``simmstnet calibrate``: fit the simulator to a real city from a few of its days."""
from __future__ import annotations

import os
import sys

from simmstnet.errors import UserError


def register(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="fit the simulator's parameters to a real grid (simulation-based inference)",
        description="Infer the simulator's parameter posterior for a real city by simulation-based "
                    "inference (sbi neural posterior estimation or pyabc ABC-SMC) on scale-free summary statistics of its first days. "
                    "Writes params.yaml (read by `simmstnet simulate --config`), report.md/json "
                    "(posterior per parameter, posterior-predictive check per statistic, held-out "
                    "check on the days after the fitted ones), posterior.csv and, with --method abc, abc.db.")
    p.add_argument("--real", required=True, help="real TrafficGrid .npz (e.g. from `simmstnet data import`)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preset", default="milano-like", help="preset the prior is built around (default milano-like)")
    p.add_argument("--config", default=None, help="YAML overriding preset ranges before the prior is built")
    p.add_argument("--days", type=float, default=None,
                   help="fit on the first DAYS days only (default: all); later days are the held-out check")
    p.add_argument("--params", default=None,
                   help="comma-separated parameters to fit, or `full` for the larger set (default: a "
                        "compact set for the grid's services; see docs/calibration.md)")
    p.add_argument("--widen", type=float, default=0.5,
                   help="prior = preset range widened by WIDEN x its width on each side (default 0.5)")
    p.add_argument("--method", choices=("abc", "npe"), default=None,
                   help="npe (default): sbi neural posterior estimation; abc: pyabc ABC-SMC "
                        "(docs/calibration.md says why npe is the default)")
    p.add_argument("--simulations", type=int, default=6000,
                   help="npe: simulations from the prior to train on (default 6000)")
    p.add_argument("--population", type=int, default=200,
                   help="abc: particles per generation; npe: posterior samples kept (default 200)")
    p.add_argument("--generations", type=int, default=8, help="abc: at most this many generations (default 8)")
    p.add_argument("--max-minutes", type=float, default=12.0,
                   help="stop sampling after this many minutes (default 12)")
    p.add_argument("--min-acceptance", type=float, default=0.02,
                   help="abc: stop when a generation accepts fewer than this share (default 0.02)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel simulation processes (default: every core)")
    p.add_argument("--dask", default=None, metavar="ADDRESS",
                   help="run the simulations on this Dask scheduler (e.g. tcp://host:8786) instead")
    p.add_argument("--ppc", type=int, default=40, help="posterior-predictive draws for the report (default 40)")
    p.add_argument("--seed", type=int, default=0, help="random seed (reproducible with --workers 1 only)")
    p.set_defaults(func=run_calibrate)


def run_calibrate(args) -> int:
    from pathlib import Path

    from simmstnet.data.grid import TrafficGrid
    from simmstnet.sim.calibrate import DEFAULT_METHOD, calibrate, predictive_check, split_days, write_outputs
    from simmstnet.utils import check_output_folder

    if args.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {args.seed}")
    if args.ppc < 2:
        raise UserError(f"--ppc must be at least 2, got {args.ppc}")
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    check_output_folder(args.out, "--out")
    real = TrafficGrid.load(args.real)
    params = [s.strip() for s in args.params.split(",") if s.strip()] if args.params else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    res = calibrate(real, preset=args.preset, days=args.days, params=params, widen=args.widen,
                    population=args.population, generations=args.generations,
                    max_minutes=args.max_minutes, min_acceptance=args.min_acceptance, workers=workers,
                    dask=args.dask, seed=args.seed, db=out / "abc.db", config=args.config, log=log,
                    method=args.method or DEFAULT_METHOD, simulations=args.simulations)
    _, holdout = split_days(real, args.days)
    if holdout is not None:
        holdout = holdout.select_services(list(res.model.services))
    log(f"posterior-predictive check: {args.ppc} draws" + (" (and the held-out days)" if holdout is not None else ""))
    check = predictive_check(res, draws=args.ppc, seed=args.seed, holdout=holdout)
    for path in write_outputs(res, out, check):
        print(f"wrote {path}")
    print(f"inside the 90 % predictive band: {check['inside_share']:.0%} of {len(check['stats'])} statistics")
    if "holdout" in check:
        h = check["holdout"]
        print("held-out MMD^2: " + ", ".join(f"{s} {v:.4f} (real halves {h['mmd2_real_halves'][s]:.4f})"
                                          for s, v in h["mmd2"].items()))
    print(f"next: simmstnet simulate --config {out / 'params.yaml'} --scenarios 16 --rows R --cols C --out SRC")
    return 0
