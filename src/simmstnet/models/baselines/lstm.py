"""LSTM baseline (Hochreiter & Schmidhuber 1997), the "LSTM" row of the paper's Table 1.

The usual recurrent forecaster of the cellular-traffic literature: a stacked LSTM reads the
input window step by step and a linear head maps its last hidden state to all H forecast steps
at once (direct multi-step output; no autoregressive roll-out, so no error accumulation and no
teacher forcing to tune). Each step's input is [value, observed flag, calendar features].

Services are independent univariate series with shared weights (see ``_temporal``). The model is
purely temporal: it never reads the neighbourhood patch.

Defaults: there is no single reference implementation of "LSTM" for this task (the paper gives
no sizes). Hidden 64 and 2 layers with dropout 0.1 between them are our choice: a mid-size
model, cheap on a CPU. Every size is an option.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from simmstnet.models.baselines._temporal import check_batch, check_dims, check_options, encoder_inputs, \
    unfold_services
from simmstnet.models.registry import DataDims, register_model


@dataclass
class LSTMConfig:
    """Options of the LSTM baseline (set via ``model.<field>=...``)."""

    hidden_size: int = field(default=64, metadata={"help": "LSTM hidden units per layer (no paper value)"})
    n_layers: int = field(default=2, metadata={"help": "stacked LSTM layers (no paper value)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout between LSTM layers and before the head"})


@register_model("lstm", multitask=False, config=LSTMConfig,
                description="LSTM: stacked LSTM over the input window, linear head to the horizon (temporal only)")
class LSTMForecaster(nn.Module):
    """Stacked LSTM + linear head, one univariate series per service."""

    config_class = LSTMConfig

    def __init__(self, dims: DataDims, config: LSTMConfig | None = None):
        super().__init__()
        cfg = config or LSTMConfig()
        check_options("lstm", cfg, ("hidden_size", "n_layers"))
        check_dims("lstm", dims)
        self.dims, self.config = dims, cfg
        # Inputs per step: value, observed flag, F calendar features.
        self.lstm = nn.LSTM(2 + dims.n_marks, cfg.hidden_size, num_layers=cfg.n_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.n_layers > 1 else 0.0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden_size, dims.horizon)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x, x_mask: (B, L, C); x_mark: (B, L, F) -> (B, H, C) scaled forecasts."""
        check_batch("lstm", self.dims, batch)
        values, marks = encoder_inputs(batch)                           # (B*C, L, 2), (B*C, L, F)
        _, (hidden, _) = self.lstm(torch.cat([values, marks], dim=-1))  # hidden: (layers, B*C, hidden)
        out = self.head(self.dropout(hidden[-1]))                       # (B*C, H)
        return unfold_services(out, self.dims.n_services)
