"""The C kernels (patched ggml CPU backend) against the Python reference in jlcm_gguf.pack.

GET_ROWS must give the reference dequantization bit for bit; MUL_MAT must agree with the reference
product of the same Q8_0-quantized activations within float rounding, and with the float product
within ggml's own dot-product tolerance. Each check runs in the native build (-march=native), in builds
pinned to AVX2 and to AVX-512 (VBMI, VNNI; run where the CPU has them, skipped with the reason where it
does not) and on aarch64 under qemu-user, with and without the dotprod extension (the NEON kernels);
scripts/cross_kernels.py builds the pinned variants.
"""
from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from jlcm_gguf.format import DEFAULT_CODEBOOKS, QK
from jlcm_gguf.pack import dequantize, matmul_q8_reference, pack_blocks, unpack_blocks
from jlcm_gguf.write import add_jlcm_tensor, write_raw_gguf

from conftest import ROOT, run, tool

sys.path.insert(0, str(ROOT / "scripts"))
import cross_kernels  # noqa: E402

RUNNERS = ["native", *cross_kernels.VARIANTS]


@functools.cache
def cross_build(variant: str):
    return cross_kernels.build(variant)


def binary(name: str, runner: str) -> list:
    """The command running one of the kernel test binaries built for runner."""
    if runner == "native":
        return [tool(name)]
    why = cross_kernels.runnable(runner)
    if why:
        pytest.skip(why)
    return cross_kernels.runner(runner) + [cross_build(runner) / name]


def random_weight(rng, bits, rows, cols, groups, permuted):
    idx = rng.integers(0, 1 << bits, size=(rows, cols), dtype=np.uint8)
    d = (rng.standard_normal((rows, cols // QK)) * 0.01).astype(np.float16)
    if groups:
        cb = rng.integers(-128, 128, size=(groups, 1 << bits), dtype=np.int16).astype(np.int8)
        cuts = np.sort(rng.choice(np.arange(1, rows), size=groups - 1, replace=False))
        bounds = np.append(cuts, rows).astype(np.int32)
    else:
        cb, bounds = None, None
    perm = rng.permutation(rows).astype(np.int32) if permuted else None
    return pack_blocks(idx, d, bits), cb, bounds, perm


def write_case(path, bits, packed, cb, bounds, perm, x):
    w = GGUFWriter(str(path), "jlcm-test")
    add_jlcm_tensor(w, "w", packed, bits, cb, bounds, perm)
    w.add_tensor("x", x.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run_check(path, out, threads=1, runner="native"):
    return run(binary("jlcm-kernel-check", runner) + [path, out, threads])


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_roundtrip(bits):
    rng = np.random.default_rng(bits)
    idx = rng.integers(0, 1 << bits, size=(7, 192), dtype=np.uint8)
    d = rng.standard_normal((7, 3)).astype(np.float16)
    got_idx, got_d = unpack_blocks(pack_blocks(idx, d, bits), bits, 192)
    assert np.array_equal(got_idx, idx)
    assert np.array_equal(got_d.view(np.uint16), d.view(np.uint16))


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("bits", [2, 3, 4])
# n: activation columns; the tile kernels take up to 4 columns per looked-up row and tiles of 16, so the
# counts cover 1..4 columns per call, several tiles and tiles split between threads; from 8 columns x86
# takes the batched path (jlcm.c: the AVX-512 VNNI kernel, or Q8_0 rows for llamafile's GEMM on AVX2), in
# chunks of 16 rows here (the last one partial)
@pytest.mark.parametrize("groups,permuted,n", [(0, False, 23), (1, False, 1), (5, False, 6), (5, True, 19), (37, True, 3),
                                               (37, True, 8)])
@pytest.mark.parametrize("threads", [1, 3])
def test_kernels_match_reference(tmp, bits, groups, permuted, n, threads, runner):
    rng = np.random.default_rng(100 * bits + 10 * groups + permuted)
    rows, cols = 37, 576
    packed, cb, bounds, perm = random_weight(rng, bits, rows, cols, groups, permuted)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    write_case(tmp / "case.gguf", bits, packed, cb, bounds, perm, x)

    res = run_check(tmp / "case.gguf", tmp / "out.f32", threads, runner)
    assert res.returncode == 0, res.stderr
    out = np.fromfile(tmp / "out.f32", dtype=np.float32)
    got_rows = out[:rows * cols].reshape(rows, cols)
    got_mm = out[rows * cols:].reshape(n, rows)

    ref_w = dequantize(packed, bits, cols, cb if cb is not None else DEFAULT_CODEBOOKS[bits], bounds, None if perm is None else np.stack([perm, perm]))
    # bit-exact dequantization (GET_ROWS)
    assert np.array_equal(got_rows.view(np.uint32), ref_w.view(np.uint32))

    # the same product with activations quantized to Q8_0 as ggml does; SIMD quantizers may round a
    # value at a .5 boundary the other way, so allow a few such flips (each one step of d_x * |w|)
    ref_q8 = matmul_q8_reference(ref_w, x)
    step = (np.abs(x).max(axis=1, keepdims=True) / 127) * np.abs(ref_w).max(axis=1)[None, :]
    assert np.all(np.abs(got_mm - ref_q8) <= 1e-4 * np.abs(ref_q8) + 3 * step + 1e-6)

    # against the float product: ggml's MAX_DOT_PRODUCT_ERROR (0.02) per normalised dot
    ref_f = x.astype(np.float64) @ ref_w.astype(np.float64).T
    err = np.abs(got_mm - ref_f).max() / (np.abs(ref_w).sum(axis=1).max() * np.abs(x).max() / cols)
    assert err < 0.02 * cols / QK


def write_raw(path, tensors):
    """A file with exactly these tensors, bypassing the writer's checks (hostile input)."""
    write_raw_gguf(path, {n: (a, GGMLQuantizationType.JLCM2) if n == "w" else a for n, a in tensors.items()}, "jlcm-test")


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("fault,message", [
    ("bounds_not_increasing", "not increasing"),
    ("perm_not_bijection", "not a permutation"),
    ("codebook_too_small", "codebook"),
])
def test_kernels_refuse_bad_companions(tmp, fault, message, runner):
    rng = np.random.default_rng(7)
    rows, cols = 37, 128
    packed, cb, bounds, perm = random_weight(rng, 2, rows, cols, 4, True)
    tensors = {"w": packed, "w.jlcm_cb": cb, "w.jlcm_bounds": bounds,
               "x": rng.standard_normal((2, cols)).astype(np.float32)}
    if fault == "bounds_not_increasing":
        tensors["w.jlcm_bounds"] = bounds.copy()
        tensors["w.jlcm_bounds"][1] = bounds[0]
    elif fault == "perm_not_bijection":
        bad = np.stack([perm, perm])  # plane 1 is not the inverse, and plane 0 repeats a row
        bad[0, 0] = bad[0, 1]
        tensors["w.jlcm_perm"] = bad.astype(np.int32)
    else:
        tensors["w.jlcm_cb"] = cb[:, :2].copy()  # 2 entries for a 2-bit type
    write_raw(tmp / "bad.gguf", tensors)
    res = run_check(tmp / "bad.gguf", tmp / "o.f32", 1, runner)
    assert res.returncode == 2 and message in res.stderr, res.stderr


# llama.cpp's test-quantize-fns checks every type's vec_dot against its reference; under qemu-user it takes about
# 3 minutes per aarch64 build, nearly all of it on upstream's types. The JLCM NEON kernels are checked bit for bit
# against the Python reference in both aarch64 builds above (test_kernels_match_reference and the refusals).
@pytest.mark.parametrize("runner", [r for r in RUNNERS if not r.startswith("aarch64")])
def test_test_quantize_fns_passes(runner):
    res = run(binary("test-quantize-fns", runner) + ["-v"])
    assert res.returncode == 0, res.stdout[-3000:]
    for name in ("jlcm2", "jlcm3", "jlcm4"):
        assert f"Testing {name}" in res.stdout
