"""``simmstnet data prepare``: raw Telecom Italia daily files -> one TrafficGrid ``.npz``."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from simmstnet.errors import UserError

EPILOG = """\
examples:
  simmstnet data prepare --raw raw/milano --city milano --out milano-1h.npz
  simmstnet data prepare --raw raw/milano --city milano --out centre.npz --step 10min \\
      --rows 40:60 --cols 40:60 --services net --start 2013-11-01 --end 2013-11-22
  simmstnet data prepare --raw raw/trento --city trento --out trento.npz --grid trentino-grid.geojson

Data: Telecom Italia Big Data Challenge (Barlacchi et al., Scientific Data 2:150055, 2015), ODbL.
"""


def register(sub) -> None:
    parser = sub.add_parser(
        "prepare", help="aggregate raw Telecom Italia daily files into a TrafficGrid .npz",
        description="Aggregate raw Telecom Italia daily files (sms-call-internet-{mi,tn}-YYYY-MM-DD.txt, "
                    ".txt.gz or .zip) into one TrafficGrid .npz: country codes summed, in+out summed, "
                    "slots no square reports masked.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", required=True, metavar="DIR", help="folder of raw daily files")
    parser.add_argument("--city", required=True, metavar="CITY", help="milano or trento")
    parser.add_argument("--out", required=True, metavar="FILE.npz", help="output TrafficGrid file")
    parser.add_argument("--step", default="1h", help="output step: 10min, 20min, 30min or 1h (default 1h)")
    parser.add_argument("--rows", metavar="A:B", help="half-open raster row range, row 0 = south")
    parser.add_argument("--cols", metavar="C:D", help="half-open raster column range, col 0 = west")
    parser.add_argument("--services", default="call,sms,net", help="comma-separated subset of call,sms,net")
    parser.add_argument("--start", metavar="DATE", help="first local day (Europe/Rome), YYYY-MM-DD")
    parser.add_argument("--end", metavar="DATE", help="local day after the last one (exclusive), YYYY-MM-DD")
    parser.add_argument("--grid", metavar="GEOJSON",
                        help="grid GeoJSON mapping square ids to the raster (Trento default: the "
                             "*trentino*grid*.geojson file in DIR; Milano default: id = 100*row + col + 1)")
    parser.add_argument("--compress", action="store_true", help="write a compressed .npz (smaller, slower)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from simmstnet.data.telecom_italia import read_telecom_italia
    from simmstnet.utils import check_output_file

    out = Path(args.out)
    # Check the output name before hours of parsing, not after.
    if out.suffix != ".npz":
        raise UserError(f"--out {out}: a TrafficGrid file must end in .npz")
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out}: is a folder")
    check_output_file(out)
    raw = Path(args.raw)
    if not raw.exists():
        raise UserError(f"--raw {raw}: no such folder")
    if not raw.is_dir():
        raise UserError(f"--raw {raw}: not a folder")
    grid = read_telecom_italia(
        raw, args.city, step=args.step, rows=_span(args.rows, "--rows"), cols=_span(args.cols, "--cols"),
        services=args.services, start=args.start, end=args.end, grid_geojson=args.grid,
        progress=not args.quiet)
    grid.save(out, compress=args.compress)
    print(f"wrote {out}: {grid!r} from {len(grid.meta['raw_files'])} raw file(s)")
    return 0


def _span(text: str | None, flag: str) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m:
        raise UserError(f"{flag} {text!r}: use A:B (half-open, e.g. 40:60)")
    return int(m.group(1)), int(m.group(2))

