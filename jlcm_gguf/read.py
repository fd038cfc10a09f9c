"""Reading JLCM GGUF files in Python: every JLCM weight with its companions, checked as the patched
loader checks them (docs/FORMAT.md), dequantized by the reference in pack.py.

Anything wrong with a file, however it was damaged, raises JLCMFormatError with one message; no other
exception escapes (tests/test_read_fuzz.py feeds it mutated files).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .format import BLOCK_BYTES, DEFAULT_CODEBOOKS, FORMAT_VERSION, KEY_FORMAT_VERSION, QK, SUFFIX_BOUNDS, SUFFIX_CB, \
    SUFFIX_PERM, TYPE_IDS

BITS_OF_TYPE = {v: k for k, v in TYPE_IDS.items()}


class JLCMFormatError(ValueError):
    pass


@dataclass
class JLCMWeight:
    name: str
    bits: int
    packed: np.ndarray          # uint8 [n_expert, rows, row_bytes], stored row order
    cols: int
    codebooks: np.ndarray       # int8 [n_expert, n_groups, 2^bits]
    bounds: np.ndarray          # int32 [n_expert, n_groups]
    perm: np.ndarray | None     # int32 [n_expert, 2, rows]: stored -> original, original -> stored

    def dequantize(self, expert: int = 0) -> np.ndarray:
        """float32 [rows, cols] in the original row order."""
        from .pack import dequantize
        perm = None if self.perm is None else self.perm[expert]
        return dequantize(self.packed[expert], self.bits, self.cols, self.codebooks[expert], self.bounds[expert], perm)


def _fail(msg: str):
    raise JLCMFormatError(msg)


def _array(t, dtype, shape: tuple) -> np.ndarray:
    """A companion's data as dtype with the given numpy shape, or one error naming it."""
    if np.dtype(t.data.dtype) != np.dtype(dtype):
        _fail(f"{t.name} must be {np.dtype(dtype).name}, not {t.tensor_type.name}")
    data = np.asarray(t.data)
    if data.size != int(np.prod(shape)):
        _fail(f"{t.name} has {data.size} values, expected shape {shape}")
    return data.reshape(shape)


def _weight(t, companions: dict) -> JLCMWeight:
    bits = BITS_OF_TYPE[int(t.tensor_type)]
    shape = [int(x) for x in t.shape] + [1] * (4 - len(t.shape))  # ggml order: ne0 (cols), ne1 (rows), ne2
    cols, rows, n_exp, ne3 = shape[:4]
    if ne3 != 1 or cols % QK or rows < 1 or cols < 1:
        _fail(f"{t.name}: shape {shape} is not a JLCM weight ([k*{QK}, rows, experts])")
    row_bytes = cols // QK * BLOCK_BYTES[bits]
    packed = np.asarray(t.data)
    if packed.size != n_exp * rows * row_bytes:
        _fail(f"{t.name}: {packed.size} bytes of data for shape {shape}")
    packed = packed.reshape(n_exp, rows, row_bytes)
    cb, bounds, perm = (companions.get(f"{t.name}.{s}") for s in (SUFFIX_CB, SUFFIX_BOUNDS, SUFFIX_PERM))
    if (cb is None) != (bounds is None):
        _fail(f"{t.name}: codebook and group bounds must both be present")
    if cb is None:
        codebooks = np.broadcast_to(DEFAULT_CODEBOOKS[bits], (n_exp, 1, 1 << bits))
        group_bounds = np.full((n_exp, 1), rows, dtype=np.int32)
    else:
        n_groups = int(np.asarray(bounds.shape)[0]) if len(bounds.shape) else 0
        if not 1 <= n_groups <= rows:
            _fail(f"{bounds.name}: {n_groups} groups for {rows} rows")
        codebooks = _array(cb, np.int8, (n_exp, n_groups, 1 << bits))
        group_bounds = _array(bounds, np.int32, (n_exp, n_groups))
        for e in range(n_exp):
            b = group_bounds[e].astype(np.int64)
            if np.any(np.diff(np.concatenate([[0], b])) <= 0) or b[-1] != rows:
                _fail(f"{bounds.name}: group bounds must increase and end at the row count {rows}")
    perms = None
    if perm is not None:
        perms = _array(perm, np.int32, (n_exp, 2, rows))
        for e in range(n_exp):
            fwd, inv = perms[e].astype(np.int64)
            if np.any(fwd < 0) or np.any(fwd >= rows) or not np.array_equal(inv[fwd], np.arange(rows)):
                _fail(f"{perm.name}: not a permutation with its inverse")
    return JLCMWeight(t.name, bits, packed, cols, np.asarray(codebooks), group_bounds, perms)


def read_jlcm(path: Path) -> dict[str, JLCMWeight]:
    """The JLCM weights of a GGUF file, checked; JLCMFormatError for anything wrong."""
    from gguf import GGUFReader
    try:
        reader = GGUFReader(str(path))
        tensors = list(reader.tensors)
        field = reader.fields.get(KEY_FORMAT_VERSION)
        version = field.contents() if field is not None else None
    except JLCMFormatError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, OSError,
            MemoryError, AssertionError) as e:  # gguf-py's ways of meeting a damaged file
        raise JLCMFormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    if version is not None and (not isinstance(version, int) or version > FORMAT_VERSION):
        _fail(f"{path}: unsupported JLCM format: {KEY_FORMAT_VERSION} must be an integer <= {FORMAT_VERSION}")
    by_name = {t.name: t for t in tensors}
    weights = {}
    for t in tensors:
        if int(t.tensor_type) in BITS_OF_TYPE:
            weights[t.name] = _weight(t, by_name)
    for name in by_name:
        base, _, suffix = name.rpartition(".")
        if suffix in (SUFFIX_CB, SUFFIX_BOUNDS, SUFFIX_PERM) and base not in weights:
            _fail(f"{name} belongs to no JLCM weight")
    return weights
