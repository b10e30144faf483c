"""``simmstnet data fetch milano|trento``: download the Telecom Italia files from Harvard Dataverse."""
from __future__ import annotations

import argparse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text}")
    return value


def register(sub) -> None:
    parser = sub.add_parser(
        "fetch", help="download the Telecom Italia data from Harvard Dataverse",
        description="Download the Telecom Italia Big Data Challenge daily files (and, for Trento, "
                    "the Trentino grid GeoJSON) from Harvard Dataverse into DEST/<city>/. "
                    "Downloads resume, are retried and are checked against the checksums "
                    "Dataverse reports. Data: Barlacchi et al., Scientific Data 2, 150055 (2015), "
                    "Open Database License (ODbL).")
    parser.add_argument("city", choices=("milano", "trento"), help="which city's data to fetch")
    parser.add_argument("--dest", metavar="DIR", default=None,
                        help="download folder (default: $SIMMSTNET_CACHE, else the user cache "
                             "folder, e.g. ~/.cache/simmstnet); files go to DIR/<city>/")
    parser.add_argument("--days", metavar="N", type=_positive_int, default=None,
                        help="fetch only the first N daily files (Milano files are ~300 MB each)")
    parser.add_argument("--server", metavar="URL", default=None,
                        help="Dataverse server (default: $SIMMSTNET_DATAVERSE_URL, else "
                             "https://dataverse.harvard.edu)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="do not check checksums (sizes are still checked)")
    parser.add_argument("--with-grid", action="store_true",
                        help="also fetch the Milano grid GeoJSON (always fetched for Trento)")
    parser.add_argument("--retries", metavar="N", type=_non_negative_int, default=5,
                        help="extra attempts per request after a network or checksum failure "
                             "(default 5)")
    parser.add_argument("--backoff", metavar="SECONDS", type=_non_negative_float, default=1.0,
                        help="first retry pause; doubles after each failure (default 1)")
    parser.add_argument("--timeout", metavar="SECONDS", type=_positive_float, default=60.0,
                        help="network timeout per request (default 60)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bars")
    parser.set_defaults(func=run)


def _size(path) -> str:
    n = float(path.stat().st_size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def run(args) -> int:
    import shlex

    from simmstnet.data.fetch import ATTRIBUTION, fetch_city

    with_grid = True if args.with_grid else None
    result = fetch_city(args.city, dest=args.dest, days=args.days, server=args.server,
                        retries=args.retries, backoff=args.backoff, progress=args.progress,
                        verify=args.verify, with_grid=with_grid, timeout=args.timeout)
    check = "verified" if args.verify else "size checked, checksum not verified"
    print(f"{result.city}: {len(result.downloaded)} downloaded, {len(result.skipped)} already "
          f"present, in {result.folder} ({check})")
    for label, paths in (("downloaded", result.downloaded), ("skipped", result.skipped)):
        for path in paths:
            print(f"  {label:<11}{path.name}  ({_size(path)})")
    if result.ignored:
        print(f"  not needed (no date in the name): {', '.join(result.ignored)}")
    if result.grid:
        print(f"grid: {', '.join(str(p) for p in result.grid)}")
    print(f"data: {ATTRIBUTION}")
    out = f"{result.city}.npz"
    # Name the grid explicitly: prepare's own look-up expects a *trentino*grid*.geojson name,
    # and the name Dataverse serves is not ours to promise.
    geo = [p for p in result.grid if p.name.lower().endswith(".geojson")]
    grid_arg = f" --grid {shlex.quote(str(geo[0]))}" if len(geo) == 1 else ""
    print("next: simmstnet data prepare --raw "
          f"{shlex.quote(str(result.folder))} --city {result.city} --out {out}{grid_arg}")
    return 0
