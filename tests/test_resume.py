"""--resume: a run killed mid-way and resumed ends exactly like an uninterrupted one (CPU, same seed)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from simmstnet.errors import UserError
from simmstnet.train.checkpoint import load_checkpoint
from simmstnet.train.trainer import Hooks, Trainer
from tests.conftest import make_grid
from tests.train_helpers import test_model  # noqa: F401  (fixture)
from tests.train_helpers import TINY, TINY_SIM_MSTNET, tiny_config

REPO = Path(__file__).resolve().parents[1]
TIMING = ("train_seconds", "eval_seconds")


class Killed(Exception):
    pass


INTERVAL_TIMING = {"calibration_seconds", "interval_seconds", "share_of_eval_seconds"}


def _comparable(metrics: dict) -> dict:
    out = {k: v for k, v in metrics.items() if k not in TIMING}
    if "intervals" in out:  # the interval figures must match; how long they took need not
        out["intervals"] = {k: v for k, v in out["intervals"].items() if k not in INTERVAL_TIMING}
    return out


def _history(out: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in load_checkpoint(out / "last.pt")["history"]]


def _kill_after(epoch: int) -> Hooks:
    def on_epoch_end(e, trainer):
        if e == epoch:
            raise Killed(f"simulated kill after epoch {e}")
    return Hooks(on_epoch_end=on_epoch_end)


@pytest.mark.parametrize("model, extra", [
    ("test-dropout-mlp", ["train.lr_schedule=step", "train.lr_step_epochs=1"]),
    # Sim-MSTNet adds its own randomness (ProbSparse sampling, dropout in every block); slower.
    pytest.param("sim-mstnet", TINY_SIM_MSTNET, marks=pytest.mark.slow),
])
def test_resume_equals_uninterrupted(tmp_path, model, extra, request):
    if model == "test-dropout-mlp":
        request.getfixturevalue("test_model")
    grid = make_grid(T=24 * 4, H=2, W=3, missing=0.05, seed=5)
    overrides = ["train.epochs=4", "train.patience=0", "train.batch_size=32", *extra]

    full = Trainer(tiny_config(tmp_path / "full", *overrides, model=model), grid=grid,
                   progress=False, quiet=True).run()

    cfg = tiny_config(tmp_path / "cut", *overrides, model=model)
    with pytest.raises(Killed):
        Trainer(cfg, grid=grid, progress=False, quiet=True, hooks=_kill_after(2)).run()
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 2
    assert not (tmp_path / "cut" / "metrics.json").exists()
    with pytest.raises(UserError, match="already holds a run"):
        Trainer(cfg, grid=grid, progress=False, quiet=True).run()
    resumed = Trainer(cfg, grid=grid, resume=True, progress=False, quiet=True).run()

    assert _comparable(resumed) == _comparable(full)
    assert _history(tmp_path / "cut") == _history(tmp_path / "full")
    a, b = load_checkpoint(tmp_path / "cut" / "best.pt"), load_checkpoint(tmp_path / "full" / "best.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, test_model):
    grid = make_grid(T=24 * 4, H=2, W=3)
    with pytest.raises(UserError, match="nothing to resume"):
        Trainer(tiny_config(tmp_path / "none", model="test-dropout-mlp"), grid=grid, resume=True,
                progress=False, quiet=True).run()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "simmstnet", "train", "--no-progress", *args]


@pytest.mark.slow
def test_cli_run_killed_by_sigkill_resumes_to_the_same_metrics(tmp_path):
    """A real kill at an arbitrary moment: the atomically written last.pt is always usable."""
    grid_path = tmp_path / "grid.npz"
    make_grid(T=24 * 5, H=3, W=3, missing=0.05, seed=7).save(grid_path)
    common = [*TINY, *TINY_SIM_MSTNET, f"data.path={grid_path}", "train.epochs=5", "train.patience=0",
              "train.batch_size=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(*common, f"out={tmp_path / 'full'}"), check=True, env=env, cwd=tmp_path,
                   capture_output=True)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cli(*common, f"out={cut}"), env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (cut / "last.pt").exists() and load_checkpoint(cut / "last.pt")["epoch"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    time.sleep(0.3)  # land somewhere inside the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "metrics.json").exists()
    done = subprocess.run(_cli("--resume", f"out={cut}", f"data.path={grid_path}"), env=env, cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stderr
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    resumed = json.loads((cut / "metrics.json").read_text())
    assert _comparable(resumed) == _comparable(full)
