"""Informer-style attention encoder, with optional self-attention distilling."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simmstnet.models.layers.attention import AttentionLayer


class FeedForward(nn.Module):
    """Position-wise two-layer MLP. (B, T, d) -> (B, T, d)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.inner = nn.Linear(d_model, d_ff)
        self.outer = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d) -> (..., d)."""
        return self.outer(self.dropout(F.gelu(self.inner(x))))


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each with residual and post-LayerNorm (as Informer)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, attn: str = "prob", factor: int = 5,
                 dropout: float = 0.0, seed: int = 0):
        super().__init__()
        self.attention = AttentionLayer(d_model, n_heads, attn, factor, dropout, seed)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d)."""
        x = self.norm1(x + self.dropout(self.attention(x, x, x)))
        return self.norm2(x + self.dropout(self.ff(x)))


class DistilLayer(nn.Module):
    """Informer's distilling step: conv, norm, ELU, stride-2 max-pool. (B, T, d) -> (B, ceil(T/2), d)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel_size=3, padding=1, padding_mode="replicate")
        # LayerNorm rather than Informer's BatchNorm: batch statistics would couple the windows
        # of a batch, and the sim2real code reweights individual windows.
        self.norm = nn.LayerNorm(d_model)
        self.pool = nn.MaxPool1d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d) -> (B, ceil(T / 2), d)."""
        y = F.elu(self.norm(self.conv(x.transpose(1, 2)).transpose(1, 2)))
        return self.pool(y.transpose(1, 2)).transpose(1, 2)


class Encoder(nn.Module):
    """A stack of encoder layers, distilling between consecutive layers when ``distil``.

    Each layer gets its own ProbSparse sampling seed (``seed + i``) so their samples differ.
    """

    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_ff: int, attn: str = "prob",
                 factor: int = 5, dropout: float = 0.0, distil: bool = False, seed: int = 0):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, n_heads, d_ff, attn, factor, dropout, seed + i) for i in range(n_layers))
        self.distil = nn.ModuleList(DistilLayer(d_model) for _ in range(n_layers - 1)) if distil else None
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d) -> (B, T', d); T' = T, or about T / 2^(n_layers-1) with distilling."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.distil is not None and i < len(self.distil):
                x = self.distil[i](x)
        return self.norm(x)
