"""Masked per-task (per-service) regression losses.

Only observed targets count: a missing target contributes neither to the value nor to the
gradient, and a service with no observed target in the batch gets a loss of exactly 0 with a
zero gradient (so the loss weighting can tell "no information" from "small loss").
"""
from __future__ import annotations

import torch

from simmstnet.errors import UserError

LOSS_KINDS = ("mse", "mae", "huber")


def _elementwise(diff: torch.Tensor, kind: str, huber_delta: float) -> torch.Tensor:
    if kind == "mse":
        return diff * diff
    if kind == "mae":
        return diff.abs()
    if kind == "huber":
        return torch.nn.functional.huber_loss(diff, torch.zeros_like(diff), reduction="none",
                                              delta=huber_delta)
    raise UserError(f"unknown loss kind {kind!r}; choose one of {', '.join(LOSS_KINDS)}")


def masked_sample_losses(pred: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor,
                         kind: str = "mse", huber_delta: float = 1.0):
    """Per-window, per-service loss summed over observed horizon steps, and the counts.

    pred, y: (B, H, C) float; y_mask: (B, H, C) bool.
    Returns ``(sums (B, C), counts (B, C))``; ``sums / counts`` is each window's mean loss.
    Useful where windows carry weights (sim2real): weight the sums, then divide by the total count.
    """
    if pred.shape != y.shape or y_mask.shape != y.shape:
        raise ValueError(f"shape mismatch: pred {tuple(pred.shape)}, y {tuple(y.shape)}, "
                         f"y_mask {tuple(y_mask.shape)}")
    mask = y_mask.bool()
    # Mask the difference, not the loss: an unobserved y may be NaN, and where() after the
    # square would still send NaN * 0 = NaN back through the square's gradient.
    diff = torch.where(mask, pred - torch.where(mask, y, torch.zeros_like(y)), torch.zeros_like(pred))
    err = _elementwise(diff, kind, huber_delta)
    return err.sum(dim=1), mask.sum(dim=1).to(err.dtype)


def masked_task_losses(pred: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor,
                       kind: str = "mse", sample_weight: torch.Tensor | None = None,
                       huber_delta: float = 1.0) -> torch.Tensor:
    """Mean loss over observed targets, per service.

    pred, y: (B, H, C) scaled units; y_mask: (B, H, C) bool; sample_weight: optional (B,)
    per-window weights (e.g. sim2real sigmoid(lambda_j)) that multiply each window's terms while
    the denominator stays the observed count, i.e. (1/N) sum_j w_j loss_j.
    Returns (C,); a service with no observed target gives 0 (and a zero gradient).
    """
    sums, counts = masked_sample_losses(pred, y, y_mask, kind, huber_delta)
    if sample_weight is not None:
        if sample_weight.shape != sums.shape[:1]:
            raise ValueError(f"sample_weight must have shape ({sums.shape[0]},), "
                             f"got {tuple(sample_weight.shape)}")
        sums = sums * sample_weight.to(sums.dtype)[:, None]
    return sums.sum(dim=0) / counts.sum(dim=0).clamp_min(1.0)
