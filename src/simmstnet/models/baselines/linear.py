"""Linear references a user would try first: ridge autoregression, NLinear, DLinear.

``ridge`` (no gradient training; fitted in closed form by the trainer's ``fit`` hook): per
service, one linear map shared by every cell from the window's L inputs, sin/cos of the time
of day of the last input step and an intercept to the H targets, fitted by ridge-regularized
least squares on the training windows. Scaling per service is affine, so the fit equals a fit
in original units. Unobserved inputs take the window's most recent observed value (0, the
training mean, when there is none). At most ``max_fit_windows`` training windows (an evenly
spaced subset) enter the normal equations, which are accumulated in float64 in chunks.

``nlinear`` and ``dlinear`` (Zeng et al., "Are transformers effective for time series
forecasting?", AAAI 2023; trained by the trainer like every network):

- NLinear subtracts the window's last observed value, applies one Linear(L -> H) and adds the
  value back (the reference's ``individual=False``: one map shared by the services);
- DLinear splits the window into a moving-average trend (kernel ``kernel``, replicate padding
  as the reference) and the remainder, one Linear(L -> H) each, summed.

Reference defaults: kernel 25 (for input 336); here clipped to the largest odd size <= L.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simmstnet.errors import UserError
from simmstnet.models.baselines.naive import last_observed
from simmstnet.models.layers.embeddings import cyclic_marks
from simmstnet.models.registry import DataDims, register_model


def _filled(x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
    """x with every unobserved step replaced by the window's last observed value. (B, L, C)."""
    last = last_observed(x, x_mask).unsqueeze(1)
    return torch.where(x_mask, x, last.expand_as(x))


def ridge_features(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, C, L + 3): the filled inputs per service, sin and cos of the last input step's time of
    day (calendar column 0, in [-0.5, 0.5]) and 1."""
    x = _filled(batch["x"], batch["x_mask"].bool())                     # (B, L, C)
    b, _, c = x.shape
    # the calendar's one definition of the time-of-day circle (sin, cos: the first two appended)
    day = cyclic_marks(batch["x_mark"][:, -1])[:, -4:-2]                # (B, 2)
    extra = torch.cat([day, torch.ones_like(day[:, :1])], dim=-1)       # (B, 3)
    return torch.cat([x.transpose(1, 2), extra[:, None, :].expand(b, c, 3).to(x.dtype)], dim=-1)


@dataclass
class RidgeConfig:
    """Options of the ridge reference (``model.<field>=...``)."""

    alpha: float = field(default=1e-3, metadata={
        "help": "ridge penalty, relative to the mean diagonal of X'X (0 = plain least squares)"})
    max_fit_windows: int = field(default=200_000, metadata={
        "help": "at most this many (evenly spaced) training windows enter the fit"})


@register_model("ridge", multitask=True, config=RidgeConfig,
                description="linear reference: ridge autoregression on the input window + time of day, "
                            "one map per service shared by every cell, fitted in closed form")
class RidgeAR(nn.Module):
    """Closed-form linear autoregression; ``fit(train_dataset)`` before forecasting."""

    config_class = RidgeConfig

    def __init__(self, dims: DataDims, config: RidgeConfig | None = None):
        super().__init__()
        cfg = config or RidgeConfig()
        if cfg.alpha < 0 or not math.isfinite(cfg.alpha):
            raise UserError(f"model 'ridge' option alpha must be a finite number >= 0, got {cfg.alpha}")
        if cfg.max_fit_windows < 1:
            raise UserError(f"model 'ridge' option max_fit_windows must be at least 1, got {cfg.max_fit_windows}")
        if dims.n_marks < 1:
            raise UserError("model 'ridge' needs the calendar marks (time of day)")
        self.dims, self.config = dims, cfg
        n_feat = dims.input_len + 3
        # coef[c] maps service c's features to its H targets; zeros until fit() (buffers travel in
        # the checkpoint, so predict needs no refit).
        self.register_buffer("coef", torch.zeros(dims.n_services, n_feat, dims.horizon))
        self.register_buffer("fitted", torch.tensor(False))

    def fit(self, train_dataset, chunk: int = 8192) -> None:
        ds = train_dataset
        n = len(ds)
        if n == 0:
            raise UserError("model 'ridge' needs at least one training window")
        idx = np.arange(n) if n <= self.config.max_fit_windows else np.unique(
            np.linspace(0, n - 1, self.config.max_fit_windows).round().astype(np.int64))
        c, f, h = self.coef.shape
        xtx = torch.zeros(c, f, f, dtype=torch.float64)
        xty = torch.zeros(c, f, h, dtype=torch.float64)
        for lo in range(0, idx.shape[0], chunk):
            batch = ds.get_batch(idx[lo:lo + chunk])
            feats = ridge_features(batch).double().transpose(0, 1)          # (C, B, F)
            y_mask = batch["y_mask"].bool().permute(2, 0, 1)                # (C, B, H)
            y = torch.where(y_mask, batch["y"].double().permute(2, 0, 1), torch.zeros((), dtype=torch.float64))
            # A window counts for a service when all its targets are observed (a partially
            # observed target block would bias the shared map towards 0).
            keep = y_mask.all(-1, keepdim=True).double()                    # (C, B, 1)
            fk = feats * keep
            xtx += fk.transpose(1, 2) @ feats
            xty += fk.transpose(1, 2) @ y
        diag = torch.diagonal(xtx, dim1=1, dim2=2)                          # (C, F)
        scale = diag.mean(-1, keepdim=True).clamp_min(1e-12)
        ridge = torch.diag_embed(self.config.alpha * scale.expand_as(diag))
        ridge[:, -1, -1] = 0.0  # no penalty on the intercept
        eye = torch.eye(f, dtype=torch.float64) * 1e-10
        coef = torch.linalg.solve(xtx + ridge + eye, xty)                   # (C, F, H)
        self.coef = coef.to(self.coef.dtype).to(self.coef.device)
        self.fitted.fill_(True)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x, x_mask: (B, L, C); x_mark: (B, L, F) -> (B, H, C) scaled."""
        if not bool(self.fitted):
            raise RuntimeError("ridge: call fit(train_dataset) before forecasting")
        feats = ridge_features(batch).to(self.coef.dtype)                  # (B, C, F)
        return torch.einsum("bcf,cfh->bhc", feats, self.coef)


@dataclass
class NLinearConfig:
    """Options of NLinear (``model.<field>=...``)."""


@register_model("nlinear", multitask=True, config=NLinearConfig,
                description="NLinear (Zeng et al. 2023): last value subtracted, one Linear(L -> H), added back")
class NLinear(nn.Module):
    config_class = NLinearConfig

    def __init__(self, dims: DataDims, config: NLinearConfig | None = None):
        super().__init__()
        self.dims = dims
        self.linear = nn.Linear(dims.input_len, dims.horizon)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x, x_mask: (B, L, C) -> (B, H, C) scaled."""
        mask = batch["x_mask"].bool()
        last = last_observed(batch["x"], mask).unsqueeze(1)                 # (B, 1, C)
        x = _filled(batch["x"], mask) - last
        return self.linear(x.transpose(1, 2)).transpose(1, 2) + last


@dataclass
class DLinearConfig:
    """Options of DLinear (``model.<field>=...``)."""

    kernel: int = field(default=25, metadata={
        "help": "moving-average kernel of the trend (reference 25; clipped to the largest odd size <= input_len)"})


@register_model("dlinear", multitask=True, config=DLinearConfig,
                description="DLinear (Zeng et al. 2023): moving-average trend + remainder, one Linear(L -> H) each")
class DLinear(nn.Module):
    config_class = DLinearConfig

    def __init__(self, dims: DataDims, config: DLinearConfig | None = None):
        super().__init__()
        cfg = config or DLinearConfig()
        if cfg.kernel < 1:
            raise UserError(f"model 'dlinear' option kernel must be at least 1, got {cfg.kernel}")
        k = min(cfg.kernel, dims.input_len)
        self.kernel = k if k % 2 == 1 else k - 1
        self.dims = dims
        self.trend = nn.Linear(dims.input_len, dims.horizon)
        self.remainder = nn.Linear(dims.input_len, dims.horizon)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x, x_mask: (B, L, C) -> (B, H, C) scaled."""
        x = _filled(batch["x"], batch["x_mask"].bool()).transpose(1, 2)    # (B, C, L)
        pad = (self.kernel - 1) // 2
        b, c, l = x.shape
        padded = F.pad(x.reshape(b * c, 1, l), (pad, pad), mode="replicate") if pad else x.reshape(b * c, 1, l)
        trend = F.avg_pool1d(padded, self.kernel, stride=1).reshape(b, c, l)
        out = self.trend(trend) + self.remainder(x - trend)
        return out.transpose(1, 2)
