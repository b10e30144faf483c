"""The trainer: one experiment config in, one run folder out.

Steps (:meth:`Trainer.run`):

1. data: load the grid (optionally resample, select services), chronological split
   (:func:`~simmstnet.data.windows.split_ranges`), scaler fitted on the training data range only,
   one :class:`~simmstnet.data.windows.WindowDataset` per split;
2. model: ``build_model(model.name, DataDims, **model options)``; a model with a
   ``fit(train_dataset)`` hook gets it called (naive baselines read their period or averages);
3. training (models with parameters only): Adam/AdamW, cosine or step schedule, gradient
   clipping, bf16 autocast on CUDA, masked per-task losses combined by the dynamic (or equal)
   task weighting; validation MAE in original units after each epoch drives early stopping and
   the best checkpoint; ``last.pt`` after every epoch allows ``--resume``;
4. evaluation of the best model on every validation and test window; ``metrics.json``,
   ``history.csv``, loss curves and a forecast-vs-truth figure per service.

Sim2real (``sim2real.mode`` mix | l2rw | bilevel | finetune, see :mod:`simmstnet.train.sim2real`):
the trainer hands the epoch loop to :class:`~simmstnet.train.sim2real_loop.Sim2RealLoop` (one
entry point, ``Sim2RealLoop.run``), which calls back into the generic pieces kept here
(``_end_epoch``: validation, early stopping, best checkpoint, history row; ``_save_last`` /
``_restore``; ``_write_history``); ``_finish`` adds the loop's ``sim2real`` block to metrics.json.
Every mode, ``off`` included once ``sim2real.sim_data`` is set, takes the same number of optimizer
steps per epoch (``sim2real.steps_per_epoch``; null = ceil(min(simulated windows,
``train.max_windows_per_epoch``) / batch size); :func:`simmstnet.train.sim2real_loop.steps_per_epoch`).
When ``data.train_days`` leaves no complete real training window, ``mix`` trains on simulated
windows only and l2rw/bilevel/finetune need ``sim2real.upper_data=val``. With ``upper_data=val``
the validation windows are training data: early stopping is off and the last epoch is kept as the
model (logged, and recorded in metrics.json); the same when the mode picks its own model
(finetune's held-out real windows). The reweighter's state is part of ``last.pt``; diagnostics go
to ``sim2real_*`` files (:mod:`simmstnet.train.sim2real_report`).

Under ``torchrun`` every rank trains on its shard (DistributedDataParallel); rank 0 alone
evaluates and writes (see :mod:`simmstnet.train.distributed`).

Reproducibility: one seed drives model init, shuffling (``BatchLoader`` draws its order from
``(seed, epoch)``) and dropout. The last checkpoint stores every RNG state, so on CPU a run that
is killed and resumed ends with exactly the metrics of an uninterrupted one.
"""
from __future__ import annotations

import csv
import datetime as dt
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from simmstnet.config import ExperimentConfig, config_to_dict, dump_config
from simmstnet.data.grid import TrafficGrid
from simmstnet.errors import UserError
from simmstnet.eval.forecast import autocast, cell_series, evaluate, prepare_batch
from simmstnet.eval.intervals import level_tag
from simmstnet.eval.metrics import MASK_RULE
from simmstnet.train import checkpoint as ckpt
from simmstnet.train import distributed as D
from simmstnet.utils import atomic_path, format_metric, format_step, parse_step, seed_everything

# ----------------------------------------------------------------------------- data


@dataclass
class RunData:
    """The grid as used (resampled, services selected), its split and the fitted scaler."""

    grid: TrafficGrid
    ranges: dict[str, tuple[int, int]]
    scaler: Any  # Scaler
    train: Any  # WindowDataset
    val: Any
    test: Any


def load_grid(path: str | Path | None, services: list[str] | None = None, step: str | None = None,
              what: str = "data.path") -> TrafficGrid:
    """Read a TrafficGrid file, resample it to ``step`` and keep ``services`` (in that order)."""
    if path is None:
        raise UserError(f"{what} is not set: give the TrafficGrid .npz to use ({what}=FILE.npz)")
    grid = TrafficGrid.load(path)
    if step is not None:
        grid = grid.resample(parse_step(step))
    if services:
        grid = grid.select_services(services)
    return grid


def _scarce_ranges(grid: TrafficGrid, split, L: int, H: int, days: int):
    """Ranges with ``train_days`` that may leave no complete training window.

    Returns ``(ranges, scaler_range)``; ``ranges["train"]`` is None when the last ``days`` days
    hold fewer than L + H steps (then the scaler is fitted on those days' data anyway)."""
    from simmstnet.data.windows import data_range, split_ranges

    ranges = split_ranges(grid, split, L, H)
    a = ranges["val"][0]
    step = grid.step
    keep = days * (86400 // step) if 86400 % step == 0 else None
    if keep is not None and 0 <= a - keep and keep < L + H:
        return {**ranges, "train": None}, (a - keep, a)
    ranges = split_ranges(grid, split, L, H, train_days=days)  # raises for every other problem
    return ranges, data_range(ranges["train"], L)


def prepare_data(cfg: ExperimentConfig, grid: TrafficGrid | None = None,
                 allow_no_train: bool = False) -> RunData:
    """Split, fit the scaler on the training data range and build the three window datasets.

    ``allow_no_train`` (sim2real): a ``data.train_days`` too short for one training window gives
    ``train=None`` instead of an error."""
    from simmstnet.data.scaling import Scaler
    from simmstnet.data.windows import WindowDataset, data_range, split_ranges

    d = cfg.data
    if grid is None:
        grid = load_grid(d.path, d.services, d.step)
    else:
        if d.step is not None:
            grid = grid.resample(parse_step(d.step))
        if d.services:
            grid = grid.select_services(d.services)
    if allow_no_train and d.train_days is not None:
        ranges, fit_range = _scarce_ranges(grid, d.split, d.input_len, d.horizon, d.train_days)
    else:
        ranges = split_ranges(grid, d.split, d.input_len, d.horizon, train_days=d.train_days)
        fit_range = data_range(ranges["train"], d.input_len)
    # The seasonal history's length, resolved for the model (null = its default); written back so
    # the run's config.yaml, and every later evaluate/predict, uses the same value.
    from simmstnet.models.registry import resolve_season_days

    d.season_days = resolve_season_days(cfg.model.name, d.season_days, int(grid.step), d.horizon)
    # Only data the training windows can read (inputs included) informs the scaler.
    scaler = Scaler.fit(grid, fit_range, kind=d.scaler)
    # The seasonal history never reads before the data the scaler may read (under the scarce-data
    # protocol, the days before the last D are not there to read).
    common = dict(input_len=d.input_len, label_len=d.label_len, horizon=d.horizon, patch=d.patch,
                  scaler=scaler, season_days=d.season_days, season_stat=d.season_stat,
                  history_start=fit_range[0] if d.train_days is not None else 0)
    train = (WindowDataset(grid, stride=d.stride, target_range=ranges["train"], **common)
             if ranges["train"] is not None else None)
    val = WindowDataset(grid, target_range=ranges["val"], **common)
    test = WindowDataset(grid, target_range=ranges["test"], **common)
    return RunData(grid, ranges, scaler, train, val, test)


def protocol(cfg: ExperimentConfig, data: RunData) -> dict:
    """The facts a reader needs to compare numbers: split, lengths, step, units, mask rule."""
    g = data.grid
    tz = g.timezone

    def when(i: int) -> str:
        return _iso(int(g.timestamps[i]), tz)

    return {
        "data": cfg.data.path,
        "services": list(g.services),
        "split": cfg.data.split,
        "split_ranges": {name: ({"target_steps": [r[0], r[1]], "first_target": when(r[0]),
                                 "last_target": when(r[1] - 1)} if r is not None else None)
                         for name, r in data.ranges.items()},
        "input_len": cfg.data.input_len,
        "label_len": cfg.data.label_len,
        "horizon": cfg.data.horizon,
        "step": format_step(g.step),
        "units": "original (inverse-scaled forecasts against the raw target)",
        "mask_rule": MASK_RULE,
        "train_days": cfg.data.train_days,
        "season_days": cfg.data.season_days,
        "scaler": f"{cfg.data.scaler}, fitted on observed training values only",
        "windows": {"train": len(data.train) if data.train is not None else 0, "val": len(data.val),
                    "test": len(data.test)},
    }


def _iso(epoch: int, tz: str) -> str:
    from zoneinfo import ZoneInfo

    return dt.datetime.fromtimestamp(epoch, ZoneInfo(tz)).isoformat()


# ----------------------------------------------------------------------------- optimization


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def schedule_factor(cfg, steps_per_epoch: int) -> Callable[[int, int], float]:
    """``factor(step, total)``: the learning-rate factor of ``cfg.lr_schedule`` at ``step`` of a
    stretch of ``total`` steps. cosine: decays to 1% over the stretch; step: times ``lr_gamma``
    every ``lr_step_epochs`` epochs; constant: 1."""
    spe = max(1, steps_per_epoch)

    if cfg.lr_schedule == "cosine":
        def factor(step: int, total: int) -> float:
            total = max(1, total)
            return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    elif cfg.lr_schedule == "step":
        def factor(step: int, total: int) -> float:
            return cfg.lr_gamma ** ((step // spe) // cfg.lr_step_epochs)
    else:
        def factor(step: int, total: int) -> float:
            return 1.0
    return factor


def make_scheduler(opt, cfg, steps_per_epoch: int,
                   compose: Callable[[Callable[[int, int], float]], Callable[[int], float] | None] | None = None
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped after every optimizer step: :func:`schedule_factor` over all planned steps, or
    ``compose(schedule_factor)`` when that is not None (a sim2real mode's ``lr_factor``: finetune
    runs it once per phase)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    base = schedule_factor(cfg, steps_per_epoch)
    factor = compose(base) if compose is not None else None
    if factor is None:
        factor = lambda step: base(step, total)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def has_unused_parameters(model: torch.nn.Module, batch: dict) -> bool:
    """Whether one forward/backward leaves a trainable parameter without gradient (an ablation
    that skips a module). DDP must then search for unused parameters every step, which costs
    time, so it is enabled only when needed. RNG streams and gradients are left as they were."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.zero_grad(set_to_none=True)
        model(batch).float().sum().backward()
        unused = any(p.grad is None for p in model.parameters() if p.requires_grad)
        model.zero_grad(set_to_none=True)
    return unused


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- trainer


@dataclass
class Hooks:
    """Optional callbacks (tests, tools): ``on_batch(rank, batch)`` before each training step,
    ``on_epoch_end(epoch, trainer)`` after the epoch's checkpoint is written."""

    on_batch: Callable[[int, dict], None] | None = None
    on_epoch_end: Callable[[int, "Trainer"], None] | None = None


class Trainer:
    """Train and evaluate one experiment; see the module docstring.

    Args:
        cfg: the resolved experiment config (``cfg.out`` is the run folder; None = generated).
        grid: use this grid instead of reading ``cfg.data.path`` (tests, notebooks).
        resume: continue the run in ``cfg.out`` from its ``last.pt`` (also ``cfg.train.resume``).
        progress: show tqdm bars (stderr); the one-line epoch summaries are printed regardless
            unless ``quiet``.
    """

    def __init__(self, cfg: ExperimentConfig, grid: TrafficGrid | None = None, resume: bool | None = None,
                 progress: bool = True, quiet: bool = False, hooks: Hooks | None = None):
        self.cfg = cfg
        self.grid = grid
        self.resume = bool(cfg.train.resume if resume is None else resume)
        self.progress = progress
        self.quiet = quiet
        self.hooks = hooks or Hooks()
        self.history: list[dict] = []
        self.s2r_loop = None  # Sim2RealLoop (sim2real modes, see simmstnet.train.sim2real_loop)
        self.val_is_training = cfg.sim2real.mode != "off" and cfg.sim2real.upper_data == "val"
        # Validation picks no epoch (every epoch counts as the best, the last is kept) when it was
        # training data, or when the mode picks its own model (finetune: a held-out slice of the
        # real windows; Reweighter.picks_model).
        self.keep_last = self.val_is_training or (cfg.sim2real.mode != "off" and bool(_mode_picks_model(cfg)))

    # sim2real pieces, for hooks and tests (the loop owns them)
    @property
    def rw(self):
        """The reweighter of a sim2real run (None otherwise, or before it is built)."""
        return self.s2r_loop.rw if self.s2r_loop is not None else None

    @property
    def sim(self):
        """The simulated window set of a sim2real run (None otherwise)."""
        return self.s2r_loop.sim if self.s2r_loop is not None else None

    @property
    def holdout(self):
        """The real windows a mode keeps aside to pick its model (finetune), else None."""
        return self.s2r_loop.holdout if self.s2r_loop is not None else None

    # ------------------------------------------------------------------ helpers
    def log(self, text: str) -> None:
        if self.dist.is_main and not self.quiet:
            tqdm.write(text, file=sys.stderr)

    def _out_folder(self) -> Path:
        out = self.cfg.out
        if out is None:
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            out = str(Path("runs") / f"{self.cfg.model.name}-{stamp}")
        # Every rank must write to (and read from) the same folder: rank 0's choice wins.
        return Path(D.broadcast(self.dist, out))

    def _check_folder(self) -> None:
        from simmstnet.utils import check_output_folder

        check_output_folder(self.out, "out")  # a file or an unwritable place: say so before the work
        last = self.out / ckpt.LAST
        if self.resume:
            if not last.is_file():
                raise UserError(f"{self.out}: nothing to resume (no {ckpt.LAST}); start the run without --resume")
        elif last.is_file() or (self.out / "metrics.json").is_file():
            raise UserError(f"{self.out} already holds a run; use --resume to continue it or choose another out=")

    # ------------------------------------------------------------------ main
    def run(self) -> dict:
        """Train (unless the model has no parameters), evaluate, write the run folder.

        Returns the metrics.json content (on every rank; ranks other than 0 get ``{}``).
        """
        self.dist = D.setup(self.cfg.train.device)
        try:
            return self._run()
        finally:
            D.teardown(self.dist)

    def _run(self) -> dict:
        from simmstnet.models.registry import DataDims, build_model
        from simmstnet.train.loss_weighting import make_loss_weighting

        cfg, tc, info = self.cfg, self.cfg.train, self.dist
        device = info.device
        self.out = self._out_folder()
        self._check_folder()
        seed_everything(tc.seed)
        s2r = cfg.sim2real
        if s2r.mode != "off":
            from simmstnet.train.sim2real_loop import Sim2RealLoop

            self.s2r_loop = Sim2RealLoop(self)  # checks the setup: simulated data, one process
        self.data = data = prepare_data(cfg, self.grid, allow_no_train=s2r.mode != "off")
        services = data.grid.services
        n_train = len(data.train) if data.train is not None else 0
        self.log(f"data: {data.grid!r}; windows train {n_train}, val {len(data.val)}, "
                 f"test {len(data.test)}; device {device}"
                 + (f", {info.world_size} processes" if info.enabled else ""))
        if s2r.mode != "off":
            self.s2r_loop.load_sim(data)

        self.dims = dims = DataDims.from_dataset(data.train if data.train is not None else self.sim.datasets[0])
        model = build_model(cfg.model.name, dims, **cfg.model.options)
        if s2r.mode != "off" and getattr(model, "needs_cells", False):
            raise UserError(f"model {cfg.model.name} uses cell identities, which simulated cities do not "
                            f"share: it cannot train with sim2real.mode={s2r.mode}")
        if hasattr(model, "fit"):
            if data.train is None:
                raise UserError(f"model {cfg.model.name} is fitted on the real training windows, and "
                                f"data.train_days={cfg.data.train_days} leaves none")
            model.fit(data.train)
        model.to(device)
        self.model = model
        self.params = count_parameters(model)
        # Ranks draw different dropout masks; the model init above is identical on every rank.
        seed_everything(tc.seed + info.rank)
        # The folder appears only once data and model are known to work: a config mistake
        # leaves nothing behind.
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if not self.resume:
                with atomic_path(self.out / ckpt.CONFIG_FILE) as tmp:
                    tmp.write_text(dump_config(cfg))

        self.best = {"mae": math.inf, "epoch": 0}
        self.bad_epochs, self.epoch, self.train_seconds, self.finished = 0, 0, 0.0, False
        self._rng: list | None = None
        trainable = self.params > 0
        if trainable:
            self._train(model, services, make_loss_weighting)
        else:
            self.log(f"{cfg.model.name} has no trainable parameters: evaluating it directly")
            if info.is_main:
                self.finished = True
                self._save_best(model)
                # Same folder layout as a trained run; a --resume of it just evaluates again.
                ckpt.save_checkpoint(self.out / ckpt.LAST, {**self._meta(), "model": model.state_dict(),
                                                            "epoch": 0, "best": dict(self.best), "bad_epochs": 0,
                                                            "history": [], "train_seconds": 0.0,
                                                            "finished": True, "rng": None})
        D.barrier(info)
        if not info.is_main:
            return {}
        return self._finish(model)

    # ------------------------------------------------------------------ training
    def _train(self, model, services, make_loss_weighting) -> None:
        from simmstnet.data.windows import BatchLoader
        from simmstnet.train.losses import masked_sample_losses
        from simmstnet.train.sim2real_loop import passes, sim_pool_size, steps_per_epoch, steps_rule

        if self.s2r_loop is not None:  # every sim2real mode: simmstnet.train.sim2real_loop
            return self.s2r_loop.run(model, services, make_loss_weighting)
        cfg, tc, info = self.cfg, self.cfg.train, self.dist
        device = info.device
        loader = BatchLoader(self.data.train, tc.batch_size, shuffle=True, seed=tc.seed,
                             drop_last=False, rank=info.rank, world_size=info.world_size)
        # With sim2real.sim_data set, real-only training takes the sim2real modes' step budget
        # (compared modes then differ only in what they train on); otherwise one pass per epoch.
        pool = sim_pool_size(cfg, self.data.grid) if cfg.sim2real.sim_data is not None else None
        steps = steps_per_epoch(cfg, info.world_size, pool, len(loader))
        # DDP needs the same number of steps on every rank (shards may differ by one window).
        steps = D.all_reduce_min(info, steps)
        if pool is not None or cfg.sim2real.steps_per_epoch is not None:
            self.log(f"real only: {steps} optimizer steps per epoch ({steps_rule(cfg, pool)})")
        opt = make_optimizer(model.parameters(), tc)
        sched = make_scheduler(opt, tc, steps)
        if hasattr(model, "schedule_for"):  # schedules that scale with the run (DCRNN's curriculum)
            model.schedule_for(tc.epochs * steps)
        weighting = make_loss_weighting(tc.loss_weighting, len(services), beta=tc.weighting_beta,
                                        tau=tc.weighting_tau)
        if self.resume:
            self._restore(model, opt, sched, weighting)
        net = model
        if info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            probe = prepare_batch(self.data.train.get_batch(np.arange(min(2, len(self.data.train)))),
                                  self.data.train, model, device)
            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=has_unused_parameters(model, probe))
        if self.finished:
            self.log(f"{self.out}: training had finished; redoing the final evaluation")
            return

        eval_bs = tc.eval_batch_size or 4 * tc.batch_size
        # A run killed right after the epoch that triggered early stopping stays stopped.
        stop = tc.patience > 0 and self.bad_epochs >= tc.patience
        for epoch in range(self.epoch + 1, tc.epochs + 1):
            if stop:
                break
            t0 = time.perf_counter()
            net.train()
            sum_loss = torch.zeros(len(services), dtype=torch.float64)
            sum_total, n_steps = 0.0, 0
            bar = tqdm(total=steps, desc=f"epoch {epoch}/{tc.epochs}", unit="step", leave=False,
                       file=sys.stderr, disable=(not self.progress or not info.is_main) or None)
            for i, batch in enumerate(passes(loader, epoch)):
                if i >= steps:
                    break
                if self.hooks.on_batch is not None:
                    self.hooks.on_batch(info.rank, batch)
                batch = prepare_batch(batch, self.data.train, model, device)
                with autocast(device, tc.amp):
                    pred = net(batch)
                pred = pred.float()
                sums, counts = masked_sample_losses(pred, batch["y"], batch["y_mask"], kind=tc.loss)
                sums, counts = sums.sum(0), counts.sum(0)
                task_losses = sums / counts.clamp_min(1.0)                       # (C,)
                # The weighting sees the losses of the global batch, so every rank keeps the
                # same weighting state (the gradient itself is averaged by DDP).
                global_losses = (D.all_reduce_sum(info, sums.detach()) /
                                 D.all_reduce_sum(info, counts).clamp_min(1.0))
                w = weighting.weights(global_losses).to(task_losses)
                loss = (w * task_losses).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                opt.step()
                sched.step()
                sum_loss += global_losses.detach().double().cpu()
                sum_total += float(loss.detach())
                n_steps += 1
                if n_steps % tc.log_every == 0 or n_steps == steps:
                    bar.set_postfix({s: f"{v:.4f}" for s, v in zip(services, (sum_loss / n_steps).tolist())}
                                    | {"w": "/".join(f"{x:.2f}" for x in weighting.current().tolist())})
                bar.update(1)
            bar.close()
            if n_steps == 0:
                raise UserError(f"no training step in epoch {epoch}: the training split has "
                                f"{len(self.data.train)} windows for {info.world_size} process(es)")
            if info.is_main:
                stop = self._end_epoch(epoch, model, services, sum_loss / n_steps, sum_total / n_steps,
                                       weighting, opt, time.perf_counter() - t0, eval_bs,
                                       extra={"steps": n_steps})
            stop = D.broadcast(info, stop)
            # Every rank's generator states, taken where an uninterrupted run continues from.
            self._rng = D.gather(info, ckpt.rng_state())
            if info.is_main:
                self._save_last(model, opt, sched, weighting)
                self._write_history()
            if self.hooks.on_epoch_end is not None:
                self.hooks.on_epoch_end(epoch, self)
            if stop:
                break
        if info.is_main:
            # Mark the run complete: a --resume of it only redoes the final evaluation.
            self.finished = True
            self._save_last(model, opt, sched, weighting)

    def _end_epoch(self, epoch, model, services, task_loss, total_loss, weighting, opt,
                   seconds, eval_bs, extra: dict | None = None) -> bool:
        """Rank 0: validate, update early stopping and the best checkpoint, log; returns "stop"."""
        tc = self.cfg.train
        device = self.dist.device
        t0 = time.perf_counter()
        # Validation must not move the training RNG streams (resume equality depends on it).
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            val = evaluate(model, self.data.val, eval_bs, device, tc.amp, tc.loss,
                           max_windows=tc.max_val_windows, progress=self.progress, desc="validate")
        mae = val["metrics"]["overall"]["mae"]
        if mae is None or not math.isfinite(mae):
            raise UserError(f"training diverged: validation MAE is {mae} after epoch {epoch} "
                            f"(try a lower train.lr or train.grad_clip)")
        # With sim2real.upper_data=val the validation windows trained the model: they cannot pick
        # the epoch, so every epoch counts as the best one (the last is kept) and patience is off.
        # The same when the mode picks its own model (finetune: its held-out real windows).
        improved = mae < self.best["mae"] or self.keep_last
        if improved:
            self.best = {"mae": mae, "epoch": epoch}
            self.bad_epochs = 0
            self._save_best(model)
        else:
            self.bad_epochs += 1
        stop = tc.patience > 0 and self.bad_epochs >= tc.patience
        self.epoch = epoch
        self.train_seconds += seconds + (time.perf_counter() - t0)
        row: dict[str, Any] = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": total_loss}
        for s, v in zip(services, task_loss.tolist()):
            row[f"train_loss_{s}"] = v
        for s, v in zip(services, weighting.current().tolist()):
            row[f"weight_{s}"] = v
        for s, v in zip(services, val["task_losses"]):
            row[f"val_loss_{s}"] = v
        row["val_mae"] = mae
        row["val_rmse"] = val["metrics"]["overall"]["rmse"]
        for s in services:
            row[f"val_mae_{s}"] = val["metrics"][s]["mae"]
        row.update(extra or {})
        row["seconds"] = time.perf_counter() - t0 + seconds
        self.history.append(row)
        losses = " ".join(f"{s} {row[f'train_loss_{s}']:.4f}" for s in services)
        self.log(f"epoch {epoch}/{tc.epochs}  train {total_loss:.4f} ({losses})  val MAE {format_metric(mae)} "
                 f"RMSE {format_metric(row['val_rmse'])}  lr {row['lr']:.2e}  "
                 + (f"{row['steps']} steps  " if "steps" in row else "") + f"{row['seconds']:.1f}s"
                 + ("  *best*" if improved else f"  ({self.bad_epochs}/{tc.patience or '-'} without gain)"))
        return stop

    # ------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict:
        from dataclasses import asdict

        return {"model_name": self.cfg.model.name, "model_options": dict(self.cfg.model.options),
                "dims": asdict(self.dims), "services": list(self.data.grid.services),
                "scaler": self.data.scaler.state_dict(), "step": int(self.data.grid.step),
                "config": config_to_dict(self.cfg)}

    def _save_best(self, model) -> None:
        ckpt.save_checkpoint(self.out / ckpt.BEST, {**self._meta(), "model": model.state_dict(),
                                                    "epoch": self.best["epoch"], "val_mae": self.best["mae"]})

    def _save_last(self, model, opt, sched, weighting) -> None:
        state = {**self._meta(), "model": model.state_dict(),
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "weighting": weighting.state_dict(), "epoch": self.epoch, "best": dict(self.best),
                 "bad_epochs": self.bad_epochs, "history": list(self.history),
                 "train_seconds": self.train_seconds, "finished": self.finished, "rng": self._rng}
        if self.rw is not None:
            state.update(self.s2r_loop.checkpoint_state())
        ckpt.save_checkpoint(self.out / ckpt.LAST, state)

    def _restore(self, model, opt, sched, weighting) -> None:
        state = ckpt.load_checkpoint(self.out / ckpt.LAST, map_location="cpu")
        if state["model_name"] != self.cfg.model.name or state["services"] != list(self.data.grid.services):
            raise UserError(f"{self.out / ckpt.LAST}: checkpoint of {state['model_name']} on "
                            f"{state['services']} does not match this config")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        weighting.load_state_dict(state["weighting"])
        self.epoch, self.best, self.bad_epochs = int(state["epoch"]), dict(state["best"]), int(state["bad_epochs"])
        self.history = list(state["history"])
        if self.rw is not None:
            if "sim2real" not in state:
                raise UserError(f"{self.out / ckpt.LAST}: checkpoint has no sim2real state; this config "
                                f"sets sim2real.mode={self.cfg.sim2real.mode}")
            self.s2r_loop.load_checkpoint_state(state)
        self.train_seconds = float(state["train_seconds"])
        self.finished = bool(state.get("finished", False))
        self._rng = rng = state.get("rng")
        if rng is not None and len(rng) == self.dist.world_size:
            ckpt.set_rng_state(rng[self.dist.rank])
        elif rng is not None:
            # A different number of processes: reproducible, but not identical to an uninterrupted run.
            self.log(f"resuming with {self.dist.world_size} processes instead of {len(rng)}: RNG streams re-seeded")
            seed_everything(self.cfg.train.seed + 7919 * (self.epoch + 1) + self.dist.rank)
        self.log(f"resumed {self.out} after epoch {self.epoch} (best val MAE {format_metric(self.best['mae'])} "
                 f"at epoch {self.best['epoch']})")

    def _write_history(self) -> None:
        keys: list[str] = ["epoch"]
        for row in self.history:
            keys += [k for k in row if k not in keys and k != "stop"]
        with atomic_path(self.out / "history.csv") as tmp:
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(self.history)

    # ------------------------------------------------------------------ final evaluation
    def _finish(self, model) -> dict:
        """Rank 0: best model on every val and test window; metrics.json and figures."""
        from simmstnet.eval.plots import plot_loss_curves

        cfg, tc = self.cfg, self.cfg.train
        device = self.dist.device
        best = ckpt.load_checkpoint(self.out / ckpt.BEST, map_location="cpu")
        model.load_state_dict(best["model"])
        eval_bs = tc.eval_batch_size or 4 * tc.batch_size
        t0 = time.perf_counter()
        # Conformal calibration on the validation span, in the same pass as its metrics.
        from simmstnet.eval.intervals import ScoreCollector, cell_scales, scale_range

        g = self.data.grid
        scale = cell_scales(g.values, g.mask, scale_range(g, self.data.ranges, cfg.data.input_len,
                                                          cfg.data.train_days))
        collector = ScoreCollector(scale, self.data.val.horizon, g.services)
        val = evaluate(model, self.data.val, eval_bs, device, tc.amp, tc.loss, progress=self.progress,
                       desc="final validation", collect=collector)
        t_cal = time.perf_counter()
        try:
            cal = collector.fit(info={"calibrated_on": "val", "val_used_for_training": self.val_is_training})
            cal.save(self.out / "calibration.npz")
        except UserError as exc:
            cal = None
            self.log(f"no prediction intervals: {exc}")
        cal_seconds = val.get("interval_seconds", 0.0) + time.perf_counter() - t_cal
        test = evaluate(model, self.data.test, eval_bs, device, tc.amp, tc.loss, progress=self.progress,
                        desc="test", intervals=cal)
        eval_seconds = time.perf_counter() - t0
        metrics = {
            "model": cfg.model.name,
            "model_options": dict(cfg.model.options),
            "protocol": protocol(cfg, self.data),
            "seed": tc.seed,
            "params": self.params,
            "train_seconds": round(self.train_seconds, 3),
            "eval_seconds": round(eval_seconds, 3),
            "epochs_run": self.epoch,
            "best_epoch": self.best["epoch"],
            "optimizer_steps": sum(int(r.get("steps", 0)) for r in self.history),
            "device": str(device),
            "processes": self.dist.world_size,
            "val": val["metrics"],
            "test": test["metrics"],
        }
        if cal is not None:
            metrics["intervals"] = interval_block(cal, test, cal_seconds, eval_seconds)
        if self.rw is not None:
            metrics["sim2real"] = self.s2r_loop.metrics_block()
            self.s2r_loop.write_diagnostics()
        with atomic_path(self.out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        if not self.history:  # a model without parameters: an empty history, for a uniform folder
            self._write_history()
        plot_loss_curves(self.history, list(self.data.grid.services), self.out / "loss_curves.png")
        plot_forecasts(model, self.data, self.out, batch_size=eval_bs, device=device, amp=tc.amp,
                       label=cfg.model.name)
        if cal is not None:
            from simmstnet.eval.maps import plot_cell_maps, plot_interval_cells, write_cell_table

            write_cell_table(test["cells"], self.out / "cells.csv")
            plot_cell_maps(test["cells"], self.out, g.meta, title=f"{cfg.model.name}, test span")
            plot_interval_cells(model, self.data.test, cal, test["cells"],
                                lambda s: self.out / f"forecast_cells_{s}.png", eval_bs, device, tc.amp,
                                label=cfg.model.name)
            iv = metrics["intervals"]["test"]["overall"]
            self.log("test intervals: " + ", ".join(
                f"{int(round(100 * lv))} % coverage {format_metric(iv[f'coverage_{level_tag(lv)}'])} width "
                f"{format_metric(iv[f'width_{level_tag(lv)}'])}" for lv in cal.levels))
        t = test["metrics"]["overall"]
        self.log(f"test MAE {format_metric(t['mae'])} RMSE {format_metric(t['rmse'])} over {t['n_windows']} windows "
                 f"({t['n_observed']} observed targets); run folder {self.out}")
        return metrics


def interval_block(cal, result: dict, cal_seconds: float, eval_seconds: float, span: str = "test") -> dict:
    """metrics.json's ``intervals``: how they were made and their figures on ``span``."""
    from simmstnet.eval.intervals import level_tag

    method = result.get("interval_method", cal.method)
    block = {
        "method": method,
        "levels": list(cal.levels),
        "calibrated_on": cal.info.get("calibrated_on", "val"),
        "score": "|y - p| / s(cell, service), s = mean |one-step change| over the scaler's fit range",
        "n_calibration": {s: int(cal.n[:, c].sum()) for c, s in enumerate(cal.services)},
        "calibration_seconds": round(cal_seconds, 4),
        "interval_seconds": round(result.get("interval_seconds", 0.0), 4),
        "share_of_eval_seconds": (round((cal_seconds + result.get("interval_seconds", 0.0)) / eval_seconds, 4)
                                  if eval_seconds > 0 else None),
        span: result["intervals"],
    }
    if cal.info.get("val_used_for_training"):
        block["note"] = "validation windows were training data (sim2real.upper_data=val): coverage may be low"
    if method == "aci":
        block["gamma"] = cal.gamma
    return block


def plot_forecasts(model, data: RunData, out: Path, batch_size: int = 256, device="cpu", amp: bool = True,
                   label: str = "model", horizon_step: int = 1) -> list[Path]:
    """``forecast_<service>.png``: the busiest test cell of each service, horizon step 1."""
    from zoneinfo import ZoneInfo

    from simmstnet.eval.plots import plot_forecast

    g, (lo, hi) = data.grid, data.ranges["test"]
    paths = []
    for c, s in enumerate(g.services):
        totals = np.where(g.mask[lo:hi, :, :, c], g.values[lo:hi, :, :, c], 0).sum(0)
        row, col = (int(v) for v in np.unravel_index(int(np.argmax(totals)), totals.shape))
        t_idx, truth, fc = cell_series(model, data.test, row, col, horizon_step, batch_size, device, amp)
        tz = ZoneInfo(g.timezone)
        # Naive local datetimes: matplotlib would otherwise print aware times in UTC.
        times = [dt.datetime.fromtimestamp(int(g.timestamps[i]), tz).replace(tzinfo=None) for i in t_idx]
        paths.append(plot_forecast(times, truth[:, c], fc[:, c], out / f"forecast_{s}.png",
                                   title=f"{s}: cell (row {row}, col {col}), horizon step {horizon_step}, test span",
                                   label=label, xlabel=f"local time ({g.timezone})"))
    return paths


def _mode_picks_model(cfg: ExperimentConfig) -> str:
    """How the config's sim2real mode picks its own model ("" = it does not; Reweighter.picks_model)."""
    from simmstnet.train.sim2real import mode_class

    return mode_class(cfg.sim2real.mode).picks_model


def train(cfg: ExperimentConfig, **kwargs) -> dict:
    """Run one experiment (see :class:`Trainer`); returns the metrics.json content."""
    return Trainer(cfg, **kwargs).run()
