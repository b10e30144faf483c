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

The stepper shares the reweighter interface (:class:`~simmstnet.train.sim2real.Reweighter`):
``step(sim_batch, real_batch)`` accumulates the gradient; :meth:`FineTuner.needs` tells the loop
which batch the next step reads, :meth:`FineTuner.lr_factor` its schedule.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from simmstnet.errors import UserError
from simmstnet.train.sim2real import Reweighter


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


class FineTuner(Reweighter):
    """Pretrain-then-fine-tune stepper; see the module docstring. Every simulated window has
    weight 1 (pretraining uses them uniformly)."""

    mode = "finetune"

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
        self.done = False  # early stopping has fired: the trainer ends the run
        self.checks: list[tuple[int, float]] = []

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
