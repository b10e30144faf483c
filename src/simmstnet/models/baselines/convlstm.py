"""ConvLSTM (Shi et al., "Convolutional LSTM Network", NeurIPS 2015), single-task baseline.

The paper's encoding-forecasting structure on the cell's k x k neighbourhood patch:

- encoder: stacked ConvLSTM layers read the L input frames (per cell: every service's value and
  observed flag, 2C channels);
- forecaster: as many ConvLSTM layers, started from the encoder's final states, unrolled for
  the H horizon steps with no input (the paper's forecaster takes no input either);
- output: the forecaster's hidden states of all layers, concatenated, through a 1x1
  convolution to C channels per cell and step; the centre cell is the forecast.

Cells follow eq. (3) of the paper, peephole terms (W_c* o C) included; states are zero-padded
at the patch border, which the paper reads as "no prior knowledge of the outside", the same
meaning as the zero input of out-of-grid cells. Defaults: 2 layers, 3x3 kernels (the paper's
radar-echo model); hidden width 32 per layer where the paper used 64, to keep CPU training of
10,000 cells affordable. The authors released no code: the defaults come from the paper.

Adaptation (all spatial baselines): the model sees the cell's patch, not the whole city, and
forecasts the centre cell, so it trains through the same per-cell windows, trainer and metrics
as every other model and scales to 10,000 cells; services are modelled jointly as channels.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from simmstnet.errors import UserError
from simmstnet.models.layers.graph import check_patch_batch
from simmstnet.models.registry import DataDims, register_model


@dataclass
class ConvLSTMConfig:
    """Options of the ConvLSTM baseline (``model.<field>=...``)."""

    hidden: int = field(default=32,
                        metadata={"help": "hidden channels per ConvLSTM layer (paper: 64; reduced for CPU)"})
    layers: int = field(default=2,
                        metadata={"help": "ConvLSTM layers in encoder and forecaster (paper radar model: 2)"})
    kernel: int = field(default=3, metadata={"help": "odd convolution kernel side (paper radar model: 3)"})
    peephole: bool = field(default=True,
                           metadata={"help": "Hadamard peephole terms W_c o C of the paper's eq. (3)"})


class ConvLSTMCell(nn.Module):
    """One ConvLSTM cell on a k x k frame: gates from conv([input, hidden]) plus peepholes."""

    def __init__(self, in_channels: int, hidden: int, kernel: int, patch: int, peephole: bool):
        super().__init__()
        self.hidden = hidden
        # One convolution computes all four gates (i, f, candidate, o) from input and hidden state.
        self.conv = nn.Conv2d(in_channels + hidden, 4 * hidden, kernel, padding=kernel // 2)
        if peephole:
            # Per-cell peephole weights (paper: W_ci, W_cf, W_co are Hadamard-product weights).
            self.w_ci = nn.Parameter(torch.zeros(hidden, patch, patch))
            self.w_cf = nn.Parameter(torch.zeros(hidden, patch, patch))
            self.w_co = nn.Parameter(torch.zeros(hidden, patch, patch))
        else:
            self.w_ci = self.w_cf = self.w_co = None

    def forward(self, x: torch.Tensor | None, state: tuple[torch.Tensor, torch.Tensor]):
        """x: (B, C_in, k, k), or None for a cell built with C_in = 0; state: h, c (B, hidden, k, k)
        -> (h, c)."""
        h, c = state
        i, f, g, o = self.conv(h if x is None else torch.cat([x, h], dim=1)).chunk(4, dim=1)
        if self.w_ci is not None:
            i = i + self.w_ci * c
            f = f + self.w_cf * c
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        if self.w_co is not None:
            o = o + self.w_co * c  # the output gate peeks at the new cell state (paper eq. 3)
        return torch.sigmoid(o) * torch.tanh(c), c


@register_model("convlstm", multitask=False, config=ConvLSTMConfig,
                description="ConvLSTM (Shi et al. 2015): encoder-forecaster ConvLSTM on the cell's patch")
class ConvLSTM(nn.Module):
    config_class = ConvLSTMConfig

    def __init__(self, dims: DataDims, config: ConvLSTMConfig | None = None):
        super().__init__()
        cfg = config or ConvLSTMConfig()
        for name in ("hidden", "layers", "kernel"):
            if getattr(cfg, name) < 1:
                raise UserError(f"model 'convlstm' option {name} must be at least 1, got {getattr(cfg, name)}")
        if cfg.kernel % 2 == 0:
            raise UserError(f"model 'convlstm' option kernel must be odd, got {cfg.kernel}")
        self.dims, self.config = dims, cfg
        c, k = dims.n_services, dims.patch
        ins = [2 * c] + [cfg.hidden] * (cfg.layers - 1)
        self.encoder = nn.ModuleList(ConvLSTMCell(i, cfg.hidden, cfg.kernel, k, cfg.peephole) for i in ins)
        # The first forecaster layer has no input (C_in = 0): its gates read the hidden state only.
        fins = [0] + [cfg.hidden] * (cfg.layers - 1)
        self.forecaster = nn.ModuleList(ConvLSTMCell(i, cfg.hidden, cfg.kernel, k, cfg.peephole) for i in fins)
        self.head = nn.Conv2d(cfg.layers * cfg.hidden, c, kernel_size=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x_patch, patch_mask: (B, L, C, k, k) -> (B, H, C) forecast of the centre cell, scaled."""
        check_patch_batch(batch, self.dims, "convlstm")
        x = batch["x_patch"]
        frames = torch.cat([x, batch["patch_mask"].to(x.dtype)], dim=2)  # (B, L, 2C, k, k)
        b, _, _, k, _ = frames.shape
        zero = x.new_zeros(b, self.config.hidden, k, k)
        states = [(zero, zero) for _ in self.encoder]
        for t in range(frames.shape[1]):
            inp = frames[:, t]
            for j, cell in enumerate(self.encoder):
                states[j] = cell(inp, states[j])
                inp = states[j][0]
        outputs = []
        for _ in range(self.dims.horizon):
            inp = None
            for j, cell in enumerate(self.forecaster):
                states[j] = cell(inp, states[j])
                inp = states[j][0]
            outputs.append(self.head(torch.cat([s[0] for s in states], dim=1)))  # (B, C, k, k)
        centre = k // 2
        return torch.stack(outputs, dim=1)[:, :, :, centre, centre]  # (B, H, C)
