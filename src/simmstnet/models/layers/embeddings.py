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


def cyclic_marks(marks: torch.Tensor) -> torch.Tensor:
    """The calendar marks with sin/cos of the time of day and of the time of week appended.

    marks: (..., F) per :func:`simmstnet.data.calendar.calendar_features` (column 0 hour of day
    in [-0.5, 0.5], column 1 day of week in [-0.5, 0.5]) -> (..., F + 4). A linear map of the raw
    hour column puts 23:50 and 00:00 at opposite ends; on the circle they are neighbours, and a
    daily profile becomes a sum of a few harmonics a linear layer can fit."""
    if marks.shape[-1] < 2:
        return marks
    day = 2 * math.pi * (marks[..., 0] + 0.5)                              # time of day, radians
    week = 2 * math.pi * ((marks[..., 1] + 0.5) * 6 + marks[..., 0] + 0.5) / 7   # time of week
    return torch.cat([marks, torch.stack([day.sin(), day.cos(), week.sin(), week.cos()], dim=-1)], dim=-1)


class DataEmbedding(nn.Module):
    """Embed a short multichannel series with its calendar features.

    The value embedding is a width-3 1-D convolution (local shape, as in Informer) over
    ``n_values`` channels; here the value and its observed flag, so that a missing step (value 0)
    is distinguishable from a true zero. Calendar features enter through a linear map; with
    ``cyclic=True`` the time of day and of week enter as sin/cos pairs too (:func:`cyclic_marks`).
    """

    def __init__(self, n_values: int, n_marks: int, d_model: int, max_len: int, dropout: float = 0.0,
                 cyclic: bool = False):
        super().__init__()
        # Replicate padding: the window edges see their own value, not an invented zero.
        self.value = nn.Conv1d(n_values, d_model, kernel_size=3, padding=1, padding_mode="replicate")
        self.cyclic = bool(cyclic) and n_marks >= 2
        n_in = n_marks + 4 if self.cyclic else n_marks
        self.calendar = nn.Linear(n_in, d_model) if n_marks > 0 else None
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, values: torch.Tensor, marks: torch.Tensor | None) -> torch.Tensor:
        """values: (B, T, n_values); marks: (B, T, F) or None -> (B, T, d_model)."""
        t = values.shape[1]
        if t > self.positions.shape[0]:
            raise ValueError(f"sequence of {t} steps is longer than the embedding's {self.positions.shape[0]}")
        out = self.value(values.transpose(1, 2)).transpose(1, 2) + self.positions[:t]
        if self.calendar is not None and marks is not None:
            out = out + self.calendar(cyclic_marks(marks) if self.cyclic else marks)
        return self.dropout(out)
