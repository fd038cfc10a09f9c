"""GPTQ rounding onto JLCM codebooks (jlcm_gguf/gptq.py) and the full input Hessians it uses."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from jlcm_gguf import model as M
from jlcm_gguf.gptq import assign_gptq, inverse_cholesky
from jlcm_gguf.group import group_rows, row_profiles
from jlcm_gguf.init import init_codebooks
from jlcm_gguf.pack import GPTQ_SCALE_STARTS, assign, lookup


def correlated_inputs(rng, n: int, cols: int, mixing: np.ndarray) -> np.ndarray:
    """Inputs with strongly correlated columns and a few loud ones, like a transformer's activations."""
    x = rng.standard_normal((n, cols)) @ mixing
    x[:, :4] *= 8
    return x


def output_error(w, q, x) -> float:
    return float(np.sum(((w - q) @ x.T) ** 2) / np.sum((w @ x.T) ** 2))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_lowers_the_output_error_on_held_out_inputs(bits):
    rng = np.random.default_rng(bits)
    rows, cols = 64, 256
    mixing = np.eye(cols) + 0.5 * rng.standard_normal((cols, cols)) / np.sqrt(cols)
    mixing[:, :64] += rng.standard_normal((cols, 1))  # a shared direction: off-diagonal Hessian mass
    x_fit, x_test = (correlated_inputs(rng, 4096, cols, mixing) for _ in range(2))
    H = x_fit.T @ x_fit / len(x_fit)
    h = np.diag(H).copy()
    w = rng.standard_t(5, size=(rows, cols)).astype(np.float32)
    order, bounds = group_rows(row_profiles(w, h), 4, 0)
    ws = w[order]
    cb = init_codebooks(ws, h, bounds, bits)

    near = lookup(*assign(ws, bits, cb, bounds, h), cb, bounds)
    idx, d = assign_gptq(ws, bits, cb, bounds, H)
    assert idx.dtype == np.uint8 and idx.shape == ws.shape and d.dtype == np.float16 and d.shape == (rows, cols // 64)
    assert idx.max() < 2 ** bits
    gq = lookup(idx, d, cb, bounds)
    e_near, e_gptq = output_error(ws, near, x_test), output_error(ws, gq, x_test)
    assert e_gptq < 0.8 * e_near, (e_gptq, e_near)


def test_gptq_with_a_diagonal_hessian_is_nearest_rounding():
    """No cross terms to compensate: the same scales and the same codewords as pack.assign from the same
    starting scales."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((24, 192)).astype(np.float32)
    h = rng.uniform(0.1, 3.0, 192)
    bounds = np.array([10, 24])
    cb = init_codebooks(w, h, bounds, 3)
    i_near, d_near = assign(w, 3, cb, bounds, h, starts=GPTQ_SCALE_STARTS)
    i_gptq, d_gptq = assign_gptq(w, 3, cb, bounds, np.diag(h))
    assert np.array_equal(d_near, d_gptq)
    assert np.array_equal(i_near, i_gptq)


def test_gptq_rejects_a_hessian_of_the_wrong_size():
    w = np.zeros((4, 128), dtype=np.float32)
    with pytest.raises(ValueError, match="shape mismatch"):
        assign_gptq(w, 2, np.array([[-127, -40, 40, 127]], dtype=np.int8), None, np.eye(64))


def test_input_hessians_diagonal_and_sharing():
    obs = M.InputHessians()
    rng = np.random.default_rng(0)
    xs = [torch.as_tensor(rng.standard_normal((2, 5, 8)), dtype=torch.float32) for _ in range(3)]
    for x in xs:
        obs("q", x)
        obs("k", x)  # the same input: one shared matrix
        obs("down", 2 * x)
    full, diag = obs.matrices(30), obs.means(30)
    flat = torch.cat([x.reshape(-1, 8) for x in xs]).double().numpy()
    np.testing.assert_allclose(full["q"], flat.T @ flat / 30, rtol=1e-5)
    np.testing.assert_allclose(full["down"], 4 * flat.T @ flat / 30, rtol=1e-5)
    assert full["k"] is full["q"]
    for k in full:
        np.testing.assert_allclose(np.diag(full[k]), diag[k], rtol=1e-5)


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 40))
    H = x.T @ x / 50
    H[5, :] = H[:, 5] = 0  # a dead input
    U = inverse_cholesky(H, 0.1).numpy()
    Hd = H.copy()
    Hd[5, 5] = 1
    Hd += 0.1 * np.mean(np.diag(Hd)) * np.eye(40)
    assert np.allclose(np.triu(U), U) and np.all(np.diag(U) > 0)
    np.testing.assert_allclose(U.T @ U, np.linalg.inv(Hd), rtol=1e-9, atol=1e-12)


def test_gptq_result_does_not_depend_on_torch_threads():
    """The per-batch update of the remaining columns runs on all torch threads, the per-column loop on one: the
    indices and scales are the same whatever the thread count, and the caller's thread count is restored."""
    rng = np.random.default_rng(3)
    rows, cols = 512, 1024
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((2048, cols)).astype(np.float32)
    H = (x.T @ x / len(x)).astype(np.float64)
    cb = np.tile(np.array([-127, -40, 40, 127], dtype=np.int8), (4, 1))
    bounds = np.array([128, 256, 384, 512], dtype=np.int32)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(assign_gptq(w, 2, cb, bounds, H))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    (i1, d1), (i2, d2) = results
    assert np.array_equal(i1, i2) and np.array_equal(d1, d2)


def test_inverse_cholesky_holds_two_matrices_at_once():
    """The factor and the solve overwrite their inputs (LAPACK in place on column-major views): besides the caller's
    H, at most about two n x n float64 matrices are alive (the straightforward form held 7.5: 7 GB for a 7B's
    ffn_down). Measured in a fresh process by its resident high-water mark, reset before the call."""
    import subprocess
    import sys
    code = ("import numpy as np, re, sys\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "from jlcm_gguf.gptq import inverse_cholesky\n"
            "n = 2048\n"
            "x = np.random.default_rng(0).standard_normal((n + 8, n))\n"
            "H = x.T @ x / n\n"
            "del x\n"
            "inverse_cholesky(H[:64, :64], 0.1)  # torch's and LAPACK's own set-up, outside the measure\n"
            "def kb(key):\n"
            "    return int(re.search(key + r':\\s*(\\d+)', open('/proc/self/status').read()).group(1))\n"
            "base = kb('VmRSS')\n"
            "open('/proc/self/clear_refs', 'w').write('5')\n"
            "U = inverse_cholesky(H, 0.1)\n"
            "print((kb('VmHWM') - base) * 1024 / (n * n * 8))\n")
    res = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent.parent)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    extra = float(res.stdout.split()[-1])
    assert 1.0 <= extra < 2.6, f"{extra:.2f} matrices of 2048 x 2048 float64 above the caller's memory"
