"""--imatrix FILE: a `llama-imatrix` file as the calibration importance.

llama-imatrix writes, per weight matrix it saw in a MUL_MAT, `NAME.in_sum2` (the sum of x_j^2 over the tokens
it ran, one row per expert) and `NAME.counts` (how many tokens). Their ratio is the h_j = E[x_j^2] the converter
otherwise measures on its own calibration windows. With --imatrix it weights every per-column error with the
file's h: Hessian-weighted k-means codebooks, the plan's error scores, llama.cpp types' importance, and GPTQ's
input Hessian, whose diagonal is rescaled to the file's h (the correlations between columns, which an imatrix
does not record, stay those of the calibration windows)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


class ImatrixError(SystemExit):
    def __init__(self, path, msg: str):
        super().__init__(f"error: --imatrix {path}: {msg}")


def read_imatrix(path: Path, tensors: dict) -> dict[str, np.ndarray]:
    """h per input-statistics key of the converter ('blk.N.attn_q', ..., 'output' for an untied head, which
    llama-imatrix records with --process-output; a tied head, token_embd, it never records), checked against the
    widths of `tensors` (GGUF names and layout)."""
    path = Path(path)
    if not path.is_file():
        raise ImatrixError(path, "no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ImatrixError(path, "not a GGUF file; a legacy .dat imatrix can be converted with "
                                 "`llama-imatrix --in-file FILE.dat -o FILE.gguf`")
    from gguf import GGUFReader
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file
        raise ImatrixError(path, f"cannot be read as GGUF ({e})")
    if "imatrix.chunk_count" not in reader.fields:
        raise ImatrixError(path, "has no imatrix.chunk_count: not a llama-imatrix file")
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name.removesuffix(".in_sum2")] = np.asarray(t.data, dtype=np.float64)
        elif t.name.endswith(".counts"):
            counts[t.name.removesuffix(".counts")] = np.asarray(t.data, dtype=np.float64).reshape(-1)
    out: dict[str, np.ndarray] = {}
    for name, s in sums.items():
        if name not in counts:
            raise ImatrixError(path, f"{name}.in_sum2 has no {name}.counts")
        if s.ndim != 1 and s.shape[0] != 1:
            continue  # one row per expert: a mixture-of-experts matrix, which this converter does not quantize
        s = s.reshape(-1)
        c = float(counts[name][0])
        if c <= 0 or not np.all(np.isfinite(s)) or np.any(s < 0):
            raise ImatrixError(path, f"{name}: counts {c} or sums not finite and non-negative")
        key = "output" if name == "output.weight" else name.removesuffix(".weight")
        if name not in tensors:
            continue  # a matrix this model does not have (llama-imatrix may have run another model)
        cols = np.shape(tensors[name])[1]
        if s.shape[0] != cols:
            raise ImatrixError(path, f"{name} has {s.shape[0]} columns, the model's has {cols}: "
                                     "an imatrix of another model?")
        out[key] = s / c
    wanted = {n.removesuffix(".weight") for n in tensors if n.startswith("blk.") and np.ndim(tensors[n]) == 2}
    if not out.keys() & wanted:
        raise ImatrixError(path, "has no entry for any of this model's layer matrices: an imatrix of another model?")
    return out


def apply_imatrix(h: dict, imatrix: dict | None) -> dict:
    """h with the imatrix's entries in place of the measured ones, where it has them."""
    if not imatrix:
        return h
    return {k: (imatrix[k].astype(np.asarray(v).dtype) if k in imatrix else v) for k, v in h.items()}


def rescale_hessian(H: np.ndarray, h_measured: np.ndarray, h_imatrix: np.ndarray) -> np.ndarray:
    """H with its diagonal made h_imatrix and its correlations kept: S H S with S = sqrt(h_imatrix / diag)."""
    d = np.asarray(h_measured, dtype=np.float64)
    s = np.sqrt(np.divide(np.asarray(h_imatrix, dtype=np.float64), d, out=np.zeros_like(d), where=d > 0))
    return (H * s[:, None] * s[None, :]).astype(H.dtype)
