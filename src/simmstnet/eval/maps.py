"""Where on the grid the forecast fails: per-cell maps of test MAE and interval coverage.

``write_cell_table`` writes ``cells.csv``: one row per observed (cell, service) with
``row, col, service, n_observed, mae, mean, rel_mae, coverage_<level>``. ``plot_cell_maps``
writes ``map_<service>.png`` per service: panels for MAE (original units), MAE relative to the
cell's mean test value (percent) and the coverage of each nominal level (white at the nominal
value, red below, blue above, on a scale symmetric around it). Cells without an observed
target are grey.

Geometry: with a grid GeoJSON (``properties.cellId`` + square polygons, the Telecom Italia
grid files) each cell is drawn as its real square in longitude/latitude; grid cell (r, c)
sits at raster position (r + crop row, c + crop col) of the file (the grid's ``meta["crop"]``,
set by ``data prepare`` and ``data import --origin``), placed the way ``data prepare`` places
squares (:func:`simmstnet.data.telecom_italia.raster_from_geojson`). Otherwise the raster is
drawn with row 0 at the bottom (south on the Telecom Italia raster).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from simmstnet.errors import UserError
from simmstnet.utils import atomic_path


def write_cell_table(cells: dict, path: str | Path) -> Path:
    """``cells`` as from :meth:`IntervalAccumulator.cell_table`; one CSV row per observed cell and service."""
    import pandas as pd

    from simmstnet.eval.intervals import level_tag

    n = cells["n"]
    rows = []
    for c, s in enumerate(cells["services"]):
        rr, cc = np.nonzero(n[..., c] > 0)
        part = {"row": rr, "col": cc, "service": s, "n_observed": n[rr, cc, c].astype(np.int64),
                "mae": cells["mae"][rr, cc, c], "mean": cells["mean"][rr, cc, c],
                "rel_mae": cells["rel_mae"][rr, cc, c]}
        for k, lv in enumerate(cells["levels"]):
            part[f"coverage_{level_tag(lv)}"] = cells["coverage"][k][rr, cc, c]
        rows.append(pd.DataFrame(part))
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    path = Path(path)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path


def _polygons(geojson: str | Path, meta: dict, shape: tuple[int, int]) -> list[np.ndarray | None]:
    """Polygon (n, 2) lon/lat of every grid cell in row-major order (None where the file has none)."""
    from simmstnet.data.telecom_italia import _read_grid_polygons, raster_from_geojson

    ids, rows, cols, Hr, Wr = raster_from_geojson(geojson)
    ids2, rings = _read_grid_polygons(Path(geojson))
    ring_of = dict(zip(ids2.tolist(), rings))
    at = {(int(r), int(c)): int(i) for i, r, c in zip(ids, rows, cols)}
    crop = meta.get("crop") or {"rows": [0, shape[0]], "cols": [0, shape[1]]}
    r0, c0 = int(crop["rows"][0]), int(crop["cols"][0])
    if r0 + shape[0] > Hr or c0 + shape[1] > Wr:
        raise UserError(f"--geojson {geojson}: its {Hr}x{Wr} raster does not hold this {shape[0]}x{shape[1]} "
                        f"grid at row {r0}, col {c0} (meta crop)")
    out = []
    for r in range(shape[0]):
        for c in range(shape[1]):
            cid = at.get((r + r0, c + c0))
            out.append(ring_of.get(cid) if cid is not None else None)
    return out


def _panel(ax, fig, data: np.ndarray, title: str, cmap: str, polys, vmin=None, vmax=None, extend="neither"):
    import matplotlib.colors as mcolors
    from matplotlib.ticker import MaxNLocator

    finite = data[np.isfinite(data)]
    if vmin is None:
        vmin = float(finite.min()) if finite.size else 0.0
    if vmax is None:
        vmax = float(finite.max()) if finite.size else 1.0
    if vmax <= vmin:
        vmax = vmin + 1e-9
    norm = mcolors.Normalize(vmin, vmax)
    cm = __import__("matplotlib").colormaps[cmap].with_extremes(bad="#dddddd")
    if polys is None:
        im = ax.imshow(np.ma.masked_invalid(data), origin="lower", cmap=cm, norm=norm, interpolation="nearest")
        ax.set_xlabel("col")
        ax.set_ylabel("row")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        from matplotlib.collections import PolyCollection

        vals = data.ravel()
        keep = [i for i, p in enumerate(polys) if p is not None]
        im = PolyCollection([polys[i] for i in keep], array=np.ma.masked_invalid(vals[keep]), cmap=cm, norm=norm,
                            edgecolors="white", linewidths=0.3)
        ax.add_collection(im)
        ax.autoscale_view()
        lat = np.mean([polys[i][:, 1].mean() for i in keep]) if keep else 0.0
        ax.set_aspect(1.0 / max(np.cos(np.deg2rad(lat)), 1e-6))
        ax.set_xlabel("longitude")
        ax.set_ylabel("latitude")
        ax.xaxis.set_major_locator(MaxNLocator(3))
        ax.yaxis.set_major_locator(MaxNLocator(4))
        ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, extend=extend)


def plot_cell_maps(cells: dict, folder: str | Path, meta: dict | None = None, geojson: str | Path | None = None,
                   title: str = "") -> list[Path]:
    """``map_<service>.png`` in ``folder`` (see the module docstring); returns the paths."""
    from simmstnet.eval.intervals import level_tag
    from simmstnet.eval.plots import _pyplot, _save

    plt = _pyplot()
    folder = Path(folder)
    n = cells["n"]
    polys = _polygons(geojson, meta or {}, n.shape[:2]) if geojson is not None else None
    levels: Sequence[float] = cells["levels"]
    paths = []
    for c, s in enumerate(cells["services"]):
        k = 2 + len(levels)
        fig, axes = plt.subplots(1, k, figsize=(3.9 * k, 3.4), squeeze=False)
        _panel(axes[0][0], fig, cells["mae"][..., c], f"{s}: test MAE per cell", "viridis", polys)
        _panel(axes[0][1], fig, 100 * cells["rel_mae"][..., c], f"{s}: MAE / cell mean (%)", "magma", polys)
        for j, lv in enumerate(levels):
            # Symmetric around the nominal level (white), red below, blue above.
            _panel(axes[0][2 + j], fig, 100 * cells["coverage"][j][..., c],
                   f"{s}: coverage of the {level_tag(lv)} % interval", "RdBu", polys,
                   vmin=max(0.0, 200 * lv - 100), vmax=100.0, extend="min")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        paths.append(_save(fig, folder / f"map_{s}.png"))
        plt.close(fig)
    return paths


def pick_cells(cells: dict, service_index: int) -> dict[str, tuple[int, int]]:
    """Best, median and worst observed cell of a service by relative MAE (MAE / mean)."""
    rel = cells["rel_mae"][..., service_index]
    rr, cc = np.nonzero(np.isfinite(rel))
    if rr.size == 0:
        return {}
    order = np.argsort(rel[rr, cc], kind="stable")
    pick = {"best": order[0], "median": order[order.size // 2], "worst": order[-1]}
    return {k: (int(rr[i]), int(cc[i])) for k, i in pick.items()}


def cell_bands(model, ds, cal, row: int, col: int, horizon_step: int = 1, batch_size: int = 256, device="cpu",
               amp: bool = True, method: str | None = None):
    """One cell over the dataset's span at one horizon step: ``(target_time_index (N,), truth
    (N, C), forecast (N, C), lower (K, N, C), upper (K, N, C))``, original units, truth NaN where
    unobserved; bands by ``method`` (default the calibration's: per-cell ACI replays the cell's
    own forecasts in time order, split uses the calibrated quantiles)."""
    from simmstnet.eval.forecast import forecast_batches
    from simmstnet.eval.intervals import AciBuffer

    method = method or cal.method
    start, rows, cols = ds.window_info(np.arange(len(ds)))
    pick = np.flatnonzero((rows == row) & (cols == col))
    pick = pick[np.argsort(start[pick], kind="stable")]
    parts = []
    for batch, pred in forecast_batches(model, ds, pick, batch_size, device, amp):
        s, r, c = ds.window_info(batch["index"])
        parts.append((s, r, c, ds.scaler.inverse(pred.double()).numpy(), batch["y_raw"].double().numpy(),
                      batch["y_mask"].numpy()))
    K, C = len(cal.levels), ds.n_services
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, C)), np.zeros((0, C)), np.zeros((K, 0, C)), np.zeros((K, 0, C))
    s, r, c, p, y, m = (np.concatenate(a) for a in zip(*parts))
    if method == "aci":
        buf = AciBuffer(cal, per_cell=True, keep_bounds=True)
        buf.update(s, r, c, p, y, m)
        res = buf.finish(None)
        lower, upper = res["lower"], res["upper"]   # already in start order (s is sorted)
    else:
        lower, upper = cal.bounds(p, r, c)
    h = horizon_step - 1
    truth = np.where(m[:, h], y[:, h], np.nan)
    return s + ds.input_len + h, truth, p[:, h], lower[:, :, h], upper[:, :, h]


def plot_interval_cells(model, ds, cal, cells: dict, path_for, batch_size: int = 256, device="cpu",
                        amp: bool = True, label: str = "model", horizon_step: int = 1,
                        method: str | None = None) -> list[Path]:
    """``path_for(service)``: a figure with the best, median and worst cell (relative MAE) of each
    service over the dataset's span: truth black, forecast red, interval bands shaded."""
    import datetime as dt
    from zoneinfo import ZoneInfo

    from simmstnet.eval.intervals import level_tag
    from simmstnet.eval.plots import _pyplot, _save

    plt = _pyplot()
    g = ds.grid
    tz = ZoneInfo(g.timezone)
    method = method or cal.method
    paths = []
    for c, s in enumerate(ds.services):
        chosen = pick_cells(cells, c)
        if not chosen:
            continue
        fig, axes = plt.subplots(len(chosen), 1, figsize=(9, 2.4 * len(chosen)), squeeze=False)
        for ax, (which, (r, k)) in zip(axes[:, 0], chosen.items()):
            t_idx, truth, fc, lower, upper = cell_bands(model, ds, cal, r, k, horizon_step, batch_size, device, amp,
                                                        method)
            times = [dt.datetime.fromtimestamp(int(g.timestamps[i]), tz).replace(tzinfo=None) for i in t_idx]
            order = np.argsort(cal.levels)[::-1]
            for j, lvl_i in enumerate(order):
                ax.fill_between(times, lower[lvl_i, :, c], upper[lvl_i, :, c], color="tab:red",
                                alpha=0.15 + 0.15 * j, lw=0, label=f"{level_tag(cal.levels[lvl_i])} % interval")
            ax.plot(times, truth[:, c], color="black", lw=1.1, label="ground truth")
            ax.plot(times, fc[:, c], color="red", lw=0.9, label=label)
            rel = cells["rel_mae"][r, k, c]
            ax.set_title(f"{s}: {which} cell (row {r}, col {k}), MAE/mean {100 * rel:.1f} %, "
                         f"horizon step {horizon_step}, {method} intervals", fontsize=9)
            ax.tick_params(labelsize=7)
        axes[0][0].legend(fontsize=7, loc="upper right")
        fig.autofmt_xdate()
        fig.tight_layout()
        paths.append(_save(fig, path_for(s)))
        plt.close(fig)
    return paths
