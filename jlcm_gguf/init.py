"""Init step: one scalar codebook per row group, by Hessian-weighted k-means (Lloyd's algorithm in 1D).

The codebook lives in block-normalised units (v = w / max|w| of the 64-weight block, see group.py); each
weight counts with h_j * amax_block^2, its share of the output error. Centroids are quantized to int8
(largest magnitude 127), the format's codebook entries.
"""
from __future__ import annotations

import numpy as np

from .format import QK

MAX_SAMPLES = 1 << 18


def weighted_kmeans_1d(v: np.ndarray, wt: np.ndarray, k: int, iters: int = 30) -> np.ndarray:
    """Sorted centroids minimising sum wt * (v - c)^2; initialised at weighted quantiles."""
    order = np.argsort(v)
    vs, ws = v[order].astype(np.float64), wt[order].astype(np.float64)
    cw = np.cumsum(ws)
    cw /= cw[-1]
    c = vs[np.searchsorted(cw, (np.arange(k) + 0.5) / k).clip(0, len(vs) - 1)]
    # v is sorted, so each cluster is a run of it: its sums are differences of prefix sums
    sum_w = np.r_[0.0, np.cumsum(ws)]
    sum_wv = np.r_[0.0, np.cumsum(ws * vs)]
    for _ in range(iters):
        ends = np.r_[0, np.searchsorted(vs, (c[1:] + c[:-1]) / 2, side="right"), len(vs)]  # ties go to the lower
        sw = sum_w[ends[1:]] - sum_w[ends[:-1]]
        sv = sum_wv[ends[1:]] - sum_wv[ends[:-1]]
        new = np.where(sw > 0, sv / np.where(sw > 0, sw, 1), c)  # an empty cluster keeps its centre
        new = np.sort(new)
        if np.allclose(new, c, atol=1e-7):
            return new
        c = new
    return c


def to_int8_codebook(c: np.ndarray) -> np.ndarray:
    m = np.abs(c).max()
    q = np.round(c / (m if m > 0 else 1) * 127).clip(-127, 127).astype(np.int8)
    return np.sort(q)


def init_codebooks(w_stored: np.ndarray, h: np.ndarray | None, bounds: np.ndarray, bits: int,
                   variant: str = "codebooks", seed: int = 0, rounds: int = 2,
                   max_samples: int = MAX_SAMPLES) -> np.ndarray:
    """Entry point. int8 codebooks [n_groups, 2^bits] for the stored (grouped) rows of w.

    A first k-means runs on w / amax per block; then `rounds` times the blocks are packed with the current
    codebooks (scale by least squares, see pack.assign), and k-means runs again on w / d with weights
    h_j * d^2, so the codebook fits the scales it will be used with."""
    from .pack import assign, map_groups

    if variant not in ("codebooks", "scales"):
        raise ValueError(f"unknown variant {variant!r}")
    rows, cols = w_stored.shape
    b = np.asarray(w_stored, dtype=np.float32).reshape(rows, cols // QK, QK)
    hcol = np.ones(cols, dtype=np.float32) if h is None else np.maximum(np.asarray(h, dtype=np.float32), 1e-12)
    rng = np.random.default_rng(seed)
    k = 1 << bits
    starts = np.r_[0, bounds[:-1]]
    spans = [(0, rows)] * len(bounds) if variant == "scales" else list(zip(starts, bounds))

    def fit(scale: np.ndarray) -> np.ndarray:
        distinct = list(dict.fromkeys(spans))  # the "scales" variant fits one codebook for all groups
        # the samples drawn in group order (the same draws however the groups are then computed)
        picks = [rng.choice((r1 - r0) * cols, max_samples, replace=False) if (r1 - r0) * cols > max_samples
                 else None for r0, r1 in distinct]

        def one_group(span_pick):
            (r0, r1), pick = span_pick
            s = scale[r0:r1]  # one group's rows at a time (one per thread): temporaries stay a few groups'
            vv = (b[r0:r1] / np.where(s > 0, s, 1)[..., None]).ravel()
            ww = ((np.repeat(s, QK, axis=1) ** 2) * hcol[None, :]).ravel()
            if pick is not None:
                vv, ww = vv[pick], ww[pick]
            return to_int8_codebook(weighted_kmeans_1d(vv, ww, k))
        fitted = dict(zip(distinct, map_groups(one_group, zip(distinct, picks), b.size)))
        return np.stack([fitted[sp] for sp in spans])

    cb = fit(np.abs(b).max(axis=2) / 127)
    for _ in range(rounds):
        _, d = assign(w_stored, bits, cb, bounds, h, starts=(1.0,))  # the scale search runs once, when packing
        cb = fit(np.abs(d.astype(np.float32)))
    return cb
