"""Sim-MSTNet: multi-task spatiotemporal forecaster (paper section 2.3), and its single-task form.

Per task (service) k, for one window:

1. temporal branch: embed [x_k, observed_k] + calendar + position (Informer style) and run an
   attention encoder -> sequence h_k (B, T', d); pool its last step and its mean -> t_k (B, d);
2. spatial branch: CNN over the k x k neighbourhood history, then the centre cell attends to the
   patch cells -> s_k (B, d);
3. feature interaction: stack t_1..t_C as C tokens, multi-head attention across tasks with
   residual + LayerNorm; the same, with separate weights, for s_1..s_C;
4. fusion: f_k = Linear([t_k, s_k]) (shared), then a task-specific MLP -> z_k (B, d);
5. task decoder: embed [dec_in_k, known_k] + calendar + position, causal self-attention,
   ProbSparse cross-attention onto the memory, linear head; the last H steps are the forecast.
   The memory is ``[z_k; h_1 .. h_T']`` (``fusion=token``, default): z_k is one more token the
   decoder's queries can attend to, and it is added to every decoder input step, so what the
   spatial branch and the other tasks contributed changes *which* encoder steps the decoder
   reads and how much, and reaches the head through the residual stream. The paper's text suggests adding z_k to
   every step (``fusion=shift``: m_k = h_k + z_k); a shift common to every key leaves the
   attention softmax unchanged, so there the spatial and cross-task features only add one
   constant vector to the cross-attention output (why the ablations barely differed);
6. highway (``highway=True``, default; LSTNet's autoregressive component, Lai et al. SIGIR
   2018): a linear map of the task's own L inputs to its H outputs, added to the decoder's
   forecast. The network then models what a linear autoregression cannot, and its output has no
   ceiling (the decoder's head reads a LayerNorm output, so alone it is bounded).

Inputs are normalized per window by default (``model.norm=auto`` = ``window`` for this model,
:mod:`simmstnet.models.norm`): the forecast scale follows each window's own level. Calendar
marks enter with sin/cos of the time of day and week (``cyclic_calendar``).

``interaction=False`` skips step 3 (ablation "w/o Inter"), ``spatial=False`` drops step 2 and
fuses the temporal vector alone (ablation "w/o Spatial"). With one service the interaction is
skipped automatically: that is the single-task network ("stnet", the paper's STNet-Sim2RealBO).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from simmstnet.errors import UserError
from simmstnet.models.layers.attention import set_prob_measure
from simmstnet.models.layers.decoder import Decoder
from simmstnet.models.layers.embeddings import DataEmbedding
from simmstnet.models.layers.encoder import Encoder, FeedForward
from simmstnet.models.layers.spatial import SpatialBranch, TaskInteraction
from simmstnet.models.registry import DataDims, register_model


@dataclass
class SimMSTNetConfig:
    """Options of Sim-MSTNet / STNet (set via ``model.<field>=...``)."""

    d_model: int = field(default=32, metadata={"help": "width of every hidden representation"})
    n_heads: int = field(default=2, metadata={"help": "attention heads (must divide d_model)"})
    enc_layers: int = field(default=2, metadata={"help": "temporal encoder layers per task"})
    dec_layers: int = field(default=1, metadata={"help": "decoder layers per task"})
    d_ff: int = field(default=64, metadata={"help": "hidden width of feed-forward blocks and task MLPs"})
    dropout: float = field(default=0.05, metadata={"help": "dropout probability in training"})
    attn: str = field(default="prob", metadata={"help": "decoder cross-attention: prob (ProbSparse, as in the paper) or full"})
    enc_attn: str = field(default="full", metadata={
        "help": "encoder self-attention: full (the paper names ProbSparse only for the decoder; full is "
                "also faster at input lengths of a few dozen steps) or prob (Informer's encoder)"})
    factor: int = field(default=5, metadata={"help": "ProbSparse sampling factor c (u = c * ceil(ln L))"})
    prob_measure: str = field(default="sample-mean", metadata={
        "help": "ProbSparse query measure: sample-mean (max - mean of the sampled scores, the paper's "
                "formula) or reference (sum of the sampled scores / L_K, as the Informer2020 code)"})
    distil: bool = field(default=False,
                         metadata={"help": "Informer distilling: halve the sequence between encoder layers"})
    interaction: bool = field(default=True, metadata={"help": "cross-task attention (False: ablation w/o Inter)"})
    spatial: bool = field(default=True,
                          metadata={"help": "CNN + attention spatial branch (False: ablation w/o Spatial)"})
    seed: int = field(default=0, metadata={"help": "seed of the ProbSparse key sampling"})
    spatial_input: str = field(default="patch", metadata={
        "help": "what the spatial branch reads: patch (the k x k neighbourhood) or centre (every patch cell "
                "replaced by the centre cell's own series: a benchmark control showing what the neighbours add)"})
    fusion: str = field(default="token", metadata={
        "help": "how the fused spatial/cross-task vector reaches the decoder: token (one more memory "
                "token) or shift (added to every encoder step, the paper's reading)"})
    highway: bool = field(default=True, metadata={
        "help": "add a linear autoregressive map of the task's inputs to the forecast (LSTNet)"})
    highway_init: str = field(default="zero", metadata={
        "help": "initial highway weights: uniform (PyTorch's Linear default) or zero (the forecast starts "
                "as the decoder's alone and the linear part grows as it helps)"})
    season_anchor: bool = field(default=True, metadata={
        "help": "with seasonal history: subtract the seasonal values' own mean over the input steps, so "
                "the model reads the daily shape of the previous days anchored to the input window's level "
                "(robust to a level drift between the previous days and now)"})
    cyclic_calendar: bool = field(default=True, metadata={
        "help": "sin/cos of the time of day and week beside the raw calendar marks"})


class _TaskModules(nn.Module):
    """Everything that belongs to one task: encoder side, spatial branch, MLP, decoder side."""

    def __init__(self, dims: DataDims, cfg: SimMSTNetConfig, seed: int):
        super().__init__()
        d = cfg.d_model
        # With seasonal history (data.season_days > 0) each step also carries the cell's mean at
        # the same time on the previous days and whether any of those days was observed.
        c_in = 4 if dims.season_days else 2
        self.enc_embedding = DataEmbedding(c_in, dims.n_marks, d, dims.input_len, cfg.dropout,
                                           cyclic=cfg.cyclic_calendar)
        self.encoder = Encoder(cfg.enc_layers, d, cfg.n_heads, cfg.d_ff, cfg.enc_attn, cfg.factor,
                               cfg.dropout, cfg.distil, seed)
        self.pool = nn.Linear(2 * d, d)
        self.spatial = (SpatialBranch(dims.input_len, dims.patch, d, cfg.n_heads, cfg.dropout)
                        if cfg.spatial else None)
        self.mlp = FeedForward(d, cfg.d_ff, cfg.dropout)
        self.dec_embedding = DataEmbedding(c_in, dims.n_marks, d, dims.label_len + dims.horizon, cfg.dropout,
                                           cyclic=cfg.cyclic_calendar)
        self.decoder = Decoder(cfg.dec_layers, d, cfg.n_heads, cfg.d_ff, cfg.attn, cfg.factor,
                               cfg.dropout, seed + 100)
        # The highway reads the task's inputs and, with seasonal history, the seasonal means of the
        # horizon steps too (a linear autoregression plus a seasonal term).
        n_lin = dims.input_len + (dims.horizon if dims.season_days else 0)
        self.highway = nn.Linear(n_lin, dims.horizon) if cfg.highway else None
        if self.highway is not None and cfg.highway_init == "zero":
            nn.init.zeros_(self.highway.weight)
            nn.init.zeros_(self.highway.bias)


def _check_config(cfg: SimMSTNetConfig, dims: DataDims) -> None:
    for name in ("d_model", "n_heads", "enc_layers", "dec_layers", "d_ff", "factor"):
        if getattr(cfg, name) < 1:
            raise UserError(f"model option {name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.d_model % cfg.n_heads:
        raise UserError(f"model option d_model={cfg.d_model} must be divisible by n_heads={cfg.n_heads}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UserError(f"model option dropout must be in [0, 1), got {cfg.dropout}")
    for name in ("attn", "enc_attn"):
        if getattr(cfg, name) not in ("prob", "full"):
            raise UserError(f"model option {name} must be 'prob' or 'full', got {getattr(cfg, name)!r}")
    if dims.n_services < 1 or dims.input_len < 1 or dims.horizon < 1 or dims.label_len < 0:
        raise UserError(f"data sizes do not fit the model: {dims}")
    if dims.label_len > dims.input_len:
        raise UserError(f"label_len={dims.label_len} exceeds input_len={dims.input_len}")
    if cfg.spatial_input not in ("patch", "centre"):
        raise UserError(f"model option spatial_input must be 'patch' or 'centre', got {cfg.spatial_input!r}")
    if cfg.highway_init not in ("uniform", "zero"):
        raise UserError(f"model option highway_init must be 'uniform' or 'zero', got {cfg.highway_init!r}")
    if cfg.fusion not in ("token", "shift"):
        raise UserError(f"model option fusion must be 'token' or 'shift', got {cfg.fusion!r}")
    if cfg.spatial and (dims.patch < 1 or dims.patch % 2 == 0):
        raise UserError(f"the spatial branch needs an odd patch size, got patch={dims.patch}")


@register_model("sim-mstnet", multitask=True, config=SimMSTNetConfig, norm="window",
                description="Sim-MSTNet: per-service Informer encoders + CNN/attention spatial branch, "
                            "cross-task attention, per-service ProbSparse decoders")
class SimMSTNet(nn.Module):
    """Multi-task Sim-MSTNet; with ``dims.n_services == 1`` it is the single-task network."""

    config_class = SimMSTNetConfig
    reads_season = True  # uses x_season / y_season when data.season_days > 0

    def __init__(self, dims: DataDims, config: SimMSTNetConfig | None = None):
        super().__init__()
        cfg = config or SimMSTNetConfig()
        _check_config(cfg, dims)
        self.dims = dims
        self.config = cfg
        d = cfg.d_model
        self.tasks = nn.ModuleList(_TaskModules(dims, cfg, cfg.seed + 1000 * k) for k in range(dims.n_services))
        # Interaction needs at least two tasks to attend between.
        self.use_interaction = cfg.interaction and dims.n_services > 1
        self.temporal_interaction = TaskInteraction(d, cfg.n_heads, cfg.dropout) if self.use_interaction else None
        self.spatial_interaction = (TaskInteraction(d, cfg.n_heads, cfg.dropout)
                                    if self.use_interaction and cfg.spatial else None)
        self.fuse = nn.Linear(2 * d if cfg.spatial else d, d)
        set_prob_measure(self, cfg.prob_measure)

    def _check_batch(self, batch: dict) -> None:
        x = batch["x"]
        dims = self.dims
        expected = (dims.input_len, dims.n_services)
        if x.dim() != 3 or tuple(x.shape[1:]) != expected:
            raise UserError(f"batch x has shape {tuple(x.shape)}, the model was built for "
                            f"(B, {dims.input_len}, {dims.n_services}) (input_len, services)")
        s = dims.label_len + dims.horizon
        if tuple(batch["dec_in"].shape[1:]) != (s, dims.n_services):
            raise UserError(f"batch dec_in has shape {tuple(batch['dec_in'].shape)}, the model was built "
                            f"for (B, {s}, {dims.n_services}) (label_len + horizon, services)")
        if dims.season_days:
            for key, n in (("x_season", dims.input_len), ("y_season", s)):
                if key not in batch or tuple(batch[key].shape[1:]) != (n, dims.n_services):
                    raise UserError(f"the model was built for seasonal history (data.season_days="
                                    f"{dims.season_days}); batch key {key} of shape (B, {n}, "
                                    f"{dims.n_services}) is missing or has another shape")
        if self.config.spatial:
            k = dims.patch
            if tuple(batch["x_patch"].shape[1:]) != (dims.input_len, dims.n_services, k, k):
                raise UserError(f"batch x_patch has shape {tuple(batch['x_patch'].shape)}, the model was "
                                f"built for (B, {dims.input_len}, {dims.n_services}, {k}, {k}) (patch={k})")

    def forward(self, batch: dict) -> torch.Tensor:
        """batch: dict per docs/contracts.md (x (B,L,C), x_mask (B,L,C), x_patch (B,L,C,k,k),
        patch_mask (B,L,C,k,k), x_mark (B,L,F), dec_in (B,S,C), y_mark (B,S,F)).
        Returns (B, H, C) forecasts in scaled units."""
        self._check_batch(batch)
        dims, cfg = self.dims, self.config
        x, x_mask = batch["x"], batch["x_mask"].to(batch["x"].dtype)
        x_mark, y_mark, dec_in = batch["x_mark"], batch["y_mark"], batch["dec_in"]
        b = x.shape[0]
        # Observed flags of the decoder input: the label part mirrors x_mask, the horizon is unknown.
        dec_known = torch.cat([x_mask[:, dims.input_len - dims.label_len:],
                               x.new_zeros(b, dims.horizon, dims.n_services)], dim=1)

        season = dims.season_days > 0
        if season:
            xs, xs_mask = batch["x_season"], batch["x_season_mask"].to(x.dtype)
            ys, ys_mask = batch["y_season"], batch["y_season_mask"].to(x.dtype)
            if cfg.season_anchor:  # keep the shape, drop the level of the previous days
                offset = (xs * xs_mask).sum(1, keepdim=True) / xs_mask.sum(1, keepdim=True).clamp_min(1.0)
                xs, ys = (xs - offset) * xs_mask, (ys - offset) * ys_mask

        sequences, temporal, spatial = [], [], []
        for k, task in enumerate(self.tasks):
            enc_in = [x[..., k], x_mask[..., k]] + ([xs[..., k], xs_mask[..., k]] if season else [])
            h = task.encoder(task.enc_embedding(torch.stack(enc_in, dim=-1), x_mark))
            sequences.append(h)  # (B, T', d)
            temporal.append(task.pool(torch.cat([h[:, -1], h.mean(dim=1)], dim=-1)))  # (B, d)
            if task.spatial is not None:
                if cfg.spatial_input == "centre":  # control: the neighbours carry the centre's own series
                    k2 = (dims.patch, dims.patch)
                    patch = x[..., k][..., None, None].expand(b, dims.input_len, *k2)
                    patch_mask = batch["x_mask"][..., k][..., None, None].expand(b, dims.input_len, *k2)
                else:
                    patch, patch_mask = batch["x_patch"][:, :, k], batch["patch_mask"][:, :, k]
                spatial.append(task.spatial(patch, patch_mask))
        t = torch.stack(temporal, dim=1)  # (B, C, d)
        if self.temporal_interaction is not None:
            t = self.temporal_interaction(t)
        if cfg.spatial:
            s = torch.stack(spatial, dim=1)  # (B, C, d)
            if self.spatial_interaction is not None:
                s = self.spatial_interaction(s)
            fused = self.fuse(torch.cat([t, s], dim=-1))
        else:
            fused = self.fuse(t)

        out = []
        for k, task in enumerate(self.tasks):
            z = task.mlp(fused[:, k])  # (B, d) interaction-aware task representation
            dec_parts = [dec_in[..., k], dec_known[..., k]] + ([ys[..., k], ys_mask[..., k]] if season else [])
            dec = task.dec_embedding(torch.stack(dec_parts, dim=-1), y_mark)
            if cfg.fusion == "token":
                memory = torch.cat([z[:, None, :], sequences[k]], dim=1)  # (B, 1 + T', d)
                dec = dec + z[:, None, :]  # every query knows z too, and the residual carries it
            else:
                memory = sequences[k] + z[:, None, :]
            forecast = task.decoder(dec, memory)[:, -dims.horizon:]  # (B, H)
            if task.highway is not None:
                lin = x[..., k] * x_mask[..., k]
                if season:
                    lin = torch.cat([lin, (ys[..., k] * ys_mask[..., k])[:, -dims.horizon:]], dim=-1)
                forecast = forecast + task.highway(lin)
            out.append(forecast)
        return torch.stack(out, dim=-1)


@register_model("stnet", multitask=False, config=SimMSTNetConfig, norm="window",
                description="STNet (STNet-Sim2RealBO network): Sim-MSTNet with one service, no interaction")
class STNet(SimMSTNet):
    """The single-task network: exactly one service per batch."""

    def __init__(self, dims: DataDims, config: SimMSTNetConfig | None = None):
        if dims.n_services != 1:
            raise UserError(f"model 'stnet' forecasts one service, the data has {dims.n_services}; "
                            f"select one service or use 'sim-mstnet'")
        super().__init__(dims, config)
