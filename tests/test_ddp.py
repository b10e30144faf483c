"""Distributed data parallel on CPU: two processes, gloo backend, loopback."""
from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import make_grid
from tests.train_helpers import TINY, TINY_SIM_MSTNET, register_test_model, test_model, tiny_config  # noqa: F401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, record: str) -> None:
    """One DDP rank: train with hooks that note the windows it saw and its final weights."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from simmstnet.train.trainer import Hooks, Trainer

    register_test_model()  # a fresh process: the parent's registration is not inherited
    seen: list[list[int]] = [[]]
    weights: list[float] = []

    def on_batch(r, batch):
        seen[-1].extend(batch["index"].tolist())

    def on_epoch_end(epoch, trainer):
        seen.append([])
        weights.append(float(sum(p.double().sum() for p in trainer.model.parameters())))

    grid = make_grid(T=24 * 4, H=2, W=3, missing=0.05, seed=2)
    cfg = tiny_config(out, "train.epochs=2", "train.batch_size=16", "train.patience=0",
                      model="test-dropout-mlp")
    Trainer(cfg, grid=grid, progress=False, quiet=True, hooks=Hooks(on_batch, on_epoch_end)).run()
    with open(f"{record}.{rank}", "wb") as fh:
        pickle.dump({"seen": seen[:-1], "weights": weights}, fh)


@pytest.mark.slow  # two fresh processes importing torch: ~25 s on a loaded core
def test_two_ranks_see_disjoint_data_and_stay_in_step(tmp_path, test_model):
    port = _free_port()
    out, record = tmp_path / "run", str(tmp_path / "record")
    mp.spawn(_worker, args=(2, port, str(out), record), nprocs=2, join=True)
    r0, r1 = (pickle.load(open(f"{record}.{r}", "rb")) for r in range(2))
    grid = make_grid(T=24 * 4, H=2, W=3, missing=0.05, seed=2)
    from simmstnet.train.trainer import prepare_data

    n_train = len(prepare_data(tiny_config(out, "train.epochs=2", model="test-dropout-mlp"), grid).train)
    assert len(r0["seen"]) == len(r1["seen"]) == 2
    for a, b in zip(r0["seen"], r1["seen"]):
        assert len(a) == len(set(a)) and len(b) == len(set(b))
        assert not set(a) & set(b), "ranks shared training windows"
        # Together they cover the epoch (a shard may lose its last window to equalize steps).
        assert len(set(a) | set(b)) >= n_train - 16
    assert r0["seen"][0] != r0["seen"][1]  # reshuffled each epoch
    # DDP keeps the replicas identical.
    assert r0["weights"] == pytest.approx(r1["weights"], rel=0, abs=1e-9)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2
    # Only rank 0 wrote: one of each file and nothing else.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["best.pt", "config.yaml", "forecast_call.png", "forecast_net.png", "forecast_sms.png",
         "history.csv", "last.pt", "loss_curves.png", "metrics.json",
         # prediction intervals and their maps (docs/intervals.md)
         "calibration.npz", "cells.csv", *(f"{kind}_{s}.png" for kind in ("map", "forecast_cells")
                                           for s in ("call", "net", "sms"))])


@pytest.mark.slow
def test_torchrun_cli(tmp_path):
    grid_path = tmp_path / "grid.npz"
    make_grid(T=24 * 4, H=2, W=3, missing=0.05, seed=4).save(grid_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "simmstnet", "train", "--no-progress", *TINY, *TINY_SIM_MSTNET,
           f"data.path={grid_path}", "train.epochs=2", "train.batch_size=16", f"out={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["epochs_run"] == 2
    assert np.isfinite(metrics["test"]["overall"]["mae"])
    # The epoch summaries come from rank 0 only.
    assert done.stderr.count("epoch 1/2") == 1
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert not [p for p in Path(tmp_path).iterdir() if p.name == "runs"]


def test_unused_parameter_probe_leaves_rng_and_grads_alone():
    from simmstnet.train.trainer import has_unused_parameters

    class Partly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

        def forward(self, batch):
            return torch.nn.functional.dropout(self.used(batch["x"]), 0.5)

    model, batch = Partly(), {"x": torch.ones(3, 2)}
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert has_unused_parameters(model, batch)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.grad is None for p in model.parameters())
    model.spare = torch.nn.Identity()
    assert not has_unused_parameters(model, batch)
