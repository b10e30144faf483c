"""`simmstnet predict` and `simmstnet evaluate` on a finished run."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from simmstnet.cli import main
from simmstnet.train.trainer import Trainer
from tests.conftest import make_grid
from tests.train_helpers import tiny_config

L, H = 12, 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A last-value run (forecasts checkable by hand) and a historical-average run on one grid file."""
    root = tmp_path_factory.mktemp("predict")
    grid = make_grid(T=24 * 5, H=3, W=4, missing=0.05, seed=11)
    path = root / "grid.npz"
    grid.save(path)
    out = {}
    for model in ("last-value", "historical-average"):
        out[model] = root / model
        Trainer(tiny_config(out[model], f"data.path={path}", model=model), progress=False, quiet=True).run()
    return grid, path, out


def _last_observed(grid, t):
    """(Hg, Wg, C) value of the latest observed step <= t per cell and service."""
    seen = grid.mask[: t + 1]
    idx = t - np.argmax(seen[::-1], axis=0)  # last observed index (windows always have one here)
    return np.take_along_axis(grid.values, idx[None], axis=0)[0]


def test_predict_csv_rows_timestamps_and_values(runs, tmp_path, capsys):
    grid, path, out = runs
    csv_path = tmp_path / "fc.csv"
    assert main(["predict", "--run", str(out["last-value"]), "--data", str(path), "--out", str(csv_path)]) == 0
    df = pd.read_csv(csv_path)
    assert list(df.columns) == ["timestamp_issued", "target_timestamp", "horizon_step", "row", "col",
                                "service", "forecast"]
    Hg, Wg = grid.shape[1:3]
    assert len(df) == Hg * Wg * 3 * H
    issued = pd.to_datetime(df["timestamp_issued"], utc=True)
    target = pd.to_datetime(df["target_timestamp"], utc=True)
    last = pd.Timestamp(int(grid.timestamps[-1]), unit="s", tz="UTC")
    assert (issued == last).all()  # default: issued at the last time step of the file
    # Targets lie beyond the file's end: one step per horizon step.
    assert ((target - issued) == pd.to_timedelta(df["horizon_step"] * 3600, unit="s")).all()
    assert sorted(df["horizon_step"].unique()) == [1, 2, 3]
    expected = _last_observed(grid, grid.shape[0] - 1)
    s_idx = df["service"].map({s: i for i, s in enumerate(grid.services)}).to_numpy()
    np.testing.assert_allclose(df["forecast"], expected[df["row"], df["col"], s_idx], rtol=1e-5)
    assert df.groupby(["row", "col", "service"]).size().eq(H).all()


def test_predict_at_a_given_time_and_npz(runs, tmp_path):
    grid, path, out = runs
    t = 50
    at = pd.Timestamp(int(grid.timestamps[t]), unit="s", tz="UTC").tz_convert("Europe/Rome")
    npz = tmp_path / "fc.npz"
    assert main(["predict", "--run", str(out["last-value"]), "--data", str(path),
                 "--at", at.strftime("%Y-%m-%dT%H:%M"), "--out", str(npz)]) == 0
    z = np.load(npz)
    assert z["forecast"].shape == (H, *grid.shape[1:])
    assert int(z["timestamp_issued"]) == grid.timestamps[t]
    np.testing.assert_array_equal(z["target_timestamps"], grid.timestamps[t + 1:t + 1 + H])
    np.testing.assert_allclose(z["forecast"][1], _last_observed(grid, t), rtol=1e-5)
    # Epoch seconds work too.
    assert main(["predict", "--run", str(out["last-value"]), "--data", str(path),
                 "--at", str(int(grid.timestamps[t])), "--out", str(tmp_path / "b.npz")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "b.npz")["forecast"], z["forecast"])


def test_predict_with_a_model_that_needs_cells(runs, tmp_path):
    grid, path, out = runs
    assert main(["predict", "--run", str(out["historical-average"]), "--data", str(path),
                 "--out", str(tmp_path / "ha.csv")]) == 0
    df = pd.read_csv(tmp_path / "ha.csv")
    assert len(df) == grid.shape[1] * grid.shape[2] * 3 * H and df["forecast"].notna().all()


@pytest.mark.parametrize("args, message", [
    (["--at", "2013-11-02T10:30"], "not a time step"),
    (["--at", "2013-11-01T05:00"], "needs 12 input steps"),
    (["--at", "yesterday"], "ISO date-time"),
])
def test_predict_errors(runs, tmp_path, capsys, args, message):
    grid, path, out = runs
    code = main(["predict", "--run", str(out["last-value"]), "--data", str(path), *args,
                 "--out", str(tmp_path / "x.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_predict_output_kinds(runs, tmp_path, capsys):
    grid, path, out = runs
    code = main(["predict", "--run", str(out["last-value"]), "--data", str(path), "--out", str(tmp_path / "x.txt")])
    assert code == 2 and ".csv, .parquet or .npz" in capsys.readouterr().err
    code = main(["predict", "--run", str(out["last-value"]), "--data", str(path), "--out", str(tmp_path / "x.parquet")])
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        assert code == 2 and "pyarrow" in capsys.readouterr().err
    else:
        assert code == 0 and len(pd.read_parquet(tmp_path / "x.parquet")) == grid.shape[1] * grid.shape[2] * 9
    assert main(["predict", "--run", str(tmp_path / "nope"), "--data", str(path), "--out", str(tmp_path / "y.csv")]) == 2


def test_evaluate_reproduces_the_run_metrics(runs, tmp_path, capsys):
    grid, path, out = runs
    run = out["historical-average"]
    assert main(["evaluate", "--run", str(run), "--out", str(tmp_path / "ev.json")]) == 0
    capsys.readouterr()
    result = json.loads((tmp_path / "ev.json").read_text())
    saved = json.loads((run / "metrics.json").read_text())
    assert result["test"] == saved["test"]
    assert main(["evaluate", "--run", str(run), "--span", "all", "--data", str(path)]) == 0
    everything = json.loads(capsys.readouterr().out)
    assert everything["all"]["overall"]["n_windows"] > saved["test"]["overall"]["n_windows"]


def test_evaluate_refuses_another_step(runs, tmp_path, capsys):
    grid, path, out = runs
    other = tmp_path / "daily.npz"
    make_grid(T=24 * 40, H=3, W=4, seed=1).resample(2 * 3600).save(other)
    assert main(["evaluate", "--run", str(out["last-value"]), "--data", str(other)]) == 2
    assert "differs from the run's 1h" in capsys.readouterr().err


def test_evaluate_draws_figures_with_a_second_run(runs, tmp_path, capsys):
    grid, path, out = runs
    figs = tmp_path / "figs"
    assert main(["evaluate", "--run", str(out["historical-average"]), "--compare", str(out["last-value"]),
                 "--plots", str(figs), "--cell", "1,2", "--horizon-step", "2"]) == 0
    assert sorted(p.name for p in figs.iterdir()) == ["forecast_call.png", "forecast_net.png", "forecast_sms.png"]
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out["last-value"]), "--compare", str(out["last-value"])]) == 2
    assert "--plots" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(out["last-value"]), "--plots", str(figs), "--cell", "9,9"]) == 2
    assert "outside the 3x4 grid" in capsys.readouterr().err


def test_cell_series_lines_up_forecasts_with_their_target_times(runs):
    from simmstnet.commands.train import _span_dataset
    from simmstnet.eval.forecast import cell_series
    from simmstnet.train.checkpoint import load_run

    grid, path, out = runs
    run = load_run(out["last-value"])
    ds = _span_dataset(run, grid, "test")
    for h in (1, 3):
        t_idx, truth, fc = cell_series(run.model, ds, 2, 1, horizon_step=h)
        assert np.all(np.diff(t_idx) == 1) and len(t_idx) > 10
        origin = t_idx - h  # the last input step of each window
        ok = grid.mask[origin, 2, 1]                                   # (N, C)
        np.testing.assert_allclose(fc[ok], grid.values[origin, 2, 1][ok], rtol=1e-5)
        observed = grid.mask[t_idx, 2, 1]
        np.testing.assert_array_equal(truth[observed], grid.values[t_idx, 2, 1][observed])
        assert np.isnan(truth[~observed]).all()
