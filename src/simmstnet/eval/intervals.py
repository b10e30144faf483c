"""Prediction intervals by conformal calibration, and their probabilistic metrics.

Method (split conformal prediction with normalized scores: Vovk, Gammerman & Shafer,
*Algorithmic Learning in a Random World*, 2005; Papadopoulos et al. 2002; Lei, G'Sell, Rinaldo,
Tibshirani & Wasserman, "Distribution-free predictive inference for regression", JASA 2018):

1. a **scale** ``s[row, col, c]`` per cell and service, computed from the data the scaler is fitted
   on (the training data range, never the validation or test span): the mean absolute one-step
   change of the cell's observed series (the MASE denominator of Hyndman & Koehler 2006), floored
   at 1 % of the service's median scale; a cell never observed there gets that median;
2. **scores** on every observed target of the validation span: ``|y - p| / s[cell, c]``;
3. per horizon step ``h`` and service ``c`` and per level ``1 - alpha``, ``q[h, c]`` = the
   ``ceil((n + 1)(1 - alpha))``-th smallest of the ``n`` scores (the finite-sample conformal
   quantile; its largest score when that rank exceeds ``n``);
4. the interval of a forecast ``p`` is ``[p - q s, p + q s]``, its lower bound raised to 0 when
   the forecast itself is not negative (traffic is never negative; raising it cannot lose
   coverage), so every interval holds its point forecast.

Under exchangeability of validation and test scores the coverage is at least ``1 - alpha``
(and below ``1 - alpha + 1/(n+1)``) per horizon step and service. Because the score is divided
by the cell's own scale, a quiet cell gets a proportionally narrower band than a busy one.

Adaptive variant (``method="aci"``, the default; adaptive conformal inference: Gibbs & Candès,
"Adaptive conformal inference under distribution shift", NeurIPS 2021): over the chronologically
ordered issue times of the evaluated span, each (cell, horizon step, service) keeps its own
level ``alpha_t``, starting at the nominal ``alpha``, and uses the conformal quantile of the
validation scores at ``1 - alpha_t``; once the truth of a forecast is known (its target lies at
or before the current issue time, so feedback for horizon step ``h`` arrives ``h`` steps late)
``alpha <- alpha + gamma (alpha_nominal - err)`` with ``err`` 1 if that forecast missed, else 0
(``gamma`` = ``ACI_GAMMA``). ``alpha_t <= 0`` uses the largest validation score, ``alpha_t >= 1``
a zero-width interval. ``predict`` replays the last ``ACI_REPLAY_DAYS`` days of the input file
(forecasts whose truth it holds) to reach the current levels.

The default is chosen by measured coverage (``benchmarks/bench_intervals.py``, docs/intervals.md):
on the Milano block the validation span (a weekend) is calmer than the test span (weekdays),
split conformal under-covers by 4-5 points there, and per-cell ACI brings coverage and the
10th-percentile cell back within the targets at a moderately larger width.

Metrics (:class:`IntervalAccumulator`), per service and pooled, over observed targets:
coverage, mean width, interval (Winkler) score ``scoringrules.interval_score``; the pinball
loss ``scoringrules.quantile_score`` averaged over the quantile levels the intervals define
(``alpha/2``, ``1 - alpha/2`` per level, and the point forecast as the median); CRPS
approximated from those quantiles (``scoringrules.crps_quantile``, Berrisch & Ziel 2023); per
cell: MAE, mean truth and coverage (the maps and ``cell_coverage_p10_<level>``, the 10th
percentile over cells).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from simmstnet.errors import UserError

DEFAULT_LEVELS = (0.8, 0.95)
DEFAULT_METHOD = "aci"
METHODS = ("split", "aci")
ACI_GAMMA = 0.02
ACI_REPLAY_DAYS = 7  # predict: days of recent forecasts replayed to adapt the ACI levels
CALIBRATION_FILE = "calibration.npz"
_REF_POINTS = 2049  # order statistics kept per (horizon step, service) for ACI's quantile look-up


def level_tag(level: float) -> str:
    """0.8 -> "80", 0.95 -> "95", 0.975 -> "97.5" (column and key suffix)."""
    return f"{100 * level:.10g}"


def parse_levels(text: str | Sequence[float] | None, what: str = "--intervals") -> tuple[float, ...]:
    """``"0.8,0.95"`` -> (0.8, 0.95); each strictly between 0 and 1, distinct; UserError otherwise."""
    if text is None:
        return DEFAULT_LEVELS
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    if not parts or any(p == "" for p in parts):
        raise UserError(f"{what} {text!r}: give nominal coverage levels between 0 and 1, e.g. {what} 0.8,0.95")
    levels = []
    for p in parts:
        try:
            v = float(p)
        except (TypeError, ValueError):
            raise UserError(f"{what} {text!r}: {p!r} is not a number; give levels such as 0.8,0.95") from None
        if not (0.0 < v < 1.0) or not math.isfinite(v):
            raise UserError(f"{what} {text!r}: a level must lie strictly between 0 and 1 "
                            f"(0.95 means a 95 % interval), got {p}")
        levels.append(v)
    if len(set(levels)) != len(levels):
        raise UserError(f"{what} {text!r}: a level is given twice")
    return tuple(sorted(levels))


def check_method(method: str | None) -> str:
    method = DEFAULT_METHOD if method is None else method
    if method not in METHODS:
        raise UserError(f"interval method {method!r}: choose one of {', '.join(METHODS)}")
    return method


# ----------------------------------------------------------------------------- scales


def cell_scales(values: np.ndarray, mask: np.ndarray, time_range: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, C) float64 scale per cell and service: mean |x_t - x_{t-1}| over observed pairs
    in ``time_range`` of a (T, H, W, C) series; floored at 1 % of the service's median scale;
    cells without an observed pair get the median (see the module docstring)."""
    lo, hi = (0, values.shape[0]) if time_range is None else time_range
    x = values[lo:hi].astype(np.float64)
    m = mask[lo:hi]
    C = x.shape[-1]
    if x.shape[0] < 2:
        return np.ones(x.shape[1:], np.float64)
    pair = m[1:] & m[:-1]
    n = pair.sum(0)
    diff = np.where(pair, np.abs(x[1:] - x[:-1]), 0.0).sum(0)
    scale = np.where(n > 0, diff / np.maximum(n, 1), np.nan)
    for c in range(C):
        s = scale[..., c]
        pos = s[np.isfinite(s) & (s > 0)]
        med = float(np.median(pos)) if pos.size else 1.0
        s = np.where(np.isfinite(s), s, med)
        scale[..., c] = np.maximum(s, 0.01 * med)
    return scale


def scale_range(grid, ranges: dict, input_len: int, train_days: int | None = None) -> tuple[int, int]:
    """The time steps the scales come from: the scaler's fit range (training data range; with a
    ``train_days`` too short for a training window, those days before the validation span)."""
    from simmstnet.data.windows import data_range

    if ranges.get("train") is not None:
        return data_range(ranges["train"], input_len)
    a = ranges["val"][0]
    keep = (train_days or 1) * max(1, 86400 // grid.step)
    return max(0, a - keep), a


# ----------------------------------------------------------------------------- calibration


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The ``ceil((n+1) level)``-th smallest score (finite-sample split conformal quantile);
    the largest score when that rank exceeds n; NaN without scores."""
    s = np.sort(scores[np.isfinite(scores)])
    n = s.size
    if n == 0:
        return float("nan")
    k = int(math.ceil((n + 1) * level)) - 1
    return float(s[min(max(k, 0), n - 1)])


@dataclass
class Calibration:
    """What intervals need: scales per cell, conformal quantiles per (level, step, service).

    levels (K,), scale (Hg, Wg, C), q (K, H, C), ref (M, H, C) evenly spaced order statistics of
    the scores (ACI), n (H, C) scores per step and service, method, gamma (ACI step size).
    """

    levels: tuple[float, ...]
    scale: np.ndarray
    q: np.ndarray
    ref: np.ndarray
    n: np.ndarray
    services: tuple[str, ...]
    method: str = DEFAULT_METHOD
    gamma: float = ACI_GAMMA
    info: dict = field(default_factory=dict)
    # (K, Hg * Wg, H, C) per-cell quantiles of an ACI state (predict); used by bounds() when set
    q_cell: np.ndarray | None = None

    @property
    def horizon(self) -> int:
        return self.q.shape[1]

    def with_levels(self, levels: Sequence[float]) -> "Calibration":
        """The same calibration at other levels (quantiles read from the kept order statistics
        when a level was not calibrated exactly)."""
        levels = tuple(levels)
        q = np.stack([self.q[self.levels.index(lv)] if lv in self.levels else self.quantile(1.0 - lv)
                      for lv in levels])
        return Calibration(levels, self.scale, q, self.ref, self.n, self.services, self.method,
                           self.gamma, dict(self.info))

    def quantile(self, alpha: np.ndarray | float) -> np.ndarray:
        """Conformal quantile at level ``1 - alpha`` from ``ref``, for alpha of shape (..., H, C)
        (or a scalar: (H, C)); alpha <= 0 gives the largest score, alpha >= 1 gives 0."""
        H, C = self.n.shape
        alpha = np.asarray(alpha, np.float64)
        if alpha.ndim < 2:
            alpha = np.broadcast_to(alpha, (H, C))
        M = self.ref.shape[0]
        n = self.n.astype(np.float64)
        # rank ceil((n+1)(1-a)) of n, as a position on the kept order statistics
        rank = np.ceil((n + 1) * (1.0 - np.clip(alpha, 0.0, 1.0)))
        p = np.clip((rank - 1) / np.maximum(n - 1, 1), 0.0, 1.0)
        x = p * (M - 1)
        lo = np.floor(x).astype(np.int64)
        hi = np.minimum(lo + 1, M - 1)
        w = x - lo
        hh, cc = np.arange(H)[:, None], np.arange(C)[None, :]
        out = (1 - w) * self.ref[lo, hh, cc] + w * self.ref[hi, hh, cc]
        out = np.where(alpha >= 1.0, 0.0, out)
        out = np.where(alpha <= 0.0, self.ref[-1], out)
        return np.where(n > 0, out, np.nan)

    def bounds(self, pred: np.ndarray, rows: np.ndarray, cols: np.ndarray,
               q: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds (K, B, H, C) of forecasts ``pred`` (B, H, C) of cells
        (rows, cols) (B,); ``q`` (K, H, C) overrides the calibrated quantiles (ACI)."""
        if q is None:
            q = self.q if self.q_cell is None else self.q_cell[:, np.asarray(rows) * self.scale.shape[1]
                                                               + np.asarray(cols)]
        s = self.scale[rows, cols][:, None, :]                      # (B, 1, C)
        half = (q[:, None] if q.ndim == 3 else q) * s[None]          # (K, B, H, C)
        p = np.asarray(pred, np.float64)[None]
        lower = np.maximum(p - half, np.minimum(p, 0.0))
        return lower, p + half

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        import json

        from simmstnet.utils import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, levels=np.asarray(self.levels), scale=self.scale.astype(np.float32),
                         q=self.q, ref=self.ref.astype(np.float32), n=self.n,
                         services=np.array(self.services, dtype=str), method=np.array(self.method),
                         gamma=np.float64(self.gamma), info=np.array(json.dumps(self.info)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        import json

        try:
            z = np.load(path, allow_pickle=False)
            return cls(tuple(float(v) for v in z["levels"]), z["scale"].astype(np.float64),
                       z["q"].astype(np.float64), z["ref"].astype(np.float64), z["n"].astype(np.int64),
                       tuple(str(s) for s in z["services"]), str(z["method"]), float(z["gamma"]),
                       json.loads(str(z["info"])))
        except (OSError, KeyError, ValueError) as exc:
            raise UserError(f"{path}: not a readable interval calibration ({exc})") from None


class ScoreCollector:
    """Collects normalized validation scores ``|y - p| / s`` batch by batch (see :func:`calibrate`)."""

    def __init__(self, scale: np.ndarray, horizon: int, services: Sequence[str]):
        self.scale = np.asarray(scale, np.float64)
        self.horizon = horizon
        self.services = tuple(services)
        self.parts: list[np.ndarray] = []

    def update(self, pred: np.ndarray, y: np.ndarray, mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
        s = self.scale[rows, cols][:, None, :]
        score = np.abs(np.asarray(pred, np.float64) - np.where(mask, y, 0.0)) / s
        self.parts.append(np.where(mask, score, np.nan).astype(np.float32))

    def fit(self, levels: Sequence[float] = DEFAULT_LEVELS, method: str = DEFAULT_METHOD,
            gamma: float = ACI_GAMMA, info: dict | None = None) -> Calibration:
        levels = tuple(levels)
        H, C = self.horizon, len(self.services)
        scores = np.concatenate(self.parts) if self.parts else np.zeros((0, H, C), np.float32)
        q = np.full((len(levels), H, C), np.nan)
        ref = np.zeros((_REF_POINTS, H, C))
        n = np.zeros((H, C), np.int64)
        for h in range(H):
            for c in range(C):
                s = np.sort(scores[:, h, c][np.isfinite(scores[:, h, c])].astype(np.float64))
                n[h, c] = s.size
                if s.size == 0:
                    continue
                for k, lv in enumerate(levels):
                    j = int(math.ceil((s.size + 1) * lv)) - 1
                    q[k, h, c] = s[min(max(j, 0), s.size - 1)]
                ref[:, h, c] = np.quantile(s, np.linspace(0.0, 1.0, _REF_POINTS))
        if not n.all():
            h, c = (int(v) for v in np.argwhere(n == 0)[0])
            raise UserError(f"no observed validation target at horizon step {h + 1} of service "
                            f"{self.services[c]!r}: intervals cannot be calibrated")
        return Calibration(levels, self.scale, q, ref, n, self.services, check_method(method), gamma,
                           dict(info or {}))


def calibrate(model, ds, scale: np.ndarray, levels: Sequence[float] = DEFAULT_LEVELS,
              method: str = DEFAULT_METHOD, batch_size: int = 256, device="cpu", amp: bool = True,
              info: dict | None = None) -> Calibration:
    """Split conformal calibration of ``model`` on every window of ``ds`` (the validation span)."""
    from simmstnet.eval.forecast import forecast_batches

    col = ScoreCollector(scale, ds.horizon, ds.services)
    for batch, pred in forecast_batches(model, ds, None, batch_size, device, amp):
        _, rows, cols = ds.window_info(batch["index"])
        col.update(ds.scaler.inverse(pred.double()).numpy(), batch["y_raw"].double().numpy(),
                   batch["y_mask"].numpy(), rows, cols)
    return col.fit(levels, method, info=info)


# ----------------------------------------------------------------------------- metrics


class IntervalAccumulator:
    """Running interval metrics per service, pooled and per cell; feed batches, read :meth:`result`.

    ``update(pred, y, mask, lower, upper, rows, cols)``: pred, y, mask (B, H, C) original units;
    lower, upper (K, B, H, C); rows, cols (B,).
    """

    def __init__(self, services: Sequence[str], levels: Sequence[float], grid_hw: tuple[int, int]):
        import scoringrules  # noqa: F401  (fail early if missing)

        self.services = tuple(services)
        self.levels = tuple(levels)
        K, C = len(self.levels), len(self.services)
        alphas = [1.0 - lv for lv in self.levels]
        # Quantile levels the intervals define, ascending: lower bounds (widest first), median, upper.
        self.qlevels = np.array(sorted([a / 2 for a in alphas]) + [0.5] + sorted([1 - a / 2 for a in alphas]))
        self.n = np.zeros(C)
        self.cover = np.zeros((K, C))
        self.width = np.zeros((K, C))
        self.winkler = np.zeros((K, C))
        self.pinball = np.zeros(C)
        self.crps = np.zeros(C)
        Hg, Wg = grid_hw
        self.cell_n = np.zeros((Hg, Wg, C))
        self.cell_abs = np.zeros((Hg, Wg, C))
        self.cell_truth = np.zeros((Hg, Wg, C))
        self.cell_cover = np.zeros((K, Hg, Wg, C))

    def update(self, pred, y, mask, lower, upper, rows, cols) -> None:
        import scoringrules as sr

        p = np.asarray(pred, np.float64)
        m = np.asarray(mask, bool)
        t = np.where(m, np.asarray(y, np.float64), 0.0)
        K = len(self.levels)
        inside = (lower <= t[None]) & (t[None] <= upper)                 # (K, B, H, C)
        rows, cols = np.asarray(rows), np.asarray(cols)
        self.n += m.sum((0, 1))
        cell_m = m.sum(1)                                                 # (B, C)
        np.add.at(self.cell_n, (rows, cols), cell_m)
        np.add.at(self.cell_abs, (rows, cols), np.where(m, np.abs(p - t), 0.0).sum(1))
        np.add.at(self.cell_truth, (rows, cols), t.sum(1))
        for k in range(K):
            ok = inside[k] & m
            self.cover[k] += ok.sum((0, 1))
            self.width[k] += np.where(m, upper[k] - lower[k], 0.0).sum((0, 1))
            np.add.at(self.cell_cover[k], (rows, cols), ok.sum(1))
        # Scores over observed targets only (flattened per service).
        for c in range(len(self.services)):
            sel = m[..., c]
            if not sel.any():
                continue
            obs = t[..., c][sel]
            for k, lv in enumerate(self.levels):
                self.winkler[k, c] += np.sum(sr.interval_score(obs, lower[k][..., c][sel], upper[k][..., c][sel],
                                                               1.0 - lv, backend="numpy"))
            order = np.argsort([1.0 - lv for lv in self.levels])[::-1]  # widest interval first
            fct = np.stack([lower[k][..., c][sel] for k in order] + [p[..., c][sel]]
                           + [upper[k][..., c][sel] for k in order[::-1]], axis=-1)
            qs = sr.quantile_score(obs[:, None], fct, self.qlevels[None, :], backend="numpy")
            self.pinball[c] += float(np.sum(qs)) / len(self.qlevels)
            self.crps[c] += float(np.sum(sr.crps_quantile(obs, fct, self.qlevels, backend="numpy")))

    def cell_coverage(self) -> np.ndarray:
        """(K, Hg, Wg, C) coverage per cell, NaN where a cell has no observed target."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.cell_n > 0, self.cell_cover / np.maximum(self.cell_n, 1), np.nan)

    def cell_table(self) -> dict:
        """Per-cell arrays (Hg, Wg, C): n, mae, mean, rel_mae (MAE / mean truth), and
        coverage (K, Hg, Wg, C); NaN where a cell has no observed target."""
        with np.errstate(invalid="ignore", divide="ignore"):
            n = self.cell_n
            mae = np.where(n > 0, self.cell_abs / np.maximum(n, 1), np.nan)
            mean = np.where(n > 0, self.cell_truth / np.maximum(n, 1), np.nan)
            rel = np.where(mean > 0, mae / np.where(mean > 0, mean, 1.0), np.nan)
        return {"n": n, "mae": mae, "mean": mean, "rel_mae": rel, "coverage": self.cell_coverage(),
                "levels": self.levels, "services": self.services}

    def _block(self, idx) -> dict:
        n = float(self.n[idx].sum())
        out: dict = {}
        if n == 0:
            for lv in self.levels:
                tag = level_tag(lv)
                out.update({f"coverage_{tag}": None, f"width_{tag}": None, f"winkler_{tag}": None,
                            f"cell_coverage_p10_{tag}": None})
            return {**out, "pinball": None, "crps": None}
        cov = self.cell_coverage()
        for k, lv in enumerate(self.levels):
            tag = level_tag(lv)
            out[f"coverage_{tag}"] = float(self.cover[k, idx].sum() / n)
            out[f"width_{tag}"] = float(self.width[k, idx].sum() / n)
            out[f"winkler_{tag}"] = float(self.winkler[k, idx].sum() / n)
            cells = cov[k][..., idx].ravel()
            cells = cells[np.isfinite(cells)]
            out[f"cell_coverage_p10_{tag}"] = float(np.percentile(cells, 10)) if cells.size else None
        out["pinball"] = float(self.pinball[idx].sum() / n)
        out["crps"] = float(self.crps[idx].sum() / n)
        return out

    def result(self) -> dict:
        """``{service: {coverage_<tag>, width_<tag>, winkler_<tag>, cell_coverage_p10_<tag>, pinball,
        crps}, "overall": {...}}`` with tag = level in percent (80, 95)."""
        out = {s: self._block([c]) for c, s in enumerate(self.services)}
        out["overall"] = self._block(list(range(len(self.services))))
        return out


# ----------------------------------------------------------------------------- ACI


class AciBuffer:
    """Buffers a span's forecasts, then scores them with adaptive conformal inference in issue-time order.

    ``per_cell``: one level alpha per (cell, horizon step, service) instead of one per (horizon
    step, service) shared by every cell (each cell then follows its own miscoverage).
    """

    def __init__(self, cal: Calibration, per_cell: bool = True, keep_bounds: bool = False, flush: int = 65536):
        self.cal = cal
        self.per_cell = per_cell
        self.keep_bounds = keep_bounds
        self.flush = flush
        self.parts: list[tuple] = []

    def update(self, start, rows, cols, pred, y, mask) -> None:
        self.parts.append((np.asarray(start), np.asarray(rows), np.asarray(cols), np.asarray(pred, np.float64),
                           np.asarray(y, np.float64), np.asarray(mask, bool)))

    def finish(self, acc: IntervalAccumulator | None, next_start: int | None = None) -> dict:
        """Feed ``acc`` (if any) with ACI intervals. Returns ``alpha`` (K, G, H, C) after the
        feedback known at issue start ``next_start`` (default: after the last start), G = 1 or
        the number of cells, and summaries ``alpha_final`` / ``alpha_mean`` averaged over groups."""
        cal = self.cal
        K, H, C = len(cal.levels), cal.horizon, len(cal.services)
        Hg, Wg = cal.scale.shape[:2]
        G = Hg * Wg if self.per_cell else 1
        alpha0 = np.array([1.0 - lv for lv in cal.levels])[:, None, None, None] * np.ones((K, G, H, C))
        alpha = alpha0.copy()
        if not self.parts:
            return {"alpha": alpha, "alpha_final": alpha.mean(1).tolist(), "alpha_mean": alpha.mean(1).tolist()}
        start, rows, cols, pred, y, mask = (np.concatenate(a) for a in zip(*self.parts))
        order = np.argsort(start, kind="stable")
        start, rows, cols, pred, y, mask = start[order], rows[order], cols[order], pred[order], y[order], mask[order]
        group = rows * Wg + cols if self.per_cell else np.zeros(start.size, np.int64)
        uniq, first = np.unique(start, return_index=True)
        bounds = list(first[1:]) + [start.size]
        history = np.zeros((K, H, C))
        steps = np.arange(H)
        # Forecasts whose truth is not fed back yet: [start, miscoverage (K, G, H, C), observed (G, H, C), fed (H,)].
        pending: list[list] = []
        chunk: list[tuple] = []   # bounds waiting to be scored (one accumulator call per chunk: fast)
        chunk_n = [0]
        kept: list[tuple] = []

        def score(force=False):
            if chunk and (force or chunk_n[0] >= self.flush):
                parts = [np.concatenate(a, axis=1 if i in (3, 4) else 0) for i, a in enumerate(zip(*chunk))]
                if acc is not None:
                    acc.update(*parts[:3], parts[3], parts[4], parts[5], parts[6])
                chunk.clear()
                chunk_n[0] = 0

        def feed(u):
            # At issue start u (last input step u + L - 1) the truth of start s, step h is known
            # when its target s + L + h <= u + L - 1, i.e. s <= u - h - 1.
            nonlocal alpha, pending
            for s, err, obs, fed in pending:
                due = ~fed & (s <= u - steps - 1)
                if not due.any():
                    continue
                for h in np.flatnonzero(due):
                    alpha[:, :, h] = np.where(obs[None, :, h], alpha[:, :, h] + cal.gamma * (alpha0[:, :, h]
                                                                                            - err[:, :, h]),
                                              alpha[:, :, h])
                    fed[h] = True
            pending = [e for e in pending if not e[3].all()]

        for u, lo, hi in zip(uniq, first, bounds):
            feed(u)
            g = group[lo:hi]
            q = cal.quantile(alpha[:, g])                                     # (K, B, H, C)
            lower, upper = cal.bounds(pred[lo:hi], rows[lo:hi], cols[lo:hi], q)
            chunk.append((pred[lo:hi], y[lo:hi], mask[lo:hi], lower, upper, rows[lo:hi], cols[lo:hi]))
            chunk_n[0] += hi - lo
            if self.keep_bounds:
                kept.append((start[lo:hi], lower, upper))
            score()
            m = mask[lo:hi]
            t = np.where(m, y[lo:hi], 0.0)
            miss = ((lower > t[None]) | (t[None] > upper)) & m[None]          # (K, B, H, C)
            n_obs = np.zeros((G, H, C))
            n_miss = np.zeros((K, G, H, C))
            if self.per_cell:  # one window per cell and start: plain assignment
                n_obs[g] = m
                n_miss[:, g] = miss
            else:
                n_obs[0] = m.sum(0)
                n_miss[:, 0] = miss.sum(1)
            err = n_miss / np.maximum(n_obs, 1)[None]
            pending.append([int(u), err, n_obs > 0, np.zeros(H, bool)])
            history += alpha.mean(1)
        score(force=True)
        if next_start is not None:
            feed(next_start)
        out = {"alpha": alpha, "alpha_final": alpha.mean(1).tolist(),
               "alpha_mean": (history / len(uniq)).tolist()}
        if self.keep_bounds:
            out["start"] = np.concatenate([k[0] for k in kept])
            out["lower"] = np.concatenate([k[1] for k in kept], axis=1)
            out["upper"] = np.concatenate([k[2] for k in kept], axis=1)
        return out


def aci_state(model, ds, cal: Calibration, next_start: int, batch_size: int = 256, device="cpu",
              amp: bool = True) -> Calibration:
    """``cal`` with the per-cell ACI quantiles (``q_cell``) reached by replaying the windows of
    ``ds`` (forecasts whose truth is known) and feeding back what is known at window start
    ``next_start`` (the forecast to be issued)."""
    from simmstnet.eval.forecast import forecast_batches

    buf = AciBuffer(cal, per_cell=True)
    for batch, pred in forecast_batches(model, ds, None, batch_size, device, amp):
        start, rows, cols = ds.window_info(batch["index"])
        buf.update(start, rows, cols, ds.scaler.inverse(pred.double()).numpy(), batch["y_raw"].double().numpy(),
                   batch["y_mask"].numpy())
    state = buf.finish(None, next_start=next_start)
    out = cal.with_levels(cal.levels)
    out.q_cell = cal.quantile(state["alpha"])                    # (K, G, H, C)
    out.info["aci_replayed_windows"] = int(sum(p[0].size for p in buf.parts))
    return out
