"""Fast guards for the trainer's plain functions (schedules, grid loading, scarce-data ranges,
data preparation, the trainer's flags), written from `make mutate MUTATE_SAMPLE=7
MODULES=src/simmstnet/train/trainer.py` survivors (2026-12-06): each fails on one of them."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from simmstnet.config import load_config
from simmstnet.data.windows import data_range, split_ranges
from simmstnet.errors import UserError
from simmstnet.train.distributed import DistInfo
from simmstnet.train.trainer import (Trainer, _scarce_ranges, load_grid, make_scheduler, prepare_data,
                                     schedule_factor)
from tests.conftest import make_grid
from tests.train_helpers import tiny_config


def _train_cfg(*overrides):
    return load_config(None, list(overrides)).train


def test_cosine_schedule_falls_from_one_to_a_hundredth_over_the_stretch():
    f = schedule_factor(_train_cfg("train.lr_schedule=cosine"), steps_per_epoch=10)
    assert f(0, 100) == pytest.approx(1.0)
    assert f(50, 100) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(100, 100) == pytest.approx(0.01) and f(250, 100) == pytest.approx(0.01)  # held after the end
    vals = [f(s, 100) for s in range(101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_step_and_constant_schedules():
    f = schedule_factor(_train_cfg("train.lr_schedule=step", "train.lr_step_epochs=2", "train.lr_gamma=0.5"),
                        steps_per_epoch=10)
    assert [f(s, 1000) for s in (0, 19, 20, 39, 40)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    g = schedule_factor(_train_cfg("train.lr_schedule=constant"), steps_per_epoch=10)
    assert {g(s, 100) for s in (0, 50, 100, 500)} == {1.0}


def test_scheduler_spreads_the_cosine_over_every_planned_step():
    cfg = _train_cfg("train.lr_schedule=cosine", "train.epochs=4", "train.lr=0.1")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = make_scheduler(opt, cfg, steps_per_epoch=5)  # 20 planned steps
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(0.1 * (0.01 + 0.99 * 0.5))  # half way at step 10 of 20
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.01)


def test_load_grid_resamples_and_orders_services(tmp_path):
    grid = make_grid(T=48, step=1800, services=("call", "sms", "net"))
    path = grid.save(tmp_path / "g.npz")
    out = load_grid(path, ["net", "call"], "1h")
    assert out.step == 3600 and out.shape[0] == 24 and out.services == ("net", "call")
    c = grid.service_index("net")
    v = grid.values[..., c].astype(np.float64)
    np.testing.assert_allclose(out.values[0, ..., 0], v[0] + v[1], rtol=1e-5)


@pytest.mark.parametrize("days", [1, 3])
def test_scarce_ranges_keep_the_last_days_before_validation(days):
    grid = make_grid(T=24 * 10, H=2, W=2)
    L, H = 12, 3
    split = (0.6, 0.2, 0.2)
    full = split_ranges(grid, split, L, H)
    ranges, scaler_range = _scarce_ranges(grid, split, L, H, days)
    a = full["val"][0]
    assert ranges["val"] == full["val"] and ranges["test"] == full["test"]
    if days * 24 < L + H:  # no complete training window: the scaler still sees those days
        assert ranges["train"] is None and scaler_range == (a - days * 24, a)
    else:
        assert ranges["train"] == split_ranges(grid, split, L, H, train_days=days)["train"]
        assert scaler_range == data_range(ranges["train"], L)
        assert scaler_range[0] >= a - days * 24 and scaler_range[1] <= a


def test_scarce_ranges_at_a_step_that_does_not_divide_a_day_use_the_general_rule():
    grid = make_grid(T=200, H=2, W=2, step=7 * 3600)  # 7 h does not divide 24 h
    with pytest.raises(UserError, match="train_days needs a step that divides a day"):
        _scarce_ranges(grid, (0.6, 0.2, 0.2), 12, 3, 1)


def _data_cfg(path, *overrides, model="sim-mstnet"):
    return tiny_config(path.parent / "run", f"data.path={path}", "data.split=[0.6,0.2,0.2]", *overrides,
                       model=model)


def test_prepare_data_reads_the_file_at_the_configured_step_with_its_season(tmp_path):
    path = make_grid(T=48 * 8, step=1800).save(tmp_path / "g.npz")  # 8 days at 30 min
    data = prepare_data(_data_cfg(path, "data.step=1h", "data.season_days=2"))
    assert data.grid.step == 3600 and data.grid.shape[0] == 24 * 8
    assert {ds.season_days for ds in (data.train, data.val, data.test)} == {2}


def test_prepare_data_under_the_scarce_protocol_keeps_only_the_last_days(tmp_path):
    path = make_grid(T=24 * 10).save(tmp_path / "g.npz")
    cfg = _data_cfg(path, "data.train_days=3")
    data = prepare_data(cfg, allow_no_train=True)
    ranges, fit = _scarce_ranges(data.grid, cfg.data.split, cfg.data.input_len, cfg.data.horizon, 3)
    assert data.ranges == ranges and data.train.history_start == fit[0] > 0
    # a day is too short for one training window: no training windows, the scaler still has its day
    data = prepare_data(_data_cfg(path, "data.train_days=1", "data.input_len=24", "data.horizon=6"),
                        allow_no_train=True)
    assert data.train is None and data.val is not None


def test_the_trainer_takes_resume_from_the_config_unless_told(tmp_path):
    cfg = load_config(None, ["train.resume=true"])
    assert Trainer(cfg).resume is True
    assert Trainer(cfg, resume=False).resume is False
    assert Trainer(load_config(None, [])).resume is False


def test_validation_keeps_the_last_epoch_when_the_mode_picks_its_own_model():
    def keep_last(*extra):
        return Trainer(load_config(None, ["sim2real.sim_data=sim.npz", *extra])).keep_last

    assert keep_last("sim2real.mode=finetune") is True  # finetune picks on its held-out real windows
    assert keep_last("sim2real.mode=mix") is False and keep_last("sim2real.mode=off") is False
    assert keep_last("sim2real.mode=mix", "sim2real.upper_data=val") is True  # validation was training data


def test_a_run_without_an_out_folder_gets_a_time_stamped_one():
    cfg = load_config(None, ["model.name=dlinear"])
    cfg.out = None
    trainer = Trainer(cfg)
    trainer.dist = DistInfo()
    out = trainer._out_folder()
    assert out.parent == Path("runs") and re.fullmatch(r"dlinear-\d{8}-\d{6}", out.name)


def test_the_forecast_plots_show_the_busiest_test_cell_one_step_ahead(tmp_path, monkeypatch):
    from simmstnet.eval import plots
    from simmstnet.models.registry import DataDims, build_model
    from simmstnet.train.trainer import plot_forecasts

    grid = make_grid(T=24 * 8, H=3, W=3, services=("net",))
    path = grid.save(tmp_path / "g.npz")
    data = prepare_data(_data_cfg(path, model="last-value"))
    model = build_model("last-value", DataDims.from_dataset(data.train))
    seen = {}
    monkeypatch.setattr(plots, "plot_forecast", lambda times, truth, fc, out, title, **kw:
                        seen.update(truth=truth, fc=fc, title=title) or out)
    plot_forecasts(model, data, tmp_path, amp=False)
    lo, hi = data.ranges["test"]
    totals = np.where(grid.mask[lo:hi, ..., 0], grid.values[lo:hi, ..., 0], 0).sum(0)
    row, col = np.unravel_index(int(np.argmax(totals)), totals.shape)
    assert f"cell (row {row}, col {col}), horizon step 1" in seen["title"]
    # last value, one step ahead: each forecast is the previous step's truth
    np.testing.assert_allclose(seen["fc"][1:], seen["truth"][:-1], rtol=1e-5)
