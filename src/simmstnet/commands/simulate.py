"""``simmstnet simulate`` (randomized city traffic) and ``simmstnet sim-check`` (realism report)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from simmstnet.errors import UserError


def register(sub) -> None:
    p = sub.add_parser(
        "simulate", help="simulate Call/SMS/Net traffic grids for randomized cities",
        description="Simulate Call, SMS and Net traffic grids for randomized cities (domain "
                    "randomization). One scenario is written as a TrafficGrid .npz; several as a "
                    "folder of .npz files plus index.json.")
    p.add_argument("--preset", default="milano-like", help="milano-like, trento-like or random")
    p.add_argument("--rows", type=int, default=20, help="grid rows (default 20)")
    p.add_argument("--cols", type=int, default=20, help="grid columns (default 20)")
    p.add_argument("--days", type=float, default=30, help="days to simulate (default 30)")
    p.add_argument("--step", default="1h", help="time step, e.g. 1h or 10min (default 1h)")
    p.add_argument("--scenarios", type=int, default=1, help="number of cities (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", required=True, help="output .npz (one scenario) or folder (several)")
    p.add_argument("--config", default=None, help="YAML file overriding parameter ranges")
    p.add_argument("--shift", type=float, default=0.0,
                   help="draw parameters OUTSIDE the ranges, up to SHIFT x each range's width "
                        "(a target city unlike the sources; default 0 = inside)")
    p.add_argument("--start", default="2013-11-01", help="first local day, Europe/Rome (default 2013-11-01)")
    p.add_argument("--services", default="call,sms,net", help="comma-separated services (default call,sms,net)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes for several scenarios")
    p.add_argument("--plot", default=None, metavar="DIR", help="save maps and profiles of the first scenario")
    p.set_defaults(func=run_simulate)

    c = sub.add_parser(
        "sim-check", help="compare simulated and real traffic statistics",
        description="Print real and simulated statistics side by side per service (daily profile, "
                    "weekend ratio, autocorrelation, spatial correlation, CV, quantiles) and the "
                    "MMD^2 of day windows. Grids may differ in size and step.")
    c.add_argument("--real", required=True, help="real TrafficGrid .npz")
    c.add_argument("--sim", required=True, help="simulated TrafficGrid .npz or scenario folder")
    c.add_argument("--services", default=None, help="comma-separated services (default: all common)")
    c.add_argument("--sim-crop", default=None, metavar="R0:R1,C0:C1",
                   help="compare only this half-open block of each simulated grid (e.g. the centre)")
    c.add_argument("--plot", default=None, metavar="DIR", help="save one PNG per service here")
    c.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    c.add_argument("--seed", type=int, default=0, help="seed for pair and window sampling")
    c.set_defaults(func=run_check)


def _services(text: str | None):
    if text is None:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise UserError("--services: give at least one service name")
    return names


def _parse_crop(text: str):
    try:
        r, c = text.split(",")
        (r0, r1), (c0, c1) = (tuple(int(v) for v in part.split(":")) for part in (r, c))
    except ValueError:
        raise UserError(f"--sim-crop: expected R0:R1,C0:C1 (e.g. 6:14,6:14), got {text!r}") from None
    return (r0, r1), (c0, c1)


def run_simulate(args) -> int:
    from simmstnet.sim.simulator import simulate_to_path
    from simmstnet.utils import check_output_file, check_output_folder, parse_step

    if args.seed < 0:  # numpy's SeedSequence takes non-negative integers only
        raise UserError(f"--seed must be 0 or more, got {args.seed}")
    # Where the result goes is checked before minutes of simulation, not after.
    if args.scenarios == 1:
        check_output_file(args.out)
    else:
        check_output_folder(args.out, "--out")
    out = simulate_to_path(args.out, preset=args.preset, rows=args.rows, cols=args.cols, days=args.days,
                           step=parse_step(args.step), scenarios=args.scenarios, seed=args.seed,
                           config=args.config, start=args.start, workers=args.workers, shift=args.shift,
                           services=_services(args.services), progress=True)
    print(f"wrote {out}")
    if args.plot:
        from simmstnet.sim.plots import plot_scenario
        from simmstnet.sim.simulator import load_sim_data, sim_data_files

        first = sim_data_files(out)[0]
        for path in plot_scenario(load_sim_data(first)[0], args.plot):
            print(f"wrote {path}")
    return 0


def run_check(args) -> int:
    from simmstnet.data.grid import TrafficGrid
    from simmstnet.sim.realism import compare, format_report, plot_report, report_json
    from simmstnet.sim.simulator import load_sim_data
    from simmstnet.utils import atomic_path

    real = TrafficGrid.load(args.real)
    sims = load_sim_data(args.sim)
    if args.sim_crop:
        rows, cols = _parse_crop(args.sim_crop)
        sims = [g.crop(rows, cols) for g in sims]
    report = compare(real, sims, services=_services(args.services), seed=args.seed)
    sys.stdout.write(format_report(report) + "\n")
    if args.plot:
        for path in plot_report(report, args.plot):
            print(f"wrote {path}")
    if args.json:
        with atomic_path(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(report_json(report), indent=1, default=float))
        print(f"wrote {args.json}")
    return 0
