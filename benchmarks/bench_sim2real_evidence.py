"""Sim2real evidence: the scarce-data protocol with off / mix / l2rw / bilevel on two targets.

Targets (hourly protocol: input 24, label 12, horizon 6; split 0.6 / 0.1 / 0.3 by ratios):

* ``real``: the shared Milano 5x5 Internet block (../shared/data/telecom-italia/milano-internet-
  r41-45-c41-45-10min-2013-11-01-to-21.csv), imported with ``import_wide_csv`` (5x5, net, start
  2013-11-01 00:00 Europe/Rome, 10 min, origin 41,41) and resampled to 1 h; single-task ``stnet``.
* ``sim``: a simulated target city drawn with ``--shift`` outside the source scenarios' parameter
  ranges (call, sms, net); multi-task ``sim-mstnet``.

Source family: ``--scenarios`` scenarios of ``--source-preset`` (default milano-like; ``--rows``
x ``--cols``, the same 21-day calendar), shared by both targets. Scarce data: ``data.train_days``
in ``--days``. With D = 1 there is no complete real training window (24 steps < input 24 +
horizon 6): ``off`` is n/a, and mix / l2rw / bilevel then take their real windows from the
validation span (``sim2real.upper_data=val``, last epoch kept). Every run trains all ``--epochs``
and keeps its best validation epoch (``train.patience=0``; early stopping cut bilevel runs in the
transient after the warm start). ``seasonal-naive-day`` is reported beside every result (no
training, so one number per target).

Modes (default list): off, mix, finetune, bilevel (the package defaults: one weight per window,
Adam, G on the real windows theta trains on, eps fixed at 2x the warm-start h), bilevel-heldout (the
held-out form of issue 12: held-out folds, one weight per simulated city and a learned simulated
share, sgd weight steps, bounded duals, planes aged out), bilevel-heldout-q5 (eps follows the running
median of h, so the constraint binds about half the time) and bilevel-heldout-nocon (eps = 1e9: no
plane is ever cut). Also defined (see VARIANTS): mix-warm (mix after bilevel's warm start),
the -frozen form (weights and share never move), the -noage forms (planes kept while their dual is
positive), -upper (theta also descends G), bilevel-scen, bilevel-paper (the literal reconstruction),
l2rw; ``--variant NAME=MODE,KEY=VALUE,...`` adds more.

Same step budget for every mode: ``sim2real.steps_per_epoch`` (``--steps``, default 32) optimizer
steps per epoch, off included; the simulated pool is ``--max-sim`` (default 20,000) windows from
``--scenarios`` (default 32) source cities.

Small models by default (``--d-model 16``, ``--epochs 20``, at most ``--max-sim`` simulated
windows). Runs whose metrics.json exists are reused, so an interrupted benchmark continues;
``--jobs N`` trains N runs at once (one thread each); ``--collect-only`` only tabulates. Rerun:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sim2real_evidence.py \\
        --seeds 3 --days 1,3,7 --targets real --jobs 2 --out runs/s2r-evidence

Writes ``results.csv`` (one row per run), ``table.md`` / ``table.csv`` (test MAE and RMSE,
mean +- std over seeds) and ``cost.md`` (seconds per training epoch, bilevel against mix) to --out.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import run_one  # noqa: E402  (shared by the benchmark scripts)
CSV = ROOT.parent / "shared" / "data" / "telecom-italia" / "milano-internet-r41-45-c41-45-10min-2013-11-01-to-21.csv"
from simmstnet.train.sim2real import MODES as BASE_MODES  # off, mix, l2rw, bilevel, finetune

REFERENCES = ("seasonal-naive-day", "last-value", "ridge")
FITTED_REFERENCES = ("ridge",)  # fitted on the D kept real days; the others need no training
DEFAULT_MODES = ("off", "mix", "finetune", "bilevel", "bilevel-heldout", "bilevel-heldout-q5",
                 "bilevel-heldout-nocon")
# The held-out bilevel form (issue 12; sim2real module docstring, points 7-12): held-out folds, one
# weight per simulated city and a learned simulated share, sgd weight steps, bounded duals, planes aged
# out; eps fixed at 2x the warm-start h as in the default form.
HELDOUT = ["sim2real.upper_folds=2", "sim2real.learn_share=true", "sim2real.lambda_opt=sgd",
           "sim2real.lr_lambda=0.02", "sim2real.dual_max=10", "sim2real.dual_reg=0.1",
           "sim2real.plane_max_age=25", "sim2real.weight_by=scenario"]
Q5 = ["sim2real.eps_quantile=0.5"]  # eps follows the running median of h: the constraint binds
NOAGE = ["sim2real.plane_max_age=null"]  # planes kept while their dual is positive
VARIANTS = {"mix-warm": ("mix", ["sim2real.mix_warm_start=true"]),
            "bilevel-frozen": ("bilevel", ["sim2real.freeze_weights=true"]),
            "bilevel-heldout": ("bilevel", HELDOUT),
            "bilevel-heldout-q5": ("bilevel", [*HELDOUT, *Q5]),
            "bilevel-heldout-q5-noage": ("bilevel", [*HELDOUT, *Q5, *NOAGE]),
            "bilevel-heldout-q9-noage": ("bilevel", [*HELDOUT, "sim2real.eps_quantile=0.9", *NOAGE]),
            "bilevel-heldout-frozen-q5-noage": ("bilevel", [*HELDOUT, *Q5, *NOAGE, "sim2real.freeze_weights=true"]),
            "bilevel-heldout-nocon": ("bilevel", [*HELDOUT, "sim2real.eps=1e9"]),  # no plane is ever cut
            "bilevel-heldout-upper": ("bilevel", [*HELDOUT, "sim2real.upper_trains_theta=true"]),
            "bilevel-scen": ("bilevel", ["sim2real.weight_by=scenario"]),
            "bilevel-paper": ("bilevel", ["sim2real.lower_coef=0", "sim2real.eps_factor=0.5"])}
# train.patience=0: every run trains all epochs and keeps its best validation epoch (all modes
# alike); with early stopping, bilevel runs were cut in the transient after the warm start.
PROTOCOL = ["data.step=1h", "data.input_len=24", "data.label_len=12", "data.horizon=6",
            "data.split=[0.6,0.1,0.3]", "data.patch=5", "train.batch_size=64",
            "train.lr=2e-3", "train.patience=0", "train.max_val_windows=1000"]


def prepare_inputs(out: Path, args) -> dict:
    """Real target .npz, simulated target .npz, source scenario folder (cached under out/data)."""
    from simmstnet.data.importers import import_wide_csv
    from simmstnet.sim import simulate, simulate_to_path

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    family = args.source_preset
    if args.source_config:  # a simulate --config file (e.g. simmstnet calibrate's params.yaml)
        import hashlib

        family = "cfg-" + hashlib.sha256(Path(args.source_config).read_bytes()).hexdigest()[:10]
    paths = {"real": data / "milano-net-5x5-1h.npz", "sim": data / f"target-{args.source_preset}-shift{args.shift:g}.npz",
             "sources": data / f"sources-{family}-{args.scenarios}x{args.rows}x{args.cols}"}
    if not paths["real"].exists():
        if not CSV.is_file():
            sys.exit(f"shared data not found at {CSV}")
        g = import_wide_csv(CSV, "5x5", "net", "2013-11-01 00:00", tz="Europe/Rome", step="10min",
                            origin=(41, 41))
        g.resample(3600).save(paths["real"])
    if args.sources:  # given sources (a TrafficGrid .npz or scenario folder), e.g. the oracle below
        paths["sources"] = Path(args.sources)
    elif args.oracle_sources:
        paths["sources"] = data / f"oracle-real-days-before-the-{args.days}-kept.npz"
        oracle_sources(paths["real"], paths["sources"], args)
    elif not (paths["sources"] / "index.json").exists():
        simulate_to_path(paths["sources"], preset=args.source_preset, rows=args.rows, cols=args.cols, days=21,
                         step="1h", scenarios=args.scenarios, seed=0, start="2013-11-01", progress=True,
                         config=args.source_config)
    if not paths["sim"].exists():
        # seed 1000: not one of the sources; shift > 0: parameters outside the source ranges
        (g,) = simulate(preset=args.source_preset, rows=args.target_size, cols=args.target_size, days=21, step="1h",
                        scenarios=1, seed=1000, start="2013-11-01", shift=args.shift)
        g.save(paths["sim"])
    return paths


def oracle_sources(real_path: Path, path: Path, args) -> None:
    """The real block's own training-span days before the kept ``data.train_days`` (never the kept,
    validation or test days) as sources: this city's exact distribution, but only as much of it as
    those days hold. A strong reference for what any simulator's sources could add (not a strict
    bound: a simulator can draw more). Cut where the trainer's scaler range starts (``data_range``
    of the ``train_days`` split, with this protocol's split and window sizes)."""
    from simmstnet.config import load_config
    from simmstnet.data.grid import TrafficGrid
    from simmstnet.data.windows import data_range, split_ranges

    days = [int(x) for x in str(args.days).split(",")]
    if len(days) != 1:
        sys.exit("--oracle-sources needs a single --days value (the sources depend on D)")
    if path.exists():
        return
    d = load_config(None, PROTOCOL).data
    real = TrafficGrid.load(real_path)
    train = split_ranges(real, d.split, d.input_len, d.horizon, train_days=days[0])["train"]
    first_kept = data_range(train, d.input_len)[0]
    part = real.slice_time(None, int(real.timestamps[first_kept]))
    part.save(path)
    print(f"oracle sources: {part.shape[0]} real hourly steps before the {days[0]} kept days", file=sys.stderr)


def epoch_seconds(folder: Path, skip: int) -> float | None:
    """Mean training seconds per epoch (sim2real_history.csv), leaving out the first ``skip``."""
    path = folder / "sim2real_history.csv"
    if not path.exists():
        return None
    rows = list(csv.DictReader(open(path)))[skip:]
    vals = [float(r["train_seconds"]) for r in rows if r.get("train_seconds")]
    return float(np.mean(vals)) if vals else None


def parse_variant(text: str) -> tuple[str, tuple[str, list[str]]]:
    """``NAME=MODE[,KEY=VALUE...]`` -> (NAME, (MODE, [sim2real overrides]))."""
    name, sep, rest = text.partition("=")
    parts = rest.split(",") if sep else []
    if not name or not parts or parts[0] not in BASE_MODES:
        sys.exit(f"--variant {text!r}: expected NAME=MODE[,KEY=VALUE...] with MODE off|mix|l2rw|bilevel")
    return name, (parts[0], parts[1:])


def _job(job: dict) -> dict:
    """One training run (in a worker process when --jobs > 1)."""
    from simmstnet.errors import UserError

    if job["worker"]:  # one thread per worker process: --jobs N uses N cores
        import torch

        torch.set_num_threads(1)
    t0 = time.perf_counter()
    row = {k: job[k] for k in ("target", "days", "mode", "kind", "seed")}
    if job["collect_only"] and not (Path(job["folder"]) / "metrics.json").exists():
        return {**row, "test_mae": None, "test_rmse": None, "sec_epoch": None, "note": "not run",
                "seconds": 0.0}
    try:
        m = run_one(Path(job["folder"]), job["over"])
    except UserError as exc:  # a table entry (e.g. D=1, off)
        return {**row, "test_mae": None, "test_rmse": None, "sec_epoch": None,
                "note": "n/a: " + str(exc)[:80], "seconds": time.perf_counter() - t0}
    block = m.get("sim2real") or {}
    return {**row, "test_mae": m["test"]["overall"]["mae"], "test_rmse": m["test"]["overall"]["rmse"],
            "sec_epoch": epoch_seconds(Path(job["folder"]), job["skip"]), "note": job["note"],
            "seconds": time.perf_counter() - t0, "share": block.get("share"),
            "plane_active_share": block.get("plane_active_share"), "folder": job["folder"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--days", default="1,3,7")
    ap.add_argument("--targets", default="real,sim")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help="comma-separated: off, mix, l2rw, bilevel and the names of --variant")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=MODE[,KEY=VALUE...]",
                    help="a named mode with extra overrides, e.g. bl-scen=bilevel,sim2real.weight_by=scenario")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--d-model", type=int, default=16)
    ap.add_argument("--max-sim", type=int, default=20000, help="sim2real.max_sim_windows")
    ap.add_argument("--steps", type=int, default=32, help="sim2real.steps_per_epoch of every mode")
    ap.add_argument("--source-preset", default="milano-like", help="simulator preset of the source scenarios")
    ap.add_argument("--source-config", default=None,
                    help="simulate --config file for the source scenarios (e.g. calibrate's params.yaml)")
    ap.add_argument("--sources", default=None, help="use this TrafficGrid .npz or scenario folder as the sources")
    ap.add_argument("--oracle-sources", action="store_true",
                    help="sources = the real block's training-span days before the kept ones (a real-data reference)")
    ap.add_argument("--scenarios", type=int, default=32)
    ap.add_argument("--rows", type=int, default=10)
    ap.add_argument("--cols", type=int, default=10)
    ap.add_argument("--target-size", type=int, default=8, help="rows = cols of the simulated target city")
    ap.add_argument("--shift", type=float, default=0.5, help="simulated target: distance outside the ranges")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for every sim2real run (KEY=VALUE)")
    ap.add_argument("--set", nargs="*", default=[], dest="common", help="more overrides for every run")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes, one thread each)")
    ap.add_argument("--device", default="cpu", help="train.device of the learned runs")
    ap.add_argument("--collect-only", action="store_true",
                    help="train nothing: tabulate the runs already in --out (missing ones: not run)")
    ap.add_argument("--out", default="runs/s2r-evidence")
    args = ap.parse_args()
    out = Path(args.out)
    paths = prepare_inputs(out, args)
    days = [int(d) for d in args.days.split(",")]
    targets = args.targets.split(",")
    modes = args.modes.split(",")
    variants = dict(VARIANTS)
    variants.update(parse_variant(v) for v in args.variant)
    for mode in modes:
        if mode not in BASE_MODES and mode not in variants:
            sys.exit(f"--modes: unknown mode {mode!r} (define it with --variant {mode}=MODE,...)")
    small = [f"model.d_model={args.d_model}", f"model.d_ff={2 * args.d_model}", "model.enc_layers=1",
             "model.n_heads=2", f"train.epochs={args.epochs}"]
    per_target = {
        "real": [f"data.path={paths['real']}", "data.services=[net]", "model.name=stnet",
                 "train.loss_weighting=average"],
        "sim": [f"data.path={paths['sim']}", "data.services=[call,sms,net]", "model.name=sim-mstnet"],
    }
    from simmstnet.errors import UserError

    rows, jobs = [], []
    t_all = time.perf_counter()
    for target in targets:
        base = PROTOCOL + per_target[target] + args.common
        # the simple references beside every result: no training (seasonal naive, last value), and
        # the closed-form linear reference fitted on the same D kept real days (deterministic: one run)
        for ref in REFERENCES:
            for d in days:
                scarce = [f"data.train_days={d}"] if ref in FITTED_REFERENCES else []
                folder = out / "runs" / target / (f"d{d}" if scarce else "") / ref
                try:
                    m = run_one(folder, [*base, *scarce, f"model.name={ref}", "train.loss_weighting=average",
                                         "train.device=cpu"])
                    mae, rmse, note = m["test"]["overall"]["mae"], m["test"]["overall"]["rmse"], ""
                except UserError as exc:
                    mae, rmse, note = None, None, "n/a: " + str(exc)[:80]
                rows.append({"target": target, "days": d, "mode": ref, "kind": "reference", "seed": "-",
                             "test_mae": mae, "test_rmse": rmse, "sec_epoch": None, "note": note, "seconds": None})
        for d in days:
            for mode in modes:
                for seed in range(args.seeds):
                    real_mode, variant = variants.get(mode, (mode, []))
                    over = [*base, *small, f"train.device={args.device}", f"data.train_days={d}",
                            f"train.seed={seed}", f"sim2real.mode={real_mode}", *variant]
                    note = ""
                    # off reads the simulated pool too: it sets the step budget, the same for every mode
                    over += [f"sim2real.sim_data={paths['sources']}", f"sim2real.max_sim_windows={args.max_sim}",
                             f"sim2real.steps_per_epoch={args.steps}"]
                    if real_mode != "off":
                        over += [*args.extra]
                        if d * 24 < 24 + 6:
                            over.append("sim2real.upper_data=val")
                            note = "real windows from val"
                    jobs.append({"target": target, "days": d, "mode": mode, "kind": real_mode, "seed": seed,
                                 "over": over,
                                 "folder": str(out / "runs" / target / f"d{d}" / f"{mode}-s{seed}"),
                                 "note": note, "collect_only": args.collect_only, "worker": args.jobs > 1,
                                 # bilevel's warm-start epoch costs what mix does
                                 "skip": 1 if real_mode == "bilevel" or mode == "mix-warm" else 0})

    def report(r):
        mae = "n/a" if r["test_mae"] is None else f"{r['test_mae']:.4g}"
        rmse = "n/a" if r["test_rmse"] is None else f"{r['test_rmse']:.4g}"
        print(f"{r['target']} D={r['days']} {r['mode']:10s} seed {r['seed']}: test MAE {mae} RMSE {rmse} "
              f"({r['seconds']:.0f}s) {r['note']}", file=sys.stderr, flush=True)

    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: a forked child cannot use CUDA once the parent has touched it
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for r in pool.map(_job, jobs):
                report(r)
                rows.append(r)
    else:
        for job in jobs:
            rows.append(_job(job))
            report(rows[-1])
    write_outputs(out, rows, targets, days, [*REFERENCES, *modes], args)
    print(f"total {time.perf_counter() - t_all:.0f}s", file=sys.stderr)


def _ms(vals) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "n/a"
    return f"{np.mean(vals):.4g} ± {np.std(vals):.2g}" if len(vals) > 1 else f"{vals[0]:.4g}"


def write_outputs(out: Path, rows: list[dict], targets, days, modes, args) -> None:
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    lines = [f"Test MAE / RMSE (original units), mean ± std over {args.seeds} seeds; hourly, input 24, "
             f"horizon 6, split 0.6/0.1/0.3; {args.epochs} epochs, d_model {args.d_model}, "
             f"at most {args.max_sim} simulated windows from {args.scenarios} {args.source_preset} "
             f"{args.rows}x{args.cols} scenarios; {args.steps} optimizer steps per epoch for every mode.", "",
             "| target | D | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    table_rows = []
    for t in targets:
        for d in days:
            cells = []
            for mode in modes:
                sel = [r for r in rows if r["target"] == t and r["days"] == d and r["mode"] == mode]
                cell = f"{_ms([r['test_mae'] for r in sel])} / {_ms([r['test_rmse'] for r in sel])}"
                if any(r["note"] == "real windows from val" for r in sel):
                    cell += " (val)"
                cells.append(cell)
                table_rows.append({"target": t, "days": d, "mode": mode,
                                   "mae_mean": _mean([r["test_mae"] for r in sel]),
                                   "mae_std": _std([r["test_mae"] for r in sel]),
                                   "rmse_mean": _mean([r["test_rmse"] for r in sel]),
                                   "rmse_std": _std([r["test_rmse"] for r in sel])})
            lines.append(f"| {t} | {d} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    cost = ["", "| target | D | mix s/epoch | bilevel s/epoch (after warm start, all variants) | ratio | l2rw s/epoch |",
            "|---|---|---|---|---|---|"]
    for t in targets:
        for d in days:
            def sec(kind):  # mean over every run of that mode (variants included)
                vals = [r["sec_epoch"] for r in rows if r["target"] == t and r["days"] == d
                        and r["kind"] == kind and r["sec_epoch"] is not None]
                return float(np.mean(vals)) if vals else None
            mix, l2, bl = sec("mix"), sec("l2rw"), sec("bilevel")
            ratio = f"{bl / mix:.2f}x" if mix and bl else "n/a"
            cost.append(f"| {t} | {d} | {_f(mix)} | {_f(bl)} | {ratio} | {_f(l2)} |")
    cost_text = "\n".join(cost) + "\n"
    signal_text = signal_table(rows, targets, days, modes)
    (out / "table.md").write_text(text)
    (out / "cost.md").write_text(cost_text)
    (out / "signal.md").write_text(signal_text)
    with open(out / "table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(table_rows[0]))
        w.writeheader()
        w.writerows(table_rows)
    print(text + cost_text + signal_text)


def city_weights(folder: str) -> np.ndarray | None:
    """(n_cities,) mean final weight per simulated city of a run (sim2real_weights.npz)."""
    path = Path(folder) / "sim2real_weights.npz"
    if not path.exists():
        return None
    z = np.load(path)
    w, sid = z["weights"], z["scenario_ids"]
    return np.array([np.nanmean(w[sid == c]) for c in np.unique(sid)])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.std(a) == 0 or np.std(b) == 0:  # constant weights (frozen) have no ranking
        return float("nan")
    return float(spearmanr(a, b).statistic)


def signal_table(rows: list[dict], targets, days, modes) -> str:
    """Paired by seed against mix (mean and per-seed test MAE differences), and for the bilevel
    runs what the reweighting learned: final simulated share, share of phase-1 steps with an active
    plane, spread of the per-city weights and their rank agreement across seeds (mean pairwise
    Spearman; near 0 = the weights are noise)."""
    lines = ["", "Paired by seed: test MAE minus mix's (negative = better than mix); bilevel runs: final "
             "simulated share, share of phase-1 steps with an active plane, std of the per-city weights, "
             "mean pairwise Spearman of the per-city weights across seeds.", "",
             "| target | D | mode | minus mix: mean (per seed) | share | active plane | city-weight std | "
             "rank agreement |", "|---|---|---|---|---|---|---|---|"]
    for t in targets:
        for d in days:
            ref = {r["seed"]: r["test_mae"] for r in rows if r["target"] == t and r["days"] == d
                   and r["mode"] == "mix" and r["test_mae"] is not None}
            for mode in modes:
                sel = [r for r in rows if r["target"] == t and r["days"] == d and r["mode"] == mode
                       and r["test_mae"] is not None and r["seed"] in ref]
                if not sel or mode in ("mix", *REFERENCES):
                    continue
                diffs = [r["test_mae"] - ref[r["seed"]] for r in sel]
                cell = f"{np.mean(diffs):+.3g} ({', '.join(f'{x:+.3g}' for x in diffs)})"
                extra = ["", "", "", ""]
                if sel[0]["kind"] == "bilevel":
                    shares = [r.get("share") for r in sel if r.get("share") is not None]
                    act = [r.get("plane_active_share") for r in sel if r.get("plane_active_share") is not None]
                    ws = [w for w in (city_weights(r.get("folder", "")) for r in sel) if w is not None]
                    rho = [_spearman(ws[i], ws[j]) for i in range(len(ws)) for j in range(i + 1, len(ws))
                           if len(ws[i]) == len(ws[j])]
                    rho = [x for x in rho if not np.isnan(x)]
                    extra = [_ms(shares), _ms(act), _ms([float(np.std(w)) for w in ws]),
                             f"{np.mean(rho):+.2f}" if rho else "n/a"]
                lines.append(f"| {t} | {d} | {mode} | {cell} | " + " | ".join(extra) + " |")
    return "\n".join(lines) + "\n"


def _mean(v):
    v = [x for x in v if x is not None]
    return float(np.mean(v)) if v else None


def _std(v):
    v = [x for x in v if x is not None]
    return float(np.std(v)) if v else None


def _f(x):
    return "n/a" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
