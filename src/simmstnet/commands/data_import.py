"""``simmstnet data import``: a generic wide or long CSV -> one TrafficGrid ``.npz``."""
from __future__ import annotations

import argparse
from pathlib import Path

from simmstnet.errors import UserError

EPILOG = """\
layouts:
  wide  one row per time step, one column per cell in row-major order (column k = cell
        k // W, k % W), one service; timestamps from --start and --step
  long  header timestamp,row,col,service,value; timestamps ISO 8601 with offset, naive local
        time of --tz, or epoch seconds; grid size and step inferred unless given
  Empty fields and NaN are unobserved (masked), not zero.

examples:
  simmstnet data import --csv block.csv --layout wide --grid 5x5 --service net \\
      --start "2013-11-01 00:00" --tz Europe/Rome --step 10min --origin 41,41 --out block.npz
  simmstnet data import --csv traffic.csv --layout long --tz Europe/Rome --out traffic.npz
"""


def register(sub) -> None:
    parser = sub.add_parser(
        "import", help="import a generic wide or long CSV into a TrafficGrid .npz",
        description="Import a generic wide or long CSV table of gridded traffic into a TrafficGrid .npz.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", required=True, metavar="FILE", help="input CSV file")
    parser.add_argument("--layout", required=True, choices=("wide", "long"), help="table layout (see below)")
    parser.add_argument("--out", required=True, metavar="FILE.npz", help="output TrafficGrid file")
    parser.add_argument("--grid", metavar="HxW", help="grid size (required for wide; long: default inferred)")
    parser.add_argument("--service", metavar="NAME", help="wide: the file's service (call, sms or net)")
    parser.add_argument("--start", metavar="TIME",
                        help="wide: time of the first row, 'YYYY-MM-DD HH:MM' in --tz, ISO 8601 with offset, "
                             "or epoch seconds")
    parser.add_argument("--tz", metavar="ZONE",
                        help="IANA time zone of local times, recorded as the grid's timezone (default UTC); "
                             "give it even when timestamps carry offsets: calendar features use it")
    parser.add_argument("--step", metavar="STEP", help="time step, e.g. 10min or 1h (wide: required; "
                                                       "long: default inferred)")
    parser.add_argument("--header", action="store_true", help="wide: the first line is a header")
    parser.add_argument("--origin", metavar="ROW,COL",
                        help="where the block's top-left cell sits in a larger raster (meta crop)")
    parser.add_argument("--delimiter", default=",", metavar="CHAR", help="field separator (default ',')")
    parser.add_argument("--source", metavar="TEXT", help="meta source (default 'csv')")
    parser.add_argument("--license", metavar="TEXT", help="meta license of the data, e.g. ODbL-1.0")
    parser.add_argument("--compress", action="store_true", help="write a compressed .npz")
    parser.set_defaults(func=run)


def run(args) -> int:
    from simmstnet.data.importers import import_long_csv, import_wide_csv
    from simmstnet.utils import check_output_file

    out = Path(args.out)
    if out.suffix != ".npz":
        raise UserError(f"--out {out}: a TrafficGrid file must end in .npz")
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder")
    check_output_file(out)
    if len(args.delimiter) != 1:
        raise UserError(f"--delimiter {args.delimiter!r}: give one character")
    meta = {k: v for k, v in (("source", args.source), ("license", args.license)) if v}
    if args.layout == "wide":
        for flag, value in (("--grid", args.grid), ("--service", args.service), ("--start", args.start),
                            ("--step", args.step)):
            if value is None:
                raise UserError(f"{flag} is required with --layout wide")
        grid = import_wide_csv(args.csv, grid=args.grid, service=args.service, start=args.start,
                               tz=args.tz or "UTC", step=args.step, header=args.header,
                               origin=args.origin, sep=args.delimiter, meta=meta)
    else:
        for flag, value in (("--service", args.service), ("--start", args.start)):
            if value is not None:
                raise UserError(f"{flag} is not used with --layout long (the file has a "
                                f"{flag.lstrip('-')} column)" if flag == "--service" else
                                f"{flag} is not used with --layout long (timestamps come from the file)")
        if args.header:
            raise UserError("--header is not used with --layout long (its header is required)")
        grid = import_long_csv(args.csv, tz=args.tz, grid=args.grid, step=args.step, sep=args.delimiter,
                               origin=args.origin, meta=meta)
    grid.save(out, compress=args.compress)
    print(f"wrote {out}: {grid!r}")
    return 0
