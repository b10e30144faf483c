"""AST-MTL: attention-based multi-task learning for traffic forecasting (Buroni et al.,
"AST-MTL: An Attention-Based Multi-Task Learning Strategy for Traffic Forecasting", IEEE
Access; DOI 10.1109/ACCESS.2021.3083412 — the Sim-MSTNet paper cites it as vol. 11, 2023).

Original (paper abstract and the authors' TensorFlow code, github.com/giobbu/AST-MTL,
``ast_mtl.py``), forecasting flow and speed of every road segment 12 steps ahead:
1. per task, two graph convolutions (GCNConv, 12 units = the 12 input steps, ReLU, no bias) over
   the road graph, node features = the task's input series;
2. per task, a GRU encoder (150 units) over the GCN output, returning its sequence;
3. shared: the tasks' GRU sequences concatenated and passed through a multilayer FNN
   (Dense 150 ReLU -> 64 ReLU -> 150);
4. per task, multi-head attention (4 heads, key_dim 4) with the shared sequence as query and the
   task's own GRU sequence as key/value, added to the shared sequence (residual);
5. per task, the future calendar covariates are concatenated, a GRU decoder (150 units, initial
   state = last step of the shared sequence) reads it, dropout 0.1, and a Dense layer outputs
   12 steps for every node. Adam lr 1e-3, MAE loss, batch 32 (training settings: the trainer's).

Adaptation (what changed and why):
- graph: the k x k neighbourhood patch of the target cell, 8-neighbour links weighted by inverse
  centre distance, GCN-normalized (``layers.multitask.patch_adjacency``); node features are the
  L input values of the service plus their L observed flags (the flags are ours: real data has
  gaps). The GCN keeps L units so its output is still a sequence of L steps, as the original's
  12 units for 12 steps; its output is transposed (node x unit -> unit x node) where the
  original code reshaped;
- only the centre cell is forecast (models here are per target cell), so the output layer is
  Linear(-> horizon) instead of one output per node and step;
- the input length L and horizon H differ here (the original had 12 and 12 and concatenated the
  12 future covariates step by step to the 12-step sequence): the decoder sequence gets the
  input steps' calendar marks, and the H future marks enter the output layer, flattened;
- the tasks are the services of the batch; any C >= 1 works.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from simmstnet.models.layers.multitask import (GraphConv, KeyDimAttention, check_batch, check_dropout, check_positive,
                                              patch_adjacency)
from simmstnet.models.registry import DataDims, register_model


@dataclass
class ASTMTLConfig:
    hidden: int = field(default=150, metadata={"help": "GRU encoder/decoder units and shared FNN output "
                                                       "(AST-MTL code: 150)"})
    fnn_inner: int = field(default=64, metadata={"help": "middle layer of the shared FNN 150 -> 64 -> 150 "
                                                         "(AST-MTL code: 64)"})
    gcn_layers: int = field(default=2, metadata={"help": "graph convolutions per task (AST-MTL code: 2)"})
    n_heads: int = field(default=4, metadata={"help": "heads of each task's attention (AST-MTL code: 4)"})
    key_dim: int = field(default=4, metadata={"help": "key size per head (AST-MTL code: 4)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout after the decoder GRU (AST-MTL code: 0.1)"})


@register_model("ast-mtl", multitask=True, config=ASTMTLConfig,
                description="AST-MTL (Buroni et al.): per-service GCN+GRU, shared FNN, task attention, GRU decoders")
class ASTMTL(nn.Module):
    def __init__(self, dims: DataDims, config: ASTMTLConfig):
        super().__init__()
        check_positive("ast-mtl", hidden=config.hidden, fnn_inner=config.fnn_inner, gcn_layers=config.gcn_layers,
                       n_heads=config.n_heads, key_dim=config.key_dim)
        check_dropout("ast-mtl", config.dropout)
        self.config = config
        self.dims = dims
        C, L, H, F = dims.n_services, dims.input_len, dims.horizon, dims.n_marks
        self.n_services, self.horizon, self.n_marks = C, H, F
        n_cells = dims.patch * dims.patch
        d = config.hidden
        self.register_buffer("adjacency", patch_adjacency(dims.patch), persistent=False)
        # Node features: L values + L observed flags; L units keep a sequence of L steps.
        self.gcn = nn.ModuleList(
            nn.ModuleList(GraphConv(2 * L if i == 0 else L, L) for i in range(config.gcn_layers)) for _ in range(C))
        self.encoders = nn.ModuleList(nn.GRU(n_cells, d, batch_first=True) for _ in range(C))
        self.shared_fnn = nn.Sequential(nn.Linear(C * d, d), nn.ReLU(), nn.Linear(d, config.fnn_inner), nn.ReLU(),
                                        nn.Linear(config.fnn_inner, d))
        self.attention = nn.ModuleList(KeyDimAttention(d, d, config.n_heads, config.key_dim) for _ in range(C))
        self.decoders = nn.ModuleList(nn.GRU(d + F, d, batch_first=True) for _ in range(C))
        self.dropout = nn.Dropout(config.dropout)
        self.heads = nn.ModuleList(nn.Linear(d + H * F, H) for _ in range(C))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x_patch, patch_mask: (B, L, C, k, k); x_mark: (B, L, F); y_mark: (B, label+H, F)
        -> (B, H, C) scaled."""
        check_batch("ast-mtl", batch, self.dims.input_len, self.n_services, self.dims.patch)
        patch = batch["x_patch"]
        b = patch.shape[0]
        values = patch.flatten(-2).permute(0, 2, 3, 1)                                 # (B, C, N, L)
        seen = batch["patch_mask"].to(patch.dtype).flatten(-2).permute(0, 2, 3, 1)
        sequences = []
        for c in range(self.n_services):
            nodes = torch.cat([values[:, c], seen[:, c]], dim=-1)                      # (B, N, 2L)
            for conv in self.gcn[c]:
                nodes = conv(nodes, self.adjacency)                                    # (B, N, L)
            seq, _ = self.encoders[c](nodes.transpose(1, 2))                           # (B, L, d)
            sequences.append(seq)
        shared = self.shared_fnn(torch.cat(sequences, dim=-1))                         # (B, L, d)
        future = batch["y_mark"][:, -self.horizon:].reshape(b, -1)                     # (B, H*F)
        h0 = shared[:, -1].unsqueeze(0).contiguous()                                   # (1, B, d)
        outputs = []
        for c in range(self.n_services):
            fused = self.attention[c](shared, sequences[c]) + shared                   # (B, L, d)
            _, last = self.decoders[c](torch.cat([fused, batch["x_mark"]], dim=-1), h0)
            outputs.append(self.heads[c](torch.cat([self.dropout(last[-1]), future], dim=-1)))  # (B, H)
        return torch.stack(outputs, dim=-1)
