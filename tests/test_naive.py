"""Naive baselines against hand-computed forecasts on tiny grids."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from simmstnet.data.grid import TrafficGrid
from simmstnet.data.scaling import Scaler
from simmstnet.data.windows import WindowDataset
from simmstnet.errors import UserError
from simmstnet.eval.forecast import prepare_batch
from simmstnet.models.registry import DataDims, build_model, list_models

START = 1383260400  # 2013-11-01 00:00 Europe/Rome


def coded_grid(T, step=3600, H=2, W=3, mask=None):
    """values[t, r, c, s] = 1000 s + 100 r + 10 c + t: every forecast can be read off by hand."""
    t, r, c, s = np.meshgrid(np.arange(T), np.arange(H), np.arange(W), np.arange(2), indexing="ij")
    values = (1000 * s + 100 * r + 10 * c + t).astype(np.float32)
    return TrafficGrid.from_values(values, START, step, ("call", "net"), mask=mask,
                                   meta={"timezone": "Europe/Rome"})


def dataset(grid, L, H, target_range=None, scaler=None):
    return WindowDataset(grid, input_len=L, label_len=min(L, 2), horizon=H, patch=1, scaler=scaler,
                         target_range=target_range)


def forecast(name, ds, fit_ds=None, idx=None):
    model = build_model(name, DataDims.from_dataset(ds))
    if hasattr(model, "fit"):
        model.fit(fit_ds or ds)
    idx = np.arange(len(ds)) if idx is None else idx
    batch = prepare_batch(ds.get_batch(idx), ds, model, torch.device("cpu"))
    with torch.no_grad():
        return model, model(batch).numpy(), ds.window_info(idx)


def test_registered():
    names = {n for n, _, _ in list_models()}
    assert {"last-value", "seasonal-naive-day", "seasonal-naive-week", "historical-average"} <= names


def test_last_value_uses_the_last_observed_input():
    grid = coded_grid(10)
    # Cell (1, 2), service net: its last input step of the window starting at t=0 is unobserved.
    grid.mask[3, 1, 2, 1] = False
    grid.values[3, 1, 2, 1] = 0.0
    ds = dataset(grid, L=4, H=2)
    _, pred, (start, row, col) = forecast("last-value", ds)
    assert pred.shape == (len(ds), 2, 2)
    for b in range(len(ds)):
        t, r, c = start[b], row[b], col[b]
        for s in range(2):
            last = t + 3
            if (t, r, c, s) == (0, 1, 2, 1):
                last = t + 2  # fallback: the latest observed input
            assert np.all(pred[b, :, s] == 1000 * s + 100 * r + 10 * c + last)


def test_seasonal_naive_day_same_slot_yesterday_also_beyond_one_day():
    grid = coded_grid(24 * 3 + 5)
    ds = dataset(grid, L=24, H=26)  # horizon longer than a day: h >= 24 goes two days back
    model, pred, (start, row, col) = forecast("seasonal-naive-day", ds)
    assert int(model.period) == 24
    for b in [0, 7, len(ds) - 1]:
        t, r, c = start[b], row[b], col[b]
        for h in range(26):
            target = t + 24 + h
            source = target - 24 if h < 24 else target - 48
            assert pred[b, h, 1] == 1000 + 100 * r + 10 * c + source


def test_seasonal_naive_day_falls_back_when_yesterday_is_missing():
    grid = coded_grid(60)
    grid.mask[5, 0, 0, 0] = False
    ds = dataset(grid, L=24, H=2)
    _, pred, (start, row, col) = forecast("seasonal-naive-day", ds)
    b = int(np.flatnonzero((start == 5) & (row == 0) & (col == 0))[0])
    # Target 29 would copy step 5 (unobserved): the last observed input (step 28) is used.
    assert pred[b, 0, 0] == 28 and pred[b, 1, 0] == 6


def test_seasonal_naive_periods_follow_the_step():
    grid = coded_grid(20, step=86400)  # daily data: a week is 7 steps
    ds = dataset(grid, L=7, H=3)
    _, pred, (start, row, col) = forecast("seasonal-naive-week", ds)
    for b in range(len(ds)):
        for h in range(3):
            assert pred[b, h, 0] == 100 * row[b] + 10 * col[b] + start[b] + h
    with pytest.raises(UserError, match=r"seasonal-naive-week needs data.input_len >= 168 .*1h.* got 24"):
        forecast("seasonal-naive-week", dataset(coded_grid(40), L=24, H=2))
    with pytest.raises(UserError, match=r"seasonal-naive-day needs data.input_len >= 48 .*30min.* got 24"):
        forecast("seasonal-naive-day", dataset(coded_grid(60, step=1800), L=24, H=2))
    with pytest.raises(UserError, match="does not divide"):
        forecast("seasonal-naive-day", dataset(coded_grid(60, step=7 * 3600), L=24, H=2))


def test_historical_average_matches_a_brute_force_slot_of_week_mean():
    rng = np.random.default_rng(1)
    T = 24 * 7 * 2 + 24 * 3  # 17 days of hourly data
    values = rng.gamma(3, 10, size=(T, 2, 2, 2)).astype(np.float32)
    mask = rng.random(values.shape) > 0.2
    mask[:, 1, 1, 0] = False          # a cell/service never observed -> 0 (the training mean)
    mask[np.arange(2, T - 24 * 3, 168), 0, 1, 1] = False  # one slot of the week never observed in training
    grid = TrafficGrid.from_values(values, START, 3600, ("call", "net"), mask=mask,
                                   meta={"timezone": "Europe/Rome"})
    L, H, train_end = 24, 4, T - 24 * 3
    scaler = Scaler.fit(grid, (0, train_end))
    train = dataset(grid, L, H, (0, train_end), scaler)
    test = dataset(grid, L, H, (train_end, T), scaler)
    model, pred, (start, row, col) = forecast("historical-average", test, fit_ds=train)

    local = pd.to_datetime(grid.timestamps, unit="s", utc=True).tz_convert("Europe/Rome")
    slot = np.asarray(local.day_of_week * 24 + local.hour)
    z = scaler.transform(values.astype(np.float64))
    for b in range(0, len(test), 7):
        for h in range(H):
            target = start[b] + L + h
            for s in range(2):
                r, c = row[b], col[b]
                ts = np.arange(L, train_end)  # training targets start after one input window
                seen = ts[mask[ts, r, c, s]]
                same = seen[slot[seen] == slot[target]]
                if same.size:
                    expected = z[same, r, c, s].mean()
                elif seen.size:
                    expected = z[seen, r, c, s].mean()
                else:
                    expected = 0.0
                assert pred[b, h, s] == pytest.approx(expected, abs=1e-5), (b, h, s)
    assert np.all(pred[(row == 1) & (col == 1), :, 0] == 0.0)
    # The unobserved slot (test step 338) fell back to the cell mean.
    b = int(np.flatnonzero((row == 0) & (col == 1) & (start + L == 338))[0])
    assert pred[b, 0, 1] == pytest.approx(z[np.arange(L, train_end)[mask[L:train_end, 0, 1, 1]], 0, 1, 1].mean(), abs=1e-5)

    # The fitted table travels in the state dict (checkpoints), whatever the grid size.
    fresh = build_model("historical-average", DataDims.from_dataset(test))
    fresh.load_state_dict(model.state_dict())
    batch = prepare_batch(test.get_batch(np.arange(len(test))), test, fresh, torch.device("cpu"))
    assert torch.equal(fresh(batch), torch.as_tensor(pred))
