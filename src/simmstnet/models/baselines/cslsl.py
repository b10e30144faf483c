"""CSLSL: causal and spatial-constrained multi-task network (Huang et al., "Human mobility
prediction with causal and spatial-constrained multi-task network", EPJ Data Science 13:22,
2024), adapted from next-location prediction to per-cell multi-service traffic forecasting.

Original (paper abstract and the authors' code, github.com/urbanmobility/CSLSL, ``model.py``,
``train_test.py``):
- inputs: embeddings of user, location, hour, weekday (and category) concatenated per visit;
- one Long and Short-term Capturer (LSC) per task: a "history" GRU over past sessions, then a
  "current" GRU over the current session started from the history GRU's final state
  (GRU, 1 layer, 600 units, dropout 0.1 inside the RNN);
- causal multi-task chain "when -> what -> where" (time -> activity -> location): the history
  GRU of each task after the first starts from the final state of the previous task's LSC, and
  each task's output layer reads its own state concatenated with a linear embedding of the
  previous task's *prediction* (time 1 -> 20 dims, category -> 100 dims); gradients flow
  through the chain;
- spatial constraint: an auxiliary loss, the great-circle distance between predicted and true
  location, weighted 0.5, so that wrong locations are at least near the right ones.
  Adam lr 1e-4, weight decay 1e-6, batch 64, gradient clipping 2.0 (training settings: the
  trainer's).

Adaptation (what changed and why):
- tasks are the services; default chain order is the batch order, call -> sms -> net. It runs
  from the user-initiated activities to the service the paper treats as the main target (Net,
  alone in its Table 1) and the hardest one (largest errors in its Table 2), as CSLSL ends on
  location, its main and hardest task. ``order`` picks another chain (service indices);
- inputs are continuous: per step the cell's values and observed flags of every service, the
  neighbourhood context (patch mean of observed cells, observed fraction) and the calendar marks,
  each linearly embedded, then concatenated (the original concatenates categorical embeddings);
- long/short term: the window is split into the last ``short_len`` steps (default: label_len,
  the steps the decoder of the other models also treats as recent) and the earlier ones;
- each task outputs its whole horizon (Linear -> H) and the previous task's H-step forecast is
  embedded for the next task, as the original embeds its scalar time / category prediction;
- spatial constraint: the original's distance loss turns a classification error into a spatial
  distance; for a regression of traffic volume the task loss already is that distance, and the
  trainer's objective is the task loss only, so the constraint enters as spatial context from the
  patch (``spatial``) instead of an extra loss term;
- GRU width reduced for CPU (600 -> 128, option ``hidden``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from simmstnet.models.layers.multitask import cell_channels, check_batch, check_dropout, check_positive, parse_order
from simmstnet.models.registry import DataDims, register_model


@dataclass
class CSLSLConfig:
    hidden: int = field(default=128, metadata={"help": "GRU units of each task's capturer (CSLSL code: 600; "
                                                       "reduced for CPU)"})
    rnn_layers: int = field(default=1, metadata={"help": "GRU layers (CSLSL code: 1)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout between GRU layers, no effect with one layer "
                                                          "(CSLSL code: 0.1, one layer)"})
    value_embed_dim: int = field(default=64, metadata={"help": "embedding of the per-step traffic channels "
                                                               "(adaptation; CSLSL embeds location in 200)"})
    time_embed_dim: int = field(default=30, metadata={"help": "embedding of the calendar marks "
                                                              "(CSLSL code: hour 20 + weekday 10)"})
    label_embed_dim: int = field(default=20, metadata={"help": "embedding of the previous task's forecast "
                                                               "(CSLSL code: 20 for time)"})
    short_len: int = field(default=0, metadata={"help": "recent steps read by the short-term GRU; 0 = label_len"})
    order: str = field(default="", metadata={"help": "causal chain as service indices, e.g. '0,1,2' "
                                                     "(empty = batch order: call -> sms -> net)"})
    spatial: bool = field(default=True, metadata={"help": "add the patch mean / observed fraction inputs "
                                                         "(the spatial constraint, see module doc)"})


class LongShortCapturer(nn.Module):
    """CSLSL's LSC: a long-term GRU over the earlier steps, then a short-term GRU over the recent
    steps starting from the long-term GRU's final state."""

    def __init__(self, n_in: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        drop = dropout if layers > 1 else 0.0  # PyTorch applies GRU dropout between layers only
        self.long = nn.GRU(n_in, hidden, layers, batch_first=True, dropout=drop)
        self.short = nn.GRU(n_in, hidden, layers, batch_first=True, dropout=drop)

    def forward(self, history: torch.Tensor, recent: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """history: (B, L - S, n_in) (may have 0 steps); recent: (B, S, n_in); state: (layers, B, hidden)
        or None -> final state (layers, B, hidden)."""
        if history.shape[1] > 0:
            _, state = self.long(history, state)
        _, state = self.short(recent, state)
        return state


@register_model("cslsl", multitask=True, config=CSLSLConfig,
                description="CSLSL (Huang et al. 2024): per-service long/short GRUs chained causally across services")
class CSLSL(nn.Module):
    def __init__(self, dims: DataDims, config: CSLSLConfig):
        super().__init__()
        check_positive("cslsl", hidden=config.hidden, rnn_layers=config.rnn_layers,
                       value_embed_dim=config.value_embed_dim, label_embed_dim=config.label_embed_dim)
        check_positive("cslsl", allow_zero=True, time_embed_dim=config.time_embed_dim, short_len=config.short_len)
        check_dropout("cslsl", config.dropout)
        self.config = config
        self.dims = dims
        C, L, H = dims.n_services, dims.input_len, dims.horizon
        self.n_services, self.horizon = C, H
        self.order = parse_order(config.order, C, "cslsl")
        # At least one recent step, and at most L (then there is no long-term part).
        self.short_len = min(max(config.short_len or dims.label_len, 1), L)
        n_channels = (4 if config.spatial else 2) * C
        self.value_embed = nn.Linear(n_channels, config.value_embed_dim)
        use_marks = dims.n_marks > 0 and config.time_embed_dim > 0
        self.time_embed = nn.Linear(dims.n_marks, config.time_embed_dim) if use_marks else None
        n_in = config.value_embed_dim + (config.time_embed_dim if self.time_embed is not None else 0)
        # Position k of these lists is the k-th task of the chain (not service k).
        self.capturers = nn.ModuleList(LongShortCapturer(n_in, config.hidden, config.rnn_layers, config.dropout)
                                       for _ in range(C))
        self.towers = nn.ModuleList(nn.Linear(config.hidden + (config.label_embed_dim if k else 0), H)
                                    for k in range(C))
        self.label_embed = nn.ModuleList(nn.Linear(H, config.label_embed_dim) for _ in range(C - 1))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x, x_mask: (B, L, C); x_patch, patch_mask: (B, L, C, k, k); x_mark: (B, L, F)
        -> (B, H, C) scaled."""
        check_batch("cslsl", batch, self.dims.input_len, self.n_services, self.dims.patch)
        steps = [self.value_embed(cell_channels(batch, self.config.spatial))]
        if self.time_embed is not None:
            steps.append(self.time_embed(batch["x_mark"]))
        inputs = torch.cat(steps, dim=-1)                                           # (B, L, n_in)
        split = inputs.shape[1] - self.short_len
        history, recent = inputs[:, :split], inputs[:, split:]
        out: list[torch.Tensor | None] = [None] * self.n_services
        state, previous = None, None
        for k, service in enumerate(self.order):
            # The chain: this task's capturer starts where the previous task's ended ...
            state = self.capturers[k](history, recent, state)
            features = state[-1]                                                    # (B, hidden)
            if k:
                # ... and its output layer sees the previous task's forecast.
                features = torch.cat([features, self.label_embed[k - 1](previous)], dim=-1)
            previous = self.towers[k](features)                                     # (B, H)
            out[service] = previous
        return torch.stack(out, dim=-1)                                             # (B, H, C)
