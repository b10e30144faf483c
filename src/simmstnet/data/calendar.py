"""Calendar features ("time marks") for the model's external embedding.

``calendar_features(timestamps, timezone) -> (T, F)`` with F = 5 columns, each scaled into
[-0.5, 0.5] (Informer-style time features), computed in the LOCAL time of ``timezone`` so that
the hour of day follows the clocks people live by, across daylight-saving changes:

====  =================  ===========================================================
col   feature            scaling
====  =================  ===========================================================
0     hour of day        (hour + minute/60 + second/3600) / 24 - 0.5, in [-0.5, 0.5)
1     day of week        weekday / 6 - 0.5 (Monday = -0.5, Sunday = 0.5)
2     holiday flag       0.5 on an Italian public holiday, else -0.5
3     day of month       (day - 1) / 30 - 0.5
4     day of year        (day_of_year - 1) / 365 - 0.5
====  =================  ===========================================================

The hour column keeps minutes so that 10-minute data gets distinct marks within an hour.
Holidays are Italian national ones (the data is Milano/Trentino): Sundays are NOT flagged just
for being Sundays (the day-of-week column already says so); Easter Sunday is therefore not
flagged, Easter Monday is.
"""
from __future__ import annotations

import datetime as dt
from functools import lru_cache
from typing import Sequence

import numpy as np

from simmstnet.errors import UserError

N_MARKS = 5
MARK_NAMES = ("hour_of_day", "day_of_week", "holiday", "day_of_month", "day_of_year")

# Fixed-date Italian public holidays (month, day).
_FIXED_HOLIDAYS = (
    (1, 1),    # Capodanno
    (1, 6),    # Epifania
    (4, 25),   # Festa della Liberazione
    (5, 1),    # Festa del Lavoro
    (6, 2),    # Festa della Repubblica
    (8, 15),   # Ferragosto
    (11, 1),   # Ognissanti
    (12, 8),   # Immacolata Concezione
    (12, 25),  # Natale
    (12, 26),  # Santo Stefano
)


def easter_sunday(year: int) -> dt.date:
    """Gregorian Easter Sunday of ``year`` (the anonymous Gregorian computus)."""
    a = year % 19                      # position in the 19-year Metonic cycle
    b, c = divmod(year, 100)
    d, e = divmod(b, 4)
    f = (b + 8) // 25
    g = (b - f + 1) // 3               # lunar orbit correction
    h = (19 * a + b - d - g + 15) % 30  # days from the equinox to the paschal full moon
    i, k = divmod(c, 4)
    weekday_shift = (32 + 2 * e + 2 * i - h - k) % 7
    m = (a + 11 * h + 22 * weekday_shift) // 451
    month, day = divmod(h + weekday_shift - 7 * m + 114, 31)
    return dt.date(year, month, day + 1)


@lru_cache(maxsize=None)
def italian_holidays(year: int) -> frozenset:
    """Italian national public holidays of ``year`` as a frozenset of ``datetime.date``."""
    days = {dt.date(year, m, d) for m, d in _FIXED_HOLIDAYS}
    days.add(easter_sunday(year) + dt.timedelta(days=1))  # Lunedì dell'Angelo
    return frozenset(days)


def is_holiday(day: dt.date) -> bool:
    return day in italian_holidays(day.year)


def _zone(timezone: str):
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(str(timezone))
    except (ZoneInfoNotFoundError, ValueError):
        raise UserError(f"unknown time zone {timezone!r} (use an IANA name such as Europe/Rome or UTC)") from None


def local_datetimes(timestamps: Sequence[int], timezone: str) -> list:
    """Aware local datetimes for epoch seconds (UTC) in ``timezone`` (zoneinfo handles DST)."""
    zone = _zone(timezone)
    return [dt.datetime.fromtimestamp(int(t), tz=zone) for t in np.asarray(timestamps).ravel()]


def calendar_features(timestamps: np.ndarray, timezone: str = "UTC") -> np.ndarray:
    """Calendar marks of epoch-second timestamps.

    Args:
        timestamps: (T,) int epoch seconds UTC.
        timezone: IANA zone whose local clock defines hours and days.
    Returns:
        (T, 5) float32, columns as in the module docstring, each in [-0.5, 0.5].
    """
    ts = np.asarray(timestamps, dtype=np.int64).ravel()
    out = np.empty((ts.shape[0], N_MARKS), dtype=np.float32)
    if ts.shape[0] == 0:
        return out
    zone = _zone(timezone)
    # One zoneinfo lookup per distinct UTC offset period would be faster, but a per-step loop
    # costs ~1 us per step and is obviously right across DST changes.
    for i, t in enumerate(ts.tolist()):
        local = dt.datetime.fromtimestamp(t, tz=zone)
        day = local.date()
        out[i, 0] = (local.hour + local.minute / 60.0 + local.second / 3600.0) / 24.0 - 0.5
        out[i, 1] = local.weekday() / 6.0 - 0.5
        out[i, 2] = 0.5 if day in italian_holidays(day.year) else -0.5
        out[i, 3] = (local.day - 1) / 30.0 - 0.5
        out[i, 4] = (local.timetuple().tm_yday - 1) / 365.0 - 0.5
    return out
