"""Demand: who is where, and how active, at each time step.

Expected activity of service s in square i at step t (calls, SMS per step; Net in MB per step)::

    lam_s(i, t) = rate_s * trend(t) * level_s(day(t)) * sum_c f_c(i) * [
                      (1 - k w(t)) R(i) + k w(t) D d(i) ] * g_{s,c}(t)   + events_s(i, t)

f_c: land-use fractions; R: residents; d: day destinations (sums to 1); D = sum R; k: commuter share;
w(t): presence at the day location (morning rise, evening fall, on non-working days scaled by
``weekend_commute``). g_{s,c}(t) = daily profile x day-type factor x Christmas factor for
service s in land use c. The bracket is linear in (R, D d), so the whole field is one matrix
product of a (T, 20) time basis with (20, N) spatial loadings (working and non-working days in
separate columns, so each square can carry its own weekend multiplier): no loop over time steps.

Daily profile (log-harmonic, positive by construction, mean 1 over a day)::

    prof_s(h) ~ exp(sum_{k=1..3} A_{s,k} a_c cos(2 pi k (h - phi_{s,k} - delta_c) / 24))

with 24, 12 and 8 hour harmonics (the dominant periods in the Milano spectrum, Barlacchi et al.
2015; Zhang & Patras 2018), a land-use amplitude a_c and shift delta_c (nightlife runs later).
Calendar: Italian public holidays (``simmstnet.data.calendar.italian_holidays``: Jan 1, Jan 6,
Easter Monday, Apr 25, May 1, Jun 2, Aug 15, Nov 1, Dec 8, Dec 25, Dec 26) count as Sundays;
the Christmas period is Dec 24 to Jan 6. Optional (parameters, neutral in the presets): a local
patron-saint holiday (``local_holiday``) counts as a Sunday too, and a bridge day ("ponte", a
working day between two non-working days) gets the level factor ``bridge_factor``.

Demand realism pieces (issue 13), each off at its neutral value: a deeper Call/SMS night trough
(``call_night_depth``, ``sms_night_depth``), working-day inflow from outside the grid
(``inflow_share``), events of absolute attendance (``event_attendance``), and, applied per square
after attribution (:func:`draw_square_shape`, :func:`draw_service_mix`), per-square daily shape
and off-day texture (``square_shape_sigma``, ``square_offday_sigma``) and a per-square service
mix (``square_mix_sigma``).
"""
from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import pandas as pd

from simmstnet.data.calendar import italian_holidays
from simmstnet.sim.geometry import LANDUSE, City

SERVICES3 = ("call", "sms", "net")
# relative per-person activity in each land use, per service (rows: call, sms, net; cols: LANDUSE).
# Business and transport squares see more calls (work, travel); nightlife more SMS and Net.
LU_LEVEL = np.array([[1.3, 1.0, 1.2, 0.9, 0.6],
                     [1.0, 1.0, 1.1, 1.2, 0.7],
                     [1.1, 1.0, 1.3, 1.3, 0.7]])
LU_AMP = np.array([1.2, 0.9, 1.1, 1.0, 1.2])     # amplitude of the daily cycle
LU_SHIFT = np.array([0.0, 0.5, -0.5, np.nan, 0.0])  # hours later; nightlife from the parameter
LU_WEEKEND = np.array([np.nan, 1.15, 0.8, 1.3, 1.5])  # business from the parameter
EVENT_LEVEL = {"call": 0.7, "sms": 1.2, "net": 1.8}  # activity of an event crowd, per person
EVENT_TYPES = ("stadium", "concert", "fair")
# event_attendance > 0: attendance of each kind relative to the parameter (a stadium match fills
# the stadium, a fair day draws about half of that, a concert a fifth)
EVENT_ATTENDANCE = {"stadium": 1.0, "concert": 0.2, "fair": 0.5}
# local patron-saint holidays (MM-DD), the choices of the ``local_holiday`` parameter
LOCAL_HOLIDAYS = {"none": (), "milano": ("12-07",), "torino": ("06-24",), "roma": ("06-29",),
                  "trento": ("06-26",), "bologna": ("10-04",), "napoli": ("09-19",)}
# centre (local hour) and width (hours) of the night window of call_night_depth / sms_night_depth
NIGHT_CENTRE_H, NIGHT_WIDTH_H = 3.5, 2.5


@dataclasses.dataclass
class Calendar:
    """Local calendar of each step (T,): hour at the middle of the step, day type, day index."""

    hour: np.ndarray       # float, local hour of day at the middle of the step, [0, 24)
    day: np.ndarray        # int, local day index from the first day (0, 1, ...)
    daytype: np.ndarray    # int, 0 working day, 1 Saturday, 2 Sunday or public holiday
    xmas: np.ndarray       # bool, Dec 24 .. Jan 6
    to_newyear_h: np.ndarray  # float, hours from the nearest Jan 1 00:00 local (signed)
    bridge: np.ndarray | None = None  # bool, working day between two non-working days ("ponte")


def local_calendar(timestamps: np.ndarray, step: int, timezone: str = "Europe/Rome",
                   local_holidays: tuple[str, ...] = ()) -> Calendar:
    """``local_holidays``: extra holidays as "MM-DD" (a city's patron saint), counted as Sundays."""
    mid = pd.to_datetime(timestamps + step // 2, unit="s", utc=True).tz_convert(timezone)
    hour = np.asarray(mid.hour + mid.minute / 60 + mid.second / 3600, dtype=np.float64)
    dates = mid.date
    ordinal = np.array([d.toordinal() for d in dates])
    day = ordinal - ordinal[0]
    hol: set[dt.date] = set()
    for y in range(dates[0].year - 1, dates[-1].year + 2):  # neighbours of the first/last day too
        hol |= italian_holidays(y)
        for md in local_holidays:
            hol.add(dt.date(y, int(md[:2]), int(md[3:5])))
    dow = np.asarray(mid.day_of_week)
    is_hol = np.array([d in hol for d in dates])
    daytype = np.where(is_hol | (dow == 6), 2, np.where(dow == 5, 1, 0))
    # bridge days: a working day whose day before and day after are both off (Saturday, Sunday or
    # holiday), e.g. Friday after a Thursday holiday; one check per distinct day
    uniq, inv = np.unique(ordinal, return_inverse=True)

    def off(o: int) -> bool:
        d = dt.date.fromordinal(int(o))
        return d.weekday() >= 5 or d in hol
    bridge_day = np.array([not off(o) and off(o - 1) and off(o + 1) for o in uniq])
    bridge = bridge_day[inv]
    month, dom = np.asarray(mid.month), np.asarray(mid.day)
    xmas = ((month == 12) & (dom >= 24)) | ((month == 1) & (dom <= 6))
    # hours to the nearest local New Year midnight
    local_naive = mid.tz_localize(None)
    years = np.asarray(mid.year)
    ny_next = pd.to_datetime([f"{y + 1}-01-01" for y in years])
    ny_this = pd.to_datetime([f"{y}-01-01" for y in years])
    to_next = np.asarray((local_naive - ny_next).total_seconds()) / 3600
    to_this = np.asarray((local_naive - ny_this).total_seconds()) / 3600
    to_ny = np.where(np.abs(to_next) < np.abs(to_this), to_next, to_this)
    return Calendar(hour, day, daytype, xmas, to_ny, bridge)


def daily_profile(hour: np.ndarray, amps, phases, amp_scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    """Log-harmonic daily profile at local ``hour`` (any shape), normalized to mean 1 over a day."""
    def raw(h):
        z = np.zeros_like(h, dtype=np.float64)
        for k, (a, ph) in enumerate(zip(amps, phases), start=1):
            z = z + a * amp_scale * np.cos(2 * np.pi * k * (h - ph - shift) / 24)
        return np.exp(z)
    norm = raw(np.linspace(0, 24, 288, endpoint=False)).mean()
    return raw(np.asarray(hour, dtype=np.float64)) / norm


def night_factor(hour: np.ndarray, depth: float) -> np.ndarray:
    """Deep night trough: (1 - depth) ** w(h), w a Gaussian window (1 at NIGHT_CENTRE_H, circular,
    width NIGHT_WIDTH_H hours). Not normalized (time_basis renormalizes profile x factor)."""
    dist = np.abs((np.asarray(hour, dtype=np.float64) - NIGHT_CENTRE_H + 12) % 24 - 12)
    return np.exp(np.log1p(-depth) * np.exp(-0.5 * (dist / NIGHT_WIDTH_H) ** 2))


def presence(hour: np.ndarray, p: dict) -> np.ndarray:
    """Share of commuters at their day location: logistic rise and fall around the commute hours."""
    rise = 1 / (1 + np.exp(-(hour - p["commute_morning_h"]) / 0.6))
    fall = 1 / (1 + np.exp(-(hour - p["commute_evening_h"]) / 0.8))
    return np.clip(rise - fall, 0.0, 1.0)


def time_basis(cal: Calendar, service: str, p: dict, rng: np.random.Generator) -> np.ndarray:
    """(T, 10) float64: columns 0-4 multiply residents, 5-9 commuters, per land-use class."""
    s = SERVICES3.index(service)
    working = cal.daytype == 0
    hour_eff = np.where(working, cal.hour, cal.hour - p["weekend_shift_h"])
    amps = [p[f"{service}_amp{k}"] for k in (1, 2, 3)]
    phases = [p[f"{service}_phase{k}"] for k in (1, 2, 3)]
    shifts = np.where(np.isnan(LU_SHIFT), p["nightlife_shift_h"], LU_SHIFT)
    wk_lu = np.where(np.isnan(LU_WEEKEND), p["business_weekend"], LU_WEEKEND)
    day_factor = np.select([cal.daytype == 1, cal.daytype == 2],
                           [p[f"{service}_saturday"], p[f"{service}_sunday"]], 1.0)
    xm = p["xmas_factor"]
    xmas_lu = np.array([xm, 1.05, (1 + xm) / 2, 1.1, 1.0])
    g = np.empty((len(cal.hour), len(LANDUSE)))
    depth = float(p.get(f"{service}_night_depth", 0.0))
    if depth > 0:  # night is night whatever the day type: local hour, not the weekend-shifted one
        night = night_factor(cal.hour, depth)
        day_h = np.linspace(0, 24, 288, endpoint=False)
        night_day = night_factor(day_h, depth)
    for c in range(len(LANDUSE)):
        prof = daily_profile(hour_eff, amps, phases, LU_AMP[c], shifts[c])
        if depth > 0:  # deeper night, same daily mean of the (working-day) profile
            prof = prof * night / (daily_profile(day_h, amps, phases, LU_AMP[c], shifts[c]) * night_day).mean()
        g[:, c] = (LU_LEVEL[s, c] * prof * day_factor * np.where(working, 1.0, wk_lu[c])
                   * np.where(cal.xmas, xmas_lu[c], 1.0))
    # New Year's Eve: greetings at midnight (calls and SMS, a little Net)
    boost = (p["newyear_boost"] - 1) * (1.0 if service != "net" else 0.2)
    g *= (1 + boost * np.exp(-0.5 * (cal.to_newyear_h / 0.5) ** 2))[:, None]
    bridge = float(p.get("bridge_factor", 1.0))
    if bridge != 1.0 and cal.bridge is not None:
        g *= np.where(cal.bridge, bridge, 1.0)[:, None]
    # slow trend and day-to-day level (weather, news): AR(1) in log over days, phi = 0.7
    n_days = int(cal.day.max()) + 1
    sig = p["daily_level_sigma"]
    eps = rng.standard_normal(n_days) * sig * np.sqrt(1 - 0.7**2)
    level = np.empty(n_days)
    level[0] = rng.standard_normal() * sig
    for d in range(1, n_days):  # one step per day: a few dozen iterations
        level[d] = 0.7 * level[d - 1] + eps[d]
    t_days = cal.day + cal.hour / 24
    g *= (np.exp(level[cal.day]) * np.maximum(1 + p["trend_per_month"] * t_days / 30, 0.05))[:, None]
    pres = presence(cal.hour, p)
    k = p["commuter_share"] * pres * np.where(working, 1.0, p["weekend_commute"])
    # people from outside the grid at their day location on working days: they add to the day
    # columns (placed by the day destinations) and are not taken from the residents
    inflow = float(p.get("inflow_share", 0.0))
    k_day = k + inflow * pres * working if inflow > 0 else k
    return np.concatenate([g * (1 - k)[:, None], g * k_day[:, None]], axis=1)


def spatial_loadings(city: City, p: dict) -> np.ndarray:
    """(10, N) subscribers: residents then commuters, split by land-use fraction of the square."""
    lu = city.landuse.reshape(len(LANDUSE), -1).astype(np.float64)
    res = city.residents.ravel() * p["market_share"]
    day = city.day_weight.ravel() * city.residents.sum() * p["market_share"]
    return np.concatenate([lu * res, lu * day], axis=0)


def rate_per_step(service: str, p: dict, step: int) -> float:
    """Activity per subscriber per step at a profile value of 1 (counts, or MB for Net)."""
    if service == "net":
        return p["net_kbps_per_user"] * 1e3 * step / 8e6
    return p[f"{service}_per_user_h"] * step / 3600


def draw_events(city: City, cal: Calendar, step: int, p: dict, rng: np.random.Generator) -> list[dict]:
    """Special events: stadium matches and fairs at fixed venues, concerts anywhere lively."""
    n_days = int(cal.day.max()) + 1
    n = rng.poisson(p["events_per_week"] * n_days / 7)
    H, W = city.rows, city.cols
    lively = (city.landuse[0] + city.landuse[2] + 2 * city.landuse[3]).ravel() * city.residents.ravel()
    lively = lively / lively.sum()
    venues = {"stadium": int(rng.choice(H * W, p=lively)), "fair": int(rng.choice(H * W, p=lively))}
    events = []
    for _ in range(n):
        kind = EVENT_TYPES[int(rng.choice(3, p=[0.4, 0.35, 0.25]))]
        if kind == "stadium":
            cell, start_h, dur_h, days = venues["stadium"], float(rng.choice([15.0, 18.0, 20.75])), 2.0, 1
        elif kind == "concert":
            cell, start_h, dur_h, days = int(rng.choice(H * W, p=lively)), 21.0 + rng.uniform(-1, 1), 3.0, 1
        else:
            cell, start_h, dur_h, days = venues["fair"], 9.0, 9.0, int(rng.integers(1, 5))
        day0 = int(rng.integers(0, max(1, n_days - days + 1)))
        u = rng.uniform(0.5, 1.5)
        size = p["event_size"] * (0.5 if kind == "fair" else 1.0) * u
        ev = {"type": kind, "row": cell // W, "col": cell % W, "day": day0, "days": days,
              "start_h": round(float(start_h), 2), "hours": dur_h, "size": round(float(size), 3)}
        if p.get("event_attendance", 0.0) > 0:  # absolute crowd: people, not a share of the square's
            ev["attendance"] = round(float(p["event_attendance"] * EVENT_ATTENDANCE[kind] * u))
        events.append(ev)
    return events


def add_events(lam: np.ndarray, service: str, events: list[dict], city: City, cal: Calendar,
               step: int, p: dict) -> None:
    """Add event crowds to ``lam`` (T, N) in place: a Gaussian crowd, trapezoid in time."""
    if not events:
        return
    H, W, cell = city.rows, city.cols, city.cell_m
    people = (city.residents + city.day_weight * city.residents.sum()) * p["market_share"]
    rad_cells = p["event_radius_m"] / cell
    reach = int(np.ceil(3 * rad_cells))
    rate = rate_per_step(service, p, step) * EVENT_LEVEL[service]
    t_abs = cal.day + cal.hour / 24  # days since the first local midnight, at step middles
    for ev in events:
        r0, c0 = ev["row"], ev["col"]
        rs, cs = slice(max(0, r0 - reach), min(H, r0 + reach + 1)), slice(max(0, c0 - reach), min(W, c0 + reach + 1))
        rr, cc = np.meshgrid(np.arange(H)[rs], np.arange(W)[cs], indexing="ij")
        blob = np.exp(-0.5 * ((rr - r0) ** 2 + (cc - c0) ** 2) / max(rad_cells, 0.3) ** 2)
        blob /= blob.sum()
        crowd = ev["attendance"] * p["market_share"] if "attendance" in ev else ev["size"] * people[r0, c0]
        shape = np.zeros(len(t_abs))
        for d in range(ev["days"]):
            t0 = ev["day"] + d + ev["start_h"] / 24
            t1 = t0 + ev["hours"] / 24
            ramp = 1.0 / 24  # arrivals and departures over an hour
            shape = np.maximum(shape, np.clip(np.minimum((t_abs - (t0 - ramp)) / ramp, ((t1 + ramp) - t_abs) / ramp), 0, 1))
        on = np.nonzero(shape > 0)[0]
        if on.size == 0:
            continue
        idx = (rr * W + cc).ravel()
        lam[np.ix_(on, idx)] += (rate * crowd * shape[on, None] * blob.ravel()[None, :]).astype(lam.dtype)


def local_fluctuation(shape: tuple[int, int], step: int, sigma: float, corr_h: float,
                      rng: np.random.Generator) -> np.ndarray:
    """(T, N) float32 log-normal multiplier, AR(1) in time per column, mean 1.

    Local crowds come and go over hours (a meeting, a shop's rush). Applied per sector (see
    measurement.carried_by_sector): it is what keeps the residual correlation between squares
    more than one square apart low in real data while the daily cycle is shared. The recursion
    runs over time steps on whole (N,) rows, cheap even at 10-minute steps.
    """
    T, N = shape
    if sigma <= 0:
        return np.ones(shape, np.float32)
    phi = float(np.exp(-step / (corr_h * 3600)))
    x = rng.standard_normal((T, N), dtype=np.float32)
    x[1:] *= np.float32(sigma * np.sqrt(1 - phi**2))
    x[0] *= np.float32(sigma)
    for t in range(1, T):
        x[t] += np.float32(phi) * x[t - 1]
    x -= np.float32(0.5 * sigma**2)
    return np.exp(x, out=x)


def draw_bursts(T: int, N: int, step: int, p: dict, rng: np.random.Generator) -> np.ndarray | None:
    """(T, N) float32 multiplier >= 1 of short demand bursts, or None when ``burst_per_day`` is 0.

    A burst is a short crowd in one square (a train arriving, a queue, a meeting letting out): it
    starts at a uniform time, lasts an exponential time of mean ``burst_minutes`` (capped at 6 h)
    and raises the square's activity by a heavy-tailed share, ``burst_scale`` times a Lomax
    (Pareto II) variable of tail index ``burst_alpha``. Bursts arrive as a Poisson process of
    ``burst_per_day`` per square and day. The same multiplier is applied to every service (a
    crowd calls, texts and browses), so it is drawn once per scenario. What it is for: the
    heavy tails of real 10-minute increments (excess kurtosis ~6.7 on the Milano block, ~0.5
    without bursts). A burst shorter than the step is averaged into it (its share x the overlap).
    """
    rate = float(p.get("burst_per_day", 0.0))
    if rate <= 0 or p.get("burst_scale", 0.0) <= 0:
        return None
    days = T * step / 86400
    n = int(rng.poisson(rate * days * N))
    mult = np.ones((T, N), np.float32)
    if n == 0:
        return mult
    cell = rng.integers(0, N, n)
    start = rng.uniform(0, T, n)                                      # in steps
    dur = np.minimum(rng.exponential(p["burst_minutes"] * 60, n), 6 * 3600) / step
    height = p["burst_scale"] * rng.pareto(p["burst_alpha"], n)
    first = np.floor(start).astype(np.int64)
    span = int(np.ceil(dur.max())) + 1
    for k in range(span + 1):
        t = first + k
        lo, hi = np.maximum(start, t), np.minimum(start + dur, t + 1)
        overlap = np.clip(hi - lo, 0, 1)
        ok = (overlap > 0) & (t < T)
        if not ok.any():
            continue
        np.add.at(mult, (t[ok], cell[ok]), (height[ok] * overlap[ok]).astype(np.float32))
    return mult


def draw_square_shape(cal: Calendar, N: int, p: dict, seq: np.random.SeedSequence) -> np.ndarray | None:
    """(T, N) float32 per-square multiplier of the daily shape and off-day level, or None when
    ``square_shape_sigma`` and ``square_offday_sigma`` are 0.

    Square i gets its own 24 h and 12 h log-harmonics, exp(x_i cos(2 pi h/24) + y_i sin(2 pi h/24)
    + u_i cos(4 pi h/24) + v_i sin(4 pi h/24)) with x, y ~ N(0, sigma), u, v ~ N(0, sigma / 2)
    (a random amplitude and peak hour per square), renormalized to a daily mean of 1, and on
    non-working days a log-normal factor exp(s z_i - s^2/2), s = ``square_offday_sigma``. The log
    of the multiplier is one (T, 6) @ (6, N) product. It is applied per square after attribution
    (attribution would average it away across the squares a sector covers) and shared by every
    service of the square. What it is for: the real Milano block's squares peak at hours from
    0 to 21 and their profiles correlate with the block's at a median 0.90 (simulated without
    it: peaks 10-20 h, correlation 0.97-0.997); their off-day ratios spread twice as much.
    """
    sig, off_sig = float(p.get("square_shape_sigma", 0.0)), float(p.get("square_offday_sigma", 0.0))
    if sig <= 0 and off_sig <= 0:
        return None
    # two child streams: the shape draws do not depend on whether the off-day texture is on
    shape_rng, off_rng = (np.random.default_rng(c) for c in seq.spawn(2))
    coef = shape_rng.standard_normal((4, N)) * (sig * np.array([1.0, 1.0, 0.5, 0.5]))[:, None]
    grid_h = np.linspace(0, 24, 96, endpoint=False)

    def harm(h):
        a = 2 * np.pi * np.asarray(h, dtype=np.float64) / 24
        return np.stack([np.cos(a), np.sin(a), np.cos(2 * a), np.sin(2 * a)], axis=1)
    log_norm = np.log(np.exp(harm(grid_h) @ coef).mean(0))               # (N,) daily mean
    z = off_rng.standard_normal(N) * off_sig - 0.5 * off_sig**2
    off = (cal.daytype != 0).astype(np.float64)
    basis = np.concatenate([harm(cal.hour), -np.ones((len(cal.hour), 1)), off[:, None]], axis=1)
    loads = np.concatenate([coef, log_norm[None, :], z[None, :]], axis=0)
    out = basis.astype(np.float32) @ loads.astype(np.float32)
    return np.exp(out, out=out)


def draw_service_mix(N: int, p: dict, rng: np.random.Generator) -> np.ndarray | None:
    """(N,) float32 per-square level factor of one service (log-normal, mean 1), or None when
    ``square_mix_sigma`` is 0. Drawn independently per service (one stream each): the service
    mix differs by square (land use the land-use classes do not capture: offices with many calls,
    a campus with much Net). Real Milano block: Net/Call ratio of square means spans 6.5x over
    25 squares (simulated without it: 1.7-1.8x)."""
    sig = float(p.get("square_mix_sigma", 0.0))
    if sig <= 0:
        return None
    return np.exp(rng.standard_normal(N) * sig - 0.5 * sig**2).astype(np.float32)


def demand(city: City, cal: Calendar, service: str, step: int, p: dict, events: list[dict],
           rng: np.random.Generator) -> np.ndarray:
    """Expected activity (T, N) float32 of ``service`` (counts per step, or MB per step for Net)."""
    basis = time_basis(cal, service, p, rng) * rate_per_step(service, p, step)
    loadings = spatial_loadings(city, p)
    # non-working days get their own columns so each square can have its own weekend factor
    off = (cal.daytype != 0)[:, None]
    basis = np.concatenate([basis * ~off, basis * off], axis=1)
    loadings = np.concatenate([loadings, loadings * city.weekend_factor.ravel()[None, :]], axis=0)
    lam = basis.astype(np.float32) @ loadings.astype(np.float32)
    add_events(lam, service, events, city, cal, step, p)
    return lam
