"""Optional rotation (--rotate): an orthogonal change of basis of the residual stream folded into the weights.

With x' = x Q for an orthogonal Q, RMSNorm without a gain commutes with Q (it only divides by the norm), so
the network computes the same function when
- each RMSNorm gain is first folded into the matrices that read its output (columns of q/k/v, gate/up and
  the head), the gain becoming 1;
- the embedding and every matrix reading the stream take W Q (columns rotated), and the two matrices
  writing to it (attn_output, ffn_down, and a bias of theirs) take Q^T W.
llama.cpp's graph is unchanged. Rotated weights have fewer outlier columns, which a scalar codebook with one
scale per 64 weights represents better (QuaRot, SpinQuant). Q is a randomized Hadamard transform:
diag(random signs) (H_{2^k} / 2^{k/2} kron R_m), where n = 2^k m and R_m is a random orthogonal matrix for
the odd part (SmolLM2's 576 = 64 * 9; Llama-2-7B's 4096 is a pure Hadamard). Tied embeddings are untied:
the head takes the final norm's gain, the lookup table does not.
"""
from __future__ import annotations

import numpy as np

from .model import Hparams

READERS = ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")
WRITERS = ("attn_output", "ffn_down")


def hadamard(k: int) -> np.ndarray:
    h = np.ones((1, 1))
    for _ in range(k):
        h = np.block([[h, h], [h, -h]])
    return h


def rotation(n: int, seed: int) -> np.ndarray:
    """A random orthogonal n x n matrix with a Hadamard structure (float64)."""
    rng = np.random.default_rng(seed)
    k = (n & -n).bit_length() - 1  # largest power of two dividing n
    m = n >> k
    g = rng.standard_normal((m, m))
    r, upper = np.linalg.qr(g)
    r = r * np.sign(np.diag(upper))
    q = np.kron(hadamard(k) / np.sqrt(1 << k), r)
    return q * rng.choice([-1.0, 1.0], size=n)[:, None]


def rotate(tensors: dict, order: list[str], hp: Hparams, seed: int) -> tuple[dict, list[str]]:
    """Entry point. Returns new tensors (float32) and tensor order; the inputs are not modified."""
    t = dict(tensors)
    order = list(order)
    q = rotation(hp.n_embd, seed)
    f64 = lambda name: np.asarray(t[name], dtype=np.float64)  # noqa: E731

    def fold_gain(norm: str, readers: list[str]) -> None:
        g = f64(norm)
        for name in readers:
            t[name] = f64(name) * g[None, :]
        t[norm] = np.ones_like(t[norm])

    if "output.weight" not in t:  # tied: the head gets its own copy
        t["output.weight"] = t["token_embd.weight"]
        order.insert(order.index("output_norm.weight") + 1 if "output_norm.weight" in order else len(order),
                     "output.weight")
    for bid in range(hp.n_layer):
        p = f"blk.{bid}."
        fold_gain(p + "attn_norm.weight", [p + n + ".weight" for n in READERS[:3]])
        fold_gain(p + "ffn_norm.weight", [p + n + ".weight" for n in READERS[3:]])
        for n in READERS:
            t[p + n + ".weight"] = f64(p + n + ".weight") @ q
        for n in WRITERS:
            t[p + n + ".weight"] = q.T @ f64(p + n + ".weight")
            if p + n + ".bias" in t:
                t[p + n + ".bias"] = f64(p + n + ".bias") @ q
    fold_gain("output_norm.weight", ["output.weight"])
    t["output.weight"] = f64("output.weight") @ q
    t["token_embd.weight"] = f64("token_embd.weight") @ q
    changed = {n for n in t if n not in tensors or t[n] is not tensors[n]}
    for n in changed:
        t[n] = np.ascontiguousarray(t[n], dtype=np.float32)
    return t, order
