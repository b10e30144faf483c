"""Scale-free forecasting: reversible per-window normalization around any forecaster.

Why: the scaler of :mod:`simmstnet.data.scaling` is fitted once per service over every cell, so
on a grid whose cells differ by two orders of magnitude a quiet cell's window is a flat line
near -1 and a busy cell's sits far above +1, and a network whose head is bounded (LayerNorm then
Linear) cannot reach the busy cells' peaks at all. Normalizing each window by its own
statistics and mapping the forecast back (reversible instance normalization: Kim et al.,
"Reversible instance normalization for accurate time-series forecasting against
distribution shift", ICLR 2022; iTransformer's ``use_norm`` and NLinear do the same) makes
every window look alike to the network, and the output scale follows the input's.

What :class:`WindowNorm` does, per window and service, on the centre cell's *observed* input
steps (unobserved steps are 0 in the batch and must not pull the mean down):

- ``mean``, ``std`` over the observed steps of ``x`` (``std`` floored, see ``STD_FLOOR``);
- ``x`` and the known (label) part of ``dec_in`` become ``(v - mean) / std`` where observed, 0
  elsewhere; the unknown horizon part of ``dec_in`` stays 0, which now means "the window mean";
- the seasonal history (``x_season``, ``y_season``, data.season_days > 0) is normalized with the
  centre's statistics too, where known (it is the same cell's series, days earlier);
- each cell of the neighbourhood patch ``x_patch`` is normalized by *its own* window statistics
  (a neighbour 100x busier than the centre must not dominate the spatial branch; what the
  spatial branch should read from a neighbour is how its series moves, not its level);
- the model's output (B, H, C) is mapped back: ``out * std + mean``, still in the globally
  scaled units every loss and metric of the package uses.

The wrapper has no parameters of its own and holds the wrapped network as ``model``; attribute
look-ups it does not know are passed on (``needs_cells``, ``dims``, ``config``, ...).
A window with nothing observed gets mean 0 (the training mean) and the floor as std.
"""
from __future__ import annotations

import torch
from torch import nn

# Floor of the per-window standard deviation, in units of the global (per-service) scaler's
# standard deviation. A flat window (a quiet cell at night, a saturated one) would otherwise
# divide by ~0 and turn the noise of the next step into huge normalized targets. 1e-2 keeps a
# cell 100x quieter than average at least at unit-order normalized values.
STD_FLOOR = 1e-2


def window_stats(values: torch.Tensor, observed: torch.Tensor, dim: int = 1,
                 floor: float = STD_FLOOR, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of ``values`` over ``dim``, counting only ``observed`` entries.

    values, observed: same shape; returns mean, std with ``dim`` kept (size 1), detached (the
    statistics are data, not something the loss should move); std = max(sqrt(var + eps), floor).
    Nothing observed -> mean 0, std max(sqrt(eps), floor)."""
    obs = observed.to(values.dtype)
    count = obs.sum(dim, keepdim=True)
    mean = (values * obs).sum(dim, keepdim=True) / count.clamp_min(1.0)
    var = (((values - mean) * obs) ** 2).sum(dim, keepdim=True) / count.clamp_min(1.0)
    std = torch.sqrt(var + eps).clamp_min(floor)
    return mean.detach(), std.detach()


def normalize_batch(batch: dict[str, torch.Tensor], label_len: int, floor: float = STD_FLOOR
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The batch with its inputs normalized per window, and the centre statistics (B, 1, C).

    Keys per docs/contracts.md; keys the function does not know are passed through unchanged."""
    x, x_mask = batch["x"], batch["x_mask"]
    mean, std = window_stats(x, x_mask, dim=1, floor=floor)                  # (B, 1, C)
    out = dict(batch)
    out["x"] = torch.where(x_mask, (x - mean) / std, torch.zeros_like(x))
    if "dec_in" in batch:
        dec_in = batch["dec_in"]
        known = torch.zeros_like(dec_in, dtype=torch.bool)
        if label_len > 0:
            known[:, :label_len] = x_mask[:, x.shape[1] - label_len:]
        out["dec_in"] = torch.where(known, (dec_in - mean) / std, torch.zeros_like(dec_in))
    for key in ("x_season", "y_season"):                                   # seasonal history
        if key in batch and key + "_mask" in batch:
            known = batch[key + "_mask"]
            out[key] = torch.where(known, (batch[key] - mean) / std, torch.zeros_like(batch[key]))
    if "x_patch" in batch and "patch_mask" in batch:
        patch, pmask = batch["x_patch"], batch["patch_mask"]                  # (B, L, C, k, k)
        pmean, pstd = window_stats(patch, pmask, dim=1, floor=floor)
        out["x_patch"] = torch.where(pmask, (patch - pmean) / pstd, torch.zeros_like(patch))
    return out, mean, std


class WindowNorm(nn.Module):
    """``model`` run on per-window normalized inputs, its forecast mapped back (see module doc)."""

    def __init__(self, model: nn.Module, label_len: int, floor: float = STD_FLOOR):
        super().__init__()
        self.model = model
        self.label_len = int(label_len)
        self.floor = float(floor)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """batch per docs/contracts.md -> (B, H, C) forecasts in (globally) scaled units."""
        inputs, mean, std = normalize_batch(batch, self.label_len, self.floor)
        return self.model(inputs) * std + mean
