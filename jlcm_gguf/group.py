"""Group step: cluster a weight matrix's rows (neurons) by the distribution of their weights.

Statistic: each row is described by the Hessian-weighted quantiles of its block-normalised weights
v = w / max|w| over each 64-weight block (the values a group codebook has to represent; the block
scale takes out the magnitude). Quantiles at 8 levels, the weight of column j being the diagonal of the
input Hessian h_j = E[x_j^2] from calibration activations. Rows are clustered by k-means (k-means++
seeding, fixed seed) on these profiles, and ordered so that each group is contiguous.
"""
from __future__ import annotations

import numpy as np

from .format import QK

QUANTILE_LEVELS = np.array([0.02, 0.1, 0.25, 0.4, 0.6, 0.75, 0.9, 0.98])


def block_normalise(w: np.ndarray) -> np.ndarray:
    rows, cols = w.shape
    b = w.reshape(rows, cols // QK, QK)
    amax = np.abs(b).max(axis=2, keepdims=True)
    return (b / np.where(amax > 0, amax, 1)).reshape(rows, cols)


def row_profiles(w: np.ndarray, h: np.ndarray | None, chunk: int = 2048) -> np.ndarray:
    """[rows, len(QUANTILE_LEVELS)] Hessian-weighted quantiles of each row's block-normalised weights (computed
    `chunk` rows at a time: the sort's temporaries take several times the rows' bytes)."""
    w = np.asarray(w)  # a streamed tensor is decoded once
    rows, cols = w.shape
    hw = np.ones(cols, dtype=np.float64) if h is None else np.maximum(np.asarray(h, dtype=np.float64), 1e-12)
    out = np.empty((rows, len(QUANTILE_LEVELS)), dtype=np.float32)
    for r0 in range(0, rows, chunk):
        v = block_normalise(np.asarray(w[r0:r0 + chunk], dtype=np.float32))
        order = np.argsort(v, axis=1)
        vs = np.take_along_axis(v, order, axis=1)
        cw = np.cumsum(hw[order], axis=1)
        cw /= cw[:, -1:]
        for i, q in enumerate(QUANTILE_LEVELS):
            pos = (cw < q).sum(axis=1).clip(0, cols - 1)
            out[r0:r0 + chunk, i] = vs[np.arange(len(v)), pos]
    return out


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 25) -> np.ndarray:
    """Labels of k-means (k-means++ seeding) on the rows of x; every label in [0, k) is used."""
    n = len(x)
    k = min(k, n)
    rng = np.random.default_rng(seed)
    centers = [x[rng.integers(n)]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1 / n)
        c = x[rng.choice(n, p=p)]
        centers.append(c)
        d2 = np.minimum(d2, ((x - c) ** 2).sum(1))
    c = np.array(centers)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        dist = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        labels = dist.argmin(1)
        for j in range(k):
            m = labels == j
            if m.any():
                c[j] = x[m].mean(0)
            else:  # an empty cluster takes the point farthest from its centre
                far = dist[np.arange(n), labels].argmax()
                c[j] = x[far]
                labels[far] = j
    # relabel by centre, so groups come out in a deterministic, meaningful order
    rank = np.argsort(np.argsort(c[:, len(c[0]) // 2] if c.ndim > 1 else c))
    return rank[labels]


def group_rows(profiles: np.ndarray, n_groups: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Entry point. Returns (order, bounds): stored row i is original row order[i]; group g is stored rows
    [bounds[g-1], bounds[g])."""
    rows = len(profiles)
    if n_groups <= 1 or rows <= 1:
        return np.arange(rows), np.array([rows], dtype=np.int32)
    labels = kmeans(profiles.astype(np.float64), n_groups, seed)
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=labels.max() + 1)
    bounds = np.cumsum(counts[counts > 0]).astype(np.int32)
    return order, bounds
