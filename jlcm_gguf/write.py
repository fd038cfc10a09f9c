"""Write step: JLCM weights and their companion tensors into a gguf-py GGUFWriter (docs/FORMAT.md)."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from .format import BLOCK_BYTES, SUFFIX_BOUNDS, SUFFIX_CB, SUFFIX_PERM, TYPE_IDS


def add_jlcm_tensor(writer: GGUFWriter, name: str, packed: np.ndarray, bits: int,
                    codebooks: np.ndarray | None, bounds: np.ndarray | None,
                    perm: np.ndarray | None = None) -> None:
    """Add one dense JLCM weight.

    packed: uint8 [rows, row_bytes] (stored row order); codebooks: int8 [n_groups, 2^bits];
    bounds: exclusive end row of each group; perm: stored row -> original row, or None.
    Without codebooks and bounds the type's default codebook applies.
    """
    rows, nbytes = packed.shape
    if nbytes % BLOCK_BYTES[bits]:
        raise ValueError(f"{name}: {nbytes} bytes per row is not a whole number of JLCM{bits} blocks")
    qtype = GGMLQuantizationType(TYPE_IDS[bits])
    # gguf-py takes the byte shape of quantized data and derives the element shape
    writer.add_tensor(name, np.ascontiguousarray(packed, dtype=np.uint8), raw_dtype=qtype)
    if (codebooks is None) != (bounds is None):
        raise ValueError(f"{name}: codebooks and bounds come together")
    if codebooks is not None:
        cb = np.ascontiguousarray(codebooks, dtype=np.int8).reshape(-1, 1 << bits)
        b = np.ascontiguousarray(bounds, dtype=np.int32).reshape(-1)
        if len(b) != cb.shape[0] or b[-1] != rows or np.any(np.diff(b) <= 0) or b[0] <= 0:
            raise ValueError(f"{name}: bad group bounds for {rows} rows and {cb.shape[0]} groups")
        writer.add_tensor(f"{name}.{SUFFIX_CB}", cb)
        writer.add_tensor(f"{name}.{SUFFIX_BOUNDS}", b)
    if perm is not None:
        fwd = np.asarray(perm, dtype=np.int32).reshape(-1)
        if len(fwd) != rows or not np.array_equal(np.sort(fwd), np.arange(rows)):
            raise ValueError(f"{name}: the permutation is not one of {rows} rows")
        inv = np.empty_like(fwd)
        inv[fwd] = np.arange(rows, dtype=np.int32)
        writer.add_tensor(f"{name}.{SUFFIX_PERM}", np.stack([fwd, inv]))
