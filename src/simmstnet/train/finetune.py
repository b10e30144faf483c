"""``sim2real.mode=finetune``: pretrain on simulated windows, then fine-tune on the real ones.

The reference any reweighting of simulated data has to beat. Over a run of S optimizer steps:

1. pretraining, steps t < T_pre = round(pretrain_share x S): the plain mean loss of a simulated
   batch at the run's learning-rate schedule (cosine over the pretraining steps by default);
2. fine-tuning, t >= T_pre: the plain mean loss of a real batch from the fine-tuning windows, at
   ``finetune_lr_factor`` x the schedule restarted over the remaining steps, with the optimizer's
   moments reset at the switch (the pretraining gradient statistics do not carry over), plus the
   optional L2-SP term (alpha / 2) ||theta - theta_pre||^2 (``finetune_l2sp`` = alpha) that
   pulls theta towards the pretrained weights theta_pre (Li et al., "Explicit inductive bias for
   transfer learning with convolutional networks", ICML 2018);
3. model choice: the real windows are split in time (:func:`split_in_time`); the last
   ``finetune_holdout`` of them are never trained on and pick the model: after every pass over
   the fine-tuning windows (and at the last step) the held-out MAE is measured, the best
   parameters are kept, and after ``finetune_patience`` checks without gain the run stops.
   The model the run ends with is the best one on the held-out slice, so validation windows
   pick nothing (the trainer keeps the last epoch, as with ``upper_data=val``).

The stepper shares the reweighter interface (:class:`~simmstnet.train.sim2real.Reweighter`) and
is registered as ``sim2real.mode=finetune``: ``step(sim_batch, real_batch)`` accumulates the
gradient; its mode hooks, which the loop (:mod:`simmstnet.train.sim2real_loop`) calls for every
mode, hold what is particular to it: :meth:`FineTuner.needs` (which batch the next step reads),
:meth:`FineTuner.real_windows` (the split into fine-tuning and held-out windows),
:meth:`FineTuner.lr_factor` (its schedule), :meth:`FineTuner.before_step` (the optimizer's
moments reset at the switch), :meth:`FineTuner.after_step` (the held-out checks, early stopping
and the restore of the best parameters) and :meth:`FineTuner.metrics_block`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from simmstnet.errors import UserError
from simmstnet.train.sim2real import Reweighter, register_mode
from simmstnet.utils import format_metric


def split_in_time(target_range: tuple[int, int], horizon: int,
                  holdout: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(fine-tuning range, held-out range)`` of target steps from ``target_range`` [lo, hi).

    The held-out range is the last ``holdout`` share of the steps, at least one horizon long; the
    windows whose targets would straddle the cut belong to neither range, so no held-out target
    is ever a fine-tuning target (held-out inputs may read fine-tuning targets: they are known
    history at the held-out forecast origins)."""
    lo, hi = (int(v) for v in target_range)
    n = hi - lo
    keep = max(int(horizon), int(round(holdout * n)))
    cut = hi - keep
    if cut - lo < horizon:
        raise UserError(f"sim2real.finetune_holdout={holdout}: the real windows' {n} target steps leave "
                        f"no fine-tuning window before the held-out slice of {keep} steps (a window "
                        f"needs {horizon} target steps); lower finetune_holdout or use more real days")
    return (lo, cut), (cut, hi)


@register_mode("finetune")
class FineTuner(Reweighter):
    """Pretrain-then-fine-tune stepper; see the module docstring. Every simulated window has
    weight 1 (pretraining uses them uniformly)."""

    mode = "finetune"
    real_windows_for = "to fine-tune on"
    picks_model = "the held-out real windows pick the model"
    history_keys = (*Reweighter.history_keys, "holdout_mae")

    def __init__(self, model, n_sim, cfg, sample_loss, device=None, steps_per_epoch=None,
                 total_steps=None):
        super().__init__(model, n_sim, cfg, sample_loss, device, steps_per_epoch, total_steps)
        if not total_steps:
            raise ValueError("finetune: total_steps is needed to split pretraining and fine-tuning")
        self.T_pre = int(round(cfg.pretrain_share * total_steps))
        self.theta_pre: Optional[dict[str, torch.Tensor]] = None  # set at the first fine-tuning step
        self.best: Optional[dict[str, torch.Tensor]] = None
        self.best_score = math.inf
        self.best_step = -1
        self.bad_checks = 0
        self.done = False  # early stopping has fired: the loop ends the run
        self.checks: list[tuple[int, float]] = []
        self.holdout = None  # the held-out real windows (real_windows)
        self.pass_len: Optional[int] = None  # steps per pass over the fine-tuning windows (start)

    def phase(self, t: Optional[int] = None) -> str:
        t = self.t if t is None else t
        return "pretrain" if t < self.T_pre else "finetune"

    def needs(self) -> str:
        """The batch the next step reads: ``sim`` (pretraining) or ``real`` (fine-tuning)."""
        return "sim" if self.phase() == "pretrain" else "real"

    def lr_factor(self, base: Callable[[int, int], float]) -> Callable[[int], float]:
        """The learning-rate factor per step: ``base(step, n)`` is the run's schedule over n steps,
        run over the pretraining steps, then restarted at ``finetune_lr_factor`` x over the rest."""
        T_pre, total, k = self.T_pre, self.total_steps, self.cfg.finetune_lr_factor

        def factor(step: int) -> float:
            if step < T_pre:
                return base(step, T_pre)
            return k * base(step - T_pre, max(1, total - T_pre))
        return factor

    def weights(self) -> torch.Tensor:
        return torch.ones(self.n_sim)

    # -- mode hooks ------------------------------------------------------------------------
    def real_windows(self, real_ds):
        """The fine-tuning windows of ``real_ds``; the held-out ones, split off in time
        (:func:`split_in_time`), go to :attr:`holdout`."""
        from simmstnet.data.windows import WindowDataset

        ft_range, ho_range = split_in_time(real_ds.target_range, real_ds.horizon, self.cfg.finetune_holdout)
        common = dict(input_len=real_ds.input_len, label_len=real_ds.label_len, horizon=real_ds.horizon,
                      patch=real_ds.patch, scaler=real_ds.scaler, season_days=real_ds.season_days,
                      season_stat=real_ds.season_stat,
                      history_start=real_ds.history_start, services=real_ds.services)
        fine = WindowDataset(real_ds.grid, stride=real_ds.stride, target_range=ft_range, **common)
        self.holdout = WindowDataset(real_ds.grid, target_range=ho_range, **common)
        return fine

    def start(self, real_loader, log) -> None:
        self.pass_len = len(real_loader)  # a held-out check after every pass over the fine-tuning windows
        total = self.total_steps
        log(f"sim2real finetune: {self.T_pre} pretraining steps on simulated windows, then "
            f"{total - self.T_pre} fine-tuning steps on {len(real_loader.ds)} real windows at "
            f"{self.cfg.finetune_lr_factor:g} x the learning rate; {len(self.holdout)} "
            f"held-out real windows pick the model (checked every {self.pass_len} steps)")

    def before_step(self, opt) -> None:
        if self.t == self.T_pre and self.T_pre > 0:
            opt.state.clear()  # fine-tuning starts with fresh moments (see the module docstring)

    def after_step(self, evaluate, log) -> bool:
        """The held-out check when one is due; at the end of fine-tuning (last step or early stop)
        the best held-out parameters are loaded. Returns "stop now"."""
        if self.phase(self.t - 1) != "finetune":
            return False
        last = self.t >= self.total_steps
        if (self.t - self.T_pre) % self.pass_len == 0 or last:
            res = evaluate(self.holdout)
            mae = res["metrics"]["overall"]["mae"]
            if mae is None or not math.isfinite(mae):
                raise UserError(f"fine-tuning diverged: held-out MAE is {mae} at step {self.t} "
                                f"(try a lower sim2real.finetune_lr_factor or train.lr)")
            self.check(mae)
        if last or self.done:
            self.restore_best()
            if self.done:
                log(f"sim2real finetune: {self.bad_checks} held-out checks without gain, stopping at "
                    f"step {self.t}; best held-out MAE {format_metric(self.best_score)} at step {self.best_step}")
        return self.done

    def metrics_block(self) -> dict:
        cfg = self.cfg
        return {"finetune": {"pretrain_steps": self.T_pre, "finetune_lr_factor": cfg.finetune_lr_factor,
                             "l2sp": cfg.finetune_l2sp, "n_holdout_windows": len(self.holdout),
                             "holdout_target_steps": list(self.holdout.target_range),
                             "best_holdout_mae": self.best_score if math.isfinite(self.best_score) else None,
                             "best_step": self.best_step, "checks": len(self.checks),
                             "stopped_early": self.done}}

    def step(self, sim_batch, real_batch) -> dict:
        params = self._params()
        phase = self.phase()
        if phase == "pretrain":
            if sim_batch is None:
                raise ValueError("finetune: a pretraining step needs a simulated batch")
            loss = self._losses(params, sim_batch).mean()
            loss.backward()
            diag = {"phase": phase, "loss": float(loss.detach())}
        else:
            if real_batch is None:
                raise ValueError("finetune: a fine-tuning step needs a real batch")
            if self.theta_pre is None:
                self.theta_pre = {n: p.detach().clone() for n, p in params.items()}
            loss = self._losses(params, real_batch).mean()
            loss.backward()
            diag = {"phase": phase, "loss": float(loss.detach())}
            alpha = self.cfg.finetune_l2sp
            if alpha > 0:
                # gradient of (alpha / 2) ||theta - theta_pre||^2, added to what backward left
                pull = {n: alpha * (p.detach() - self.theta_pre[n]) for n, p in params.items()}
                self._accumulate_grad(pull)
                diag["l2sp"] = 0.5 * alpha * float(sum((d / alpha).pow(2).sum() for d in pull.values()))
        self.t += 1
        return self._log(diag)

    def check(self, score: float) -> bool:
        """Record the held-out score (lower is better) of the current parameters; True if it is the
        best so far (then the parameters are kept). Sets :attr:`done` when patience runs out."""
        self.checks.append((self.t, float(score)))
        if score < self.best_score:
            self.best_score, self.best_step, self.bad_checks = float(score), self.t, 0
            self.best = {n: p.detach().clone() for n, p in self._params().items()}
            return True
        self.bad_checks += 1
        if self.cfg.finetune_patience > 0 and self.bad_checks >= self.cfg.finetune_patience:
            self.done = True
        return False

    def restore_best(self) -> None:
        """Load the best held-out parameters into the model (nothing before the first check)."""
        if self.best is None:
            return
        with torch.no_grad():
            for n, p in self._params().items():
                p.copy_(self.best[n])

    def end_epoch(self) -> dict:
        out = super().end_epoch()
        out["phase"] = self.phase()
        if math.isfinite(self.best_score):
            out.update(holdout_mae=self.best_score, best_step=self.best_step)
        out["checks"] = len(self.checks)
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "T_pre": self.T_pre, "theta_pre": self.theta_pre, "best": self.best,
                "best_score": self.best_score, "best_step": self.best_step, "bad_checks": self.bad_checks,
                "done": self.done, "checks": list(self.checks)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        def here(params):
            return None if params is None else {n: v.to(self.device) for n, v in params.items()}

        self.theta_pre, self.best = here(state["theta_pre"]), here(state["best"])
        self.best_score, self.best_step = float(state["best_score"]), int(state["best_step"])
        self.bad_checks, self.done = int(state["bad_checks"]), bool(state["done"])
        self.checks = [tuple(c) for c in state["checks"]]
