"""The runtime half end to end: a small Llama written with JLCM tensors (grouped codebooks, permuted
rows, JLCM token_embd and output) runs in llama.cpp's tools and in llama-cpp-python, and matches the
same model written as F32 with the Python-dequantized weights, run by the same build."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import BUILD_DIR, ROOT, run, tool
from tiny_llama import make_moe

PROMPT = b"The quick brown fox jumps over the lazy dog. " * 8
PYPI_GGUF = ("gguf==0.19.0", "gguf-0.19.0-py3-none-any.whl")


def llama_logits(path: Path) -> np.ndarray:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, seed=0)
    tokens = llm.tokenize(PROMPT)[:64]
    assert len(tokens) == 64
    llm.eval(tokens)
    return np.array(llm.scores[:64])


def test_bindings_are_the_patched_build():
    import llama_cpp
    assert llama_cpp.__version__ == "0.3.36+jlcm"
    lib = Path(llama_cpp.__file__).parent / "lib" / "libllama.so"
    assert lib.exists(), "llama-cpp-python must ship the patched libllama it was installed with"


def test_logits_match_dequantized_f32(tiny):
    jlcm, f32 = tiny
    a, b = llama_logits(jlcm), llama_logits(f32)
    rel = np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2))
    assert rel <= 2e-2, f"relative RMS logit error {rel:.4f}"
    assert np.array_equal(a.argmax(1), b.argmax(1)), "top-1 token differs"


def test_moe_logits_match_dequantized_f32(tmp_path):
    """Mixture-of-experts weights (3-D JLCM2 with group codebooks per expert) go through MUL_MAT_ID: the same logits
    as the dequantized F32 twin, as the dense tiny model."""
    jlcm, f32 = make_moe(tmp_path)
    a, b = llama_logits(jlcm), llama_logits(f32)
    rel = np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2))
    assert rel <= 2e-2, f"relative RMS logit error {rel:.4f}"
    assert np.mean(a.argmax(1) == b.argmax(1)) >= 0.95, "top-1 tokens differ"


def test_logit_check_sees_a_wrong_dequantization(tiny, tmp_path):
    """Negative control: the same weights with a permutation ignored must fail the comparison above."""
    import tiny_llama
    from gguf import GGUFReader
    jlcm, f32 = tiny
    reader = GGUFReader(str(f32))
    tensors = {t.name: np.array(t.data).reshape(tuple(int(x) for x in reversed(t.shape))) for t in reader.tensors}
    tensors["output.weight"] = tensors["output.weight"][np.random.default_rng(0).permutation(len(tensors["output.weight"]))]
    wrong = tmp_path / "wrong.gguf"
    tiny_llama.write_model(wrong, GGUFReader(str(tiny_llama.vocab_gguf())), tensors, 0)
    a, b = llama_logits(jlcm), llama_logits(wrong)
    rel = np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2))
    assert rel > 0.2


def test_llama_completion_runs_jlcm(tiny):
    jlcm, _ = tiny
    res = run([tool("llama-completion"), "-m", jlcm, "-p", "The quick brown fox", "-n", "16", "--temp", "0",
               "-t", "2", "-no-cnv", "--no-warmup", "-v"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "file type   = JLCM 2-bit" in res.stderr
    assert "The quick brown fox" in res.stdout


def test_gguf_dump_lists_jlcm(tiny):
    jlcm, _ = tiny
    dump = Path(sys.executable).parent / "gguf-dump"
    res = run([dump, jlcm])
    assert res.returncode == 0, res.stderr
    assert "JLCM2" in res.stdout and "blk.0.attn_q.weight.jlcm_perm" in res.stdout


def test_pypi_gguf_refuses(tiny, tmp_path):
    """gguf-py as published on PyPI (same version number, without the types) refuses the file."""
    jlcm, _ = tiny
    sys.path.insert(0, str(ROOT))
    from jlcm_gguf.reference_models import cache_dir
    dl = cache_dir() / "dl"
    wheel = dl / PYPI_GGUF[1]
    if not wheel.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        PYPI_GGUF[0], "-d", str(dl)], check=True, capture_output=True)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gguf; "
            "assert not hasattr(gguf.GGMLQuantizationType, 'JLCM2'); gguf.GGUFReader(sys.argv[2])")
    res = run([sys.executable, "-c", code, wheel, jlcm])
    assert res.returncode != 0
    assert re.search(r"200\)? is not a valid GGMLQuantizationType", res.stderr), res.stderr[-2000:]


def test_unpatched_ggml_refuses(tiny):
    """ggml's GGUF reader built from the same sdist without the patch refuses the file."""
    jlcm, _ = tiny
    check = BUILD_DIR.parent / "build-stock" / "gguf-stock-check"
    if not check.exists():
        pytest.fail(f"{check} is missing: run scripts/setup.sh --tests")
    res = run([check, jlcm])
    assert res.returncode == 3, res.stdout + res.stderr
    assert "invalid ggml type 200" in res.stderr
    # and the same reader loads a stock file
    res = run([check, tiny[1]])
    assert res.returncode == 0, res.stderr


def test_llama_quantize_jlcm_default_codebook(tiny, tmp_path):
    """llama-quantize writes the JLCM types with their default codebooks; the file runs, and a JLCM
    file is not requantized (its codebooks are companions that to_float does not see)."""
    jlcm, f32 = tiny
    out = tmp_path / "q.gguf"
    res = run([tool("llama-quantize"), f32, out, "JLCM3", "2"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    res = run([tool("llama-completion"), "-m", out, "-p", "The quick brown fox", "-n", "8", "--temp", "0",
               "-t", "2", "-no-cnv", "--no-warmup", "-v"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "file type   = JLCM 3-bit" in res.stderr and "type jlcm3" in res.stderr
    res = run([tool("llama-quantize"), "--allow-requantize", jlcm, tmp_path / "r.gguf", "Q8_0", "2"])
    assert res.returncode != 0
    assert "cannot requantize JLCM tensors" in res.stdout + res.stderr


def test_llama_bench_runs_jlcm(tiny):
    jlcm, _ = tiny
    res = run([tool("llama-bench"), "-m", jlcm, "-p", "32", "-n", "8", "-r", "1", "-t", "2", "-o", "json"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout)
    assert {r["n_prompt"] for r in rows} == {32, 0} and all(r["avg_ts"] > 0 for r in rows)
    assert all(r["model_type"].endswith("JLCM 2-bit") for r in rows), rows[0]["model_type"]


def test_newer_format_version_refused(tiny, tmp_path):
    """A file that says it is a later JLCM format is refused with one clear message, not misread."""
    from gguf import GGUFReader, GGUFWriter
    from tiny_llama import copy_metadata
    jlcm, _ = tiny
    r = GGUFReader(str(jlcm))
    out = tmp_path / "v2.gguf"
    w = GGUFWriter(str(out), r.fields["general.architecture"].contents())
    copy_metadata(r, w, lambda name: name != "jlcm.format_version")
    w.add_uint32("jlcm.format_version", 2)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    res = run([tool("llama-completion"), "-m", out, "-p", "Hi", "-n", "1", "-no-cnv", "--no-warmup"], timeout=120)
    assert res.returncode != 0
    assert "unsupported JLCM format: jlcm.format_version must be a uint32 <= 1" in res.stderr
