"""Shared pieces of the trainer tests: a tiny config, a tiny registered model, brute-force counts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from simmstnet.config import load_config
from simmstnet.models.registry import DataDims, register_model

# Small enough for a one-core test run, large enough for every split to hold windows.
TINY = ["data.input_len=12", "data.label_len=6", "data.horizon=3", "data.patch=3",
        "train.batch_size=64", "train.lr=3e-3", "train.device=cpu"]
TINY_SIM_MSTNET = ["model.d_model=8", "model.d_ff=16", "model.enc_layers=1", "model.n_heads=1"]


def tiny_config(out, *overrides: str, model: str = "sim-mstnet"):
    extra = TINY_SIM_MSTNET if model == "sim-mstnet" else []
    return load_config(None, [*TINY, f"model.name={model}", *extra, f"out={out}", *overrides])


TEST_MODEL = "test-dropout-mlp"


class DropoutMLP(nn.Module):
    """(B, L, C) -> (B, H, C) through one hidden layer; dropout makes training use the RNG."""

    def __init__(self, dims: DataDims):
        super().__init__()
        self.h, self.c = dims.horizon, dims.n_services
        self.net = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(dims.input_len * dims.n_services, 16),
                                 nn.ReLU(), nn.Linear(16, dims.horizon * dims.n_services))

    def forward(self, batch):
        return self.net(batch["x"]).view(-1, self.h, self.c)


def register_test_model() -> str:
    """Register DropoutMLP (idempotent); in the registry only while a test needs it, so that
    other tests see the package's own model list."""
    register_model(TEST_MODEL, multitask=True, description="test only: MLP with dropout")(DropoutMLP)
    return TEST_MODEL


@pytest.fixture
def test_model():
    from simmstnet.models import registry

    yield register_test_model()
    registry._REGISTRY.pop(TEST_MODEL, None)


def brute_force_windows(grid, target_range, input_len, horizon, stride=1):
    """Windows (start, row, col) with every target in the range and at least one observed target."""
    lo, hi = target_range
    T, H, W, _ = grid.shape
    out = []
    for t in range(0, T - input_len - horizon + 1, stride):
        first, last = t + input_len, t + input_len + horizon  # targets [first, last)
        if first < lo or last > hi:
            continue
        for r in range(H):
            for c in range(W):
                if grid.mask[first:last, r, c].any():
                    out.append((t, r, c))
    return out


def observed_targets(grid, windows, input_len, horizon):
    return int(sum(grid.mask[t + input_len:t + input_len + horizon, r, c].sum() for t, r, c in windows))


def seed_all(seed=0):
    np.random.seed(seed)
    torch.manual_seed(seed)
