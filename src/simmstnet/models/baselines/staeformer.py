"""STAEformer (Liu et al., "Spatio-Temporal Adaptive Embedding Makes Vanilla Transformer SOTA for
Traffic Forecasting", CIKM 2023), single-task baseline.

On the cell's k x k patch (N = k*k nodes, :func:`~simmstnet.models.layers.graph.patch_nodes`):

1. embedding layer: per node and step, ``[input projection of the values,
   time-of-day embedding, day-of-week embedding, spatio-temporal adaptive embedding]``
   concatenated; the adaptive embedding is one learned vector per (input step, node)
   (xavier-uniform init) that lets attention find the spatial and temporal relations itself;
2. temporal transformer layers (self-attention along time, per node), then spatial transformer
   layers (self-attention across nodes, per step); vanilla post-norm layers, here the shared
   :class:`~simmstnet.models.layers.encoder.EncoderLayer` with full attention;
3. regression layer ("mixed projection"): each node's L x d features flattened, one linear map
   to H x C outputs; the centre node's output is the forecast (only its targets exist, and the
   map is shared by the nodes, so only the centre is computed).

Defaults follow the reference implementation (xdzhelheim/STAEformer) in structure (3 temporal +
3 spatial layers, 4 heads, dropout 0.1, no separate node embedding, mixed projection); widths are
halved for CPU training of 10,000 cells: input/time-of-day/day-of-week embeddings 12 (ref. 24),
adaptive embedding 40 (ref. 80), feed-forward 128 (ref. 256). The feed-forward activation is the
shared layer's GELU (reference: ReLU).

Adapted: the spatial domain is the cell's patch and the forecast its centre cell (same per-cell
windows, trainer and metrics as every model; scales to 10,000 cells; out-of-grid patch cells
enter with zero input and a False mask channel); node inputs are every service's scaled value
and observed flag (2C); time of day and weekday come from the calendar marks (local time), the
time-of-day table having ``tod_slots`` rows (reference: 288 five-minute slots; coarser data uses
a subset of rows). Without calendar marks (n_marks < 2) those two embeddings are left out.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from simmstnet.errors import UserError
from simmstnet.models.layers.encoder import EncoderLayer
from simmstnet.models.layers.graph import check_patch_batch, patch_nodes
from simmstnet.models.registry import DataDims, register_model


@dataclass
class STAEformerConfig:
    """Options of the STAEformer baseline (``model.<field>=...``)."""

    input_embedding_dim: int = field(default=12,
                                     metadata={"help": "width of the input projection (reference: 24; halved for CPU)"})
    tod_embedding_dim: int = field(default=12,
                                   metadata={"help": "time-of-day embedding width (reference: 24; halved for CPU)"})
    dow_embedding_dim: int = field(default=12,
                                   metadata={"help": "day-of-week embedding width (reference: 24; halved for CPU)"})
    adaptive_embedding_dim: int = field(default=40,
                                        metadata={"help": "adaptive embedding width (reference: 80; halved for CPU)"})
    feed_forward_dim: int = field(default=128,
                                  metadata={"help": "feed-forward hidden width (reference: 256; halved for CPU)"})
    n_heads: int = field(default=4,
                         metadata={"help": "attention heads (reference: 4; must divide the summed embedding width)"})
    layers: int = field(default=3,
                        metadata={"help": "temporal layers, and as many spatial layers (reference: 3)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout probability (reference: 0.1)"})
    tod_slots: int = field(default=288,
                           metadata={"help": "rows of the time-of-day table (reference: 288 = 5-minute slots)"})


@register_model("staeformer", multitask=False, config=STAEformerConfig,
                description="STAEformer (Liu et al. 2023): adaptive-embedding temporal + spatial "
                            "transformer on the patch")
class STAEformer(nn.Module):
    config_class = STAEformerConfig

    def __init__(self, dims: DataDims, config: STAEformerConfig | None = None):
        super().__init__()
        cfg = config or STAEformerConfig()
        for name in ("input_embedding_dim", "feed_forward_dim", "n_heads", "layers", "tod_slots"):
            if getattr(cfg, name) < 1:
                raise UserError(f"model 'staeformer' option {name} must be at least 1, got {getattr(cfg, name)}")
        for name in ("tod_embedding_dim", "dow_embedding_dim", "adaptive_embedding_dim"):
            if getattr(cfg, name) < 0:
                raise UserError(f"model 'staeformer' option {name} must be >= 0, got {getattr(cfg, name)}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise UserError(f"model 'staeformer' option dropout must be in [0, 1), got {cfg.dropout}")
        self.dims, self.config = dims, cfg
        has_calendar = dims.n_marks >= 2  # hour-of-day and day-of-week columns
        tod_dim = cfg.tod_embedding_dim if has_calendar else 0
        dow_dim = cfg.dow_embedding_dim if has_calendar else 0
        self.model_dim = cfg.input_embedding_dim + tod_dim + dow_dim + cfg.adaptive_embedding_dim
        if self.model_dim % cfg.n_heads:
            raise UserError(f"model 'staeformer': the summed embedding width {self.model_dim} must be divisible "
                            f"by n_heads={cfg.n_heads}")
        n = dims.patch * dims.patch
        self.input_proj = nn.Linear(2 * dims.n_services, cfg.input_embedding_dim)
        self.tod = nn.Embedding(cfg.tod_slots, tod_dim) if tod_dim else None
        self.dow = nn.Embedding(7, dow_dim) if dow_dim else None
        if cfg.adaptive_embedding_dim:
            self.adaptive = nn.Parameter(nn.init.xavier_uniform_(
                torch.empty(dims.input_len, n, cfg.adaptive_embedding_dim)))
        else:
            self.adaptive = None
        d = self.model_dim
        self.temporal = nn.ModuleList(EncoderLayer(d, cfg.n_heads, cfg.feed_forward_dim, "full", dropout=cfg.dropout)
                                      for _ in range(cfg.layers))
        self.spatial = nn.ModuleList(EncoderLayer(d, cfg.n_heads, cfg.feed_forward_dim, "full", dropout=cfg.dropout)
                                     for _ in range(cfg.layers))
        self.output_proj = nn.Linear(dims.input_len * d, dims.horizon * dims.n_services)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x_patch, patch_mask: (B, L, C, k, k); x_mark: (B, L, F) -> (B, H, C) forecast of the
        centre cell, scaled."""
        check_patch_batch(batch, self.dims, "staeformer")
        nodes = patch_nodes(batch)  # (B, L, N, 2C)
        b, length, n, _ = nodes.shape
        parts = [self.input_proj(nodes)]
        marks = batch["x_mark"]
        if self.tod is not None:
            # Marks are seconds-of-day / 86400 - 0.5 and weekday / 6 - 0.5 (data.calendar).
            slots = self.config.tod_slots
            tod = torch.round((marks[..., 0].double() + 0.5) * slots).long() % slots
            parts.append(self.tod(tod)[:, :, None].expand(b, length, n, -1))
        if self.dow is not None:
            dow = torch.round((marks[..., 1].double() + 0.5) * 6).long().clamp(0, 6)
            parts.append(self.dow(dow)[:, :, None].expand(b, length, n, -1))
        if self.adaptive is not None:
            parts.append(self.adaptive.expand(b, length, n, -1))
        h = torch.cat(parts, dim=-1)  # (B, L, N, d)
        d = h.shape[-1]
        h = h.transpose(1, 2).reshape(b * n, length, d)  # attention along time, per node
        for layer in self.temporal:
            h = layer(h)
        h = h.reshape(b, n, length, d).transpose(1, 2).reshape(b * length, n, d)  # across nodes, per step
        for layer in self.spatial:
            h = layer(h)
        centre = h.reshape(b, length, n, d)[:, :, n // 2].reshape(b, length * d)
        return self.output_proj(centre).view(b, self.dims.horizon, self.dims.n_services)
