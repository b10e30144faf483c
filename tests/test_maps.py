"""Per-cell maps and tables: one value per observed cell, raster and GeoJSON geometry."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from simmstnet.errors import UserError
from simmstnet.eval.intervals import IntervalAccumulator
from simmstnet.eval.maps import pick_cells, plot_cell_maps, write_cell_table


def _cells(Hg=3, Wg=4, dead=(1, 2), seed=0):
    """Cell statistics of a made-up test span; cell ``dead`` is never observed."""
    rng = np.random.default_rng(seed)
    acc = IntervalAccumulator(("call", "net"), (0.8, 0.95), (Hg, Wg))
    rows, cols = np.meshgrid(np.arange(Hg), np.arange(Wg), indexing="ij")
    rows, cols = np.tile(rows.ravel(), 20), np.tile(cols.ravel(), 20)
    level = 1 + 10 * rows + cols
    pred = np.repeat(level[:, None, None].astype(float), 2, axis=2).repeat(3, axis=1)
    y = pred + rng.standard_normal(pred.shape)
    mask = np.ones(y.shape, bool)
    mask[(rows == dead[0]) & (cols == dead[1])] = False
    lower = np.stack([pred - 1.28, pred - 1.96])
    upper = np.stack([pred + 1.28, pred + 1.96])
    acc.update(pred, y, mask, lower, upper, rows, cols)
    return acc.cell_table()


def test_cell_table_has_one_row_per_observed_cell_and_service(tmp_path):
    cells = _cells()
    path = write_cell_table(cells, tmp_path / "cells.csv")
    df = pd.read_csv(path)
    assert len(df) == 2 * (3 * 4 - 1)  # the dead cell has no row
    assert not ((df["row"] == 1) & (df["col"] == 2)).any()
    assert not df.duplicated(["row", "col", "service"]).any()
    np.testing.assert_allclose(df["rel_mae"], df["mae"] / df["mean"])
    assert df["coverage_80"].between(0, 1).all() and (df["coverage_80"] <= df["coverage_95"]).all()
    assert (df["n_observed"] == 60).all()


def test_raster_maps_exist_and_hold_one_value_per_observed_cell(tmp_path):
    cells = _cells()
    paths = plot_cell_maps(cells, tmp_path, {"source": "test"}, title="test")
    assert [p.name for p in paths] == ["map_call.png", "map_net.png"]
    for p in paths:
        assert p.stat().st_size > 1000
    # What is drawn: finite exactly on the observed cells.
    for key in ("mae", "rel_mae"):
        finite = np.isfinite(cells[key][..., 0])
        assert finite.sum() == 11 and not finite[1, 2]
    assert np.isfinite(cells["coverage"][0][..., 1]).sum() == 11


def _geojson(path, H0=6, W0=7, side=0.003):
    """A small lon/lat grid of squares, cellId = W0 * row + col + 1, row 0 in the south."""
    feats = []
    for r in range(H0):
        for c in range(W0):
            x, y = 9.0 + c * side, 45.4 + r * side
            ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
            feats.append({"type": "Feature", "properties": {"cellId": W0 * r + c + 1},
                          "geometry": {"type": "Polygon", "coordinates": [ring]}})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def test_geojson_maps_place_cells_by_the_crop(tmp_path, monkeypatch):
    from simmstnet.eval import maps

    geo = _geojson(tmp_path / "grid.geojson")
    cells = _cells()
    meta = {"crop": {"rows": [2, 5], "cols": [1, 5]}}
    polys = maps._polygons(geo, meta, (3, 4))
    assert len(polys) == 12 and all(p is not None for p in polys)
    # Grid cell (0, 0) is raster (2, 1): the square with its south-west corner there.
    np.testing.assert_allclose(polys[0].min(0), [9.0 + 1 * 0.003, 45.4 + 2 * 0.003], atol=1e-9)
    paths = plot_cell_maps(cells, tmp_path / "geo", meta, geojson=geo)
    assert all(p.stat().st_size > 1000 for p in paths)
    with pytest.raises(UserError, match="does not hold"):
        maps._polygons(geo, {"crop": {"rows": [5, 8], "cols": [0, 4]}}, (3, 4))


def test_pick_cells_best_median_worst():
    cells = _cells()
    chosen = pick_cells(cells, 0)
    rel = cells["rel_mae"][..., 0]
    assert rel[chosen["best"]] == np.nanmin(rel) and rel[chosen["worst"]] == np.nanmax(rel)
    assert np.nanmin(rel) <= rel[chosen["median"]] <= np.nanmax(rel)


@pytest.mark.skipif(not (__import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"
                         / "telecom-italia" / "milano-grid.geojson").is_file(),
                    reason="../shared/data is absent")
def test_milano_geojson_block_geometry(tmp_path):
    """The real Milano grid file: the 5x5 block at raster rows/cols 41..45 lands on the
    squares cellId = 100 row + col + 1."""
    from pathlib import Path

    from simmstnet.data.telecom_italia import _read_grid_polygons
    from simmstnet.eval import maps

    geo = Path(__file__).resolve().parents[2] / "shared" / "data" / "telecom-italia" / "milano-grid.geojson"
    polys = maps._polygons(geo, {"crop": {"rows": [41, 46], "cols": [41, 46]}}, (5, 5))
    ids, rings = _read_grid_polygons(geo)
    ring = dict(zip(ids.tolist(), rings))
    np.testing.assert_allclose(polys[0], ring[100 * 41 + 41 + 1])
    np.testing.assert_allclose(polys[24], ring[100 * 45 + 45 + 1])


def test_demo_report_lists_interval_figures():
    from simmstnet.demo import _interval_lines

    block = {"coverage_80": 0.79, "width_80": 10.0, "coverage_95": 0.94, "width_95": 20.0, "winkler_95": 30.0,
             "crps": 2.5}
    metrics = {"intervals": {"method": "aci", "levels": [0.8, 0.95], "test": {"net": block, "overall": block}}}
    lines = _interval_lines(metrics, ["net"])
    assert any("aci conformal" in ln for ln in lines)
    row = next(ln for ln in lines if ln.startswith("| net |"))
    assert "79.0 %" in row and "94.0 %" in row and "| 30 |" in row
    assert _interval_lines({}, ["net"]) == []


def test_bench_tables_show_interval_columns_when_runs_have_them():
    from pathlib import Path

    from simmstnet.eval import benchmark as B

    iv = {"test": {"overall": {"coverage_80": 0.79, "coverage_95": 0.94, "width_95": 12.0, "winkler_95": 20.0}}}
    runs = {"a": [B.RunResult("a", 0, Path("."), "trained",
                              {"test": {"net": {"mae": 1.0, "rmse": 2.0}, "overall": {"mae": 1.0}},
                               "train_seconds": 1.0, "intervals": iv})]}
    rows = B.aggregate([B.Method("a", "A", "lstm")], runs, ["net"])
    assert rows[0]["coverage_80_mean"] == pytest.approx(79.0) and rows[0]["winkler_95_mean"] == 20.0
    md = B.render_markdown("table1", rows, ["net"], ["- protocol line"])
    assert "cov 80 % | cov 95 % | width 95 | Winkler 95 |" in md
    assert md.rstrip().endswith("| 79 | 94 | 12 | 20 |")
