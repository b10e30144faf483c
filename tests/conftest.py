"""Shared test fixtures. Fixtures are generated in code; real data is read from ../shared/data
(licensed, ODbL) and tests that need it skip cleanly when the folder is absent."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from simmstnet.data.grid import TrafficGrid

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SIMMSTNET_SHARED_DATA", REPO.parent / "shared" / "data"))
TI_DIR = SHARED_DATA / "telecom-italia"


@pytest.fixture
def shared_ti() -> Path:
    """Folder with the shared Telecom Italia excerpts; skips the test when it is absent."""
    if not TI_DIR.is_dir():
        pytest.skip(f"shared real data not present at {TI_DIR}")
    return TI_DIR


def make_grid(T: int = 72, H: int = 4, W: int = 5, services=("call", "sms", "net"),
              step: int = 3600, start: int = 1383260400, seed: int = 0, missing: float = 0.0,
              timezone: str = "Europe/Rome") -> TrafficGrid:
    """A small synthetic grid with a daily cycle, per-cell levels and optional missing entries."""
    rng = np.random.default_rng(seed)
    t = np.arange(T)[:, None, None, None]
    hours = (start // 3600 + t * step / 3600) % 24
    level = rng.uniform(5, 50, size=(1, H, W, len(services)))
    daily = 1.0 + 0.6 * np.sin(2 * np.pi * (hours - 8) / 24)
    values = level * daily * rng.gamma(20, 1 / 20, size=(T, H, W, len(services)))
    mask = rng.random(values.shape) >= missing
    return TrafficGrid.from_values(values.astype(np.float32), start=start, step=step,
                                   services=services, mask=mask,
                                   meta={"source": "test", "timezone": timezone})


@pytest.fixture
def small_grid() -> TrafficGrid:
    return make_grid()


def pytest_collection_modifyitems(config, items):
    """Under `make mutate` only: run a mutant's tests fastest first.

    mutmut runs each mutant's tests with `-x` in an arbitrary (set) order, so a mutant that a
    2-second test kills often waited for a 15-second training test first. When the Makefile
    sets SIMMSTNET_MUTATE_DURATIONS to the copy's `mutmut-stats.json` (written by mutmut's
    first, timed run of the tests), the items are sorted by their measured duration; unknown
    tests keep their place after the known ones. Outside mutation runs nothing changes."""
    path = os.environ.get("SIMMSTNET_MUTATE_DURATIONS")
    if not path:
        return
    import json
    try:
        with open(path) as f:
            durations = json.load(f).get("duration_by_test", {})
    except (OSError, ValueError):
        return
    if not durations:
        return
    order = {item.nodeid: i for i, item in enumerate(items)}
    items.sort(key=lambda item: (durations.get(item.nodeid, float("inf")), order[item.nodeid]))
