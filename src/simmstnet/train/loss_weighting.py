"""Task loss weighting for multi-task training (paper eq. 13-14) and the static ablation.

The paper's equations were lost in extraction; it states that per-task weights are updated
every iteration from the task losses with an exponential smoothing factor beta, and that the
total loss is the weighted sum. The rule implemented here (a smoothed form of Dynamic Weight
Average, Liu et al. 2019, with the inverse training rate of GradNorm, Chen et al. 2018):

    at each step t, for every task k with observed targets in the batch (loss L_k(t) > 0):
        E_k(t) = L_k(t)                                  at the task's first such step (E_k(0))
        E_k(t) = beta * E_k(t-1) + (1 - beta) * L_k(t)   afterwards
    r_k(t) = E_k(t) / E_k(0)                             (relative progress; 1 before any data)
    w_k(t) = C * softmax_k(r_k(t) / tau)                 (sum_k w_k = C, all w_k > 0)
    total  = sum_k w_k(t) * L_k(t)                       (weights are constants: no gradient)

A task whose loss falls more slowly keeps a larger r_k and so gains weight; tau controls how
uneven the weights may become (tau -> inf gives equal weights). While every loss is falling,
r_k lies in (0, 1], so two weights differ by at most a factor exp(1 / tau): the default tau = 1
nudges (at most e = 2.7x), a small tau (0.1-0.3) lets the slowest task dominate. The ratio to the task's own
start makes the rule independent of each service's loss scale. A loss of exactly 0 or a
non-finite loss means "no observed target for this task in the batch" (see
``masked_task_losses``): that task's EMA is left unchanged.

``StaticLossWeighting`` (all weights 1) is the paper's "Average" ablation; both combine the
losses as a weighted *sum*, so the two give totals of the same scale.
"""
from __future__ import annotations

from typing import Any

import torch

from simmstnet.errors import UserError


class DynamicLossWeighting:
    """EMA-smoothed relative-progress weights; see the module docstring for the rule."""

    def __init__(self, n_tasks: int, beta: float = 0.9, tau: float = 1.0):
        if n_tasks < 1:
            raise UserError(f"loss weighting needs at least one task, got n_tasks={n_tasks}")
        if not 0.0 <= beta < 1.0:
            raise UserError(f"loss weighting beta must be in [0, 1), got {beta}")
        if tau <= 0:
            raise UserError(f"loss weighting tau must be positive, got {tau}")
        self.n_tasks = int(n_tasks)
        self.beta = float(beta)
        self.tau = float(tau)
        self.ema = torch.zeros(self.n_tasks, dtype=torch.float64)
        self.start = torch.ones(self.n_tasks, dtype=torch.float64)
        self.seen = torch.zeros(self.n_tasks, dtype=torch.bool)
        self.steps = 0

    def current(self) -> torch.Tensor:
        """The weights for the present state, without updating it. Returns (C,) float32."""
        ratio = torch.where(self.seen, self.ema / self.start, torch.ones_like(self.ema))
        return (self.n_tasks * torch.softmax(ratio / self.tau, dim=0)).float()

    def weights(self, task_losses: torch.Tensor) -> torch.Tensor:
        """Update the EMAs with this step's losses and return the new weights.

        task_losses: (C,) (detached inside). Returns (C,) float32 on the losses' device, summing to C.
        """
        losses = task_losses.detach().to("cpu", torch.float64).reshape(-1)
        if losses.numel() != self.n_tasks:
            raise ValueError(f"expected {self.n_tasks} task losses, got {losses.numel()}")
        present = torch.isfinite(losses) & (losses > 0)
        first = present & ~self.seen
        self.start = torch.where(first, losses, self.start)
        smoothed = self.beta * self.ema + (1.0 - self.beta) * losses
        self.ema = torch.where(first, losses, torch.where(present, smoothed, self.ema))
        self.seen = self.seen | present
        self.steps += 1
        return self.current().to(task_losses.device)

    def combine(self, task_losses: torch.Tensor) -> torch.Tensor:
        """Weighted total sum_k w_k L_k (updates the weights); task_losses: (C,) -> scalar."""
        w = self.weights(task_losses).to(task_losses.dtype)
        return (w * task_losses).sum()

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable state, for checkpoints and resume."""
        return {"kind": "dynamic", "n_tasks": self.n_tasks, "beta": self.beta, "tau": self.tau,
                "ema": self.ema.tolist(), "start": self.start.tolist(),
                "seen": self.seen.tolist(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind", "dynamic") != "dynamic" or int(state["n_tasks"]) != self.n_tasks:
            raise UserError(f"cannot resume loss weighting: checkpoint has {state.get('kind')} weighting "
                            f"for {state.get('n_tasks')} tasks, this run has dynamic for {self.n_tasks}")
        self.beta = float(state["beta"])
        self.tau = float(state["tau"])
        self.ema = torch.tensor(state["ema"], dtype=torch.float64)
        self.start = torch.tensor(state["start"], dtype=torch.float64)
        self.seen = torch.tensor(state["seen"], dtype=torch.bool)
        self.steps = int(state["steps"])


class StaticLossWeighting:
    """Equal weights (all 1): the paper's "Average" ablation. Same interface as the dynamic one."""

    def __init__(self, n_tasks: int, **_ignored: Any):
        if n_tasks < 1:
            raise UserError(f"loss weighting needs at least one task, got n_tasks={n_tasks}")
        self.n_tasks = int(n_tasks)
        self.steps = 0

    def current(self) -> torch.Tensor:
        return torch.ones(self.n_tasks)

    def weights(self, task_losses: torch.Tensor) -> torch.Tensor:
        """task_losses: (C,) -> (C,) ones on the same device."""
        if task_losses.numel() != self.n_tasks:
            raise ValueError(f"expected {self.n_tasks} task losses, got {task_losses.numel()}")
        self.steps += 1
        return torch.ones(self.n_tasks, device=task_losses.device)

    def combine(self, task_losses: torch.Tensor) -> torch.Tensor:
        return (self.weights(task_losses).to(task_losses.dtype) * task_losses).sum()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "static", "n_tasks": self.n_tasks, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "static" or int(state["n_tasks"]) != self.n_tasks:
            raise UserError(f"cannot resume loss weighting: checkpoint has {state.get('kind')} weighting "
                            f"for {state.get('n_tasks')} tasks, this run has static for {self.n_tasks}")
        self.steps = int(state["steps"])


WEIGHTING_KINDS = ("dynamic", "average")


def make_loss_weighting(kind: str, n_tasks: int, beta: float = 0.9, tau: float = 1.0):
    """``"dynamic"`` -> DynamicLossWeighting, ``"average"`` (or ``"static"``) -> StaticLossWeighting."""
    if kind == "dynamic":
        return DynamicLossWeighting(n_tasks, beta=beta, tau=tau)
    if kind in ("average", "static"):
        return StaticLossWeighting(n_tasks)
    raise UserError(f"unknown loss weighting {kind!r}; choose one of {', '.join(WEIGHTING_KINDS)}")
