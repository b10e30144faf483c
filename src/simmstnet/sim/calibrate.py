"""Calibration: the simulator's parameter posterior for one real city, from a few of its days.

Simulation-based inference on the scale-free summary statistics of :func:`summary_stats`:
parameter sets are drawn from a prior around a preset, each is simulated on the real grid's
shape, time span and step, and the statistics of the simulations are compared with the real
ones. Two methods (docs/calibration.md says why the first is the default, by measurement):

- ``npe``: sbi's neural posterior estimation (one masked autoregressive flow trained on
  simulations from the prior, sampled at the real statistics; :func:`_calibrate_npe`);
- ``abc``: pyabc's ABC-SMC (Toni et al. 2009; Klinger, Rickert & Hasenauer 2018) with its adaptive
  weighted Euclidean distance (Prangle 2017).

What is not fitted stays random, drawn from the preset per simulation: the posterior is marginal
over it. Simulations run on every core (joblib for npe, pyabc's multicore sampler for abc) or on a
Dask cluster (``dask=ADDRESS``). Parallel ABC runs draw their simulation seeds from each worker's
own entropy and are not bit-reproducible; NPE's chunks are seeded from ``seed``.

Outputs (:func:`write_outputs`): ``params.yaml`` (``base: <preset>`` plus each fitted parameter
as its posterior 5-95 % range, and the global scales that match the real levels), which
``simmstnet simulate --config`` reads to draw a source family around the city; ``report.md`` and
``report.json`` (per parameter prior, posterior and whether the data identify it; per statistic
the real value and its posterior-predictive 90 % band; the held-out check when the grid has more
days than were fitted); ``posterior.csv`` (the weighted particles or posterior samples).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from simmstnet.data.grid import TrafficGrid
from simmstnet.errors import UserError
from simmstnet.sim import realism
from simmstnet.sim.demand import local_calendar
from simmstnet.sim.randomization import SPECS, Range, build_space
from simmstnet.utils import format_step

# Parameters fitted by default (a compact set), and a full set (`--params full`). Measured on the
# Milano block (docs/calibration.md): ABC-SMC's importance weights collapse with the full set
# (effective sample size 300 -> 2-19 after the first generation); NPE with the full set (23
# parameters for Net, 10,000 simulations) gave a wider posterior and a worse held-out MMD^2
# (hourly 0.032) than the compact set. The compact set holds both harmonics of the daily cycle:
# with the 24 h one alone, the fitted Net day rose too slowly in the morning and peaked too high in
# the evening (held-out MMD^2 hourly 0.024; with the 12 h harmonic too: 0.019, the same 60 draws).
# What is not fitted stays random over its preset range (the posterior is marginal over it).
PER_SERVICE = ("amp1", "phase1", "amp2", "phase2", "saturday", "sunday")
SHARED = ("local_sigma", "daily_level_sigma", "burst_per_day", "burst_scale")
NET_ONLY = ("net_noise_sigma",)
FULL_PER_SERVICE = ("amp1", "phase1", "amp2", "phase2", "amp3", "saturday", "sunday")
FULL_SHARED = ("weekend_shift_h", "commuter_share", "landuse_temperature", "local_sigma", "local_corr_h",
               "daily_level_sigma", "inflow_share", "burst_per_day", "burst_scale", "burst_alpha")
FULL_NET_ONLY = ("net_noise_sigma", "net_noise_df", "net_record_share")
FULL_COUNTS = ("negbin_k",)
# square-scale texture (docs/simulator.md): shape and off-day diversity, service mix (which also
# spreads the square means of a single service)
SQUARE = ("square_shape_sigma", "square_offday_sigma", "square_mix_sigma")
NIGHT = {"call": "call_night_depth", "sms": "sms_night_depth"}
# Calibration ranges of parameters the presets fix (the realism pieces are off in every preset, so
# that their published figures stay as they are): used as the prior's base range instead of the
# preset's (widened like the others, within the hard bounds).
CALIB_RANGES = {"burst_per_day": (0.0, 8.0), "burst_minutes": (5.0, 60.0), "burst_scale": (0.2, 3.0),
                "burst_alpha": (1.5, 4.0), "square_shape_sigma": (0.0, 0.6), "square_offday_sigma": (0.0, 0.3),
                "square_mix_sigma": (0.0, 0.6), "call_night_depth": (0.0, 0.97), "sms_night_depth": (0.0, 0.97),
                "inflow_share": (0.0, 1.0), "net_record_share": (0.0, 1.0), "bridge_factor": (0.6, 1.0),
                "event_attendance": (0.0, 60000.0)}
# Statistics reported but left out of the fit (log_kurt stands for inc_kurt there).
NOT_FITTED = ("inc_kurt",)
# --method when none is given (docs/calibration.md: measured on the Milano block)
DEFAULT_METHOD = "npe"
# Seconds to wait for a --dask scheduler before giving up with a UserError.
DASK_TIMEOUT_S = 10
# A parameter is *identified* when its posterior 90 % interval is at most this share of the prior's.
IDENTIFIED_SHARE = 0.5
# A simulated statistic that cannot be computed (NaN) is set this far from everything real.
_FAR = 100.0


def default_params(services: Sequence[str], full: bool = False) -> list[str]:
    """The parameters fitted when --params is not given (``full``: --params full)."""
    per, shared, net = (FULL_PER_SERVICE, FULL_SHARED, FULL_NET_ONLY) if full else (PER_SERVICE, SHARED, NET_ONLY)
    names = [f"{s}_{k}" for s in services for k in per] + list(shared) + list(SQUARE)
    names += [NIGHT[s] for s in services if s in NIGHT]
    if "net" in services:
        names += list(net)
    if full and ("call" in services or "sms" in services):
        names += list(FULL_COUNTS)
    return names


class CalibrationWarning(UserWarning):
    """The calibration finished, but its posterior is unreliable."""


# ----------------------------------------------------------------------------- statistics

def _circ_std_hours(hours: np.ndarray) -> float:
    a = 2 * np.pi * hours / 24
    r = np.hypot(np.cos(a).mean(), np.sin(a).mean())
    return float(24 / (2 * np.pi) * np.sqrt(max(-2 * np.log(max(r, 1e-12)), 0.0)))


def _excess_kurtosis(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    if x.size < 8:
        return float("nan")
    d = x - x.mean()
    v = (d * d).mean()
    return float((d**4).mean() / v**2 - 3) if v > 0 else float("nan")


def service_stats(grid: TrafficGrid, service: str) -> dict[str, float]:
    """Scale-free statistics of one service (names without the service prefix).

    ``logprof_HH``: log of the mean daily profile (mean 1) at local hour HH; ``log_offday``: log of
    the off-day / working-day mean; ``offday_spread``: std over squares of the log of each square's
    own off-day ratio; ``acf_day``; ``resid_corr_1`` .. ``_4``: mean residual correlation of
    squares 1 to 4 apart (after each square's daily profile; NaN where no pair is that far);
    ``log_cv_space``: log CV of square
    means; ``cv_time``; ``log_q99``; ``peak_spread``: circular std (hours) of the squares' peak
    hours; ``shape_corr``: median correlation of a square's profile with the block's;
    ``svd2`` / ``svd3``: variance share of the 2nd and 3rd singular components of the normalized
    (time x square) matrix; ``log_night_day``: log of the profile's 2-6 h mean over its 10-19 h
    mean; ``inc_kurt``: excess kurtosis of log increments at the grid's step (``log_kurt``: the log of the
    raw kurtosis, what calibration fits).
    """
    z, keep = realism._normalized(grid, service)
    if z.shape[1] == 0:
        raise UserError(f"service {service!r}: no square with observed positive traffic")
    cal = local_calendar(grid.timestamps, 0, grid.timezone)
    hour = np.floor(cal.hour).astype(int) % 24
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sq_prof = np.stack([np.nanmean(z[hour == h], 0) if np.any(hour == h) else np.full(z.shape[1], np.nan)
                            for h in range(24)])                          # (24, N)
        prof = np.nanmean(sq_prof, 1)
        prof = prof / np.nanmean(prof)
        for h in range(24):
            out[f"logprof_{h:02d}"] = float(np.log(prof[h])) if prof[h] > 0 else float("nan")
        night, day = np.nanmean(prof[2:6]), np.nanmean(prof[10:19])
        out["log_night_day"] = float(np.log(night / day)) if night > 0 and day > 0 else float("nan")
        working = cal.daytype == 0
        if working.any() and (~working).any():
            wk, off = np.nanmean(z[working], 0), np.nanmean(z[~working], 0)
            out["log_offday"] = float(np.log(np.nanmean(off) / np.nanmean(wk)))
            ratio = np.log(off / wk)
            out["offday_spread"] = float(np.nanstd(ratio[np.isfinite(ratio)])) if np.isfinite(ratio).sum() > 1 \
                else float("nan")
        else:
            out["log_offday"] = out["offday_spread"] = float("nan")
        per_day = 86400 // grid.step
        out["acf_day"] = realism._acf(z, per_day)
        resid = z - sq_prof[hour]
        H, W = grid.shape[1:3]
        rr, cc = np.divmod(np.nonzero(keep)[0], W)
        i, j = np.triu_indices(z.shape[1], 1)
        dist = np.rint(np.hypot(rr[i] - rr[j], cc[i] - cc[j])).astype(int)
        for d in (1, 2, 3, 4):
            sel = dist == d
            out[f"resid_corr_{d}"] = realism._pair_corr(resid, i[sel], j[sel]) if sel.any() else float("nan")
        c = grid.service_index(service)
        raw = np.where(grid.mask[..., c], grid.values[..., c], np.nan).reshape(grid.shape[0], -1)[:, keep]
        means = np.nanmean(raw, 0)
        cv = means.std() / means.mean() if means.size > 1 and means.mean() > 0 else float("nan")
        out["log_cv_space"] = float(np.log(cv)) if cv > 0 else float("nan")
        out["cv_time"] = float(np.nanmean(np.nanstd(z, 0)))
        fin = z[np.isfinite(z)]
        out["log_q99"] = float(np.log(np.quantile(fin, 0.99))) if fin.size else float("nan")
        peaks = np.nanargmax(np.where(np.isfinite(sq_prof), sq_prof, -np.inf), 0)
        out["peak_spread"] = _circ_std_hours(peaks.astype(float)) if z.shape[1] > 1 else float("nan")
        block = prof
        corrs = [np.corrcoef(sq_prof[:, k], block)[0, 1] for k in range(z.shape[1])
                 if np.isfinite(sq_prof[:, k]).all() and sq_prof[:, k].std() > 0]
        out["shape_corr"] = float(np.median(corrs)) if corrs else float("nan")
        filled = np.where(np.isfinite(z), z, 1.0)
        sv = np.linalg.svd(filled, compute_uv=False) ** 2
        share = sv / sv.sum() if sv.sum() > 0 else np.full_like(sv, np.nan)
        out["svd2"] = float(share[1]) if share.size > 1 else float("nan")
        out["svd3"] = float(share[2]) if share.size > 2 else float("nan")
        lz = np.log(np.where(z > 0, z, np.nan))
        out["inc_kurt"] = _excess_kurtosis(np.diff(lz, axis=0).ravel())
        # what calibration fits instead: the log of the (raw) kurtosis, whose scale does not explode
        # with heavy bursts (the excess kurtosis of a simulation ranges from ~0 to several hundred)
        out["log_kurt"] = float(np.log(out["inc_kurt"] + 3)) if np.isfinite(out["inc_kurt"]) else float("nan")
    return out


def summary_stats(grid: TrafficGrid, services: Sequence[str] | None = None) -> dict[str, float]:
    """Flat ``{"<service>.<statistic>": value}`` of :func:`service_stats`, plus, for each pair of
    services, ``"<a>/<b>.ratio_spread"``: the std over squares of log(mean a / mean b) (how much
    the service mix differs between squares)."""
    services = list(services or grid.services)
    out: dict[str, float] = {}
    means = {}
    for s in services:
        for k, v in service_stats(grid, s).items():
            out[f"{s}.{k}"] = v
        c = grid.service_index(s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            means[s] = np.nanmean(np.where(grid.mask[..., c], grid.values[..., c], np.nan)
                                  .reshape(grid.shape[0], -1), 0)
    for a_i, a in enumerate(services):
        for b in services[a_i + 1:]:
            r = np.log(means[a] / means[b])
            r = r[np.isfinite(r)]
            out[f"{a}/{b}.ratio_spread"] = float(r.std()) if r.size > 1 else float("nan")
    return out


def levels(grid: TrafficGrid, services: Sequence[str]) -> dict[str, float]:
    """Mean observed value per service (what the global scales are matched to)."""
    out = {}
    for s in services:
        c = grid.service_index(s)
        m = grid.mask[..., c]
        out[s] = float(grid.values[..., c][m].mean()) if m.any() else float("nan")
    return out


# ----------------------------------------------------------------------------- prior and model

@dataclasses.dataclass(frozen=True)
class Prior:
    """One fitted parameter: uniform on [lo, hi] (in log space where ``log``), natural units."""

    name: str
    lo: float
    hi: float
    log: bool
    integer: bool

    def to_natural(self, x: float) -> float:
        v = math.exp(x) if self.log else float(x)
        return float(int(round(v))) if self.integer else v

    def bounds_internal(self) -> tuple[float, float]:
        return (math.log(self.lo), math.log(self.hi)) if self.log else (self.lo, self.hi)


def build_priors(preset: str, names: Sequence[str], widen: float, config=None) -> list[Prior]:
    """Prior per fitted parameter: its preset range widened by ``widen`` times its width on each
    side (in log space for log parameters), clipped to the parameter's hard bounds."""
    if widen < 0 or not math.isfinite(widen):
        raise UserError(f"--widen must be a finite number >= 0, got {widen}")
    space = build_space(preset, config)
    priors = []
    for name in names:
        if name not in SPECS:
            import difflib

            close = difflib.get_close_matches(name, SPECS, n=1)
            raise UserError(f"--params: unknown parameter {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        spec, r = SPECS[name], space[name]
        if spec.kind == "choice":
            raise UserError(f"--params: {name!r} is a choice parameter; only numbers can be calibrated")
        if r.kind != "uniform":
            if name not in CALIB_RANGES or (config is not None and _in_config(config, name)):
                raise UserError(f"--params: {name!r} is fixed at {r.lo:g} in {preset!r}; give it a range "
                                f"with --config to calibrate it")
            r = Range("uniform", lo=CALIB_RANGES[name][0], hi=CALIB_RANGES[name][1], log=spec.log)
        blo, bhi = spec.bounds
        if spec.log:
            lo, hi = math.log(r.lo), math.log(r.hi)
            w = (hi - lo) * widen
            lo, hi = max(lo - w, math.log(max(blo, 1e-300))), min(hi + w, math.log(bhi))
            lo, hi = math.exp(lo), math.exp(hi)
        else:
            w = (r.hi - r.lo) * widen
            lo, hi = max(r.lo - w, blo), min(r.hi + w, bhi)
            # 0.1 - 0.5 * 0.2 is 6.9e-18 in floating point: a bound that cancels is 0
            lo, hi = (0.0 if abs(v) < 1e-12 * (abs(r.lo) + abs(r.hi) + w) else v for v in (lo, hi))
        priors.append(Prior(name, float(lo), float(hi), bool(spec.log), spec.kind == "int"))
    return priors


def _in_config(config, name: str) -> bool:
    """Whether a ``--config`` file or mapping sets ``name`` (then its value is the user's choice)."""
    if isinstance(config, dict):
        return name in config
    from simmstnet.sim.randomization import _read_space_file

    return name in (_read_space_file(Path(config)).get("params") or {})


class SimModel:
    """pyabc model: a parameter dict (internal units) -> summary statistics of one simulation.

    Picklable (plain attributes), so multicore and Dask workers can run it.
    """

    def __init__(self, preset: str, priors: Sequence[Prior], rows: int, cols: int, days: float,
                 step: int, start: int, services: Sequence[str], stat_names: Sequence[str],
                 config=None):
        self.space = build_space(preset, config)
        self.priors = {p.name: p for p in priors}
        self.rows, self.cols, self.days, self.step, self.start = rows, cols, days, step, start
        self.services = tuple(services)
        self.stat_names = tuple(stat_names)

    def natural(self, par) -> dict[str, float]:
        return {k: self.priors[k].to_natural(float(par[k])) for k in self.priors}

    def simulate(self, par, seed: int, days: float | None = None, start: int | None = None) -> TrafficGrid:
        from simmstnet.sim.simulator import simulate_scenario

        space = dict(self.space)
        for k, v in self.natural(par).items():
            space[k] = Range("fixed", lo=int(v) if self.priors[k].integer else v)
        return simulate_scenario(space, self.rows, self.cols, days=days or self.days, step=self.step,
                                 seed=int(seed), index=0, start=self.start if start is None else start,
                                 services=self.services, preset="calibration")

    def stats_of(self, grid: TrafficGrid, missing: float = _FAR) -> dict[str, float]:
        """The fitted statistics of ``grid``; one that cannot be computed is ``missing`` (ABC's
        distance needs a number: _FAR; NPE leaves NaN simulations out)."""
        s = summary_stats(grid, self.services)
        return {k: (float(s[k]) if np.isfinite(s.get(k, np.nan)) else missing) for k in self.stat_names}

    # wall-clock deadline (time.time()) of the sampling; past it every call returns at once with
    # statistics no threshold accepts, so a generation that cannot finish in time fails fast and
    # pyabc stops with the last complete generation (it checks its own max_walltime only between
    # generations, and one generation at a low acceptance rate can take many minutes)
    deadline: float | None = None

    def __call__(self, par) -> dict[str, float]:
        if self.deadline is not None and time.time() > self.deadline:
            return {k: _FAR for k in self.stat_names}
        return self.stats_of(self.simulate(par, seed=int(np.random.randint(0, 2**31 - 1))))


# ----------------------------------------------------------------------------- the run

@dataclasses.dataclass
class CalibrationResult:
    preset: str
    priors: list[Prior]
    particles: "object"        # pandas DataFrame, internal units, one column per fitted parameter
    weights: np.ndarray
    observed: dict[str, float]
    model: SimModel
    generations: int
    simulations: int
    seconds: float
    epsilons: list[float]
    real_levels: dict[str, float]
    method: str = "abc"

    def natural_particles(self) -> dict[str, np.ndarray]:
        return {p.name: np.array([p.to_natural(x) for x in self.particles[p.name]]) for p in self.priors}

    def draw(self, n: int, rng: np.random.Generator) -> list[dict]:
        idx = rng.choice(len(self.weights), size=n, p=self.weights / self.weights.sum())
        return [dict(self.particles.iloc[i]) for i in idx]


def _ess(w: np.ndarray) -> float:
    w = np.asarray(w, dtype=float) / float(np.sum(w))
    return float(1.0 / np.sum(w ** 2))


def _wquantile(x: np.ndarray, w: np.ndarray, q: Sequence[float]) -> np.ndarray:
    order = np.argsort(x)
    x, w = x[order], w[order]
    cw = np.cumsum(w) - 0.5 * w
    cw /= w.sum()
    return np.interp(q, cw, x)


def _dask_client(address: str):
    """A distributed.Client on ``address``; UserError when the scheduler cannot be reached."""
    from distributed import Client

    try:
        return Client(address, timeout=DASK_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as exc:
        raise UserError(f"--dask {address}: cannot reach the Dask scheduler ({exc})") from None


def _sampler(workers: int, dask: str | None):
    from pyabc.sampler import MulticoreEvalParallelSampler, SingleCoreSampler

    if dask:
        from pyabc.sampler import DaskDistributedSampler

        client = _dask_client(dask)
        return DaskDistributedSampler(dask_client=client, batch_size=4), client
    if workers <= 1:
        return SingleCoreSampler(), None
    return MulticoreEvalParallelSampler(n_procs=int(workers)), None


def estimate_seconds(model: SimModel, reps: int = 3) -> float:
    """Seconds of one simulation plus its statistics (median of ``reps``, at the prior's centre)."""
    mid = {p.name: sum(p.bounds_internal()) / 2 for p in model.priors.values()}
    times = []
    for r in range(reps):
        t0 = time.perf_counter()
        model.stats_of(model.simulate(mid, seed=r))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def split_days(real: TrafficGrid, days: float | None) -> tuple[TrafficGrid, TrafficGrid | None]:
    """(the first ``days`` days, the days after them or None): what is fitted and what is held out."""
    if real.step <= 0 or 86400 % real.step:
        raise UserError(f"the real grid's step {format_step(real.step)} does not divide a day")
    per_day = 86400 // real.step
    total_days = real.shape[0] / per_day
    if days is None:
        return real, None
    if not 1 <= days <= total_days:
        raise UserError(f"--days {days:g}: the real grid holds {total_days:g} days; fit between 1 and that")
    n_fit = int(round(days * per_day))
    if n_fit >= real.shape[0]:
        return real, None
    cut = int(real.timestamps[n_fit])
    return real.slice_time(None, cut), real.slice_time(cut, None)


def calibrate(real: TrafficGrid, preset: str = "milano-like", days: float | None = None,
              params: Sequence[str] | None = None, widen: float = 0.5, population: int = 200,
              generations: int = 8, max_minutes: float = 12.0, min_acceptance: float = 0.02,
              workers: int = 1, dask: str | None = None, seed: int = 0, db: str | Path | None = None,
              config=None, log: Callable[[str], None] | None = None, method: str | None = None,
              simulations: int = 6000) -> CalibrationResult:
    """Posterior of the simulator's parameters for ``real`` (its first ``days`` days).

    ``method``: ``abc`` (pyabc ABC-SMC: ``population``, ``generations``, ``min_acceptance``) or
    ``npe`` (sbi neural posterior estimation: ``simulations`` draws from the prior, one density
    network, ``population`` posterior samples). Both stop simulating at ``max_minutes``.
    """
    log = log or (lambda _m: None)
    method = method or DEFAULT_METHOD
    if method not in ("abc", "npe"):
        raise UserError(f"--method must be abc or npe, got {method!r}")
    if int(simulations) != simulations or simulations < 100:
        raise UserError(f"--simulations must be a whole number >= 100, got {simulations}")
    fit, _ = split_days(real, days)
    per_day = 86400 // real.step
    days = fit.shape[0] / per_day
    services = [s for s in fit.services if s in ("call", "sms", "net")]
    if not services:
        raise UserError(f"the real grid has none of the services call, sms, net (it has {', '.join(real.services)})")
    fit = fit.select_services(services)
    for name, v in (("--population", population), ("--generations", generations)):
        if int(v) != v or v < 1:
            raise UserError(f"{name} must be a positive whole number, got {v}")
    if not max_minutes > 0:
        raise UserError(f"--max-minutes must be > 0, got {max_minutes}")
    if params and list(params) == ["full"]:
        names = default_params(services, full=True)
    else:
        names = list(params) if params else default_params(services)
    priors = build_priors(preset, names, widen, config)
    observed_all = summary_stats(fit, services)
    stat_names = [k for k, v in observed_all.items() if np.isfinite(v) and k.split(".")[-1] not in NOT_FITTED]
    if not stat_names:
        raise UserError("no summary statistic can be computed on the real grid")
    observed = {k: observed_all[k] for k in stat_names}
    H, W = fit.shape[1:3]
    from simmstnet.sim.simulator import estimate_memory
    from simmstnet.utils import check_memory

    running = 1 if dask else max(1, int(workers))
    peak, _ = estimate_memory(H, W, fit.shape[0], len(services), scenarios=running, workers=running)
    check_memory(peak, f"calibrating on {H}x{W} squares x {fit.shape[0]} steps x {len(services)} services "
                       f"({running} simulation{'s' if running > 1 else ''} at once; fit fewer --days, a smaller "
                       f"block of squares or fewer --workers)")
    model = SimModel(preset, priors, H, W, days, fit.step, int(fit.timestamps[0]),
                     services, stat_names, config)
    per_sim = estimate_seconds(model)
    log(f"calibrating {len(priors)} parameters on {len(stat_names)} statistics of {H}x{W} squares x "
        f"{fit.shape[0]} steps ({format_step(fit.step)}, {days:g} days, {', '.join(services)}); "
        f"one simulation takes {per_sim:.2f} s")

    if method == "npe":
        return _calibrate_npe(model, priors, observed, fit, preset, services, int(simulations), int(population),
                              max_minutes, workers, dask, seed, log)
    import pyabc

    np.random.seed(int(seed) % 2**32)
    prior = pyabc.Distribution(**{p.name: pyabc.RV("uniform", p.bounds_internal()[0],
                                                  p.bounds_internal()[1] - p.bounds_internal()[0])
                                  for p in priors})
    with _progress(log, time.perf_counter(), int(generations)):  # silences the sampler's set-up line
        sampler, client = _sampler(workers, dask)
    distance = pyabc.AdaptivePNormDistance(p=2)
    abc = pyabc.ABCSMC(model, prior, distance, population_size=int(population), sampler=sampler)
    db = Path(db) if db else Path(tempfile_db())
    if db.exists():
        db.unlink()
    t0 = time.perf_counter()
    model.deadline = time.time() + 60 * float(max_minutes)
    try:
        with _progress(log, t0, int(generations)):
            abc.new(f"sqlite:///{db}", observed)
            from datetime import timedelta

            try:
                history = abc.run(max_nr_populations=int(generations), min_acceptance_rate=float(min_acceptance),
                                  max_walltime=timedelta(minutes=float(max_minutes)))
            except (ValueError, np.linalg.LinAlgError) as exc:
                # importance weights collapsed onto a few particles (it happens with many parameters):
                # the proposal for the next generation cannot be fitted; the generations stored so
                # far are complete, so the last of them is the posterior
                history = abc.history
                log(f"ABC-SMC stopped after generation {history.max_t + 1}: the next proposal could not be "
                    f"fitted ({str(exc).splitlines()[0][:80]}); using the last complete generation")
    finally:
        model.deadline = None
        if client is not None:
            client.close()
    seconds = time.perf_counter() - t0
    if history.max_t < 0:
        raise UserError(f"--max-minutes {max_minutes:g}: not even the first generation of {population} particles "
                        f"finished in time (one simulation takes {per_sim:.2f} s); allow more minutes or "
                        f"lower --population")
    df, w = history.get_distribution(m=0, t=history.max_t)
    pops = history.get_all_populations()
    sims = int(pops.samples.sum())  # completed generations (and the prior calibration sample) only
    pops = pops[pops.t >= 0]
    eps = [float(e) for e in pops.epsilon]
    wn = np.asarray(w, dtype=float) / float(np.sum(w))
    ess = float(1.0 / np.sum(wn ** 2))
    log(f"ABC-SMC: {history.max_t + 1} generations, {sims} simulations in {seconds:.0f} s; "
        f"final threshold {eps[-1]:.3g}, effective sample size {ess:.0f} of {len(wn)}")
    if ess < 0.1 * len(wn):
        warnings.warn(f"the posterior rests on about {ess:.0f} of {len(wn)} particles (importance weights "
                      f"collapsed): its intervals are unreliable; fit fewer --params or raise --population",
                      CalibrationWarning, stacklevel=2)
    return CalibrationResult(preset, priors, df.reset_index(drop=True), np.asarray(w, dtype=float), observed,
                             model, history.max_t + 1, sims, seconds, eps, levels(fit, services))


class _GenerationLog:
    """logging handler on pyabc's "ABC" logger: one line per generation into ``log``."""

    def __init__(self, log, t0: float, generations: int):
        import logging

        self.handler = logging.Handler(logging.INFO)
        self.handler.emit = self.emit
        self.log, self.t0, self.generations, self.eps = log, t0, generations, None

    def emit(self, record) -> None:
        msg = record.getMessage()
        if record.name != "ABC":
            return
        if msg.startswith("t: ") and ", eps: " in msg:
            self.t = int(msg[3:msg.index(",")])
            self.eps = float(msg.split("eps: ")[1].rstrip("."))
        elif msg.startswith("Accepted: ") and self.eps is not None:
            acc = msg.split("Accepted: ")[1].split(" =")[0]
            try:
                a, n = (int(x) for x in acc.split(" / "))
                acc = f"{a} of {n} simulations ({a / max(n, 1):.0%})"
            except ValueError:
                pass
            ess = msg.split("ESS: ")[1].rstrip(".") if "ESS: " in msg else "?"
            try:
                ess = f"{float(ess):.0f}"
            except ValueError:
                pass
            self.log(f"generation {self.t + 1}/{self.generations}: threshold {self.eps:.3g}, accepted {acc}, "
                     f"effective sample size {ess}, "
                     f"{time.perf_counter() - self.t0:.0f} s")


class _progress:
    """Context: pyabc's own log lines silenced, one progress line per generation instead."""

    def __init__(self, log, t0: float, generations: int):
        self.gen = _GenerationLog(log, t0, generations)

    def __enter__(self):
        import logging

        self.abc = logging.getLogger("ABC")
        self.saved = (self.abc.level, list(self.abc.handlers), self.abc.propagate)
        self.abc.handlers[:] = [self.gen.handler]
        self.abc.setLevel(logging.INFO)
        self.abc.propagate = False
        self.children = {}
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("ABC."):
                child = logging.getLogger(name)
                self.children[name] = child.level
                child.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc):
        import logging

        level, handlers, propagate = self.saved
        self.abc.setLevel(level)
        self.abc.handlers[:] = handlers
        self.abc.propagate = propagate
        for name, lvl in self.children.items():
            logging.getLogger(name).setLevel(lvl)
        return False


def _batch_stats(model: SimModel, theta) -> "object":
    """sbi simulator: (batch, d) parameters (internal units) -> (batch, k) float32 tensor of the
    statistics; a statistic that cannot be computed is NaN (sbi leaves those simulations out)."""
    import torch

    rows = []
    for th in np.asarray(theta, dtype=float).reshape(-1, len(model.priors)):
        par = dict(zip(model.priors, th))
        st = model.stats_of(model.simulate(par, seed=int(np.random.randint(0, 2**31 - 1))), missing=np.nan)
        rows.append([st[k] for k in model.stat_names])
    return torch.as_tensor(np.asarray(rows, dtype=np.float32))


class _Simulator:
    """Picklable callable for sbi's joblib workers."""

    def __init__(self, model: SimModel):
        self.model = model

    def __call__(self, theta):
        return _batch_stats(self.model, theta)


class _NoTracker:
    """sbi training tracker that records nothing (sbi's default writes TensorBoard logs into an
    ``sbi-logs`` folder of the current directory)."""

    log_dir = None

    def log_metric(self, name, value, step=None) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_params(self, params) -> None:
        pass

    def add_figure(self, name, figure, step=None) -> None:
        pass

    def flush(self) -> None:
        pass


def _calibrate_npe(model: SimModel, priors: list[Prior], observed: dict, fit: TrafficGrid, preset: str,
                   services: list[str], n_sims: int, n_post: int, max_minutes: float, workers: int,
                   dask: str | None, seed: int, log) -> CalibrationResult:
    """Neural posterior estimation (sbi, Greenberg et al. 2019 / Papamakarios & Murray 2016): simulate
    from the prior in chunks (joblib workers, or a Dask cluster through joblib's dask backend) until
    ``n_sims`` or 80 % of the time budget, train one masked autoregressive flow on the statistics,
    sample the posterior at the real statistics."""
    import joblib
    import pandas as pd
    import torch
    from sbi.inference import NPE, simulate_for_sbi
    from sbi.utils import BoxUniform

    torch.manual_seed(int(seed))
    lo = torch.tensor([p.bounds_internal()[0] for p in priors], dtype=torch.float32)
    hi = torch.tensor([p.bounds_internal()[1] for p in priors], dtype=torch.float32)
    prior = BoxUniform(lo, hi)
    sim = _Simulator(model)
    client = None
    backend = joblib.parallel_config(backend="loky")
    n_jobs = max(1, int(workers))
    if dask:
        client = _dask_client(dask)
        backend = joblib.parallel_config(backend="dask")
        n_jobs = max(2, sum(client.nthreads().values()))
    t0 = time.perf_counter()
    budget = 60 * float(max_minutes)
    chunk = max(50, min(1000, n_sims // 10))
    thetas, xs = [], []
    try:
        with backend:
            done = 0
            while done < n_sims and time.perf_counter() - t0 < 0.8 * budget:
                n = min(chunk, n_sims - done)
                th, x = simulate_for_sbi(sim, prior, num_simulations=n, num_workers=n_jobs,
                                         simulation_batch_size=max(1, n // (4 * n_jobs)),
                                         seed=int(seed) * 1000 + len(thetas), show_progress_bar=False)
                thetas.append(th)
                xs.append(x)
                done += n
                log(f"simulated {done} of {n_sims} from the prior, {time.perf_counter() - t0:.0f} s")
    finally:
        if client is not None:
            client.close()
    theta, x = torch.cat(thetas), torch.cat(xs)
    ok = torch.isfinite(x).all(1)
    if int(ok.sum()) < 100:
        raise UserError(f"only {int(ok.sum())} simulations with every statistic finished within --max-minutes "
                        f"{max_minutes:g}; allow more minutes")
    t_sim = time.perf_counter() - t0
    log(f"training the posterior network on {int(ok.sum())} simulations (stops when its validation loss "
        f"has not improved for 20 epochs)")
    inference = NPE(prior=prior, density_estimator="maf", show_progress_bars=False, tracker=_NoTracker())
    inference.append_simulations(theta[ok], x[ok])
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # sbi prints its convergence line
        inference.train(max_num_epochs=300, stop_after_epochs=20)
    posterior = inference.build_posterior()
    x_obs = torch.tensor([[observed[k] for k in model.stat_names]], dtype=torch.float32)
    samples = posterior.sample((int(n_post),), x=x_obs, show_progress_bars=False).numpy()
    seconds = time.perf_counter() - t0
    log(f"NPE: {int(ok.sum())} simulations in {t_sim:.0f} s, flow trained and sampled in {seconds - t_sim:.0f} s")
    df = pd.DataFrame(samples.astype(float), columns=[p.name for p in priors])
    return CalibrationResult(preset, priors, df, np.full(len(df), 1.0 / len(df)), observed, model, 1,
                             int(ok.sum()), seconds, [], levels(fit, services), method="npe")


def tempfile_db() -> str:
    import tempfile

    fd, path = tempfile.mkstemp(prefix="simmstnet-abc-", suffix=".db")
    import os

    os.close(fd)
    return path


# ----------------------------------------------------------------------------- checks and outputs

def posterior_table(res: CalibrationResult) -> list[dict]:
    """Per parameter: prior range, posterior median and 90 % interval, and whether it is identified."""
    nat = res.natural_particles()
    rows = []
    for p in res.priors:
        x = nat[p.name]
        q05, q50, q95 = _wquantile(x, res.weights, [0.05, 0.5, 0.95])
        if p.log:
            share = (math.log(max(q95, 1e-300)) - math.log(max(q05, 1e-300))) / (0.9 * (math.log(p.hi) - math.log(p.lo)))
        else:
            share = (q95 - q05) / (0.9 * (p.hi - p.lo)) if p.hi > p.lo else 0.0
        rows.append({"name": p.name, "prior": [p.lo, p.hi], "median": float(q50), "q05": float(q05),
                     "q95": float(q95), "width_share": float(share), "identified": bool(share <= IDENTIFIED_SHARE)})
    return rows


def predictive_check(res: CalibrationResult, draws: int = 40, seed: int = 0,
                     holdout: TrafficGrid | None = None) -> dict:
    """Posterior-predictive checks: ``draws`` particles, each simulated with a fresh seed.

    Per statistic the real value, the predictive median and 90 % band, and whether the real value
    lies inside. The global scale of each service that matches the real mean level (scale used x
    real mean / simulated mean, per draw). With ``holdout`` (real days after the fitted ones):
    each draw is also simulated over the held-out span and compared with it by realism.compare
    (MMD^2 of day windows, and the held-out data's own first-vs-second-half MMD^2 for scale).
    """
    rng = np.random.default_rng(seed)
    m = res.model
    stats, scales, held = [], {s: [] for s in m.services}, []
    for k, par in enumerate(res.draw(int(draws), rng)):
        g = m.simulate(par, seed=10_000 + k)
        stats.append(m.stats_of(g))
        lv = levels(g, m.services)
        for s in m.services:
            used = g.meta["sim_params"][f"scale_{s}"]
            if lv[s] > 0 and np.isfinite(res.real_levels[s]):
                scales[s].append(used * res.real_levels[s] / lv[s])
        if holdout is not None:
            held.append(m.simulate(par, seed=20_000 + k, days=holdout.shape[0] * holdout.step / 86400,
                                   start=int(holdout.timestamps[0])))
    table = []
    for name, real_v in res.observed.items():
        v = np.array([s[name] for s in stats])
        v = v[v != _FAR]
        if v.size == 0:
            table.append({"stat": name, "real": real_v, "median": float("nan"), "q05": float("nan"),
                          "q95": float("nan"), "inside": False})
            continue
        q05, q50, q95 = np.quantile(v, [0.05, 0.5, 0.95])
        table.append({"stat": name, "real": float(real_v), "median": float(q50), "q05": float(q05),
                      "q95": float(q95), "inside": bool(q05 <= real_v <= q95)})
    out = {"draws": int(draws), "stats": table,
           "inside_share": float(np.mean([r["inside"] for r in table])),
           "scale": {s: [float(np.quantile(v, 0.05)), float(np.quantile(v, 0.95))] for s, v in scales.items() if v}}
    if holdout is not None:
        out["holdout"] = holdout_check(holdout.select_services(list(m.services)), held, seed)
    return out


def holdout_check(holdout: TrafficGrid, sims: Sequence[TrafficGrid], seed: int = 0) -> dict:
    """MMD^2 of day windows, simulated against held-out real days (realism.compare), at the grid's
    step and, for a step finer than an hour, hourly too (``*_1h``: the trainer's usual protocol)."""
    out = {"days": holdout.shape[0] * holdout.step / 86400}
    steps = [holdout.step] + ([3600] if holdout.step < 3600 and 3600 % holdout.step == 0 else [])
    for step in steps:
        rep = realism.compare(holdout.resample(step), [g.resample(step) for g in sims], seed=seed)
        tag = "" if step == holdout.step else "_1h"
        out["mmd2" + tag] = {s: v["mmd2"] for s, v in rep["services"].items()}
        out["mmd2_real_halves" + tag] = {s: v["mmd2_real_halves"] for s, v in rep["services"].items()}
    return out


def params_yaml(res: CalibrationResult, table: list[dict], check: dict | None) -> dict:
    """The ``simulate --config`` file: the preset as base, fitted parameters at their posterior
    5-95 % ranges (a fixed value where the two coincide), scales matched to the real levels."""
    params = {}
    for row, p in zip(table, res.priors):
        lo, hi = row["q05"], row["q95"]
        if p.integer:
            lo, hi = int(round(lo)), int(round(hi))
        else:
            lo, hi = float(f"{lo:.6g}"), float(f"{hi:.6g}")
        params[p.name] = lo if lo == hi else [lo, hi]
    if check:
        for s, (lo, hi) in check.get("scale", {}).items():
            spec = SPECS[f"scale_{s}"]
            lo, hi = (float(np.clip(v, *spec.bounds)) for v in (lo, hi))
            params[f"scale_{s}"] = float(f"{lo:.6g}") if lo >= hi else [float(f"{lo:.6g}"), float(f"{hi:.6g}")]
    how = f"ABC-SMC, {res.generations} generations" if res.method == "abc" else "NPE"
    return {"base": res.preset,
            "description": f"calibrated by simmstnet calibrate ({how}, "
                           f"{res.simulations} simulations) from a {res.model.rows}x{res.model.cols} grid, "
                           f"{res.model.days:g} days at {format_step(res.model.step)}",
            "params": params}


def format_report(res: CalibrationResult, table: list[dict], check: dict | None) -> str:
    lines = ["# Calibration report", "",
             f"Preset `{res.preset}`; grid {res.model.rows}x{res.model.cols}, {res.model.days:g} days at "
             f"{format_step(res.model.step)}, services {', '.join(res.model.services)}.",
             (f"ABC-SMC (pyabc): {res.generations} generations, {res.simulations} simulations, "
              f"{res.seconds:.0f} s; thresholds " + ", ".join(f"{e:.3g}" for e in res.epsilons) + "; effective "
              f"sample size of the final population {_ess(res.weights):.0f} of {len(res.weights)}."
              if res.method == "abc" else
              f"Neural posterior estimation (sbi, masked autoregressive flow): {res.simulations} simulations from "
              f"the prior, {res.seconds:.0f} s; {len(res.weights)} posterior samples."), "",
             "## Parameters", "",
             f"Identified: the posterior 90 % interval is at most {IDENTIFIED_SHARE:.0%} of the prior's.", "",
             "| parameter | prior | posterior median | 90 % interval | width / prior | identified |",
             "|---|---|---:|---|---:|---|"]
    for r in table:
        lines.append(f"| `{r['name']}` | {r['prior'][0]:.4g} .. {r['prior'][1]:.4g} | {r['median']:.4g} | "
                     f"{r['q05']:.4g} .. {r['q95']:.4g} | {r['width_share']:.2f} | {'yes' if r['identified'] else 'no'} |")
    if check:
        lines += ["", f"## Posterior-predictive check ({check['draws']} draws)", "",
                  f"Real value inside the 90 % predictive band: {check['inside_share']:.0%} of the statistics.", "",
                  "| statistic | real | predictive median | 90 % band | inside |", "|---|---:|---:|---|---|"]
        for r in check["stats"]:
            lines.append(f"| {r['stat']} | {r['real']:.4g} | {r['median']:.4g} | {r['q05']:.4g} .. {r['q95']:.4g} | "
                         f"{'yes' if r['inside'] else '**no**'} |")
        if "holdout" in check:
            h = check["holdout"]
            lines += ["", f"## Held-out days ({h['days']:g} days after the fitted ones)", "",
                      "| service | MMD^2 simulated vs held-out | MMD^2 held-out first vs second half |", "|---|---:|---:|"]
            for s in h["mmd2"]:
                lines.append(f"| {s} | {h['mmd2'][s]:.4f} | {h['mmd2_real_halves'][s]:.4f} |")
            if "mmd2_1h" in h:
                for s in h["mmd2_1h"]:
                    lines.append(f"| {s} (hourly) | {h['mmd2_1h'][s]:.4f} | {h['mmd2_real_halves_1h'][s]:.4f} |")
    return "\n".join(lines) + "\n"


def write_outputs(res: CalibrationResult, out: str | Path, check: dict | None) -> list[Path]:
    import yaml

    from simmstnet.utils import atomic_path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = posterior_table(res)
    written = []
    files = {
        "params.yaml": yaml.safe_dump(params_yaml(res, table, check), sort_keys=False),
        "report.md": format_report(res, table, check),
        "report.json": json.dumps({"preset": res.preset, "method": res.method, "generations": res.generations,
                                   "simulations": res.simulations, "seconds": res.seconds,
                                   "effective_sample_size": _ess(res.weights),
                                   "epsilons": res.epsilons, "observed": res.observed,
                                   "parameters": table, "check": check}, indent=1, default=float),
    }
    nat = res.natural_particles()
    csv = ["weight," + ",".join(nat)] + [
        f"{res.weights[i]:.6g}," + ",".join(f"{nat[k][i]:.6g}" for k in nat) for i in range(len(res.weights))]
    files["posterior.csv"] = "\n".join(csv) + "\n"
    for name, text in files.items():
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
        written.append(out / name)
    return written
