"""The trainer end to end on tiny grids: run-folder files, metrics schema and counts, loss falls."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from simmstnet.errors import UserError
from simmstnet.train.checkpoint import load_checkpoint, load_run
from simmstnet.train.trainer import Hooks, Trainer, prepare_data
from tests.conftest import make_grid
from tests.train_helpers import brute_force_windows, observed_targets, test_model, tiny_config  # noqa: F401

RUN_FILES = ["config.yaml", "metrics.json", "history.csv", "best.pt", "last.pt", "loss_curves.png",
             "forecast_call.png", "forecast_sms.png", "forecast_net.png"]


@pytest.fixture(scope="module")
def grid():
    return make_grid(T=24 * 5, H=3, W=3, missing=0.05, seed=3)


@pytest.fixture(scope="module")
def sim_run(grid, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sim"
    cfg = tiny_config(out, "train.epochs=3", "train.patience=0")
    metrics = Trainer(cfg, grid=grid, progress=False, quiet=True).run()
    return out, cfg, metrics


def test_run_folder_holds_every_file(sim_run):
    out, _, metrics = sim_run
    for name in RUN_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "metrics.json").read_text()) == metrics
    # No temporary files left behind by the atomic writes.
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_metrics_schema(sim_run, grid):
    _, cfg, m = sim_run
    assert m["model"] == "sim-mstnet"
    p = m["protocol"]
    for key in ("split", "input_len", "horizon", "step", "units", "mask_rule", "train_days"):
        assert key in p
    assert (p["input_len"], p["horizon"], p["step"], p["split"]) == (12, 3, "1h", [0.7, 0.1, 0.2])
    assert m["seed"] == 0 and m["params"] > 0 and m["train_seconds"] > 0
    for split in ("val", "test"):
        assert set(m[split]) == {"call", "sms", "net", "overall"}
        for key in ("call", "sms", "net", "overall"):
            assert m[split][key]["mae"] > 0 and m[split][key]["rmse"] >= m[split][key]["mae"]


def test_every_test_window_and_target_is_evaluated(sim_run, grid):
    _, cfg, m = sim_run
    data = prepare_data(cfg, grid)
    for split in ("val", "test"):
        windows = brute_force_windows(grid, data.ranges[split], 12, 3)
        assert m[split]["overall"]["n_windows"] == len(windows)
        assert m[split]["overall"]["n_observed"] == observed_targets(grid, windows, 12, 3)
    # The split is chronological 70/10/20 of the 120 steps.
    assert data.ranges == {"train": (0, 84), "val": (84, 96), "test": (96, 120)}


def test_loss_falls_and_history_is_complete(sim_run):
    out, _, m = sim_run
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for s in ("call", "sms", "net"):
        for col in (f"train_loss_{s}", f"weight_{s}", f"val_loss_{s}", f"val_mae_{s}"):
            assert col in rows[0]
        assert float(rows[-1][f"train_loss_{s}"]) < 0.8 * float(rows[0][f"train_loss_{s}"])
    assert float(rows[-1]["val_mae"]) < float(rows[0]["val_mae"])
    weights = [float(rows[-1][f"weight_{s}"]) for s in ("call", "sms", "net")]
    assert sum(weights) == pytest.approx(3.0, rel=1e-5)  # dynamic weights sum to the task count
    assert m["epochs_run"] == 3


def test_best_checkpoint_reloads_to_the_same_model(sim_run):
    out, _, m = sim_run
    run = load_run(out)
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == m["best_epoch"]
    assert run.services == ("call", "sms", "net") and run.step == 3600
    last = load_checkpoint(out / "last.pt")
    assert last["finished"] and last["epoch"] == 3 and len(last["history"]) == 3
    assert {"optimizer", "scheduler", "weighting", "rng"} <= set(last)


def test_naive_model_is_evaluated_without_training(grid, tmp_path):
    """last-value through the whole pipeline equals a brute-force MAE in original units."""
    cfg = tiny_config(tmp_path / "lv", model="last-value")
    m = Trainer(cfg, grid=grid, progress=False, quiet=True).run()
    assert m["params"] == 0 and m["epochs_run"] == 0
    for name in RUN_FILES:
        assert (tmp_path / "lv" / name).is_file(), name
    lo, hi = prepare_data(cfg, grid).ranges["test"]
    errs = {s: [] for s in range(3)}
    for t, r, c in brute_force_windows(grid, (lo, hi), 12, 3):
        for s in range(3):
            seen = np.flatnonzero(grid.mask[t:t + 12, r, c, s])
            last = grid.values[t + seen[-1], r, c, s] if seen.size else None
            for h in range(3):
                if grid.mask[t + 12 + h, r, c, s]:
                    # No observed input at all: the model says 0 in scaled units = the training mean.
                    errs[s].append(abs((last if last is not None else np.nan) - grid.values[t + 12 + h, r, c, s]))
    for s, name in enumerate(("call", "sms", "net")):
        assert not np.isnan(errs[s]).any()
        assert m["test"][name]["mae"] == pytest.approx(np.mean(errs[s]), rel=1e-5)


def test_historical_average_gets_cells_through_the_trainer(grid, tmp_path):
    m = Trainer(tiny_config(tmp_path / "ha", model="historical-average"), grid=grid, progress=False,
                quiet=True).run()
    assert m["test"]["overall"]["mae"] > 0


def test_early_stopping_and_windows_per_epoch(grid, tmp_path, test_model):
    seen = []
    hooks = Hooks(on_batch=lambda rank, batch: seen.append(len(batch["index"])))
    # A learning rate too small to move float32 weights: validation never improves after epoch 1.
    cfg = tiny_config(tmp_path / "es", "train.epochs=10", "train.patience=2", "train.lr=1e-30",
                      "train.max_windows_per_epoch=100", "train.batch_size=32", model="test-dropout-mlp")
    m = Trainer(cfg, grid=grid, progress=False, quiet=True, hooks=hooks).run()
    assert m["best_epoch"] == 1 and m["epochs_run"] == 3
    assert len(seen) == 3 * 4  # ceil(100 / 32) steps per epoch
    rows = list(csv.DictReader(open(tmp_path / "es" / "history.csv")))
    assert len(rows) == 3


@pytest.mark.parametrize("override, message", [
    ("sim2real.mode=bilevel", "sim2real.sim_data"),
    ("data.train_days=1", "no complete training window"),
    ("data.services=[video]", "video"),
])
def test_clear_errors(grid, tmp_path, override, message):
    cfg = tiny_config(tmp_path / "bad", override, "data.input_len=24", "data.label_len=12", model="last-value")
    with pytest.raises(UserError, match=message):
        Trainer(cfg, grid=grid, progress=False, quiet=True).run()
    assert not (tmp_path / "bad").exists()  # a config mistake leaves no half-made run folder


def test_refuses_to_overwrite_a_run(sim_run, grid):
    out, cfg, _ = sim_run
    with pytest.raises(UserError, match="already holds a run"):
        Trainer(cfg, grid=grid, progress=False, quiet=True).run()


def test_a_short_run_learns_more_than_the_training_mean(sim_run, grid):
    """Three tiny epochs must beat forecasting each service's training mean for every target (an
    untrained or broken model -- zero output, a loss that ignores the data -- does not)."""
    _, cfg, m = sim_run
    data = prepare_data(cfg, grid)
    windows = brute_force_windows(grid, data.ranges["test"], 12, 3)
    mean = data.scaler.inverse(np.zeros(3))  # scaled 0 = the training mean, per service
    for s, name in enumerate(("call", "sms", "net")):
        errs = [abs(mean[s] - grid.values[t + 12 + h, r, c, s]) for t, r, c in windows for h in range(3)
                if grid.mask[t + 12 + h, r, c, s]]
        assert m["test"][name]["mae"] < 0.9 * np.mean(errs), name
