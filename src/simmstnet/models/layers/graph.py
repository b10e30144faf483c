"""The neighbourhood patch as a graph, for the graph baselines (STGCN, DCRNN, STAEformer).

The spatial baselines forecast one cell from its k x k patch (``x_patch``), so their graph is the
patch: N = k*k nodes numbered row-major (node ``r * k + c`` is patch cell (r, c); the forecast
cell is the centre node N // 2). Two patch cells are joined when their centre distance d (in
cell units) satisfies 0 < d <= ``radius`` (default sqrt(2): the 8 neighbours), with the Gaussian
kernel weight of STGCN (Yu et al. 2018, eq. 10) and DCRNN (Li et al. 2018, sec. 4.1)::

    w_ij = exp(-d_ij^2 / sigma^2),   set to 0 when w_ij < threshold

Defaults sigma = 1 cell, threshold = 0.1 (DCRNN's kappa): a side neighbour weighs e^-1 = 0.368,
a diagonal one e^-2 = 0.135, so all 8 neighbours stay; sigma < 0.76 drops the diagonals. There
are no self-loops (STGCN's w_ii = 0; the diffusion's k = 0 term already is the identity).

The graph is the same for every window: cells outside the city grid stay in it with zero input
and a False mask channel (the models read the mask), so one fixed operator serves all windows
and the edge cells need no special graph.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from simmstnet.errors import UserError

SIDE_AND_DIAGONAL = math.sqrt(2.0)


def patch_distances(k: int) -> np.ndarray:
    """Euclidean distances between the cells of a k x k patch, in cell units. Returns (k*k, k*k)."""
    rows, cols = np.divmod(np.arange(k * k), k)
    return np.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :])


def gaussian_adjacency(k: int, sigma: float = 1.0, radius: float = SIDE_AND_DIAGONAL,
                       threshold: float = 0.1) -> np.ndarray:
    """Weighted adjacency W (k*k, k*k) of the patch graph, symmetric, zero diagonal (see module doc)."""
    if k < 1:
        raise UserError(f"patch size must be at least 1, got {k}")
    if sigma <= 0 or radius <= 0 or not 0 <= threshold < 1:
        raise UserError(f"graph options need sigma > 0, radius > 0 and 0 <= threshold < 1; got "
                        f"sigma={sigma}, radius={radius}, threshold={threshold}")
    d = patch_distances(k)
    w = np.exp(-(d ** 2) / sigma ** 2)
    # The radius test has a small tolerance: sqrt(2) computed two ways must count as a neighbour.
    keep = (d > 0) & (d <= radius + 1e-9) & (w >= threshold)
    return np.where(keep, w, 0.0)


def scaled_laplacian(w: np.ndarray, lambda_max: float | None = None) -> np.ndarray:
    """STGCN's rescaled normalized Laplacian ``2 L / lambda_max - I`` with ``L = I - D^-1/2 W D^-1/2``.

    w: (N, N) symmetric non-negative. ``lambda_max`` defaults to the largest eigenvalue of L
    (exact; the patch graphs are tiny). An isolated node gets degree 1 so that it has L_ii = 1
    instead of a division by zero. Returns (N, N); its eigenvalues lie in [-1, 1].
    """
    n = w.shape[0]
    degree = w.sum(axis=1)
    inv_sqrt = 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0))
    lap = np.eye(n) - inv_sqrt[:, None] * w * inv_sqrt[None, :]
    if lambda_max is None:
        lambda_max = float(np.linalg.eigvalsh(lap).max()) if n > 1 else 1.0
        lambda_max = lambda_max if lambda_max > 0 else 1.0  # a graph without edges: L = I
    return 2.0 * lap / lambda_max - np.eye(n)


def chebyshev_polynomials(l_tilde: np.ndarray, order: int) -> np.ndarray:
    """T_0 .. T_{order-1} of the scaled Laplacian: T_0 = I, T_1 = L~, T_k = 2 L~ T_{k-1} - T_{k-2}.

    l_tilde: (N, N). Returns (order, N, N).
    """
    if order < 1:
        raise UserError(f"Chebyshev order must be at least 1, got {order}")
    n = l_tilde.shape[0]
    polys = [np.eye(n)]
    if order > 1:
        polys.append(l_tilde.copy())
    while len(polys) < order:
        polys.append(2.0 * l_tilde @ polys[-1] - polys[-2])
    return np.stack(polys)


def random_walk_matrix(w: np.ndarray) -> np.ndarray:
    """DCRNN's forward transition matrix ``D_O^-1 W`` (row i: where a walker at i moves next).

    w: (N, N). Returns (N, N) with rows summing to 1 (rows of isolated nodes stay 0). The reverse
    direction of the bidirectional diffusion is ``random_walk_matrix(w.T)``.
    """
    out_degree = w.sum(axis=1)
    return np.divide(w, out_degree[:, None], out=np.zeros_like(w, dtype=np.float64),
                     where=out_degree[:, None] > 0)


def patch_nodes(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Node features of the patch graph: every service's scaled value and observed flag.

    x_patch, patch_mask: (B, L, C, k, k) -> (B, L, N, 2C) with N = k*k row-major; channels are
    [values of the C services, then their masks]. Out-of-grid cells carry 0 and mask 0.
    """
    x, m = batch["x_patch"], batch["patch_mask"].to(batch["x_patch"].dtype)
    b, l, c, k, _ = x.shape
    feats = torch.cat([x, m], dim=2)  # (B, L, 2C, k, k)
    return feats.permute(0, 1, 3, 4, 2).reshape(b, l, k * k, 2 * c)


def check_patch_batch(batch: dict[str, torch.Tensor], dims, model: str) -> None:
    """UserError when ``x_patch`` does not have the (B, L, C, k, k) the model was built for."""
    k = dims.patch
    want = (dims.input_len, dims.n_services, k, k)
    got = tuple(batch["x_patch"].shape)
    if len(got) != 5 or got[1:] != want:
        raise UserError(f"model {model!r}: batch x_patch has shape {got}, the model was built for "
                        f"(B, {dims.input_len}, {dims.n_services}, {k}, {k}) (input_len, services, patch)")
