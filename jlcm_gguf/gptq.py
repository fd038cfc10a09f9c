"""Hessian-aware rounding of a matrix onto its JLCM group codebooks (GPTQ, Frantar et al., ICLR 2023).

Nearest rounding (pack.assign) treats each weight's error alone, weighted by the diagonal h of the input
Hessian H = E[x xᵀ]. The output error of a row, (w - q) H (w - q)ᵀ, also has cross terms: the columns are
rounded left to right and each column's error is compensated on the columns not yet rounded, by the
optimal update  w[j+1:] -= (w_j - q_j) / Hinv[j, j] * Hinv[j, j+1:]  (Hinv the upper Cholesky factor of
H⁻¹). A 64-column block's scale is chosen when the block's first column is reached, from the block's
weights as the updates have left them (pack.assign's h-weighted least squares, from pack.GPTQ_SCALE_STARTS); its
weights then take the nearest codeword of w / d one column at a time.
"""
from __future__ import annotations

import numpy as np
import torch

from .format import QK
from . import distributed as D
from . import pack
from .pack import assign, group_of_rows


def inverse_cholesky(H: np.ndarray, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹ (float64), the GPTQ update's coefficients."""
    # with J the reversal and J H J = M Mᵀ, H⁻¹ = Uᵀ U for the upper triangular U = J M⁻¹ J: one Cholesky
    # and one triangular solve instead of forming H⁻¹ and factoring it again. LAPACK works in place on
    # column-major matrices, and J H J is symmetric: through its transposed view the factor overwrites it and
    # the solve overwrites the identity, so two n x n float64 matrices are alive, not seven (ffn_down's
    # Hessian of a 7B model is 11008 x 11008: 1 GB each)
    A = torch.tensor(np.asarray(H, dtype=np.float64))
    diag = torch.diagonal(A)
    diag[diag <= 0] = 1.0
    diag += damp * diag.mean()
    A = torch.from_numpy(np.ascontiguousarray(A.numpy()[::-1, ::-1]))  # J H J
    del diag  # (a view of the unflipped copy)
    M = torch.linalg.cholesky(A.mT, out=A.mT)
    eye = torch.eye(len(A), dtype=A.dtype).mT
    X = torch.linalg.solve_triangular(M, eye, upper=False, out=eye)
    del A, M
    return torch.from_numpy(np.ascontiguousarray(X.numpy()[::-1, ::-1]))  # one copy (torch's flip keeps X's layout)


def assign_gptq(w: np.ndarray, bits: int, cb: np.ndarray, bounds: np.ndarray | None, H: np.ndarray,
                damp: float = 0.1, batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Entry point. (idx uint8 [rows, cols], d float16 [rows, cols/64]) like pack.assign, for rows of w in
    stored order against int8 group codebooks, minimising the output error under the full input Hessian
    H [cols, cols] (columns in w's column order)."""
    rows, cols = w.shape
    if cols % QK or H.shape != (cols, cols):
        raise ValueError(f"shape mismatch: w {w.shape}, H {H.shape}")
    k = 1 << bits
    cb = np.asarray(cb, dtype=np.int8).reshape(-1, k)
    grp = group_of_rows(bounds, rows) if bounds is not None else np.zeros(rows, dtype=np.int64)
    order = np.argsort(cb, axis=1, kind="stable")               # sorted position -> codebook index
    srt = np.take_along_axis(cb, order, axis=1).astype(np.float32)
    dev = D.device()                                             # (the Cholesky factor is computed on the CPU)
    c = torch.as_tensor(srt[grp]).to(dev)                        # [rows, K] each row's sorted codewords
    mid = (c[:, 1:] + c[:, :-1]) / 2
    to_index = torch.as_tensor(order[grp].astype(np.int64)).to(dev)
    hdiag = np.diag(H).copy()
    Hinv = inverse_cholesky(H, damp).float().to(dev)
    W = torch.tensor(np.asarray(w, dtype=np.float32)).to(dev)
    W[:, torch.as_tensor(hdiag <= 0).to(dev)] = 0              # columns no input reaches
    pos = torch.empty((rows, cols), dtype=torch.long, device=dev)
    d = np.empty((rows, cols // QK), dtype=np.float16)
    step = max(QK, batch // QK * QK)                             # batches hold whole blocks
    threads = torch.get_num_threads()
    try:
        _round_columns(W, Hinv, c, mid, pos, d, hdiag, bits, cb, bounds, step, threads)
    finally:
        torch.set_num_threads(threads)
    idx = to_index.gather(1, pos).to(torch.uint8).cpu().numpy()
    return idx, d


def _round_columns(W, Hinv, c, mid, pos, d, hdiag, bits, cb, bounds, step, threads: int) -> None:
    """Columns in batches of `step`: inside a batch thousands of small ops, on one thread (more only add
    overhead); the batch's error then updates the remaining columns in one matrix product, on all threads."""
    rows, cols = W.shape
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        torch.set_num_threads(1)
        W1, E1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, device=W.device)
        for j in range(i2 - i1):
            col = i1 + j
            if col % QK == 0:
                blk = W1[:, j:j + QK].cpu().numpy()  # the block's scale: pack.assign, in numpy
                _, db = assign(blk, bits, cb, bounds, hdiag[col:col + QK], starts=pack.GPTQ_SCALE_STARTS)
                d[:, col // QK] = db[:, 0]
                scale = torch.as_tensor(db[:, 0].astype(np.float32)).to(W.device)
                div = torch.where(scale != 0, scale, torch.ones_like(scale))  # as pack.nearest_codeword divides
            x = W1[:, j]
            p = (x[:, None] / div[:, None] > mid).sum(1)         # nearest codeword; ties to the lower, as assign
            q = scale * c.gather(1, p[:, None])[:, 0]
            pos[:, col] = p
            e = (x - q) / Hinv[col, col]
            W1[:, j:] -= e[:, None] * Hinv[col, col:i2][None, :]
            E1[:, j] = e
        torch.set_num_threads(threads)
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
