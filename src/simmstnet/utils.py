"""Small shared helpers: atomic writes, output checks, seeding, step and time-range checks,
memory budgets."""
from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from simmstnet.errors import UserError

_STEP_UNITS = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}
# A time step longer than a (leap) year is a typo, and a huge one overflows int64 timestamps.
MAX_STEP = 366 * 86400

# Plausible times of traffic data, epoch seconds UTC: [1970-01-01, 2100-01-01). Anything outside
# is a unit mistake (milliseconds read as seconds) or a typo, and would span an absurd grid.
MIN_EPOCH = 0
MAX_EPOCH = 4102444800
_HINT_EPOCH = 631152000  # 1990-01-01: a value that is a recent time in ms/us/ns gets a hint
# Environment variable that overrides the memory budget (bytes, or e.g. 8G / 512M).
MEMORY_ENV = "SIMMSTNET_MAX_MEMORY"


def parse_step(text: str | int) -> int:
    """Parse a time step such as ``10min``, ``1h``, ``30s``, ``1d`` (or seconds as int) to seconds."""
    if isinstance(text, (int,)) and not isinstance(text, bool):
        if text <= 0:
            raise UserError(f"step must be positive, got {text}")
        if text > MAX_STEP:
            raise UserError(f"step {text} s is longer than {MAX_STEP // 86400} days")
        return int(text)
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]+)\s*", str(text))
    if not m or m.group(2).lower() not in _STEP_UNITS:
        raise UserError(f"cannot read step {text!r}: use a number and a unit, e.g. 10min, 1h, 30s, 1d")
    seconds = int(m.group(1)) * _STEP_UNITS[m.group(2).lower()]
    if seconds <= 0:
        raise UserError(f"step must be positive, got {text!r}")
    if seconds > MAX_STEP:
        raise UserError(f"step {text!r} is longer than {MAX_STEP // 86400} days; use e.g. 10min, 1h or 1d")
    return seconds


def format_step(seconds: int) -> str:
    """Inverse of :func:`parse_step` for display: 600 -> '10min', 3600 -> '1h'."""
    if seconds % 86400 == 0:
        return f"{seconds // 86400}d"
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}min"
    return f"{seconds}s"



def format_metric(v) -> str:
    """A metric for a log line: 4 significant digits, or ``n/a`` for None / NaN / inf."""
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"

def _utc(epoch: int) -> str:
    return _dt.datetime.fromtimestamp(int(epoch), tz=_dt.timezone.utc).strftime("%Y-%m-%d")


def time_range_problem(epoch: int) -> str | None:
    """Why ``epoch`` (seconds UTC) is no plausible time of traffic data, or None when it is.

    The answer names the year and, for values that are plausible in other units, the likely
    mistake ("looks like milliseconds").
    """
    epoch = int(epoch)
    if MIN_EPOCH <= epoch < MAX_EPOCH:
        return None
    for factor, unit in ((10**3, "milliseconds"), (10**6, "microseconds"), (10**9, "nanoseconds")):
        if _HINT_EPOCH <= epoch // factor < MAX_EPOCH:
            return (f"is not between {_utc(MIN_EPOCH)} and {_utc(MAX_EPOCH)} (it looks like epoch "
                    f"{unit}, {_utc(epoch // factor)}; give epoch seconds)")
    year = 1970 + epoch // 31556952  # mean Gregorian year; exact enough to show the mistake
    return f"is not between {_utc(MIN_EPOCH)} and {_utc(MAX_EPOCH)} (about year {year})"


def check_epoch(epoch: int, what: str) -> int:
    """``epoch`` if it is a plausible time of traffic data, else UserError naming ``what``."""
    problem = time_range_problem(epoch)
    if problem:
        raise UserError(f"{what} {problem}")
    return int(epoch)


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def _parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise UserError(f"${MEMORY_ENV}={text!r}: give a number of bytes, e.g. 8G or 512M")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def memory_budget() -> int:
    """Bytes one command may plan to hold in memory: ``$SIMMSTNET_MAX_MEMORY``, else the memory
    the system reports available (MemAvailable), else the physical memory."""
    env = os.environ.get(MEMORY_ENV)
    if env:
        return _parse_bytes(env)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: no estimate, no limit
        return 1 << 62


def check_memory(need: int, what: str) -> None:
    """UserError when ``need`` bytes exceed :func:`memory_budget` (checked before allocating)."""
    budget = memory_budget()
    if need > budget:
        source = f"${MEMORY_ENV}" if os.environ.get(MEMORY_ENV) else "available"
        raise UserError(f"{what} needs about {format_bytes(need)} of memory, more than the "
                        f"{format_bytes(budget)} {source}")


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """Check before any work that ``path`` can be written as a file; UserError naming it if not.

    Refuses a folder, a parent that is a file, and a folder without write permission.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path}: is a folder, expected a file name")
    _check_writable_parent(path, what)
    return path


def check_output_folder(path: str | os.PathLike, what: str = "out") -> Path:
    """Check before any work that ``path`` is (or can become) a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path}: exists and is not a folder")
    if path.is_dir():
        _check_writable_dir(path, path, what)
        return path
    _check_writable_parent(path, what)
    return path


def _check_writable_parent(path: Path, what: str) -> None:
    base = _existing_ancestor(path.parent)
    if not base.is_dir():
        raise UserError(f"{what} {path}: {base} is a file, not a folder")
    _check_writable_dir(base, path, what)


def _check_writable_dir(base: Path, path: Path, what: str) -> None:
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: cannot write in {base} (permission denied)")
    # Permission bits do not tell everything (root, read-only or special file systems): try.
    try:
        tempfile.TemporaryFile(dir=base).close()
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot write in {base} ({_os_reason(exc)})") from None


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or a user error half-way leaves no half-written output behind. A failure of the file
    system (no permission, disk full, file-size limit, the target is a folder) is a UserError
    naming ``path``.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, cannot write a file there")
    try:
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes[-1:]),
                                   dir=path.parent)
    except OSError as exc:
        raise UserError(f"{path}: cannot write ({_os_reason(exc)})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            # mkstemp creates 0600; give the output the permissions a plain open() would have.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
            os.replace(tmp_path, path)
        except OSError as exc:  # disk full (ENOSPC), file too large (EFBIG, ulimit -f), ...
            raise UserError(f"{path}: cannot write ({_os_reason(exc)})") from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from one integer."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # torch is a dependency, but keep the data layer usable without it
        pass
