"""The JLCM Metal kernels (ggml-metal/kernels/jlcm.metal) against the Python reference, without a Mac.

The .metal source is compiled as C++ against tests/metal/metal_emu.h, which erases Metal's address spaces,
maps half to IEEE binary16 and runs every GPU thread of a threadgroup as a real thread, so
threadgroup memory, threadgroup_barrier and simd_sum are exercised for real. Built with AddressSanitizer
and UBSan, each buffer an exact-size allocation. docs/METAL.md says what this verifies and what only a
Mac can.
"""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from jlcm_gguf.convert import llama_cpp_dir
from jlcm_gguf.format import DEFAULT_CODEBOOKS, QK
from jlcm_gguf.pack import dequantize

from conftest import ROOT, run
from test_kernels import random_weight

METAL_DIR = ROOT / "tests" / "metal"


def metal_source() -> str:
    """jlcm.metal with its [[attribute]] annotations dropped: C++ cannot parse [[threadgroup(0)]] once the
    address-space keyword inside it is erased; they only name argument slots, which the harness passes."""
    src = (llama_cpp_dir() / "ggml" / "src" / "ggml-metal" / "kernels" / "jlcm.metal").read_text()
    return re.sub(r"\s*\[\[[a-z_]+(\(\d+\))?\]\]", "", src)


@pytest.fixture(scope="module")
def metal_check(tmp_path_factory):
    if not shutil.which("g++"):
        pytest.fail("g++ is missing: run scripts/setup.sh")
    build = tmp_path_factory.mktemp("metal-emu")
    (build / "jlcm.metal").write_text(metal_source())
    ggml_src = llama_cpp_dir() / "ggml" / "src"
    res = run(["g++", "-std=c++20", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
               "-Wall", "-Werror", "-I", METAL_DIR / "stub", "-I", METAL_DIR, "-I", ggml_src,
               "-I", ggml_src / "ggml-metal", "-I", build, METAL_DIR / "jlcm_metal_check.cpp",
               "-o", build / "jlcm-metal-check", "-pthread"])
    assert res.returncode == 0, res.stderr[-4000:]
    return build / "jlcm-metal-check"


def run_case(exe, tmp, bits, packed, cb, bounds, perm, x, ids):
    rows, cols, n = packed.shape[0], x.shape[1], x.shape[0]
    packed.tofile(tmp / "w.bin")
    x.astype(np.float32).tofile(tmp / "x.bin")
    np.asarray(ids, dtype=np.int32).tofile(tmp / "ids.bin")
    if cb is not None:
        cb.astype(np.int8).tofile(tmp / "cb.bin")
        bounds.astype(np.int32).tofile(tmp / "bounds.bin")
    if perm is not None:
        np.asarray(perm, dtype=np.int32).tofile(tmp / "perm.bin")
    res = run([exe, tmp, bits, rows, cols, n, 0 if cb is None else len(bounds), int(perm is not None), len(ids)],
              env={"ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "halt_on_error=1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return {k: np.fromfile(tmp / f"{k}.f32", dtype=np.float32) for k in ("get_rows", "mul_mv", "mul_mm")}


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("groups,permuted,n", [(0, False, 1), (1, False, 7), (5, True, 19), (37, True, 3)])
def test_metal_kernels_match_reference(metal_check, tmp, bits, groups, permuted, n):
    rng = np.random.default_rng(1000 + 100 * bits + 10 * groups + permuted)
    rows, cols = 37, 576
    packed, cb, bounds, perm = random_weight(rng, bits, rows, cols, groups, permuted)
    perm2 = None if perm is None else np.stack([perm, np.argsort(perm)]).astype(np.int32)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    ids = rng.permutation(rows)
    out = run_case(metal_check, tmp, bits, packed, cb, bounds, perm2, x, ids)

    ref_w = dequantize(packed, bits, cols, cb if cb is not None else DEFAULT_CODEBOOKS[bits], bounds, perm2)
    # get_rows (the dequantization) is bit-exact: fp16 scale times int8 codeword, in float32
    assert np.array_equal(out["get_rows"].reshape(len(ids), cols).view(np.uint32), ref_w[ids].view(np.uint32))
    # float32 activations (no Q8_0 on the GPU): float32 summation order is the only difference
    ref = x.astype(np.float64) @ ref_w.astype(np.float64).T
    scale = np.abs(x).astype(np.float64) @ np.abs(ref_w).astype(np.float64).T
    for kernel in ("mul_mv", "mul_mm"):
        got = out[kernel].reshape(n, rows)
        assert np.all(np.abs(got - ref) <= 1e-5 * scale + 1e-6), kernel


def test_metal_kernels_hostile_companions_stay_in_bounds(metal_check, tmp):
    """Companions the loader would refuse (so only reachable when validation is skipped): no read or write
    outside a buffer (ASan), rows of a bad permutation or row id come out zero or are dropped."""
    rng = np.random.default_rng(7)
    rows, cols, bits = 37, 128, 3
    packed, cb, bounds, perm = random_weight(rng, bits, rows, cols, 5, True)
    bounds[:] = [40, 3, 3, -1, 1 << 30]                      # out of range and not increasing
    perm2 = np.stack([perm, np.argsort(perm)]).astype(np.int32)
    perm2[0, 0], perm2[1, 5] = 1 << 20, -3                   # stored row 0 goes nowhere; original row 5 has none
    x = rng.standard_normal((9, cols)).astype(np.float32)
    ids = np.array([5, -1, rows, 2], dtype=np.int32)         # two ids out of range
    out = run_case(metal_check, tmp, bits, packed, cb, bounds, perm2, x, ids)
    got_rows = out["get_rows"].reshape(len(ids), cols)
    assert not got_rows[:3].any() and got_rows[3].any()
    for kernel in ("mul_mv", "mul_mm"):
        assert np.all(np.isfinite(out[kernel]))


def test_metal_host_code_compiles():
    """The host side (ggml_metal_op_jlcm in ggml-metal-ops.cpp: arguments, companion buffers, grid) is plain
    C++ and must at least compile here; the Objective-C parts (ggml-metal-device.m) need a Mac."""
    metal = llama_cpp_dir() / "ggml" / "src" / "ggml-metal"
    res = run(["g++", "-std=c++17", "-fsyntax-only", "-I", metal, "-I", metal.parent,
               "-I", metal.parent.parent / "include", metal / "ggml-metal-ops.cpp"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ggml_metal_op_jlcm" in (metal / "ggml-metal-ops.cpp").read_text()
