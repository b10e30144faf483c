"""MTTC: multitask 1-D CNN (Rezaei & Liu, "Multitask learning for network traffic
classification", ICCCN 2020), adapted from classification to forecasting.

Original (authors' Keras code, github.com/shrezaei/MultitaskTrafficClassification,
``multitaskMasked.py``): a flow is the time series of its first packets with two channels
(packet length, inter-arrival time), 60 steps. A shared trunk of three convolution blocks —
two Conv1D(kernel 3, ReLU) then MaxPool(2), with 32, 64 and 128 filters — is flattened and
passed through two Dense(256, ReLU) layers; each task (bandwidth, duration, traffic class) has
its own output Dense layer on the shared 256 features (hard parameter sharing). Adam with
gradient-norm clipping 1.0, batch 64, task losses summed with weights 1, 1, lambda=1.

Adaptation (what changed and why):
- tasks are the services of the batch (call, sms, net), each head a Linear(256 -> horizon)
  regressing its service's scaled forecast instead of a softmax over classes;
- the input series is the target cell's L steps, with channels: every service's value and
  observed flag, the neighbourhood context (mean of the observed cells of the k x k patch and
  the observed fraction) when ``spatial`` is on, and the F calendar marks. The original has no
  spatial input; the patch mean is the cheapest way to give a per-cell model the neighbours
  that every other model of the comparison sees;
- convolutions use "same" padding and ceil-mode pooling (the original's "valid" padding needs
  at least 46 input steps for three blocks; the hourly protocol has 24);
- gradient clipping, batch size and loss weights are the trainer's settings, not the model's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from simmstnet.models.layers.multitask import (cell_channels, check_batch, check_dropout, check_positive,
                                              pooled_length)
from simmstnet.models.registry import DataDims, register_model


@dataclass
class MTTCConfig:
    width: int = field(default=32, metadata={"help": "filters of the first conv block, doubled per block "
                                                     "(MTTC code: 32, 64, 128)"})
    blocks: int = field(default=3, metadata={"help": "conv blocks (two Conv1D k=3 + MaxPool 2 each; MTTC code: 3)"})
    kernel: int = field(default=3, metadata={"help": "convolution kernel size (MTTC code: 3)"})
    hidden: int = field(default=256, metadata={"help": "units of the two shared dense layers (MTTC code: 256)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout before the heads (MTTC code: none)"})
    spatial: bool = field(default=True, metadata={"help": "add the patch mean / observed fraction channels "
                                                         "(adaptation; the original has no spatial input)"})


@register_model("mttc", multitask=True, config=MTTCConfig,
                description="MTTC (Rezaei & Liu 2020): shared 1-D CNN trunk, one regression head per service")
class MTTC(nn.Module):
    def __init__(self, dims: DataDims, config: MTTCConfig):
        super().__init__()
        check_positive("mttc", width=config.width, kernel=config.kernel, hidden=config.hidden)
        check_positive("mttc", allow_zero=True, blocks=config.blocks)
        check_dropout("mttc", config.dropout)
        self.config = config
        self.dims = dims
        self.n_services, self.horizon = dims.n_services, dims.horizon
        c_in = (4 if config.spatial else 2) * dims.n_services + dims.n_marks
        layers: list[nn.Module] = []
        for i in range(config.blocks):
            c_out = config.width * 2 ** i
            for _ in range(2):
                layers += [nn.Conv1d(c_in, c_out, config.kernel, padding="same"), nn.ReLU()]
                c_in = c_out
            layers.append(nn.MaxPool1d(2, ceil_mode=True))
        self.trunk_conv = nn.Sequential(*layers)
        flat = c_in * pooled_length(dims.input_len, config.blocks)
        self.trunk_dense = nn.Sequential(nn.Flatten(), nn.Linear(flat, config.hidden), nn.ReLU(),
                                         nn.Linear(config.hidden, config.hidden), nn.ReLU(),
                                         nn.Dropout(config.dropout))
        # One head per task: the only task-specific parameters (hard sharing, as in MTTC).
        self.heads = nn.ModuleList(nn.Linear(config.hidden, dims.horizon) for _ in range(dims.n_services))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x, x_mask: (B, L, C); x_patch, patch_mask: (B, L, C, k, k); x_mark: (B, L, F)
        -> (B, H, C) scaled."""
        check_batch("mttc", batch, self.dims.input_len, self.n_services, self.dims.patch)
        series = torch.cat([cell_channels(batch, self.config.spatial), batch["x_mark"]], dim=-1)  # (B, L, ch)
        shared = self.trunk_dense(self.trunk_conv(series.transpose(1, 2)))                     # (B, hidden)
        return torch.stack([head(shared) for head in self.heads], dim=-1)                     # (B, H, C)
