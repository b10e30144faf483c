"""Spatial branch (CNN + multi-head spatial attention) and the cross-task interaction block."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simmstnet.models.layers.attention import AttentionLayer


class SpatialBranch(nn.Module):
    """Neighbourhood patch history -> one vector for the centre cell.

    The CNN reads the L steps of values and observed flags as 2L input channels (the "closeness"
    layout of ST-ResNet): one 3x3 convolution mixes neighbouring cells and all time steps at once,
    which costs one conv per window instead of one per time step. Each patch cell then becomes a
    token (plus a learned cell-position embedding) and the centre cell attends, with multi-head
    attention, to every cell of its neighbourhood; the result is the cell's spatial feature.
    Only the centre query is computed, since only the centre cell is forecast.
    """

    def __init__(self, input_len: int, patch: int, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.patch = patch
        self.conv = nn.Conv2d(2 * input_len, d_model, kernel_size=3, padding=1)
        self.cell_position = nn.Parameter(torch.randn(patch * patch, d_model) * 0.02)
        self.norm_in = nn.LayerNorm(d_model)
        self.attention = AttentionLayer(d_model, n_heads, "full", dropout=dropout)
        self.norm_out = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, patch: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """patch: (B, L, k, k) scaled values (0 where unobserved); patch_mask: (B, L, k, k) bool
        -> (B, d_model)."""
        b = patch.shape[0]
        grid = torch.cat([patch, patch_mask.to(patch.dtype)], dim=1)  # (B, 2L, k, k)
        cells = F.gelu(self.conv(grid)).flatten(2).transpose(1, 2)  # (B, k*k, d)
        cells = self.norm_in(cells + self.cell_position)
        centre = cells[:, (self.patch * self.patch) // 2].unsqueeze(1)  # (B, 1, d)
        out = self.norm_out(centre + self.dropout(self.attention(centre, cells, cells)))
        return out.reshape(b, -1)


class TaskInteraction(nn.Module):
    """Multi-head attention across tasks with residual and LayerNorm. (B, C, d) -> (B, C, d).

    Tokens are the C tasks' feature vectors of the same window, so each service's representation
    is enriched by what the others see (the paper's feature interaction layer).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.attention = AttentionLayer(d_model, n_heads, "full", dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tasks: torch.Tensor) -> torch.Tensor:
        """tasks: (B, C, d) one token per task -> (B, C, d)."""
        return self.norm(tasks + self.dropout(self.attention(tasks, tasks, tasks)))
