"""Informer-style input embedding: value + calendar (external) + sinusoidal position."""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    """Fixed sine/cosine position codes (Vaswani et al. 2017). Returns (length, d_model)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : d_model // 2]
    return table


class DataEmbedding(nn.Module):
    """Embed a short multichannel series with its calendar features.

    The value embedding is a width-3 1-D convolution (local shape, as in Informer) over
    ``n_values`` channels; here the value and its observed flag, so that a missing step (value 0)
    is distinguishable from a true zero. Calendar features enter through a linear map.
    """

    def __init__(self, n_values: int, n_marks: int, d_model: int, max_len: int, dropout: float = 0.0):
        super().__init__()
        # Replicate padding: the window edges see their own value, not an invented zero.
        self.value = nn.Conv1d(n_values, d_model, kernel_size=3, padding=1, padding_mode="replicate")
        self.calendar = nn.Linear(n_marks, d_model) if n_marks > 0 else None
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, values: torch.Tensor, marks: torch.Tensor | None) -> torch.Tensor:
        """values: (B, T, n_values); marks: (B, T, F) or None -> (B, T, d_model)."""
        t = values.shape[1]
        if t > self.positions.shape[0]:
            raise ValueError(f"sequence of {t} steps is longer than the embedding's {self.positions.shape[0]}")
        out = self.value(values.transpose(1, 2)).transpose(1, 2) + self.positions[:t]
        if self.calendar is not None and marks is not None:
            out = out + self.calendar(marks)
        return self.dropout(out)
