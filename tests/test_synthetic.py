"""scripts/make_synthetic_llama.py (issue #6): Llama-2-7B's shapes, a tokenizer that is the real Llama-2
vocabulary, determinism; its tiny configuration converted under a byte budget runs in llama.cpp."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CONVERTER, ROOT, run, tool

sys.path.insert(0, str(ROOT / "scripts"))
import make_synthetic_llama as S  # noqa: E402

TEXTS = ["Hello world, the quick brown fox.", "naïve café 東京 🙂 \t x  2024-11-23", " leading space", "a\nb\n\nc"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "hf"
    assert S.main([str(out), "--config", "tiny", "--seed", "1"]) == 0
    return out


def test_llama2_7b_shapes():
    cfg = S.config_json("llama2-7b")
    shapes = S.tensor_shapes(cfg)
    assert sum(int(np.prod(s)) for _, s in shapes) == 6_738_415_616  # Llama-2-7B's parameter count
    assert dict(shapes)["model.layers.31.mlp.down_proj.weight"] == (4096, 11008)
    assert len(shapes) == 2 + 32 * 9 + 1


def test_weights_deterministic_with_row_scales():
    a = S.random_tensor("model.layers.0.mlp.up_proj.weight", (256, 512), seed=3)
    assert np.array_equal(a, S.random_tensor("model.layers.0.mlp.up_proj.weight", (256, 512), seed=3))
    assert not np.array_equal(a, S.random_tensor("model.layers.0.mlp.up_proj.weight", (256, 512), seed=4))
    assert not np.array_equal(a, S.random_tensor("model.layers.1.mlp.up_proj.weight", (256, 512), seed=3))
    row_std = a.astype(np.float32).std(axis=1)
    assert row_std.max() / row_std.min() > 1.5  # rows differ in scale, as trained weights do


def test_tokenizers_are_the_llama2_vocabulary(tiny):
    import sentencepiece as spm
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(tiny / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(tiny))
    ref = Llama(model_path=str(S.vocab_gguf()), vocab_only=True, verbose=False)
    assert sp.get_piece_size() == len(hf) == ref.n_vocab() == 32000
    for text in TEXTS:
        want = ref.tokenize(text.encode(), add_bos=False)
        assert sp.encode(text) == want, text
        assert hf(text, add_special_tokens=False)["input_ids"] == want, text
    assert sp.encode("Hello") == [15043]  # Llama-2's id for "▁Hello"


def test_tiny_converts_under_a_budget_and_runs(tiny, tmp_path):
    out = tmp_path / "tiny.gguf"
    res = run(CONVERTER + [tiny, "--outfile", out, "--target-bpw", "3.0", "--nsamples", "4", "--seqlen", "64",
                           "--save-plan", tmp_path / "plan.json"], timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "plan.json").read_text())
    n_weights = sum(int(np.prod(s)) for _, s in S.tensor_shapes(S.config_json("tiny")))
    assert out.stat().st_size == doc["predicted_bytes"] <= doc["target_bytes"] == int(3.0 * n_weights / 8)
    gen = run([tool("llama-completion"), "-m", out, "-p", "Once upon a time", "-n", "8", "-no-cnv", "-t", "2",
               "--temp", "0"], stdin=None)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert "Once upon a time" in gen.stdout


def test_prove_7b_script_on_the_tiny_config(tmp_path):
    """scripts/prove_7b.py end to end on the tiny configuration (the 7B run is a benchmark, docs/7b.md)."""
    import prove_7b
    doc = tmp_path / "7b.md"
    assert prove_7b.main(["--config", "tiny", "--out", str(tmp_path / "run"), "--target-size", "7MB",
                          "--rss-target", "1GB", "--cache-types", "f16,q8_0", "--doc", str(doc), "--reps", "1",
                          "--imatrix-chunks", "1"]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["fits"] and result["loads_and_generates"] and result["bytes"] <= 7_000_000
    assert result["speed"]["jlcm"]["tg"] > 0 and result["speed"]["iq2"]["pp"] > 0
    assert set(result["peak_rss"]) == {"f16", "q8_0"} and min(result["peak_rss"].values()) > 10**7
    assert result["convert_seconds"] > 0 and result["convert_peak_rss"] > 10**8  # the converter's own, from wait4
    text = doc.read_text()
    assert "| file bytes | " in text and "met" in text and "ratio JLCM / IQ2_XXS" in text
    assert "KV cache q8_0 |" in text and "target is met with the KV cache in f16, q8_0." in text


def test_peak_rss_is_the_tools_own_not_this_process():
    """Linux carries a parent's peak RSS into a forked child: the measurement must not report the test
    process's size for a small tool."""
    import prove_7b
    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB touched in this process
    res, peak = prove_7b.peak_rss_run(["/bin/sh", "-c", "exit 3"])
    assert res.returncode == 3
    assert 0 < peak < 100 * 2**20, peak
    res, big = prove_7b.peak_rss_run([sys.executable, "-c", "import numpy; a = numpy.ones(2**28 // 8)"])
    assert res.returncode == 0 and big > 250 * 2**20 > peak  # a tool's own 256 MiB shows
    del ballast


def test_rounding_auto_is_gptq_up_to_3_bits_and_nearest_at_4(tiny, tmp_path, monkeypatch):
    """Layer matrices and the head (its input: the final norm's output) take GPTQ rounding at 2 and 3 bits
    under auto; the token embedding, a lookup, is always rounded to the nearest codeword. (Without layer-wise
    learning, which follows the rounding whichever it was: the files show the rounding alone.)"""
    from gguf import GGUFReader

    def convert(bits: int, rounding: str) -> Path:
        out = tmp_path / f"{bits}-{rounding}.gguf"
        res = run(CONVERTER + [tiny, "--outfile", out, "--bits", bits, "--embd-type", f"jlcm{bits}", "--rounding",
                               rounding, "--nsamples", "4", "--seqlen", "64", "--layer-rounds", "0"], timeout=1200)
        assert res.returncode == 0, res.stderr[-3000:]
        return out

    assert convert(4, "auto").read_bytes() == convert(4, "nearest").read_bytes()
    auto = convert(3, "auto")
    assert auto.read_bytes() == convert(3, "gptq").read_bytes() != convert(3, "nearest").read_bytes()

    # the same conversion with the head alone left to nearest rounding differs in the head's indices only
    import jlcm_gguf.blocks as B
    import jlcm_gguf.convert as C
    from jlcm_gguf.cli import parse_args
    layers_only = tmp_path / "3-layers-only.gguf"
    opt = parse_args([str(tiny), "--outfile", str(layers_only), "--bits", "3", "--embd-type", "jlcm3",
                      "--nsamples", "4", "--seqlen", "64", "--layer-rounds", "0"])
    monkeypatch.setattr(B, "gptq_rounding", lambda o, name, rule=B.gptq_rounding: name != "output.weight" and rule(o, name))
    C.convert(opt)
    data = [{t.name: bytes(t.data) for t in GGUFReader(f).tensors} for f in (auto, layers_only)]
    assert data[0].keys() == data[1].keys()
    assert [n for n in data[0] if data[0][n] != data[1][n]] == ["output.weight"]
