"""Informer-style decoder: masked self-attention, ProbSparse cross-attention, feed-forward."""
from __future__ import annotations

import torch
from torch import nn

from simmstnet.models.layers.attention import AttentionLayer
from simmstnet.models.layers.encoder import FeedForward


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention onto the memory, feed-forward; post-LayerNorm."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, cross_attn: str = "prob",
                 factor: int = 5, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        # The paper: masked multi-head self-attention (dense: the decoder input is short) and
        # ProbSparse cross-attention.
        self.self_attention = AttentionLayer(d_model, n_heads, "full", factor, dropout)
        self.cross_attention = AttentionLayer(d_model, n_heads, cross_attn, factor, dropout, seed)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x: (B, S, d); memory: (B, T, d) -> (B, S, d)."""
        x = self.norm1(x + self.dropout(self.self_attention(x, x, x, causal=True)))
        x = self.norm2(x + self.dropout(self.cross_attention(x, memory, memory)))
        return self.norm3(x + self.dropout(self.ff(x)))


class Decoder(nn.Module):
    """Decoder layers, a final LayerNorm and a linear head to one value per step."""

    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_ff: int, cross_attn: str = "prob",
                 factor: int = 5, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, n_heads, d_ff, cross_attn, factor, dropout, seed + i) for i in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 1)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x: (B, S, d) embedded decoder input; memory: (B, T, d) -> (B, S) one value per step."""
        for layer in self.layers:
            x = layer(x, memory)
        return self.head(self.norm(x)).squeeze(-1)
