"""The checkpoint's tensors, read when they are used (streaming): the converter holds one block's float weights,
not the model's.

The vendored llama.cpp converter, in its lazy mode, gives every tensor as a graph over the safetensors file
(renames, permutations, dtype conversions not yet computed). A `LazyArray` keeps that graph and its shape and
evaluates it whenever its values are needed, without keeping the result in the graph; a small cache
(`DecodedCache`, least recently used, a byte budget) keeps the last few decoded tensors, since a block reads its
weights once per calibration window. Code that only asks for `.shape`, `.size`, `.ndim`, `.dtype` or `.nbytes`
reads nothing; `np.asarray`, indexing and arithmetic decode it.

After a block is finished the converter needs its matrices' values no more (they are packed), except where
end-to-end tuning reads the float model again: the folded matrix is then replaced by `take`, a LazyArray that
re-reads the checkpoint and applies the fold's row and column orders.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict

import numpy as np

DEFAULT_CACHE_BYTES = 1 << 30  # decoded float weights kept (--cache-mb); a block of a 7B model takes 0.8 GB


class DecodedCache:
    """The most recently decoded tensors, up to `capacity` bytes (a tensor larger than that is not kept)."""

    def __init__(self, capacity: int = DEFAULT_CACHE_BYTES):
        self.capacity = capacity
        self.entries: OrderedDict[int, np.ndarray] = OrderedDict()
        self.bytes = 0

    def get(self, key: int):
        a = self.entries.get(key)
        if a is not None:
            self.entries.move_to_end(key)
        return a

    def put(self, key: int, a: np.ndarray) -> None:
        if a.nbytes > self.capacity:
            return
        self.drop(key)
        while self.entries and self.bytes + a.nbytes > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes
        self.entries[key] = a
        self.bytes += a.nbytes

    def drop(self, key: int) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes


def evaluate(node):
    """The value of a gguf lazy tensor graph, computed afresh: unlike LazyBase.to_eager, no node keeps its
    result (to_eager would leave every tensor of the model decoded in memory)."""
    from gguf.lazy import LazyBase
    if not isinstance(node, LazyBase):
        return node
    if node._data is not None:
        return node._data
    args = LazyBase._recurse_apply(node._args, evaluate)
    kwargs = {k: LazyBase._recurse_apply(v, evaluate) for k, v in (node._kwargs or {}).items()}
    return node._func(*args, **kwargs)


class LazyArray(np.lib.mixins.NDArrayOperatorsMixin):
    """A tensor read from disk when its values are used (see the module text): decode() -> the array computed by
    `load` (a float tensor of the model's checkpoint, or checkpoint.stored_array's packed weights)."""

    _keys = itertools.count()  # cache keys: unlike id(), never reused by a later object

    def __init__(self, load, shape: tuple, dtype, cache: DecodedCache | None):
        self._load = load
        self._key = next(LazyArray._keys)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.cache = cache

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def decode(self) -> np.ndarray:
        a = self.cache.get(self._key) if self.cache is not None else None
        if a is None:
            a = self._load()
            if self.cache is not None:
                self.cache.put(self._key, a)
        return a

    def release(self) -> None:
        """Forget the decoded values (they are read again if asked for)."""
        if self.cache is not None:
            self.cache.drop(self._key)

    def take(self, rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> "LazyArray":
        """This tensor with its columns, then its rows, reordered (a fold's result), decoded when used."""
        def load():
            a = self._load()
            if cols is not None:
                a = a[:, cols]
            return np.ascontiguousarray(a[rows] if rows is not None else a)
        return LazyArray(load, self.shape, self.dtype, self.cache)

    def __array__(self, dtype=None, copy=None):
        a = self.decode()
        if dtype is not None and np.dtype(dtype) != a.dtype:
            return a.astype(dtype)
        return a.copy() if copy else a

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = tuple(x.decode() if isinstance(x, LazyArray) else x for x in inputs)
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __getitem__(self, key):
        return self.decode()[key]

    def __len__(self) -> int:
        return self.shape[0]

    def __getattr__(self, name):  # .T, .astype, .reshape, ...: those of the decoded array
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.decode(), name)

    def __repr__(self) -> str:
        return f"LazyArray(shape={self.shape}, dtype={self.dtype})"


def as_float(a32: np.ndarray, half: bool) -> np.ndarray:
    """A tensor as the converter keeps it: float32, or with --fast (half) a matrix as float16 where its values fit."""
    if half and a32.ndim == 2 and np.all(np.abs(a32) < 60000):
        return a32.astype(np.float16)
    return a32


def lazy_tensor(node, half: bool, cache: DecodedCache) -> LazyArray:
    """A LazyArray of one tensor the vendored converter would write, as float32 (half: a matrix as float16
    where its values fit, --fast's memory saving kept as it was)."""
    shape = tuple(node.shape)

    def load() -> np.ndarray:  # a copy: no view of the file's memory map stays
        return as_float(np.array(evaluate(node), dtype=np.float32), half)
    # whether --fast's float16 applies is known once decoded: report float32, the type every step computes in
    return LazyArray(load, shape, np.float32, cache)


FIXED_MMAP_THRESHOLD_FROM = 1 << 30  # checkpoint bytes from which return_freed_memory fixes the threshold


def return_freed_memory(checkpoint_bytes: int) -> bool:
    """glibc raises its mmap threshold (to 32 MB) after a large block is freed, so the converter's arrays of a
    few MB then come from the heap, which fragments and does not shrink: converting a 64-layer model grew by
    about 5 MB per block that way. For a checkpoint of FIXED_MMAP_THRESHOLD_FROM bytes or more, a fixed threshold
    keeps every array over 1 MiB in its own mapping, returned to the system when freed. Not below: every such
    array is then fresh pages to fault in, which made a small model's conversion about a third slower (numpy's
    temporaries in quantization; end-to-end tuning). Returns whether it was fixed (elsewhere than glibc: never)."""
    if checkpoint_bytes < FIXED_MMAP_THRESHOLD_FROM:
        return False
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def release_all(tensors: dict, names) -> None:
    for n in names:
        v = tensors.get(n)
        if isinstance(v, LazyArray):
            v.release()
