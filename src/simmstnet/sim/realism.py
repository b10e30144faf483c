"""Realism report: real and simulated traffic statistics side by side, plus one overall distance.

Every statistic is scale-free (each square's series is divided by its own mean), because the
operator's units and the simulator's global scale are both unknown. Grids of different sizes
and steps are compared after summing the finer one to the coarser step. Per service:

- normalized daily profile (mean 1 over local hours) and its Pearson correlation real vs sim;
- weekend (and public holiday) to working-day mean ratio;
- autocorrelation at one day and one week (per square, averaged over squares);
- spatial correlation against distance: mean Pearson correlation between squares d apart
  (d rounded to whole squares), of the normalized series and of their residuals after removing
  each square's mean daily profile (the raw one is dominated by the shared daily cycle);
- coefficient of variation over time (per square, averaged) and over space (of square means);
- upper quantiles (90, 99, 99.9 %) of the normalized values;
- MMD^2 (unbiased, Gaussian kernel, median-heuristic bandwidth; Gretton et al. 2012) between
  sets of day windows (each one local day of one square, divided by its mean): the overall
  distance. For scale it is reported beside the MMD^2 between the two halves of the real data.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from simmstnet.data.grid import TrafficGrid
from simmstnet.errors import UserError
from simmstnet.sim.demand import local_calendar
from simmstnet.utils import format_step

DISTANCES = (1, 2, 3, 4)
MAX_PAIRS = 400
MAX_WINDOWS = 600


def read_block_csv(path: str | Path, rows: int, cols: int, start: str = "2013-11-01",
                   step: int = 600, service: str = "net", timezone: str = "Europe/Rome") -> TrafficGrid:
    """A wide CSV block (T lines, rows*cols columns, row-major, no header) as a TrafficGrid.

    For the shared Milano block: ``read_block_csv(p, 5, 5)``. Empty fields are unobserved.
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, header=None)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"{path}: cannot read as CSV ({exc})") from None
    if frame.shape[1] != rows * cols:
        raise UserError(f"{path}: {frame.shape[1]} columns, expected {rows}x{cols} = {rows * cols}")
    values = frame.to_numpy(dtype=np.float64).reshape(len(frame), rows, cols, 1)
    t0 = int(pd.Timestamp(start).tz_localize(timezone).tz_convert("UTC").timestamp())
    return TrafficGrid.from_values(values, t0, step, (service,),
                                   meta={"source": str(path.name), "timezone": timezone})


def align(real: TrafficGrid, sims: Sequence[TrafficGrid], services: Sequence[str] | None = None):
    """Common services and step: (real, sims, services, step); the finer grids are summed."""
    if not sims:
        raise UserError("no simulated grid to compare")
    common = [s for s in real.services if all(s in g.services for g in sims)]
    if services:
        missing = [s for s in services if s not in common]
        if missing:
            raise UserError(f"service {missing[0]!r} is not in both the real and the simulated data "
                            f"(common: {', '.join(common) or 'none'})")
        common = list(services)
    if not common:
        raise UserError(f"no common service: real has {', '.join(real.services)}, "
                        f"simulated has {', '.join(sims[0].services)}")
    step = max([real.step] + [g.step for g in sims])
    for g, name in [(real, "real")] + [(g, "simulated") for g in sims]:
        if step % g.step:
            raise UserError(f"cannot compare steps: {name} step {format_step(g.step)} does not divide "
                            f"{format_step(step)}")
    real = real.select_services(common).resample(step)
    sims = [g.select_services(common).resample(step) for g in sims]
    return real, sims, common, step


def _normalized(grid: TrafficGrid, service: str) -> np.ndarray:
    """(T, N) float64 series of one service, each square divided by its mean; NaN = unobserved."""
    c = grid.service_index(service)
    T, H, W, _ = grid.shape
    x = np.where(grid.mask[..., c], grid.values[..., c], np.nan).reshape(T, H * W).astype(np.float64)
    with warnings.catch_warnings():  # a never-observed square has no mean: it is left out below
        warnings.simplefilter("ignore", RuntimeWarning)
        m = np.nanmean(x, 0)
    keep = np.isfinite(m) & (m > 0)
    return x[:, keep] / m[keep], keep


def _acf(z: np.ndarray, lag: int) -> float:
    if lag <= 0 or z.shape[0] <= lag + 2:
        return float("nan")
    return _mean_corr(z[:-lag], z[lag:])


def _pair_corr(z: np.ndarray, i: np.ndarray, j: np.ndarray) -> float:
    return _mean_corr(z[:, i], z[:, j])


def _mean_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over columns of the Pearson correlation of a[:, k] and b[:, k], on rows where both
    are finite (NaN when no column has one)."""
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = np.where(ok, a, np.nan), np.where(ok, b, np.nan)
    a = a - np.nanmean(a, 0)
    b = b - np.nanmean(b, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.nansum(a * b, 0) / np.sqrt(np.nansum(a * a, 0) * np.nansum(b * b, 0))
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def _day_windows(z: np.ndarray, cal, steps_per_day: int) -> np.ndarray:
    """(n, steps_per_day) complete local days of single squares, each divided by its mean."""
    T = z.shape[0]
    first = int(np.argmax(cal.hour < 24 / steps_per_day)) if steps_per_day > 1 else 0
    n_days = (T - first) // steps_per_day
    if n_days < 1:
        return np.zeros((0, steps_per_day))
    w = z[first:first + n_days * steps_per_day].reshape(n_days, steps_per_day, -1)
    w = np.moveaxis(w, 2, 1).reshape(-1, steps_per_day)
    w = w[np.isfinite(w).all(1)]
    m = w.mean(1, keepdims=True)
    return w[m[:, 0] > 0] / m[m[:, 0] > 0]


def grid_stats(grid: TrafficGrid, service: str, rng: np.random.Generator) -> dict:
    """Scale-free statistics of one service of one grid (see module docstring)."""
    z, keep = _normalized(grid, service)
    if z.shape[1] == 0:
        raise UserError(f"service {service!r}: no square with observed positive traffic")
    step = grid.step
    cal = local_calendar(grid.timestamps, 0, grid.timezone)
    hour_bin = np.floor(cal.hour).astype(int) % 24
    prof = np.array([np.nanmean(z[hour_bin == h]) if np.any(hour_bin == h) else np.nan for h in range(24)])
    prof = prof / np.nanmean(prof)
    working = cal.daytype == 0
    wk = np.nanmean(z[working]) if working.any() else np.nan
    we = np.nanmean(z[~working]) if (~working).any() else np.nan
    dow = pd.to_datetime(grid.timestamps, unit="s", utc=True).tz_convert(grid.timezone).day_of_week
    weekly = np.array([np.nanmean(z[np.asarray(dow) == d]) if np.any(np.asarray(dow) == d) else np.nan
                       for d in range(7)])
    weekly = weekly / np.nanmean(weekly)
    per_day = 86400 // step if 86400 % step == 0 else 0
    # residuals: remove each square's mean daily profile
    resid = z.copy()
    for h in range(24):
        sel = hour_bin == h
        if sel.any():
            resid[sel] -= np.nanmean(z[sel], 0)
    H, W = grid.shape[1:3]
    rr, cc = np.divmod(np.nonzero(keep)[0], W)
    spatial, spatial_resid = {}, {}
    n = z.shape[1]
    if n > 1:
        i_all, j_all = np.triu_indices(n, 1)
        if i_all.size > 200_000:  # large grids: sample pairs, the statistic is a mean anyway
            pick = rng.choice(i_all.size, 200_000, replace=False)
            i_all, j_all = i_all[pick], j_all[pick]
        dist = np.rint(np.hypot(rr[i_all] - rr[j_all], cc[i_all] - cc[j_all])).astype(int)
        for d in DISTANCES:
            sel = np.nonzero(dist == d)[0]
            if sel.size == 0:
                continue
            if sel.size > MAX_PAIRS:
                sel = rng.choice(sel, MAX_PAIRS, replace=False)
            spatial[d] = _pair_corr(z, i_all[sel], j_all[sel])
            spatial_resid[d] = _pair_corr(resid, i_all[sel], j_all[sel])
    with np.errstate(invalid="ignore"):
        cv_time = float(np.nanmean(np.nanstd(z, 0)))  # z has mean 1 per square
        means = np.nanmean(np.where(grid.mask[..., grid.service_index(service)],
                                    grid.values[..., grid.service_index(service)], np.nan).reshape(len(z), -1), 0)
    means = means[np.isfinite(means)]
    finite = z[np.isfinite(z)]
    q = np.quantile(finite, [0.9, 0.99, 0.999])
    return {
        "squares": int(n), "steps": int(z.shape[0]), "step": format_step(step),
        "profile": prof.tolist(), "weekly": weekly.tolist(),
        "weekend_ratio": float(we / wk) if np.isfinite(we) and np.isfinite(wk) else float("nan"),
        "acf_day": _acf(z, per_day) if per_day else float("nan"),
        "acf_week": _acf(z, 7 * per_day) if per_day else float("nan"),
        "spatial_corr": spatial, "spatial_corr_resid": spatial_resid,
        "cv_time": cv_time, "cv_space": float(means.std() / means.mean()) if means.size > 1 else float("nan"),
        "q90": float(q[0]), "q99": float(q[1]), "q999": float(q[2]),
        "_windows": _day_windows(z, cal, per_day) if per_day else np.zeros((0, 1)),
    }


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> tuple[float, float]:
    """Unbiased MMD^2 with a Gaussian kernel; returns (mmd2, bandwidth used).

    Bandwidth: median pairwise distance of the pooled sample (the median heuristic).
    """
    if len(x) < 2 or len(y) < 2:
        return float("nan"), float("nan")
    xy = np.concatenate([x, y])
    sq = (xy**2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * xy @ xy.T, 0)
    if bandwidth is None:
        bandwidth = float(np.sqrt(np.median(d2[np.triu_indices(len(xy), 1)])))
    k = np.exp(-d2 / (2 * bandwidth**2 + 1e-12))
    n, m = len(x), len(y)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    val = ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
           - 2 * kxy.mean())
    return float(val), bandwidth


def _mean_stats(stats: list[dict]) -> dict:
    """Average numeric statistics over several simulated grids (windows are pooled)."""
    if len(stats) == 1:
        return stats[0]
    import warnings

    warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)  # all-NaN lag: stays NaN
    out = {}
    for key, v in stats[0].items():
        if key == "_windows":
            out[key] = np.concatenate([s[key] for s in stats])
        elif isinstance(v, dict):
            out[key] = {d: float(np.nanmean([s[key].get(d, np.nan) for s in stats])) for d in v}
        elif isinstance(v, list):
            out[key] = np.nanmean([s[key] for s in stats], 0).tolist()
        elif isinstance(v, float):
            out[key] = float(np.nanmean([s[key] for s in stats]))
        else:
            out[key] = v if key != "squares" else int(sum(s[key] for s in stats))
    return out


def _sample(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return w[rng.choice(len(w), MAX_WINDOWS, replace=False)] if len(w) > MAX_WINDOWS else w


def compare(real: TrafficGrid, sims: TrafficGrid | Sequence[TrafficGrid], services: Sequence[str] | None = None,
            seed: int = 0) -> dict:
    """Statistics of real and simulated data per service, their differences and MMD^2.

    Returns ``{"step": str, "services": {name: {"real": stats, "sim": stats, "profile_corr",
    "mmd2", "mmd2_real_halves"}}, "overall_mmd2": mean over services}``.
    """
    sims = [sims] if isinstance(sims, TrafficGrid) else list(sims)
    real, sims, services, step = align(real, sims, services)
    rng = np.random.default_rng(seed)
    report = {"step": format_step(step), "services": {}}
    for s in services:
        r = grid_stats(real, s, rng)
        m = _mean_stats([grid_stats(g, s, rng) for g in sims])
        pr, pm = np.array(r["profile"]), np.array(m["profile"])
        ok = np.isfinite(pr) & np.isfinite(pm)
        corr = float(np.corrcoef(pr[ok], pm[ok])[0, 1]) if ok.sum() > 2 else float("nan")
        wr, wm = _sample(r["_windows"], rng), _sample(m["_windows"], rng)
        val, bw = mmd2(wr, wm)
        half = len(r["_windows"]) // 2
        # the real windows are ordered day-major: the halves are two time periods
        ref, _ = mmd2(_sample(r["_windows"][:half], rng), _sample(r["_windows"][half:], rng), bw)
        report["services"][s] = {"real": r, "sim": m, "profile_corr": corr, "mmd2": val,
                                 "mmd2_real_halves": ref, "bandwidth": bw}
    report["overall_mmd2"] = float(np.nanmean([v["mmd2"] for v in report["services"].values()]))
    return report


def _fmt(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def format_report(report: dict) -> str:
    """Plain-text table: one block per service, real and simulated side by side."""
    lines = [f"realism check at step {report['step']} (statistics of each square's series divided by its mean)"]
    for s, v in report["services"].items():
        r, m = v["real"], v["sim"]
        lines.append("")
        lines.append(f"service {s}: real {r['squares']} squares x {r['steps']} steps, "
                     f"simulated {m['squares']} squares x {m['steps']} steps")
        lines.append(f"  {'statistic':34s} {'real':>9s} {'sim':>9s}")
        rows = [("daily profile correlation", 1.0, v["profile_corr"]),
                ("weekend / working-day ratio", r["weekend_ratio"], m["weekend_ratio"]),
                ("autocorrelation 1 day", r["acf_day"], m["acf_day"]),
                ("autocorrelation 1 week", r["acf_week"], m["acf_week"])]
        for d in DISTANCES:
            if d in r["spatial_corr"] or d in m["spatial_corr"]:
                rows.append((f"spatial corr d={d}", r["spatial_corr"].get(d), m["spatial_corr"].get(d)))
        for d in DISTANCES:
            if d in r["spatial_corr_resid"] or d in m["spatial_corr_resid"]:
                rows.append((f"spatial corr of residuals d={d}", r["spatial_corr_resid"].get(d),
                             m["spatial_corr_resid"].get(d)))
        rows += [("CV over time", r["cv_time"], m["cv_time"]), ("CV over space", r["cv_space"], m["cv_space"]),
                 ("quantile 90% / mean", r["q90"], m["q90"]), ("quantile 99% / mean", r["q99"], m["q99"]),
                 ("quantile 99.9% / mean", r["q999"], m["q999"]),
                 ("MMD^2 day windows (real vs sim)", None, v["mmd2"]),
                 ("MMD^2 real first vs second half", v["mmd2_real_halves"], None)]
        for name, a, b in rows:
            lines.append(f"  {name:34s} {_fmt(a) if a is not None else '':>9s} {_fmt(b) if b is not None else '':>9s}")
        lines.append("  daily profile by local hour (real / sim):")
        lines.append("    real " + " ".join(f"{x:.2f}" for x in r["profile"]))
        lines.append("    sim  " + " ".join(f"{x:.2f}" for x in m["profile"]))
    lines.append("")
    lines.append(f"overall distance (mean MMD^2 over services): {_fmt(report['overall_mmd2'])}")
    return "\n".join(lines)


def report_json(report: dict) -> dict:
    """The report without the window arrays (JSON-serializable)."""
    out = {k: v for k, v in report.items() if k != "services"}
    out["services"] = {}
    for s, v in report["services"].items():
        out["services"][s] = {k: ({kk: vv for kk, vv in x.items() if kk != "_windows"} if isinstance(x, dict) else x)
                              for k, x in v.items()}
    return out


def plot_report(report: dict, out_dir: str | Path, prefix: str = "sim-check") -> list[Path]:
    """One PNG per service: daily profile, weekly profile, spatial correlation, value quantiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simmstnet.utils import atomic_path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, v in report["services"].items():
        r, m = v["real"], v["sim"]
        fig, ax = plt.subplots(1, 4, figsize=(13, 3))
        ax[0].plot(r["profile"], "k-o", ms=3, label="real")
        ax[0].plot(m["profile"], "C1-o", ms=3, label="sim")
        ax[0].set(title=f"{s}: daily profile (r={v['profile_corr']:.2f})", xlabel="local hour")
        ax[0].legend()
        days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
        ax[1].plot(days, r["weekly"], "k-o", ms=3)
        ax[1].plot(days, m["weekly"], "C1-o", ms=3)
        ax[1].set(title="day of week")
        for key, style in (("spatial_corr", "-"), ("spatial_corr_resid", "--")):
            for st, col in ((r, "k"), (m, "C1")):
                d = sorted(st[key])
                ax[2].plot(d, [st[key][x] for x in d], col + style + "o", ms=3)
        ax[2].set(title="spatial corr (dashed: residual)", xlabel="distance (squares)")
        qs = ["q90", "q99", "q999"]
        ax[3].plot(qs, [r[q] for q in qs], "k-o", ms=3)
        ax[3].plot(qs, [m[q] for q in qs], "C1-o", ms=3)
        ax[3].set(title=f"quantiles / mean, MMD2={_fmt(v['mmd2'])}")
        fig.tight_layout()
        path = out_dir / f"{prefix}-{s}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=80, format="png")
        plt.close(fig)
        paths.append(path)
    return paths
