"""ProbSparse attention against brute force: exact when every query is active, reproducible,
differentiable, and equal to a hand-built reference when only some queries are active."""
from __future__ import annotations

import math

import pytest
import torch

from simmstnet.models.layers.attention import (AttentionLayer, ProbSparseAttention, full_attention,
                                               prob_sparse_attention, prob_sparse_counts)


def _qkv(b=2, h=2, l_q=10, l_k=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, l_q, d, generator=g), torch.randn(b, h, l_k, d, generator=g),
            torch.randn(b, h, l_k, d, generator=g))


def _manual_full(q, k, v, causal=False):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, -1) @ v


def test_counts_follow_informer_formula():
    # u = min(c * ceil(ln L), L): ln 24 = 3.18 -> 4
    assert prob_sparse_counts(24, 24, 5) == (20, 20)
    assert prob_sparse_counts(96, 48, 5) == (25, 20)
    assert prob_sparse_counts(18, 24, 1) == (3, 4)
    assert prob_sparse_counts(1, 1, 5) == (1, 1)


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_all_queries_selected_equals_full_attention(dense, causal):
    l_k = 10 if causal else 12
    q, k, v = _qkv(l_q=10, l_k=l_k)
    u, _ = prob_sparse_counts(10, l_k, 50)
    assert u == 10  # factor large enough: every query is active
    out = prob_sparse_attention(q, k, v, 50, torch.Generator().manual_seed(0), causal=causal,
                                dense_sampling=dense)
    assert torch.allclose(out, _manual_full(q, k, v, causal), atol=1e-6)
    assert torch.allclose(full_attention(q, k, v, causal), _manual_full(q, k, v, causal), atol=1e-6)


def _reference_prob(q, k, v, factor, seed, causal):
    """Brute-force ProbSparse, one query at a time, drawing the same key sample."""
    b, h, l_q, d = q.shape
    l_k = k.shape[-2]
    u, n = prob_sparse_counts(l_q, l_k, factor)
    sample = torch.randint(l_k, (l_q, n), generator=torch.Generator().manual_seed(seed))
    out = torch.empty_like(q)
    for bi in range(b):
        for hi in range(h):
            s = q[bi, hi] @ k[bi, hi].T / math.sqrt(d)
            m = torch.stack([s[i, sample[i]].max() - s[i, sample[i]].mean() for i in range(l_q)])
            active = set(torch.argsort(m, descending=True)[:u].tolist())
            for i in range(l_q):
                visible = i + 1 if causal else l_k
                if i in active:
                    out[bi, hi, i] = torch.softmax(s[i, :visible], 0) @ v[bi, hi, :visible]
                else:
                    out[bi, hi, i] = v[bi, hi, :visible].mean(0)
    return out, u


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_sparse_selection_matches_brute_force(dense, causal):
    l_k = 30 if causal else 40
    q, k, v = _qkv(l_q=30, l_k=l_k, seed=3)
    ref, u = _reference_prob(q, k, v, 2, seed=7, causal=causal)
    assert u < 30  # some queries really are lazy
    out = prob_sparse_attention(q, k, v, 2, torch.Generator().manual_seed(7), causal=causal,
                                dense_sampling=dense)
    assert torch.allclose(out, ref, atol=1e-5)
    # and the lazy queries differ from full attention, so the test distinguishes the two
    assert not torch.allclose(out, _manual_full(q, k, v, causal), atol=1e-3)


def test_same_seed_same_output_and_eval_is_deterministic():
    q, k, v = _qkv(l_q=30, l_k=30)
    a = prob_sparse_attention(q, k, v, 1, torch.Generator().manual_seed(5))
    b = prob_sparse_attention(q, k, v, 1, torch.Generator().manual_seed(5))
    c = prob_sparse_attention(q, k, v, 1, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the sample matters with factor 1 on 30 steps

    kernel = ProbSparseAttention(factor=1, seed=5).eval()
    assert torch.equal(kernel(q, k, v), a)
    assert torch.equal(kernel(q, k, v), a)  # eval: same result on every call
    kernel.train()
    first, second = kernel(q, k, v), kernel(q, k, v)
    assert torch.equal(first, a)  # training stream starts from the same seed ...
    assert not torch.equal(first, second)  # ... and advances
    kernel.reset_sampling()
    assert torch.equal(kernel(q, k, v), a)


def test_gradient_flows_through_prob_sparse_layer():
    torch.manual_seed(0)
    layer = AttentionLayer(16, 2, kind="prob", factor=2)
    x = torch.randn(3, 20, 16, requires_grad=True)
    layer(x, x, x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _informer2020_arithmetic(q, k, v, sample, u):
    """The Informer2020 code's _prob_QK / _get_initial_context for non-causal attention,
    written out from its formulas: M = max(Q K_sample) - sum(Q K_sample) / L_K; the top-u
    queries attend to every key, the others take the mean of V."""
    b, h, l_q, d = q.shape
    l_k = k.shape[-2]
    k_sample = k[:, :, sample, :]                                   # (B, h, L_Q, n, D)
    qk_sample = (q.unsqueeze(-2) @ k_sample.transpose(-2, -1)).squeeze(-2)  # (B, h, L_Q, n)
    m = qk_sample.max(-1)[0] - qk_sample.sum(-1) / l_k
    top = m.topk(u, sorted=False)[1]
    out = v.mean(-2, keepdim=True).expand(b, h, l_q, d).clone()
    scores = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)
    full = scores @ v
    for bi in range(b):
        for hi in range(h):
            out[bi, hi, top[bi, hi]] = full[bi, hi, top[bi, hi]]
    return out


@pytest.mark.parametrize("dense", [True, False])
def test_reference_measure_matches_the_informer2020_arithmetic(dense):
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 2, 30, 8, dtype=torch.float64) for _ in range(3))
    u, n_sample = prob_sparse_counts(30, 30, 2)
    assert n_sample < 30  # otherwise the two measures coincide
    sample = torch.randint(30, (30, n_sample), generator=torch.Generator().manual_seed(9))
    expected = _informer2020_arithmetic(q, k, v, sample, u)
    got = prob_sparse_attention(q, k, v, 2, torch.Generator().manual_seed(9), dense_sampling=dense,
                                measure="reference")
    assert torch.allclose(got, expected, atol=1e-10)
    # the paper's reading (divide by the sample size) selects other queries here
    paper = prob_sparse_attention(q, k, v, 2, torch.Generator().manual_seed(9), dense_sampling=dense)
    assert not torch.allclose(paper, expected, atol=1e-6)
