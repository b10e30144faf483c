"""Naive reference forecasts: last value, same slot yesterday / last week, historical average.

None of them has trainable parameters, so the trainer evaluates them directly. They read facts
about the data through the trainer's hook ``fit(train_dataset)``, called once before evaluation
on the training :class:`~simmstnet.data.windows.WindowDataset`:

- the seasonal models take their period from the data step there (a day = 86400 / step steps)
  and refuse an ``input_len`` shorter than one period (UserError), since the value one period
  back must lie inside the window;
- ``historical-average`` averages the training targets per cell, slot of the week and service.

What they learn is kept in buffers, so it travels in the checkpoint and ``predict`` needs no
``fit``. All return (B, H, C) in scaled units, like every model.

Unobserved inputs: ``x`` holds 0 where ``x_mask`` is False. The last-value and seasonal rules
use the most recent *observed* value instead (for the seasonal rule: when the value one period
back is unobserved), and 0 (the training mean under standard scaling) when the window has none.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from simmstnet.data.calendar import calendar_features
from simmstnet.errors import UserError
from simmstnet.models.registry import DataDims, register_model
from simmstnet.utils import format_step

DAY = 86400


def last_observed(x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
    """Most recent observed input per window and service.

    x: (B, L, C) scaled; x_mask: (B, L, C) bool. Returns (B, C); 0 where nothing is observed.
    """
    L = x.shape[1]
    steps = torch.arange(L, device=x.device).view(1, L, 1)
    # Index of the last observed step: max over observed positions (-1 when none).
    last = torch.where(x_mask, steps, torch.full_like(steps, -1)).amax(dim=1)  # (B, C)
    value = x.gather(1, last.clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(last >= 0, value, torch.zeros_like(value))


def _steps_per(period_seconds: int, step: int, what: str) -> int:
    if period_seconds % step:
        raise UserError(f"{what}: the data step {format_step(step)} does not divide {format_step(period_seconds)}")
    return period_seconds // step


@register_model("last-value", multitask=True,
                description="naive: repeat the last observed value over the horizon")
class LastValue(nn.Module):
    def __init__(self, dims: DataDims):
        super().__init__()
        self.horizon = dims.horizon

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x, x_mask: (B, L, C) -> (B, H, C) scaled."""
        last = last_observed(batch["x"], batch["x_mask"])
        return last.unsqueeze(1).expand(-1, self.horizon, -1).contiguous()


class _SeasonalNaive(nn.Module):
    """Target step t+L+h takes the input value a whole number of periods earlier (the latest one
    inside the window): index L + (h mod P) - P of the input."""

    period_seconds = DAY
    label = "day"

    def __init__(self, dims: DataDims):
        super().__init__()
        self.input_len, self.horizon = dims.input_len, dims.horizon
        # Period in steps; 0 until fit() has seen the data step (restored from checkpoints).
        self.register_buffer("period", torch.tensor(0, dtype=torch.int64))

    def fit(self, train_dataset) -> None:
        step = int(train_dataset.grid.step)
        period = _steps_per(self.period_seconds, step, self._name())
        if self.input_len < period:
            raise UserError(f"{self._name()} needs data.input_len >= {period} (one {self.label} of "
                            f"{format_step(step)} steps), got {self.input_len}")
        self.period.fill_(period)

    def _name(self) -> str:
        return f"seasonal-naive-{self.label}"

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x, x_mask: (B, L, C) -> (B, H, C) scaled."""
        P = int(self.period)
        if P <= 0:
            raise RuntimeError(f"{self._name()}: call fit(train_dataset) before forecasting")
        x, x_mask = batch["x"], batch["x_mask"]
        h = torch.arange(self.horizon, device=x.device)
        src = self.input_len + torch.remainder(h, P) - P                       # (H,)
        seasonal = x[:, src]                                                    # (B, H, C)
        seen = x_mask[:, src]
        fallback = last_observed(x, x_mask).unsqueeze(1).expand_as(seasonal)
        return torch.where(seen, seasonal, fallback)


@register_model("seasonal-naive-day", multitask=True,
                description="naive: the same time of day one day earlier (needs input_len >= 1 day)")
class SeasonalNaiveDay(_SeasonalNaive):
    period_seconds = DAY
    label = "day"


@register_model("seasonal-naive-week", multitask=True,
                description="naive: the same time one week earlier (needs input_len >= 1 week)")
class SeasonalNaiveWeek(_SeasonalNaive):
    period_seconds = 7 * DAY
    label = "week"


def slot_of_week(marks: torch.Tensor | np.ndarray, step: int):
    """Slot of the week (0 .. 7*86400/step - 1) from calendar marks (..., F), local time.

    Uses the hour-of-day column ((seconds of day)/86400 - 0.5) and the day-of-week column
    (weekday/6 - 0.5) of :func:`simmstnet.data.calendar.calendar_features`, so the slot follows
    the same local clock as the model inputs.
    """
    per_day = DAY // step
    hour = marks[..., 0] + 0.5
    dow = marks[..., 1] + 0.5
    if isinstance(marks, torch.Tensor):
        day_slot = torch.round(hour.double() * per_day).long() % per_day
        weekday = torch.round(dow.double() * 6).long()
    else:
        day_slot = np.rint(hour.astype(np.float64) * per_day).astype(np.int64) % per_day
        weekday = np.rint(dow.astype(np.float64) * 6).astype(np.int64)
    return weekday * per_day + day_slot


@register_model("historical-average", multitask=True,
                description="naive: per-cell mean of the training targets at the same slot of the week")
class HistoricalAverage(nn.Module):
    """Mean of the observed training targets per (cell, slot of week, service), in scaled units.

    Slots come from the calendar marks (local time), so a 10-minute grid has 1008 slots and an
    hourly one 168. A slot never observed for a cell in training falls back to the cell's mean
    over all its training targets, and to 0 (the training mean) for a cell never observed.
    The forward pass needs the cell of each window: the trainer adds ``row`` and ``col`` (B,)
    to the batch for models with ``needs_cells = True`` (from ``WindowDataset.window_info``).
    """

    needs_cells = True

    def __init__(self, dims: DataDims):
        super().__init__()
        self.horizon, self.n_services = dims.horizon, dims.n_services
        self.register_buffer("table", torch.zeros(0, 0, 0, dims.n_services))  # (Hg, Wg, slots, C)
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64))

    def fit(self, train_dataset) -> None:
        """Average the training targets (time steps of the training windows' targets)."""
        ds = train_dataset
        grid = ds.grid
        step = int(grid.step)
        per_day = _steps_per(DAY, step, "historical-average")
        lo, hi = ds.target_range
        lo = max(lo, ds.input_len)  # no window has a target before input_len
        svc = [grid.service_index(s) for s in ds.services]
        values = grid.values[lo:hi][..., svc]
        mask = grid.mask[lo:hi][..., svc]
        scaled = np.where(mask, ds.scaler.transform(values), 0.0)              # (T', Hg, Wg, C)
        slots = slot_of_week(calendar_features(grid.timestamps[lo:hi], grid.timezone), step)
        n_slots = 7 * per_day
        Tn, Hg, Wg, C = scaled.shape
        sums = np.zeros((n_slots, Hg, Wg, C))
        counts = np.zeros((n_slots, Hg, Wg, C))
        np.add.at(sums, slots, scaled)
        np.add.at(counts, slots, mask)
        cell_mean = np.divide(scaled.sum(0), mask.sum(0), out=np.zeros((Hg, Wg, C)), where=mask.sum(0) > 0)
        table = np.where(counts > 0, sums / np.maximum(counts, 1), cell_mean[None])
        self.table = torch.as_tensor(table.transpose(1, 2, 0, 3), dtype=torch.float32,
                                     device=self.table.device)
        self.step.fill_(step)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The table's shape depends on the grid it was fitted on: take the stored one's shape.
        stored = state_dict.get(prefix + "table")
        if stored is not None:
            self.table = torch.empty_like(stored, device=self.table.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """row, col: (B,); y_mark: (B, S, F) -> (B, H, C) scaled."""
        if int(self.step) <= 0:
            raise RuntimeError("historical-average: call fit(train_dataset) before forecasting")
        if "row" not in batch:
            raise RuntimeError("historical-average needs the batch keys row and col (see needs_cells)")
        row, col = batch["row"].long(), batch["col"].long()
        Hg, Wg = self.table.shape[:2]
        if int(row.max()) >= Hg or int(col.max()) >= Wg:
            raise UserError(f"historical-average was fitted on a {Hg}x{Wg} grid; this data has cell "
                            f"(row={int(row.max())}, col={int(col.max())})")
        slots = slot_of_week(batch["y_mark"][:, -self.horizon:], int(self.step))  # (B, H)
        return self.table[row[:, None], col[:, None], slots]                     # (B, H, C)
