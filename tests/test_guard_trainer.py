"""Guards for the trainer's claims (issue 15): each test fails on one plausible bug.

Written against behaviour (run folders, checkpoints, metrics), with test-only models whose
predictions are known in closed form, so the expected numbers are computed independently.
"""
from __future__ import annotations

import csv
import json
import os
import pickle
import re
import socket
import time

import numpy as np
import pytest
import torch
from torch import nn

from simmstnet.data.grid import TrafficGrid
from simmstnet.models.registry import DataDims, register_model
from simmstnet.train.checkpoint import load_checkpoint, save_checkpoint
from simmstnet.train.loss_weighting import DynamicLossWeighting
from simmstnet.train.trainer import Hooks, Trainer, prepare_data
from tests.train_helpers import tiny_config

FROZEN = "guard-frozen-last-value"
SCHEDULE = "guard-val-schedule"
OFFSET = "guard-service-offset"

# Validation prediction (scaled units, constant) after epoch e = OFFSETS[e]: the validation MAE
# falls to its best at epoch 2, then rises (epochs 3, 4 without gain).
OFFSETS = [3.0, 3.0, 1.0, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]


class FrozenLastValue(nn.Module):
    """Predicts the last scaled input over the horizon; its one parameter gets zero gradient, so
    training never changes it and every loss is known in closed form."""

    def __init__(self, dims: DataDims):
        super().__init__()
        self.h = dims.horizon
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, batch):
        last = batch["x"][:, -1:, :]
        return last.expand(-1, self.h, -1) + 0.0 * self.p


class ServiceOffset(FrozenLastValue):
    """The last value plus a different offset per service position: a forecast that depends on
    the order of the services, unlike the naive baselines."""

    def forward(self, batch):
        out = super().forward(batch)
        return out + 0.4 * torch.arange(out.shape[-1], dtype=out.dtype)


class ValSchedule(nn.Module):
    """Counts training forwards in a buffer (so it travels in checkpoints); in eval mode predicts
    the constant OFFSETS[count], which makes the validation MAE curve a fixed, known sequence
    (one training step per epoch)."""

    def __init__(self, dims: DataDims):
        super().__init__()
        self.h, self.c = dims.horizon, dims.n_services
        self.p = nn.Parameter(torch.zeros(1))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, batch):
        B = batch["x"].shape[0]
        if self.training:
            self.calls += 1
            return self.p.expand(B, self.h, self.c)
        k = min(int(self.calls), len(OFFSETS) - 1)
        return torch.full((B, self.h, self.c), OFFSETS[k]) + 0.0 * self.p


def _register():
    register_model(FROZEN, multitask=True, description="test only: frozen last value")(FrozenLastValue)
    register_model(SCHEDULE, multitask=True, description="test only: scheduled validation")(ValSchedule)
    register_model(OFFSET, multitask=True, description="test only: offset per service")(ServiceOffset)


@pytest.fixture
def guard_models():
    from simmstnet.models import registry

    _register()
    yield
    for name in (FROZEN, SCHEDULE, OFFSET):
        registry._REGISTRY.pop(name, None)


def trend_grid(T=96, H=2, W=3, missing=0.2, seed=3) -> TrafficGrid:
    """Hourly grid whose level grows with time, so that statistics of the training span differ
    from those of the validation span or of the whole grid."""
    rng = np.random.default_rng(seed)
    t = np.arange(T)[:, None, None, None]
    level = rng.uniform(5, 50, size=(1, H, W, 3))
    values = level * (1.0 + 3.0 * t / T) * rng.gamma(10, 1 / 10, size=(T, H, W, 3))
    mask = rng.random(values.shape) >= missing
    return TrafficGrid.from_values(values.astype(np.float32), start=1383260400, step=3600,
                                   services=("call", "sms", "net"), mask=mask,
                                   meta={"source": "test", "timezone": "Europe/Rome"})


def _observed_stats(grid, lo, hi):
    v = grid.values[lo:hi].reshape(-1, grid.shape[-1]).astype(np.float64)
    m = grid.mask[lo:hi].reshape(-1, grid.shape[-1])
    mean = np.array([v[m[:, c], c].mean() for c in range(v.shape[1])])
    std = np.array([v[m[:, c], c].std() for c in range(v.shape[1])])
    return mean, std


def _run(tmp_path, name, grid, *overrides, model=FROZEN, **kw):
    cfg = tiny_config(tmp_path / name, *overrides, model=model)
    metrics = Trainer(cfg, grid=grid, progress=False, quiet=True, **kw).run()
    return cfg, metrics


# ----------------------------------------------------------------------------- scaler


def test_scaler_in_best_pt_is_fitted_on_training_inputs_only(tmp_path, guard_models):
    from simmstnet.data.scaling import Scaler

    grid = trend_grid()
    _, metrics = _run(tmp_path, "run", grid, "train.epochs=1", "train.patience=0")
    lo, hi = metrics["protocol"]["split_ranges"]["train"]["target_steps"]
    L = metrics["protocol"]["input_len"]
    fit_lo = max(0, lo - L)  # the first training window's inputs start L steps before its target
    saved = Scaler.from_state_dict(load_checkpoint(tmp_path / "run" / "best.pt")["scaler"])

    mean, std = _observed_stats(grid, fit_lo, hi)
    probe = np.stack([mean, mean + std, mean + 2 * std])        # (3, C) in original units
    expected = np.array([[0.0] * 3, [1.0] * 3, [2.0] * 3])
    np.testing.assert_allclose(saved.transform(probe), expected, atol=1e-3)
    # The check discriminates: the whole grid, or the validation span, give other scalers.
    for other in ((0, grid.shape[0]), tuple(metrics["protocol"]["split_ranges"]["val"]["target_steps"])):
        m2, s2 = _observed_stats(grid, *other)
        assert np.abs((m2 - mean) / std).max() > 0.05


# ----------------------------------------------------------------------------- loss, weighting


def _brute_losses(batch):
    """Per-service masked MSE of the frozen last-value forecast over one batch (numpy)."""
    x = batch["x"].numpy().astype(np.float64)
    y = batch["y"].numpy().astype(np.float64)
    m = batch["y_mask"].numpy()
    pred = np.repeat(x[:, -1:, :], y.shape[1], axis=1)
    se = np.where(m, (pred - y) ** 2, 0.0).sum(axis=(0, 1))
    n = m.sum(axis=(0, 1))
    return se / np.maximum(n, 1)


def test_training_losses_use_the_target_mask_and_drive_the_dynamic_weights(tmp_path, guard_models):
    grid = trend_grid(missing=0.3, seed=4)
    batches, ranks = [], []

    def on_batch(rank, b):
        ranks.append(rank)
        batches.append({k: v.clone() for k, v in b.items()})

    hooks = Hooks(on_batch=on_batch)
    t0 = time.perf_counter()
    _, metrics = _run(tmp_path, "run", grid, "train.epochs=2", "train.patience=0", "train.batch_size=16",
                      "train.loss=mse", "train.loss_weighting=dynamic", "train.weighting_beta=0.7", hooks=hooks)
    wall = time.perf_counter() - t0
    assert set(ranks) == {0}
    per_batch = [_brute_losses(b) for b in batches]
    assert len(per_batch) >= 4
    steps = len(per_batch) // 2

    # The model never changes, so the logged training loss of each service is the mean of the
    # per-batch masked losses computed here (unobserved targets excluded).
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    services = ("call", "sms", "net")
    for e, row in enumerate(last["history"]):
        want = np.mean(per_batch[e * steps:(e + 1) * steps], axis=0)
        got = [row[f"train_loss_{s}"] for s in services]
        np.testing.assert_allclose(got, want, rtol=1e-4)
    # The check discriminates: counting the unobserved targets as zeros gives another loss.
    b = batches[0]
    unmasked = {**b, "y_mask": torch.ones_like(b["y_mask"])}
    assert np.abs(_brute_losses(unmasked) - per_batch[0]).max() > 1e-3 * per_batch[0].max()

    # Replay the weighting on the same losses: the run's weights are the updated ones.
    # The logged total training loss is the mean over the epoch's steps of the weighted sum.
    ref = DynamicLossWeighting(3, beta=0.7, tau=1.0)
    for e in range(2):
        totals = []
        for loss in per_batch[e * steps:(e + 1) * steps]:
            w = ref.weights(torch.tensor(loss))
            totals.append(float((w.double() * torch.tensor(loss)).sum()))
        np.testing.assert_allclose([last["history"][e][f"weight_{s}"] for s in services], w.numpy(), rtol=1e-4)
        assert last["history"][e]["train_loss"] == pytest.approx(np.mean(totals), rel=1e-4)
        assert last["history"][e]["steps"] == steps
    state = last["weighting"]
    assert state["steps"] == len(per_batch)
    np.testing.assert_allclose(state["ema"], ref.ema.numpy(), rtol=1e-5)
    np.testing.assert_allclose(state["start"], per_batch[0], rtol=1e-5)
    assert not np.allclose(w.numpy(), 1.0, atol=1e-3)  # weights moved away from the static ones

    # Each row's validation figures and its time; the run's training time is the rows' sum.
    rows = last["history"]
    for row in rows:
        assert all(isinstance(row[f"val_mae_{s}"], float) and row[f"val_mae_{s}"] > 0 for s in services)
        assert row["val_mae"] > 0 and 0 < row["seconds"] < wall
    assert metrics["train_seconds"] == pytest.approx(sum(r["seconds"] for r in rows), abs=0.05)
    assert metrics["train_seconds"] < wall
    with open(tmp_path / "run" / "history.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 and {"train_loss", "val_mae", "steps", "seconds", "val_mae_net", "weight_sms"} <= set(table[0])
    assert float(table[1]["train_loss"]) == pytest.approx(rows[1]["train_loss"], rel=1e-6)


def test_validation_reads_max_val_windows_spread_over_the_span(tmp_path, guard_models, monkeypatch):
    import simmstnet.train.trainer as trainer_mod

    asked = []
    real = trainer_mod.evaluate

    def spy(*args, **kw):
        asked.append((kw.get("desc"), kw.get("max_windows")))
        return real(*args, **kw)

    monkeypatch.setattr(trainer_mod, "evaluate", spy)
    _run(tmp_path, "run", trend_grid(), "train.epochs=2", "train.patience=0", "train.max_val_windows=5")
    assert [m for d, m in asked if d == "validate"] == [5, 5]


# ----------------------------------------------------------------------------- resume + early stopping


def _kill_after(epoch):
    class Killed(Exception):
        pass

    def on_epoch_end(e, trainer):
        if e == epoch:
            raise Killed(e)
    return Hooks(on_epoch_end=on_epoch_end), Killed


@pytest.mark.parametrize("kill_after", [3, pytest.param(2, marks=pytest.mark.slow)])  # [2]: ~17 s, in CI
def test_resume_keeps_early_stopping_counter_and_best(tmp_path, guard_models, kill_after):
    grid = trend_grid(missing=0.0, seed=6)
    over = ["train.epochs=9", "train.patience=2", "train.batch_size=4096"]
    _, full = _run(tmp_path, "full", grid, *over, model=SCHEDULE)
    assert full["best_epoch"] == 2 and full["epochs_run"] == 4  # the curve as constructed

    hooks, Killed = _kill_after(kill_after)
    cfg = tiny_config(tmp_path / "cut", *over, model=SCHEDULE)
    with pytest.raises(Killed):
        Trainer(cfg, grid=grid, progress=False, quiet=True, hooks=hooks).run()
    resumed = Trainer(cfg, grid=grid, resume=True, progress=False, quiet=True).run()
    assert resumed["epochs_run"] == 4
    assert resumed["best_epoch"] == 2
    assert resumed["test"] == full["test"]
    best = load_checkpoint(tmp_path / "cut" / "best.pt")
    assert best["epoch"] == 2 and best["val_mae"] == pytest.approx(full["val"]["overall"]["mae"])
    last = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert last["bad_epochs"] == 2 and last["best"]["epoch"] == 2


# ----------------------------------------------------------------------------- checkpoint


def test_checkpoint_write_interrupted_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(3)}})
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        # a kill mid-write: the file being written is left truncated, then the process dies
        if hasattr(f, "truncate"):
            f.flush()
            f.truncate(10)
        else:
            with open(f, "r+b") as fh:
                fh.truncate(10)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2, "model": {"w": torch.zeros(3)}})
    monkeypatch.setattr(torch, "save", real_save)
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


# ----------------------------------------------------------------------------- evaluate on another file



def test_unreadable_checkpoint_messages_name_the_cause(tmp_path):
    # Found by make mutate: the messages' details were checked only by test_bad_inputs.
    from simmstnet.errors import UserError

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.pt: cannot read checkpoint \(empty file\)"):
        load_checkpoint(empty)
    one = tmp_path / "one.pt"
    one.write_bytes(b"x")
    with pytest.raises(UserError) as info:
        load_checkpoint(one)
    text = str(info.value)
    assert "(empty file)" not in text
    # the first line of torch's own message follows the exception type
    assert re.search(r"cannot read checkpoint \(\w+: \S", text), text


def test_evaluate_and_predict_on_a_file_with_services_in_another_order(tmp_path, capsys, guard_models):
    from simmstnet.cli import main

    grid = trend_grid(missing=0.1, seed=8)
    path = tmp_path / "grid.npz"
    grid.save(path)
    perm = ("net", "call", "sms")
    idx = [grid.services.index(s) for s in perm]
    TrafficGrid(grid.values[..., idx].copy(), grid.mask[..., idx].copy(), grid.timestamps.copy(), perm,
                dict(grid.meta)).save(tmp_path / "perm.npz")
    cfg = tiny_config(tmp_path / "run", f"data.path={path}", "train.epochs=1", model=OFFSET)
    metrics = Trainer(cfg, progress=False, quiet=True).run()

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    run = str(tmp_path / "run")
    assert main(["evaluate", "--run", run, "--data", str(path), "--out", str(a)]) == 0
    assert main(["evaluate", "--run", run, "--data", str(tmp_path / "perm.npz"), "--out", str(b)]) == 0
    capsys.readouterr()
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["test"] == rb["test"]
    for s in grid.services:
        assert ra["test"][s] == pytest.approx(metrics["test"][s])
    # The services really differ, so a mix-up would show.
    assert len({round(ra["test"][s]["mae"], 6) for s in grid.services}) == 3

    fa, fb = tmp_path / "fa.csv", tmp_path / "fb.csv"
    at = str(int(grid.timestamps[40]))
    assert main(["predict", "--run", run, "--data", str(path), "--at", at, "--out", str(fa)]) == 0
    assert main(["predict", "--run", run, "--data", str(tmp_path / "perm.npz"), "--at", at,
                 "--out", str(fb)]) == 0
    assert fa.read_text() == fb.read_text()


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, record):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    _register()
    batches = []
    hooks = Hooks(on_batch=lambda r, b: batches.append({k: v.clone() for k, v in b.items()}))
    cfg = tiny_config(out, "train.epochs=1", "train.batch_size=4096", "train.patience=0", "train.loss=mse",
                      "train.loss_weighting=dynamic", model=FROZEN)
    Trainer(cfg, grid=trend_grid(missing=0.3, seed=9), progress=False, quiet=True, hooks=hooks).run()
    with open(f"{record}.{rank}", "wb") as fh:
        pickle.dump(batches, fh)


@pytest.mark.slow  # two fresh processes importing torch
def test_ddp_task_weights_see_the_global_losses(tmp_path):
    import torch.multiprocessing as mp

    out, record = tmp_path / "run", str(tmp_path / "record")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out), record), nprocs=2, join=True)
    b0, b1 = (pickle.load(open(f"{record}.{r}", "rb")) for r in range(2))
    assert len(b0) == len(b1) == 1
    both = {k: torch.cat([b0[0][k], b1[0][k]]) for k in b0[0]}
    global_loss, local_loss = _brute_losses(both), _brute_losses(b0[0])
    assert np.abs(global_loss - local_loss).max() > 1e-3 * global_loss.max()
    state = load_checkpoint(out / "last.pt")["weighting"]
    np.testing.assert_allclose(state["start"], global_loss, rtol=1e-5)
    np.testing.assert_allclose(state["ema"], global_loss, rtol=1e-5)
