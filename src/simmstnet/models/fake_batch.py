"""Fabricated batches in the layout of docs/contracts.md, for tests and speed benchmarks.

The series is a noisy daily cycle per (window, service), so that a model can learn something
from it; patches are the centre series scaled per cell. Not a data source for experiments.
"""
from __future__ import annotations

import math

import torch

from simmstnet.models.registry import DataDims


def fake_batch(dims: DataDims, batch_size: int, seed: int = 0, missing: float = 0.0,
               device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A batch dict with every key of the contract (B = batch_size); ``missing`` is the
    fraction of entries marked unobserved (values there are 0). With ``dims.season_days`` > 0
    it also carries the seasonal keys (x_season, y_season and their masks)."""
    g = torch.Generator().manual_seed(seed)
    b, c, l, h, k, f = (batch_size, dims.n_services, dims.input_len, dims.horizon, dims.patch,
                        dims.n_marks)
    total = l + h
    start = torch.randint(0, 24, (b, 1, 1), generator=g).float()
    hours = start + torch.arange(total).float()[None, :, None]  # (B, L+H, 1)
    phase = torch.rand(b, 1, c, generator=g) * 0.5
    amp = 0.5 + torch.rand(b, 1, c, generator=g)
    clean = amp * torch.sin(2 * math.pi * hours / 24 + phase)
    series = clean + 0.05 * torch.randn(b, total, c, generator=g)
    observed = torch.rand(b, total, c, generator=g) >= missing
    series = torch.where(observed, series, torch.zeros(()))

    x, x_mask = series[:, :l], observed[:, :l]
    cell_gain = 1 + 0.2 * torch.randn(b, 1, c, k, k, generator=g)
    x_patch = x[..., None, None] * cell_gain
    patch_mask = x_mask[..., None, None].expand(b, l, c, k, k).clone()
    # Hour of day in [-0.5, 0.5]; the other calendar features random but fixed.
    marks = torch.rand(b, total, f, generator=g) - 0.5
    if f > 0:
        marks[..., 0] = (hours[..., 0] % 24) / 23.0 - 0.5
    dec_in = torch.cat([x[:, l - dims.label_len:], torch.zeros(b, h, c)], dim=1)
    batch = {
        "x": x, "x_mask": x_mask, "x_patch": x_patch, "patch_mask": patch_mask,
        "x_mark": marks[:, :l], "dec_in": dec_in,
        "y_mark": marks[:, l - dims.label_len:], "y": series[:, l:], "y_raw": series[:, l:] * 10 + 50,
        "y_mask": observed[:, l:], "index": torch.arange(b, dtype=torch.int64),
    }
    if dims.season_days:
        # The previous days' mean at the same times: the cycle itself plus a little noise.
        season = clean + 0.02 * torch.randn(b, total, c, generator=g)
        dec = slice(l - dims.label_len, total)
        batch.update({"x_season": season[:, :l], "x_season_mask": torch.ones(b, l, c, dtype=torch.bool),
                      "y_season": season[:, dec],
                      "y_season_mask": torch.ones(b, dims.label_len + h, c, dtype=torch.bool)})
    return {key: v.to(device) for key, v in batch.items()}
