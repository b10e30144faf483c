"""Pieces shared by the multi-task baselines (MTTC, AST-MTL, CSLSL).

- :func:`cell_channels`: the centre cell's series of every service, its observed flags and,
  optionally, the neighbourhood context (mean of the observed patch cells, observed fraction);
- :func:`patch_adjacency`: the k x k patch as a graph (8-neighbour cells, weights from the
  distance between cell centres), normalized as in Kipf & Welling's GCN;
- :class:`GraphConv`: one first-order graph convolution ``relu(A_hat X W)``;
- :class:`KeyDimAttention`: multi-head attention whose heads have their own small key size
  (Keras ``MultiHeadAttention(num_heads, key_dim)``), around the shared dense kernel;
- :func:`parse_order`: a task order option (comma-separated service indices).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from simmstnet.errors import UserError
from simmstnet.models.layers.attention import full_attention


def cell_channels(batch: dict[str, torch.Tensor], spatial: bool) -> torch.Tensor:
    """Per-step input channels of the centre cell.

    x, x_mask: (B, L, C); x_patch, patch_mask: (B, L, C, k, k). Returns (B, L, 2C) — values
    then observed flags — or (B, L, 4C) with ``spatial``: also the mean of the observed patch
    cells and the observed fraction of the patch (so "no neighbour seen" differs from a mean of
    0, which is the training mean in scaled units).
    """
    x, mask = batch["x"], batch["x_mask"].to(batch["x"].dtype)
    parts = [x, mask]
    if spatial:
        pm = batch["patch_mask"].to(x.dtype).flatten(-2)                       # (B, L, C, k*k)
        seen = pm.sum(-1)
        total = (batch["x_patch"].flatten(-2) * pm).sum(-1)
        parts += [total / seen.clamp_min(1.0), seen / pm.shape[-1]]
    return torch.cat(parts, dim=-1)


def patch_adjacency(patch: int) -> torch.Tensor:
    """Normalized adjacency of the k x k patch graph, (k*k, k*k), row-major cell order.

    Two cells are linked when they touch (8-neighbourhood); the weight is the inverse of the
    distance between their centres in cell units (1 for a side neighbour, 1/sqrt(2) for a
    diagonal one), so nearer cells count more. Self-loops are added and the matrix is
    symmetrically normalized, ``D^-1/2 (A + I) D^-1/2`` (Kipf & Welling 2017, the filter that
    AST-MTL's spektral ``gcn_filter`` computes).
    """
    rows, cols = torch.meshgrid(torch.arange(patch), torch.arange(patch), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1).float()          # (N, 2)
    dist = torch.cdist(pos, pos)
    adj = torch.where((dist > 0) & (dist < 1.5), 1.0 / dist.clamp_min(1e-6), torch.zeros(()))
    adj = adj + torch.eye(patch * patch)
    d = adj.sum(1).rsqrt()
    return d[:, None] * adj * d[None, :]


class GraphConv(nn.Module):
    """First-order graph convolution without bias (as AST-MTL's ``GCNConv(use_bias=False)``).

    x: (B, N, F_in), adjacency (N, N) normalized -> relu(A x W): (B, N, F_out).
    """

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Linear(n_in, n_out, bias=False)

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        """x: (B, N, F_in); adjacency: (N, N) -> (B, N, F_out)."""
        return F.relu(torch.matmul(adjacency, self.weight(x)))


class KeyDimAttention(nn.Module):
    """Multi-head attention with ``n_heads`` heads of ``key_dim`` each; output back to ``d_model``.

    The heads are narrower than the model (Keras semantics), so unlike
    :class:`~simmstnet.models.layers.attention.AttentionLayer` the model width need not divide
    by the number of heads. Values use ``key_dim`` too, as Keras does by default.
    """

    def __init__(self, d_query: int, d_key: int, n_heads: int, key_dim: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.key_dim = n_heads, key_dim
        inner = n_heads * key_dim
        self.q = nn.Linear(d_query, inner)
        self.k = nn.Linear(d_key, inner)
        self.v = nn.Linear(d_key, inner)
        self.out = nn.Linear(inner, d_query)
        self.dropout = float(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.n_heads, self.key_dim).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """queries: (B, L_Q, d_query); keys (= values): (B, L_K, d_key) -> (B, L_Q, d_query)."""
        q, k, v = self._split(self.q(queries)), self._split(self.k(keys)), self._split(self.v(keys))
        out = full_attention(q, k, v, dropout=self.dropout if self.training else 0.0)  # (B, h, L_Q, key_dim)
        b, _, l_q, _ = out.shape
        return self.out(out.transpose(1, 2).reshape(b, l_q, -1))


def parse_order(text: str, n_services: int, model: str) -> list[int]:
    """Task order from ``"2,0,1"`` (service indices of the batch); ``""`` keeps batch order.

    Raises UserError naming the option when it is not a permutation of 0 .. C-1.
    """
    if not text.strip():
        return list(range(n_services))
    try:
        order = [int(p) for p in text.split(",")]
    except ValueError:
        order = []
    if sorted(order) != list(range(n_services)):
        raise UserError(f"model {model!r} option 'order' must list each service index 0..{n_services - 1} "
                        f"once, comma-separated (e.g. {','.join(map(str, range(n_services)))}); got {text!r}")
    return order


def pooled_length(length: int, blocks: int) -> int:
    """Length after ``blocks`` max-pools of size 2 with ceil mode (never below 1)."""
    for _ in range(blocks):
        length = math.ceil(length / 2)
    return max(length, 1)


def check_positive(model: str, allow_zero: bool = False, **sizes: int) -> None:
    """UserError naming the option when a size is below 1 (below 0 with ``allow_zero``)."""
    low = 0 if allow_zero else 1
    for key, value in sizes.items():
        if value < low:
            raise UserError(f"model {model!r} option {key!r} must be >= {low}, got {value}")


def check_dropout(model: str, dropout: float) -> None:
    """UserError unless 0 <= dropout < 1."""
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"model {model!r} option 'dropout' must be in [0, 1), got {dropout}")


def check_batch(model: str, batch: dict[str, torch.Tensor], input_len: int, n_services: int, patch: int) -> None:
    """UserError when the batch was not made for the sizes the model was built for (a checkpoint
    used on other data, say): x must be (B, L, C) and x_patch (B, L, C, k, k)."""
    x = batch["x"]
    if x.dim() != 3 or tuple(x.shape[1:]) != (input_len, n_services):
        raise UserError(f"model {model!r}: batch x has shape {tuple(x.shape)}, the model was built for "
                        f"(B, {input_len}, {n_services}) (input_len, services)")
    shape = tuple(batch["x_patch"].shape[1:])
    if shape != (input_len, n_services, patch, patch):
        raise UserError(f"model {model!r}: batch x_patch has shape {tuple(batch['x_patch'].shape)}, the model "
                        f"was built for (B, {input_len}, {n_services}, {patch}, {patch}) (patch={patch})")
