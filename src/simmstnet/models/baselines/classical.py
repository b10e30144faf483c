"""Classical per-series reference: MSTL seasonal profile plus a non-seasonal ETS, via statsforecast.

Why statsforecast: it is the maintained Python port of R's ``forecast::mstl`` / ``forecast::ets``
(Hyndman's automatic ETS selection by AICc), numba/C++ fast enough to fit every (cell, service)
series of a grid on one core, and its fitted ETS can be *applied* to a new history without
re-estimation (``AutoETS.forward``), which keeps the per-window cost at one linear recursion.

``mstl`` (no gradient; the trainer's ``fit`` hook, then direct evaluation):

- ``fit(train_dataset)``: per cell and service, the observed training series in original units
  (the training target range and the inputs before it; unobserved steps linearly interpolated)
  is decomposed by ``MSTL(season_length=P)`` with an ``AutoETS(model=ets_model)`` trend
  forecaster (P = ``season_days`` in data steps). Kept in buffers (so they travel in the
  checkpoint): the last season of the seasonal component (one value per slot, slot =
  epoch step number mod P) and the selected ETS (components and parameters). A series shorter
  than two seasons, or all zeros, gets a flat profile (ETS on the raw series); one that cannot be
  fitted at all falls back to its last observed value.
- forecast of a window with origin o = start + input_len: the last ``max_history_days`` of the
  cell's series strictly before o (``ds.grid`` through the ``needs_history`` hook: batch key
  ``start`` and ``bind(ds)``; nothing at or after o is read) minus the profile is run through the
  fitted ETS (``forward``: fixed parameters, states recomputed), forecast H steps, profile added
  back, returned in scaled units. Forecasts are cached per (grid, cell, origin).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from simmstnet.errors import UserError
from simmstnet.models.registry import DataDims, register_model
from simmstnet.utils import format_step

DAY = 86400
N_PAR = 7  # alpha, beta, gamma, phi, initial level, initial trend (NaN if none), n_params


def _statsforecast():
    try:
        from statsforecast.models import MSTL, AutoETS
    except ImportError as exc:
        raise UserError("model 'mstl' needs the package statsforecast (pip install statsforecast)") from exc
    return MSTL, AutoETS


def _interpolated(v: np.ndarray, m: np.ndarray) -> np.ndarray | None:
    """v with unobserved steps linearly interpolated (edges held); None when nothing is observed."""
    obs = np.flatnonzero(m)
    if obs.size == 0:
        return None
    if obs.size == v.size:
        return v.astype(np.float64)
    return np.interp(np.arange(v.size), obs, v[obs].astype(np.float64))


@dataclass
class MSTLConfig:
    """Options of the classical reference (``model.<field>=...``)."""

    season_days: float = field(default=1.0, metadata={"help": "season length in days (converted to data steps)"})
    max_history_days: float = field(default=14.0, metadata={
        "help": "history before each forecast origin run through the ETS (bounds the cost)"})
    ets_model: str = field(default="ZZN", metadata={
        "help": "statsforecast AutoETS model string (error, trend, season N), e.g. ZZN, AAN, ANN"})


@register_model("mstl", multitask=True, config=MSTLConfig,
                description="classical reference (statsforecast): per cell and service, a daily seasonal "
                            "profile from MSTL fitted on the training span plus an AutoETS (no season) "
                            "level/trend on the deseasonalized history up to the forecast origin")
class MSTLReference(nn.Module):
    config_class = MSTLConfig
    needs_cells = True
    needs_history = True

    def __init__(self, dims: DataDims, config: MSTLConfig | None = None):
        super().__init__()
        cfg = config or MSTLConfig()
        for name in ("season_days", "max_history_days"):
            v = getattr(cfg, name)
            if not (math.isfinite(v) and v > 0):
                raise UserError(f"model 'mstl' option {name} must be a positive number, got {v}")
        e = cfg.ets_model
        if len(e) != 3 or e[0] not in "AMZ" or e[1] not in "NAMZ" or e[2] != "N":
            raise UserError(f"model 'mstl' option ets_model must be 3 letters: error A/M/Z, trend N/A/M/Z, "
                            f"season N (the season is MSTL's), got {e!r}")
        self.config, self.input_len, self.horizon, self.n_services = cfg, dims.input_len, dims.horizon, dims.n_services
        C = dims.n_services
        self.register_buffer("profile", torch.zeros(0, 0, 0, C, dtype=torch.float64))   # (Hg, Wg, P, C)
        self.register_buffer("ets_par", torch.zeros(0, 0, C, N_PAR, dtype=torch.float64))
        self.register_buffer("ets_kind", torch.zeros(0, 0, C, 4, dtype=torch.int64))     # ord() of components, 0 = none
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64))
        self.bound_dataset = None
        self._cache: dict = {}
        self._grids: dict = {}

    # ------------------------------------------------------------------ fitting
    def _period(self, step: int) -> int:
        p = self.config.season_days * DAY / step
        if abs(p - round(p)) > 1e-9 or round(p) < 2:
            raise UserError(f"model 'mstl': season_days={self.config.season_days} is not a whole number (>= 2) "
                            f"of {format_step(step)} steps")
        return int(round(p))

    def fit(self, train_dataset) -> None:
        MSTL, AutoETS = _statsforecast()
        ds, grid = train_dataset, train_dataset.grid
        step = int(grid.step)
        P = self._period(step)
        lo, hi = ds.target_range
        a = max(lo - ds.input_len, 0)
        svc = [grid.service_index(s) for s in ds.services]
        values, mask = grid.values[a:hi][..., svc], grid.mask[a:hi][..., svc]
        slots = (grid.timestamps[a:hi] // step) % P
        _, Hg, Wg, C = values.shape
        profile = np.zeros((Hg, Wg, P, C))
        par = np.full((Hg, Wg, C, N_PAR), np.nan)
        kind = np.zeros((Hg, Wg, C, 4), dtype=np.int64)
        for r in range(Hg):
            for c in range(Wg):
                for s in range(C):
                    y = _interpolated(values[:, r, c, s], mask[:, r, c, s])
                    if y is None:
                        continue
                    try:
                        if y.size > 2 * P and np.any(y != 0):
                            mstl = MSTL(season_length=P, trend_forecaster=AutoETS(model=self.config.ets_model)).fit(y)
                            seasonal = mstl.model_["seasonal"].to_numpy()
                            profile[r, c, slots[-P:], s] = seasonal[-P:]
                            ets = mstl.trend_forecaster.model_
                        else:
                            ets = AutoETS(model=self.config.ets_model).fit(y).model_
                    except Exception:  # statsforecast refuses some tiny/degenerate series: last value
                        continue
                    p = np.asarray(ets["par"], dtype=np.float64)
                    par[r, c, s, :p.size] = p
                    par[r, c, s, -1] = ets["n_params"]
                    kind[r, c, s] = [ord(ch) for ch in ets["components"]]
        dev = self.profile.device
        self.profile = torch.as_tensor(profile, device=dev)
        self.ets_par = torch.as_tensor(par, device=dev)
        self.ets_kind = torch.as_tensor(kind, device=dev)
        self.step.fill_(step)
        self._cache.clear()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Shapes depend on the grid it was fitted on: take the stored ones.
        for name in ("profile", "ets_par", "ets_kind"):
            stored = state_dict.get(prefix + name)
            if stored is not None:
                setattr(self, name, torch.empty_like(stored, device=getattr(self, name).device))
        self._cache.clear()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ forecasting
    def bind(self, ds) -> None:
        """The dataset whose grid the next batches come from (history before each origin)."""
        if int(self.step) <= 0:
            raise RuntimeError("mstl: call fit(train_dataset) before forecasting")
        Hg, Wg = self.profile.shape[:2]
        if tuple(ds.grid.shape[1:3]) != (Hg, Wg) or int(ds.grid.step) != int(self.step):
            raise UserError(f"mstl was fitted on a {Hg}x{Wg} grid with step {format_step(int(self.step))}; this "
                            f"data is {ds.grid.shape[1]}x{ds.grid.shape[2]} with step {format_step(int(ds.grid.step))}")
        if ds.input_len != self.input_len or ds.n_services != self.n_services:
            raise UserError("mstl: the dataset's input_len / services differ from the fitted model's")
        self.bound_dataset = ds
        self._grids[id(ds.grid)] = ds.grid

    def _ets(self, r: int, c: int, s: int, AutoETS):
        codes = self.ets_kind[r, c, s].tolist()
        if not codes[0]:
            return None
        comp = "".join(chr(k) for k in codes)
        p = self.ets_par[r, c, s].tolist()
        nstate = 1 + (comp[1] != "N")
        model = AutoETS(model=comp[:3])
        model.model_ = {"m": 1, "components": comp, "par": np.array(p[:4 + nstate]),
                        "n_params": int(p[-1]), "fit": None}
        return model

    def _forecast(self, grid, svc, r: int, c: int, origin: int, AutoETS) -> np.ndarray:
        """(H, C) forecast in original units from the grid strictly before ``origin``."""
        step, P, H = int(self.step), self.profile.shape[2], self.horizon
        n_hist = max(int(round(self.config.max_history_days * DAY / step)), 1)
        a = max(origin - n_hist, 0)
        values, mask = grid.values[a:origin, r, c][:, svc], grid.mask[a:origin, r, c][:, svc]
        slots = (grid.timestamps[a:origin] // step) % P
        future = (grid.timestamps[origin - 1] // step + 1 + np.arange(H)) % P
        prof = self.profile[r, c].numpy()                                        # (P, C)
        out = np.full((H, len(svc)), np.nan)
        for s in range(len(svc)):
            y = _interpolated(values[:, s], mask[:, s])
            if y is None:
                continue  # nothing observed: NaN -> the training mean
            y = y - prof[slots, s]
            fc = None
            model = self._ets(r, c, s, AutoETS)
            if model is not None:
                try:
                    fc = model.forward(y=y, h=H)["mean"]
                except Exception:
                    fc = None
            if fc is None or not np.all(np.isfinite(fc)):
                fc = np.full(H, y[np.flatnonzero(mask[:, s])[-1]])
            out[:, s] = fc + prof[future, s]
        return out

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """start, row, col: (B,) -> (B, H, C) scaled."""
        ds = self.bound_dataset
        if ds is None or "start" not in batch:
            raise RuntimeError("mstl needs the batch key start and bind(ds) (see needs_history)")
        _, AutoETS = _statsforecast()
        grid = ds.grid
        svc = [grid.service_index(s) for s in ds.services]
        starts, rows, cols = (batch[k].cpu().numpy() for k in ("start", "row", "col"))
        out = np.empty((starts.shape[0], self.horizon, len(svc)))
        for b, (t, r, c) in enumerate(zip(starts, rows, cols)):
            key = (id(grid), tuple(svc), int(r), int(c), int(t) + self.input_len)
            fc = self._cache.get(key)
            if fc is None:
                fc = self._cache[key] = self._forecast(grid, svc, int(r), int(c), key[-1], AutoETS)
            out[b] = fc
        scaled = np.nan_to_num(ds.scaler.transform(out), nan=0.0)
        return torch.as_tensor(scaled, dtype=torch.float32, device=batch["start"].device)
