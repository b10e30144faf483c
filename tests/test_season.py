"""Seasonal history (data.season_days): the windows' per-step means of the same time on earlier
days, their use by Sim-MSTNet, and the protocol guards (no look-ahead, no reading before the
scarce-data span)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from simmstnet.config import load_config
from simmstnet.data.scaling import Scaler
from simmstnet.data.windows import WindowDataset
from simmstnet.errors import UserError
from simmstnet.models.norm import normalize_batch
from simmstnet.models.registry import DataDims, build_model
from simmstnet.train.trainer import prepare_data
from tests.conftest import make_grid

L, LABEL, H = 6, 3, 3


def _expected(grid, scaler, start, row, col, days, first_time=0, stat="mean"):
    """Brute force: for each step u of input + horizon, the mean of the observed scaled values at
    u - d * 24 (hourly grid), d = 1 .. days, ignoring times before ``first_time``."""
    per_day = 24
    scaled = scaler.transform(grid.values)
    out = np.zeros((L + H, grid.shape[3]))
    known = np.zeros((L + H, grid.shape[3]), bool)
    for i, u in enumerate(range(start, start + L + H)):
        for c in range(grid.shape[3]):
            vals = [scaled[u - d * per_day, row, col, c] for d in range(1, days + 1)
                    if u - d * per_day >= first_time and grid.mask[u - d * per_day, row, col, c]]
            if vals:
                out[i, c] = np.mean(vals) if stat == "mean" else np.sort(vals)[(len(vals) - 1) // 2]
                known[i, c] = True
    return out, known


@pytest.mark.parametrize("missing,stat", [(0.0, "mean"), (0.3, "mean"), (0.3, "median"), (0.0, "median")])
def test_season_is_the_mean_of_the_observed_values_at_the_same_time_on_earlier_days(missing, stat):
    grid = make_grid(T=24 * 8, H=3, W=3, missing=missing, seed=3)
    scaler = Scaler.fit(grid, (0, 24 * 6))
    ds = WindowDataset(grid, input_len=L, label_len=LABEL, horizon=H, patch=3, scaler=scaler,
                       target_range=(24 * 5, 24 * 8), season_days=4, season_stat=stat)
    idx = np.arange(0, len(ds), 7)
    batch = ds.get_batch(idx)
    starts, rows, cols = ds.window_info(idx)
    for b, (t, r, c) in enumerate(zip(starts, rows, cols)):
        exp, known = _expected(grid, scaler, int(t), int(r), int(c), 4, stat=stat)
        np.testing.assert_allclose(batch["x_season"][b].numpy(), exp[:L], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(batch["y_season"][b].numpy(), exp[L - LABEL:], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(batch["x_season_mask"][b].numpy(), known[:L])
        np.testing.assert_array_equal(batch["y_season_mask"][b].numpy(), known[L - LABEL:])


def test_season_never_reads_the_targets_or_before_history_start():
    grid = make_grid(T=24 * 6, H=2, W=2, seed=4)
    scaler = Scaler.fit(grid, (0, 24 * 6))
    kw = dict(input_len=L, label_len=LABEL, horizon=H, patch=3, scaler=scaler,
              target_range=(24 * 3, 24 * 6), season_days=4)
    ds = WindowDataset(grid, history_start=30, **kw)
    for i in (0, 13, len(ds) // 2, len(ds) - 1):
        base = ds.get_batch(np.array([i]))
        t = int(ds.window_info(np.array([i]))[0][0])
        # the window's targets and everything after them, and every step before history_start,
        # become absurd: its seasonal history must not change
        edited = grid.values.copy()
        edited[t + L:] += 1e4
        edited[:30] = 5e4
        grid2 = type(grid)(edited, grid.mask, grid.timestamps, grid.services, dict(grid.meta))
        other = WindowDataset(grid2, history_start=30, **kw).get_batch(np.array([i]))
        for key in ("x_season", "y_season", "x_season_mask", "y_season_mask"):
            assert torch.equal(base[key], other[key]), (i, key)
    t0, r0, c0 = ds.window_info(np.array([0]))
    exp, known = _expected(grid, scaler, int(t0[0]), int(r0[0]), int(c0[0]), 4, first_time=30)
    first = ds.get_batch(np.array([0]))
    np.testing.assert_allclose(first["x_season"][0].numpy(), exp[:L], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(first["x_season_mask"][0].numpy(), known[:L])
    uncut, _ = _expected(grid, scaler, int(t0[0]), int(r0[0]), int(c0[0]), 4)
    assert not np.allclose(uncut[:L], exp[:L])  # history_start really cut days off for this window


def test_season_bad_settings_are_user_errors():
    grid = make_grid(T=24 * 4)
    with pytest.raises(UserError, match="season_days"):
        WindowDataset(grid, input_len=L, label_len=LABEL, horizon=H, patch=3, season_days=-1)
    with pytest.raises(UserError, match="exceeds one day"):
        WindowDataset(grid, input_len=4, label_len=2, horizon=30, patch=3, season_days=2)
    with pytest.raises(UserError, match="season_days"):
        load_config(None, ["data.season_days=-2"])


def _season_batch(days=2):
    grid = make_grid(T=24 * 6, H=3, W=3, seed=5)
    scaler = Scaler.fit(grid, (0, 24 * 6))
    ds = WindowDataset(grid, input_len=L, label_len=LABEL, horizon=H, patch=3, scaler=scaler,
                       target_range=(24 * 3, 24 * 6), season_days=days)
    return ds, ds.get_batch(np.arange(16))


def test_sim_mstnet_reads_the_seasonal_history_of_the_horizon():
    ds, batch = _season_batch()
    dims = DataDims.from_dataset(ds)
    assert dims.season_days == 2
    torch.manual_seed(0)
    model = build_model("sim-mstnet", dims, d_model=8, n_heads=2, d_ff=16, dropout=0.0).eval()
    with torch.no_grad():
        out = model(batch)
        edited = dict(batch)
        edited["y_season"] = batch["y_season"].clone()
        edited["y_season"][:, -1] += 3.0   # only the last horizon step's seasonal mean
        moved = model(edited)
    assert (out - moved).abs().max() > 1e-3
    # without the seasonal keys the model says what it was built for
    bare = {k: v for k, v in batch.items() if "season" not in k}
    with pytest.raises(UserError, match="seasonal history"):
        model(bare)


def test_models_that_do_not_read_the_season_refuse_it():
    ds, _ = _season_batch()
    with pytest.raises(UserError, match="does not read the seasonal history"):
        build_model("lstm", DataDims.from_dataset(ds))


def test_window_norm_scales_the_season_with_the_centre_statistics():
    _, batch = _season_batch()
    out, mean, std = normalize_batch(batch, LABEL)
    known = batch["y_season_mask"]
    expected = torch.where(known, (batch["y_season"] - mean) / std, torch.zeros_like(batch["y_season"]))
    torch.testing.assert_close(out["y_season"], expected)
    assert not torch.equal(out["y_season"], batch["y_season"])


def test_scarce_protocol_season_does_not_read_before_the_kept_days(tmp_path):
    grid = make_grid(T=24 * 20, H=2, W=2, services=("net",), seed=6)
    path = tmp_path / "g.npz"
    grid.save(path)
    cfg = load_config(None, [f"data.path={path}", "data.input_len=6", "data.label_len=3", "data.horizon=3",
                             "data.patch=3", "data.train_days=3", "data.season_days=7"])
    data = prepare_data(cfg, grid)
    keep_from = data.train.history_start
    assert keep_from > 0
    edited = grid.values.copy()
    edited[:keep_from] *= 50.0
    grid2 = type(grid)(edited, grid.mask, grid.timestamps, grid.services, dict(grid.meta))
    data2 = prepare_data(cfg, grid2)
    for a, b in ((data.train, data2.train), (data.test, data2.test)):
        idx = np.arange(0, len(a), 5)
        ba, bb = a.get_batch(idx), b.get_batch(idx)
        torch.testing.assert_close(ba["x_season"], bb["x_season"])
        torch.testing.assert_close(ba["y_season"], bb["y_season"])


def test_season_days_null_means_a_week_for_the_models_that_read_it(tmp_path):
    grid = make_grid(T=24 * 40, H=2, W=2, services=("net",), seed=7)
    base = ["data.input_len=6", "data.label_len=3", "data.patch=3"]
    for model, horizon, expected in (("stnet", 3, 7), ("lstm", 3, 0), ("stnet", 30, 0)):
        cfg = load_config(None, [*base, f"model.name={model}", f"data.horizon={horizon}",
                                 "data.input_len=36" if horizon > 24 else "data.input_len=6"])
        assert cfg.data.season_days is None
        data = prepare_data(cfg, grid)
        assert cfg.data.season_days == expected == data.train.season_days, (model, horizon)
    cfg = load_config(None, [*base, "model.name=stnet", "data.horizon=3", "data.season_days=0"])
    prepare_data(cfg, grid)
    assert cfg.data.season_days == 0


def test_anchored_season_ignores_the_level_of_the_previous_days():
    """season_anchor: the previous days' shape counts, their level does not (a level drift between
    those days and now leaves the forecast unchanged); without it the level moves the forecast."""
    ds, batch = _season_batch()
    dims = DataDims.from_dataset(ds)
    shifted = dict(batch)
    for key in ("x_season", "y_season"):
        shifted[key] = torch.where(batch[key + "_mask"], batch[key] + 2.5, batch[key])
    for anchor in (True, False):
        torch.manual_seed(0)
        model = build_model("sim-mstnet", dims, d_model=8, n_heads=2, d_ff=16, dropout=0.0,
                            season_anchor=anchor, highway_init="uniform").eval()
        with torch.no_grad():
            gap = (model(batch) - model(shifted)).abs().max()
        if anchor:
            assert gap < 1e-4
        else:
            assert gap > 1e-3
