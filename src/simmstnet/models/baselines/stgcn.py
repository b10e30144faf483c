"""STGCN (Yu, Yin & Zhu, "Spatio-Temporal Graph Convolutional Networks", IJCAI 2018), single-task.

Architecture of the paper (Cheb variant), on the cell's k x k patch graph
(:mod:`simmstnet.models.layers.graph`):

- two ST-Conv "sandwich" blocks, each: gated temporal convolution (GLU, kernel Kt, channels
  c0) -> Chebyshev graph convolution (order Ks, channels c1, ReLU) -> gated temporal
  convolution (channels c2) -> LayerNorm over (nodes, channels) -> dropout. Each temporal
  convolution is "valid", so a block shortens the series by 2 (Kt - 1);
- output layer: a gated temporal convolution spanning the remaining steps, LayerNorm, a 1x1
  sigmoid convolution, then a linear map to the forecast.

Defaults follow the paper's experimental settings: channels (64, 16, 64) per block, Kt = 3,
Ks = 3; the authors' TensorFlow code (VeritasYin/STGCN_IJCAI-18) ships other widths in main.py,
[1, 32, 64], [64, 32, 128], and trains with keep_prob 1.0 (no dropout, our default). Residuals
of the gated temporal and graph convolutions are aligned by zero-padding (fewer input channels) or a 1x1 convolution (more),
as in that code. The graph follows the paper's Gaussian kernel with thresholding, but on patch
cells (distances in cell units, sigma = 1, threshold 0.1, 8 neighbours; the paper used
sigma^2 = 10 and epsilon = 0.5 on PeMS distances in 10 km units); lambda_max is computed exactly.

Adapted: (1) the graph is the cell's patch and the forecast is its centre node (same per-cell
windows, trainer and metrics as every model; scales to 10,000 cells; out-of-grid patch cells
keep their node with zero input and a False mask channel, so the graph is fixed); (2) the
output layer emits all H steps at once instead of the paper's one step applied recursively
(as later reference implementations do), so training matches the other direct multi-horizon
models; (3) node inputs are every service's scaled value and observed flag (2C channels).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from simmstnet.errors import UserError
from simmstnet.models.layers.graph import (SIDE_AND_DIAGONAL, check_patch_batch, chebyshev_polynomials,
                                           gaussian_adjacency, patch_nodes, scaled_laplacian)
from simmstnet.models.registry import DataDims, register_model


@dataclass
class STGCNConfig:
    """Options of the STGCN baseline (``model.<field>=...``)."""

    channels: str = field(default="64,16,64",
                          metadata={"help": "channels c0,c1,c2 of each ST-Conv block (paper: 64,16,64)"})
    blocks: int = field(default=2, metadata={"help": "ST-Conv blocks (paper: 2)"})
    temporal_kernel: int = field(default=3,
                                 metadata={"help": "Kt, width of the gated temporal convolutions (paper: 3)"})
    cheb_order: int = field(default=3,
                            metadata={"help": "Ks, Chebyshev polynomial terms T_0..T_{Ks-1} (paper: 3)"})
    dropout: float = field(default=0.0,
                           metadata={"help": "dropout after each block (paper code: keep_prob 1.0)"})
    graph_sigma: float = field(default=1.0,
                               metadata={"help": "Gaussian kernel width in cell units: w = exp(-d^2/sigma^2)"})
    graph_threshold: float = field(default=0.1, metadata={"help": "edge weights below this are dropped"})
    graph_radius: float = field(default=SIDE_AND_DIAGONAL,
                                metadata={"help": "longest edge in cell units (sqrt 2: 8 neighbours)"})


def _align(x: torch.Tensor, conv: nn.Module | None, c_out: int) -> torch.Tensor:
    """Residual path to c_out channels: 1x1 conv when narrowing, zero-padding when widening.
    x: (B, C_in, T, N) -> (B, c_out, T, N)."""
    if conv is not None:
        return conv(x)
    if x.shape[1] < c_out:
        return F.pad(x, (0, 0, 0, 0, 0, c_out - x.shape[1]))
    return x


class GatedTemporalConv(nn.Module):
    """GLU temporal convolution: (P + residual) * sigmoid(Q). (B, C_in, T, N) -> (B, c_out, T-Kt+1, N)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, act: str = "glu"):
        super().__init__()
        self.kernel, self.c_out, self.act = kernel, c_out, act
        self.conv = nn.Conv2d(c_in, 2 * c_out if act == "glu" else c_out, (kernel, 1))
        self.bottleneck = nn.Conv2d(c_in, c_out, 1) if c_in > c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.act == "sigmoid":
            return torch.sigmoid(out)
        residual = _align(x, self.bottleneck, self.c_out)[:, :, self.kernel - 1:]
        p, q = out.chunk(2, dim=1)
        return (p + residual) * torch.sigmoid(q)


class ChebGraphConv(nn.Module):
    """Chebyshev graph convolution sum_k T_k(L~) X Theta_k, residual, ReLU.
    (B, C_in, T, N) -> (B, c_out, T, N); ``polys``: (Ks, N, N) buffer."""

    def __init__(self, c_in: int, c_out: int, polys: torch.Tensor):
        super().__init__()
        self.register_buffer("polys", polys, persistent=False)
        self.theta = nn.Linear(polys.shape[0] * c_in, c_out)
        self.c_out = c_out
        self.bottleneck = nn.Conv2d(c_in, c_out, 1) if c_in > c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, n = x.shape
        # T_k applied over the node axis: out[b, k, c, t, i] = sum_j T_k[i, j] x[b, c, t, j].
        terms = torch.einsum("kij,bctj->btikc", self.polys, x).reshape(b, t, n, -1)
        out = self.theta(terms).permute(0, 3, 1, 2)  # (B, c_out, T, N)
        return F.relu(out + _align(x, self.bottleneck, self.c_out))


class STConvBlock(nn.Module):
    """Temporal gated conv -> Chebyshev graph conv -> temporal gated conv -> LayerNorm -> dropout.
    (B, C_in, T, N) -> (B, c2, T - 2(Kt-1), N)."""

    def __init__(self, c_in: int, channels: tuple[int, int, int], kt: int, polys: torch.Tensor,
                 n_nodes: int, dropout: float):
        super().__init__()
        c0, c1, c2 = channels
        self.t1 = GatedTemporalConv(c_in, c0, kt)
        self.graph = ChebGraphConv(c0, c1, polys)
        self.t2 = GatedTemporalConv(c1, c2, kt)
        self.norm = nn.LayerNorm([n_nodes, c2])  # over nodes and channels, as the paper's code
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.t2(self.graph(self.t1(x)))
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.dropout(x)


def _parse_channels(text: str) -> tuple[int, int, int]:
    try:
        vals = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 1:
        raise UserError(f"model 'stgcn' option channels must be three positive integers like 64,16,64, got {text!r}")
    return vals  # type: ignore[return-value]


@register_model("stgcn", multitask=False, config=STGCNConfig,
                description="STGCN (Yu et al. 2018): gated temporal + Chebyshev graph conv blocks on the patch graph")
class STGCN(nn.Module):
    config_class = STGCNConfig

    def __init__(self, dims: DataDims, config: STGCNConfig | None = None):
        super().__init__()
        cfg = config or STGCNConfig()
        channels = _parse_channels(cfg.channels)
        for name in ("blocks", "temporal_kernel", "cheb_order"):
            if getattr(cfg, name) < 1:
                raise UserError(f"model 'stgcn' option {name} must be at least 1, got {getattr(cfg, name)}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise UserError(f"model 'stgcn' option dropout must be in [0, 1), got {cfg.dropout}")
        kt = cfg.temporal_kernel
        remaining = dims.input_len - 2 * cfg.blocks * (kt - 1)
        if remaining < 1:
            raise UserError(f"model 'stgcn': input_len={dims.input_len} is too short for {cfg.blocks} blocks with "
                            f"temporal_kernel={kt} (each block uses {2 * (kt - 1)} steps)")
        self.dims, self.config = dims, cfg
        n = dims.patch * dims.patch
        w = gaussian_adjacency(dims.patch, cfg.graph_sigma, cfg.graph_radius, cfg.graph_threshold)
        polys = torch.as_tensor(chebyshev_polynomials(scaled_laplacian(w), cfg.cheb_order), dtype=torch.float32)
        c_in = 2 * dims.n_services
        blocks = []
        for _ in range(cfg.blocks):
            blocks.append(STConvBlock(c_in, channels, kt, polys, n, cfg.dropout))
            c_in = channels[2]
        self.blocks = nn.ModuleList(blocks)
        # Output layer of the paper: GLU conv over all remaining steps, LayerNorm, sigmoid 1x1, FC.
        self.out_temporal = GatedTemporalConv(c_in, c_in, remaining)
        self.out_norm = nn.LayerNorm([n, c_in])
        self.out_sigmoid = GatedTemporalConv(c_in, c_in, 1, act="sigmoid")
        self.out_fc = nn.Linear(c_in, dims.horizon * dims.n_services)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x_patch, patch_mask: (B, L, C, k, k) -> (B, H, C) forecast of the centre cell, scaled."""
        check_patch_batch(batch, self.dims, "stgcn")
        x = patch_nodes(batch).permute(0, 3, 1, 2)  # (B, 2C, L, N)
        for block in self.blocks:
            x = block(x)
        x = self.out_temporal(x)  # (B, c, 1, N)
        x = self.out_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.out_sigmoid(x)[:, :, 0, x.shape[-1] // 2]  # centre node: (B, c)
        return self.out_fc(x).view(-1, self.dims.horizon, self.dims.n_services)
