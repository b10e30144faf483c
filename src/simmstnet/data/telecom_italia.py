"""Reader for the raw Telecom Italia Big Data Challenge files (Milano and Trentino).

Data: Barlacchi et al., "A multi-source dataset of urban life in the city of Milan and the
Province of Trentino", Scientific Data 2, 150055 (2015), released under the ODbL.

Raw layout (one file per local day, ``sms-call-internet-mi-YYYY-MM-DD.txt`` or ``-tn-``;
``.txt.gz`` and ``.zip`` copies are read too): tab-separated, no header, eight columns
``square_id, time_interval, country_code, sms_in, sms_out, call_in, call_out, internet``.
``time_interval`` is the start of a 10-minute slot in epoch milliseconds (UTC); there is one
row per counterpart country code, and an activity that did not happen is an EMPTY field.

Aggregation rules (the usual ones in the literature):

* sum over country codes; ``call = call_in + call_out``, ``sms = sms_in + sms_out``,
  ``net = internet``; an empty field counts as 0 in these sums;
* a square with no row in a slot that other squares report had no activity: observed zero;
* a slot that no square reports at all is a gap in the data: masked for every cell;
* coarser steps sum the 10-minute slots; a coarse slot is observed only when all of its
  10-minute slots are (the rule of :meth:`TrafficGrid.resample`);
* raster positions that hold no square (Trentino's raster is larger than the province) are
  never observed.

Files are streamed in byte chunks parsed by pandas' C reader and summed with ``np.bincount``
straight into an accumulator at the output resolution, so memory is bounded by the output
grid plus one chunk, never by a whole file.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import io
import json
import os
import re
import sys
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd

from simmstnet.data.grid import SERVICES, TrafficGrid
from simmstnet.errors import UserError
from simmstnet.utils import format_step, parse_step

TIMEZONE = "Europe/Rome"
LICENSE = "ODbL-1.0"
CITATION = ("Barlacchi, G. et al. A multi-source dataset of urban life in the city of Milan and "
            "the Province of Trentino. Scientific Data 2, 150055 (2015). doi:10.1038/sdata.2015.55")
CITIES = {"milano": "mi", "trento": "tn"}
COLUMNS = ("square_id", "time_interval", "country_code", "sms_in", "sms_out", "call_in",
           "call_out", "internet")
# Value columns (as offsets into the five activity columns sms_in .. internet) summed per service.
SERVICE_COLUMNS = {"sms": (0, 1), "call": (2, 3), "net": (4,)}
RAW_STEP = 600  # seconds in one raw time slot
MILANO_SIDE = 100
CHUNK_BYTES = 16 << 20
_RAW_NAME = re.compile(r"^sms-call-internet-(mi|tn)-(\d{4}-\d{2}-\d{2})\.(txt|txt\.gz|zip|txt\.zip)$")
_DTYPES = {**{c: np.int64 for c in COLUMNS[:3]}, **{c: np.float64 for c in COLUMNS[3:]}}
_INT_FIELD = re.compile(rb"\s*[+-]?\d+\s*")
_FLOAT_FIELD = re.compile(rb"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")


# ---------------------------------------------------------------------------------- raster
@dataclasses.dataclass(frozen=True)
class Raster:
    """Where each square sits: ``ids``, ``rows``, ``cols`` are (N,) int arrays; row 0 is south,
    col 0 is west; ``H`` x ``W`` is the full raster (it may hold positions without a square)."""

    ids: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    H: int
    W: int
    source: str


def milano_raster() -> Raster:
    """The 100x100 Milano raster: square id = 100*row + col + 1."""
    ids = np.arange(1, MILANO_SIDE * MILANO_SIDE + 1, dtype=np.int64)
    return Raster(ids, (ids - 1) // MILANO_SIDE, (ids - 1) % MILANO_SIDE, MILANO_SIDE, MILANO_SIDE,
                  "formula: square_id = 100*row + col + 1")


def raster_from_geojson(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Place the squares of a grid GeoJSON (``properties.cellId`` + polygon) on a raster.

    Returns ``(ids, rows, cols, H, W)``: (N,) int64 arrays and the raster size, row 0 in the
    south and col 0 in the west. Positions come from the polygons only: the grid axes are the
    dominant edge directions (so a slightly rotated grid is fine), the cell size is the median
    polygon extent, and a quadratic fit from position to index absorbs the mild distortion of
    a projected grid stored in longitude/latitude. Raises UserError if the file is not a grid.
    """
    path = Path(path)
    ids, rings = _read_grid_polygons(path)
    points = np.concatenate(rings)
    # Local metric frame: longitude degrees shrink with cos(latitude).
    if np.all(np.abs(points[:, 0]) <= 180) and np.all(np.abs(points[:, 1]) <= 90):
        scale = np.array([np.cos(np.deg2rad(points[:, 1].mean())), 1.0])
    else:  # already projected (metres)
        scale = np.ones(2)
    rings = [ring * scale for ring in rings]
    # Grid orientation: edge angles folded modulo 90 degrees, averaged on the circle.
    edges = np.concatenate([np.roll(ring, -1, axis=0) - ring for ring in rings])
    angle = np.arctan2(edges[:, 1], edges[:, 0])
    length = np.hypot(edges[:, 0], edges[:, 1])
    theta = np.arctan2((length * np.sin(4 * angle)).sum(), (length * np.cos(4 * angle)).sum()) / 4
    rot = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    rings = [ring @ rot.T for ring in rings]  # u ~ east, v ~ north
    uv = np.array([ring.mean(0) for ring in rings])
    size = np.median([ring.max(0) - ring.min(0) for ring in rings], axis=0)
    if not np.all(size > 0):
        raise UserError(f"{path}: polygons have zero extent; not a grid of squares")
    idx = np.rint((uv - uv.min(0)) / size).astype(np.int64)
    # Refine: fit index as a quadratic function of position and round again until stable.
    z = (uv - uv.mean(0)) / size
    design = np.column_stack([np.ones(len(z)), z[:, 0], z[:, 1], z[:, 0] ** 2, z[:, 0] * z[:, 1], z[:, 1] ** 2])
    for _ in range(20):
        coef, *_ = np.linalg.lstsq(design, idx.astype(np.float64), rcond=None)
        fit = design @ coef
        new = np.rint(fit).astype(np.int64)
        if np.array_equal(new, idx):
            break
        idx = new
    worst = int(np.argmax(np.abs(fit - idx).max(1)))
    if np.abs(fit - idx).max() > 0.3:
        raise UserError(f"{path}: the polygons do not form a regular grid (cellId {ids[worst]} lies "
                        f"{np.abs(fit - idx)[worst].max():.2f} cells off the fitted lattice)")
    idx -= idx.min(0)
    cols, rows = idx[:, 0], idx[:, 1]
    W, H = int(cols.max()) + 1, int(rows.max()) + 1
    flat = rows * W + cols
    if np.unique(flat).size != flat.size:
        dup = flat[np.argsort(flat, kind="stable")]
        first = dup[np.argmax(np.diff(dup) == 0)]
        both = ids[flat == first]
        raise UserError(f"{path}: cellIds {both[0]} and {both[1]} fall on the same raster position")
    return ids, rows, cols, H, W


def _read_grid_polygons(path: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """(cellIds (N,), outer rings: N arrays (n_i, 2) without the closing point)."""
    if not path.is_file():
        raise UserError(f"{path}: no such grid GeoJSON file")
    try:
        with open(path, "rb") as fh:
            doc = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    features = doc.get("features") if isinstance(doc, dict) else None
    if not isinstance(features, list) or not features:
        raise UserError(f"{path}: not a GeoJSON FeatureCollection with features")
    ids, rings = [], []
    for k, feat in enumerate(features):
        try:
            cell = int(feat["properties"]["cellId"])
            geom = feat["geometry"]
            coords = geom["coordinates"]
            if geom["type"] == "MultiPolygon":
                coords = coords[0]
            ring = np.asarray(coords[0], dtype=np.float64)[:, :2]
        except (KeyError, TypeError, IndexError, ValueError):
            raise UserError(f"{path}: feature {k} lacks properties.cellId or a polygon geometry") from None
        if len(ring) > 1 and np.allclose(ring[0], ring[-1]):
            ring = ring[:-1]
        if len(ring) < 3 or not np.all(np.isfinite(ring)):
            raise UserError(f"{path}: feature {k} (cellId {cell}) has no valid polygon ring")
        ids.append(cell)
        rings.append(ring)
    ids_arr = np.asarray(ids, dtype=np.int64)
    if np.unique(ids_arr).size != ids_arr.size:
        raise UserError(f"{path}: duplicate cellId values")
    if ids_arr.min() < 0:
        raise UserError(f"{path}: negative cellId {ids_arr.min()}")
    return ids_arr, rings


def _load_raster(city: str, grid_geojson, search_dir: Path | None) -> Raster:
    if grid_geojson is None and city == "trento":
        found = sorted(p for p in (search_dir.iterdir() if search_dir and search_dir.is_dir() else [])
                       if p.is_file() and re.search(r"trent.*grid.*\.geojson$", p.name, re.I))
        if not found:
            raise UserError(f"Trento needs the Trentino grid GeoJSON (doi:10.7910/DVN/FZRVSX): pass --grid "
                            f"FILE or put trentino-grid.geojson in {search_dir}")
        if len(found) > 1:
            raise UserError(f"several grid files in {search_dir} ({', '.join(p.name for p in found)}); "
                            "choose one with --grid")
        grid_geojson = found[0]
    if grid_geojson is None:
        return milano_raster()
    ids, rows, cols, H, W = raster_from_geojson(grid_geojson)
    return Raster(ids, rows, cols, H, W, f"geojson: {Path(grid_geojson).name}")


# ---------------------------------------------------------------------------------- files
@dataclasses.dataclass(frozen=True)
class RawFile:
    path: Path
    day: dt.date | None  # the local day named in the file name, if any


def find_raw_files(directory: str | os.PathLike, city: str) -> list[RawFile]:
    """The raw daily files of ``city`` in ``directory``, sorted by day; UserError if none."""
    city = _check_city(city)
    directory = Path(directory)
    if not directory.exists():
        raise UserError(f"{directory}: no such folder")
    if not directory.is_dir():
        raise UserError(f"{directory}: not a folder (expected the folder of raw daily files)")
    code = CITIES[city]
    by_day: dict[dt.date, Path] = {}
    other = 0
    for p in directory.iterdir():
        m = _RAW_NAME.match(p.name)
        if not m or not p.is_file():
            continue
        if m.group(1) != code:
            other += 1
            continue
        day = _parse_date(m.group(2), p.name)
        if day in by_day:
            raise UserError(f"{directory}: {by_day[day].name} and {p.name} both hold {day}; keep one")
        by_day[day] = p
    if not by_day:
        hint = f" (it has {other} file(s) of the other city: check --city)" if other else ""
        raise UserError(f"{directory}: no raw files named sms-call-internet-{code}-YYYY-MM-DD.txt"
                        f"[.gz|.zip]{hint}")
    return [RawFile(by_day[d], d) for d in sorted(by_day)]


def _resolve_files(paths_or_dir, city: str) -> tuple[list[RawFile], Path | None]:
    if isinstance(paths_or_dir, (str, os.PathLike)) and Path(paths_or_dir).is_dir():
        return find_raw_files(paths_or_dir, city), Path(paths_or_dir)
    single = isinstance(paths_or_dir, (str, os.PathLike))
    paths = [paths_or_dir] if single else list(paths_or_dir)
    if not paths:
        raise UserError("no raw files given")
    files = []
    for p in map(Path, paths):
        if not p.is_file():
            raise UserError(f"{p}: no such {'folder or file' if single else 'file'}")
        m = _RAW_NAME.match(p.name)
        if m and m.group(1) != CITIES[city]:
            raise UserError(f"{p}: a file of the other city (-{m.group(1)}-), not of {city}")
        files.append(RawFile(p, _parse_date(m.group(2), p.name) if m else None))
    return files, files[0].path.parent


def _open_members(path: Path) -> Iterator[tuple[str, Callable, int]]:
    """Yield ``(label, opener, share)`` for each text stream in ``path``: ``opener()`` returns
    ``(binary stream, position)`` where ``position()`` is the share of the file's on-disk bytes
    consumed so far (for the progress bar) and ``share`` is that stream's part of the file size."""
    disk = path.stat().st_size
    name = path.name.lower()
    if name.endswith(".zip"):
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise UserError(f"{path}: cannot open zip archive ({exc})") from None
        with zf:
            members = [i for i in zf.infolist() if not i.is_dir() and i.filename.lower().endswith(".txt")
                       and not i.filename.startswith("__MACOSX")]
            if not members:
                raise UserError(f"{path}: the zip archive holds no .txt file")
            packed = sum(i.compress_size for i in members) or 1
            for i in members:
                share = disk * i.compress_size // packed

                def opener(i=i, share=share):
                    stream = zf.open(i)
                    return stream, lambda: share * stream.tell() // max(i.file_size, 1)

                yield f"{path}:{i.filename}", opener, share
    elif name.endswith(".gz"):
        def opener():
            stream = gzip.open(path, "rb")
            return stream, lambda: stream.fileobj.tell()

        yield str(path), opener, disk
    else:
        def opener():
            raw = open(path, "rb")
            return raw, raw.tell

        yield str(path), opener, disk


def _iter_chunks(stream, label: str, chunk_bytes: int) -> Iterator[tuple[bytes, int]]:
    """Yield (whole lines as bytes, number of their first line, 1-based) from ``stream``."""
    rest = b""
    line = 1
    while True:
        try:
            block = stream.read(chunk_bytes)
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
            raise UserError(f"{label}: cannot read ({exc})") from None
        if not block:
            break
        data = rest + block
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # a line longer than one chunk: keep reading
            rest = data
            continue
        rest = data[cut:]
        chunk = data[:cut]
        yield chunk, line
        line += chunk.count(b"\n")
    if rest.strip():
        yield rest, line


# ---------------------------------------------------------------------------------- parsing
def _parse_chunk(data: bytes, label: str, first_line: int):
    """Parse whole lines of raw text.

    Returns ``(square (n,) int64, time_ms (n,) int64, activity (n, 5) float64, line_of_row)``
    with empty activity fields as NaN; ``line_of_row(i)`` gives the file line of row ``i``.
    """
    n_lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    first_end = data.find(b"\n")
    head = data[: first_end if first_end >= 0 else len(data)]
    # Column count: pandas pads short rows with NaN silently and may take an over-long FIRST
    # row as an index, so check the first row and the total tab count; pandas itself rejects
    # any later row with too many fields.
    clean = head.count(b"\t") == 7 and data.count(b"\t") == 7 * n_lines
    lines = None
    if not clean:
        lines = _scan_lines(data, label, first_line)  # raises on a bad row; else blank lines exist
        if not lines.size:
            empty = np.zeros(0, np.int64)
            return empty, empty, np.zeros((0, 5)), lambda i: first_line
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(io.BytesIO(data), sep="\t", header=None, names=COLUMNS, dtype=_DTYPES,
                                engine="c", keep_default_na=False, na_values=[""], skip_blank_lines=True)
    except (ValueError, pd.errors.ParserError, pd.errors.ParserWarning) as exc:
        _scan_lines(data, label, first_line)  # a wrong field count that the tab total missed
        _diagnose_values(data, label, first_line)
        raise UserError(f"{label}: cannot parse lines {first_line}-{first_line + n_lines - 1} ({exc})") from None
    square = frame["square_id"].to_numpy()
    time_ms = frame["time_interval"].to_numpy()
    activity = frame[list(COLUMNS[3:])].to_numpy(dtype=np.float64)
    if lines is None:
        line_of_row = lambda i: first_line + int(i)  # noqa: E731
    else:
        line_of_row = lambda i: int(lines[i])  # noqa: E731
    return square, time_ms, activity, line_of_row


def _scan_lines(data: bytes, label: str, first_line: int) -> np.ndarray:
    """Line numbers of the non-blank lines; UserError at the first line without 8 fields."""
    numbers = []
    for k, raw in enumerate(data.split(b"\n")):
        row = raw.rstrip(b"\r")
        if not row:
            continue
        n = row.count(b"\t") + 1
        if n != len(COLUMNS):
            raise UserError(f"{label}:{first_line + k}: {n} tab-separated fields, expected {len(COLUMNS)} "
                            f"({', '.join(COLUMNS)})")
        numbers.append(first_line + k)
    return np.asarray(numbers, dtype=np.int64)


def _diagnose_values(data: bytes, label: str, first_line: int) -> None:
    """Find the field pandas could not read and raise a UserError naming its line and column."""
    for k, raw in enumerate(data.split(b"\n")):
        row = raw.rstrip(b"\r")
        if not row:
            continue
        for col, field in zip(COLUMNS, row.split(b"\t")):
            if col in COLUMNS[:3]:
                ok = _INT_FIELD.fullmatch(field) is not None
                want = "an integer"
            else:
                ok = field == b"" or _FLOAT_FIELD.fullmatch(field) is not None
                want = "a number or empty"
            if not ok:
                shown = field.decode("utf-8", "replace")[:40]
                raise UserError(f"{label}:{first_line + k}: {col} is {shown!r}, expected {want}")


# ---------------------------------------------------------------------------------- accumulation
class _Accumulator:
    """Sums of each service per (output slot, cell), and which raw slots were reported.

    ``values`` (T, N, C) float32 at the output step; ``reported`` (T * k,) bool over raw
    10-minute slots, k = step / 600. Slot numbers are absolute (epoch seconds // step). The
    span starts as ``span`` and grows when data arrive outside it; rows outside ``bounds``
    (a date range, either side may be None) are dropped.
    """

    def __init__(self, step: int, n_cells: int, n_services: int, span: tuple[int, int] | None,
                 bounds: tuple[int | None, int | None]):
        self.step, self.k = step, step // RAW_STEP
        self.n_cells, self.n_services = n_cells, n_services
        self.bounds = bounds
        lo, hi = span if span else (0, 0)
        self.first = lo
        self.values = np.zeros((hi - lo, n_cells, n_services), np.float32)
        self.reported = np.zeros((hi - lo) * self.k, bool)

    @property
    def n_slots(self) -> int:
        return self.values.shape[0]

    def _grow(self, lo: int, hi: int) -> None:
        if self.n_slots:
            lo, hi = min(lo, self.first), max(hi, self.first + self.n_slots)
        before = self.first - lo if self.n_slots else 0
        values = np.zeros((hi - lo, self.n_cells, self.n_services), np.float32)
        reported = np.zeros((hi - lo) * self.k, bool)
        values[before: before + self.n_slots] = self.values
        reported[before * self.k: (before + self.n_slots) * self.k] = self.reported
        self.first, self.values, self.reported = lo, values, reported

    def add(self, seconds: np.ndarray, cell: np.ndarray, weights: Sequence[np.ndarray]) -> None:
        """Add one chunk: ``seconds`` (n,) slot starts, ``cell`` (n,) flat cell index or -1 for
        rows outside the crop (they still mark their slot reported), ``weights`` C arrays (n,)."""
        slot = seconds // self.step
        if self.bounds != (None, None):
            keep = np.ones(slot.shape, bool)
            if self.bounds[0] is not None:
                keep &= slot >= self.bounds[0]
            if self.bounds[1] is not None:
                keep &= slot < self.bounds[1]
            if not keep.all():
                seconds, slot, cell = seconds[keep], slot[keep], cell[keep]
                weights = [w[keep] for w in weights]
        if not slot.size:
            return
        lo, hi = int(slot.min()), int(slot.max()) + 1
        if not self.n_slots or lo < self.first or hi > self.first + self.n_slots:
            self._grow(lo, hi)
        self.reported[seconds // RAW_STEP - self.first * self.k] = True
        inside = cell >= 0
        if not inside.all():
            slot, cell = slot[inside], cell[inside]
            weights = [w[inside] for w in weights]
        if not slot.size:
            return
        index = (slot - self.first) * self.n_cells + cell
        lo, hi = int(index.min()), int(index.max()) + 1
        flat = self.values.reshape(-1, self.n_services)
        for c, w in enumerate(weights):
            # bincount over the chunk's index range is much faster than np.add.at; a range far
            # wider than the chunk (rows scattered over many days) falls back to add.at.
            if hi - lo <= max(4 * index.size, 1 << 20):
                flat[lo:hi, c] += np.bincount(index - lo, weights=w, minlength=hi - lo)
            else:
                np.add.at(flat[:, c], index, w)


# ---------------------------------------------------------------------------------- public API
def read_telecom_italia(paths_or_dir, city: str, step: int | str = 3600,
                        rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None,
                        services: Sequence[str] = ("call", "sms", "net"),
                        start: str | dt.date | None = None, end: str | dt.date | None = None,
                        grid_geojson: str | os.PathLike | None = None, progress: bool = False,
                        chunk_bytes: int = CHUNK_BYTES) -> TrafficGrid:
    """Aggregate raw Telecom Italia daily files into a TrafficGrid.

    Args:
        paths_or_dir: the folder of raw daily files, or a list of files (``.txt``, ``.txt.gz``,
            ``.zip``).
        city: ``"milano"`` or ``"trento"``.
        step: output step, ``600`` (10min), ``1200``, ``1800`` or ``3600`` (1h) seconds, or text
            such as ``"1h"``.
        rows, cols: half-open crop ``(a, b)`` in raster coordinates (row 0 south, col 0 west).
        services: subset of ``("call", "sms", "net")`` in the order wanted.
        start, end: local dates (Europe/Rome), ``start`` inclusive, ``end`` exclusive.
        grid_geojson: grid GeoJSON placing square ids on the raster (Trento default: a
            ``*trentino*grid*.geojson`` file beside the raw files; Milano default: the formula
            id = 100*row + col + 1).

    Returns:
        TrafficGrid with values/mask (T, H', W', C) for the crop, timestamps (T,) epoch seconds
        UTC on a regular ``step`` covering the requested (or available) span; slots with no
        data are masked.
    """
    city = _check_city(city)
    services = _check_services(services)
    step = _check_step(step)
    first_day, end_day = _date_range(start, end)
    files, search_dir = _resolve_files(paths_or_dir, city)
    raster = _load_raster(city, grid_geojson, search_dir)
    a, b = _check_crop(rows, raster.H, "rows", raster)
    c, d = _check_crop(cols, raster.W, "cols", raster)
    # A file named for a local day holds that day's slots, so files outside the range are skipped.
    files = [f for f in files if f.day is None or ((first_day is None or f.day >= first_day)
                                                   and (end_day is None or f.day < end_day))]
    if not files:
        raise UserError(f"no raw file {_describe_range(start, end)}")

    # Square id -> flat index in the crop; -1 outside the crop, -2 not a square of this city.
    lut = np.full(int(raster.ids.max()) + 1, -2, np.int64)
    inside = (raster.rows >= a) & (raster.rows < b) & (raster.cols >= c) & (raster.cols < d)
    lut[raster.ids] = -1
    lut[raster.ids[inside]] = (raster.rows[inside] - a) * (d - c) + (raster.cols[inside] - c)
    exists = np.zeros((b - a) * (d - c), bool)
    exists[lut[lut >= 0]] = True

    # The output covers the requested days, else the days the files are named for (in slots of
    # `step`, aligned on epoch multiples; Rome's offset is whole hours so local days align).
    days = [f.day for f in files if f.day is not None]
    lo_day = first_day or (min(days) if days else None)
    hi_day = end_day or (max(days) + dt.timedelta(days=1) if days else None)
    ceil_slot = lambda day: -(-_local_midnight(day) // step)  # noqa: E731
    span = (ceil_slot(lo_day), ceil_slot(hi_day)) if lo_day and hi_day else None
    bounds = (ceil_slot(first_day) if first_day else None, ceil_slot(end_day) if end_day else None)
    acc = _Accumulator(step, exists.size, len(services), span, bounds)
    columns = [SERVICE_COLUMNS[s] for s in services]

    bar = _progress_bar(sum(f.path.stat().st_size for f in files), progress)
    try:
        for f in files:
            bar.set_postfix_str(f.path.name, refresh=False)
            window = _plausible_times(f.day)
            for label, opener, share in _open_members(f.path):
                stream, position = opener()
                with stream:
                    done = 0
                    for data, first_line in _iter_chunks(stream, label, chunk_bytes):
                        _add_chunk(acc, data, label, first_line, lut, columns, window)
                        now = min(position(), share)
                        bar.update(now - done)
                        done = now
                    bar.update(share - done)
    except BaseException:
        bar.leave = False  # clear the bar so that the error stays the only line on stderr
        bar.close()
        raise
    bar.close()

    if not acc.reported.any():
        raise UserError(f"no data {_describe_range(start, end)} in {len(files)} raw file(s)")
    slot_observed = acc.reported.reshape(-1, acc.k).all(1)
    T, C = acc.n_slots, len(services)
    H, W = b - a, d - c
    mask = np.repeat((slot_observed[:, None, None] & exists.reshape(1, H, W))[..., None], C, axis=-1)
    meta = {
        "source": "telecom-italia",
        "city": city,
        "step": format_step(step),
        "timezone": TIMEZONE,
        "crop": {"rows": [a, b], "cols": [c, d]},
        "raster": {"H": raster.H, "W": raster.W, "mapping": raster.source},
        "license": LICENSE,
        "citation": CITATION,
        "raw_files": [f.path.name for f in files],
        "units": "raw (undisclosed unit rescaled by the operator)",
    }
    timestamps = (acc.first + np.arange(T, dtype=np.int64)) * step
    return TrafficGrid(acc.values.reshape(T, H, W, C), mask, timestamps, services, meta)


def _add_chunk(acc: _Accumulator, data: bytes, label: str, first_line: int, lut: np.ndarray,
               columns: list[tuple[int, ...]], window: tuple[int, int, str]) -> None:
    square, time_ms, activity, line_of_row = _parse_chunk(data, label, first_line)
    if not square.size:
        return
    bad = (square < 0) | (square >= lut.size)
    bad[~bad] = lut[square[~bad]] == -2
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(f"{label}:{line_of_row(i)}: square_id {square[i]} is not a square of this city's "
                        f"grid (ids {int(np.flatnonzero(lut != -2).min())}..{lut.size - 1})")
    off = time_ms % (RAW_STEP * 1000) != 0
    if off.any():
        i = int(np.argmax(off))
        raise UserError(f"{label}:{line_of_row(i)}: time_interval {time_ms[i]} is not the start of a "
                        "10-minute slot in epoch milliseconds")
    # A wild timestamp would stretch the output over years (and memory with it): refuse it.
    far = (time_ms < window[0]) | (time_ms >= window[1])
    if far.any():
        i = int(np.argmax(far))
        when = (dt.datetime.fromtimestamp(time_ms[i] / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
                if abs(time_ms[i]) < 1e15 else "?")
        raise UserError(f"{label}:{line_of_row(i)}: time_interval {time_ms[i]} ({when}) is {window[2]}")
    wrong = np.isinf(activity) | (activity < 0)
    if wrong.any():
        i, j = np.argwhere(wrong)[0]
        raise UserError(f"{label}:{line_of_row(i)}: {COLUMNS[3 + j]} is {activity[i, j]}, expected a "
                        "finite non-negative number")
    np.nan_to_num(activity, copy=False)  # empty field = no activity
    weights = [activity[:, cs].sum(1) if len(cs) > 1 else activity[:, cs[0]] for cs in columns]
    acc.add(time_ms // 1000, lut[square], weights)


def _plausible_times(day: dt.date | None) -> tuple[int, int, str]:
    """Epoch-ms window a file's rows must fall in: its named local day give or take one day
    (the shared excerpt of a real file holds exactly its local day), else 2000..2100."""
    if day is None:
        return (946684800_000, 4102444800_000, "outside the years 2000-2099")
    lo = _local_midnight(day - dt.timedelta(days=1)) * 1000
    hi = _local_midnight(day + dt.timedelta(days=2)) * 1000
    return lo, hi, f"more than a day away from the file's date {day}"


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare",
                file=sys.stderr, disable=not enabled, dynamic_ncols=True)


# ---------------------------------------------------------------------------------- checks
def _check_city(city: str) -> str:
    name = str(city).lower()
    if name not in CITIES:
        raise UserError(f"unknown city {city!r}; choose one of: {', '.join(CITIES)}")
    return name


def _check_services(services) -> tuple[str, ...]:
    if isinstance(services, str):
        services = [s.strip() for s in services.split(",")]
    services = tuple(services)
    if not services or any(not s for s in services):
        raise UserError(f"empty service list; choose from: {', '.join(SERVICES)}")
    for s in services:
        if s not in SERVICES:
            raise UserError(f"unknown service {s!r}; choose from: {', '.join(SERVICES)}")
    if len(set(services)) != len(services):
        raise UserError(f"service listed twice in {','.join(services)}")
    return services


def _check_step(step) -> int:
    seconds = parse_step(step)
    if seconds % RAW_STEP or 3600 % seconds:
        raise UserError(f"step {format_step(seconds)} not supported: use 10min, 20min, 30min or 1h "
                        "(a multiple of the raw 10 minutes that divides an hour)")
    return seconds


def _check_crop(span, size: int, axis: str, raster: Raster) -> tuple[int, int]:
    if span is None:
        return 0, size
    lo, hi = (int(x) for x in span)
    if not (0 <= lo < hi <= size):
        raise UserError(f"crop {axis} {lo}:{hi} outside the {raster.H}x{raster.W} raster "
                        f"(need 0 <= A < B <= {size})")
    return lo, hi


def _parse_date(text, where: str) -> dt.date:
    if isinstance(text, dt.datetime):
        return text.date()
    if isinstance(text, dt.date):
        return text
    try:
        return dt.date.fromisoformat(str(text))
    except ValueError:
        raise UserError(f"{where}: cannot read date {text!r}; use YYYY-MM-DD") from None


def _local_midnight(day: dt.date) -> int:
    from zoneinfo import ZoneInfo

    return int(dt.datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(TIMEZONE)).timestamp())


def _date_range(start, end) -> tuple[dt.date | None, dt.date | None]:
    s = _parse_date(start, "--start") if start is not None else None
    e = _parse_date(end, "--end") if end is not None else None
    if s and e and e <= s:
        raise UserError(f"--end {e} must come after --start {s} (end is exclusive)")
    return s, e


def _describe_range(start, end) -> str:
    if start is None and end is None:
        return "in the given files"
    return f"from {start or 'the first day'} up to {end or 'the last day'} (local dates, end exclusive)"
