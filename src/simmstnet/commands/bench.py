"""``simmstnet bench table1|table2|table3|fig2``: the paper's tables and Figure 2, side by side.

See :mod:`simmstnet.eval.benchmark` for what each table holds and docs/benchmarks.md for the
protocol and how to rerun.
"""
from __future__ import annotations

from simmstnet.errors import UserError


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="run the paper's tables (table1, table2, table3) and Figure 2 (fig2)",
        description="Train and evaluate every method of a table on the same data, split and seeds; write "
                    "OUT/<table>/<table>.md and .csv (mean ± std over seeds, protocol above the table) and "
                    "one run folder per method and seed (reused when finished, resumed when interrupted).")
    p.add_argument("tables", nargs="+", metavar="TABLE", help="table1, table2, table3 and/or fig2")
    p.add_argument("--data", required=True, help="target TrafficGrid .npz (table1 needs net; the others call, sms, net)")
    p.add_argument("--sim", default=None, help="simulated source (.npz or folder) for table1's sim2real row")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds 0..N-1 (default 3)")
    p.add_argument("--profile", default="quick",
                   help="quick (2 CPU cores, < 30 min), full (GPU, paper-like sizes), test, or a YAML file")
    p.add_argument("--out", required=True, help="bench folder")
    p.add_argument("--methods", default=None,
                   help="comma-separated method keys to run (default: every method of each table)")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="experiment key for every run, after the profile (e.g. data.step=1h); repeatable")
    p.add_argument("--cell", default=None, metavar="ROW,COL", help="fig2: the cell to plot (default: busiest net cell)")
    p.add_argument("--verbose", action="store_true", help="show the trainer's progress bars and epoch lines")
    p.set_defaults(func=run)


def _cell(text: str | None):
    if text is None:
        return None
    try:
        r, c = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--cell must be ROW,COL (two integers), got {text!r}") from None
    return r, c


def run(args) -> int:
    from simmstnet.eval.benchmark import run_bench

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    results = run_bench(args.tables, args.data, args.out, args.seeds, args.profile, sim=args.sim,
                        methods=methods, extra=args.extra, verbose=args.verbose, cell=_cell(args.cell))
    for res in results:
        if "markdown" in res:
            print(res["markdown"])
        else:
            print("\n".join(str(p) for p in res["paths"]))
    return 0
