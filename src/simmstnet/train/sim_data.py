"""The simulated window set of a sim2real run (``sim2real.sim_data``).

Simulated data (one TrafficGrid .npz or a scenario folder, read by
:func:`simmstnet.sim.load_sim_data`) become one window set that looks like the real training
windows to the model:

* services: the real run's services, in the real run's order (UserError naming the file when a
  scenario lacks one);
* step: resampled (summed) to the real step when finer; a coarser step is a UserError (the
  model's input length and horizon are counted in real steps);
* scaling: each scenario by its OWN scaler (``data.scaler`` kind) fitted on that whole scenario.
  Why: the simulator's global level per service is arbitrary (a city's subscriber count and the
  measurement scale are random draws), while the model sees scaled values; per-scenario scaling
  makes every simulated city's windows look like the real windows, which are scaled by the real
  training statistics. Relative structure (daily shape, spatial contrast, noise) is what transfers.
  Forecast errors are always reported on real data in original units, so nothing is inverted with
  these scalers;
* windows: the real run's ``input_len``, ``label_len``, ``horizon`` and ``patch``; stride
  ``sim2real.sim_stride`` (default ``data.stride``); windows with no observed target are left out;
* cap: at most ``sim2real.max_sim_windows``, a uniformly random subset drawn from
  ``(train.seed, 7)``: the same windows for every mode with one seed.

Global index: window j in [0, N) of the (capped) set is ``(scenario_of[j], local[j])``; batches
from :meth:`SimWindowSet.get_batch` carry ``index`` = j (the reweighter gathers lambda_j with it)
and ``scenario`` = scenario_of[j].
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from simmstnet.data.grid import TrafficGrid
from simmstnet.errors import UserError
from simmstnet.utils import format_step


@dataclass
class SimWindowSet:
    """Windows over several simulated scenarios with one global index.

    datasets: one :class:`WindowDataset` per scenario; scenario_of, local: (N,) int64, the scenario
    and its dataset's window index of each global window; scenario_params: ``{name: (S,) float}``
    numeric simulator parameters shared by every scenario; names: (S,) scenario labels.
    """

    datasets: list
    scenario_of: np.ndarray
    local: np.ndarray
    scenario_params: dict[str, np.ndarray] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    n_available: int = 0  # windows before the cap

    def __len__(self) -> int:
        return int(self.scenario_of.shape[0])

    @property
    def n_scenarios(self) -> int:
        return len(self.datasets)

    def get_batch(self, idx) -> dict[str, torch.Tensor]:
        """Gather global windows ``idx`` (B,) from their scenarios; keys as a WindowDataset batch
        (docs/contracts.md) with ``index`` (B,) = the global ids and ``scenario`` (B,) added."""
        idx = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"simulated window index out of range for {len(self)} windows")
        scen = self.scenario_of[idx]
        parts, where = [], []
        for s in np.unique(scen):
            pos = np.flatnonzero(scen == s)
            parts.append(self.datasets[s].get_batch(self.local[idx[pos]]))
            where.append(pos)
        order = torch.from_numpy(np.argsort(np.concatenate(where), kind="stable"))
        batch = {k: torch.cat([p[k] for p in parts])[order] for k in parts[0] if k != "index"}
        batch["index"] = torch.from_numpy(idx.copy())
        batch["scenario"] = torch.from_numpy(scen.copy())
        return batch


def _numeric_params(metas: Sequence[dict]) -> dict[str, np.ndarray]:
    """Simulator parameters that are plain numbers in every scenario's meta["sim_params"]."""
    params = [m.get("sim_params") for m in metas]
    if not params or any(not isinstance(p, dict) for p in params):
        return {}
    keys = [k for k in params[0] if all(isinstance(p.get(k), numbers.Real) and not isinstance(p.get(k), bool)
                                        for p in params)]
    return {k: np.array([float(p[k]) for p in params]) for k in keys}


def prepare_sim_grid(grid: TrafficGrid, services: Sequence[str], step: int, source: str) -> TrafficGrid:
    """One scenario with the real run's services (in order) at the real step."""
    missing = [s for s in services if s not in grid.services]
    if missing:
        raise UserError(f"{source}: simulated data lacks service {missing[0]!r} used by the real run "
                        f"(it has {', '.join(grid.services)}); simulate with --services including it "
                        f"or set data.services")
    if grid.step > step:
        raise UserError(f"{source}: simulated step {format_step(grid.step)} is coarser than the real "
                        f"step {format_step(step)}; simulate at {format_step(step)} or finer")
    if grid.step != step:
        grid = grid.resample(step)
    return grid.select_services(list(services))


def build_sim_windows(path: str | Path, services: Sequence[str], step: int, input_len: int,
                      label_len: int, horizon: int, patch: int, stride: int = 1,
                      scaler_kind: str = "standard", max_windows: int | None = None,
                      seed: int = 0, season_days: int = 0,
                      season_stat: str = "mean") -> SimWindowSet:
    """Read ``path`` and build the simulated window set (see the module docstring)."""
    from simmstnet.data.scaling import Scaler
    from simmstnet.data.windows import WindowDataset
    from simmstnet.sim import load_sim_data, sim_data_files

    files = sim_data_files(path)
    grids = load_sim_data(path)
    datasets, metas, names = [], [], []
    for f, g in zip(files, grids):
        source = f"sim2real.sim_data {f}"
        g = prepare_sim_grid(g, services, step, source)
        scaler = Scaler.fit(g, (0, g.shape[0]), kind=scaler_kind)
        try:
            ds = WindowDataset(g, input_len=input_len, label_len=label_len, horizon=horizon, patch=patch,
                               stride=stride, scaler=scaler, season_days=season_days,
                               season_stat=season_stat)
        except UserError as exc:
            raise UserError(f"{source}: {exc}") from None
        datasets.append(ds)
        metas.append(g.meta)
        names.append(Path(f).stem)
    sizes = np.array([len(d) for d in datasets], dtype=np.int64)
    total = int(sizes.sum())
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if max_windows is not None and total > max_windows:
        # A sorted uniform subset: reproducible from the seed, independent of the mode.
        chosen = np.sort(np.random.default_rng([int(seed), 7]).choice(total, size=int(max_windows), replace=False))
    else:
        chosen = np.arange(total, dtype=np.int64)
    scen = np.searchsorted(offsets, chosen, side="right") - 1
    local = chosen - offsets[scen]
    return SimWindowSet(datasets, scen.astype(np.int64), local.astype(np.int64), _numeric_params(metas),
                        names, total)
