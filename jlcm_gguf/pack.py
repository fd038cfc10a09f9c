"""Pack step: codebook indices and block scales to the JLCM block layout, and back.

This is the reference the C kernels are checked against: unpack/dequantize do exactly what
ggml_patch's dequantize does, w = float32(d) * float32(cb[idx]) with one rounding.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from .format import BLOCK_BYTES, QK

PARALLEL_MIN = 1 << 20  # elements of work below which threads cost more than they save


def map_groups(fn, items, size: int) -> list:
    """[fn(x) for x in items], on as many threads as torch computes with (--threads) when the work is large (`size`
    elements): numpy releases the GIL in its array loops, so independent row groups run side by side, each with
    the same operations in the same order as alone (the same bits)."""
    items = list(items)
    torch = sys.modules.get("torch")
    n = min(len(items), torch.get_num_threads() if torch is not None else (os.cpu_count() or 1))
    if n <= 1 or size < PARALLEL_MIN:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(fn, items))


def pack_blocks(idx: np.ndarray, d: np.ndarray, bits: int) -> np.ndarray:
    """idx: uint8 [rows, cols] (< 2^bits), d: float16 [rows, cols/64] -> uint8 [rows, row_bytes]."""
    rows, cols = idx.shape
    if cols % QK:
        raise ValueError(f"row width {cols} is not a multiple of {QK}")
    if idx.max(initial=0) >= (1 << bits):
        raise ValueError(f"index out of range for {bits} bits")
    nb = cols // QK
    q = idx.reshape(rows, nb, QK).astype(np.uint8)
    out = np.empty((rows, nb, BLOCK_BYTES[bits]), dtype=np.uint8)
    out[:, :, 0:2] = np.ascontiguousarray(d.astype(np.float16)).reshape(rows, nb, 1).view(np.uint8)
    if bits in (2, 3):
        lo = q & 3
        out[:, :, 2:18] = lo[..., 0:16] | (lo[..., 16:32] << 2) | (lo[..., 32:48] << 4) | (lo[..., 48:64] << 6)
    if bits == 3:
        hi = ((q >> 2) & 1).reshape(rows, nb, 8, 8)  # [k, j]: weight j + 8k
        out[:, :, 18:26] = (hi << np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)).sum(axis=2, dtype=np.uint8)
    if bits == 4:
        out[:, :, 2:34] = q[..., 0:32] | (q[..., 32:64] << 4)
    return out.reshape(rows, nb * BLOCK_BYTES[bits])


def unpack_blocks(data: np.ndarray, bits: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [rows, row_bytes] -> (idx uint8 [rows, cols], d float16 [rows, cols/64])."""
    nb = cols // QK
    blk = np.asarray(data, dtype=np.uint8).reshape(-1, nb, BLOCK_BYTES[bits])
    rows = blk.shape[0]
    d = np.ascontiguousarray(blk[:, :, 0:2]).view(np.float16).reshape(rows, nb)
    idx = np.empty((rows, nb, QK), dtype=np.uint8)
    if bits in (2, 3):
        qs = blk[:, :, 2:18]
        for k in range(4):
            idx[..., 16 * k:16 * (k + 1)] = (qs >> (2 * k)) & 3
    if bits == 3:
        qh = blk[:, :, 18:26]
        for k in range(8):
            idx[..., 8 * k:8 * (k + 1)] |= ((qh >> k) & 1) << 2
    if bits == 4:
        qs = blk[:, :, 2:34]
        idx[..., 0:32] = qs & 15
        idx[..., 32:64] = qs >> 4
    return idx.reshape(rows, cols), d


def group_of_rows(bounds: np.ndarray, rows: int) -> np.ndarray:
    """Group index of each stored row, from exclusive end bounds."""
    return np.searchsorted(np.asarray(bounds, dtype=np.int64), np.arange(rows), side="right")


def lookup(idx: np.ndarray, d: np.ndarray, cb: np.ndarray, bounds: np.ndarray | None) -> np.ndarray:
    """Float32 weights (stored row order) of unpacked indices [rows, cols] and block scales [rows, cols/QK]."""
    rows = idx.shape[0]
    cb = np.asarray(cb, dtype=np.int8)  # [n_groups, 2^bits]
    grp = group_of_rows(bounds, rows) if bounds is not None else np.zeros(rows, dtype=np.int64)
    vals = cb[grp[:, None], idx].astype(np.float32)
    return np.repeat(d.astype(np.float32), QK, axis=1) * vals  # one float32 rounding, as in C


def dequantize(data: np.ndarray, bits: int, cols: int, cb: np.ndarray, bounds: np.ndarray | None = None,
               perm: np.ndarray | None = None) -> np.ndarray:
    """Float32 weights in original row order.

    cb: int8 [n_groups, 2^bits]; bounds: exclusive end rows (None: one group);
    perm: int32 [2, rows] as stored (row 0: stored->original), or None.
    """
    idx, d = unpack_blocks(data, bits, cols)
    stored = lookup(idx, d, np.asarray(cb, dtype=np.int8).reshape(-1, 1 << bits), bounds)
    if perm is None:
        return stored
    out = np.empty_like(stored)
    out[np.asarray(perm)[0]] = stored
    return out


def quantize_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's reference Q8_0 of activations: per 32 values d = amax/127, q = round-half-away(x/d)."""
    xb = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    amax = np.abs(xb).max(axis=1)
    d = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    v = xb * inv[:, None]
    q = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int8)
    return q.reshape(x.shape), d.astype(np.float16)


def matmul_q8_reference(w_orig: np.ndarray, x: np.ndarray) -> np.ndarray:
    """W @ x with x quantized to Q8_0 the way ggml does for JLCM's vec_dot; x: [n, cols] -> [n, rows]."""
    q, d = quantize_q8_0(x)
    xq = (q.reshape(-1, 32).astype(np.float64) * d.astype(np.float64)[:, None]).reshape(x.shape)
    return (xq @ np.asarray(w_orig, dtype=np.float64).T)


# Starting scales of a block, in units of amax / max|cb|. One start (amax) refitted by least squares stops in
# a local optimum; the best of several is kept, as llama.cpp's make_qx_quants tries a range of scales. A
# negative start mirrors an asymmetric codebook. Starts below amax clip the block's largest weights: under
# GPTQ rounding the clipped error is compensated on later columns, under nearest rounding it is not. Both
# sets were chosen by SmolLM2's perplexity at 2-4 bits (experiments/scale_starts.py, docs/measurements/scale-starts.md).
SCALE_STARTS = (1.0, -1.0)                                # nearest rounding (pack.assign's default)
GPTQ_SCALE_STARTS = (1.0, 0.85, 0.7, -1.0, -0.85, -0.7)  # the block scales gptq.assign_gptq rounds against


def quantize_to_codebooks(w: np.ndarray, bits: int, cb: np.ndarray, bounds: np.ndarray | None,
                          h: np.ndarray | None = None, refine: int = 2) -> np.ndarray:
    """Pack float rows (stored order) against int8 group codebooks. Per 64-weight block the scale starts at
    each of SCALE_STARTS · amax / max|cb_g| (+amax and -amax), each weight takes the nearest codeword of
    w/d, then `refine` rounds alternate the h-weighted least-squares scale and the assignment; the scale
    and assignment with the lowest h-weighted error seen is kept. Returns uint8 [rows, row_bytes]."""
    idx, d = assign(w, bits, cb, bounds, h, refine)
    return pack_blocks(idx, d, bits)


def nearest_codeword(x: np.ndarray, scale: np.ndarray, mid: np.ndarray) -> np.ndarray:
    """Sorted-codebook position of the codeword nearest x / scale (ties to the lower; a zero scale divides by 1)."""
    v = x / np.where(scale != 0, scale, 1)[..., None]
    pos = np.zeros(v.shape, dtype=np.intp)
    for m in mid:  # = np.searchsorted(mid, v); a few compares are several times faster for 4-16 codewords
        pos += v > m
    return pos


def assign(w: np.ndarray, bits: int, cb: np.ndarray, bounds: np.ndarray | None,
           h: np.ndarray | None = None, refine: int = 2,
           starts: tuple[float, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(idx uint8 [rows, cols], d float16 [rows, cols/64]) for quantize_to_codebooks; starts: the starting
    scales, SCALE_STARTS when None."""
    starts = SCALE_STARTS if starts is None else starts
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    nb = cols // QK
    cb = np.asarray(cb, dtype=np.int8).reshape(-1, 1 << bits)
    grp = group_of_rows(bounds, rows) if bounds is not None else np.zeros(rows, dtype=np.int64)
    hb = (np.ones(cols, np.float32) if h is None else np.maximum(np.asarray(h, np.float32), 1e-12)).reshape(1, nb, QK)
    idx = np.empty((rows, nb, QK), dtype=np.uint8)
    d = np.empty((rows, nb), dtype=np.float16)

    def one_group(g):
        m = grp == g
        c = np.sort(cb[g].astype(np.float32))
        order = np.argsort(cb[g].astype(np.float32), kind="stable")  # sorted position -> codebook index
        mid = (c[1:] + c[:-1]) / 2
        blocks = w[m].reshape(-1, nb, QK)
        base = np.abs(blocks).max(axis=2) / max(np.abs(c).max(), 1)
        hx = hb * blocks
        # error of scale s with codewords cv: sum h x^2 - 2 s sum h x cv + s^2 sum h cv^2 (the first term is
        # the same for every s, so it is left out of the comparison)
        best_e = np.full(base.shape, np.inf, dtype=np.float32)
        best_s = np.zeros(base.shape, dtype=np.float32)
        for start in starts:
            scale = start * base
            for it in range(refine + 1):
                s32 = np.clip(scale, -65504, 65504).astype(np.float16).astype(np.float32)
                cv = c[nearest_codeword(blocks, s32, mid)]
                num = (hx * cv).sum(axis=2)
                den = (hb * cv * cv).sum(axis=2)
                err = s32 * (s32 * den - 2 * num)
                better = err < best_e
                best_e = np.where(better, err, best_e)
                best_s = np.where(better, s32, best_s)
                if it == refine:
                    break
                scale = np.where(den > 0, num / np.where(den > 0, den, 1), scale)
        return m, order[nearest_codeword(blocks, best_s, mid)], best_s.astype(np.float16)

    for m, idx_g, d_g in map_groups(one_group, np.unique(grp), w.size):
        idx[m] = idx_g
        d[m] = d_g
    return idx.reshape(rows, cols), d
