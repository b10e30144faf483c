"""Paper tables and Figure 2, measured side by side: ``simmstnet bench table1|table2|table3|fig2``.

Every method of a table is trained and evaluated in one invocation on the same data file, the
same chronological split, the same windows and the same seeds; each (method, seed) is an
ordinary run folder ``OUT/<table>/<method>/seed<k>/`` written by the
:class:`~simmstnet.train.trainer.Trainer` (config.yaml, best.pt, metrics.json, ...).

Tables (methods are addressed by key, see :func:`table_methods`):

- ``table1``: single-task forecasting of the ``net`` service: every registered single-task
  baseline, the naive references, the single-task Sim-MSTNet network (``stnet``) on real data
  only, and ``stnet`` trained with sim2real (``sim2real.mode=bilevel``, simulated source from
  ``--sim``);
- ``table2``: multi-task Call/SMS/Net: MTTC, AST-MTL, CSLSL and Sim-MSTNet;
- ``table3``: Sim-MSTNet ablations: without interaction, without spatial branch, average
  (static) loss weighting, full model (the full model's runs are table2's Sim-MSTNet runs when
  those exist with the identical config, so they are not trained twice);
- ``fig2``: forecast against truth per service on one cell over the test span, for Sim-MSTNet
  and the best other multi-task model of table2 by overall test MAE (table2 runs are reused).

Outputs per table in ``OUT/<table>/``: ``<table>.md`` (protocol, then the table: mean ± sample
standard deviation over seeds of test MAE and RMSE per service and training seconds, the best
mean per metric column in bold), ``<table>.csv`` (one row per method) and ``runs.csv`` (one row
per finished run). A finished run folder (``metrics.json`` present) is reused, not retrained; a
folder with ``last.pt`` but no ``metrics.json`` (interrupted) is resumed; so an interrupted
bench simply continues when started again.

Profiles (``--profile quick|full|test`` or a YAML path) are ``src/simmstnet/configs/bench-<name>.yaml``::

    description: one line
    common:          # experiment keys for every run (sections data, train, model)
      train: {epochs: 5}
    models:          # per model name: more keys, applied after common
      sim-mstnet: {model: {d_model: 16}}

A method whose run fails with a :class:`~simmstnet.errors.UserError` (e.g. a seasonal naive
whose period exceeds the input window, or a sim2real mode not built yet) is reported as
"n/a" with the reason; other errors are reported the same way with the traceback saved beside
the run folder, so one broken method does not lose the others.
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from simmstnet.errors import UserError
from simmstnet.utils import atomic_path

TABLES = ("table1", "table2", "table3", "fig2")
NAIVE = ("last-value", "seasonal-naive-day", "seasonal-naive-week", "historical-average")
# Linear references every table carries beside the learned models (a learned model that loses
# to them must show it): closed-form ridge autoregression, NLinear, DLinear.
LINEAR = ("ridge", "nlinear", "dlinear")
# The classical statistical reference (statsforecast MSTL profile + AutoETS level, per series).
CLASSICAL = ("mstl",)
# References whose forecast does not depend on the seed (no random initialization, no sampling):
# trained once, at seed 0, and that run stands for every seed of the table.
DETERMINISTIC = (*NAIVE, "ridge", *CLASSICAL)
MULTI_SERVICES = ("call", "sms", "net")
# Shipped profiles live inside the package, so an installed (non-editable) package has them too.
PROFILE_DIR = Path(__file__).resolve().parents[1] / "configs"
PROFILE_KEYS = ("description", "common", "models")


# ----------------------------------------------------------------------------- methods


@dataclass
class Method:
    """One row of a table: a model name plus the config keys that make it that row."""

    key: str                      # folder name and --methods key
    label: str                    # row label in the table
    model: str                    # registered model name (selects the profile's per-model keys)
    overrides: list[str] = field(default_factory=list)  # extra KEY=VALUE after the profile
    needs_sim: bool = False       # sim2real row: needs --sim
    same_as: tuple[str, str] | None = None  # (table, key) whose runs are identical by construction


def table_methods(table: str, registered: list[tuple[str, bool, str]] | None = None) -> list[Method]:
    """The rows of ``table`` in display order (only models that are registered)."""
    if registered is None:
        from simmstnet.models.registry import list_models

        registered = list_models()
    names = {name: multitask for name, multitask, _ in registered}
    refs = [Method(n, n, n) for n in (*NAIVE, *LINEAR, *CLASSICAL) if n in names]
    if table == "table1":
        rows = list(refs)
        rows += [Method(n, n, n) for n, mt, _ in registered
                 if not mt and n not in NAIVE and n != "stnet"]
        if "stnet" in names:
            rows.append(Method("stnet", "Sim-MSTNet single-task (real only)", "stnet"))
            rows.append(Method("stnet-sim2real", "Sim-MSTNet single-task + sim2real (bilevel)", "stnet",
                               ["sim2real.mode=bilevel"], needs_sim=True))
        return rows
    if table == "table2":
        wanted = [("mttc", "MTTC"), ("ast-mtl", "AST-MTL"), ("cslsl", "CSLSL"), ("sim-mstnet", "Sim-MSTNet")]
        return refs + [Method(k, label, k) for k, label in wanted if k in names]
    if table == "table3":
        if "sim-mstnet" not in names:
            return []
        return [*(Method(m.key, m.label, m.model, same_as=("table2", m.key)) for m in refs),
                Method("no-interaction", "w/o interaction", "sim-mstnet", ["model.interaction=false"]),
                Method("no-spatial", "w/o spatial branch", "sim-mstnet", ["model.spatial=false"]),
                Method("average-weighting", "average loss weighting", "sim-mstnet",
                       ["train.loss_weighting=average"]),
                Method("fusion-shift", "z added to every memory step (fusion=shift)", "sim-mstnet",
                       ["model.fusion=shift"]),
                Method("no-highway", "w/o linear highway", "sim-mstnet", ["model.highway=false"]),
                Method("no-season", "w/o seasonal history (data.season_days=0)", "sim-mstnet",
                       ["data.season_days=0"]),
                Method("global-norm", "global scaling only (norm=none)", "sim-mstnet", ["model.norm=none"]),
                Method("full", "Sim-MSTNet (full)", "sim-mstnet", same_as=("table2", "sim-mstnet"))]
    raise UserError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}")


def services_for(table: str) -> list[str]:
    return ["net"] if table == "table1" else list(MULTI_SERVICES)


# ----------------------------------------------------------------------------- profiles


@dataclass
class Profile:
    name: str
    path: Path
    description: str
    common: dict
    models: dict


def find_profile(name_or_path: str) -> Path:
    """``quick`` -> bench-quick.yaml shipped in ``simmstnet/configs`` (then ``./configs``); or a path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise UserError(f"{p}: no such profile file")
        return p
    for folder in (PROFILE_DIR, Path.cwd() / "configs"):
        cand = folder / f"bench-{name_or_path}.yaml"
        if cand.is_file():
            return cand
    raise UserError(f"--profile {name_or_path!r}: no configs/bench-{name_or_path}.yaml "
                    f"(use quick, full, test or a YAML file)")


def load_profile(name_or_path: str) -> Profile:
    """Read and check a profile: unknown top-level keys, or bad experiment keys, raise UserError."""
    from simmstnet.config import apply_mapping, read_yaml, ExperimentConfig

    path = find_profile(name_or_path)
    data = read_yaml(path)
    for key in data:
        if key not in PROFILE_KEYS:
            raise UserError(f"{path}: unknown profile key {key!r}; known keys: {', '.join(PROFILE_KEYS)}")
    common = data.get("common") or {}
    models = data.get("models") or {}
    if not isinstance(common, dict):
        raise UserError(f"{path}: 'common' must be a mapping of config sections")
    if not isinstance(models, dict) or not all(isinstance(v, dict) or v is None for v in models.values()):
        raise UserError(f"{path}: 'models' must map model names to mappings of config sections")
    # Check the keys now (type errors name the file), before hours of training start.
    apply_mapping(ExperimentConfig(), common, f"{path} (common)")
    for name, mapping in models.items():
        if mapping and "out" in mapping:
            raise UserError(f"{path}: models.{name}: 'out' is set by the bench, not the profile")
        apply_mapping(ExperimentConfig(), mapping or {}, f"{path} (models.{name})")
    name = path.stem.removeprefix("bench-")
    return Profile(name, path, str(data.get("description") or ""), common, {k: v or {} for k, v in models.items()})


def run_config(profile: Profile, method: Method, table: str, data: str, seed: int, out: Path,
               sim: str | None = None, extra: list[str] = ()):
    """The experiment config of one (method, seed): defaults < profile common < profile per-model
    < the table's fixed keys (data, services, model, seed, method keys) < ``extra`` (--set)."""
    from simmstnet.config import ExperimentConfig, apply_mapping, load_config

    base = ExperimentConfig()
    apply_mapping(base, profile.common, f"{profile.path} (common)")
    apply_mapping(base, profile.models.get(method.model, {}), f"{profile.path} (models.{method.model})")
    # Set as values, not KEY=VALUE text: a path is never read as YAML.
    fixed: dict[str, Any] = {"data": {"path": str(data), "services": services_for(table)},
                             "model": {"name": method.model}, "train": {"seed": seed}, "out": str(out)}
    if method.needs_sim and sim is not None:
        fixed["sim2real"] = {"sim_data": str(sim)}
    apply_mapping(base, fixed, "bench")
    # `base` only ever holds this model's options (the profile's per-model keys), so the
    # model's own config can judge them in load_config.
    return load_config(None, [*method.overrides, *extra], base=base)


# ----------------------------------------------------------------------------- running


@dataclass
class RunResult:
    method: str
    seed: int
    folder: Path
    status: str                   # "trained", "reused", "n/a"
    metrics: dict | None = None
    reason: str = ""
    seconds: float = 0.0          # wall time of this bench step (0 when reused)


def _config_key(cfg) -> dict:
    from simmstnet.config import config_to_dict

    d = config_to_dict(cfg)
    d.pop("out", None)
    d["train"].pop("resume", None)
    return d


def _season_key(cfg, stored: bool) -> int:
    """data.season_days as a run used it: a stored null is a run from before the option (0); a
    null in a new config is the model's default (the grid-step exception aside)."""
    from simmstnet.models.registry import resolve_season_days

    if stored and cfg.data.season_days is None:
        return 0
    return resolve_season_days(cfg.model.name, cfg.data.season_days, None, cfg.data.horizon)


def _finished(folder: Path) -> dict | None:
    f = folder / "metrics.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _same_config(folder: Path, cfg) -> bool:
    """True when ``folder``'s config.yaml equals ``cfg`` except for ``out``."""
    from simmstnet.config import load_config

    try:
        other = load_config(folder / "config.yaml", check_model=False)
    except UserError:
        return False
    a, b = _config_key(other), _config_key(cfg)
    a["data"]["season_days"], b["data"]["season_days"] = _season_key(other, True), _season_key(cfg, False)
    return a == b


class Bench:
    """Runs the methods of one or more tables; see the module docstring.

    Args:
        data: TrafficGrid .npz of the target; sim: simulated source for the sim2real row.
        out: the bench folder; seeds: number of seeds (0 .. seeds-1); profile: a :class:`Profile`.
        methods: restrict to these method keys (None = all); extra: KEY=VALUE for every run.
        log: one-line progress messages; verbose: show the trainer's own bars and epoch lines.
    """

    def __init__(self, data: str, out: str | Path, seeds: int, profile: Profile, sim: str | None = None,
                 methods: list[str] | None = None, extra: list[str] = (), verbose: bool = False,
                 log: Callable[[str], None] | None = None):
        if seeds < 1:
            raise UserError(f"--seeds must be at least 1, got {seeds}")
        self.data, self.sim, self.out = str(data), sim, Path(out)
        self.seeds, self.profile, self.methods = seeds, profile, methods
        self.extra, self.verbose = list(extra), verbose
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.t0 = time.perf_counter()
        self._services: tuple[str, ...] | None = None
        self.done: dict[str, dict] = {}  # table -> result of run_table in this invocation

    # ------------------------------------------------------------------ checks
    def grid_services(self) -> tuple[str, ...]:
        if self._services is None:
            from simmstnet.data.grid import TrafficGrid

            self._services = tuple(TrafficGrid.load(self.data).services)
        return self._services

    def check_data(self, table: str) -> None:
        have = self.grid_services()
        need = services_for(table if table != "fig2" else "table2")
        missing = [s for s in need if s not in have]
        if missing:
            raise UserError(f"{self.data}: no service {missing[0]!r} (the file has {', '.join(have)}); "
                            f"{table} needs {', '.join(need)}")

    def selected(self, table: str) -> list[Method]:
        rows = table_methods(table)
        if self.methods is None:
            return rows
        known = {m.key for t in ("table1", "table2", "table3") for m in table_methods(t)}
        unknown = [k for k in self.methods if k not in known]
        if unknown:
            raise UserError(f"--methods: unknown method {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return [m for m in rows if m.key in self.methods]

    # ------------------------------------------------------------------ one run
    def run_one(self, table: str, method: Method, seed: int) -> RunResult:
        from simmstnet.train.trainer import Trainer

        folder = self.out / table / method.key / f"seed{seed}"
        where = f"[{table}] {method.key} seed {seed}"
        if method.needs_sim and self.sim is None:
            return self._na(where, method, seed, folder, "no simulated source given (--sim FILE)")
        try:
            cfg = run_config(self.profile, method, table, self.data, seed, folder, self.sim, self.extra)
        except UserError as exc:
            return self._na(where, method, seed, folder, str(exc))
        done = _finished(folder)
        if done is not None:
            # Same folder, other keys (profile or --set changed): say so rather than mix protocols.
            warn = "" if _same_config(folder, cfg) else " WARNING: its config differs from this invocation's"
            self.log(f"{where}: reused finished run {folder}{warn} (elapsed {self.elapsed()})")
            return RunResult(method.key, seed, folder, "reused", done)
        if seed > 0 and method.model in DETERMINISTIC and not method.overrides:
            first = self.run_one(table, method, 0)
            if first.status != "n/a":
                self.log(f"{where}: the seed-0 run stands for it ({method.key} does not depend on the seed)")
                return RunResult(method.key, seed, first.folder, "reused", first.metrics)
            return RunResult(method.key, seed, first.folder, "n/a", None, first.reason)
        if method.same_as is not None:
            other = self.out / method.same_as[0] / method.same_as[1] / f"seed{seed}"
            done = _finished(other)
            if done is not None and _same_config(other, cfg):
                self.log(f"{where}: reused {other} (identical config) (elapsed {self.elapsed()})")
                return RunResult(method.key, seed, other, "reused", done)
        resume = (folder / "last.pt").is_file()
        t = time.perf_counter()
        try:
            metrics = Trainer(cfg, resume=resume, progress=self.verbose, quiet=not self.verbose).run()
        except KeyboardInterrupt:
            raise
        except UserError as exc:
            return self._na(where, method, seed, folder, str(exc))
        except Exception as exc:  # a bug in one model must not lose the other rows
            folder.parent.mkdir(parents=True, exist_ok=True)
            err = folder.parent / f"seed{seed}.error.txt"
            err.write_text(traceback.format_exc())
            return self._na(where, method, seed, folder, f"{type(exc).__name__}: {exc} (traceback: {err})")
        took = time.perf_counter() - t
        self.log(f"{where}: {'resumed and ' if resume else ''}trained in {took:.1f} s, test MAE "
                 f"{_num(metrics['test']['overall']['mae'])} (elapsed {self.elapsed()})")
        return RunResult(method.key, seed, folder, "trained", metrics, seconds=took)

    def _na(self, where, method, seed, folder, reason) -> RunResult:
        self.log(f"{where}: not available: {reason} (elapsed {self.elapsed()})")
        return RunResult(method.key, seed, folder, "n/a", reason=reason)

    def elapsed(self) -> str:
        s = int(time.perf_counter() - self.t0)
        return f"{s // 60}m{s % 60:02d}s"

    # ------------------------------------------------------------------ tables
    def run_table(self, table: str) -> dict:
        """Run every selected method and seed of ``table``; write its markdown and CSVs."""
        if table == "fig2":
            return self.run_fig2()
        self.check_data(table)
        methods = self.selected(table)
        if not methods:
            raise UserError(f"{table}: no method selected (--methods {','.join(self.methods or [])})")
        t = time.perf_counter()
        results = {m.key: [self.run_one(table, m, k) for k in range(self.seeds)] for m in methods}
        wall = time.perf_counter() - t
        rows = aggregate(methods, results, services_for(table))
        folder = self.out / table
        folder.mkdir(parents=True, exist_ok=True)
        header = self.protocol_lines(table, results, wall)
        md = render_markdown(table, rows, services_for(table), header)
        with atomic_path(folder / f"{table}.md") as tmp:
            tmp.write_text(md)
        write_csv(folder / f"{table}.csv", rows, services_for(table))
        write_runs_csv(folder / "runs.csv", methods, results, services_for(table))
        self.log(f"[{table}] wrote {folder / (table + '.md')} and {table}.csv (table wall time {wall:.0f} s)")
        self.done[table] = {"table": table, "rows": rows, "markdown": md, "wall_seconds": wall, "results": results}
        return self.done[table]

    def protocol_lines(self, table: str, results: dict[str, list[RunResult]], wall: float) -> list[str]:
        proto = None
        for runs in results.values():
            for r in runs:
                if r.metrics is not None:
                    proto = r.metrics.get("protocol")
                    break
            if proto:
                break
        # Each run folder once (a deterministic reference's seed-0 run stands for every seed).
        unique = {r.folder: r for runs in results.values() for r in runs if r.metrics is not None}
        compute = sum(float(r.metrics.get("train_seconds") or 0) + float(r.metrics.get("eval_seconds") or 0)
                      for r in unique.values())
        lines = [f"- data: `{self.data}`" + (f"; simulated source: `{self.sim}`" if self.sim else "")]
        if proto:
            sr = proto.get("split_ranges", {})
            spans = "; ".join(f"{k} targets {v['first_target']} .. {v['last_target']}" for k, v in sr.items())
            lines += [
                f"- services: {', '.join(proto.get('services', []))}; grid step {proto.get('step')}",
                f"- split: {proto.get('split')} (chronological; {spans})",
                f"- windows: input {proto.get('input_len')} steps, label {proto.get('label_len')}, "
                f"horizon {proto.get('horizon')}; test windows {proto.get('windows', {}).get('test')}",
                f"- scaler: {proto.get('scaler')}",
                f"- units: {proto.get('units')}",
                f"- mask rule: {proto.get('mask_rule')}",
            ]
            seasonal = sorted({m for m, runs in results.items() for r in runs if r.metrics is not None
                               and (r.metrics.get("protocol") or {}).get("season_days")})
            if seasonal:
                days = sorted({r.metrics["protocol"]["season_days"] for m in seasonal for r in results[m]
                               if r.metrics is not None and r.metrics["protocol"].get("season_days")})
                lines.append(f"- seasonal history (data.season_days = {', '.join(map(str, days))}): "
                             f"{', '.join(seasonal)} also read each cell's values at the same time on the "
                             f"previous days (the history-based references read the training span or the "
                             f"days before each origin; every other network sees its input window only)")
        else:
            lines.append("- no run finished: the protocol could not be read from a metrics.json")
        lines += [
            f"- seeds: {', '.join(str(k) for k in range(self.seeds))} (train.seed); every method on the same "
            f"data, split, windows and seeds, measured side by side in this run",
            f"- figures: test-span mean ± sample std (ddof=1) over seeds; bold = best mean per metric column",
            "- intervals: split conformal on per-cell scaled residuals, calibrated on the validation span "
            "(docs/intervals.md); cov = test coverage in % of the nominal 80 %/95 % interval, width and "
            "Winkler (interval) score in original units, pooled over the table's services; never bold",
            f"- profile: {self.profile.name} ({self.profile.path.name}: {self.profile.description})"
            + (f"; extra keys: {' '.join(self.extra)}" if self.extra else ""),
            f"- host: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {_torch_threads()}; "
            f"train + final-evaluation seconds summed over the table's runs: {compute:.0f} s; wall time of "
            f"this invocation for the table: {wall:.0f} s (runs reused from an earlier invocation count 0)",
        ]
        return lines

    # ------------------------------------------------------------------ figure 2
    def run_fig2(self, cell: tuple[int, int] | None = None) -> dict:
        """Sim-MSTNet and the best other multi-task model of table2 against truth, per service."""
        self.check_data("fig2")
        # The table2 runs (reused when present); --methods narrows them like for table2 itself.
        t2 = self.done.get("table2") or self.run_table("table2")
        rows = {r["key"]: r for r in t2["rows"]}
        if "sim-mstnet" not in rows or rows["sim-mstnet"]["n"] == 0:
            raise UserError("fig2: Sim-MSTNet has no finished table2 run")
        # The second-best *multi-task network* (the paper's figure); the references are in the table.
        others = [r for k, r in rows.items()
                  if k != "sim-mstnet" and k not in (*NAIVE, *LINEAR, *CLASSICAL) and r["n"] > 0
                  and r["overall_mae_mean"] is not None]
        if not others:
            raise UserError("fig2: no other multi-task model of table2 finished")
        second = min(others, key=lambda r: r["overall_mae_mean"])
        seed_main = next(r for r in t2["results"]["sim-mstnet"] if r.metrics is not None)
        seed_second = next(r for r in t2["results"][second["key"]] if r.metrics is not None)
        folder = self.out / "fig2"
        paths = plot_fig2(seed_main.folder, seed_second.folder, second["label"], folder, cell=cell)
        note = (f"fig2: Sim-MSTNet ({seed_main.folder}) vs {second['label']} ({seed_second.folder}), "
                f"the best other multi-task model by table2 overall test MAE")
        with atomic_path(folder / "fig2.md") as tmp:
            tmp.write_text("# Figure 2: forecast against truth\n\n" + note + "\n\n"
                           + "\n".join(f"![{p.stem}]({p.name})" for p in paths) + "\n")
        self.log(f"[fig2] wrote {len(paths)} figures in {folder}")
        return {"table": "fig2", "paths": paths, "second": second["key"]}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _num(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"


# ----------------------------------------------------------------------------- aggregation


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    mean = float(np.mean(vals))
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return mean, std


def aggregate(methods: list[Method], results: dict[str, list[RunResult]], services: list[str]) -> list[dict]:
    """One dict per method: ``<svc>_<mae|rmse>_mean/_std`` over the finished seeds, ``overall_mae``,
    ``train_seconds``, ``n`` (finished seeds), ``status`` and ``reason`` (first n/a reason)."""
    rows = []
    for m in methods:
        runs = results.get(m.key, [])
        ok = [r for r in runs if r.metrics is not None]
        row: dict[str, Any] = {"key": m.key, "label": m.label, "model": m.model, "n": len(ok),
                               "seeds": [r.seed for r in ok]}
        for s in services:
            for metric in ("mae", "rmse"):
                mean, std = _mean_std([(r.metrics["test"].get(s) or {}).get(metric) for r in ok])
                row[f"{s}_{metric}_mean"], row[f"{s}_{metric}_std"] = mean, std
        row["overall_mae_mean"], row["overall_mae_std"] = _mean_std(
            [r.metrics["test"]["overall"]["mae"] for r in ok])
        for key, _ in INTERVAL_COLUMNS:
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([_interval(r.metrics, key) for r in ok])
        row["train_seconds_mean"], row["train_seconds_std"] = _mean_std([r.metrics.get("train_seconds") for r in ok])
        na = [r for r in runs if r.metrics is None]
        row["status"] = "ok" if not na else ("n/a" if not ok else "partial")
        row["reason"] = na[0].reason if na else ""
        rows.append(row)
    return rows


# Conformal intervals (metrics.json "intervals", test span, pooled over the table's services):
# shown after the point metrics, never bold (a higher coverage is not "better").
INTERVAL_COLUMNS = (("coverage_80", "cov 80 %"), ("coverage_95", "cov 95 %"), ("width_95", "width 95"),
                    ("winkler_95", "Winkler 95"))


def _interval(metrics: dict, key: str):
    """A pooled test interval figure of a run (None for runs without intervals)."""
    v = ((metrics.get("intervals") or {}).get("test") or {}).get("overall", {}).get(key)
    if v is not None and key.startswith("coverage_"):
        v = 100.0 * v
    return v


def _columns(services: list[str]) -> list[tuple[str, str]]:
    cols = [(f"{s}_{m}", f"{s} {m.upper()}") for s in services for m in ("mae", "rmse")]
    if len(services) > 1:
        cols.append(("overall_mae", "overall MAE"))
    return cols


def _fmt(mean, std, digits: int = 4) -> str:
    if mean is None:
        return "n/a"
    text = f"{mean:.{digits}g}"
    return text + (f" ± {std:.2g}" if std is not None else "")


def render_markdown(table: str, rows: list[dict], services: list[str], protocol: list[str]) -> str:
    titles = {"table1": "Table 1: single-task Net forecasting",
              "table2": "Table 2: multi-task Call/SMS/Net forecasting",
              "table3": "Table 3: Sim-MSTNet ablations"}
    cols = _columns(services)
    best = {}
    for c, _ in cols:
        means = [r[f"{c}_mean"] for r in rows if r[f"{c}_mean"] is not None]
        best[c] = min(means) if means else None
    out = io.StringIO()
    out.write(f"# {titles.get(table, table)}\n\nProtocol:\n\n" + "\n".join(protocol) + "\n\n")
    # Interval columns last, and only when some run has intervals (older run folders have none).
    iv_cols = [(c, t) for c, t in INTERVAL_COLUMNS if any(r.get(f"{c}_mean") is not None for r in rows)]
    head = ["method"] + [t for _, t in cols] + ["train s", "seeds"] + [t for _, t in iv_cols]
    out.write("| " + " | ".join(head) + " |\n")
    out.write("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|\n")
    notes = []
    for r in rows:
        cells = [r["label"]]
        for c, _ in cols:
            text = _fmt(r[f"{c}_mean"], r[f"{c}_std"])
            if r[f"{c}_mean"] is not None and r[f"{c}_mean"] == best[c]:
                text = f"**{text}**"
            cells.append(text)
        cells.append(_fmt(r["train_seconds_mean"], r["train_seconds_std"], 3))
        cells.append(str(r["n"]))
        for c, _ in iv_cols:
            cells.append(_fmt(r.get(f"{c}_mean"), r.get(f"{c}_std")))
        out.write("| " + " | ".join(cells) + " |\n")
        if r["status"] != "ok":
            notes.append(f"- {r['label']}: {'not available' if r['status'] == 'n/a' else 'some seeds missing'}: "
                         f"{r['reason']}")
    if notes:
        out.write("\nNot available:\n\n" + "\n".join(notes) + "\n")
    return out.getvalue()


def write_csv(path: Path, rows: list[dict], services: list[str]) -> Path:
    cols = [c for c, _ in _columns(services)] + [c for c, _ in INTERVAL_COLUMNS] + ["train_seconds"]
    fields = ["method", "label", "n_seeds"] + [f"{c}_{x}" for c in cols for x in ("mean", "std")] + ["status", "reason"]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(fields)
            for r in rows:
                w.writerow([r["key"], r["label"], r["n"]]
                           + [_csv(r[f"{c}_{x}"]) for c in cols for x in ("mean", "std")]
                           + [r["status"], r["reason"]])
    return path


def write_runs_csv(path: Path, methods: list[Method], results: dict[str, list[RunResult]],
                   services: list[str]) -> Path:
    fields = ["method", "seed", "status", "folder"] + [f"{s}_{m}" for s in services for m in ("mae", "rmse")] \
        + ["overall_mae"] + [c for c, _ in INTERVAL_COLUMNS] + ["train_seconds", "epochs_run", "params", "reason"]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(fields)
            for m in methods:
                for r in results.get(m.key, []):
                    t = r.metrics["test"] if r.metrics else {}
                    w.writerow([m.key, r.seed, r.status, str(r.folder)]
                               + [_csv((t.get(s) or {}).get(x)) for s in services for x in ("mae", "rmse")]
                               + [_csv((t.get("overall") or {}).get("mae"))]
                               + [_csv(_interval(r.metrics, c) if r.metrics else None) for c, _ in INTERVAL_COLUMNS]
                               + [_csv(r.metrics.get("train_seconds") if r.metrics else None),
                                  _csv(r.metrics.get("epochs_run") if r.metrics else None),
                                  _csv(r.metrics.get("params") if r.metrics else None), r.reason])
    return path


def _csv(v) -> str:
    if v is None:
        return ""
    return repr(float(v)) if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------- figure 2 plots


def plot_fig2(main_run: Path, second_run: Path, second_label: str, folder: Path,
              cell: tuple[int, int] | None = None, horizon_step: int = 1) -> list[Path]:
    """``fig2_<service>.png`` per service and ``fig2.png`` (all services stacked): truth black,
    Sim-MSTNet red, ``second_label`` blue, one cell (default: the busiest Net cell of the test
    span), horizon step ``horizon_step``, over the test span of the run's own split."""
    from zoneinfo import ZoneInfo

    from simmstnet.eval.forecast import cell_series
    from simmstnet.eval.plots import _pyplot, _save, plot_forecast
    from simmstnet.train.checkpoint import load_run

    main, other = load_run(main_run, "cpu"), load_run(second_run, "cpu")
    grid, ds = _test_dataset(main)
    _, other_ds = _test_dataset(other)
    lo, hi = ds.target_range
    if cell is None:
        c = list(ds.services).index("net") if "net" in ds.services else 0
        totals = np.where(grid.mask[lo:hi, :, :, c], grid.values[lo:hi, :, :, c], 0).sum(0)
        cell = tuple(int(v) for v in np.unravel_index(int(np.argmax(totals)), totals.shape))
    r, k = cell
    t_idx, truth, fc = cell_series(main.model, ds, r, k, horizon_step, 1024, "cpu", False)
    t2, _, fc2 = cell_series(other.model, other_ds, r, k, horizon_step, 1024, "cpu", False)
    pos = {int(t): i for i, t in enumerate(t2)}
    tz = ZoneInfo(grid.timezone)
    times = [dt.datetime.fromtimestamp(int(grid.timestamps[i]), tz).replace(tzinfo=None) for i in t_idx]
    folder.mkdir(parents=True, exist_ok=True)
    paths, series = [], []
    for ci, s in enumerate(ds.services):
        aligned = np.full(t_idx.shape, np.nan)
        oc = other.services.index(s)
        for i, t in enumerate(t_idx):
            if int(t) in pos:
                aligned[i] = fc2[pos[int(t)], oc]
        series.append((s, truth[:, ci], fc[:, ci], aligned))
        paths.append(plot_forecast(times, truth[:, ci], fc[:, ci], folder / f"fig2_{s}.png",
                                   title=f"{s}: cell (row {r}, col {k}), horizon step {horizon_step}, test span",
                                   label="Sim-MSTNet", second=(second_label, aligned),
                                   xlabel=f"local time ({grid.timezone})"))
    plt = _pyplot()
    fig, axes = plt.subplots(len(series), 1, figsize=(9, 2.6 * len(series)), sharex=True, squeeze=False)
    for ax, (s, tr, f1, f2) in zip(axes[:, 0], series):
        ax.plot(times, tr, color="black", lw=1.2, label="ground truth")
        ax.plot(times, f1, color="red", lw=1.0, label="Sim-MSTNet")
        ax.plot(times, f2, color="blue", lw=1.0, label=second_label)
        ax.set_title(f"{s}: cell (row {r}, col {k}), horizon step {horizon_step}", fontsize=9)
        ax.set_ylabel("activity")
    axes[0, 0].legend(fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel(f"local time ({grid.timezone})")
    fig.autofmt_xdate()
    fig.tight_layout()
    paths.append(_save(fig, folder / "fig2.png"))
    plt.close(fig)
    return paths


def _test_dataset(run):
    """(grid as the run read it, the run's test-span WindowDataset with its own scaler)."""
    from simmstnet.data.windows import WindowDataset, split_ranges
    from simmstnet.train.trainer import load_grid

    d = run.config.data
    grid = load_grid(d.path, list(run.services), d.step, what=f"{run.folder}: data.path")
    target = split_ranges(grid, d.split, d.input_len, d.horizon, train_days=d.train_days)["test"]
    ds = WindowDataset(grid, input_len=d.input_len, label_len=d.label_len, horizon=d.horizon, patch=d.patch,
                       scaler=run.scaler, target_range=target, season_days=d.season_days,
                       season_stat=d.season_stat)
    return grid, ds


# ----------------------------------------------------------------------------- entry point


def run_bench(tables: list[str], data: str, out: str | Path, seeds: int, profile: str, sim: str | None = None,
              methods: list[str] | None = None, extra: list[str] = (), verbose: bool = False,
              cell: tuple[int, int] | None = None, log: Callable[[str], None] | None = None) -> list[dict]:
    """Run ``tables`` (each of TABLES) in order; returns each table's result dict."""
    for t in tables:
        if t not in TABLES:
            raise UserError(f"unknown table {t!r}; choose one of {', '.join(TABLES)}")
    if not Path(data).is_file():
        raise UserError(f"--data {data}: no such file")
    if sim is not None and not Path(sim).exists():
        raise UserError(f"--sim {sim}: no such file or folder")
    bench = Bench(data, out, seeds, load_profile(profile), sim=sim, methods=methods, extra=extra,
                  verbose=verbose, log=log)
    for t in tables:
        bench.check_data(t)
        if t != "fig2" and not bench.selected(t):
            raise UserError(f"{t}: none of --methods {','.join(methods or [])} belongs to it")
        if t == "fig2" and len(bench.selected("table2")) < 2:
            raise UserError("fig2 needs sim-mstnet and another table2 method (check --methods)")
    results = []
    for t in tables:
        results.append(bench.run_fig2(cell) if t == "fig2" else bench.run_table(t))
    bench.log(f"bench done in {bench.elapsed()}")
    return results
