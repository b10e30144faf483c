"""Generic CSV importers: any gridded traffic table -> TrafficGrid.

Two layouts:

wide
    One row per time step, one column per cell in row-major order (column k is cell
    ``(k // W, k % W)``), one service per file. Timestamps are not in the file: the first row is
    ``start`` (local time of ``tz``) and each row is ``step`` later (in absolute time, so a DST
    change does not shift the series). An empty field or NaN is unobserved (mask False), never 0.

long
    A header with the columns ``timestamp,row,col,service,value`` (any order, extra columns
    ignored), one row per observation. Timestamps are ISO 8601 with a UTC offset, naive local
    time of ``tz``, or integer epoch seconds. The grid size is ``max(row) + 1 x max(col) + 1``
    unless given; the step is inferred from the distinct timestamps (it must be regular: every
    gap a multiple of the smallest, missing steps become unobserved slots) unless given. A
    (timestamp, cell, service) with no row, or with an empty/NaN value, is unobserved.

Every problem is a :class:`UserError` naming the file and the 1-based line (as an editor shows
it) or the field; pandas does the fast parsing, the checks are ours.
"""
from __future__ import annotations

import datetime as dt
import io
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from simmstnet.data.grid import SERVICES, TrafficGrid
from simmstnet.errors import UserError
from simmstnet.utils import check_epoch, check_memory, format_step, parse_step, time_range_problem

# Text that means "no value here" (besides the empty field).
_MISSING = ("nan", "NaN", "NAN", "NA", "na", "null", "NULL")
LONG_COLUMNS = ("timestamp", "row", "col", "service", "value")
# Refuse to allocate absurd grids because of one typo in a timestamp or a row number.
_MAX_ENTRIES = 2_000_000_000


# ---------------------------------------------------------------------- shared helpers
def parse_grid_size(text: str | Sequence[int]) -> tuple[int, int]:
    """``"5x5"`` or ``(5, 5)`` -> (H, W)."""
    if isinstance(text, str):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
        if not m:
            raise UserError(f"grid size {text!r}: use HxW, e.g. 5x5 or 100x100")
        h, w = int(m.group(1)), int(m.group(2))
    else:
        try:
            h, w = (int(v) for v in text)
        except (TypeError, ValueError):
            raise UserError(f"grid size {text!r}: give (H, W)") from None
    if h < 1 or w < 1:
        raise UserError(f"grid size {h}x{w}: both sides must be at least 1")
    return h, w


def _zone(tz: str):
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(str(tz))
    except (ZoneInfoNotFoundError, ValueError):
        raise UserError(f"unknown time zone {tz!r} (use an IANA name such as Europe/Rome or UTC)") from None


def _local_to_epoch(when: dt.datetime, tz: str, what: str) -> int:
    """Naive local time -> epoch seconds; nonexistent or ambiguous wall times are errors."""
    zone = _zone(tz)
    first, second = when.replace(tzinfo=zone, fold=0), when.replace(tzinfo=zone, fold=1)
    if first.utcoffset() != second.utcoffset():
        # In a DST gap the two folds disagree too; tell the cases apart by a round trip.
        back = dt.datetime.fromtimestamp(first.timestamp(), tz=zone).replace(tzinfo=None)
        if back != when:
            raise UserError(f"{what}: {when:%Y-%m-%d %H:%M} does not exist in {tz} (clocks jump "
                            "forward); give a UTC offset or epoch seconds")
        raise UserError(f"{what}: {when:%Y-%m-%d %H:%M} is ambiguous in {tz} (clocks go back); "
                        "give a UTC offset or epoch seconds")
    try:
        return int(first.timestamp())
    except (OverflowError, ValueError):
        raise UserError(f"{what}: {when.isoformat()} is out of range") from None


def _parse_iso(text: str) -> dt.datetime | None:
    text = text.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        return None


def parse_start(start: str | int, tz: str | None, what: str = "--start") -> int:
    """A start time -> epoch seconds: int epoch, ISO with offset, or naive local time of ``tz``."""
    if isinstance(start, (int, np.integer)) and not isinstance(start, bool):
        return check_epoch(int(start), f"{what} {int(start)}")
    text = str(start)
    if re.fullmatch(r"\s*\d{9,}\s*", text):
        return check_epoch(int(text), f"{what} {text.strip()}")
    when = _parse_iso(text)
    if when is None:
        raise UserError(f"{what} {text!r}: use 'YYYY-MM-DD HH:MM' (local time of --tz), ISO 8601 "
                        "with a UTC offset, or epoch seconds")
    if when.tzinfo is not None:
        return check_epoch(_aware_epoch(when, f"{what} {text!r}"), f"{what} {text!r}")
    return check_epoch(_local_to_epoch(when, tz or "UTC", f"{what} {text!r}"), f"{what} {text!r}")


def _aware_epoch(when: dt.datetime, what: str) -> int:
    try:
        return int(when.timestamp())
    except (OverflowError, ValueError):  # e.g. 9999-12-31T23:59-01:00 is past year 9999 in UTC
        raise UserError(f"{what}: time out of range") from None


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a CSV file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():   # trailing blank lines are harmless
        lines.pop()
    return lines


def _check_field_counts(path: Path, lines: list[str], first_line: int, expected: int, sep: str,
                        why: str) -> None:
    """Every line must have exactly ``expected`` fields (pandas would pad short rows with NaN)."""
    counts = np.fromiter((ln.count(sep) + 1 for ln in lines), dtype=np.int64, count=len(lines))
    bad = np.flatnonzero(counts != expected)
    if bad.size:
        i = int(bad[0])
        if not lines[i].strip():
            raise UserError(f"{path}:{first_line + i}: empty line (expected {expected} fields {why})")
        raise UserError(f"{path}:{first_line + i}: {counts[i]} fields, expected {expected} {why}")


def _is_missing(text: str) -> bool:
    t = text.strip()
    return t == "" or t in _MISSING


def _to_float(text: str) -> float | None:
    """Python's reading of one numeric field: NaN for missing, None when not a number."""
    if _is_missing(text):
        return math.nan
    try:
        return float(text)
    except ValueError:
        return None


# ---------------------------------------------------------------------- wide layout
def import_wide_csv(path: str | Path, grid: str | Sequence[int], service: str, start: str | int,
                    tz: str = "UTC", step: str | int = "1h", header: bool = False,
                    origin: Sequence[int] | str | None = None, sep: str = ",",
                    meta: dict[str, Any] | None = None) -> TrafficGrid:
    """Read a wide CSV (rows = time steps, columns = cells in row-major order).

    Args:
        grid: (H, W) or "HxW"; the file must have H*W columns.
        service: one of call, sms, net.
        start: time of the first row: "YYYY-MM-DD HH:MM" local time of ``tz``, ISO 8601 with a
            UTC offset, or epoch seconds.
        step: "10min", "1h", ... or seconds.
        header: the first line is a header (skipped, but its field count is checked).
        origin: (row, col) of the block's top-left cell in a larger raster (recorded as meta crop).
        meta: extra meta entries (e.g. source, license).
    Returns:
        TrafficGrid with values (T, H, W, 1).
    """
    path = Path(path)
    H, W = parse_grid_size(grid)
    if service not in SERVICES:
        raise UserError(f"unknown service {service!r}; known services: {', '.join(SERVICES)}")
    _zone(tz)
    step_s = parse_step(step)
    t0 = parse_start(start, tz)
    origin_rc = _parse_origin(origin)
    lines = _read_lines(path)
    n = H * W
    why = f"(one per cell of the {H}x{W} grid)"
    first = 1
    if header:
        if not lines:
            raise UserError(f"{path}: empty file")
        _check_field_counts(path, lines[:1], 1, n, sep, why)
        lines, first = lines[1:], 2
    if not lines:
        raise UserError(f"{path}: no data rows")
    _check_field_counts(path, lines, first, n, sep, why)

    table = _parse_wide_numbers(path, lines, first, n, sep)          # (T, n) float64, NaN = missing
    finite = np.isfinite(table) | np.isnan(table)
    if not finite.all():
        i, k = np.argwhere(~finite)[0]
        raise UserError(f"{path}:{first + i}: field {k + 1} (cell row {k // W}, col {k % W}) "
                        f"is {table[i, k]}, not a finite number")
    negative = table < 0
    if negative.any():
        i, k = np.argwhere(negative)[0]
        raise UserError(f"{path}:{first + i}: field {k + 1} (cell row {k // W}, col {k % W}) is "
                        f"negative ({table[i, k]:g}); traffic cannot be negative")
    if np.isnan(table).all():
        raise UserError(f"{path}: every field is empty or NaN: no observed value")

    T = table.shape[0]
    problem = time_range_problem(t0 + (T - 1) * step_s)
    if problem:
        raise UserError(f"{path}:{first + T - 1}: the time of the last row (--start + {T - 1} x "
                        f"--step {format_step(step_s)}) {problem}")
    info: dict[str, Any] = {"source": "csv", "source_file": path.name, "timezone": str(tz),
                            "step": format_step(step_s),
                            "import": {"layout": "wide", "grid": f"{H}x{W}", "service": service,
                                       "header": bool(header), "order": "row-major"}}
    if origin_rc is not None:
        r0, c0 = origin_rc
        info["crop"] = {"rows": [r0, r0 + H], "cols": [c0, c0 + W]}
    info.update(meta or {})
    values = table.reshape(T, H, W, 1).astype(np.float32)
    return TrafficGrid.from_values(values, start=t0, step=step_s, services=(service,), meta=info)


def _parse_wide_numbers(path: Path, lines: list[str], first: int, n: int, sep: str) -> np.ndarray:
    try:
        frame = pd.read_csv(io.StringIO("\n".join(lines)), header=None, sep=sep, dtype=np.float64,
                            na_values=["", *_MISSING], keep_default_na=False, skip_blank_lines=False,
                            engine="c")
        table = frame.to_numpy(dtype=np.float64)
        if table.shape == (len(lines), n):
            return table
    except (ValueError, pd.errors.ParserError):
        pass
    # Slow path only when pandas refused: find the offending field (or accept what Python reads).
    table = np.empty((len(lines), n), dtype=np.float64)
    for i, line in enumerate(lines):
        for k, field in enumerate(line.split(sep)):
            value = _to_float(field)
            if value is None:
                raise UserError(f"{path}:{first + i}: field {k + 1} {field.strip()!r} is not a number")
            table[i, k] = value
    return table


def _parse_origin(origin) -> tuple[int, int] | None:
    if origin is None:
        return None
    if isinstance(origin, str):
        m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", origin)
        if not m:
            raise UserError(f"--origin {origin!r}: use ROW,COL (non-negative integers), e.g. 41,41")
        return int(m.group(1)), int(m.group(2))
    r, c = (int(v) for v in origin)
    if r < 0 or c < 0:
        raise UserError(f"origin {origin!r}: row and col must be non-negative")
    return r, c


# ---------------------------------------------------------------------- long layout
def import_long_csv(path: str | Path, tz: str | None = None, grid: str | Sequence[int] | None = None,
                    step: str | int | None = None, sep: str = ",",
                    origin: Sequence[int] | str | None = None,
                    meta: dict[str, Any] | None = None) -> TrafficGrid:
    """Read a long CSV with the columns timestamp,row,col,service,value (see module docstring).

    Args:
        tz: time zone of naive timestamps, also recorded as the grid's timezone (default UTC).
        grid: (H, W) or "HxW"; default max(row) + 1 x max(col) + 1.
        step: time step; default inferred from the distinct timestamps.
    Returns:
        TrafficGrid (T, H, W, C), services in the canonical order call, sms, net.
    """
    path = Path(path)
    if tz is not None:
        _zone(tz)
    size = parse_grid_size(grid) if grid is not None else None
    step_s = parse_step(step) if step is not None else None
    origin_rc = _parse_origin(origin)
    lines = _read_lines(path)
    if not lines:
        raise UserError(f"{path}: empty file")
    header = [h.strip() for h in lines[0].split(sep)]
    missing = [c for c in LONG_COLUMNS if c not in header]
    if missing:
        raise UserError(f"{path}:1: header lacks column {missing[0]!r} (need {','.join(LONG_COLUMNS)}; "
                        f"found {','.join(header)})")
    dup = [c for c in LONG_COLUMNS if header.count(c) > 1]
    if dup:
        raise UserError(f"{path}:1: column {dup[0]!r} appears twice in the header")
    body = lines[1:]
    if not body:
        raise UserError(f"{path}: header only, no data rows")
    _check_field_counts(path, body, 2, len(header), sep, f"(as many as the header's {len(header)} columns)")
    frame = pd.read_csv(io.StringIO("\n".join(body)), header=None, names=header, sep=sep, dtype=str,
                        na_filter=False, keep_default_na=False, skip_blank_lines=False, engine="c",
                        usecols=list(LONG_COLUMNS))
    if len(frame) != len(body):  # cannot happen after the field-count check; never trust silently
        raise UserError(f"{path}: read {len(frame)} rows from {len(body)} lines (quoted fields are not supported)")

    line_of = lambda i: 2 + int(i)  # noqa: E731 - data row i sits on this editor line
    rows = _int_column(path, frame["row"].to_numpy(), "row", line_of)
    cols = _int_column(path, frame["col"].to_numpy(), "col", line_of)
    services_col = np.char.strip(frame["service"].to_numpy().astype(str))
    known = np.isin(services_col, SERVICES)
    if not known.all():
        i = int(np.argmin(known))
        raise UserError(f"{path}:{line_of(i)}: unknown service {str(services_col[i])!r}; known services: "
                        f"{', '.join(SERVICES)}")
    values = _value_column(path, frame["value"].to_numpy(), line_of)
    times = _timestamp_column(path, frame["timestamp"].to_numpy(), tz, line_of)

    if size is None:
        H, W = int(rows.max()) + 1, int(cols.max()) + 1
    else:
        H, W = size
        for name, arr, limit in (("row", rows, H), ("col", cols, W)):
            if (arr >= limit).any():
                i = int(np.argmax(arr >= limit))
                raise UserError(f"{path}:{line_of(i)}: {name} {arr[i]} is outside the {H}x{W} grid")

    present = [s for s in SERVICES if s in set(services_col.tolist())]
    C = len(present)
    # Channel of each row in canonical order: searchsorted needs sorted names, so search the
    # sorted names and map the position back through the sorting permutation.
    order = np.argsort(np.array(present))
    s_index = order[np.searchsorted(np.array(present)[order], services_col)].astype(np.int64)
    sorter = np.lexsort((s_index, cols, rows, times))
    same = np.flatnonzero((np.diff(times[sorter]) == 0) & (np.diff(rows[sorter]) == 0)
                          & (np.diff(cols[sorter]) == 0) & (np.diff(s_index[sorter]) == 0))
    if same.size:
        a, b = sorted((int(sorter[same[0]]), int(sorter[same[0] + 1])))
        raise UserError(f"{path}:{line_of(b)}: duplicate of line {line_of(a)} (timestamp "
                        f"{_show(times[b], tz)}, row {rows[b]}, col {cols[b]}, service {services_col[b]})")

    uniq = np.unique(times)
    if step_s is None:
        if uniq.size == 1:
            raise UserError(f"{path}: only one distinct timestamp; give the step (--step)")
        gaps = np.diff(uniq)
        step_s = int(gaps.min())
        off = np.flatnonzero(gaps % step_s)
        if off.size:
            j = int(off[0])
            i = int(np.argmax(times == uniq[j + 1]))
            raise UserError(f"{path}:{line_of(i)}: irregular timestamps: {_show(uniq[j + 1], tz)} comes "
                            f"{_gap(gaps[j])} after {_show(uniq[j], tz)}, not a multiple of the "
                            f"smallest step {_gap(step_s)}")
    else:
        off = (times - uniq[0]) % step_s != 0
        if off.any():
            i = int(np.argmax(off))
            raise UserError(f"{path}:{line_of(i)}: timestamp {_show(times[i], tz)} is not on the "
                            f"{format_step(step_s)} grid that starts at {_show(uniq[0], tz)}")
    t_index = (times - uniq[0]) // step_s
    T = int(t_index.max()) + 1
    if T * H * W * C > _MAX_ENTRIES:
        raise UserError(f"{path}: the result would be a {T}x{H}x{W}x{C} grid ({T * H * W * C:,} entries); "
                        "check the timestamps, rows and cols")
    # values float32 + mask bool, and the same again while TrafficGrid checks and saves them
    check_memory(T * H * W * C * 5 * 2, f"{path}: the {T}x{H}x{W}x{C} grid "
                 f"({_show(uniq[0], tz)} to {_show(uniq[-1], tz)} every {format_step(step_s)})")

    key = ((t_index * H + rows) * W + cols) * C + s_index

    observed = ~np.isnan(values)
    if not observed.any():
        raise UserError(f"{path}: every value is empty or NaN: no observed value")
    grid_values = np.zeros((T, H, W, C), dtype=np.float32)
    grid_mask = np.zeros((T, H, W, C), dtype=bool)
    flat = key[observed]
    grid_values.reshape(-1)[flat] = values[observed]
    grid_mask.reshape(-1)[flat] = True

    info: dict[str, Any] = {"source": "csv", "source_file": path.name, "timezone": str(tz or "UTC"),
                            "step": format_step(step_s),
                            "import": {"layout": "long", "grid": f"{H}x{W}", "rows_read": int(len(frame))}}
    if origin_rc is not None:
        r0, c0 = origin_rc
        info["crop"] = {"rows": [r0, r0 + H], "cols": [c0, c0 + W]}
    info.update(meta or {})
    timestamps = uniq[0] + step_s * np.arange(T, dtype=np.int64)
    return TrafficGrid(grid_values, grid_mask, timestamps, tuple(present), info)


def _int_column(path: Path, raw: np.ndarray, name: str, line_of) -> np.ndarray:
    num = pd.to_numeric(pd.Series(raw), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(num) | (num < 0) | (num != np.floor(num))
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(f"{path}:{line_of(i)}: {name} {str(raw[i]).strip()!r} is not a non-negative integer")
    return num.astype(np.int64)


def _value_column(path: Path, raw: np.ndarray, line_of) -> np.ndarray:
    text = pd.Series(raw).str.strip()
    missing = (text == "") | text.isin(_MISSING)
    num = pd.to_numeric(text.where(~missing, "nan"), errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(num) & ~missing.to_numpy()
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(f"{path}:{line_of(i)}: value {raw[i].strip()!r} is not a number")
    if np.isinf(num).any():
        i = int(np.argmax(np.isinf(num)))
        raise UserError(f"{path}:{line_of(i)}: value {raw[i].strip()!r} is not a finite number")
    if (num < 0).any():
        i = int(np.argmax(num < 0))
        raise UserError(f"{path}:{line_of(i)}: value {num[i]:g} is negative; traffic cannot be negative")
    return num


def _timestamp_column(path: Path, raw: np.ndarray, tz: str | None, line_of) -> np.ndarray:
    """Timestamps -> int64 epoch seconds. Parses each distinct string once."""
    uniq, inverse = np.unique(np.char.strip(raw.astype(str)), return_inverse=True)
    epochs = np.empty(uniq.shape[0], dtype=np.int64)
    first_row = lambda j: int(np.argmax(inverse == j))  # noqa: E731 - first data row of value j
    for j, text in enumerate(uniq.tolist()):
        if re.fullmatch(r"-?\d+", text):   # epoch seconds
            epoch = int(text)
        else:
            when = _parse_iso(text)
            if when is None:
                raise UserError(f"{path}:{line_of(first_row(j))}: timestamp {str(text)!r} is not ISO 8601 "
                                "(e.g. 2013-11-01T00:00+01:00) or epoch seconds")
            if when.tzinfo is not None:
                epoch = _aware_epoch(when, f"{path}:{line_of(first_row(j))}: timestamp {str(text)!r}")
            elif tz is None:
                raise UserError(f"{path}:{line_of(first_row(j))}: timestamp {str(text)!r} has no UTC offset; "
                                "give the time zone of the file (--tz)")
            else:
                epoch = _local_to_epoch(when, tz, f"{path}:{line_of(first_row(j))}: timestamp")
        # Before anything is sized from it: one row in epoch ms or in year 2999 would make an
        # absurdly long, almost empty grid.
        problem = time_range_problem(epoch)
        if problem:
            raise UserError(f"{path}:{line_of(first_row(j))}: timestamp {str(text)!r} {problem}")
        epochs[j] = epoch
    return epochs[inverse]


def _show(epoch: int, tz: str | None) -> str:
    when = dt.datetime.fromtimestamp(int(epoch), tz=_zone(tz or "UTC"))
    return when.isoformat(timespec="minutes") if when.second == 0 else when.isoformat()


def _gap(seconds: int) -> str:
    return format_step(int(seconds)) if seconds > 0 else f"{int(seconds)}s"
