"""``simmstnet data info``: what is in a TrafficGrid ``.npz``."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np

from simmstnet.errors import UserError


def register(sub) -> None:
    parser = sub.add_parser("info", help="show shape, time span, missing share and statistics of a grid",
                            description="Show shape, services, time span, step, missing share, per-service "
                                        "statistics over observed values, and provenance of a TrafficGrid .npz.")
    parser.add_argument("file", metavar="FILE.npz", help="TrafficGrid file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run)


def grid_summary(grid) -> dict[str, Any]:
    """JSON-ready facts about a grid; statistics use observed values only."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from simmstnet.utils import format_step

    T, H, W, C = grid.shape
    tz = grid.timezone
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise UserError(f"meta timezone {tz!r} is not a known IANA time zone") from None
    first, last = int(grid.timestamps[0]), int(grid.timestamps[-1])
    step = grid.step

    def when(epoch: int, zone) -> str:
        return dt.datetime.fromtimestamp(epoch, tz=zone).isoformat(timespec="minutes")

    services = {}
    for c, name in enumerate(grid.services):
        m = grid.mask[..., c]
        obs = grid.values[..., c][m].astype(np.float64)
        entry: dict[str, Any] = {"missing_share": float(1.0 - m.mean()), "observed": int(obs.size)}
        if obs.size:
            entry.update(mean=float(obs.mean()), std=float(obs.std()), min=float(obs.min()),
                         median=float(np.median(obs)), p99=float(np.percentile(obs, 99)),
                         max=float(obs.max()))
        services[name] = entry
    summary = {
        "shape": {"T": T, "H": H, "W": W, "C": C},
        "services": list(grid.services),
        "step": format_step(step),
        "step_seconds": step,
        "timezone": tz,
        "start_local": when(first, zone), "end_local": when(last, zone),
        "start_utc": when(first, dt.timezone.utc), "end_utc": when(last, dt.timezone.utc),
        "days": T * step / 86400,
        "missing_share": grid.missing_share(),
        "statistics": services,
    }
    for key in ("source", "crop", "license", "citation", "city", "units"):
        if key in grid.meta:
            summary[key] = grid.meta[key]
    return summary


def run(args) -> int:
    from simmstnet.data.grid import TrafficGrid

    path = Path(args.file)
    grid = TrafficGrid.load(path)
    s = grid_summary(grid)
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=False))
        return 0
    shp = s["shape"]
    print(f"{path}")
    print(f"  shape     T={shp['T']} x H={shp['H']} x W={shp['W']} x C={shp['C']}")
    print(f"  services  {', '.join(s['services'])}")
    short = lambda iso: iso[:16].replace("T", " ")  # noqa: E731 - drop the offset for display
    print(f"  time      {short(s['start_local'])} .. {short(s['end_local'])} {s['timezone']}  "
          f"({short(s['start_utc'])} .. {short(s['end_utc'])} UTC; slot starts)")
    print(f"  step      {s['step']} ({s['days']:.2f} days)")
    miss = ", ".join(f"{n} {v['missing_share']:.2%}" for n, v in s["statistics"].items())
    print(f"  missing   {s['missing_share']:.2%} overall ({miss})")
    print("  statistics over observed values:")
    print(f"    {'service':<8}{'mean':>12}{'std':>12}{'min':>12}{'median':>12}{'p99':>12}{'max':>12}")
    for name, v in s["statistics"].items():
        if "mean" not in v:
            print(f"    {name:<8}{'(no observed value)':>36}")
            continue
        print(f"    {name:<8}" + "".join(f"{v[k]:>12.4g}" for k in ("mean", "std", "min", "median", "p99", "max")))
    for key in ("source", "city", "crop", "units", "license", "citation"):
        if key in s:
            value = s[key]
            if key == "crop" and isinstance(value, dict):
                value = f"rows {value['rows'][0]}:{value['rows'][1]}, cols {value['cols'][0]}:{value['cols'][1]} (half-open)"
            print(f"  {key:<9} {value}")
    return 0
