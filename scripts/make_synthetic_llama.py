#!/usr/bin/env python3
"""A Hugging Face Llama checkpoint with Llama-2-7B's config and tensor shapes and random weights (issue #6).

    .venv/bin/python scripts/make_synthetic_llama.py OUT_DIR [--config llama2-7b|tiny] [--seed 0]

No trained 7B Llama can be obtained here; this one has the real model's names, shapes (6.74B parameters),
sharded safetensors (float16) and the Llama-2 sentencepiece vocabulary, taken from the vendored
`models/ggml-vocab-llama-spm.gguf` and written as `tokenizer.model` (sentencepiece) and `tokenizer.json`
(Hugging Face). Weights are deterministic by seed and tensor name, with per-row scale variation and a few
outlier input columns, as trained weights have. Tensors are generated and written one shard at a time, so
memory stays at about one shard. `--config tiny` writes the same structure at a small size (for tests).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32),
    # narrow and deep: a checkpoint several times larger than the converter's streaming memory (tests/test_stream.py)
    "deep": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=64, num_attention_heads=16,
                 num_key_value_heads=4),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}


def config_json(name: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
            "initializer_range": 0.02, **CONFIGS[name]}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, ff, nl = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], d))]
    for i in range(nl):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (d, d)),
                (p + "self_attn.k_proj.weight", (kv, d)), (p + "self_attn.v_proj.weight", (kv, d)),
                (p + "self_attn.o_proj.weight", (d, d)), (p + "post_attention_layernorm.weight", (d,)),
                (p + "mlp.gate_proj.weight", (ff, d)), (p + "mlp.up_proj.weight", (ff, d)),
                (p + "mlp.down_proj.weight", (d, ff))]
    out += [("model.norm.weight", (d,)), ("lm_head.weight", (cfg["vocab_size"], d))]
    return out


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Deterministic by (seed, name): RMSNorm gains near 1; matrices N(0, 0.02) with a log-normal scale per
    row and 1% of input columns 4x larger (activation outliers show up as such columns)."""
    key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(key)
    if len(shape) == 1:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float16)
    rows, cols = shape
    w = rng.standard_normal(shape, dtype=np.float32)
    w *= (0.02 * np.exp(0.3 * rng.standard_normal((rows, 1)))).astype(np.float32)
    outliers = rng.choice(cols, size=max(1, cols // 100), replace=False)
    w[:, outliers] *= 4.0
    return w.astype(np.float16)


# --- tokenizer ---------------------------------------------------------------------------------------------

def vocab_gguf() -> Path:
    sys.path.insert(0, str(ROOT / "scripts"))
    import fetch_llama  # noqa: E402
    return fetch_llama.patched_tree() / "vendor" / "llama.cpp" / "models" / "ggml-vocab-llama-spm.gguf"


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    return _varint(num << 3 | wire) + payload


def _bytes_field(num: int, data: bytes) -> bytes:
    return _field(num, 2, _varint(len(data)) + data)


def sentencepiece_model(tokens: list[str], scores: list[float], types: list[int]) -> bytes:
    """A serialized sentencepiece ModelProto (BPE, byte fallback), written without protobuf: pieces (1),
    trainer_spec (2: model_type=3, vocab_size=4, byte_fallback=35), normalizer_spec (3: name=1,
    add_dummy_prefix=3, remove_extra_whitespaces=4, escape_whitespaces=5)."""
    out = bytearray()
    for piece, score, ty in zip(tokens, scores, types):
        msg = _bytes_field(1, piece.encode("utf-8")) + _field(2, 5, struct.pack("<f", score)) + _field(3, 0, _varint(ty))
        out += _bytes_field(1, msg)
    trainer = _field(3, 0, _varint(2)) + _field(4, 0, _varint(len(tokens))) + _field(35, 0, _varint(1))
    out += _bytes_field(2, trainer)
    normalizer = (_bytes_field(1, b"identity") + _field(3, 0, _varint(1)) + _field(4, 0, _varint(0))
                  + _field(5, 0, _varint(1)))
    out += _bytes_field(3, normalizer)
    return bytes(out)


def hf_tokenizer_json(tokens: list[str], scores: list[float], types: list[int]) -> str:
    """The Hugging Face fast tokenizer of the same vocabulary (BPE merges ranked by the merged piece's
    score, as transformers' sentencepiece converter does)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from tokenizers import AddedToken

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i, piece in enumerate(tokens):
        if types[i] != 1 or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((scores[i], -vocab[left], -vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], -m[1], -m[2]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok.to_str()


def write_tokenizer(out: Path) -> None:
    from gguf import GGUFReader
    r = GGUFReader(str(vocab_gguf()))
    tokens = [str(t) for t in r.fields["tokenizer.ggml.tokens"].contents()]
    scores = [float(s) for s in r.fields["tokenizer.ggml.scores"].contents()]
    types = [int(t) for t in r.fields["tokenizer.ggml.token_type"].contents()]
    (out / "tokenizer.model").write_bytes(sentencepiece_model(tokens, scores, types))
    (out / "tokenizer.json").write_text(hf_tokenizer_json(tokens, scores, types), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096, "legacy": False}, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=1))


# --- weights ---------------------------------------------------------------------------------------------

def write_weights(out: Path, cfg: dict, seed: int, shard_bytes: int, dtype=np.float16) -> int:
    from safetensors.numpy import save_file
    from tqdm import tqdm

    shapes = tensor_shapes(cfg)
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = np.dtype(dtype).itemsize * int(np.prod(shape))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    item = np.dtype(dtype).itemsize
    bar = tqdm(total=sum(item * int(np.prod(s)) for _, s in shapes), unit="B", unit_scale=True, desc="weights")
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}
        for name, shape in shard:
            arrays[name] = random_tensor(name, shape, seed).astype(dtype)
            weight_map[name] = fname
            total += arrays[name].size
            bar.update(arrays[name].nbytes)
        tmp = out / (fname + ".tmp")
        save_file(arrays, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / fname)
        del arrays
    bar.close()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": item * total}, "weight_map": weight_map}, indent=1))
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="llama2-7b")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", type=float, default=2.0, help="GB (10^9 bytes) per safetensors shard")
    ap.add_argument("--layers", type=int, help="this many layers instead of the configuration's")
    ap.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                    help="the weights' type in the safetensors files (their values are float16's either way)")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    cfg = config_json(a.config)
    if a.layers:
        cfg["num_hidden_layers"] = a.layers
    cfg["torch_dtype"] = a.dtype
    write_tokenizer(a.out)
    n = write_weights(a.out, cfg, a.seed, int(a.shard_size * 1e9), np.dtype(a.dtype))
    (a.out / "config.json").write_text(json.dumps(cfg, indent=1))  # last: a folder with it is complete
    print(f"wrote {a.out}: {n:,} parameters ({a.config}, seed {a.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
