"""Diagnostics of sim2real reweighting written to the run folder.

* ``sim2real_history.csv``   one row per epoch: G (real loss), h, planes, duals, weight stats;
* ``sim2real_weights.npz``   the final weight of every simulated window (+ scenario ids);
* ``sim2real_report.json``   :func:`weights_report` (summary and mean weight per scenario);
* ``sim2real_weights.png``   histogram of the weights, and mean weight per simulated
  scenario against one simulator parameter.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from simmstnet.errors import UserError
from simmstnet.utils import atomic_path


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def weights_report(weights, scenario_ids=None,
                   scenario_params: Optional[Mapping[str, Sequence[float]]] = None) -> dict:
    """Summary of the simulated-window weights, overall and per simulated scenario.

    weights: (N,) (NaN = never weighted, e.g. a window l2rw never saw; left out of the stats);
    scenario_ids: optional (N,) int, the scenario each window was simulated under;
    scenario_params: optional ``{name: (n_scenarios,) values}`` indexed by scenario id.
    Returns a JSON-serializable dict: ``n``, ``mean``, ``std``, quantiles, ``histogram`` (20 bins
    over [min, max]) and, with scenario ids, ``scenarios``: a list of
    ``{"id", "n", "mean_weight", <param>: value...}``.
    """
    w = _as_numpy(weights).astype(np.float64).reshape(-1)
    seen = ~np.isnan(w)
    ws = w[seen]
    out: dict = {"n": int(w.size), "n_weighted": int(seen.sum())}
    if ws.size:
        q = np.quantile(ws, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
        counts, edges = np.histogram(ws, bins=20)
        out.update(mean=float(ws.mean()), std=float(ws.std()),
                   quantiles=dict(zip(["min", "p10", "p25", "median", "p75", "p90", "max"],
                                      map(float, q))),
                   histogram={"counts": counts.tolist(), "edges": edges.tolist()})
    if scenario_ids is not None:
        sid = _as_numpy(scenario_ids).astype(np.int64).reshape(-1)
        if sid.shape != w.shape:
            raise UserError(f"scenario ids: {sid.size} entries for {w.size} simulated windows")
        params = {k: _as_numpy(v).reshape(-1) for k, v in (scenario_params or {}).items()}
        rows = []
        for s in np.unique(sid):
            m = (sid == s) & seen
            row = {"id": int(s), "n": int(m.sum()),
                   "mean_weight": float(w[m].mean()) if m.any() else None}
            for name, vals in params.items():
                if s >= vals.size:
                    raise UserError(f"scenario parameter {name!r} has {vals.size} values; "
                                    f"scenario id {int(s)} is out of range")
                row[name] = float(vals[s])
            rows.append(row)
        out["scenarios"] = rows
    return out


def plot_weights(folder, weights, scenario_ids=None,
                 scenario_params: Optional[Mapping[str, Sequence[float]]] = None,
                 param: Optional[str] = None, name: str = "sim2real_weights.png") -> Path:
    """Save the weight histogram and (with scenarios) mean weight per scenario against
    ``param`` (default: the first parameter) as one PNG in ``folder``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    rep = weights_report(weights, scenario_ids, scenario_params)
    scen = rep.get("scenarios") or []
    if param is None and scenario_params:
        param = next(iter(scenario_params))
    if param is not None and scenario_params is not None and param not in scenario_params:
        raise UserError(f"scenario parameter {param!r} not found; have {', '.join(scenario_params)}")
    with_scen = bool(scen) and param is not None
    fig, axes = plt.subplots(1, 2 if with_scen else 1, figsize=(10 if with_scen else 5, 3.6),
                             squeeze=False)
    w = _as_numpy(weights).astype(np.float64).reshape(-1)
    axes[0, 0].hist(w[~np.isnan(w)], bins=40, color="tab:blue")
    axes[0, 0].set_xlabel("weight of simulated window")
    axes[0, 0].set_ylabel("windows")
    axes[0, 0].set_title("weight distribution")
    if with_scen:
        xs = [r[param] for r in scen if r["mean_weight"] is not None]
        ys = [r["mean_weight"] for r in scen if r["mean_weight"] is not None]
        axes[0, 1].scatter(xs, ys, s=14, color="tab:orange")
        axes[0, 1].set_xlabel(param)
        axes[0, 1].set_ylabel("mean weight of scenario")
        axes[0, 1].set_title("mean weight per simulated scenario")
    fig.tight_layout()
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def write_history(folder, history: Sequence[Mapping], name: str = "sim2real_history.csv") -> Path:
    """One CSV row per epoch summary (``Reweighter.end_epoch()`` dicts); list-valued fields
    (the duals) are written space-separated."""
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    path = Path(folder) / name
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["epoch"] + keys)
            writer.writeheader()
            for e, row in enumerate(history):
                flat = {k: (" ".join(f"{x:.6g}" for x in v) if isinstance(v, (list, tuple)) else v)
                        for k, v in row.items()}
                writer.writerow({"epoch": e, **flat})
    return path


def write_diagnostics(folder, history: Sequence[Mapping], weights, scenario_ids=None,
                      scenario_params: Optional[Mapping[str, Sequence[float]]] = None,
                      param: Optional[str] = None) -> dict:
    """Write all four diagnostics files into ``folder``; returns {kind: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"history": write_history(folder, history)}
    w = _as_numpy(weights).astype(np.float32).reshape(-1)
    arrays = {"weights": w}
    if scenario_ids is not None:
        arrays["scenario_ids"] = _as_numpy(scenario_ids).astype(np.int64).reshape(-1)
    paths["weights"] = folder / "sim2real_weights.npz"
    with atomic_path(paths["weights"]) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    rep = weights_report(w, scenario_ids, scenario_params)
    paths["report"] = folder / "sim2real_report.json"
    with atomic_path(paths["report"]) as tmp:
        tmp.write_text(json.dumps(rep, indent=1, allow_nan=False))
    paths["plot"] = plot_weights(folder, w, scenario_ids, scenario_params, param)
    return paths
