"""The classical reference ``mstl`` (statsforecast MSTL profile + AutoETS level), on series whose
forecast is known by hand: a noiseless daily sine on a per-cell level."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("statsforecast")

from simmstnet.data.grid import TrafficGrid  # noqa: E402
from simmstnet.data.scaling import Scaler  # noqa: E402
from simmstnet.data.windows import WindowDataset  # noqa: E402
from simmstnet.errors import UserError  # noqa: E402
from simmstnet.eval.forecast import forecast_batches  # noqa: E402
from simmstnet.models.registry import DataDims, build_model  # noqa: E402

START = 1383264000  # 2013-11-01 00:00 UTC: slot = hour of day
DAYS, L, H, TRAIN = 10, 12, 3, 7 * 24
AMP = 40.0


def sine_grid(days=DAYS):
    """values[t, r, c] = level(r, c) + 40 sin(2 pi t / 24): hourly, 2x2 cells, one service."""
    t = np.arange(24 * days)
    level = np.array([[100.0, 200.0], [300.0, 400.0]])
    values = level[None] + AMP * np.sin(2 * np.pi * t / 24)[:, None, None]
    return TrafficGrid.from_values(values[..., None].astype(np.float32), START, 3600, ("net",))


def datasets(grid, scaler=None):
    scaler = scaler or Scaler.fit(grid, (0, TRAIN))
    kw = dict(input_len=L, label_len=6, horizon=H, patch=1, scaler=scaler)
    return (WindowDataset(grid, target_range=(0, TRAIN), **kw),
            WindowDataset(grid, target_range=(TRAIN, grid.shape[0]), **kw))


def fitted(train):
    model = build_model("mstl", DataDims.from_dataset(train))
    model.fit(train)
    return model


def forecasts(model, ds):
    """(N, H, C) forecasts in original units, (N, H, C) truth, window starts (N,)."""
    preds, truth, starts = [], [], []
    for batch, pred in forecast_batches(model, ds, batch_size=64):
        preds.append(ds.scaler.inverse(pred.double()).numpy())
        truth.append(batch["y_raw"].double().numpy())
        starts.append(ds.window_info(batch["index"])[0])
    return np.concatenate(preds), np.concatenate(truth), np.concatenate(starts)


def test_a_noiseless_seasonal_series_is_forecast_almost_exactly():
    train, test = datasets(sine_grid())
    model = fitted(train)
    # the profile is the daily sine itself (slot = hour, UTC start at midnight), zero mean
    prof = model.profile[0, 0, :, 0].numpy()
    assert prof.shape == (24,)
    np.testing.assert_allclose(prof, AMP * np.sin(2 * np.pi * np.arange(24) / 24), atol=0.05)
    pred, truth, _ = forecasts(model, test)
    assert np.abs(pred - truth).max() < 0.01  # of values 60 .. 440 (measured: 7e-6)
    # a flat forecast (the last value) is far off on the same windows
    assert np.abs(pred - truth).max() < np.abs(truth[:, :1] - truth).max() / 100


def test_the_forecast_never_reads_at_or_after_the_first_target():
    grid = sine_grid()
    train, test = datasets(grid)
    model = fitted(train)
    before, _, starts = forecasts(model, test)
    cut = TRAIN + 20
    edited_values = grid.values.copy()
    edited_values[cut:] = edited_values[cut:] * 3 + 50  # everything from time index cut on
    edited = TrafficGrid.from_values(edited_values, START, 3600, ("net",))
    _, test2 = datasets(edited, scaler=test.scaler)
    after, _, starts2 = forecasts(model, test2)
    assert np.array_equal(starts, starts2)
    origin = starts + L
    safe = origin <= cut  # the window's first target is at or after the edit: its history is unchanged
    assert safe.sum() >= 4 and (origin == cut).any()
    np.testing.assert_array_equal(after[safe], before[safe])
    assert np.abs(after[~safe] - before[~safe]).max() > 1.0  # later windows do see the edit


def test_checkpoint_round_trip(tmp_path):
    train, test = datasets(sine_grid())
    model = fitted(train)
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state["profile"].shape == (2, 2, 24, 1) and state["ets_kind"].shape == (2, 2, 1, 4)
    fresh = build_model("mstl", DataDims.from_dataset(train))
    with pytest.raises(RuntimeError, match="fit"):
        next(forecast_batches(fresh, test))
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(forecasts(fresh, test)[0], forecasts(model, test)[0])


def test_runs_through_the_trainer(tmp_path):
    from simmstnet.train.trainer import Trainer
    from tests.train_helpers import tiny_config

    cfg = tiny_config(tmp_path / "run", "data.split=[0.7,0.1,0.2]", model="mstl")
    metrics = Trainer(cfg, grid=sine_grid(), progress=False, quiet=True).run()
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["model"] == "mstl" and saved["params"] == 0
    assert metrics["test"]["net"]["mae"] < 0.05 and metrics["val"]["net"]["mae"] < 0.05


def test_refuses_window_norm_and_bad_options():
    dims = DataDims(n_services=1, input_len=L, label_len=6, horizon=H, patch=1)
    with pytest.raises(UserError, match="norm=window"):
        build_model("mstl", dims, norm="window")
    with pytest.raises(UserError, match="ets_model"):
        build_model("mstl", dims, ets_model="AAA")
    train, _ = datasets(sine_grid())
    with pytest.raises(UserError, match="season_days"):
        build_model("mstl", dims, season_days=0.01).fit(train)  # 14.4 minutes of an hourly grid


def test_missing_statsforecast_is_a_user_error(monkeypatch):
    train, _ = datasets(sine_grid())
    model = build_model("mstl", DataDims.from_dataset(train))
    monkeypatch.setitem(sys.modules, "statsforecast.models", None)  # import now raises ImportError
    with pytest.raises(UserError, match="pip install statsforecast"):
        model.fit(train)


def test_degenerate_series_fall_back_without_failing():
    """An all-zero cell gets a flat profile and forecasts 0; a cell never observed in training
    repeats its last observed value; a cell with gaps is interpolated and still forecast closely."""
    grid = sine_grid()
    values, mask = grid.values.copy(), np.ones(grid.values.shape, bool)
    values[:, 0, 0] = 0.0
    mask[:TRAIN, 0, 1] = False
    rng = np.random.default_rng(0)
    mask[:, 1, 1] &= rng.random(values.shape[0])[:, None] > 0.1
    train, test = datasets(TrafficGrid.from_values(values, START, 3600, ("net",), mask=mask))
    model = fitted(train)
    assert not model.profile[0, 0].any() and not model.profile[0, 1].any()
    assert model.ets_kind[0, 1, 0, 0] == 0 and model.ets_kind[0, 0, 0, 0] != 0
    pred, truth, starts = forecasts(model, test)
    _, rows, cols = test.window_info(np.arange(len(test)))
    assert np.isfinite(pred).all()
    np.testing.assert_allclose(pred[(rows == 0) & (cols == 0)], 0.0, atol=1e-4)  # float32 scaling
    last = values[starts + L - 1, rows, cols, 0]  # fully observed from TRAIN on
    pick = (rows == 0) & (cols == 1) & (starts + L - 1 >= TRAIN)
    np.testing.assert_allclose(pred[pick, :, 0], np.repeat(last[pick, None], H, 1), rtol=1e-5)
    gappy = (rows == 1) & (cols == 1)
    ok = test.get_batch(np.arange(len(test)))["y_mask"].numpy()
    assert np.abs(pred - truth)[gappy & ok.all((1, 2))].max() < 1.0
