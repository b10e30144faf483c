"""The simulator's entry points: draw scenarios, run them, save and load them.

One scenario = one city drawn from a parameter space, simulated over the whole time span:
geometry -> radio -> demand -> serving, congestion, attribution -> noise, scale, mask ->
TrafficGrid with values (T, H, W, C) float32. Scenario ``i`` of seed ``s`` always gives the same
grid, whatever the number of scenarios or worker processes (its random streams come from
``SeedSequence(s, spawn_key=(i,))``).

On disk: one scenario is one TrafficGrid ``.npz``; several are a folder of
``scenario-0000.npz`` ... plus ``index.json`` (files, preset, seed, parameters). Every command
that takes simulated data reads both through :func:`load_sim_data`.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from simmstnet.data.grid import SERVICES, TrafficGrid
from simmstnet.errors import UserError
from simmstnet.sim import demand as dm
from simmstnet.sim import measurement as ms
from simmstnet.sim.geometry import build_city, place_sites
from simmstnet.sim.radio import build_radio
from simmstnet.sim.randomization import ParamSpace, build_space, sample_params, space_to_yaml
from simmstnet.utils import atomic_path, check_epoch, check_memory, format_bytes, format_step, parse_step

INDEX_NAME = "index.json"
TIMEZONE = "Europe/Rome"
MAX_CELLS = 1_000_000
# Peak memory of one scenario per (time step x square), beyond its output (values float32 and
# mask bool per service): demand, carried traffic, noise and mask temporaries. Measured at
# ~50 bytes per step x square for three services (rows 100-200, 10-20 days), output included.
_WORK_BYTES = 40
# Burst multiplier (demand.draw_bursts) and per-square shape multiplier (demand.draw_square_shape),
# when they are on: one float32 per step x square each.
_MULTIPLIER_BYTES = 8
# simulate / simulate_to_path warn (CapacityWarning) when sector capacity clips more than this
# share of a scenario's Net demand. The presets congest on purpose (random: up to ~20 % in one
# city in ten); beyond a quarter the Net series is mostly the capacity, not the demand.
CLIP_WARN_SHARE = 0.25


class CapacityWarning(UserWarning):
    """Sector capacity clipped a large share of the simulated Net demand."""


def parse_start(start: str | int, timezone: str = TIMEZONE) -> int:
    """Epoch seconds of a local start date/time (``2013-11-01`` = midnight Europe/Rome)."""
    if isinstance(start, (int, np.integer)) and not isinstance(start, bool):
        return int(start)
    try:
        ts = pd.Timestamp(str(start))
    except (ValueError, TypeError):
        raise UserError(f"--start: cannot read {start!r} as a date (use e.g. 2013-11-01)") from None
    ts = ts.tz_localize(timezone) if ts.tzinfo is None else ts
    return int(ts.tz_convert("UTC").timestamp())


def _check_shape(rows: int, cols: int, days: float, step: int, services: Sequence[str]) -> int:
    for name, v in (("rows", rows), ("cols", cols)):
        if int(v) != v or v < 1:
            raise UserError(f"--{name} must be a positive whole number, got {v}")
    if rows * cols > MAX_CELLS:
        raise UserError(f"--rows x --cols = {rows * cols} squares is more than {MAX_CELLS}")
    if not 0 < days < float("inf"):
        raise UserError(f"--days must be a positive finite number, got {days}")
    if 86400 % step:
        raise UserError(f"--step {format_step(step)} does not divide a day")
    T = int(round(days * 86400 / step))
    if T < 1:
        raise UserError(f"--days {days} is shorter than one {format_step(step)} step")
    bad = [s for s in services if s not in SERVICES]
    if bad or not services or len(set(services)) != len(services):
        raise UserError(f"--services: expected distinct names from {', '.join(SERVICES)}, got {list(services)}")
    return T


def _service_channel(service: str, city, cal, radio, step: int, p: dict, events: list,
                     demand_seq: np.random.SeedSequence, noise_seq: np.random.SeedSequence,
                     bursts: np.ndarray | None = None, square_shape: np.ndarray | None = None,
                     mix: np.ndarray | None = None):
    """What the operator books for one service: (T, N) float32 in output units, congestion info.

    ``square_shape`` (T, N) and ``mix`` (N,): per-square multipliers applied after attribution
    and before the per-square noise (demand.draw_square_shape, demand.draw_service_mix)."""
    lam = dm.demand(city, cal, service, step, p, events, np.random.default_rng(demand_seq))
    if bursts is not None:
        lam *= bursts
    rng = np.random.default_rng(noise_seq)
    carried, cong = ms.carried_by_sector(lam, radio, step, saturate=(service == "net"), p=p, rng=rng)
    del lam
    if service == "net":
        # volume noise is set for 10-minute steps; a longer step sums independent bursts.
        # Session bursts happen in sectors, so most of the noise is shared by the squares a
        # sector covers (neighbour correlation); a smaller part is per square.
        sigma = p["net_noise_sigma"] * float(np.sqrt(600 / step))
        carried = ms.volume_noise(carried, sigma, p["net_noise_df"], rng)
        booked = ms.volume_noise(_per_square(ms.attribute(carried, radio), square_shape, mix),
                                 0.8 * sigma, p["net_noise_df"], rng)
    else:
        booked = ms.count_noise(_per_square(ms.attribute(carried, radio), square_shape, mix),
                                p["count_noise"], p["negbin_k"], rng)
    del carried
    booked *= np.float32(p[f"scale_{service}"])
    return booked, cong


def _per_square(x: np.ndarray, square_shape: np.ndarray | None, mix: np.ndarray | None) -> np.ndarray:
    if square_shape is not None:
        x *= square_shape
    if mix is not None:
        x *= mix[None, :]
    return x


def simulate_scenario(space: ParamSpace, rows: int, cols: int, days: float = 30, step: int = 3600,
                      seed: int = 0, index: int = 0, start: str | int = "2013-11-01",
                      shift: float = 0.0, services: Sequence[str] = SERVICES,
                      preset: str = "custom") -> TrafficGrid:
    """Simulate one scenario; returns a TrafficGrid (T, rows, cols, len(services))."""
    step = parse_step(step)
    T = _check_shape(rows, cols, days, step, services)
    t_start = parse_start(start)
    root = np.random.SeedSequence(int(seed), spawn_key=(int(index),))
    ss_params, ss_city, ss_radio, ss_demand, ss_noise = root.spawn(5)
    p = sample_params(space, ss_params, shift=shift)

    city = build_city(rows, cols, p, np.random.default_rng(ss_city))
    rng_radio = np.random.default_rng(ss_radio)
    sites = place_sites(city, p, rng_radio)
    radio = build_radio(city, sites, p, rng_radio)

    timestamps = t_start + step * np.arange(T, dtype=np.int64)
    cal = dm.local_calendar(timestamps, step, TIMEZONE, dm.LOCAL_HOLIDAYS[p.get("local_holiday", "none")])
    # one stream per service, so asking for fewer services does not change the others
    ev_seq, *demand_seqs = ss_demand.spawn(4)
    mask_seq, *noise_seqs = ss_noise.spawn(4)
    demand_streams = dict(zip(dm.SERVICES3, demand_seqs))
    noise_streams = dict(zip(dm.SERVICES3, noise_seqs))
    events = dm.draw_events(city, cal, step, p, np.random.default_rng(ev_seq))
    observed, mask_info = ms.draw_mask(T, rows * cols, radio, step, p, np.random.default_rng(mask_seq))
    # bursts have their own stream (the root's 6th child): turning them on changes nothing else
    bursts = dm.draw_bursts(T, rows * cols, step, p, np.random.default_rng(root.spawn(1)[0]))
    # the per-square realism pieces: the root's 7th child, split into the shape stream and one
    # service-mix stream per service (each piece on or off leaves every other draw alone)
    shape_seq, *mix_seqs = root.spawn(1)[0].spawn(4)
    square_shape = dm.draw_square_shape(cal, rows * cols, p, shape_seq)
    mixes = {s: dm.draw_service_mix(rows * cols, p, np.random.default_rng(q))
             for s, q in zip(dm.SERVICES3, mix_seqs)}

    values = np.zeros((T, rows * cols, len(services)), dtype=np.float32)
    derived: dict = dict(radio.info, **mask_info)
    for ci, service in enumerate(services):
        booked, cong = _service_channel(service, city, cal, radio, step, p, events,
                                        demand_streams[service], noise_streams[service], bursts,
                                        square_shape, mixes[service])
        derived.update({f"net_{k}": v for k, v in cong.items()})
        values[:, :, ci] = np.where(observed, booked, 0.0)
        del booked
    values = values.reshape(T, rows, cols, len(services))
    mask = np.broadcast_to(observed.reshape(T, rows, cols, 1), values.shape).copy()
    derived.update({"residents": float(city.residents.sum()),
                    "subscribers": float(city.residents.sum() * p["market_share"]),
                    "n_events": len(events)})
    meta = {"source": "simulator", "timezone": TIMEZONE, "preset": preset, "seed": int(seed),
            "scenario": int(index), "shift": float(shift), "cell_size_m": float(p["cell_size_m"]),
            "sim_params": p, "sim_derived": derived, "sim_events": events,
            "license": "generated by simmstnet (MIT); no real data"}
    return TrafficGrid(values, mask, timestamps, tuple(services), meta)


def warn_clipping(shares: Sequence[float]) -> bool:
    """One CapacityWarning for the scenarios whose capacity clipped more than CLIP_WARN_SHARE of
    their Net demand; True when it warned."""
    over = [(i, v) for i, v in enumerate(shares) if v is not None and v > CLIP_WARN_SHARE]
    if not over:
        return False
    worst = max(over, key=lambda iv: iv[1])
    warnings.warn(f"{len(over)} of {len(shares)} scenarios: sector capacity clipped more than "
                  f"{CLIP_WARN_SHARE:.0%} of the Net demand (worst: scenario {worst[0]}, {worst[1]:.0%}); "
                  f"their Net series follow the capacity, not the demand. Raise bandwidth_mhz or lower "
                  f"net_kbps_per_user unless that congestion is wanted", CapacityWarning, stacklevel=3)
    return True


def _lost_share(grid: TrafficGrid) -> float | None:
    return grid.meta.get("sim_derived", {}).get("net_lost_net_share")


def _run_one(kwargs: dict) -> TrafficGrid:
    return simulate_scenario(**kwargs)


def _run_and_save(args: tuple[dict, str]) -> dict:
    kwargs, path = args
    grid = simulate_scenario(**kwargs)
    grid.save(path)
    return {"file": Path(path).name, "scenario": kwargs["index"], "shape": list(grid.shape),
            "sim_params": grid.meta["sim_params"], "lost_net_share": _lost_share(grid)}


def estimate_memory(rows: int, cols: int, T: int, n_services: int, scenarios: int = 1,
                    workers: int = 1, keep: bool = False) -> tuple[int, int]:
    """(peak bytes, output bytes of one scenario) of simulating ``scenarios`` cities with
    ``workers`` processes; ``keep``: every result stays in memory (:func:`simulate`)."""
    steps_cells = int(T) * int(rows) * int(cols)
    output = steps_cells * n_services * 5
    running = max(1, min(int(workers), int(scenarios)))
    peak = running * (output + steps_cells * (_WORK_BYTES + _MULTIPLIER_BYTES))
    if keep:
        peak += (int(scenarios) - running) * output
    return peak, output


def _jobs(preset, rows, cols, days, step, scenarios, seed, config, start, shift, services,
          workers: int = 1, keep: bool = False) -> list[dict]:
    if int(scenarios) != scenarios or scenarios < 1:
        raise UserError(f"--scenarios must be a positive whole number, got {scenarios}")
    space = build_space(preset, config)
    step = parse_step(step)
    T = _check_shape(rows, cols, days, step, services)
    t0 = check_epoch(parse_start(start), f"--start {start}")
    check_epoch(t0 + (T - 1) * step, f"the last time step (--start {start} + --days {days:g})")
    # Refuse before allocating: a grid too big for memory would die with a MemoryError (or be
    # killed by the kernel) after minutes of work.
    peak, output = estimate_memory(rows, cols, T, len(services), scenarios, workers, keep)
    check_memory(peak, f"simulating {int(scenarios)} x {rows}x{cols} squares x {T} steps x "
                 f"{len(services)} services (output {format_bytes(output)} per scenario)")
    if shift < 0:
        raise UserError(f"--shift must be >= 0, got {shift:g}")
    return [dict(space=space, rows=rows, cols=cols, days=days, step=step, seed=seed, index=i,
                 start=start, shift=shift, services=tuple(services), preset=preset)
            for i in range(int(scenarios))]


def _map(fn, jobs: list, workers: int, progress: bool) -> Iterator:
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="scenarios", unit="city", disable=not progress or len(jobs) < 2,
               file=sys.stderr)
    if workers <= 1 or len(jobs) == 1:
        for j in jobs:
            yield fn(j)
            bar.update()
    else:
        # forkserver: workers fork from a clean server process, never from a parent that may
        # hold torch/OpenMP threads (forking those can deadlock)
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["simmstnet.sim.simulator"])  # import once, in the server
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for out in pool.map(fn, jobs):
                yield out
                bar.update()
    bar.close()


def simulate(preset: str = "milano-like", rows: int = 20, cols: int = 20, days: float = 30,
             step: int | str = 3600, scenarios: int = 1, seed: int = 0,
             config: str | os.PathLike | dict | None = None, start: str | int = "2013-11-01",
             workers: int = 1, shift: float = 0.0, services: Sequence[str] = SERVICES,
             progress: bool = False) -> list[TrafficGrid]:
    """Simulate ``scenarios`` cities; a list of TrafficGrids (T, rows, cols, C) in memory.

    ``config``: a YAML file or a mapping ``{parameter: value or [low, high]}`` overriding the
    preset; ``shift > 0`` draws parameters outside the ranges (a target city unlike the sources);
    ``workers`` processes run scenarios in parallel (results do not depend on it).
    """
    jobs = _jobs(preset, rows, cols, days, step, scenarios, seed, config, start, shift, services,
                 workers=workers, keep=True)
    grids = list(_map(_run_one, jobs, workers, progress))
    warn_clipping([_lost_share(g) for g in grids])
    return grids


def simulate_to_path(out: str | os.PathLike, preset: str = "milano-like", rows: int = 20, cols: int = 20,
                     days: float = 30, step: int | str = 3600, scenarios: int = 1, seed: int = 0,
                     config=None, start: str | int = "2013-11-01", workers: int = 1, shift: float = 0.0,
                     services: Sequence[str] = SERVICES, progress: bool = True) -> Path:
    """Simulate and write: one scenario to ``out`` (.npz), several to folder ``out`` with an index.

    Each scenario is written as soon as it is done (memory stays at one scenario per worker).
    """
    out = Path(out)
    jobs = _jobs(preset, rows, cols, days, step, scenarios, seed, config, start, shift, services,
                 workers=workers)
    if len(jobs) == 1:
        if out.suffix != ".npz":
            raise UserError(f"--out {out}: one scenario is written as a .npz file")
        entry = _run_and_save((jobs[0], str(out)))
        warn_clipping([entry["lost_net_share"]])
        return out
    if out.suffix == ".npz":
        raise UserError(f"--out {out}: several scenarios are written to a folder, not a .npz file")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    entries = list(_map(_run_and_save, [(j, str(out / f"scenario-{j['index']:04d}.npz")) for j in jobs],
                        workers, progress))
    warn_clipping([e["lost_net_share"] for e in entries])
    index = {"format": "simmstnet-sim-index/1", "preset": preset, "seed": int(seed),
             "scenarios": len(entries), "step": format_step(parse_step(step)), "rows": rows, "cols": cols,
             "days": days, "start": str(start), "shift": float(shift), "services": list(services),
             "space": space_to_yaml(jobs[0]["space"]), "files": entries}
    with atomic_path(out / INDEX_NAME) as tmp:
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
    return out


def sim_data_files(path: str | os.PathLike) -> list[Path]:
    """The .npz files of simulated data at ``path`` (a .npz file or a folder with index.json)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix != ".npz":
            raise UserError(f"{path}: expected a TrafficGrid .npz or a scenario folder with {INDEX_NAME}")
        return [path]
    index_path = path / INDEX_NAME
    if not index_path.exists():
        raise UserError(f"{path}: folder has no {INDEX_NAME} (not a simulated scenario folder)")
    try:
        index = json.loads(index_path.read_text())
        names = [e["file"] for e in index["files"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{index_path}: malformed index ({exc})") from None
    files = [path / n for n in names]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise UserError(f"{index_path}: lists {missing[0].name}, which is missing")
    return files


def load_sim_data(path: str | os.PathLike) -> list[TrafficGrid]:
    """Load simulated data: one .npz gives a one-element list, a scenario folder all its grids."""
    return [TrafficGrid.load(f) for f in sim_data_files(path)]
