"""Fast guards for the trainer's plain functions (schedules, grid loading, scarce-data ranges),
written from `make mutate MUTATE_SAMPLE=7 MODULES=src/simmstnet/train/trainer.py` survivors
(2026-12-06): each fails on one of them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from simmstnet.config import load_config
from simmstnet.data.windows import data_range, split_ranges
from simmstnet.errors import UserError
from simmstnet.train.trainer import _scarce_ranges, load_grid, make_scheduler, schedule_factor
from tests.conftest import make_grid


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
