"""The main job: scarce real data + a simulator + sim2real reweighting, side by side.

``run_demo`` (the ``simmstnet demo`` command):

1. simulates a source family of randomized cities, and a target city drawn partly outside the
   source parameter ranges that stands in for the real data a user would bring (or reads the
   user's own grid with ``--data``);
2. keeps only the last few days of the target's training span (scarce data);
3. trains on the same split and seed: Sim-MSTNet with ``bilevel`` sim2real and dynamic loss
   weighting, the real-only model (``off``), the uniform ``mix`` model, the pretrain-then-fine-tune
   model (``finetune``), and the naive baselines,
   of which the one with the best *validation* MAE is reported;
4. prints test MAE / RMSE per service and writes ``report.md`` with the table, the protocol,
   loss curves, forecast-vs-truth plots and the learned weight distribution.

Every number in the table comes from the run folders' ``metrics.json``; nothing is tuned on the
test span.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from simmstnet.data.grid import TrafficGrid
from simmstnet.errors import UserError
from simmstnet.utils import atomic_path, format_step

NAIVE = ("last-value", "seasonal-naive-day", "historical-average")


@dataclasses.dataclass
class DemoConfig:
    """Sizes of the demo; the defaults finish in a few minutes on 2 CPU cores."""

    out: str = "demo-out"
    data: str | None = None  # the user's own TrafficGrid .npz (None = simulated target)
    rows: int = 20  # target city size (simulated target only)
    cols: int = 20
    days: int = 28  # simulated span of target and sources
    source_scenarios: int = 8  # simulated source cities
    source_rows: int = 10  # source city size (smaller than the target: many cities matter more)
    source_cols: int = 10
    target_shift: float = 0.5  # how far outside the source ranges the target's parameters lie
    train_days: int = 3  # scarce-data protocol: last D days of the training span
    split: tuple = (0.7, 0.1, 0.2)
    input_len: int = 24
    label_len: int = 12
    horizon: int = 6
    epochs: int = 6
    batch_size: int = 64
    windows_per_epoch: int = 3072  # real or real+sim windows drawn per epoch
    val_windows: int = 4000  # per-epoch validation sample (final metrics use every window)
    # Simulated windows kept (a reproducible sample). One epoch's worth, so that every window's
    # weight is updated several times in the run (a larger pool leaves most weights untouched).
    max_sim_windows: int = 3072
    d_model: int = 32
    seed: int = 0


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _simulate(cfg: DemoConfig, out: Path, step: int, services: tuple, start) -> tuple[Path, TrafficGrid | None]:
    from simmstnet.sim import simulate, simulate_to_path

    sources = out / "data" / "sources"
    if not (sources / "index.json").is_file():
        _log(f"[1/4] simulating {cfg.source_scenarios} source cities "
             f"({cfg.source_rows}x{cfg.source_cols} cells, {cfg.days} days, {format_step(step)})")
        simulate_to_path(sources, preset="milano-like", rows=cfg.source_rows, cols=cfg.source_cols,
                         days=cfg.days, step=step, scenarios=cfg.source_scenarios, seed=cfg.seed,
                         services=services, start=start, progress=True)
    else:
        _log(f"[1/4] reusing simulated source cities in {sources}")
    target = None
    if cfg.data is None:
        path = out / "data" / "target.npz"
        if not path.is_file():
            _log(f"[1/4] simulating the target city ({cfg.rows}x{cfg.cols} cells, shift {cfg.target_shift}: "
                 "parameters partly outside the source ranges)")
            # A seed far from the sources' so the target is not one of them.
            grid = simulate(preset="milano-like", rows=cfg.rows, cols=cfg.cols, days=cfg.days, step=step,
                            seed=cfg.seed + 10_007, shift=cfg.target_shift, services=services, start=start)[0]
            grid.meta["role"] = "demo target (stands in for real data)"
            grid.save(path)
        target = TrafficGrid.load(path)
    return sources, target


def _runs(cfg: DemoConfig, sources: Path, n_services: int) -> list[tuple[str, str, list[str]]]:
    """(key, label, overrides) for every method, same data, split and seed."""
    multi = "sim-mstnet"
    model = [f"model.name={multi}", f"model.d_model={cfg.d_model}", "model.d_ff=" + str(2 * cfg.d_model)]
    common = [f"train.epochs={cfg.epochs}", f"train.batch_size={cfg.batch_size}",
              f"train.max_windows_per_epoch={cfg.windows_per_epoch}", "train.patience=0",
              f"train.max_val_windows={cfg.val_windows}",
              "train.loss_weighting=dynamic"]
    # Warm start of one epoch (the default) unless the run is short: the reweighting phase
    # must start before the phase switch at t1 = 80% of the run.
    warm = max(0.25, min(1.0, cfg.epochs / 6))
    sim = [f"sim2real.sim_data={sources}", f"sim2real.max_sim_windows={cfg.max_sim_windows}",
           f"sim2real.warm_start_epochs={warm}"]
    runs = [
        ("bilevel", "Sim-MSTNet + bilevel sim2real", model + common + sim + ["sim2real.mode=bilevel"]),
        ("mix", "Sim-MSTNet, sim + real uniform (mix)", model + common + sim + ["sim2real.mode=mix"]),
        ("finetune", "Sim-MSTNet, pretrained on sim, fine-tuned on real (finetune)",
         model + common + sim + ["sim2real.mode=finetune"]),
        # real only, with the simulated data named so that it takes the same optimizer-step
        # budget as the sim2real modes (it trains on none of it)
        ("off", "Sim-MSTNet, real only (off)", model + common + sim + ["sim2real.mode=off"]),
    ]
    runs += [(f"naive-{n}", n, [f"model.name={n}"]) for n in NAIVE]
    return runs


def run_demo(cfg: DemoConfig) -> Path:
    from simmstnet.config import load_config
    from simmstnet.train.trainer import Trainer

    t_start = time.perf_counter()
    out = Path(cfg.out)
    if cfg.data is not None:
        user = TrafficGrid.load(cfg.data)
        if user.step not in (600, 3600):
            raise UserError(f"{cfg.data}: the demo simulates 10min or 1h data; this grid's step is "
                            f"{format_step(user.step)} (resample it first)")
        step, services, start = user.step, user.services, int(user.timestamps[0])
        days = (user.shape[0] * user.step) / 86400
        cfg = dataclasses.replace(cfg, days=max(7, min(int(round(days)), 56)))
    else:
        step, services, start = 3600, ("call", "sms", "net"), "2013-11-01"
    out.mkdir(parents=True, exist_ok=True)  # only once the input is known to be readable
    sources, target = _simulate(cfg, out, step, services, start)
    data_path = Path(cfg.data) if cfg.data is not None else out / "data" / "target.npz"
    grid = TrafficGrid.load(data_path) if target is None else target

    base = [f"data.path={data_path}", f"data.input_len={cfg.input_len}", f"data.label_len={cfg.label_len}",
            f"data.horizon={cfg.horizon}", f"data.split={list(cfg.split)}",
            f"data.train_days={cfg.train_days}", f"train.seed={cfg.seed}", "train.device=auto"]
    runs = _runs(cfg, sources, len(grid.services))
    results = {}
    for i, (key, label, overrides) in enumerate(runs, 1):
        folder = out / "runs" / key
        metrics_file = folder / "metrics.json"
        if metrics_file.is_file():
            _log(f"[2/4] ({i}/{len(runs)}) {label}: reusing finished run {folder}")
        else:
            if folder.exists():  # an interrupted run: start it again cleanly
                shutil.rmtree(folder)
            _log(f"[2/4] ({i}/{len(runs)}) training {label}")
            run_cfg = load_config(None, base + overrides + [f"out={folder}"])
            Trainer(run_cfg, grid=grid, progress=True, quiet=False).run()
        results[key] = (label, json.loads(metrics_file.read_text()), folder)

    naive = [k for k in results if k.startswith("naive-")]
    best_naive = min(naive, key=lambda k: results[k][1]["val"]["overall"]["mae"])
    shown = ["bilevel", "mix", "finetune", "off", best_naive]
    table = _table(results, shown, list(grid.services))
    _log("[3/4] results")
    print(table)
    report = _write_report(cfg, out, grid, data_path, results, shown, best_naive, table,
                           time.perf_counter() - t_start)
    verdict = _verdict(results)
    print(verdict)
    _log(f"[4/4] report written to {report}  (wall time {time.perf_counter() - t_start:.0f} s)")
    return report


def _table(results: dict, shown: list[str], services: list[str]) -> str:
    head = "| method | " + " | ".join(f"{s} MAE | {s} RMSE" for s in services) + " | overall MAE | overall RMSE |"
    sep = "|---" * (1 + 2 * len(services) + 2) + "|"
    lines = [head, sep]
    best = {}
    for col in [(s, m) for s in services for m in ("mae", "rmse")] + [("overall", "mae"), ("overall", "rmse")]:
        best[col] = min(results[k][1]["test"][col[0]][col[1]] for k in shown)
    for k in shown:
        label, m, _ = results[k]
        label = label if not k.startswith("naive-") else f"best naive ({label}, chosen on validation)"
        cells = []
        for col in [(s, mm) for s in services for mm in ("mae", "rmse")] + [("overall", "mae"), ("overall", "rmse")]:
            v = m["test"][col[0]][col[1]]
            cells.append(f"**{v:.4g}**" if v == best[col] else f"{v:.4g}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _verdict(results: dict) -> str:
    b = results["bilevel"][1]["test"]["overall"]["mae"]
    others = {k: results[k][1]["test"]["overall"]["mae"] for k in results if k != "bilevel"}
    best_other = min(others, key=others.get)
    if b < others[best_other]:
        return (f"sim2real (bilevel) helped on this target: overall test MAE {b:.4g} vs "
                f"{others[best_other]:.4g} for the best alternative ({results[best_other][0]}).")
    return (f"sim2real (bilevel) did NOT beat the best alternative on this target: overall test MAE {b:.4g} vs "
            f"{others[best_other]:.4g} ({results[best_other][0]}).")


def _interval_lines(metrics: dict, services: list[str]) -> list[str]:
    """The report's intervals table: test coverage, width and scores per service (metrics.json)."""
    iv = metrics.get("intervals")
    if not iv:
        return []
    from simmstnet.eval.intervals import level_tag

    tags = [level_tag(lv) for lv in iv["levels"]]
    head = ("| service | " + " | ".join(f"coverage {t} % | width {t} %" for t in tags)
            + " | Winkler " + tags[-1] + " % | CRPS |")
    lines = ["", f"## Prediction intervals (bilevel run, {iv['method']} conformal, calibrated on validation)", "",
             head, "|---" * (1 + 2 * len(tags) + 2) + "|"]
    for s in services + ["overall"]:
        v = iv["test"][s]
        cells = [f"{100 * v[f'coverage_{t}']:.1f} % | {v[f'width_{t}']:.4g}" for t in tags]
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {v[f'winkler_{tags[-1]}']:.4g} | {v['crps']:.4g} |")
    return lines


def _write_report(cfg, out, grid, data_path, results, shown, best_naive, table, seconds) -> Path:
    from zoneinfo import ZoneInfo
    import datetime as dt

    fig = out / "figures"
    fig.mkdir(exist_ok=True)
    bilevel_dir = results["bilevel"][2]
    copied = []
    for name in (["loss_curves.png", "sim2real_weights.png"] + [f"forecast_{s}.png" for s in grid.services]
                 + [f"{kind}_{s}.png" for kind in ("map", "forecast_cells") for s in grid.services]):
        src = bilevel_dir / name
        if src.is_file():
            shutil.copyfile(src, fig / f"bilevel_{name}")
            copied.append(f"bilevel_{name}")
    proto = results["bilevel"][1]["protocol"]
    tz = ZoneInfo(grid.timezone)
    span = " .. ".join(dt.datetime.fromtimestamp(int(t), tz).strftime("%Y-%m-%d %H:%M")
                       for t in (grid.timestamps[0], grid.timestamps[-1]))
    lines = [
        "# simmstnet demo report",
        "",
        f"Target data: `{data_path}` ({grid!r}, {span} {grid.timezone}).",
        f"Source data: {cfg.source_scenarios} simulated milano-like cities "
        f"({cfg.source_rows}x{cfg.source_cols} cells), randomized (domain randomization).",
        "",
        "## Protocol",
        "",
        f"- split (chronological): {proto.get('split')}; scarce data: only the last {cfg.train_days} days "
        "of the training span are used for training",
        f"- step {format_step(grid.step)}, input length {cfg.input_len}, label length {cfg.label_len}, "
        f"horizon {cfg.horizon}",
        "- metrics on every test window, in original units, against the raw target; unobserved targets "
        "are excluded (mask); overall = pooled over every observed target of every service",
        f"- seed {cfg.seed}; {cfg.epochs} epochs of {cfg.windows_per_epoch} windows; same split and seed for "
        "every method; the naive baseline shown is the best on the validation span",
        "",
        "## Test results",
        "",
        table,
        "",
        _verdict(results),
        "",
        "All methods (test overall MAE / RMSE):",
        "",
    ]
    for k, (label, m, folder) in results.items():
        o = m["test"]["overall"]
        lines.append(f"- {label}: {o['mae']:.4g} / {o['rmse']:.4g} (run folder `{folder}`)")
    s2r = results["bilevel"][1].get("sim2real")
    if s2r:
        lines += ["", "## Sim2real (bilevel) summary", "", "```", json.dumps(s2r, indent=2), "```"]
    lines += _interval_lines(results["bilevel"][1], list(grid.services))
    lines += ["", "## Figures (bilevel run)", ""]
    lines += [f"![{c}](figures/{c})" for c in copied if "_map_" not in c and "_forecast_cells_" not in c]
    maps = [c for c in copied if "_map_" in c or "_forecast_cells_" in c]
    if maps:
        lines += ["", "## Where the forecast fails (bilevel run, test span)", "",
                  "Per cell: test MAE, MAE relative to the cell's mean, and coverage of the 80 % and 95 % "
                  "intervals (`map_*`); the best, median and worst cell by relative MAE with their "
                  "interval bands (`forecast_cells_*`).", ""]
        lines += [f"![{c}](figures/{c})" for c in maps]
    lines += ["", f"Wall time: {seconds:.0f} s."]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
