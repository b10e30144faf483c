"""Calendar marks: local time across DST changes, Italian holidays incl. Easter Monday."""
from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from simmstnet.data.calendar import calendar_features, easter_sunday, italian_holidays

ROME = ZoneInfo("Europe/Rome")


def _epoch(*args, tz=ROME):
    return int(dt.datetime(*args, tzinfo=tz).timestamp())


@pytest.mark.parametrize("year,month,day", [(1818, 3, 22), (1943, 4, 25), (2013, 3, 31), (2014, 4, 20),
                                            (2019, 4, 21), (2024, 3, 31), (2025, 4, 20), (2038, 4, 25)])
def test_easter_sunday_known_dates(year, month, day):
    assert easter_sunday(year) == dt.date(year, month, day)


def test_italian_holidays():
    h2014 = italian_holidays(2014)
    assert dt.date(2014, 4, 21) in h2014            # Easter Monday
    assert dt.date(2014, 4, 20) not in h2014        # Easter Sunday: a Sunday, not flagged
    assert {dt.date(2014, 1, 6), dt.date(2014, 4, 25), dt.date(2014, 6, 2), dt.date(2014, 8, 15),
            dt.date(2014, 12, 8), dt.date(2014, 12, 26)} <= h2014
    assert len(h2014) == 11


def test_features_of_known_days():
    ts = np.array([_epoch(2013, 11, 1, 0, 0), _epoch(2013, 11, 2, 13, 30), _epoch(2013, 11, 3, 23, 0)])
    f = calendar_features(ts, "Europe/Rome")
    assert f.shape == (3, 5) and f.dtype == np.float32
    assert f[0, 2] == 0.5 and f[1, 2] == -0.5 and f[2, 2] == -0.5   # Nov 1 holiday; Sunday not
    assert f[0, 0] == -0.5 and f[1, 0] == pytest.approx(13.5 / 24 - 0.5)
    assert f[0, 1] == pytest.approx(4 / 6 - 0.5) and f[2, 1] == 0.5    # Friday, Sunday
    assert f[0, 3] == -0.5 and f[1, 3] == pytest.approx(1 / 30 - 0.5)
    assert f[0, 4] == pytest.approx(304 / 365 - 0.5)
    # The same instant read in UTC is still Oct 31 (a working Thursday, 23:00).
    g = calendar_features(ts[:1], "UTC")
    assert g[0, 2] == -0.5 and g[0, 0] == pytest.approx(23 / 24 - 0.5)
    assert g[0, 1] == pytest.approx(3 / 6 - 0.5)


def test_dst_days_have_local_hours():
    # 2013-10-27: clocks go back at 03:00 CEST -> 02:00 CET, so the local day has 25 hours.
    start, end = _epoch(2013, 10, 27, 0, 0), _epoch(2013, 10, 28, 0, 0)
    ts = np.arange(start, end, 3600)
    assert len(ts) == 25
    hours = np.rint((calendar_features(ts, "Europe/Rome")[:, 0] + 0.5) * 24).astype(int)
    assert hours.tolist() == [0, 1, 2, 2] + list(range(3, 24))
    # 2014-03-30: 02:00 does not exist, a 23-hour day.
    start, end = _epoch(2014, 3, 30, 0, 0), _epoch(2014, 3, 31, 0, 0)
    ts = np.arange(start, end, 3600)
    hours = np.rint((calendar_features(ts, "Europe/Rome")[:, 0] + 0.5) * 24).astype(int)
    assert hours.tolist() == [0, 1] + list(range(3, 24))


def test_all_features_in_range_over_a_year():
    ts = np.arange(_epoch(2016, 1, 1, 0, 0), _epoch(2017, 1, 1, 0, 0), 3600)   # leap year
    f = calendar_features(ts, "Europe/Rome")
    assert f.min() >= -0.5 and f.max() <= 0.5
    assert f[:, 2].max() == 0.5 and (f[:, 2] == 0.5).sum() == 24 * 11   # no holiday on a DST day in 2016
