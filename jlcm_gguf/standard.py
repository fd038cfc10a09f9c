"""llama.cpp's Q4_0 / Q5_0 / Q8_0 for the matrices JLCM does not store, quantized as `llama-quantize --imatrix`
does rather than by gguf-py's reference code: each 32-weight block's scale is searched to minimise the
importance-weighted squared error sum_j q_j (w_j - d L_j)^2 with q_j = h_j sqrt(sigma^2 + w_j^2) (h_j: the
input's second moment, sigma^2: the row's mean square; llama.cpp's make_qx_quants weighting), instead of
being the largest weight over the top level. Then every level is rounded again against the scale as stored
(fp16) and the scale refitted, which can only lower that error. docs/measurements/results.md shows what it did to the
mixed-precision rows.

The K-quants (Q2_K ... Q6_K, 256-weight super-blocks, for --kquants plans) are quantized by llama.cpp's own
ggml_quantize_chunk with h as its importance matrix, called in the libggml-base that llama-cpp-python ships,
so a K-quant matrix here has the bytes llama-quantize would give it.

The bytes are the ggml block layouts (docs/FORMAT.md points to ggml-common.h); gguf-py dequantizes them.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT

BLOCK = 32
LEVELS = {QT.Q4_0: (-8, 7), QT.Q5_0: (-16, 15), QT.Q8_0: (-127, 127)}  # int level range of each type
KQUANTS = (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)
CHUNK = 1 << 20  # weights per batch of rows, to bound the temporaries


def importance(name: str, hessians: dict, tensors: dict) -> np.ndarray | None:
    """The h that weights a matrix's errors: its input's second moment; for the head (and a tied embedding,
    which is the head) the final norm's output; None for an untied embedding, which is only looked up."""
    if name.startswith("blk."):
        return hessians.get(name.removesuffix(".weight"))
    if name == "output.weight" or (name == "token_embd.weight" and "output.weight" not in tensors):
        return hessians.get("output")
    return None


def _levels(x: np.ndarray, d: np.ndarray, lo: int, hi: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.clip(np.rint(np.where(d[:, None] != 0, x / d[:, None], 0)), lo, hi)


def _fit(x: np.ndarray, qw: np.ndarray, lvl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares scale of fixed levels, and the error it removes (sum q x L)^2 / sum q L^2."""
    slx = (qw * x * lvl).sum(1)
    sll = (qw * lvl * lvl).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(sll > 0, slx / sll, 0.0)
    return d, d * slx


def _search_blocks(x: np.ndarray, qw: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 scales, int levels) of blocks x [n, 32] under weights qw."""
    n = -lo
    peak = x[np.arange(len(x)), np.abs(x).argmax(1)]
    best_d = np.zeros(len(x))
    best_gain = np.full(len(x), -np.inf)
    nonzero = peak != 0
    safe = np.where(nonzero, peak, 1.0)
    for step in range(-9, 10):  # the scales llama.cpp's make_qx_quants tries
        lvl = np.clip(np.rint(x * (-(n + 0.1 * step) / safe)[:, None]), lo, hi)
        d, gain = _fit(x, qw, lvl)
        better = gain > best_gain
        best_d = np.where(better, d, best_d)
        best_gain = np.where(better, gain, best_gain)
    d16 = np.where(nonzero, best_d, 0).astype(np.float16)
    lvl = _levels(x, d16.astype(np.float64), lo, hi)
    err = (qw * (x - d16.astype(np.float64)[:, None] * lvl) ** 2).sum(1)
    for _ in range(2):  # refit the scale to the rounded levels, round again; keep what lowers the error
        d, _gain = _fit(x, qw, lvl)
        d16_new = d.astype(np.float16)
        lvl_new = _levels(x, d16_new.astype(np.float64), lo, hi)
        err_new = (qw * (x - d16_new.astype(np.float64)[:, None] * lvl_new) ** 2).sum(1)
        better = err_new < err
        d16 = np.where(better, d16_new, d16)
        lvl = np.where(better[:, None], lvl_new, lvl)
        err = np.where(better, err_new, err)
    return d16, lvl.astype(np.int16)


def _pack(qt: QT, d16: np.ndarray, lvl: np.ndarray) -> np.ndarray:
    """ggml blocks: fp16 d, then Q8_0 int8 levels; Q4_0 nibbles (j | j+16 << 4) of L+8; Q5_0 the fifth bits
    of L+16 in a little-endian uint32 and their low nibbles like Q4_0."""
    head = d16.astype("<f2").view(np.uint8).reshape(-1, 2)
    if qt == QT.Q8_0:
        return np.concatenate([head, lvl.astype(np.int8).view(np.uint8)], axis=1)
    u = (lvl - LEVELS[qt][0]).astype(np.uint32)
    nibbles = ((u[:, :16] & 15) | ((u[:, 16:] & 15) << 4)).astype(np.uint8)
    if qt == QT.Q4_0:
        return np.concatenate([head, nibbles], axis=1)
    qh = ((u >> 4) << np.arange(BLOCK, dtype=np.uint32)).sum(1, dtype=np.uint32)
    return np.concatenate([head, qh.astype("<u4").view(np.uint8).reshape(-1, 4), nibbles], axis=1)


_GGML = None


def _ggml():
    """libggml-base of the installed (patched) llama-cpp-python, with ggml_quantize_chunk's signature."""
    global _GGML
    if _GGML is None:
        import ctypes
        import importlib.util
        from pathlib import Path
        spec = importlib.util.find_spec("llama_cpp")
        libs = [Path(d) / "lib" / "libggml-base.so" for d in (spec.submodule_search_locations or [])] if spec else []
        found = [p for p in libs if p.exists()]
        if not found:
            raise RuntimeError("K-quants need llama.cpp's quantizer: libggml-base.so of llama-cpp-python was not "
                               "found (run scripts/setup.sh)")
        lib = ctypes.CDLL(str(found[0]))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        _GGML = lib
    return _GGML


def _quantize_ggml(w: np.ndarray, qt: QT, h: np.ndarray | None) -> np.ndarray:
    """w as qt by ggml_quantize_chunk (llama-quantize's code path), h as the importance matrix."""
    from gguf.constants import GGML_QUANT_SIZES
    block, size = GGML_QUANT_SIZES[qt]
    if w.ndim != 2 or w.shape[1] % block:
        raise ValueError(f"{qt.name} needs a matrix whose width is a multiple of {block}, not {w.shape}")
    rows, cols = w.shape
    w = np.ascontiguousarray(w, dtype=np.float32)
    imatrix = None
    if h is not None:
        imatrix = np.ascontiguousarray(np.maximum(np.asarray(h, dtype=np.float64), 0), dtype=np.float32)
        if imatrix.shape != (cols,):
            raise ValueError(f"importance of length {imatrix.shape} for a matrix of width {cols}")
    out = np.empty((rows, cols // block * size), dtype=np.uint8)
    n = _ggml().ggml_quantize_chunk(int(qt), w.ctypes.data, out.ctypes.data, 0, rows, cols,
                                    None if imatrix is None else imatrix.ctypes.data)
    if n != out.size:
        raise RuntimeError(f"ggml_quantize_chunk wrote {n} bytes of {qt.name}, expected {out.size}")
    return out


def quantize_standard(w: np.ndarray, qt: QT, h: np.ndarray | None = None) -> np.ndarray:
    """Entry point: w [rows, cols] as ggml type qt (raw bytes [rows, row size], as gguf-py's quantize
    returns them); Q4_0/Q5_0/Q8_0 by the weighted search above (h None: equal column weights), the K-quants by
    llama.cpp, any other type by gguf-py."""
    from gguf.quants import quantize
    w = np.asarray(w, dtype=np.float32)
    if qt in KQUANTS:
        return _quantize_ggml(w, qt, h)
    if qt not in LEVELS:
        return quantize(w, qt)
    if w.ndim != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"{qt.name} needs a matrix whose width is a multiple of {BLOCK}, not {w.shape}")
    rows, cols = w.shape
    lo, hi = LEVELS[qt]
    hw = np.ones(cols) if h is None else np.maximum(np.asarray(h, dtype=np.float64), 0)
    if hw.shape != (cols,):
        raise ValueError(f"importance of length {hw.shape} for a matrix of width {cols}")
    out = []
    step = max(1, CHUNK // cols)
    for r in range(0, rows, step):
        x = w[r:r + step].astype(np.float64)
        sigma2 = (x * x).mean(1, keepdims=True)
        qw = (hw[None, :] * np.sqrt(sigma2 + x * x)).reshape(-1, BLOCK)
        d16, lvl = _search_blocks(x.reshape(-1, BLOCK), qw, lo, hi)
        out.append(_pack(qt, d16, lvl).reshape(len(x), -1))
    return np.concatenate(out, axis=0)


def roundtrip(w: np.ndarray, qt: QT, h: np.ndarray | None = None) -> np.ndarray:
    """w stored as qt and read back the way llama.cpp reads it (gguf-py's dequantize)."""
    from gguf.quants import dequantize
    return dequantize(quantize_standard(w, qt, h), qt).reshape(np.shape(w))
