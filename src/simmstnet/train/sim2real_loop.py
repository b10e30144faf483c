"""The epoch loop of the sim2real modes (``sim2real.mode`` mix | l2rw | bilevel | finetune | any
registered mode), and the step budget that real-only training shares with them.

The trainer (:class:`simmstnet.train.trainer.Trainer`) keeps the generic pieces (data, model,
validation and early stopping, checkpoints, final evaluation) and hands a sim2real run to one
:class:`Sim2RealLoop`: ``Sim2RealLoop(trainer)`` checks the setup, :meth:`~Sim2RealLoop.load_sim`
builds the simulated window set, :meth:`~Sim2RealLoop.run` trains. What the loop reads and writes
on the trainer is listed in :class:`LoopHost`.

Every mode runs the same loop: ``sim2real.steps_per_epoch`` optimizer steps per epoch (null:
:func:`steps_per_epoch`), simulated batches in reshuffled passes (:func:`passes`), real batches
without end (:func:`cycle`). Each step calls ``reweighter.step(sim_batch, real_batch)``, which
accumulates the gradient; the loop clips, steps the optimizer and the schedule. What a mode does
beyond that is a hook of its reweighter class (:class:`simmstnet.train.sim2real.Reweighter`, no-op
defaults), called here for every mode, so the loop has no per-mode branches:

* ``needs()`` which batches the step reads; ``real_windows(ds)`` the real windows it trains on
  (finetune: the fine-tuning part, the held-out part kept aside); ``lr_factor(base)`` its
  learning-rate schedule (None: the run's); ``start(real_loader, log)`` once set up;
* ``before_step(opt)`` / ``after_step(evaluate, log)`` around each step (finetune: reset the
  optimizer's moments at the switch / the held-out checks, which may end the epoch); ``done``
  ends the run after the epoch;
* ``fold_keys`` (real batches get ``fold_key``: the window's start // (input_len + horizon), the
  time block that bilevel's held-out folds are made of), ``second_order`` (no bf16 autocast), ``history_keys`` (summary keys copied into history.csv),
  ``real_windows_for`` and ``picks_model`` (class attributes, read before the model exists),
  ``metrics_block()`` (the mode's part of metrics.json).

A window's loss is the task-weighted sum of its per-service masked mean losses
(:meth:`Sim2RealLoop.sample_loss`); the task weights are updated once per step from every loss
the reweighter evaluated. The reweighter's state and the per-epoch summaries go into ``last.pt``
(:meth:`~Sim2RealLoop.checkpoint_state`); diagnostics to the ``sim2real_*`` files
(:mod:`simmstnet.train.sim2real_report`).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from simmstnet.errors import UserError
from simmstnet.eval.forecast import autocast, evaluate, prepare_batch
from simmstnet.train import checkpoint as ckpt
from simmstnet.train.trainer import make_optimizer, make_scheduler


class LoopHost(Protocol):
    """What :class:`Sim2RealLoop` uses of its trainer (:class:`simmstnet.train.trainer.Trainer`).

    Read: ``cfg``, ``dist`` (``device``, ``enabled``, ``world_size``), ``out``, ``progress``,
    ``resume``, ``hooks``, ``val_is_training``. Read and written: ``epoch`` and ``bad_epochs`` (set
    by ``_end_epoch`` / ``_restore``), ``finished``, ``_rng`` (the RNG states ``_save_last``
    stores). Called: ``log``, ``_restore``, ``_end_epoch``, ``_save_last``, ``_write_history``."""

    cfg: Any
    dist: Any
    out: Path
    progress: bool
    resume: bool
    hooks: Any
    val_is_training: bool
    epoch: int
    bad_epochs: int
    finished: bool
    _rng: list | None

    def log(self, text: str) -> None: ...

    def _restore(self, model, opt, sched, weighting) -> None: ...

    def _end_epoch(self, epoch, model, services, task_loss, total_loss, weighting, opt,
                   seconds, eval_bs, extra: dict | None = None) -> bool: ...

    def _save_last(self, model, opt, sched, weighting) -> None: ...

    def _write_history(self) -> None: ...


# ----------------------------------------------------------------------------- step budget


def steps_per_epoch(cfg, world_size: int, pool: int | None, loader_len: int) -> int:
    """Optimizer steps per epoch, one rule for every mode (off included) once simulated data
    are set: sim2real.steps_per_epoch; else ceil(min(simulated pool, train.max_windows_per_epoch)
    / global batch). Without simulated data (``pool`` None): one pass over the loader, at most
    ceil(train.max_windows_per_epoch / global batch)."""
    s2r, tc = cfg.sim2real, cfg.train
    if s2r.steps_per_epoch is not None:
        return int(s2r.steps_per_epoch)
    batch = tc.batch_size * world_size
    if pool is None:
        steps = loader_len
        if tc.max_windows_per_epoch is not None:
            # The order is a fresh permutation each epoch, so its head is a random subset.
            steps = min(steps, math.ceil(tc.max_windows_per_epoch / batch))
        return steps
    n = pool if tc.max_windows_per_epoch is None else min(pool, tc.max_windows_per_epoch)
    return max(1, math.ceil(n / batch))


def steps_rule(cfg, pool: int | None) -> str:
    """How :func:`steps_per_epoch` was set (for the log)."""
    s2r, tc = cfg.sim2real, cfg.train
    if s2r.steps_per_epoch is not None:
        return "sim2real.steps_per_epoch"
    cap = "" if tc.max_windows_per_epoch is None else f", train.max_windows_per_epoch={tc.max_windows_per_epoch}"
    return f"the same for every mode: {pool} simulated windows{cap} / batch size {tc.batch_size}"


def build_sim(cfg, grid):
    """The simulated window set (:func:`simmstnet.train.sim_data.build_sim_windows`) of the
    config, for the services and step of ``grid``."""
    from simmstnet.train.sim_data import build_sim_windows

    d, s2r = cfg.data, cfg.sim2real
    return build_sim_windows(s2r.sim_data, grid.services, grid.step, d.input_len,
                             d.label_len, d.horizon, d.patch, stride=s2r.sim_stride or d.stride,
                             scaler_kind=d.scaler, max_windows=s2r.max_sim_windows,
                             seed=cfg.train.seed, season_days=d.season_days,
                             season_stat=d.season_stat)


def sim_pool_size(cfg, grid) -> int:
    """Simulated windows a sim2real mode would use (the step budget of real-only training)."""
    return len(build_sim(cfg, grid))


def passes(loader, epoch: int):
    """An epoch's batches: the loader's order for ``epoch``, then further passes, each reshuffled
    reproducibly from (epoch, pass), when the epoch takes more steps than one pass holds."""
    loader.set_epoch(epoch)
    yield from loader
    k = 1
    while len(loader):
        loader.set_epoch(epoch * 1_000_003 + 500_000 + k)
        yield from loader
        k += 1


def cycle(loader, epoch: int):
    """Real batches without end: reshuffled on each pass, reproducibly from (epoch, pass)."""
    k = 0
    while True:
        loader.set_epoch(epoch * 1_000_003 + k)
        yield from loader
        k += 1


# ----------------------------------------------------------------------------- the loop


class Sim2RealLoop:
    """One sim2real run of a trainer (see the module docstring); ``host`` is the trainer.

    Attributes: ``mode_cls`` (the registered reweighter class), ``sim`` (SimWindowSet),
    ``real_upper`` (the real windows ``sim2real.upper_data`` names, None when there are none),
    ``rw`` (the reweighter, once :meth:`run` built it), ``history`` (one summary per epoch)."""

    def __init__(self, host: LoopHost):
        from simmstnet.train.sim2real import mode_class

        self.host = host
        self.cfg = cfg = host.cfg
        s2r = cfg.sim2real
        if s2r.sim_data is None:
            raise UserError(f"sim2real.mode={s2r.mode} needs simulated data: set sim2real.sim_data="
                            f"FILE.npz or a scenario folder (simmstnet simulate)")
        if host.dist.enabled:
            raise UserError(f"sim2real.mode={s2r.mode} does not run under torchrun/DDP (the reweighter "
                            f"differentiates through the bare model); train on one process")
        self.mode_cls = mode_class(s2r.mode)
        self.sim = None  # SimWindowSet
        self.real_upper = None
        self.rw = None  # Reweighter
        self.history: list[dict] = []
        # weight_by=scenario: one lambda per simulated city; the reweighter then sees the scenario
        # id as the window index (see run) and has n_scenarios "windows".
        self.per_scenario = s2r.weight_by == "scenario"

    @property
    def holdout(self):
        """The real windows the mode keeps aside to pick its model (finetune), else None."""
        return getattr(self.rw, "holdout", None)

    # ------------------------------------------------------------------ setup
    def load_sim(self, data) -> None:
        """Build the simulated window set and check that the real windows the mode needs exist."""
        cfg, d, s2r, host = self.cfg, self.cfg.data, self.cfg.sim2real, self.host
        self.real_upper = data.val if s2r.upper_data == "val" else data.train
        if self.real_upper is None:
            what = self.mode_cls.real_windows_for
            if what is not None:
                raise UserError(f"sim2real.mode={s2r.mode} needs real windows {what}, but "
                                f"data.train_days={d.train_days} leaves no complete training window "
                                f"(input_len + horizon = {d.input_len + d.horizon} steps); set "
                                f"sim2real.upper_data=val to use the validation span")
            if s2r.real_share is not None:
                raise UserError(f"sim2real.real_share={s2r.real_share}: data.train_days={d.train_days} "
                                f"leaves no complete real training window to draw that share from; set "
                                f"sim2real.real_share=null or sim2real.upper_data=val")
            host.log(f"data.train_days={d.train_days} leaves no complete real training window: "
                     f"sim2real.mode={s2r.mode} trains on simulated windows only")
        self.sim = build_sim(cfg, data.grid)
        picks = self.mode_cls.picks_model
        host.log(f"sim2real {s2r.mode}: {len(self.sim)} simulated windows (of {self.sim.n_available}) "
                 f"from {self.sim.n_scenarios} scenario(s); real windows for it: "
                 f"{len(self.real_upper) if self.real_upper is not None else 0} ({s2r.upper_data})"
                 + ("; validation windows are training data: early stopping off, last epoch kept"
                    if host.val_is_training else "")
                 + (f"; {picks}, validation picks no epoch (last kept)" if picks else ""))

    def sample_loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        """(B,) each window's task-weighted loss: sum_c w_c * (masked mean loss of service c).

        pred, batch["y"]: (B, H, C) scaled; the per-service sums and counts are recorded so the
        step can update the task weighting and the logged training losses."""
        from simmstnet.train.losses import masked_sample_losses

        sums, counts = masked_sample_losses(pred.float(), batch["y"], batch["y_mask"], kind=self.cfg.train.loss)
        self._task_record.append((sums.detach().sum(0), counts.detach().sum(0)))
        per_task = sums / counts.clamp_min(1.0)                                  # (B, C)
        return (per_task * self._task_w.to(per_task)).sum(1)

    # ------------------------------------------------------------------ training
    def run(self, model, services, make_loss_weighting) -> None:
        """The epoch loop (one process); ends with the host's run marked finished."""
        from simmstnet.config import reweighter_config
        from simmstnet.data.windows import BatchLoader
        from simmstnet.train.sim2real import make_reweighter

        host = self.host
        cfg, tc, device = self.cfg, self.cfg.train, host.dist.device
        mode = cfg.sim2real.mode
        sim_loader = BatchLoader(self.sim, tc.batch_size, shuffle=True, seed=tc.seed)
        steps = steps_per_epoch(cfg, host.dist.world_size, len(self.sim), len(sim_loader))
        total = tc.epochs * steps
        host.log(f"sim2real {mode}: {steps} optimizer steps per epoch, {total} in all "
                 f"({steps_rule(cfg, len(self.sim))})")
        opt = make_optimizer(model.parameters(), tc)
        weighting = make_loss_weighting(tc.loss_weighting, len(services), beta=tc.weighting_beta,
                                        tau=tc.weighting_tau)
        self._task_w = weighting.current()
        n_lambda = self.sim.n_scenarios if self.per_scenario else len(self.sim)
        self.rw = rw = make_reweighter(reweighter_config(cfg.sim2real), model, n_lambda, self.sample_loss,
                                       device=device, steps_per_epoch=steps, total_steps=total)
        if rw.note:
            host.log(f"sim2real {mode}: {rw.note}")
        real_ds = rw.real_windows(self.real_upper)
        real_loader = (BatchLoader(real_ds, cfg.sim2real.real_batch_size or tc.batch_size, shuffle=True,
                                   seed=tc.seed + 1) if real_ds is not None else None)
        sched = make_scheduler(opt, tc, steps, compose=rw.lr_factor)
        if hasattr(model, "schedule_for"):  # schedules that scale with the run (DCRNN's curriculum)
            model.schedule_for(total)
        rw.start(real_loader, host.log)
        if host.resume:
            host._restore(model, opt, sched, weighting)
        if host.finished:
            host.log(f"{host.out}: training had finished; redoing the final evaluation")
            return
        eval_bs = tc.eval_batch_size or 4 * tc.batch_size

        def evaluate_now(dataset) -> dict:
            # like validation, a mode's own check must not move the training RNG streams
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                res = evaluate(model, dataset, eval_bs, device, tc.amp, tc.loss, progress=False)
            model.train()
            return res

        stop = (tc.patience > 0 and host.bad_epochs >= tc.patience) or rw.done
        C = len(services)
        for epoch in range(host.epoch + 1, tc.epochs + 1):
            if stop:
                break
            t0 = time.perf_counter()
            sim_iter = passes(sim_loader, epoch)
            real_iter = cycle(real_loader, epoch) if real_loader is not None else None
            model.train()
            sum_loss = torch.zeros(C, dtype=torch.float64)
            sum_total, n_steps = 0.0, 0
            bar = tqdm(total=steps, desc=f"epoch {epoch}/{tc.epochs} ({mode})", unit="step", leave=False,
                       file=sys.stderr, disable=not host.progress or None)
            for _ in range(steps):
                need = rw.needs()  # finetune reads one kind of batch per step; the other modes both
                sim_batch = next(sim_iter) if need != "real" else None
                real_batch = next(real_iter) if real_iter is not None and need != "sim" else None
                if host.hooks.on_batch is not None:
                    host.hooks.on_batch(0, sim_batch if sim_batch is not None else real_batch)
                if sim_batch is not None:
                    sim_batch = prepare_batch(sim_batch, self.sim, model, device)
                    if self.per_scenario:
                        sim_batch = {**sim_batch, "index": sim_batch["scenario"]}
                if real_batch is not None:
                    real_batch = prepare_batch(real_batch, real_ds, model, device)
                    if rw.fold_keys:  # held-out folds in blocks of time, one window span long
                        start = real_ds.window_info(real_batch["index"].cpu())[0]
                        real_batch = {**real_batch, "fold_key": torch.from_numpy(
                            start // (real_ds.input_len + real_ds.horizon)).to(device)}
                rw.before_step(opt)
                self._task_w = weighting.current()
                self._task_record = []
                opt.zero_grad(set_to_none=True)
                # bf16 autocast only for first-order steps; second-order graphs stay in fp32
                with autocast(device, tc.amp and not rw.second_order):
                    diag = rw.step(sim_batch, real_batch)
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                opt.step()
                sched.step()
                sums = sum(r[0] for r in self._task_record)
                counts = sum(r[1] for r in self._task_record)
                step_losses = (sums / counts.clamp_min(1.0)).double().cpu()
                weighting.weights(step_losses)
                sum_loss += step_losses
                sum_total += float(diag.get("loss", diag.get("G", float("nan"))))
                n_steps += 1
                if n_steps % tc.log_every == 0 or n_steps == steps:
                    post = {k: f"{diag[k]:.4g}" for k in ("loss", "G", "h") if k in diag}
                    if "phase" in diag:
                        post["phase"] = diag["phase"]
                    bar.set_postfix(post)
                bar.update(1)
                if rw.after_step(evaluate_now, host.log):
                    break
            bar.close()
            if n_steps == 0:
                raise UserError(f"no training step in epoch {epoch}: {len(self.sim)} simulated windows")
            train_seconds = time.perf_counter() - t0
            summary = rw.end_epoch()
            self.history.append({**summary, "steps": n_steps, "train_seconds": train_seconds})
            extra = {f"s2r_{k}": summary[k] for k in rw.history_keys if k in summary}
            extra["s2r_train_seconds"] = train_seconds
            extra["steps"] = n_steps
            stop = host._end_epoch(epoch, model, services, sum_loss / n_steps, sum_total / n_steps,
                                   weighting, opt, train_seconds, eval_bs, extra=extra)
            stop = stop or rw.done
            host._rng = [ckpt.rng_state()]
            host._save_last(model, opt, sched, weighting)
            host._write_history()
            self.write_diagnostics()
            if host.hooks.on_epoch_end is not None:
                host.hooks.on_epoch_end(epoch, host)
            if stop:
                break
        host.finished = True
        host._save_last(model, opt, sched, weighting)

    # ------------------------------------------------------------------ state and reports
    def checkpoint_state(self) -> dict:
        """The entries of ``last.pt`` that belong to sim2real."""
        return {"sim2real": self.rw.state_dict(), "sim2real_history": list(self.history)}

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore from a ``last.pt`` content (which holds ``sim2real``)."""
        self.rw.load_state_dict(state["sim2real"])
        self.history = list(state.get("sim2real_history", []))

    def window_weights(self) -> np.ndarray:
        """(n_sim,) the final weight of every simulated window (its city's with weight_by=scenario)."""
        w = self.rw.weights().detach().cpu().numpy()
        return w[self.sim.scenario_of] if self.per_scenario else w

    def write_diagnostics(self) -> dict:
        """The sim2real diagnostics files (history, weights, report, plot) in the run folder."""
        from simmstnet.train.sim2real_report import write_diagnostics

        w = self.window_weights()
        params = self.sim.scenario_params or None
        return write_diagnostics(self.host.out, self.history, w, self.sim.scenario_of, params,
                                 param=telling_param(w, self.sim.scenario_of, params))

    def metrics_block(self) -> dict:
        """metrics.json's ``sim2real`` block."""
        from simmstnet.train.sim2real_report import weights_report

        s2r = self.cfg.sim2real
        w = self.window_weights()
        rep = weights_report(w)
        secs = [r["train_seconds"] for r in self.history]
        return {"mode": s2r.mode, "sim_data": s2r.sim_data,
                "n_sim_windows": len(self.sim), "n_sim_available": self.sim.n_available,
                "n_scenarios": self.sim.n_scenarios,
                "n_real_windows": len(self.real_upper) if self.real_upper is not None else 0,
                "real_windows_from": s2r.upper_data,
                "weight_by": s2r.weight_by,
                "val_used_for_training": self.host.val_is_training,
                "weights": {k: rep[k] for k in ("n", "n_weighted", "mean", "std", "quantiles") if k in rep},
                "seconds_per_epoch": (sum(secs) / len(secs)) if secs else None,
                "eps": getattr(self.rw, "eps", None), **self.rw.metrics_block()}


def telling_param(weights: np.ndarray, scenario_of: np.ndarray, params: dict | None) -> str | None:
    """The simulator parameter whose value correlates most (|Pearson r|) with the scenarios' mean
    weight: the most telling x-axis for the per-scenario plot (None without parameters)."""
    if not params:
        return None
    scen = np.unique(scenario_of)
    means = np.array([np.nanmean(weights[scenario_of == s]) if np.any(~np.isnan(weights[scenario_of == s]))
                      else np.nan for s in scen])
    best, best_r = next(iter(params)), -1.0
    ok = ~np.isnan(means)
    for name, vals in params.items():
        x = np.asarray(vals, dtype=np.float64)[scen][ok]
        y = means[ok]
        if x.size < 2 or np.std(x) == 0 or np.std(y) == 0:
            continue
        r = abs(float(np.corrcoef(x, y)[0, 1]))
        if r > best_r:
            best, best_r = name, r
    return best
