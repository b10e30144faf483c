"""Full and ProbSparse multi-head attention.

ProbSparse attention (Zhou et al., "Informer", AAAI 2021): most queries of a time series
attend almost uniformly, so only the ``u`` most "active" queries get real attention and the
others get the mean of the values. Activity is the sparsity measure
``M(q) = max_j s(q, k_j) - mean_j s(q, k_j)`` estimated on ``U_part`` randomly sampled keys
per query, with ``U_part = min(factor * ceil(ln L_K), L_K)`` and
``u = min(factor * ceil(ln L_Q), L_Q)``. With causal masking the lazy queries get the running
mean of the values up to their own position (the original code uses a running sum; a mean
keeps the scale of the values and is what "uniform attention under the mask" is).

Reproducibility: the key sample comes from a ``torch.Generator``. Pass one to ``forward``, or
let the module use its own: in eval mode a fresh generator seeded with ``seed`` on every call
(so evaluation is deterministic and independent of call order), in training mode one seeded
with ``seed`` at construction that advances from call to call.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Below this many query-key pairs the sample's scores are read off the dense score matrix:
# identical numbers, and one small matmul beats gathering L_Q x U_part key vectors.
DENSE_SAMPLING_MAX_PAIRS = 4096


def prob_sparse_counts(l_q: int, l_k: int, factor: int) -> tuple[int, int]:
    """``(u, U_part)``: queries given full attention and keys sampled per query."""
    u = min(factor * max(1, math.ceil(math.log(l_q))), l_q) if l_q > 1 else 1
    n_sample = min(factor * max(1, math.ceil(math.log(l_k))), l_k) if l_k > 1 else 1
    return max(1, u), max(1, n_sample)


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                   dropout: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention. q: (B, h, L_Q, D); k, v: (B, h, L_K, D) -> (B, h, L_Q, D)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal)


MEASURES = ("sample-mean", "reference")


def prob_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, factor: int,
                          generator: torch.Generator, causal: bool = False, dropout: float = 0.0,
                          dense_sampling: bool | None = None, measure: str = "sample-mean") -> torch.Tensor:
    """ProbSparse attention. q: (B, h, L_Q, D); k, v: (B, h, L_K, D) -> (B, h, L_Q, D).

    ``generator`` (CPU) draws the key sample, shared over batch and heads as in Informer.
    ``dense_sampling`` forces the dense (True) or gathered (False) scoring of the sample; by
    default the dense path is used for short sequences. Both give the same result.

    ``measure``, the query sparsity that picks the top-u queries, max over the sampled scores
    minus their mean: ``sample-mean`` divides the sampled scores' sum by the number of sampled
    keys (the paper's M-bar read on the sample); ``reference`` divides it by L_K, as the
    Informer2020 code does (``Q_K_sample.sum(-1) / L_K``). The two pick different queries
    whenever the sample is smaller than L_K.
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown ProbSparse measure {measure!r}; use one of {MEASURES}")
    b, h, l_q, d = q.shape
    l_k = k.shape[-2]
    if causal and l_q != l_k:
        raise ValueError(f"causal ProbSparse attention needs L_Q == L_K, got {l_q} and {l_k}")
    u, n_sample = prob_sparse_counts(l_q, l_k, factor)
    scale = 1.0 / math.sqrt(d)
    sample = torch.randint(l_k, (l_q, n_sample), generator=generator).to(q.device)
    if dense_sampling is None:
        dense_sampling = l_q * l_k <= DENSE_SAMPLING_MAX_PAIRS

    if causal:
        steps = torch.arange(1, l_k + 1, device=v.device, dtype=v.dtype)[:, None]
        lazy = v.cumsum(dim=-2) / steps  # running mean of the values, (B, h, L_Q, D)
    else:
        lazy = v.mean(dim=-2, keepdim=True).expand(b, h, l_q, v.shape[-1])

    if dense_sampling:
        # Short sequences: every score is one small matmul away, so read the sample's scores
        # off the dense matrix with a per-query membership mask (no gathers), let every query
        # attend, and keep the result only for the selected ones. Same numbers as below.
        scores = torch.matmul(q * scale, k.transpose(-2, -1))  # (B, h, L_Q, L_K)
        counts = torch.zeros(l_q, l_k, device=q.device, dtype=q.dtype)
        counts.scatter_add_(1, sample, torch.ones_like(sample, dtype=q.dtype))
        outside = torch.zeros_like(counts).masked_fill_(counts == 0, float("-inf"))
        measured = scores.detach()  # the measure only selects queries: no gradient through it
        divisor = n_sample if measure == "sample-mean" else l_k
        sparsity = (measured + outside).amax(-1) - (measured * (counts / divisor)).sum(-1)  # (B, h, L_Q)
        top = sparsity.topk(u, dim=-1, sorted=False).indices  # (B, h, u)
        selected = torch.zeros(b, h, l_q, dtype=torch.bool, device=q.device).scatter_(-1, top, True)
        if causal:
            scores = scores.masked_fill(torch.ones(l_q, l_k, dtype=torch.bool, device=q.device).triu(1),
                                        float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        if dropout > 0:
            attn = F.dropout(attn, p=dropout)
        return torch.where(selected[..., None], torch.matmul(attn, v), lazy)

    # Long sequences (Informer's path): score only the sampled keys, then only the top queries.
    k_sample = k[:, :, sample, :]  # (B, h, L_Q, U_part, D)
    sampled = torch.einsum("bhqd,bhqsd->bhqs", q.detach(), k_sample.detach()) * scale
    sparsity = sampled.amax(-1) - sampled.sum(-1) / (n_sample if measure == "sample-mean" else l_k)  # (B, h, L_Q)
    top = sparsity.topk(u, dim=-1, sorted=False).indices  # (B, h, u)
    q_top = q.gather(-2, top[..., None].expand(b, h, u, d))
    top_scores = torch.matmul(q_top, k.transpose(-2, -1)) * scale  # (B, h, u, L_K)
    if causal:
        keys = torch.arange(l_k, device=q.device)
        top_scores = top_scores.masked_fill(keys > top[..., None], float("-inf"))
    attn = torch.softmax(top_scores, dim=-1)
    if dropout > 0:
        attn = F.dropout(attn, p=dropout)
    active = torch.matmul(attn, v)  # (B, h, u, D)
    return lazy.scatter(-2, top[..., None].expand(b, h, u, v.shape[-1]), active)


class ProbSparseAttention(nn.Module):
    """ProbSparse attention kernel with its own reproducible sampling (see module docstring)."""

    def __init__(self, factor: int = 5, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        self.factor = int(factor)
        self.dropout = float(dropout)
        self.seed = int(seed)
        self.measure = "sample-mean"  # set by the model from its config (see prob_sparse_attention)
        self._train_generator: torch.Generator | None = None

    def reset_sampling(self, seed: int | None = None) -> None:
        """Restart the training-mode sample stream (from ``seed`` if given)."""
        if seed is not None:
            self.seed = int(seed)
        self._train_generator = None

    def _generator(self) -> torch.Generator:
        if not self.training:
            return torch.Generator().manual_seed(self.seed)
        if self._train_generator is None:
            self._train_generator = torch.Generator().manual_seed(self.seed)
        return self._train_generator

    def forward(self, q, k, v, causal: bool = False, generator: torch.Generator | None = None):
        """q: (B, h, L_Q, D); k, v: (B, h, L_K, D) -> (B, h, L_Q, D)."""
        return prob_sparse_attention(q, k, v, self.factor, generator or self._generator(), causal=causal,
                                     dropout=self.dropout if self.training else 0.0, measure=self.measure)


class FullAttention(nn.Module):
    """Dense scaled dot-product attention kernel (same call signature as ProbSparseAttention)."""

    def __init__(self, dropout: float = 0.0, **_unused):
        super().__init__()
        self.dropout = float(dropout)

    def forward(self, q, k, v, causal: bool = False, generator: torch.Generator | None = None):
        """q: (B, h, L_Q, D); k, v: (B, h, L_K, D) -> (B, h, L_Q, D)."""
        return full_attention(q, k, v, causal=causal, dropout=self.dropout if self.training else 0.0)


def set_prob_measure(model: nn.Module, measure: str) -> None:
    """Set the sparsity measure of every ProbSparse kernel inside ``model``."""
    if measure not in MEASURES:
        from simmstnet.errors import UserError

        raise UserError(f"model option prob_measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    for module in model.modules():
        if isinstance(module, ProbSparseAttention):
            module.measure = measure


class AttentionLayer(nn.Module):
    """Multi-head attention: projections around a full or ProbSparse kernel.

    ``kind`` is ``"full"`` or ``"prob"``; ``factor`` and ``seed`` matter for ``"prob"`` only.
    """

    def __init__(self, d_model: int, n_heads: int, kind: str = "full", factor: int = 5,
                 dropout: float = 0.0, seed: int = 0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.d_model = d_model
        # One (d, 3d) projection for queries, keys and values: self-attention then runs a single
        # matmul, cross-attention two (queries; keys and values together).
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        if kind == "prob":
            self.kernel: nn.Module = ProbSparseAttention(factor, dropout, seed)
        elif kind == "full":
            self.kernel = FullAttention(dropout)
        else:
            raise ValueError(f"unknown attention kind {kind!r}; use 'full' or 'prob'")

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(self, queries, keys, values, causal: bool = False):
        """queries: (B, L_Q, d); keys, values: (B, L_K, d) -> (B, L_Q, d)."""
        d, w, bias = self.d_model, self.in_proj.weight, self.in_proj.bias
        if queries is keys and keys is values:
            q, k, v = self.in_proj(queries).chunk(3, dim=-1)
        elif keys is values:
            q = F.linear(queries, w[:d], bias[:d])
            k, v = F.linear(keys, w[d:], bias[d:]).chunk(2, dim=-1)
        else:
            q = F.linear(queries, w[:d], bias[:d])
            k = F.linear(keys, w[d:2 * d], bias[d:2 * d])
            v = F.linear(values, w[2 * d:], bias[2 * d:])
        q, k, v = self._split(q), self._split(k), self._split(v)
        out = self.kernel(q, k, v, causal=causal)  # (B, h, L_Q, D)
        b, _, l_q, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, l_q, -1))
