"""Lazy sliding windows over a TrafficGrid: dataset, chronological splits and a batch loader.

A window is a (cell, t) pair: input steps ``t .. t+L-1``, target steps ``t+L .. t+L+H-1``
(L = ``input_len``, H = ``horizon``); the decoder sees the last ``label_len`` inputs followed by
zeros for the horizon. Windows are never materialized: the dataset keeps ONE scaled copy of the
grid, padded by ``patch // 2`` cells on each side of H and W. In that copy NaN stands for
"unobserved or outside the grid", so values and masks come out of one gather (batches hold 0
and mask False there). A batch is one vectorized index computation and one ``index_select``
(see :meth:`WindowDataset.get_batch`).

Skipped windows: a window whose targets are all unobserved (every target step, every service
masked) contributes nothing to any loss or metric, so the dataset leaves it out at construction
(``skip_unobserved=True``, the default) and counts it in ``n_skipped``. Every window with at
least one observed target stays in, so evaluation covers all scorable targets.

Batch keys and shapes (B batch, L input_len, S = label_len + horizon, C services, k patch,
F calendar marks) are listed in docs/contracts.md, section Windows.
"""
from __future__ import annotations

import datetime as dt
import math
from typing import Iterator, Sequence

import numpy as np
import torch

from simmstnet.data.calendar import N_MARKS, calendar_features
from simmstnet.data.scaling import Scaler
from simmstnet.errors import UserError
from simmstnet.utils import format_step

DAY = 86400

# Process the grid in time chunks when building the scaled copy, so temporaries stay small.
_CHUNK_STEPS = 128


class WindowDataset:
    """Indexable set of forecasting windows over one grid (see the module docstring).

    Args:
        grid: the TrafficGrid (values in original units).
        input_len, label_len, horizon: L, label part (<= L) and H, in time steps.
        services: names to use, in this order (default: all of the grid's).
        patch: k, odd side of the neighbourhood patch centred on the cell.
        stride: step between consecutive window starts.
        scaler: fitted :class:`Scaler` (its statistics are looked up by service name);
            None means identity scaling.
        target_range: (t_lo, t_hi) time indices; a window is kept when all its targets lie
            in [t_lo, t_hi) (its input may start before t_lo). Default: the whole grid.
        cells: optional (N, 2) int array of (row, col); default every cell, row-major.
        skip_unobserved: leave out windows with no observed target (counted in n_skipped).

    Memory: one float32 array of shape (T', H + 2p, W + 2p, C), p = patch // 2, NaN where
    unobserved or outside the grid, where T' covers only the time steps this dataset's windows
    read (so train/val/test datasets of one grid hold about one scaled copy together); raw
    targets are read from the grid itself. No per-window storage, except the shorter of the
    kept / skipped window id lists when some windows are skipped.
    """

    def __init__(self, grid, input_len: int = 24, label_len: int = 12, horizon: int = 6,
                 services: Sequence[str] | None = None, patch: int = 5, stride: int = 1,
                 scaler: Scaler | None = None, target_range: tuple[int, int] | None = None,
                 cells: np.ndarray | None = None, skip_unobserved: bool = True,
                 season_days: int = 0, history_start: int = 0, season_stat: str = "mean") -> None:
        T, Hg, Wg, _ = grid.shape
        for name, value, low in (("input_len", input_len, 1), ("horizon", horizon, 1),
                                 ("label_len", label_len, 0), ("patch", patch, 1), ("stride", stride, 1)):
            if int(value) != value or value < low:
                raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
        if label_len > input_len:
            raise UserError(f"label_len ({label_len}) cannot exceed input_len ({input_len})")
        if patch % 2 == 0:
            raise UserError(f"patch must be odd so that it is centred on the cell, got {patch}")
        season_days = 0 if season_days is None else season_days  # a run saved before the option
        if int(season_days) != season_days or season_days < 0:
            raise UserError(f"season_days must be an integer >= 0, got {season_days!r}")
        self.season_days = int(season_days)
        if season_stat not in ("mean", "median"):
            raise UserError(f"season_stat must be 'mean' or 'median', got {season_stat!r}")
        self.season_stat = season_stat
        self.per_day = 0
        if self.season_days:
            if grid.step <= 0 or DAY % int(grid.step):
                raise UserError(f"data.season_days needs a grid step that divides a day, got "
                                f"{format_step(grid.step)}")
            self.per_day = DAY // int(grid.step)
            if horizon > self.per_day:
                raise UserError(f"data.season_days: the horizon ({horizon} steps) exceeds one day "
                                f"({self.per_day} steps), so the same time one day earlier would lie "
                                f"after the forecast origin")
        self.history_start = max(int(history_start), 0)
        self.grid = grid
        self.input_len, self.label_len, self.horizon = int(input_len), int(label_len), int(horizon)
        self.patch, self.stride = int(patch), int(stride)
        self.services = tuple(grid.services if services is None else services)
        service_idx = [grid.service_index(s) for s in self.services]
        self.scaler = (Scaler.identity(self.services) if scaler is None else scaler.subset(self.services))

        lo, hi = (0, T) if target_range is None else (int(target_range[0]), int(target_range[1]))
        if not 0 <= lo < hi <= T:
            raise UserError(f"target range {lo}:{hi} is outside the grid's {T} time steps or empty")
        self.target_range = (lo, hi)
        L, H = self.input_len, self.horizon
        # Earliest start: the input must lie inside the grid and the first target at or after lo.
        first = max(lo - L, 0)
        last = hi - L - H
        if last < first:
            raise UserError(f"no complete window in time steps {lo}..{hi - 1} ({hi - lo} steps of "
                            f"{format_step(grid.step)}): a window needs input_len + horizon = {L + H} "
                            f"steps with its {H} targets inside the range")
        self._first_start = first
        self.n_starts = (last - first) // self.stride + 1

        if cells is None:
            rr, cc = np.meshgrid(np.arange(Hg), np.arange(Wg), indexing="ij")
            cells = np.stack([rr.ravel(), cc.ravel()], axis=1)
        cells = np.asarray(cells)
        if cells.ndim != 2 or cells.shape[1] != 2 or cells.shape[0] == 0:
            raise UserError(f"cells must be a non-empty (N, 2) array of (row, col), got shape {cells.shape}")
        if cells.dtype.kind not in "iu":
            raise UserError("cells must hold integer (row, col) pairs")
        bad = (cells[:, 0] < 0) | (cells[:, 0] >= Hg) | (cells[:, 1] < 0) | (cells[:, 1] >= Wg)
        if bad.any():
            r, c = cells[int(np.argmax(bad))]
            raise UserError(f"cell (row={r}, col={c}) is outside the {Hg}x{Wg} grid")
        self.cells = cells.astype(np.int64)
        self.n_cells = self.cells.shape[0]

        self._build_tensors(grid, service_idx)

        # Flat window ids are k = start_number * n_cells + cell_number. When some windows are
        # skipped, keep either the kept ids or the skipped ones, whichever list is shorter
        # (nothing at all for a complete grid).
        self._kept: torch.Tensor | None = None
        self._skip_shift: torch.Tensor | None = None
        self.n_skipped = 0
        if skip_unobserved:
            self._find_scorable(service_idx)
        self._len = self.n_starts * self.n_cells - self.n_skipped
        if self._len == 0:
            raise UserError(f"no window in time steps {lo}..{hi - 1} has an observed target")

    # ------------------------------------------------------------------ construction helpers
    def _build_tensors(self, grid, service_idx: list[int]) -> None:
        _, Hg, Wg, _ = grid.shape
        C, p = len(service_idx), self.patch // 2
        all_services = service_idx == list(range(grid.shape[3]))
        # Only the time steps some window reads: [first start, last target] of this dataset,
        # plus the season_days days before it that the seasonal history reads (never before
        # history_start).
        t_lo = self._first_start
        if self.season_days:
            t_lo = min(t_lo, max(t_lo - self.season_days * self.per_day, self.history_start, 0))
        t_hi = self._first_start + (self.n_starts - 1) * self.stride + self.input_len + self.horizon
        self._t_offset = t_lo
        T = t_hi - t_lo
        # The one scaled copy: NaN marks "unobserved or outside the grid", so a batch needs ONE
        # gather for values and masks together (mask = not NaN, value = NaN -> 0); this halves
        # the gather cost against a separate bool mask array and halves the memory too.
        scaled = np.full((T, Hg + 2 * p, Wg + 2 * p, C), np.nan, dtype=np.float32)
        for t0 in range(0, T, _CHUNK_STEPS):
            t1 = min(T, t0 + _CHUNK_STEPS)
            g0, g1 = t_lo + t0, t_lo + t1
            v = grid.values[g0:g1] if all_services else grid.values[g0:g1][..., service_idx]
            m = grid.mask[g0:g1] if all_services else grid.mask[g0:g1][..., service_idx]
            inner = scaled[t0:t1, p:p + Hg, p:p + Wg]
            self.scaler.transform(v, out=inner)
            if not m.all():
                # 0 / mask is 0 where observed and NaN where not: a branch-free way to plant the
                # NaNs (faster than a masked copy on scattered gaps).
                with np.errstate(invalid="ignore"):
                    np.add(inner, np.divide(np.float32(0), m, dtype=np.float32), out=inner)
        # Flat view for index_select (much faster than n-d advanced indexing); from_numpy shares
        # the memory, no copy.
        self._scaled = torch.from_numpy(scaled).reshape(-1)
        self._padded_shape = scaled.shape
        # Raw targets come from the grid itself (exact original units, no inverse-scaling error);
        # from_numpy keeps the grid's strides, so a cropped view is not copied either.
        raw = grid.values if grid.values.flags.writeable else grid.values.copy()
        self._raw = torch.from_numpy(raw)
        self._raw_services = torch.tensor(service_idx, dtype=torch.int64)
        self._marks = torch.from_numpy(calendar_features(grid.timestamps[t_lo:t_hi], grid.timezone))

    def _find_scorable(self, service_idx: list[int]) -> None:
        """Leave out windows with no observed target (every target step, every service)."""
        L, H = self.input_len, self.horizon
        lo_t = self._first_start + L
        n_t = (self.n_starts - 1) * self.stride + 1          # target-start offsets to examine
        sub = self.grid.mask[lo_t:lo_t + n_t + H - 1]
        if all(sub[..., c].all() for c in service_idx):       # complete data: nothing to skip
            return
        any_service = sub[..., service_idx[0]].copy()         # (T', Hg, Wg): some service observed
        for c in service_idx[1:]:
            any_service |= sub[..., c]
        # OR over the horizon by shifted slices: H cheap passes instead of a cumulative count.
        scorable = any_service[:n_t].copy()
        for h in range(1, H):
            scorable |= any_service[h:h + n_t]
        scorable = scorable[::self.stride]                     # (n_starts, Hg, Wg)
        Hg, Wg = scorable.shape[1:]
        if self.n_cells == Hg * Wg and np.array_equal(self.cells[:, 0] * Wg + self.cells[:, 1],
                                                      np.arange(Hg * Wg)):
            scorable = scorable.reshape(self.n_starts, -1)    # all cells, row-major: a view
        else:
            scorable = scorable[:, self.cells[:, 0], self.cells[:, 1]]
        scorable = scorable.reshape(-1)                       # flat id = start_no * n_cells + cell_no
        n_kept = int(np.count_nonzero(scorable))
        self.n_skipped = scorable.shape[0] - n_kept
        if self.n_skipped == 0:
            return
        if self.n_skipped <= n_kept:
            # Few skipped (the usual case): keep their sorted ids s_m; the i-th kept id is i + j
            # with j = #{m : s_m - m <= i}, because s_m - m kept windows precede skipped s_m.
            skipped = np.flatnonzero(~scorable)
            self._skip_shift = torch.from_numpy(skipped - np.arange(skipped.shape[0]))
        else:
            self._kept = torch.from_numpy(np.flatnonzero(scorable))

    # ------------------------------------------------------------------ public API
    @property
    def n_services(self) -> int:
        return len(self.services)

    @property
    def n_marks(self) -> int:
        return N_MARKS

    def __len__(self) -> int:
        return self._len

    def _locate(self, idx: torch.Tensor):
        """Window indices (B,) -> (start time index, row, col) int64 tensors (B,) in grid coordinates."""
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self._len):
            raise IndexError(f"window index out of range for a dataset of {self._len} windows")
        if self._kept is not None:
            flat = self._kept[idx]
        elif self._skip_shift is not None:
            flat = idx + torch.searchsorted(self._skip_shift, idx, right=True)
        else:
            flat = idx
        start_no = torch.div(flat, self.n_cells, rounding_mode="floor")
        cell_no = flat - start_no * self.n_cells
        cells = torch.from_numpy(self.cells)
        start = self._first_start + start_no * self.stride
        return start, cells[cell_no, 0], cells[cell_no, 1]

    def window_info(self, idx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start time index (B,), row (B,), col (B,)) of windows ``idx``; targets start at start + L."""
        start, row, col = self._locate(_as_index(idx))
        return start.numpy(), row.numpy(), col.numpy()

    def get_batch(self, idx) -> dict[str, torch.Tensor]:
        """Gather windows ``idx`` (1-D ints, B of them) into a batch; keys and shapes as in contracts.md.

        One flat index tensor of shape (B, L, C, k, k) addresses the padded scaled grid; the
        centre of each patch is the cell's own input. Targets are a second, small (B, H, C)
        gather. No Python loop over the batch.
        """
        idx = _as_index(idx)
        B = idx.shape[0]
        start, row, col = self._locate(idx)
        L, H, S, k = self.input_len, self.horizon, self.label_len + self.horizon, self.patch
        C = self.n_services
        _, Hp, Wp, _ = self._padded_shape
        p = k // 2
        s_part = torch.arange(C).view(1, 1, C)
        # Linear offsets in the (T, Hp, Wp, C) layout. Grid (row, col) is the top-left corner of
        # the cell's patch in padded coordinates, and (row + p, col + p) the cell itself.
        off = torch.arange(k)
        local = start - self._t_offset                                   # index into the copy
        t_in = ((local[:, None] + torch.arange(L)) * (Hp * Wp * C)).view(B, L, 1, 1, 1)
        r_part = ((row[:, None] + off) * (Wp * C)).view(B, 1, 1, k, 1)
        c_part = ((col[:, None] + off) * C).view(B, 1, 1, 1, k)
        flat = ((t_in + s_part.view(1, 1, C, 1, 1)) + r_part) + c_part   # (B, L, C, k, k)
        x_patch = self._scaled.index_select(0, flat.view(-1)).view(B, L, C, k, k)
        patch_mask = ~torch.isnan(x_patch)
        x_patch = x_patch.nan_to_num_(0.0)
        x, x_mask = x_patch[:, :, :, p, p], patch_mask[:, :, :, p, p]   # (B, L, C)

        t_y = start[:, None] + L + torch.arange(H)                        # (B, H) grid time
        centre = (row + p) * (Wp * C) + (col + p) * C                      # (B,)
        flat_y = ((t_y - self._t_offset) * (Hp * Wp * C) + centre[:, None])[:, :, None] + s_part
        # flat_y: (B, H, C)
        y = self._scaled.index_select(0, flat_y.view(-1)).view(B, H, C)
        y_mask = ~torch.isnan(y)
        y = y.nan_to_num_(0.0)
        y_raw = self._raw[t_y[:, :, None], row[:, None, None], col[:, None, None],
                          self._raw_services.view(1, 1, C)]

        dec_in = torch.zeros(B, S, C, dtype=torch.float32)
        if self.label_len:
            dec_in[:, :self.label_len] = x[:, L - self.label_len:]
        x_mark = self._marks[local[:, None] + torch.arange(L)]
        y_mark = self._marks[local[:, None] + (L - self.label_len) + torch.arange(S)]
        batch = {
            "x": x.contiguous(), "x_mask": x_mask.contiguous(),
            "x_patch": x_patch, "patch_mask": patch_mask,
            "x_mark": x_mark, "dec_in": dec_in, "y_mark": y_mark,
            "y": y, "y_raw": y_raw.to(torch.float32), "y_mask": y_mask,
            "index": idx.clone(),
        }
        if self.season_days:
            batch.update(self._season(local, centre, s_part))
        return batch

    def _season(self, local: torch.Tensor, centre: torch.Tensor, s_part: torch.Tensor) -> dict:
        """Seasonal history of the centre cell: for every input and decoder step u, the mean of
        the observed scaled values at u - d days, d = 1 .. season_days (never at or after the
        forecast origin, since horizon <= one day; never before the copy's first step, which is
        at or after ``history_start``)."""
        L, H, P, C = self.input_len, self.horizon, self.season_days, self.n_services
        B = local.shape[0]
        _, Hp, Wp, _ = self._padded_shape
        back = (local[:, None, None] + torch.arange(L + H).view(1, 1, -1)
                - self.per_day * torch.arange(1, P + 1).view(1, P, 1))           # (B, P, L+H) in the copy
        inside = back >= 0
        flat = (back.clamp_min(0) * (Hp * Wp * C) + centre.view(B, 1, 1))[..., None] + s_part.view(1, 1, 1, C)
        vals = self._scaled.index_select(0, flat.view(-1)).view(B, P, L + H, C)
        ok = ~torch.isnan(vals) & inside[..., None]
        count = ok.sum(1)
        known = count > 0                                                        # (B, L+H, C)
        if self.season_stat == "median":  # lower median of the observed days
            med = torch.where(ok, vals, torch.full_like(vals, float("nan"))).nanmedian(dim=1).values
            season = torch.where(known, med, torch.zeros_like(med))
        else:
            season = torch.where(ok, vals, torch.zeros_like(vals)).sum(1) / count.clamp_min(1)
        lo = L - self.label_len
        return {"x_season": season[:, :L].contiguous(), "x_season_mask": known[:, :L].contiguous(),
                "y_season": season[:, lo:].contiguous(), "y_season_mask": known[:, lo:].contiguous()}

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        """One window as numpy arrays without the batch dimension."""
        i = int(i)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"window index {i} out of range for {self._len} windows")
        batch = self.get_batch(np.array([i]))
        return {key: value[0].numpy() for key, value in batch.items()}

    def __repr__(self) -> str:
        return (f"WindowDataset({self._len} windows = {self.n_starts} starts x {self.n_cells} cells"
                f"{f' - {self.n_skipped} unobserved' if self.n_skipped else ''}; L={self.input_len}, "
                f"label={self.label_len}, H={self.horizon}, k={self.patch}, services={list(self.services)}, "
                f"targets in steps {self.target_range[0]}..{self.target_range[1] - 1})")


def _as_index(idx) -> torch.Tensor:
    if isinstance(idx, torch.Tensor):
        out = idx.to(torch.int64)
    else:
        out = torch.as_tensor(np.asarray(idx, dtype=np.int64))
    if out.ndim != 1:
        raise ValueError(f"window indices must be 1-D, got shape {tuple(out.shape)}")
    return out


# ---------------------------------------------------------------------- splits
def data_range(target_range: tuple[int, int], input_len: int) -> tuple[int, int]:
    """Time steps a set of windows can read: inputs start up to ``input_len`` before the targets.

    Fit the scaler on ``data_range(ranges["train"], input_len)`` so that with ``train_days`` it
    sees only the kept days.
    """
    lo, hi = target_range
    return max(0, lo - input_len), hi


def split_ranges(grid, split, input_len: int, horizon: int,
                 train_days: int | None = None) -> dict[str, tuple[int, int]]:
    """Chronological train/val/test target ranges (time indices, half-open).

    Args:
        split: three ratios summing to 1 (e.g. ``(0.7, 0.1, 0.2)`` or ``"0.7,0.1,0.2"``), or two or
            three dates ``(val_start, test_start[, test_end])`` as ``YYYY-MM-DD[ HH:MM]`` in the
            grid's local time zone (or ISO 8601 with an offset). Each date boundary is the first
            step at or after it; ``test_end`` is exclusive (default: end of the grid).
        train_days: keep only the last D days before the validation start as training DATA: the
            training windows' inputs and targets all lie in those D days.
    Returns:
        ``{"train": (lo, hi), "val": (lo, hi), "test": (lo, hi)}``; a window of a split has all
        its targets in [lo, hi), its inputs may precede lo (except for train with train_days).
    """
    T = grid.shape[0]
    L, H = int(input_len), int(horizon)
    a, b, end = _split_bounds(grid, split)
    ranges = {"train": (0, a), "val": (a, b), "test": (b, end)}
    if train_days is not None:
        ranges["train"] = _last_days(grid, a, int(train_days), L, H)
    for name, (lo, hi) in ranges.items():
        if hi - max(lo, L) < H:
            raise UserError(f"the {name} split (time steps {lo}..{hi - 1} of {T}) holds no complete window: "
                            f"it needs {H} target steps (horizon) after at least {L} input steps")
    return ranges


def _split_bounds(grid, split) -> tuple[int, int, int]:
    T = grid.shape[0]
    items = [s.strip() for s in split.split(",")] if isinstance(split, str) else list(split)
    if len(items) not in (2, 3):
        raise UserError(f"split {split!r}: give three ratios (train,val,test) or two/three dates "
                        "(val start, test start[, test end])")
    ratios = None
    try:
        ratios = [float(x) for x in items]
    except (TypeError, ValueError):
        pass
    if ratios is not None:
        if len(ratios) != 3 or any(not math.isfinite(r) or r <= 0 for r in ratios) \
                or abs(sum(ratios) - 1.0) > 1e-6:
            raise UserError(f"split ratios {items}: need three positive numbers summing to 1")
        a = int(round(T * ratios[0]))
        b = int(round(T * (ratios[0] + ratios[1])))
        return a, b, T
    t0, t_end = int(grid.timestamps[0]), int(grid.timestamps[-1]) + grid.step
    names = ("validation start", "test start", "test end")
    bounds = []
    for name, text in zip(names, items):
        epoch = _parse_date(str(text), grid.timezone)
        if not t0 < epoch <= t_end or (name != "test end" and epoch > int(grid.timestamps[-1])):
            raise UserError(f"split date {text!r} ({name}) is outside the grid's time span "
                            f"{_local(t0, grid.timezone)} .. {_local(t_end, grid.timezone)}")
        bounds.append(int(np.searchsorted(grid.timestamps, epoch, side="left")))
    if len(bounds) == 2:
        bounds.append(T)
    a, b, end = bounds
    if not 0 < a < b < end <= T:
        raise UserError(f"split dates {items}: need validation start < test start < test end")
    return a, b, end


def _local(epoch: int, timezone: str) -> str:
    from zoneinfo import ZoneInfo

    return dt.datetime.fromtimestamp(epoch, tz=ZoneInfo(timezone)).strftime("%Y-%m-%d %H:%M")


def _parse_date(text: str, timezone: str) -> int:
    from simmstnet.data.calendar import _zone

    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"split date {text!r}: use YYYY-MM-DD or YYYY-MM-DD HH:MM") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_zone(timezone))
    return int(when.timestamp())


def _last_days(grid, train_end: int, days: int, L: int, H: int) -> tuple[int, int]:
    step = grid.step
    if days < 1:
        raise UserError(f"train_days must be a positive number of days, got {days}")
    if 86400 % step:
        raise UserError(f"train_days needs a step that divides a day, got {format_step(step)}")
    keep = days * (86400 // step)
    data_lo = train_end - keep
    if data_lo < 0:
        raise UserError(f"train_days={days} asks for {keep} steps but the training span has only "
                        f"{train_end} steps ({train_end * step / 86400:g} days)")
    if keep < L + H:
        raise UserError(f"train_days={days} leaves {keep} training steps of {format_step(step)}, but one "
                        f"window needs input_len + horizon = {L} + {H} = {L + H} steps: there is no "
                        "complete training window")
    return data_lo + L, train_end


# ---------------------------------------------------------------------- loader
class BatchLoader:
    """Iterate a WindowDataset in batches of dicts of tensors.

    Order: ``shuffle=False`` gives dataset order; ``shuffle=True`` a permutation drawn from
    ``(seed, epoch)`` so runs are reproducible; call :meth:`set_epoch` each epoch to reshuffle.
    Sharding (``world_size > 1``): rank r takes every world_size-th window of the (shuffled)
    order starting at r: shards are disjoint and together cover every window exactly once,
    never padded by repetition. With ``drop_last=True`` shards are first cut to equal length
    and incomplete batches dropped, so every rank runs the same number of steps (use it for
    DDP training; evaluation uses ``drop_last=False`` on one rank).
    """

    def __init__(self, ds: WindowDataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 device: str | torch.device | None = None) -> None:
        if int(batch_size) < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= int(rank) < int(world_size):
            raise UserError(f"rank {rank} is not in 0..{int(world_size) - 1}")
        self.ds, self.batch_size, self.shuffle, self.seed = ds, int(batch_size), bool(shuffle), int(seed)
        self.drop_last, self.rank, self.world_size = bool(drop_last), int(rank), int(world_size)
        self.device = device
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> np.ndarray:
        """This rank's window indices for the current epoch, in iteration order."""
        n = len(self.ds)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        else:
            order = np.arange(n)
        if self.world_size > 1:
            if self.drop_last:
                order = order[: (n // self.world_size) * self.world_size]
            order = order[self.rank::self.world_size]
        if self.drop_last:
            order = order[: (order.shape[0] // self.batch_size) * self.batch_size]
        return order

    def __len__(self) -> int:
        """Number of batches this rank yields per epoch."""
        n = len(self.ds)
        if self.world_size > 1:
            n = n // self.world_size if self.drop_last else len(range(self.rank, n, self.world_size))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self.indices()
        for lo in range(0, order.shape[0], self.batch_size):
            batch = self.ds.get_batch(order[lo:lo + self.batch_size])
            if self.device is not None:
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            yield batch
