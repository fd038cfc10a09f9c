"""Pack step: codebook indices and block scales to the JLCM block layout, and back.

This is the reference the C kernels are checked against: unpack/dequantize do exactly what
ggml_patch's dequantize does, w = float32(d) * float32(cb[idx]) with one rounding.
"""
from __future__ import annotations

import numpy as np

from .format import BLOCK_BYTES, QK


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


def dequantize(data: np.ndarray, bits: int, cols: int, cb: np.ndarray, bounds: np.ndarray | None = None,
               perm: np.ndarray | None = None) -> np.ndarray:
    """Float32 weights in original row order.

    cb: int8 [n_groups, 2^bits]; bounds: exclusive end rows (None: one group);
    perm: int32 [2, rows] as stored (row 0: stored->original), or None.
    """
    idx, d = unpack_blocks(data, bits, cols)
    rows = idx.shape[0]
    cb = np.asarray(cb, dtype=np.int8).reshape(-1, 1 << bits)
    grp = group_of_rows(bounds, rows) if bounds is not None else np.zeros(rows, dtype=np.int64)
    vals = cb[grp[:, None], idx].astype(np.float32)
    d32 = np.repeat(d.astype(np.float32), QK, axis=1)
    stored = d32 * vals  # one float32 rounding, as in C
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


def quantize_to_codebooks(w: np.ndarray, bits: int, cb: np.ndarray, bounds: np.ndarray | None) -> np.ndarray:
    """Pack float rows (stored order) against int8 group codebooks: per 64-weight block the scale
    d = amax / max|cb_g| and each weight takes the nearest codeword of w/d. Returns uint8 [rows, row_bytes]."""
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    cb = np.asarray(cb, dtype=np.int8).reshape(-1, 1 << bits)
    grp = group_of_rows(bounds, rows) if bounds is not None else np.zeros(rows, dtype=np.int64)
    blocks = w.reshape(rows, cols // QK, QK)
    cmax = np.abs(cb.astype(np.float32)).max(axis=1)[grp]                       # [rows]
    amax = np.abs(blocks).max(axis=2)                                           # [rows, nb]
    d = (amax / np.maximum(cmax[:, None], 1)).astype(np.float16)
    d32 = d.astype(np.float32)
    v = blocks / np.where(d32 > 0, d32, 1)[..., None]                           # in codebook units
    cbf = cb.astype(np.float32)[grp]                                            # [rows, 2^b]
    dist = np.abs(v[..., None] - cbf[:, None, None, :])                         # [rows, nb, QK, 2^b]
    idx = dist.argmin(axis=-1).astype(np.uint8)
    return pack_blocks(idx.reshape(rows, cols), d, bits)
