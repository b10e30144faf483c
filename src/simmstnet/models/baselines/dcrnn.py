"""DCRNN (Li, Yu, Shahabi & Liu, "Diffusion Convolutional Recurrent Neural Network", ICLR 2018).

The paper's sequence-to-sequence model on the cell's k x k patch graph
(:mod:`simmstnet.models.layers.graph`):

- diffusion convolution (paper eq. 2), bidirectional random walk:
  ``sum_{k=0..K} (theta_k,1 (D_O^-1 W)^k + theta_k,2 (D_I^-1 W^T)^k) X``, the k = 0 terms merged
  into one (2K + 1 supports, as the reference code counts them);
- DCGRU cell: the GRU with its matrix products replaced by diffusion convolutions (eq. 3);
- encoder: stacked DCGRU layers over the L input steps; decoder: as many layers, started from the
  encoder's states, fed a zero "GO" frame and then its own previous output, one projection
  per node to the C services; the centre node's outputs are the forecast;
- scheduled sampling in training (curriculum learning): with probability
  ``tau / (tau + exp(step / tau))`` the decoder is fed the observed truth instead of its own
  output (at the centre node, the only one with targets; elsewhere its own output).

Defaults follow the reference implementation (liyaguang/DCRNN, METR-LA config): 2 layers,
max_diffusion_step K = 2, filter dual_random_walk, curriculum (cl_decay_steps = 2000 there; here
scaled to the run's length by default, see ``cl_decay_steps``: with 2000 a CPU run of a few
hundred steps never leaves teacher forcing and is scored free-running), and the
time of day as an extra encoder input channel; rnn_units 32 where the reference used 64 (reduced
for CPU training of 10,000 cells). The random walk is applied as written in the paper
((D_O^-1 W)^k X: each node averages its out-neighbours) with plain powers; the reference code
multiplies by the transpose and uses a Chebyshev-style recursion 2 S x_{k-1} - x_{k-2}. Graph:
Gaussian kernel on patch-cell distances (sigma = 1 cell, threshold 0.1 as the paper's kappa,
8 neighbours), no self-loops.

Adapted: the graph is the cell's patch and the forecast its centre node (same per-cell windows,
trainer and metrics as every model; scales to 10,000 cells; out-of-grid patch cells keep their
node with zero input and a False mask channel, so the graph is fixed); encoder inputs per node
are every service's scaled value and observed flag (2C) plus the time of day.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from simmstnet.errors import UserError
from simmstnet.models.layers.graph import (SIDE_AND_DIAGONAL, check_patch_batch, gaussian_adjacency,
                                           patch_nodes, random_walk_matrix)
from simmstnet.models.registry import DataDims, register_model


@dataclass
class DCRNNConfig:
    """Options of the DCRNN baseline (``model.<field>=...``)."""

    rnn_units: int = field(default=32,
                           metadata={"help": "hidden units per node and DCGRU layer (reference: 64; reduced for CPU)"})
    layers: int = field(default=2, metadata={"help": "DCGRU layers in encoder and decoder (reference: 2)"})
    diffusion_steps: int = field(default=2,
                                 metadata={"help": "K, max diffusion step per direction (reference: 2)"})
    curriculum: bool = field(default=True,
                             metadata={"help": "scheduled sampling of the decoder input in training (reference: on)"})
    cl_decay_steps: int = field(default=0,
                                metadata={"help": "tau of the sampling decay, in training batches (reference: 2000); "
                                                  "0 = scaled to the run: the teacher probability crosses 0.5 at "
                                                  "40 % of the training steps, where the reference's 2000 puts it "
                                                  "on METR-LA (~15k of ~37k steps)"})
    graph_sigma: float = field(default=1.0,
                               metadata={"help": "Gaussian kernel width in cell units: w = exp(-d^2/sigma^2)"})
    graph_threshold: float = field(default=0.1,
                                   metadata={"help": "edge weights below this are dropped (paper's kappa: 0.1)"})
    graph_radius: float = field(default=SIDE_AND_DIAGONAL,
                                metadata={"help": "longest edge in cell units (sqrt 2: 8 neighbours)"})


def diffusion_supports(w: np.ndarray, steps: int) -> np.ndarray:
    """I, P_f, .., P_f^K, P_b, .., P_b^K with P_f = D_O^-1 W, P_b = D_I^-1 W^T. Returns (2K+1, N, N)."""
    n = w.shape[0]
    mats = [np.eye(n)]
    for p in (random_walk_matrix(w), random_walk_matrix(w.T)):
        power = np.eye(n)
        for _ in range(steps):
            power = p @ power
            mats.append(power)
    return np.stack(mats)


class DiffusionConv(nn.Module):
    """sum_s S_s X Theta_s over the supports S. (B, N, C_in) -> (B, N, c_out)."""

    def __init__(self, supports: torch.Tensor, c_in: int, c_out: int, bias_init: float = 0.0):
        super().__init__()
        self.register_buffer("supports", supports, persistent=False)
        self.theta = nn.Linear(supports.shape[0] * c_in, c_out)
        nn.init.constant_(self.theta.bias, bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        diffused = torch.einsum("sij,bjc->bisc", self.supports, x).reshape(b, n, -1)
        return self.theta(diffused)


class DCGRUCell(nn.Module):
    """GRU with diffusion convolutions. x: (B, N, C_in), h: (B, N, units) -> h' (B, N, units)."""

    def __init__(self, supports: torch.Tensor, c_in: int, units: int):
        super().__init__()
        # Gate bias 1.0 as in the reference: gates start mostly open, keeping early memory.
        self.gates = DiffusionConv(supports, c_in + units, 2 * units, bias_init=1.0)
        self.candidate = DiffusionConv(supports, c_in + units, units)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        r, u = torch.sigmoid(self.gates(torch.cat([x, h], dim=-1))).chunk(2, dim=-1)
        c = torch.tanh(self.candidate(torch.cat([x, r * h], dim=-1)))
        return u * h + (1.0 - u) * c


@register_model("dcrnn", multitask=False, config=DCRNNConfig,
                description="DCRNN (Li et al. 2018): diffusion-convolution GRU encoder-decoder on the patch graph")
class DCRNN(nn.Module):
    config_class = DCRNNConfig

    def __init__(self, dims: DataDims, config: DCRNNConfig | None = None):
        super().__init__()
        cfg = config or DCRNNConfig()
        if cfg.cl_decay_steps < 0:
            raise UserError(f"model 'dcrnn' option cl_decay_steps must be >= 0, got {cfg.cl_decay_steps}")
        for name in ("rnn_units", "layers"):
            if getattr(cfg, name) < 1:
                raise UserError(f"model 'dcrnn' option {name} must be at least 1, got {getattr(cfg, name)}")
        if cfg.diffusion_steps < 0:
            raise UserError(f"model 'dcrnn' option diffusion_steps must be >= 0, got {cfg.diffusion_steps}")
        self.dims, self.config = dims, cfg
        w = gaussian_adjacency(dims.patch, cfg.graph_sigma, cfg.graph_radius, cfg.graph_threshold)
        supports = torch.as_tensor(diffusion_supports(w, cfg.diffusion_steps), dtype=torch.float32)
        c = dims.n_services
        self.use_time = dims.n_marks >= 1  # hour-of-day column of the calendar marks
        enc_in = 2 * c + int(self.use_time)
        units = cfg.rnn_units
        self.encoder = nn.ModuleList(DCGRUCell(supports, enc_in if i == 0 else units, units)
                                     for i in range(cfg.layers))
        self.decoder = nn.ModuleList(DCGRUCell(supports, c if i == 0 else units, units)
                                     for i in range(cfg.layers))
        self.project = nn.Linear(units, c)
        # Training batches seen, for the sampling schedule; saved with the model so a resumed
        # run continues the schedule.
        self.register_buffer("batches_seen", torch.tensor(0, dtype=torch.int64))
        # tau of the schedule (a buffer: a resumed run keeps it); 0 until schedule_for() sets it
        # from the run length, and then the reference's 2000 applies.
        self.register_buffer("tau", torch.tensor(float(cfg.cl_decay_steps), dtype=torch.float64))

    def schedule_for(self, total_steps: int) -> None:
        """Trainer hook: the run will take ``total_steps`` training batches. With
        ``cl_decay_steps=0`` choose tau so that tau / (tau + exp(s / tau)) = 0.5 at s = 0.4 x
        total_steps, i.e. tau ln tau = 0.4 x total_steps (the reference's ratio)."""
        if self.config.cl_decay_steps > 0 or total_steps <= 0:
            return
        target = 0.4 * total_steps
        tau = max(2.0, target / max(1.0, math.log(max(target, 2.0))))
        for _ in range(50):  # fixed point of tau = target / ln(tau)
            tau = max(2.0, target / math.log(tau))
        self.tau.fill_(tau)

    def teacher_probability(self) -> float:
        """Probability of feeding the truth to the decoder at the current training step."""
        tau = float(self.tau) if float(self.tau) > 0 else 2000.0
        step = int(self.batches_seen)
        # exp overflows for very long runs; the probability is 0 there anyway.
        return tau / (tau + math.exp(step / tau)) if step / tau < 700 else 0.0

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x_patch, patch_mask: (B, L, C, k, k); x_mark: (B, L, F); in training also y, y_mask
        (B, H, C) for scheduled sampling. Returns (B, H, C) forecast of the centre cell, scaled."""
        check_patch_batch(batch, self.dims, "dcrnn")
        nodes = patch_nodes(batch)  # (B, L, N, 2C)
        b, length, n, _ = nodes.shape
        if self.use_time:
            hour = batch["x_mark"][..., :1].to(nodes.dtype)  # (B, L, 1)
            nodes = torch.cat([nodes, hour[:, :, None, :].expand(b, length, n, 1)], dim=-1)
        hidden = [nodes.new_zeros(b, n, self.config.rnn_units) for _ in self.encoder]
        for t in range(length):
            inp = nodes[:, t]
            for j, cell in enumerate(self.encoder):
                hidden[j] = cell(inp, hidden[j])
                inp = hidden[j]

        teach = self.training and self.config.curriculum and "y" in batch
        p_teach = self.teacher_probability() if teach else 0.0
        if self.training:
            self.batches_seen += 1
        centre = n // 2
        c = self.dims.n_services
        dec_in = nodes.new_zeros(b, n, c)  # GO symbol
        outputs = []
        for t in range(self.dims.horizon):
            inp = dec_in
            for j, cell in enumerate(self.decoder):
                hidden[j] = cell(inp, hidden[j])
                inp = hidden[j]
            out = self.project(inp)  # (B, N, C)
            outputs.append(out[:, centre])
            dec_in = out
            # One coin per step and batch, as the reference; only observed truth replaces output.
            if teach and torch.rand(()) < p_teach:
                truth = batch["y"][:, t].to(out.dtype)
                seen = batch["y_mask"][:, t]
                dec_in = out.clone()
                dec_in[:, centre] = torch.where(seen, truth, out[:, centre])
        return torch.stack(outputs, dim=1)  # (B, H, C)
