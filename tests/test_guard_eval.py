"""Guards for evaluation, metrics and loss weighting (issue 15): each test fails on one plausible bug."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from simmstnet.data.scaling import Scaler
from simmstnet.data.windows import WindowDataset
from simmstnet.eval.forecast import evaluate
from simmstnet.eval.metrics import masked_metrics
from simmstnet.train.loss_weighting import DynamicLossWeighting
from tests.conftest import make_grid


class Recorder(nn.Module):
    """Forecasts the last scaled input; records the window indices it was asked for."""

    def __init__(self, horizon):
        super().__init__()
        self.h = horizon
        self.seen: list[int] = []

    def forward(self, batch):
        self.seen.extend(batch["index"].tolist())
        return batch["x"][:, -1:, :].expand(-1, self.h, -1)


def _dataset(T=60, missing=0.2):
    grid = make_grid(T=T, H=2, W=3, missing=missing, seed=11)
    scaler = Scaler.fit(grid, (0, T))
    return WindowDataset(grid, input_len=8, label_len=4, horizon=3, patch=3, scaler=scaler)


def _brute(ds):
    """Masked MAE/RMSE of the last-value forecast over every window, window by window."""
    abs_sum, sq_sum, n = 0.0, 0.0, 0
    for i in range(len(ds)):
        s = ds[i]
        pred = ds.scaler.inverse(np.repeat(s["x"][-1:].astype(np.float64), ds.horizon, axis=0))
        m = s["y_mask"]
        e = (pred - s["y_raw"].astype(np.float64))[m]
        abs_sum += np.abs(e).sum()
        sq_sum += (e * e).sum()
        n += int(m.sum())
    return abs_sum / n, math.sqrt(sq_sum / n), n


@pytest.mark.parametrize("batch_size", [7, 16, 1000])
def test_evaluate_counts_every_window_and_observed_target(batch_size):
    ds = _dataset()
    assert len(ds) % 7 and len(ds) % 16 and len(ds) > 2 * 16  # several batches, a partial last one
    model = Recorder(ds.horizon)
    res = evaluate(model, ds, batch_size=batch_size, amp=False)
    mae, rmse, n = _brute(ds)
    overall = res["metrics"]["overall"]
    assert overall["n_windows"] == len(ds)
    assert overall["n_observed"] == n
    assert sorted(model.seen) == list(range(len(ds)))
    assert overall["mae"] == pytest.approx(mae, rel=1e-9)
    assert overall["rmse"] == pytest.approx(rmse, rel=1e-9)



def test_evaluate_task_losses_pool_every_batch():
    # Found by make mutate: `loss_sum = ...` (the last batch only) instead of `+=` passed.
    ds = _dataset()
    whole = evaluate(Recorder(ds.horizon), ds, batch_size=1000, amp=False)["task_losses"]
    parts = evaluate(Recorder(ds.horizon), ds, batch_size=7, amp=False)["task_losses"]
    assert len(whole) == 3 and all(v > 0 for v in whole)
    assert parts == pytest.approx(whole, rel=1e-6)  # per-batch sums are float32


def test_validation_subset_is_spread_over_the_whole_dataset():
    ds = _dataset(T=120)
    k = 10
    assert len(ds) > 20 * k
    model = Recorder(ds.horizon)
    res = evaluate(model, ds, batch_size=4, amp=False, max_windows=k)
    seen = sorted(model.seen)
    assert res["metrics"]["overall"]["n_windows"] == len(seen) == k
    assert len(set(seen)) == k
    assert seen[0] == 0 and seen[-1] == len(ds) - 1
    gaps = np.diff(seen)
    spacing = (len(ds) - 1) / (k - 1)
    assert gaps.min() >= math.floor(spacing) and gaps.max() <= math.ceil(spacing)


def test_smape_counts_only_observed_targets():
    y = np.array([[[10.0, 4.0], [20.0, 4.0]]])           # (B=1, H=2, C=2)
    p = np.array([[[12.0, 4.0], [5.0, 6.0]]])  # the unobserved target gets a forecast too
    m = np.array([[[True, True], [False, True]]])
    out = masked_metrics(p, y, m, ("call", "sms"))
    # call: only the first step is observed: 2 |12 - 10| / 22
    assert out["call"]["smape"] == pytest.approx(100 * 2 * 2 / 22)
    # sms: both steps: 0 and 2 |6 - 4| / 10
    assert out["sms"]["smape"] == pytest.approx(100 * (0 + 0.4) / 2)
    assert out["overall"]["smape"] == pytest.approx(100 * (4 / 22 + 0 + 0.4) / 3)
    # An unobserved target holding NaN changes nothing.
    y2 = y.copy()
    y2[0, 1, 0] = np.nan
    assert masked_metrics(p, y2, m, ("call", "sms")) == out


def test_smape_of_a_random_batch_matches_brute_force():
    rng = np.random.default_rng(2)
    y = rng.gamma(2, 5, size=(5, 4, 3))
    p = y + rng.normal(0, 3, size=y.shape)
    m = rng.random(y.shape) > 0.4
    y = np.where(m, y, 1e6)  # unobserved targets hold junk
    out = masked_metrics(p, y, m, ("call", "sms", "net"))
    for c, s in enumerate(("call", "sms", "net")):
        pp, yy = p[..., c][m[..., c]], y[..., c][m[..., c]]
        want = 100 * np.mean(2 * np.abs(pp - yy) / (np.abs(pp) + np.abs(yy)))
        assert out[s]["smape"] == pytest.approx(want)


@pytest.mark.parametrize("beta", [0.9, 0.2])
def test_ema_follows_beta_times_previous_plus_one_minus_beta_times_loss(beta):
    w = DynamicLossWeighting(2, beta=beta, tau=1.0)
    seq = [(4.0, 2.0), (2.0, 2.0), (1.0, 3.0)]
    ema = np.array(seq[0])
    w.weights(torch.tensor(seq[0]))
    for loss in seq[1:]:
        ema = beta * ema + (1 - beta) * np.array(loss)
        got = w.weights(torch.tensor(loss)).numpy()
    np.testing.assert_allclose(np.array(w.state_dict()["ema"]), ema, rtol=1e-12)
    ratio = ema / np.array(seq[0])
    want = 2 * np.exp(ratio) / np.exp(ratio).sum()
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_mae_by_step_pools_every_batch():
    ds = _dataset()
    res = evaluate(Recorder(ds.horizon), ds, batch_size=7, amp=False)
    abs_sum, n = np.zeros(ds.horizon), np.zeros(ds.horizon)
    for i in range(len(ds)):
        s = ds[i]
        pred = ds.scaler.inverse(np.repeat(s["x"][-1:].astype(np.float64), ds.horizon, axis=0))
        e = np.where(s["y_mask"], np.abs(pred - s["y_raw"].astype(np.float64)), 0.0)
        abs_sum += e.sum(1)
        n += s["y_mask"].sum(1)
    np.testing.assert_allclose(res["metrics"]["overall"]["mae_by_step"], abs_sum / n, rtol=1e-9)


def test_smape_is_null_when_no_target_has_a_denominator():
    y = np.zeros((2, 2, 1))
    out = masked_metrics(np.zeros_like(y), y, np.ones(y.shape, bool), ("net",))
    assert out["net"]["mae"] == 0.0 and out["net"]["n_observed"] == 4
    assert out["net"]["smape"] is None and out["overall"]["smape"] is None
    m = np.array([[[True], [False]], [[True], [True]]])
    out = masked_metrics(np.ones_like(y), y, m, ("net",))
    assert out["overall"]["mae_by_step"] == [1.0, 1.0] and out["overall"]["n_windows"] == 2
    one_step = masked_metrics(np.ones_like(y), y, np.array([[[True], [False]], [[True], [False]]]), ("net",))
    assert one_step["overall"]["mae_by_step"] == [1.0, None]


def test_weighting_state_names_its_kind_and_counts_steps():
    import json

    from simmstnet.errors import UserError
    from simmstnet.train.loss_weighting import StaticLossWeighting

    a = DynamicLossWeighting(2, beta=0.6, tau=0.5)
    for loss in ([3.0, 1.0], [2.0, 1.0], [1.0, 1.5]):
        a.weights(torch.tensor(loss))
    state = json.loads(json.dumps(a.state_dict()))
    assert state["kind"] == "dynamic" and state["steps"] == 3 and state["n_tasks"] == 2
    b = DynamicLossWeighting(2)
    b.load_state_dict(state)
    assert (b.beta, b.tau, b.steps) == (0.6, 0.5, 3)
    assert b.ema.dtype == torch.float64 and b.start.dtype == torch.float64 and b.seen.dtype == torch.bool
    with pytest.raises(UserError, match="static weighting for 2 tasks, this run has dynamic for 2"):
        b.load_state_dict(StaticLossWeighting(2).state_dict())
    with pytest.raises(UserError, match="dynamic weighting for 2 tasks, this run has static for 3"):
        StaticLossWeighting(3).load_state_dict(state)
    with pytest.raises(ValueError, match="expected 2 task losses, got 3"):
        b.weights(torch.ones(3))
    w = b.combine(torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert w.dtype == torch.float64 and b.steps == 4


def test_weighting_parameter_boundaries():
    from simmstnet.errors import UserError
    from simmstnet.train.loss_weighting import StaticLossWeighting, make_loss_weighting

    one = make_loss_weighting("dynamic", 1)  # a single service (table 1) is a valid task set
    assert torch.equal(one.weights(torch.tensor([2.0])), torch.ones(1))
    assert torch.equal(make_loss_weighting("average", 1).weights(torch.tensor([2.0])), torch.ones(1))
    assert isinstance(make_loss_weighting("static", 2), StaticLossWeighting)
    w = make_loss_weighting("dynamic", 2, beta=0.0, tau=2.0)  # beta = 0: the EMA is the last loss
    assert (w.beta, w.tau) == (0.0, 2.0)
    w.weights(torch.tensor([4.0, 2.0]))
    w.weights(torch.tensor([1.0, 2.0]))
    np.testing.assert_allclose(w.ema.numpy(), [1.0, 2.0])
    assert w.ema.dtype == torch.float64 and w.start.dtype == torch.float64
    for bad in (dict(n_tasks=0), dict(n_tasks=2, beta=1.0), dict(n_tasks=2, beta=-0.1),
                dict(n_tasks=2, tau=0.0)):
        with pytest.raises(UserError):
            DynamicLossWeighting(**bad)
    with pytest.raises(UserError):
        StaticLossWeighting(0)
    with pytest.raises(ValueError):
        StaticLossWeighting(2).weights(torch.ones(3))


# ----------------------------------------------------------------------------- eval/forecast survivors
# Found by `make mutate MUTATE_SAMPLE=7 MODULES=src/simmstnet/eval/forecast.py` (2026-12-06).


class HistoryModel(Recorder):
    """A ``needs_history`` model: counts its binds and forecasts from the window start it is given."""

    needs_history = True

    def __init__(self, horizon):
        super().__init__(horizon)
        self.bound_dataset = None
        self.binds = 0
        self.starts: list[int] = []

    def bind(self, ds):
        self.bound_dataset = ds
        self.binds += 1

    def forward(self, batch):
        self.starts.extend(batch["start"].tolist())
        return super().forward(batch)


class Wrapper(nn.Module):
    """What DDP looks like to the evaluation code: the model under ``.module``."""

    def __init__(self, inner):
        super().__init__()
        self.module = inner

    def forward(self, batch):
        return self.module(batch)


@pytest.mark.parametrize("wrapped", [False, True])
def test_history_model_is_bound_once_and_gets_each_window_start(wrapped):
    ds = _dataset()
    inner = HistoryModel(ds.horizon)
    model = Wrapper(inner) if wrapped else inner
    evaluate(model, ds, batch_size=7, amp=False)
    assert inner.binds == 1 and inner.bound_dataset is ds
    start, _, _ = ds.window_info(np.arange(len(ds)))
    assert inner.starts == start.tolist()


def test_unwrap_reaches_the_wrapped_model():
    from simmstnet.eval.forecast import _unwrap

    inner = Recorder(3)
    assert _unwrap(Wrapper(inner)) is inner and _unwrap(inner) is inner


def test_autocast_is_bf16_on_cuda_only_when_asked():
    import contextlib

    from simmstnet.eval.forecast import autocast

    with pytest.warns(UserWarning) if not torch.cuda.is_available() else contextlib.nullcontext():
        ctx = autocast(torch.device("cuda"), True)  # built, not entered: works without a GPU
    assert isinstance(ctx, torch.autocast)
    assert ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
    assert isinstance(autocast(torch.device("cuda"), False), contextlib.nullcontext)
    assert isinstance(autocast(torch.device("cpu"), True), contextlib.nullcontext)


def test_evaluate_draws_no_progress_bar_unless_asked(monkeypatch):
    import simmstnet.eval.forecast as fc

    disabled = []
    real = fc.tqdm

    def spy(*args, **kw):
        disabled.append(kw.get("disable"))
        return real(*args, **kw)

    monkeypatch.setattr(fc, "tqdm", spy)
    ds = _dataset()
    evaluate(Recorder(ds.horizon), ds, batch_size=7, amp=False)
    evaluate(Recorder(ds.horizon), ds, batch_size=7, amp=False, progress=True)
    assert disabled == [True, None]  # off by default; asked for: tqdm's own choice (off when not a terminal)


def _calibration(ds):
    from simmstnet.eval.intervals import calibrate, cell_scales

    scale = cell_scales(ds.grid.values, ds.grid.mask)
    return calibrate(Recorder(ds.horizon), ds, scale, levels=(0.8,), method="split", batch_size=7, amp=False)


@pytest.mark.parametrize("method", ["split", "aci"])
def test_evaluate_with_intervals_keeps_the_task_losses_and_times_itself(method):
    import time

    ds = _dataset()
    plain = evaluate(Recorder(ds.horizon), ds, batch_size=7, amp=False)
    cal = _calibration(ds)
    t0 = time.perf_counter()
    res = evaluate(Recorder(ds.horizon), ds, batch_size=7, amp=False, intervals=cal, interval_method=method)
    wall = time.perf_counter() - t0
    assert res["task_losses"] == pytest.approx(plain["task_losses"], rel=1e-9)
    assert res["metrics"]["overall"]["mae"] == pytest.approx(plain["metrics"]["overall"]["mae"], rel=1e-12)
    assert res["interval_method"] == method
    assert ("aci" in res) == (method == "aci")  # adaptive conformal inference ran when asked
    assert 0.0 < res["interval_seconds"] <= wall


def test_cell_series_of_a_cell_without_windows_is_empty_with_the_right_shapes():
    from simmstnet.eval.forecast import cell_series

    ds = _dataset()
    t, truth, fc = cell_series(Recorder(ds.horizon), ds, row=99, col=99, amp=False)
    assert t.shape == (0,) and t.dtype == np.int64
    assert truth.shape == (0, ds.n_services) and fc.shape == (0, ds.n_services)
