#!/usr/bin/env python3
"""Which block layout would help JLCM on a model: each matrix's relative squared error under hypothetical
JLCM layouts next to llama.cpp's Q2_K and Q3_K, before writing any kernel for them.

Every layout keeps JLCM's 16 row groups, each with its own codebook of 2^b codewords (weighted k-means on
block-normalised values, as init.py), and rounds each weight to the nearest codeword:

  scale/B           one float16 scale per B weights, w = d·c[i]           b + 16/B bpw (B = 64: JLCM2/3/4 today)
  affine/B          a float16 scale and offset per B weights, w = d·c[i] + m   b + 32/B bpw
  affine-even/B     affine/B with evenly spaced codewords (no codebook: the K-quants' grid, float16 scales)

Scales and offsets are refitted by least squares against the assignment (a few rounds, the best kept), as
pack.assign does. The error is unweighted (no calibration activations): sum (w - q)^2 / sum w^2, so it
compares layouts, not the activation-weighted errors of docs/measurements/matrix-error-qwen.md. Q2_K (2.625 bpw) and
Q3_K (3.4375 bpw) are quantized by llama.cpp's own code (standard.roundtrip) with a uniform importance
matrix (its searched path, as `llama-quantize --imatrix` takes).

    .venv/bin/python experiments/block_layouts.py --model qwen2.5-coder-1.5b --blocks 3,14 --doc docs/measurements/block-layouts-qwen.md
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jlcm_gguf.group import group_rows, row_profiles  # noqa: E402
from jlcm_gguf.init import weighted_kmeans_1d  # noqa: E402
from jlcm_gguf.reference_models import MODELS  # noqa: E402

HF_MATRICES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
LAYOUTS = [("scale", 64), ("scale", 32), ("scale", 16), ("affine", 64), ("affine", 32), ("affine", 16),
           ("affine-even", 16)]
SAMPLES = 1 << 15
REFITS = 4


def f16(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -65504, 65504).astype(np.float16).astype(np.float64)


def nearest(t: np.ndarray, c: np.ndarray) -> np.ndarray:
    pos = np.zeros(t.shape, dtype=np.intp)
    for m in (c[1:] + c[:-1]) / 2:
        pos += t > m
    return c[pos]


def fit_blocks(x: np.ndarray, c: np.ndarray, affine: bool) -> float:
    """Squared error of blocks x [n, B] on sorted codewords c with refitted float16 scales (and offsets)."""
    best = np.full(x.shape[0], np.inf)
    if affine:
        lo, hi = x.min(1), x.max(1)
        d = (hi - lo) / max(c[-1] - c[0], 1e-12)
        starts = [(d, lo - d * c[0])]
    else:
        amax = np.abs(x).max(1) / max(np.abs(c).max(), 1e-12)
        starts = [(amax, 0 * amax), (-amax, 0 * amax)]  # the negative start mirrors an asymmetric codebook
    n = x.shape[1]
    for d, m in starts:
        for it in range(REFITS + 1):
            dq, mq = f16(d), f16(m)
            cv = nearest((x - mq[:, None]) / np.where(dq != 0, dq, 1)[:, None], c)
            best = np.minimum(best, ((x - dq[:, None] * cv - mq[:, None]) ** 2).sum(1))
            if it == REFITS:
                break
            sc, scc, sx, sxc = cv.sum(1), (cv * cv).sum(1), x.sum(1), (x * cv).sum(1)
            if affine:
                det = n * scc - sc * sc
                ok = det > 1e-18
                d = np.where(ok, (n * sxc - sc * sx) / np.where(ok, det, 1), d)
                m = np.where(ok, (sx - d * sc) / n, m)
            else:
                d = np.where(scc > 0, sxc / np.where(scc > 0, scc, 1), d)
    return float(best.sum())


def layout_error(w: np.ndarray, bits: int, layout: str, block: int, order, bounds, rng) -> float:
    rows, cols = w.shape
    x = w[order].reshape(rows, cols // block, block).astype(np.float64)
    if layout == "scale":
        v = x / np.maximum(np.abs(x).max(2, keepdims=True), 1e-12)
    else:
        lo, hi = x.min(2, keepdims=True), x.max(2, keepdims=True)
        v = (x - lo) / np.maximum(hi - lo, 1e-12)
    err = 0.0
    for r0, r1 in zip(np.r_[0, bounds[:-1]], bounds):
        if layout == "affine-even":
            c = np.linspace(0.0, 1.0, 1 << bits)
        else:
            vv = v[r0:r1].ravel()
            pick = rng.choice(len(vv), min(len(vv), SAMPLES), replace=False)
            c = weighted_kmeans_1d(vv[pick], np.ones(len(pick)), 1 << bits)
        err += fit_blocks(x[r0:r1].reshape(-1, block), c, layout != "scale")
    return err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=list(MODELS), default="qwen2.5-coder-1.5b")
    ap.add_argument("--blocks", default="3,14", help="block numbers, comma-separated")
    ap.add_argument("--bits", default="2,3")
    ap.add_argument("--doc", type=Path, help="write the table as Markdown here")
    a = ap.parse_args()
    from gguf import GGMLQuantizationType as QT
    from safetensors import safe_open

    from jlcm_gguf.standard import roundtrip

    bits = [int(b) for b in a.bits.split(",")]
    files = sorted(MODELS[a.model]().glob("*.safetensors"))
    handles = [safe_open(str(f), "np") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    head = ["matrix"] + [f"{lay}/{blk} b={b} ({b + (32 if lay != 'scale' else 16) / blk:.3g} bpw)"
                         for b in bits for lay, blk in LAYOUTS] + ["Q2_K (2.625)", "Q3_K (3.4375)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for blk in (int(x) for x in a.blocks.split(",")):
        for short, hf in HF_MATRICES.items():
            key = f"model.layers.{blk}.{hf}.weight"
            w = where[key].get_tensor(key).astype(np.float32)
            total = float((w.astype(np.float64) ** 2).sum())
            order, bounds = group_rows(row_profiles(w, None), 16, 0)
            cells = [f"{layout_error(w, b, lay, bl, order, bounds, np.random.default_rng(0)) / total:.4f}"
                     for b in bits for lay, bl in LAYOUTS]
            cells += [f"{float(((w - roundtrip(w, qt, np.ones(w.shape[1], np.float32))).astype(np.float64) ** 2).sum()) / total:.4f}"
                      for qt in (QT.Q2_K, QT.Q3_K)]
            lines.append(f"| blk.{blk}.{short} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    if a.doc:
        a.doc.write_text("\n".join([
            f"# Block layouts for JLCM on {MODELS[a.model]().name.removesuffix('-f32')}", "",
            f"Generated by `.venv/bin/python experiments/block_layouts.py {' '.join(sys.argv[1:])}` on "
            f"{datetime.date.today()}. Each cell is one matrix's relative squared error `Σ (w − q)² / Σ w²` "
            "(unweighted: no calibration activations, nearest rounding); the column says the layout and its bits "
            "per weight without companions (the script's docstring defines them; `scale/64` is the format's "
            "JLCM2/JLCM3). Q2_K and Q3_K: llama.cpp's own quantization with a uniform importance matrix.", "",
            *lines, ""]), encoding="utf-8")


if __name__ == "__main__":
    main()
