"""Per-service scaling fitted on observed training values only.

Fitting on the whole series (or on the zeros stored under the mask) leaks test information
and biases the statistics, the most common complaint about forecasting benchmarks; so
:meth:`Scaler.fit` reads only ``grid.values[t_lo:t_hi]`` where ``grid.mask`` is True.

Kinds:
    ``standard``      z = (x - mean) / std
    ``log-standard``  z = (log1p(x) - mean) / std, with mean/std taken of log1p(x); heavy-tailed
                      traffic is closer to normal after log1p, and inverse() stays >= 0.
A service whose training values are all equal gets std = 1 (no division by zero).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from simmstnet.errors import UserError

KINDS = ("standard", "log-standard")


class Scaler:
    """Per-service affine (optionally after log1p) scaler; the service axis is the last axis."""

    def __init__(self, services: Sequence[str], mean: Sequence[float], std: Sequence[float],
                 kind: str = "standard") -> None:
        if kind not in KINDS:
            raise UserError(f"unknown scaler kind {kind!r}; known: {', '.join(KINDS)}")
        self.services = tuple(str(s) for s in services)
        self.mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        self.std = np.asarray(std, dtype=np.float64).reshape(-1)
        if not (len(self.services) == self.mean.shape[0] == self.std.shape[0]):
            raise UserError(f"scaler: {len(self.services)} services but {self.mean.shape[0]} means "
                            f"and {self.std.shape[0]} stds")
        if not (np.all(np.isfinite(self.mean)) and np.all(np.isfinite(self.std)) and np.all(self.std > 0)):
            raise UserError("scaler: means must be finite and stds finite and positive")
        self.kind = kind

    # ------------------------------------------------------------------ construction
    @classmethod
    def fit(cls, grid, time_range: tuple[int, int] | None = None, kind: str = "standard",
            services: Sequence[str] | None = None) -> "Scaler":
        """Fit on observed values of ``grid`` at time indices ``[t_lo, t_hi)`` (default: all).

        Raises UserError when a service has no observed value in that range.
        """
        if kind not in KINDS:
            raise UserError(f"unknown scaler kind {kind!r}; known: {', '.join(KINDS)}")
        T = grid.shape[0]
        lo, hi = (0, T) if time_range is None else (int(time_range[0]), int(time_range[1]))
        if not 0 <= lo < hi <= T:
            raise UserError(f"scaler time range {lo}:{hi} is outside the grid's {T} steps or empty")
        names = list(grid.services if services is None else services)
        means, stds = [], []
        for name in names:
            c = grid.service_index(name)
            # Two passes over time chunks in float64: exact enough statistics without a float64
            # copy of the whole training span.
            n, total = 0, 0.0
            for v, m in _chunks(grid, c, lo, hi, kind):
                n += int(np.count_nonzero(m))
                total += float(np.sum(v, where=m, dtype=np.float64))
            if n == 0:
                raise UserError(f"service {name!r} has no observed value in the training range "
                                f"(time steps {lo}..{hi - 1}); cannot fit the scaler")
            mean = total / n
            sq = 0.0
            for v, m in _chunks(grid, c, lo, hi, kind):
                d = np.subtract(v, mean, dtype=np.float64)
                sq += float(np.sum(np.square(d, out=d), where=m))
            std = float(np.sqrt(sq / n))
            means.append(mean)
            stds.append(std if std > 1e-12 * max(1.0, abs(mean)) else 1.0)
        return cls(names, means, stds, kind)

    @classmethod
    def identity(cls, services: Sequence[str]) -> "Scaler":
        return cls(services, [0.0] * len(services), [1.0] * len(services), "standard")

    def subset(self, services: Sequence[str]) -> "Scaler":
        """The same statistics for a subset / reordering of the services."""
        idx = []
        for s in services:
            if s not in self.services:
                raise UserError(f"scaler has no statistics for service {s!r} (it has: {', '.join(self.services)})")
            idx.append(self.services.index(s))
        return Scaler([self.services[i] for i in idx], self.mean[idx], self.std[idx], self.kind)

    # ------------------------------------------------------------------ transforms
    def _params(self, x):
        if _is_torch(x):
            import torch

            dtype = x.dtype if x.is_floating_point() else torch.float32
            return (torch.as_tensor(self.mean, dtype=dtype, device=x.device),
                    torch.as_tensor(self.std, dtype=dtype, device=x.device))
        dtype = x.dtype if np.issubdtype(np.asarray(x).dtype, np.floating) else np.float32
        return self.mean.astype(dtype), self.std.astype(dtype)

    def _check(self, x) -> None:
        if x.shape[-1] != len(self.services):
            raise UserError(f"scaler: last axis has {x.shape[-1]} entries, expected one per service "
                            f"({len(self.services)}: {', '.join(self.services)})")

    def transform(self, x, out: np.ndarray | None = None):
        """Original units -> scaled. ``x``: numpy array or torch tensor (..., C)."""
        self._check(x)
        mean, std = self._params(x)
        if _is_torch(x):
            z = x.float() if not x.is_floating_point() else x
            if self.kind == "log-standard":
                z = z.log1p()
            return (z - mean) / std
        x = np.asarray(x)
        if out is None:
            out = np.empty(x.shape, dtype=mean.dtype)
        # With only C (often 3) entries on the last axis, numpy's inner loop would run 3
        # elements at a time; merging the last two axes and tiling the parameters makes it
        # run whole rows (several times faster on big grids).
        xm, om = _merge_last_two(x), _merge_last_two(out)
        if xm is not None and om is not None:
            reps = x.shape[-2]
            x, out_view, mean, std = xm, om, np.tile(mean, reps), np.tile(std, reps)
        else:
            out_view = out
        if self.kind == "log-standard":
            np.log1p(x, out=out_view)
            np.subtract(out_view, mean, out=out_view)
        else:
            np.subtract(x, mean, out=out_view)
        np.divide(out_view, std, out=out_view)
        return out

    def inverse(self, z):
        """Scaled -> original units. ``z``: numpy array or torch tensor (..., C)."""
        self._check(z)
        mean, std = self._params(z)
        if _is_torch(z):
            x = z * std + mean
            return x.expm1() if self.kind == "log-standard" else x
        x = np.asarray(z) * std + mean
        return np.expm1(x) if self.kind == "log-standard" else x

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "services": list(self.services),
                "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "Scaler":
        if not isinstance(state, dict):
            raise UserError("scaler state must be a mapping with kind, services, mean, std")
        missing = [k for k in ("kind", "services", "mean", "std") if k not in state]
        if missing:
            raise UserError(f"scaler state lacks key {missing[0]!r}")
        return cls(state["services"], state["mean"], state["std"], state["kind"])

    def __repr__(self) -> str:
        stats = ", ".join(f"{s}: {m:.4g}±{d:.4g}" for s, m, d in zip(self.services, self.mean, self.std))
        return f"Scaler({self.kind}; {stats})"


def _merge_last_two(a: np.ndarray) -> np.ndarray | None:
    """View of ``a`` with its last two axes merged, or None when that needs a copy."""
    if a.ndim < 2:
        return None
    view = a.view()
    try:
        view.shape = a.shape[:-2] + (a.shape[-2] * a.shape[-1],)
    except AttributeError:
        return None
    return view


def _chunks(grid, c: int, lo: int, hi: int, kind: str, steps: int = 256):
    """(values, mask) of service ``c`` over time steps [lo, hi), in chunks (log1p in float64)."""
    for t0 in range(lo, hi, steps):
        t1 = min(hi, t0 + steps)
        v = grid.values[t0:t1, :, :, c]
        yield (np.log1p(v, dtype=np.float64) if kind == "log-standard" else v), grid.mask[t0:t1, :, :, c]


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")
