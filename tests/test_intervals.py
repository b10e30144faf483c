"""Conformal prediction intervals: coverage, ordering, per-cell scaling, ACI, metrics, CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from simmstnet.cli import main
from simmstnet.errors import UserError
from simmstnet.eval.intervals import (AciBuffer, Calibration, IntervalAccumulator, ScoreCollector,
                                      cell_scales, conformal_quantile, parse_levels)
from simmstnet.train.trainer import Trainer
from tests.conftest import make_grid
from tests.train_helpers import tiny_config

LEVELS = (0.8, 0.95)


def _noise_problem(rng, n_windows, scale, H=3, C=2):
    """Truth = forecast + cell scale x N(0, 1) x step factor: known noise per cell, step, service."""
    Hg, Wg = scale.shape[:2]
    rows = rng.integers(0, Hg, n_windows)
    cols = rng.integers(0, Wg, n_windows)
    step = np.array([1.0, 1.5, 2.0])[:H][None, :, None]
    pred = np.broadcast_to(50.0 * scale[rows, cols][:, None, :], (n_windows, H, C)).copy()
    y = pred + scale[rows, cols][:, None, :] * step * rng.standard_normal((n_windows, H, C))
    mask = np.ones(y.shape, bool)
    return pred, y, mask, rows, cols


def _calibrate(rng, scale, n=4000, levels=LEVELS):
    pred, y, mask, rows, cols = _noise_problem(rng, n, scale)
    col = ScoreCollector(scale, 3, ("call", "net"))
    for lo in range(0, n, 512):  # in batches, like evaluate
        sl = slice(lo, lo + 512)
        col.update(pred[sl], y[sl], mask[sl], rows[sl], cols[sl])
    return col.fit(levels)


def test_split_conformal_coverage_matches_nominal_on_known_noise():
    rng = np.random.default_rng(0)
    scale = rng.uniform(1, 20, size=(4, 5, 2))
    cal = _calibrate(rng, scale)
    # Normalized scores are |N(0,1)| x step factor: q = factor x the normal quantile.
    z = {0.8: 1.2815516, 0.95: 1.9599640}
    for k, lv in enumerate(LEVELS):
        np.testing.assert_allclose(cal.q[k] / np.array([1.0, 1.5, 2.0])[:, None], z[lv], rtol=0.08)
    pred, y, mask, rows, cols = _noise_problem(rng, 20000, scale)
    lower, upper = cal.bounds(pred, rows, cols)
    n = y.size
    for k, lv in enumerate(LEVELS):
        cover = float(((lower[k] <= y) & (y <= upper[k])).mean())
        se = math.sqrt(lv * (1 - lv) / n) + math.sqrt(lv * (1 - lv) / 4000)  # test + calibration noise
        assert abs(cover - lv) < 4 * se, (lv, cover)
        # ... and per horizon step and service, where the noise differs
        per = ((lower[k] <= y) & (y <= upper[k])).mean(0)
        assert np.all(np.abs(per - lv) < 0.03), per


def test_conformal_quantile_is_the_finite_sample_rank():
    rng = np.random.default_rng(1)
    for n in (1, 9, 10, 99, 1000):
        s = rng.exponential(size=n)
        for lv in (0.5, 0.8, 0.95):
            q = conformal_quantile(s, lv)
            # Brute force: the smallest score q with #{scores <= q} >= ceil((n + 1) lv) (or the max).
            need = min(math.ceil((n + 1) * lv), n)
            ok = [v for v in np.sort(s) if (s <= v).sum() >= need]
            assert q == ok[0]
    assert math.isnan(conformal_quantile(np.array([np.nan]), 0.8))


def test_intervals_are_ordered_and_contain_the_point_forecast():
    rng = np.random.default_rng(2)
    scale = rng.uniform(0.5, 5, size=(3, 3, 2))
    cal = _calibrate(rng, scale, n=600)
    pred = rng.normal(2.0, 5.0, size=(200, 3, 2))  # some negative forecasts too
    rows, cols = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    lower, upper = cal.bounds(pred, rows, cols)
    assert lower.shape == upper.shape == (2, 200, 3, 2)
    assert np.all(lower <= pred) and np.all(pred <= upper)
    # Nested: the 95 % interval holds the 80 % one.
    assert np.all(lower[1] <= lower[0]) and np.all(upper[0] <= upper[1])
    # Traffic is never negative: a non-negative forecast never gets a negative lower bound.
    assert np.all(lower[:, pred >= 0] >= 0)


def test_per_cell_scaling_gives_a_quiet_cell_a_narrower_band():
    """A quiet cell and a busy cell, noise proportional to the level: the quiet cell's band is
    narrower, and both cells keep their coverage (a common band would over-cover the quiet cell
    and under-cover the busy one)."""
    rng = np.random.default_rng(3)
    T = 24 * 30
    level = np.array([[5.0, 500.0]])[..., None]                     # (1, 2, 1): quiet, busy
    values = (level * (1 + 0.1 * rng.standard_normal((T, 1, 2, 1)))).astype(np.float32)
    mask = np.ones(values.shape, bool)
    scale = cell_scales(values, mask, (0, T // 2))
    assert scale[0, 0, 0] < scale[0, 1, 0] / 20
    # Forecast = the level; calibrate on the third quarter, test on the last one.
    col = ScoreCollector(scale, 1, ("net",))
    cal_t = np.arange(T // 2, 3 * T // 4)
    for c in range(2):
        n = cal_t.size
        col.update(np.full((n, 1, 1), level[0, c, 0]), values[cal_t, 0, c, :].reshape(n, 1, 1),
                   np.ones((n, 1, 1), bool), np.zeros(n, int), np.full(n, c))
    cal = col.fit(LEVELS)
    test_t = np.arange(3 * T // 4, T)
    width, cover = [], []
    for c in range(2):
        p = np.full((test_t.size, 1, 1), level[0, c, 0])
        y = values[test_t, 0, c, :].reshape(-1, 1, 1)
        lo, up = cal.bounds(p, np.zeros(test_t.size, int), np.full(test_t.size, c))
        width.append(float((up[0] - lo[0]).mean()))
        cover.append(float(((lo[0] <= y) & (y <= up[0])).mean()))
    assert width[0] < width[1] / 20
    assert all(abs(cv - 0.8) < 0.08 for cv in cover), cover


def test_cell_scales_floor_and_unobserved_cells():
    values = np.zeros((10, 1, 3, 1), np.float32)
    values[:, 0, 1, 0] = np.arange(10) * 2.0              # |change| 2
    values[:, 0, 2, 0] = 7.0                              # constant: scale 0 -> floored
    mask = np.ones(values.shape, bool)
    mask[:, 0, 0, 0] = False                              # never observed -> the median
    s = cell_scales(values, mask)
    assert s[0, 1, 0] == pytest.approx(2.0)
    assert s[0, 0, 0] == pytest.approx(2.0)
    assert s[0, 2, 0] == pytest.approx(0.02)


def test_aci_recovers_coverage_under_drift_where_split_does_not():
    """Noise that doubles after calibration (drift): split conformal under-covers, ACI adapts."""
    rng = np.random.default_rng(4)
    scale = np.ones((5, 5, 1))
    Hh = 2
    col = ScoreCollector(scale, Hh, ("net",))
    starts, rows, cols = np.repeat(np.arange(1500), 25), np.tile(np.repeat(np.arange(5), 5), 1500), \
        np.tile(np.tile(np.arange(5), 5), 1500)
    y_cal = 100.0 + rng.standard_normal((5000, Hh, 1))
    col.update(np.full_like(y_cal, 100.0), y_cal, np.ones(y_cal.shape, bool), np.zeros(5000, int), np.zeros(5000, int))
    cal = col.fit((0.8,), gamma=0.005)
    y = 100.0 + 2.0 * rng.standard_normal((starts.size, Hh, 1))
    pred, mask = np.full_like(y, 100.0), np.ones(y.shape, bool)
    split = IntervalAccumulator(("net",), (0.8,), (5, 5))
    lo, up = cal.bounds(pred, rows, cols)
    split.update(pred, y, mask, lo, up, rows, cols)
    aci = IntervalAccumulator(("net",), (0.8,), (5, 5))
    buf = AciBuffer(cal)
    for a in range(0, starts.size, 1000):
        sl = slice(a, a + 1000)
        buf.update(starts[sl], rows[sl], cols[sl], pred[sl], y[sl], mask[sl])
    info = buf.finish(aci)
    split_cov = split.result()["net"]["coverage_80"]
    aci_cov = aci.result()["net"]["coverage_80"]
    assert split_cov < 0.6
    assert abs(aci_cov - 0.8) < 0.03, aci_cov
    assert np.all(np.array(info["alpha_final"]) < 0.2)  # the level moved up to widen the band


def test_interval_metrics_by_hand():
    acc = IntervalAccumulator(("net",), (0.8,), (1, 2))
    pred = np.array([[[10.0]], [[10.0]]])
    y = np.array([[[12.0]], [[20.0]]])
    mask = np.ones(y.shape, bool)
    lower = np.array([[[[8.0]], [[8.0]]]])
    upper = np.array([[[[13.0]], [[13.0]]]])
    acc.update(pred, y, mask, lower, upper, np.array([0, 0]), np.array([0, 1]))
    r = acc.result()["net"]
    assert r["coverage_80"] == 0.5
    assert r["width_80"] == 5.0
    # Winkler: width 5, plus 2/alpha x 7 for the miss above: (5 + 5 + 10 * 7) / 2
    assert r["winkler_80"] == pytest.approx((5 + 5 + 70) / 2)
    # Pinball at levels 0.1 (lower), 0.5 (point), 0.9 (upper), averaged; CRPS = 2 x mean pinball.
    def pb(q, tau, obs):
        return tau * (obs - q) if obs >= q else (1 - tau) * (q - obs)
    expect = np.mean([np.mean([pb(8, .1, o), pb(10, .5, o), pb(13, .9, o)]) for o in (12.0, 20.0)])
    assert r["pinball"] == pytest.approx(expect)
    assert r["crps"] == pytest.approx(2 * expect)
    cells = acc.cell_table()
    assert cells["coverage"][0][0, :, 0].tolist() == [1.0, 0.0]
    assert cells["mae"][0, :, 0].tolist() == [2.0, 10.0]


@pytest.mark.parametrize("text", ["1.5", "abc", "0", "1", "", "0.8,", "0.8,0.8", "-0.2", "nan"])
def test_parse_levels_rejects_user_mistakes(text):
    with pytest.raises(UserError) as err:
        parse_levels(text)
    assert "\n" not in str(err.value)


def test_parse_levels_accepts_and_sorts():
    assert parse_levels("0.95, 0.8") == (0.8, 0.95)
    assert parse_levels(None) == LEVELS


def test_calibration_roundtrip_and_other_levels(tmp_path):
    rng = np.random.default_rng(5)
    cal = _calibrate(rng, rng.uniform(1, 2, size=(2, 2, 2)), n=3000)
    path = cal.save(tmp_path / "calibration.npz")
    back = Calibration.load(path)
    np.testing.assert_allclose(back.q, cal.q)
    assert back.levels == cal.levels and back.services == ("call", "net")
    more = back.with_levels((0.5, 0.8, 0.9))
    np.testing.assert_allclose(more.q[1], cal.q[0])       # calibrated level: exact
    assert np.all(more.q[0] < more.q[1]) and np.all(more.q[1] < more.q[2])
    with pytest.raises(UserError):
        Calibration.load(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------- run folder and CLI


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("intervals")
    grid = make_grid(T=24 * 6, H=3, W=4, missing=0.05, seed=11)
    path = root / "grid.npz"
    grid.save(path)
    out = root / "run"
    Trainer(tiny_config(out, f"data.path={path}", model="last-value"), progress=False, quiet=True).run()
    return grid, path, out


def test_train_writes_interval_metrics_calibration_and_maps(run):
    grid, _, out = run
    m = json.loads((out / "metrics.json").read_text())
    iv = m["intervals"]
    assert iv["method"] == "aci" and iv["levels"] == [0.8, 0.95] and iv["calibrated_on"] == "val"
    for s in list(grid.services) + ["overall"]:
        block = iv["test"][s]
        for key in ("coverage_80", "width_80", "winkler_80", "cell_coverage_p10_80", "coverage_95",
                    "width_95", "winkler_95", "pinball", "crps"):
            assert block[key] is not None and math.isfinite(block[key]), (s, key)
        assert 0 < block["width_80"] < block["width_95"]
        assert block["coverage_80"] <= block["coverage_95"]
    assert set(m["test"]) == set(grid.services) | {"overall"}  # the point metrics are unchanged
    assert (out / "calibration.npz").is_file()
    for s in grid.services:
        assert (out / f"map_{s}.png").stat().st_size > 0
        assert (out / f"forecast_cells_{s}.png").stat().st_size > 0
    cells = pd.read_csv(out / "cells.csv")
    assert {"row", "col", "service", "mae", "rel_mae", "coverage_80", "coverage_95"} <= set(cells.columns)


def test_predict_intervals_writes_lower_and_upper_columns(run, tmp_path):
    grid, path, out = run
    csv_path = tmp_path / "fc.csv"
    assert main(["predict", "--run", str(out), "--data", str(path), "--out", str(csv_path),
                 "--intervals", "0.8,0.95"]) == 0
    df = pd.read_csv(csv_path)
    assert list(df.columns)[-4:] == ["lower_80", "upper_80", "lower_95", "upper_95"]
    assert len(df) == grid.shape[1] * grid.shape[2] * 3 * 3
    f = df["forecast"]
    assert (df["lower_95"] <= df["lower_80"] + 1e-4).all() and (df["lower_80"] <= f + 1e-4).all()
    assert (f <= df["upper_80"] + 1e-4).all() and (df["upper_80"] <= df["upper_95"] + 1e-4).all()
    assert (df["upper_95"] > df["lower_95"]).all()
    npz = tmp_path / "fc.npz"
    assert main(["predict", "--run", str(out), "--data", str(path), "--out", str(npz), "--intervals", "0.9"]) == 0
    z = np.load(npz)
    assert z["lower"].shape == z["upper"].shape == (1, *z["forecast"].shape)
    assert z["levels"].tolist() == [0.9]
    # Without --intervals the table is as before.
    plain = tmp_path / "plain.csv"
    assert main(["predict", "--run", str(out), "--data", str(path), "--out", str(plain)]) == 0
    assert list(pd.read_csv(plain).columns)[-1] == "forecast"


@pytest.mark.parametrize("text", ["1.5", "abc"])
def test_cli_rejects_bad_levels_with_exit_2(run, tmp_path, capsys, text):
    _, path, out = run
    for cmd in (["predict", "--run", str(out), "--data", str(path), "--out", str(tmp_path / "x.csv")],
                ["evaluate", "--run", str(out)]):
        assert main(cmd + ["--intervals", text]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("simmstnet: error: --intervals"), err
    assert not (tmp_path / "x.csv").exists()


def test_evaluate_intervals_matches_metrics_json_and_split_runs(run, tmp_path, capsys):
    grid, _, out = run
    assert main(["evaluate", "--run", str(out), "--intervals", "0.8,0.95", "--maps", str(tmp_path / "maps")]) == 0
    res = json.loads(capsys.readouterr().out)
    m = json.loads((out / "metrics.json").read_text())
    for key in ("coverage_80", "width_95", "crps"):
        assert res["intervals"]["test"]["overall"][key] == pytest.approx(m["intervals"]["test"]["overall"][key],
                                                                        rel=1e-5)
    assert (tmp_path / "maps" / "cells.csv").is_file()
    assert res["intervals"]["method"] == "aci"
    assert main(["evaluate", "--run", str(out), "--intervals", "0.8", "--interval-method", "split"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["intervals"]["method"] == "split"
    assert 0.5 < res["intervals"]["test"]["overall"]["coverage_80"] <= 1.0


def test_old_run_without_calibration_file_is_calibrated_on_the_fly(run, tmp_path, capsys):
    import shutil

    _, path, out = run
    copy = tmp_path / "old-run"
    shutil.copytree(out, copy)
    (copy / "calibration.npz").unlink()
    assert main(["evaluate", "--run", str(copy), "--intervals", "0.8,0.95"]) == 0
    res = json.loads(capsys.readouterr().out)
    m = json.loads((out / "metrics.json").read_text())
    assert res["intervals"]["test"]["overall"]["coverage_80"] == pytest.approx(
        m["intervals"]["test"]["overall"]["coverage_80"])
