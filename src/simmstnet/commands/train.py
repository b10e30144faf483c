"""``simmstnet train``, ``simmstnet evaluate`` and ``simmstnet predict``.

    simmstnet train [--config FILE.yaml] [--resume] [KEY=VALUE ...]
    simmstnet train --help-config [model.name=NAME]
    simmstnet evaluate --run DIR [--data FILE.npz] [--span test|val|all] [--out FILE.json]
                       [--intervals 0.8,0.95] [--maps DIR [--geojson GRID.geojson]]
    simmstnet predict --run DIR --data FILE.npz [--at TIMESTAMP] --out FILE.csv|.parquet|.npz
                      [--intervals 0.8,0.95]

Multi-GPU / multi-node: ``torchrun --nproc_per_node=N -m simmstnet train ...``.
"""
from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np

from simmstnet.errors import UserError

# Keys a --resume may change: they do not alter what is computed.
RESUME_MAY_CHANGE = ("train.device", "train.log_every", "train.eval_batch_size", "train.resume")


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train and evaluate a model; writes a run folder",
        description="Train a model on a TrafficGrid and evaluate it on the test split. Settings come "
                    "from the defaults, then --config, then KEY=VALUE overrides (values read as YAML, "
                    "e.g. data.split=[0.8,0.1,0.1]); see --help-config for every key.",
        epilog="Several GPUs or nodes: torchrun --nproc_per_node=N -m simmstnet train ...")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--config", "-c", metavar="FILE.yaml", help="experiment config file")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in out=DIR from its last checkpoint")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (epoch summaries stay)")
    p.set_defaults(func=run_train)

    e = sub.add_parser("evaluate", help="recompute a run's test metrics, on its data or another file",
                       description="Evaluate a run's best model with the run's split, windows and scaler; "
                                   "prints metrics.json-style JSON.")
    e.add_argument("--run", required=True, metavar="DIR", help="run folder written by `simmstnet train`")
    e.add_argument("--data", metavar="FILE.npz", help="TrafficGrid to evaluate on (default: the run's data.path)")
    e.add_argument("--span", choices=("test", "val", "all"), default="test",
                   help="windows to score: the run's test or validation split, or every window of the file")
    e.add_argument("--out", metavar="FILE.json", help="also write the result here")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.add_argument("--batch-size", type=int, default=256, help="windows per batch")
    e.add_argument("--plots", metavar="DIR", help="write a forecast-vs-truth figure per service here "
                   "(truth black, this run red)")
    e.add_argument("--compare", metavar="RUN", help="with --plots: a second run, drawn in blue")
    e.add_argument("--cell", metavar="ROW,COL", help="with --plots: the cell to draw (default: the busiest "
                   "cell of each service in the span)")
    e.add_argument("--horizon-step", type=int, default=1, help="with --plots: the horizon step to draw (1 = next step)")
    e.add_argument("--intervals", metavar="LEVELS", help="conformal prediction intervals at these nominal "
                   "levels, e.g. 0.8,0.95: coverage, width, Winkler score, pinball loss and CRPS per service "
                   "(calibrated on the run's validation span; see docs/intervals.md)")
    e.add_argument("--interval-method", choices=("split", "aci"), default=None,
                   help="with --intervals: aci (default: adaptive conformal inference per cell over the "
                        "span's issue times) or split (split conformal)")
    e.add_argument("--maps", metavar="DIR", help="write per-cell maps (MAE, relative MAE, coverage) and "
                   "cells.csv here (intervals at 0.8,0.95 unless --intervals)")
    e.add_argument("--geojson", metavar="GRID.geojson", help="with --maps: draw the cells as the squares of "
                   "this grid file (Telecom Italia grid GeoJSON) instead of the raster")
    e.set_defaults(func=run_evaluate)

    q = sub.add_parser("predict", help="forecast every cell from a given time, in original units",
                       description="Forecast the next horizon steps of every cell and service, issued at "
                                   "--at (the last input step; default: the file's last time step).")
    q.add_argument("--run", required=True, metavar="DIR", help="run folder written by `simmstnet train`")
    q.add_argument("--data", required=True, metavar="FILE.npz", help="TrafficGrid holding the input history")
    q.add_argument("--at", metavar="TIMESTAMP",
                   help="issue time: ISO date-time (local time of the grid unless it has an offset) or "
                        "epoch seconds; it must be a time step of the file")
    q.add_argument("--out", required=True, metavar="FILE", help="output .csv, .parquet or .npz")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    q.add_argument("--batch-size", type=int, default=256, help="windows per batch")
    q.add_argument("--intervals", metavar="LEVELS", help="also lower/upper bounds at these nominal levels, "
                   "e.g. 0.8,0.95 (columns lower_80, upper_80, ...; conformal, calibrated on the run's "
                   "validation span, adapted per cell on the last 7 days of --data)")
    q.set_defaults(func=run_predict)


# ----------------------------------------------------------------------------- train


def resolve_train_config(config: str | None, overrides: list[str], resume: bool):
    """The config a `simmstnet train` call means; with resume, the run's saved config plus the
    (few) changes a resume allows."""
    from simmstnet.config import config_to_dict, load_config
    from simmstnet.train.checkpoint import CONFIG_FILE

    cfg = load_config(config, overrides)
    if not (resume or cfg.train.resume):
        return cfg, False
    if cfg.out is None:
        raise UserError("--resume needs the run folder: add out=DIR")
    saved_path = Path(cfg.out) / CONFIG_FILE
    if not saved_path.is_file():
        raise UserError(f"{cfg.out}: nothing to resume (no {CONFIG_FILE})")
    saved = load_config(saved_path)
    merged = load_config(config, overrides, base=saved)
    merged.out = cfg.out
    changed = _diff(config_to_dict(saved), config_to_dict(merged))
    changed = [c for c in changed if c[0] not in RESUME_MAY_CHANGE and c[0] != "out"]
    if changed:
        key, old, new = changed[0]
        raise UserError(f"cannot change {key} when resuming (the run has {old!r}, given {new!r}); "
                        f"a resume may change only {', '.join(RESUME_MAY_CHANGE)}")
    return merged, True


def _diff(a: dict, b: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for key in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, name + ".")
        elif va != vb:
            out.append((name, va, vb))
    return out


def run_train(args) -> int:
    from simmstnet.config import config_help, parse_override

    if args.help_config:
        model = None
        for text in args.overrides:
            key, value = parse_override(text)
            if key == "model.name":
                model = str(value)
        print(config_help(model))
        return 0
    from simmstnet.train.trainer import Trainer

    cfg, resume = resolve_train_config(args.config, args.overrides, args.resume)
    trainer = Trainer(cfg, resume=resume, progress=not args.no_progress)
    metrics = trainer.run()
    if metrics:  # rank 0: where the results are, on stdout for scripts
        print(trainer.out / "metrics.json")
    return 0


# ----------------------------------------------------------------------------- evaluate / predict


def _grid_for_run(run, path: str | None):
    """The data file read the way the run read its own (resampled, same services), checked."""
    from simmstnet.train.trainer import load_grid

    d = run.config.data
    grid = load_grid(path or d.path, None, d.step, what="--data" if path else "the run's data.path")
    missing = [s for s in run.services if s not in grid.services]
    if missing:
        raise UserError(f"{path or d.path}: no service {missing[0]!r}; the run forecasts {', '.join(run.services)}")
    grid = grid.select_services(run.services)
    if grid.step != run.step:
        from simmstnet.utils import format_step

        raise UserError(f"{path or d.path}: step {format_step(grid.step)} differs from the run's "
                        f"{format_step(run.step)} (set the run's data.step or resample the file)")
    return grid


def _span_dataset(run, grid, span: str):
    from simmstnet.data.windows import WindowDataset, split_ranges

    d = run.config.data
    target = None if span == "all" else split_ranges(grid, d.split, d.input_len, d.horizon)[span]
    return WindowDataset(grid, input_len=d.input_len, label_len=d.label_len, horizon=d.horizon, patch=d.patch,
                         scaler=run.scaler, target_range=target, season_days=d.season_days,
                         season_stat=d.season_stat)


def plot_runs(run, ds, grid, folder: str | Path, compare=None, cell: tuple[int, int] | None = None,
              horizon_step: int = 1, device="cpu", batch_size: int = 256) -> list[Path]:
    """``forecast_<service>.png`` in ``folder``: one cell, one horizon step over the dataset's span;
    truth black, ``run`` red, ``compare`` = (another loaded run, the grid as it reads it) blue
    (paper Figure 2 style)."""
    from zoneinfo import ZoneInfo

    from simmstnet.eval.forecast import cell_series
    from simmstnet.eval.plots import plot_forecast

    if not 1 <= horizon_step <= ds.horizon:
        raise UserError(f"--horizon-step must be in 1..{ds.horizon}, got {horizon_step}")
    lo, hi = ds.target_range
    tz = ZoneInfo(grid.timezone)
    paths = []
    for c, service in enumerate(ds.services):
        if cell is None:
            totals = np.where(grid.mask[lo:hi, :, :, c], grid.values[lo:hi, :, :, c], 0).sum(0)
            r, k = (int(v) for v in np.unravel_index(int(np.argmax(totals)), totals.shape))
        else:
            r, k = cell
            if not (0 <= r < grid.shape[1] and 0 <= k < grid.shape[2]):
                raise UserError(f"--cell {r},{k} is outside the {grid.shape[1]}x{grid.shape[2]} grid")
        t_idx, truth, fc = cell_series(run.model, ds, r, k, horizon_step, batch_size, device, run.config.train.amp)
        second = None
        if compare is not None and service in compare[0].services:
            compare_run, compare_grid = compare
            other_ds = _span_dataset(compare_run, compare_grid, "all")
            t2, _, fc2 = cell_series(compare_run.model, other_ds, r, k, horizon_step, batch_size, device,
                                     compare_run.config.train.amp)
            # Same target times as the main run; NaN where the other run has no window.
            aligned = np.full(t_idx.shape, np.nan)
            pos = {int(t): i for i, t in enumerate(t2)}
            col = compare_run.services.index(service)
            for i, t in enumerate(t_idx):
                if int(t) in pos:
                    aligned[i] = fc2[pos[int(t)], col]
            second = (f"{compare_run.config.model.name} ({compare_run.folder.name})", aligned)
        times = [dt.datetime.fromtimestamp(int(grid.timestamps[i]), tz).replace(tzinfo=None) for i in t_idx]
        paths.append(plot_forecast(times, truth[:, c], fc[:, c], Path(folder) / f"forecast_{service}.png",
                                   title=f"{service}: cell (row {r}, col {k}), horizon step {horizon_step}",
                                   label=f"{run.config.model.name} ({run.folder.name})", second=second,
                                   xlabel=f"local time ({grid.timezone})"))
    return paths


def run_calibration(run, grid, levels, device="cpu", batch_size: int = 256, method: str | None = None):
    """The run's interval calibration at ``levels``: its ``calibration.npz`` (written by
    ``simmstnet train``) when it fits this grid, else split conformal on the validation span of
    ``grid`` with the run's split (older runs, or another grid size)."""
    from simmstnet.eval.intervals import (CALIBRATION_FILE, DEFAULT_METHOD, Calibration, calibrate, cell_scales,
                                          scale_range)
    from simmstnet.data.windows import split_ranges

    path = Path(run.folder) / CALIBRATION_FILE
    if path.is_file():
        cal = Calibration.load(path)
        if cal.scale.shape[:2] == tuple(grid.shape[1:3]) and cal.services == tuple(run.services):
            cal = cal.with_levels(levels)
            if method is not None:
                cal.method = method
            return cal
    d = run.config.data
    ranges = split_ranges(grid, d.split, d.input_len, d.horizon, train_days=d.train_days)
    scale = cell_scales(grid.values, grid.mask, scale_range(grid, ranges, d.input_len, d.train_days))
    ds = _span_dataset(run, grid, "val")
    return calibrate(run.model, ds, scale, levels, method or DEFAULT_METHOD, batch_size, device,
                     run.config.train.amp, info={"calibrated_on": "val of the evaluated file"})


def evaluate_run(run_dir: str | Path, data: str | None = None, span: str = "test", device: str = "auto",
                 batch_size: int = 256, progress: bool = True, plots: str | None = None,
                 compare: str | None = None, cell: tuple[int, int] | None = None,
                 horizon_step: int = 1, intervals=None, interval_method: str | None = None,
                 maps: str | None = None, geojson: str | None = None) -> dict:
    """metrics.json-style figures of a run's best model on ``span`` of ``data`` (default: its own).

    ``intervals``: nominal levels (text "0.8,0.95" or floats) for conformal intervals; the result
    then has an ``intervals`` block (see docs/intervals.md). ``maps``: folder for per-cell maps.
    """
    import time

    from simmstnet.eval.intervals import check_method, parse_levels

    levels = parse_levels(intervals) if (intervals is not None or maps is not None) else None
    if interval_method is not None:
        check_method(interval_method)
        if levels is None:
            raise UserError("--interval-method needs --intervals LEVELS")
    if geojson is not None and maps is None:
        raise UserError("--geojson draws the maps on real geometry: give --maps DIR too")
    if geojson is not None and not Path(geojson).is_file():
        raise UserError(f"--geojson {geojson}: no such file")
    from simmstnet.eval.forecast import evaluate
    from simmstnet.train.checkpoint import load_run
    from simmstnet.train.distributed import resolve_device
    from simmstnet.utils import format_step

    if compare is not None and plots is None:
        raise UserError("--compare draws a second run in the figures: give --plots DIR too")
    dev = resolve_device(device)
    run = load_run(run_dir, dev)
    other = load_run(compare, dev) if compare is not None else None
    grid = _grid_for_run(run, data)
    d = run.config.data
    ds = _span_dataset(run, grid, span)
    if other is not None:
        if other.step != run.step:
            raise UserError(f"--compare {compare}: its step {other.step} s differs from the run's {run.step} s")
        # The second run reads the same file, its own way (its services, its step).
        other = (other, _grid_for_run(other, data or d.path))
    cal, cal_seconds = None, 0.0
    if levels is not None:
        t0 = time.perf_counter()
        cal = run_calibration(run, grid, levels, dev, batch_size, interval_method)
        cal_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate(run.model, ds, batch_size, dev, run.config.train.amp, run.config.train.loss,
                   progress=progress, desc=f"evaluate {span}", intervals=cal, interval_method=interval_method)
    eval_seconds = time.perf_counter() - t0
    if plots is not None:
        plot_runs(run, ds, grid, plots, other, cell, horizon_step, dev, batch_size)
    lo, hi = ds.target_range
    out = {"run": str(run_dir), "model": run.config.model.name, "data": str(data or d.path), "span": span,
           "target_steps": [lo, hi], "step": format_step(grid.step), "input_len": d.input_len,
           "horizon": d.horizon, span: res["metrics"]}
    if cal is not None:
        from simmstnet.train.trainer import interval_block

        out["intervals"] = interval_block(cal, res, cal_seconds, eval_seconds, span)
        out["intervals"]["eval_seconds"] = round(eval_seconds, 4)
        if "aci" in res:
            out["intervals"]["aci"] = {k: v for k, v in res["aci"].items() if k == "alpha_mean"}
    if maps is not None:
        from simmstnet.eval.maps import plot_cell_maps, write_cell_table

        write_cell_table(res["cells"], Path(maps) / "cells.csv")
        plot_cell_maps(res["cells"], maps, grid.meta, geojson, title=f"{run.config.model.name}, {span} span")
    return out


def _check_batch_size(value: int) -> None:
    if value < 1:  # 0 would divide by zero, a negative one silently skip every window
        raise UserError(f"--batch-size must be at least 1, got {value}")


def run_evaluate(args) -> int:
    from simmstnet.utils import atomic_path, check_output_file

    _check_batch_size(args.batch_size)
    if args.out:
        check_output_file(args.out)  # before the evaluation, not after it
    cell = None
    if args.cell is not None:
        try:
            cell = tuple(int(v) for v in args.cell.split(","))
        except ValueError:
            cell = ()
        if len(cell) != 2:
            raise UserError(f"--cell {args.cell!r}: give ROW,COL, e.g. --cell 3,7")
    result = evaluate_run(args.run, args.data, args.span, args.device, args.batch_size, plots=args.plots,
                          compare=args.compare, cell=cell, horizon_step=args.horizon_step,
                          intervals=args.intervals, interval_method=args.interval_method, maps=args.maps,
                          geojson=args.geojson)
    text = json.dumps(result, indent=2, allow_nan=False)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(text + "\n")
    print(text)
    return 0


def parse_at(text: str, grid) -> int:
    """Index of the time step ``text`` (ISO, local time of the grid unless offset given, or epoch s)."""
    import pandas as pd

    t = str(text).strip()
    if t.lstrip("-").isdigit():
        epoch = int(t)
    else:
        try:
            ts = pd.Timestamp(t)
        except (ValueError, TypeError):
            raise UserError(f"--at {text!r}: use an ISO date-time (2013-11-20T18:00) or epoch seconds") from None
        if ts.tzinfo is None:
            ts = ts.tz_localize(grid.timezone)
        epoch = int(ts.timestamp())
    idx = int(np.searchsorted(grid.timestamps, epoch))
    if idx >= grid.shape[0] or int(grid.timestamps[idx]) != epoch:
        from simmstnet.train.trainer import _iso

        raise UserError(f"--at {text!r} is not a time step of the data ({_iso(int(grid.timestamps[0]), grid.timezone)} "
                        f"to {_iso(int(grid.timestamps[-1]), grid.timezone)} every {grid.step} s)")
    return idx


def forecast_at(run, grid, at_index: int, device="cpu", batch_size: int = 256, cal=None) -> dict:
    """Forecasts of every cell issued at time step ``at_index`` (its last input step).

    Returns ``{"forecast": (H, Hg, Wg, C) original units, "target_timestamps": (H,),
    "timestamp_issued": int, "services": tuple}``. Targets may lie beyond the end of the data:
    the grid is extended by unobserved steps so that the window exists. With ``cal`` (a
    :class:`~simmstnet.eval.intervals.Calibration`) also ``"levels"`` (K,) and ``"lower"``,
    ``"upper"`` (K, H, Hg, Wg, C).
    """
    from simmstnet.data.grid import TrafficGrid
    from simmstnet.data.windows import WindowDataset
    from simmstnet.eval.forecast import forecast_batches

    d = run.config.data
    L, H = d.input_len, d.horizon
    if at_index < L - 1:
        raise UserError(f"--at is step {at_index} of the data: the forecast needs {L} input steps "
                        f"(data.input_len) up to it")
    T, Hg, Wg, C = grid.shape
    need = at_index + 1 + H - T  # future steps beyond the data
    if need > 0:
        step = grid.step
        extra_t = grid.timestamps[-1] + step * np.arange(1, need + 1, dtype=np.int64)
        grid = TrafficGrid(np.concatenate([grid.values, np.zeros((need, Hg, Wg, C), np.float32)]),
                           np.concatenate([grid.mask, np.zeros((need, Hg, Wg, C), bool)]),
                           np.concatenate([grid.timestamps, extra_t]), grid.services, dict(grid.meta))
    ds = WindowDataset(grid, input_len=L, label_len=d.label_len, horizon=H, patch=d.patch, scaler=run.scaler,
                       season_days=d.season_days, season_stat=d.season_stat,
                       target_range=(at_index + 1, at_index + 1 + H), skip_unobserved=False)
    out = np.zeros((H, Hg, Wg, C), np.float32)
    K = len(cal.levels) if cal is not None else 0
    lower = np.zeros((K, H, Hg, Wg, C), np.float32)
    upper = np.zeros((K, H, Hg, Wg, C), np.float32)
    for batch, pred in forecast_batches(run.model, ds, None, batch_size, device, run.config.train.amp):
        _, rows, cols = ds.window_info(batch["index"])
        p = run.scaler.inverse(pred.double()).numpy()
        out[:, rows, cols] = p.transpose(1, 0, 2)
        if cal is not None:
            lo_b, up_b = cal.bounds(p, rows, cols)                        # (K, B, H, C)
            lower[:, :, rows, cols] = lo_b.transpose(0, 2, 1, 3)
            upper[:, :, rows, cols] = up_b.transpose(0, 2, 1, 3)
    result = {"forecast": out, "target_timestamps": grid.timestamps[at_index + 1: at_index + 1 + H].copy(),
              "timestamp_issued": int(grid.timestamps[at_index]), "services": tuple(run.services)}
    if cal is not None:
        result.update(levels=tuple(cal.levels), lower=lower, upper=upper)
    return result


def forecast_table(result: dict, timezone: str):
    """One row per (cell, horizon step, service): timestamp_issued, target_timestamp,
    horizon_step, row, col, service, forecast (timestamps ISO 8601 with the grid's UTC offset)."""
    import pandas as pd

    from simmstnet.train.trainer import _iso

    fc = result["forecast"]                                           # (H, Hg, Wg, C)
    H, Hg, Wg, C = fc.shape
    r, c, h, s = np.meshgrid(np.arange(Hg), np.arange(Wg), np.arange(H), np.arange(C), indexing="ij")
    targets = np.array([_iso(int(t), timezone) for t in result["target_timestamps"]])
    return pd.DataFrame({
        "timestamp_issued": _iso(result["timestamp_issued"], timezone),
        "target_timestamp": targets[h.ravel()],
        "horizon_step": h.ravel() + 1,
        "row": r.ravel(),
        "col": c.ravel(),
        "service": np.array(result["services"])[s.ravel()],
        "forecast": fc[h.ravel(), r.ravel(), c.ravel(), s.ravel()],
        **_bound_columns(result, h.ravel(), r.ravel(), c.ravel(), s.ravel()),
    })


def _bound_columns(result: dict, h, r, c, s) -> dict:
    """``lower_<tag>``, ``upper_<tag>`` columns (tag = level in percent) when intervals were asked for."""
    from simmstnet.eval.intervals import level_tag

    cols = {}
    for k, lv in enumerate(result.get("levels", ())):
        cols[f"lower_{level_tag(lv)}"] = result["lower"][k][h, r, c, s]
        cols[f"upper_{level_tag(lv)}"] = result["upper"][k][h, r, c, s]
    return cols


def write_forecast(result: dict, path: str | Path, timezone: str) -> Path:
    from simmstnet.utils import atomic_path

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".npz"):
        raise UserError(f"--out {path}: use a .csv, .parquet or .npz file name")
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UserError("writing .parquet needs pyarrow: pip install 'simmstnet[parquet]' "
                            "(or use --out FILE.csv / FILE.npz)") from None
    with atomic_path(path) as tmp:
        if suffix == ".npz":
            with open(tmp, "wb") as fh:
                np.savez(fh, forecast=result["forecast"], target_timestamps=result["target_timestamps"],
                         timestamp_issued=np.int64(result["timestamp_issued"]),
                         horizon_step=np.arange(1, result["forecast"].shape[0] + 1),
                         services=np.array(result["services"], dtype=str),
                         **({"levels": np.asarray(result["levels"]), "lower": result["lower"],
                             "upper": result["upper"]} if "levels" in result else {}))
        else:
            table = forecast_table(result, timezone)
            if suffix == ".csv":
                table.to_csv(tmp, index=False)
            else:
                table.to_parquet(tmp, index=False)
    return path


def _predict_calibration(run, grid, levels, at: int, device, batch_size: int):
    """The run's calibration for a forecast on ``grid``: the run's quantiles; on a grid of another
    size the per-cell scales come from this grid's history up to the issue time."""
    from simmstnet.eval.intervals import CALIBRATION_FILE, Calibration, cell_scales

    path = Path(run.folder) / CALIBRATION_FILE
    if path.is_file():
        cal = Calibration.load(path).with_levels(levels)
        if cal.scale.shape[:2] != tuple(grid.shape[1:3]):
            cal.scale = cell_scales(grid.values, grid.mask, (0, at + 1))
    else:
        cal = run_calibration(run, grid, levels, device, batch_size)
    if cal.method != "aci":
        return cal
    # Adaptive conformal inference: replay the recent forecasts of this file whose truth is known
    # (up to ACI_REPLAY_DAYS before the issue time) so that each cell's level has adapted.
    from simmstnet.data.windows import WindowDataset
    from simmstnet.eval.intervals import ACI_REPLAY_DAYS, aci_state

    d = run.config.data
    L, H = d.input_len, d.horizon
    hi = at + 1                                   # targets up to the issue time are known
    lo = max(L, hi - ACI_REPLAY_DAYS * max(1, 86400 // grid.step))
    if hi - lo < H:
        return cal                                # no history to adapt on: the calibrated levels
    ds = WindowDataset(grid, input_len=L, label_len=d.label_len, horizon=H, patch=d.patch, scaler=run.scaler,
                       season_days=d.season_days, season_stat=d.season_stat,
                       target_range=(lo, hi))
    if len(ds) == 0:
        return cal
    return aci_state(run.model, ds, cal, next_start=at - L + 1, batch_size=batch_size, device=device,
                     amp=run.config.train.amp)


def run_predict(args) -> int:
    from simmstnet.train.checkpoint import load_run
    from simmstnet.train.distributed import resolve_device

    from simmstnet.utils import check_output_file

    _check_batch_size(args.batch_size)
    check_output_file(args.out)  # before the forecast, not after it
    levels = None
    if args.intervals is not None:
        from simmstnet.eval.intervals import parse_levels

        levels = parse_levels(args.intervals)
    dev = resolve_device(args.device)
    run = load_run(args.run, dev)
    grid = _grid_for_run(run, args.data)
    at = grid.shape[0] - 1 if args.at is None else parse_at(args.at, grid)
    cal = _predict_calibration(run, grid, levels, at, dev, args.batch_size) if levels is not None else None
    result = forecast_at(run, grid, at, dev, args.batch_size, cal=cal)
    out = write_forecast(result, args.out, grid.timezone)
    H, Hg, Wg, C = result["forecast"].shape
    from simmstnet.train.trainer import _iso

    sys.stderr.write(f"wrote {out}: {Hg * Wg} cells x {C} services x {H} steps, issued at "
                     f"{_iso(int(grid.timestamps[at]), grid.timezone)}\n")
    return 0
