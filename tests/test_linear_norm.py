"""Linear references (ridge, NLinear, DLinear) against hand-computed answers; the per-window
normalization (model.norm=window) round trip with missing steps."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from simmstnet.data.grid import TrafficGrid
from simmstnet.data.scaling import Scaler
from simmstnet.data.windows import WindowDataset
from simmstnet.errors import UserError
from simmstnet.models.fake_batch import fake_batch
from simmstnet.models.norm import STD_FLOOR, WindowNorm, normalize_batch, window_stats
from simmstnet.models.registry import DataDims, build_model

START = 1383260400  # 2013-11-01 00:00 Europe/Rome


def _dims(c=2, L=6, label=3, h=3, patch=3):
    return DataDims(n_services=c, input_len=L, label_len=label, horizon=h, patch=patch, n_marks=5)


# ----------------------------------------------------------------------------- ridge

def _ar_grid(T=400, seed=0):
    """x_t = 0.6 x_{t-1} + 0.3 x_{t-2} + 2 sin(time of day) + noise, on a 2x2 grid, one service."""
    rng = np.random.default_rng(seed)
    step = 3600
    hours = np.arange(T) % 24
    v = np.zeros((T, 2, 2, 1))
    v[:2] = 50
    for t in range(2, T):
        v[t] = 0.6 * v[t - 1] + 0.3 * v[t - 2] + 2 * np.sin(2 * np.pi * hours[t - 1] / 24) + 5 \
            + rng.normal(0, 0.01, (2, 2, 1))
    return TrafficGrid.from_values(v, START, step, ("net",), meta={"timezone": "UTC"})


def test_ridge_matches_least_squares_by_hand():
    grid = _ar_grid()
    scaler = Scaler.fit(grid, (0, 300))
    ds = WindowDataset(grid, input_len=4, label_len=2, horizon=2, patch=1, scaler=scaler, target_range=(0, 300))
    model = build_model("ridge", DataDims.from_dataset(ds), alpha=0.0)
    model.fit(ds)
    # The same regression written out: features [x_1..x_4, sin, cos, 1] of every window.
    batch = ds.get_batch(np.arange(len(ds)))
    x = batch["x"][..., 0].double().numpy()
    angle = 2 * np.pi * (batch["x_mark"][:, -1, 0].double().numpy() + 0.5)
    X = np.column_stack([x, np.sin(angle), np.cos(angle), np.ones(len(x))])
    Y = batch["y"][..., 0].double().numpy()
    coef, *_ = np.linalg.lstsq(X, Y, rcond=None)
    assert np.allclose(model.coef[0].double().numpy(), coef, atol=1e-4)
    with torch.no_grad():
        pred = model(batch)[..., 0].double().numpy()
    assert np.allclose(pred, X @ coef, atol=1e-4)
    # and it recovers the process: one-step forecasts within the noise (original units)
    err = np.abs(scaler.inverse(torch.from_numpy(pred[:, :1, None])).numpy()[:, 0, 0]
                 - batch["y_raw"][:, 0, 0].numpy())
    assert err.mean() < 0.1


def test_ridge_refuses_window_norm_and_bad_options():
    with pytest.raises(UserError, match="norm=window"):
        build_model("ridge", _dims(), norm="window")
    with pytest.raises(UserError, match="alpha"):
        build_model("ridge", _dims(), alpha=-1.0)
    with pytest.raises(RuntimeError, match="fit"):
        build_model("ridge", _dims())(fake_batch(_dims(), 2))


def test_ridge_fills_unobserved_inputs_with_the_last_observed_value():
    dims = _dims(c=1, L=4, label=2, h=1)
    model = build_model("ridge", dims)
    model.coef.zero_()
    model.coef[0, 3, 0] = 1.0  # forecast = the last input
    model.fitted.fill_(True)
    batch = fake_batch(dims, 1)
    batch["x"][0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    batch["x_mask"][0, :, 0] = torch.tensor([True, True, True, False])
    assert float(model(batch)[0, 0, 0]) == pytest.approx(3.0)


# ----------------------------------------------------------------------------- NLinear, DLinear

def test_nlinear_is_a_linear_map_of_the_window_minus_its_last_value():
    dims = _dims(c=1, L=4, label=2, h=2)
    model = build_model("nlinear", dims, norm="none")
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 2.0]]))
        model.linear.bias.copy_(torch.tensor([0.5, 0.0]))
    batch = fake_batch(dims, 1)
    batch["x"][0, :, 0] = torch.tensor([1.0, 2.0, 4.0, 7.0])
    batch["x_mask"][:] = True
    out = model(batch)[0, :, 0]
    # x - last = [-6, -5, -3, 0] -> [-6 + 0.5, 0] + 7
    assert torch.allclose(out, torch.tensor([1.5, 7.0]))


def test_dlinear_splits_trend_and_remainder_by_a_replicate_padded_moving_average():
    dims = _dims(c=1, L=5, label=2, h=1)
    model = build_model("dlinear", dims, kernel=3, norm="none")
    assert model.kernel == 3
    with torch.no_grad():
        model.trend.weight.copy_(torch.tensor([[0, 0, 0, 0, 1.0]]))     # last trend value
        model.remainder.weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0]]))  # first remainder value
        model.trend.bias.zero_()
        model.remainder.bias.zero_()
    batch = fake_batch(dims, 1)
    x = torch.tensor([3.0, 0.0, 6.0, 3.0, 9.0])
    batch["x"][0, :, 0] = x
    batch["x_mask"][:] = True
    padded = torch.cat([x[:1], x, x[-1:]])
    trend = torch.stack([padded[i:i + 3].mean() for i in range(5)])
    expected = trend[-1] + (x[0] - trend[0])
    assert float(model(batch)[0, 0, 0]) == pytest.approx(float(expected))
    assert build_model("dlinear", _dims(L=6), kernel=25).kernel == 5  # clipped to an odd size <= L


# ----------------------------------------------------------------------------- window norm

def test_window_stats_count_only_observed_steps():
    v = torch.tensor([[1.0, 0.0, 3.0, 0.0]]).unsqueeze(-1)           # (1, 4, 1)
    m = torch.tensor([[True, False, True, False]]).unsqueeze(-1)
    mean, std = window_stats(v, m)
    assert float(mean) == pytest.approx(2.0) and float(std) == pytest.approx(1.0)
    mean, std = window_stats(v, torch.zeros_like(m))
    assert float(mean) == 0.0 and float(std) == pytest.approx(STD_FLOOR)


class _Echo(torch.nn.Module):
    """Forecasts the normalized last observed input for every step; records its inputs."""

    def __init__(self, horizon):
        super().__init__()
        self.horizon, self.seen = horizon, None
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, batch):
        self.seen = batch
        return batch["x"][:, -1:].expand(-1, self.horizon, -1) + 0 * self.p


def test_window_norm_round_trip_with_missing_steps():
    dims = _dims(c=2, L=6, label=3, h=3)
    batch = fake_batch(dims, 5, seed=2, missing=0.3)
    batch["x_mask"][:, -1] = True  # the echoed step is observed
    batch["x"] = torch.where(batch["x_mask"], batch["x"] * 40 + 300, torch.zeros(()))  # a busy cell
    batch["dec_in"] = torch.cat([batch["x"][:, 3:], torch.zeros(5, 3, 2)], dim=1)
    inner = _Echo(dims.horizon)
    out = WindowNorm(inner, dims.label_len)(batch)
    # mapped back exactly: the echo of the last input, in the batch's own units
    assert torch.allclose(out, batch["x"][:, -1:].expand(-1, 3, -1), atol=1e-3)
    seen = inner.seen
    mask = batch["x_mask"]
    # the model saw observed steps with mean 0 / std 1 per window and service, unobserved as 0
    for b in range(5):
        for c in range(2):
            obs = seen["x"][b, :, c][mask[b, :, c]]
            assert abs(float(obs.mean())) < 1e-4
            if obs.numel() > 1:
                assert float(obs.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    assert torch.all(seen["x"][~mask] == 0)
    # the decoder's known part mirrors x; the horizon part stays 0 (= the window mean)
    assert torch.allclose(seen["dec_in"][:, :3], seen["x"][:, 3:])
    assert torch.all(seen["dec_in"][:, 3:] == 0)


def test_window_norm_normalizes_each_patch_cell_by_its_own_statistics():
    dims = _dims(c=1, L=6, label=3, h=3, patch=3)
    batch = fake_batch(dims, 2, seed=4)
    batch["x_patch"][..., 0, 0] *= 100.0  # a neighbour 100x busier
    inputs, _, _ = normalize_batch(batch, dims.label_len)
    corner = inputs["x_patch"][:, :, 0, 0, 0]
    assert float(corner.abs().max()) < 5.0  # not 100x the others
    assert torch.allclose(corner.mean(1), torch.zeros(2), atol=1e-4)


def test_norm_option_is_checked_and_applied_by_the_registry():
    assert isinstance(build_model("stnet", _dims(c=1)), WindowNorm)           # auto = window
    assert not isinstance(build_model("lstm", _dims(c=1)), WindowNorm)         # paper setting
    assert isinstance(build_model("lstm", _dims(c=1), norm="window"), WindowNorm)
    with pytest.raises(UserError, match="norm"):
        build_model("stnet", _dims(c=1), norm="instance")


def test_cyclic_marks_put_midnight_next_to_the_last_slot_of_the_day():
    from simmstnet.models.layers.embeddings import cyclic_marks

    marks = torch.zeros(3, 5)
    marks[:, 0] = torch.tensor([-0.5, 23.0 / 24 - 0.5, 12.0 / 24 - 0.5])  # 00:00, 23:00, 12:00
    out = cyclic_marks(marks)
    assert out.shape == (3, 9)
    day = out[:, 5:7]
    assert float((day[0] - day[1]).norm()) < float((day[0] - day[2]).norm())
    assert torch.allclose(day[0], torch.tensor([0.0, 1.0]), atol=1e-6)
    assert math.isclose(float(day[2, 1]), -1.0, abs_tol=1e-6)
