"""Masked forecast metrics in original units.

Rule (stated in every metrics.json as the protocol's ``mask_rule``): a target counts only where
it was observed (``y_mask`` True); missing targets are neither zeros nor errors. Per service:

    MAE   = sum |p - y| / n                  RMSE = sqrt(sum (p - y)^2 / n)
    sMAPE = 100 * mean over targets with |p| + |y| > 0 of 2 |p - y| / (|p| + |y|)

with n the number of observed targets of that service over every evaluated window and horizon
step. ``overall`` pools every observed target of every service (for a single service it equals
that service's figures). Sums are kept in float64 so that the result does not depend on the
batch size.
"""
from __future__ import annotations

import math

import numpy as np
import torch

MASK_RULE = "targets count only where observed (y_mask); metrics pooled over all windows and horizon steps"


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64 if a.is_floating_point() else a.dtype).numpy()
    return np.asarray(a)


class MetricAccumulator:
    """Running masked error sums per service; feed batches, read :meth:`result`.

    ``update(pred, y, mask)``: pred, y (B, H, C) in original units, mask (B, H, C) bool.
    Per-horizon-step MAE of the pooled targets is kept as well (``by_step``).
    """

    def __init__(self, services, horizon: int | None = None):
        self.services = tuple(services)
        C = len(self.services)
        self.abs = np.zeros(C)
        self.sq = np.zeros(C)
        self.smape = np.zeros(C)
        self.smape_n = np.zeros(C)
        self.n = np.zeros(C, dtype=np.int64)
        self.step_abs = None if horizon is None else np.zeros(horizon)
        self.step_n = None if horizon is None else np.zeros(horizon, dtype=np.int64)
        self.windows = 0

    def update(self, pred, y, mask) -> None:
        p, t, m = _np(pred).astype(np.float64), _np(y).astype(np.float64), _np(mask).astype(bool)
        if p.shape != t.shape or m.shape != t.shape or p.shape[-1] != len(self.services):
            raise ValueError(f"metric shapes differ: pred {p.shape}, y {t.shape}, mask {m.shape}, "
                             f"{len(self.services)} services")
        # Unobserved y may hold anything (0 or NaN): zero the error there before summing.
        err = np.where(m, p - np.where(m, t, 0.0), 0.0)
        axes = tuple(range(err.ndim - 1))
        self.abs += np.abs(err).sum(axis=axes)
        self.sq += (err * err).sum(axis=axes)
        denom = np.abs(p) + np.abs(np.where(m, t, 0.0))
        ok = m & (denom > 0)
        self.smape += np.where(ok, 2.0 * np.abs(err) / np.where(ok, denom, 1.0), 0.0).sum(axis=axes)
        self.smape_n += ok.sum(axis=axes)
        self.n += m.sum(axis=axes)
        if self.step_abs is not None and err.ndim == 3:
            self.step_abs += np.abs(err).sum(axis=(0, 2))
            self.step_n += m.sum(axis=(0, 2))
        self.windows += p.shape[0] if p.ndim == 3 else 1

    @staticmethod
    def _figures(abs_sum, sq_sum, smape_sum, smape_n, n) -> dict:
        if n == 0:
            return {"mae": None, "rmse": None, "smape": None, "n_observed": 0}
        return {"mae": float(abs_sum / n), "rmse": float(math.sqrt(sq_sum / n)),
                "smape": float(100.0 * smape_sum / smape_n) if smape_n else None, "n_observed": int(n)}

    def result(self) -> dict:
        """``{service: {mae, rmse, smape, n_observed}, ..., "overall": {..., n_windows, mae_by_step}}``.

        A service with no observed target gets ``None`` figures (JSON null), never 0.
        """
        out = {s: self._figures(self.abs[i], self.sq[i], self.smape[i], self.smape_n[i], self.n[i])
               for i, s in enumerate(self.services)}
        overall = self._figures(self.abs.sum(), self.sq.sum(), self.smape.sum(), self.smape_n.sum(), self.n.sum())
        overall["n_windows"] = int(self.windows)
        if self.step_abs is not None:
            overall["mae_by_step"] = [float(a / k) if k else None for a, k in zip(self.step_abs, self.step_n)]
        out["overall"] = overall
        return out


def masked_metrics(pred, y, mask, services) -> dict:
    """One-shot :class:`MetricAccumulator` over arrays (B, H, C)."""
    acc = MetricAccumulator(services, horizon=np.shape(pred)[1] if np.ndim(pred) == 3 else None)
    acc.update(pred, y, mask)
    return acc.result()
