"""The Python JLCM reader (jlcm_gguf/read.py over gguf-py) on damaged files: it reads a good file exactly
as written, and any mutation either still reads or raises JLCMFormatError with a message; no other
exception, crash or hang. Mutations come from hypothesis: byte overwrites, truncations, and targeted
changes to the companions' values."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jlcm_gguf.format import QK
from jlcm_gguf.pack import dequantize, pack_blocks
from jlcm_gguf.read import JLCMFormatError, read_jlcm

FUZZ = settings(max_examples=400, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _good_file(path: Path) -> tuple[bytes, dict]:
    from gguf import GGUFWriter
    from jlcm_gguf.write import add_jlcm_tensor
    rng = np.random.default_rng(3)
    rows, cols, bits = 10, 2 * QK, 3
    idx = rng.integers(0, 1 << bits, size=(rows, cols), dtype=np.uint8)
    d = (rng.standard_normal((rows, cols // QK)) * 0.01).astype(np.float16)
    cb = rng.integers(-127, 128, size=(3, 1 << bits)).astype(np.int8)
    bounds = np.array([3, 7, 10], dtype=np.int32)
    perm = rng.permutation(rows).astype(np.int32)
    packed = pack_blocks(idx, d, bits)
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("jlcm.format_version", 1)
    add_jlcm_tensor(w, "blk.0.attn_q.weight", packed, bits, cb, bounds, perm)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(cols, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = dequantize(packed, bits, cols, cb, bounds, np.stack([perm, np.argsort(perm).astype(np.int32)]))
    return path.read_bytes(), {"blk.0.attn_q.weight": ref}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return _good_file(tmp_path_factory.mktemp("read") / "good.gguf")


def _read(tmp_path: Path, data: bytes):
    p = tmp_path / "m.gguf"
    p.write_bytes(data)
    try:
        return read_jlcm(p)
    except JLCMFormatError as e:
        assert str(e), "an error without a message"
        return None


def test_reads_what_was_written(good, tmp_path):
    data, ref = good
    weights = _read(tmp_path, data)
    assert set(weights) == set(ref)
    w = weights["blk.0.attn_q.weight"]
    assert np.array_equal(w.dequantize().view(np.uint32), ref["blk.0.attn_q.weight"].view(np.uint32))


@pytest.mark.parametrize("fault,message", [
    ("bounds", "group bounds must increase"),
    ("perm", "not a permutation"),
    ("truncated", "not a readable GGUF file"),
])
def test_damaged_files_are_named(good, tmp_path, fault, message):
    """Each kind of damage gets its own message (so the property below is not vacuous)."""
    data, _ = good
    raw = bytearray(data)
    if fault == "truncated":
        raw = raw[:len(raw) - 100]
    else:
        # the companions are the last tensors: find their values by content
        if fault == "bounds":
            i = raw.rfind(np.array([3, 7, 10], dtype=np.int32).tobytes())
            raw[i:i + 4] = np.int32(8).tobytes()
        else:
            from gguf import GGUFReader
            t = next(t for t in GGUFReader(str(_write(tmp_path, data))).tensors if t.name.endswith("jlcm_perm"))
            off = int(t.data_offset)
            raw[off:off + 4] = raw[off + 4:off + 8]
    with pytest.raises(JLCMFormatError, match=message):
        read_jlcm(_write(tmp_path, bytes(raw)))


def _write(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "x.gguf"
    p.write_bytes(data)
    return p


@FUZZ
@given(st.data())
def test_mutated_files_read_or_fail_cleanly(good, tmp_path, data):
    raw = bytearray(good[0])
    for _ in range(data.draw(st.integers(1, 8), label="edits")):
        kind = data.draw(st.sampled_from(["byte", "word", "truncate", "tail"]), label="kind")
        pos = data.draw(st.integers(0, len(raw) - 1), label="pos")
        if kind == "byte":
            raw[pos] = data.draw(st.integers(0, 255))
        elif kind == "word":  # counts, lengths, offsets, dims and type ids are 32/64-bit fields
            val = data.draw(st.sampled_from([0, 1, 2, 63, 64, 200, 201, 202, 0x7FFFFFFF, 0xFFFFFFFF]))
            raw[pos:pos + 4] = val.to_bytes(4, "little")
        elif kind == "truncate":
            del raw[pos:]
        else:
            raw += bytes(data.draw(st.binary(max_size=64)))
        if not raw:
            raw = bytearray(b"G")
    _read(tmp_path, bytes(raw))
