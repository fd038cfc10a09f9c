"""The llama.cpp types the converter writes beside JLCM (standard.py): ggml's byte layout, read back by
gguf-py's dequantizer, and an importance-weighted error below gguf-py's reference quantizer's."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from jlcm_gguf.standard import LEVELS, importance, quantize_standard

TYPES = [QT.Q4_0, QT.Q5_0, QT.Q8_0]


@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_exact_grid_values_come_back_exactly(qt):
    """Weights that are d * L with every level of the type (the block's extreme level once, so the search
    can find d): the bytes decode to them exactly, which checks the scale, the nibbles and Q5_0's fifth bits
    at every position."""
    lo, hi = LEVELS[qt]
    rng = np.random.default_rng(1)
    rows, cols = 24, 64
    lvl = rng.integers(lo, hi + 1, size=(rows, cols))
    lvl[:, ::32] = lo  # each block's largest magnitude sits at its lowest level, as ggml's blocks have it
    d = rng.uniform(1e-3, 2e-2, size=(rows, cols // 32)).astype(np.float16).astype(np.float64)
    w = (np.repeat(d, 32, axis=1) * lvl).astype(np.float32)
    data = quantize_standard(w, qt)
    assert data.shape == quantize(w, qt).shape and data.dtype == np.uint8
    np.testing.assert_array_equal(dequantize(data, qt).reshape(w.shape), w)


@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_weighted_error_is_below_the_reference_quantizer(qt):
    rng = np.random.default_rng(2)
    w = (rng.standard_t(4, size=(256, 576)) * 0.02).astype(np.float32)
    w[:, 7] = 0  # a zero column and a zero block are handled
    w[3, 64:96] = 0
    h = rng.gamma(0.5, 1.0, size=576)

    def err(data):
        q = dequantize(data, qt).reshape(w.shape)
        return float((((w - q).astype(np.float64) ** 2).sum(0) * h).sum())

    mine, ref = err(quantize_standard(w, qt, h)), err(quantize(w, qt))
    assert mine < 0.9 * ref, (mine, ref)
    # weighting by h matters: the same search with equal column weights does worse on this error
    assert mine < err(quantize_standard(w, qt))
    assert not np.isnan(dequantize(quantize_standard(w, qt, h), qt)).any()


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_standard(np.zeros((4, 40), np.float32), QT.Q5_0)
    with pytest.raises(ValueError, match="importance"):
        quantize_standard(np.zeros((4, 64), np.float32), QT.Q5_0, np.ones(32))


def test_importance_of_each_role():
    hess = {"blk.1.attn_q": np.ones(3), "output": np.full(3, 2.0)}
    tied = {"token_embd.weight": None}
    assert importance("blk.1.attn_q.weight", hess, tied) is hess["blk.1.attn_q"]
    assert importance("token_embd.weight", hess, tied) is hess["output"]  # the tied embedding is the head
    untied = {"token_embd.weight": None, "output.weight": None}
    assert importance("token_embd.weight", hess, untied) is None  # only looked up
    assert importance("output.weight", hess, untied) is hess["output"]


KQUANTS = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]


def test_kquants_by_llama_cpp_read_back_and_use_the_importance():
    """--kquants plans store matrices in Q2_K ... Q6_K by llama.cpp's own quantizer (ggml_quantize_chunk in the
    installed llama-cpp-python): ggml's row size, read back by gguf-py, less error with each wider type, and
    the importance matrix lowers the error it weights."""
    from gguf.constants import GGML_QUANT_SIZES
    rng = np.random.default_rng(3)
    w = (rng.standard_t(4, size=(64, 512)) * 0.02).astype(np.float32)
    h = rng.gamma(0.3, 1.0, size=512)

    def err(data, qt):
        q = dequantize(data, qt).reshape(w.shape)
        return float((((w - q).astype(np.float64) ** 2).sum(0) * h).sum())

    errors = []
    for qt in KQUANTS:
        data = quantize_standard(w, qt, h)
        block, size = GGML_QUANT_SIZES[qt]
        assert data.shape == (64, 512 // block * size) and data.dtype == np.uint8
        errors.append(err(data, qt))
        assert errors[-1] < err(quantize_standard(w, qt), qt), qt.name  # the importance matters
    assert all(b < 0.7 * a for a, b in zip(errors, errors[1:])), errors
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_standard(np.zeros((4, 576), np.float32), QT.Q4_K)
