"""Shared fixtures: where the patched llama.cpp build lives, and a way to run its tools."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = Path(os.environ.get("JLCM_BUILD_DIR", ROOT / "build"))
CONVERTER = [sys.executable, str(ROOT / "convert_hf_to_jlcm_gguf.py")]


def tool(name: str) -> Path:
    path = BUILD_DIR / "bin" / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/setup.sh (or cmake --build build) first")
    return path


def run(args, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    if kw["text"]:  # a random-weight model may emit a token that ends inside a UTF-8 sequence
        kw.setdefault("errors", "replace")
    kw.setdefault("timeout", 600)
    return subprocess.run([str(a) for a in args], **kw)


def error_line(res: subprocess.CompletedProcess) -> str:
    """The last line a failed command wrote to stderr; a traceback there is never a clear error."""
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def small_model(src: Path, dst: Path, n_layer: int, n_ff: int | None = None,
                edit=None, config_patch: dict | None = None) -> Path:
    """The first n_layer blocks of the real SmolLM2 (FFN cut to n_ff neurons if given) as an HF folder."""
    from safetensors.numpy import load_file, save_file
    dst.mkdir(parents=True)
    weights = load_file(str(src / "model.safetensors"))
    keep = {}
    for k, v in weights.items():
        if k.startswith("model.layers."):
            if int(k.split(".")[2]) >= n_layer:
                continue
            if n_ff and ("gate_proj" in k or "up_proj" in k):
                v = v[:n_ff]
            elif n_ff and "down_proj" in k:
                v = np.ascontiguousarray(v[:, :n_ff])
        keep[k] = v
    if edit:
        edit(keep)
    save_file(keep, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = n_layer
    if n_ff:
        cfg["intermediate_size"] = n_ff
    cfg.update(config_patch or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            (dst / f.name).symlink_to(f)
    return dst


SMALL_LAYERS = 4


@pytest.fixture(scope="session")
def small(smollm2, tmp_path_factory) -> Path:
    """SmolLM2's first SMALL_LAYERS blocks with its embeddings, tokenizer and widths: what runs or plans a file is
    the same as for the 30 blocks, 7 times faster to convert (test_plan, test_convert, test_robustness)."""
    return small_model(smollm2, tmp_path_factory.mktemp("smollm2-small") / "m", SMALL_LAYERS)


@pytest.fixture(scope="session")
def converted(small, tmp_path_factory) -> tuple[Path, dict]:
    """The SmolLM2 blocks of `small` converted at 2 bits (8 groups, 4 calibration windows of 128 tokens): the file and
    the conversion's summary (test_convert checks it; test_vulkan runs it in the Vulkan build)."""
    from jlcm_gguf.convert import Options, convert
    out = tmp_path_factory.mktemp("conv") / "smollm2-jlcm2.gguf"
    summary = convert(Options(model=small, outfile=out, bits=2, groups=8, nsamples=4, seqlen=128))
    return out, summary


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny JLCM Llama (grouped codebooks, permuted rows) and its F32 twin (tiny_llama.make_pair)."""
    from tiny_llama import make_pair
    return make_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def text(tmp_path_factory) -> Path:
    """A short English text file for perplexity runs of the tiny models."""
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 40)
    return path


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The float SmolLM2-135M-Instruct Hugging Face folder (the reference model)."""
    from jlcm_gguf.reference_models import smollm2_hf_dir
    return smollm2_hf_dir()


@pytest.fixture(scope="session")
def smollm2_float(smollm2):
    """SmolLM2's float tensors as the vendored converter writes them (GGUF names), their order, Hparams."""
    import json

    import gguf

    from jlcm_gguf.convert import float_tensors, hparams_of, import_conversion
    conversion = import_conversion()
    config = json.loads((smollm2 / "config.json").read_text())
    cls = conversion.get_model_class(conversion.get_model_architecture(config, conversion.ModelType.TEXT))
    inst = cls(smollm2, gguf.LlamaFileType.ALL_F32, Path("/dev/null"), eager=True)
    tensors, order = float_tensors(inst)
    return tensors, order, hparams_of(config)


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    """Every position's logits of `path` on `tokens`, from llama-cpp-python on the patched build (float64)."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, seed=0)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[:len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def llama_cpp_tokens(path: Path, text: str) -> list[int]:
    """`text` tokenized by the vocabulary in `path` (no BOS)."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=False)
    finally:
        llm.close()
