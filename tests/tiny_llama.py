"""A tiny Llama with random weights and the real Llama-2 sentencepiece vocabulary, written twice:
with JLCM tensors (permuted and grouped, token_embd and output included) and as F32 with the
Python-dequantized weights of the first. Both run in the same patched llama.cpp."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

from jlcm_gguf.format import (BLOCK_BYTES, FTYPE_IDS, KEY_BITS, KEY_FORMAT_VERSION, KEY_GROUPS, FORMAT_VERSION, SUFFIX_BOUNDS,
                              SUFFIX_CB)
from jlcm_gguf.pack import dequantize, group_of_rows, quantize_to_codebooks
from jlcm_gguf.write import add_jlcm_tensor

ROOT = Path(__file__).resolve().parent.parent
N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_LAYER = 128, 256, 4, 2, 2


def vocab_gguf() -> Path:
    sdist = subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_llama.py")], check=True,
                           capture_output=True, text=True).stdout.strip()
    return Path(sdist) / "vendor" / "llama.cpp" / "models" / "ggml-vocab-llama-spm.gguf"


def copy_tokenizer(reader: GGUFReader, writer: GGUFWriter) -> None:
    copy_metadata(reader, writer, lambda name: name.startswith("tokenizer."))


def copy_metadata(reader: GGUFReader, writer: GGUFWriter, keep=lambda name: True) -> None:
    """Copies the key-value fields whose names keep() accepts (the writer has its architecture already)."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or not keep(field.name):
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            writer.add_array(field.name, field.contents())
        elif vtype == GGUFValueType.STRING:
            writer.add_string(field.name, field.contents())
        else:
            writer.add_key_value(field.name, field.contents(), vtype)


def random_weights(n_vocab: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def mat(rows, cols, std):
        # per-row scale variation, as trained weights have
        return (rng.standard_normal((rows, cols)) * std * rng.uniform(0.5, 1.5, size=(rows, 1))).astype(np.float32)

    kv = N_EMBD // N_HEAD * N_HEAD_KV
    embd = (rng.standard_normal((n_vocab, N_EMBD)) * 4.0).astype(np.float32)
    # the head partly reads the input token back, as a trained model's predictions are confident:
    # logit margins then stay well above the int8 activation error, and top-1 is a stable check
    head = 0.1 * embd[rng.permutation(n_vocab)] + mat(n_vocab, N_EMBD, 0.1)
    w = {"token_embd.weight": embd,
         "output_norm.weight": np.ones(N_EMBD, dtype=np.float32),
         "output.weight": head}
    for i in range(N_LAYER):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = rng.uniform(0.8, 1.2, N_EMBD).astype(np.float32)
        w[p + "ffn_norm.weight"] = rng.uniform(0.8, 1.2, N_EMBD).astype(np.float32)
        w[p + "attn_q.weight"] = mat(N_EMBD, N_EMBD, 0.1)
        w[p + "attn_k.weight"] = mat(kv, N_EMBD, 0.1)
        w[p + "attn_v.weight"] = mat(kv, N_EMBD, 0.1)
        w[p + "attn_output.weight"] = mat(N_EMBD, N_EMBD, 0.1)
        w[p + "ffn_gate.weight"] = mat(N_FF, N_EMBD, 0.1)
        w[p + "ffn_up.weight"] = mat(N_FF, N_EMBD, 0.1)
        w[p + "ffn_down.weight"] = mat(N_EMBD, N_FF, 0.07)
    return w


def quantile_codebooks(w: np.ndarray, bits: int, bounds: np.ndarray) -> np.ndarray:
    """int8 codebook per group from quantiles of block-normalised weights (a simple stand-in for k-means)."""
    rows, cols = w.shape
    blocks = w.reshape(rows, -1, 64)
    norm = blocks / np.maximum(np.abs(blocks).max(axis=2, keepdims=True), 1e-12) * 127
    grp = group_of_rows(bounds, rows)
    k = 1 << bits
    qs = (np.arange(k) + 0.5) / k
    cbs = [np.round(np.quantile(norm[grp == g].ravel(), qs)) for g in range(len(bounds))]
    cb = np.clip(np.array(cbs), -127, 127).astype(np.int8)
    cb[:, 0], cb[:, -1] = -127, 127  # the block maximum is always representable
    return cb


def tiny_writer(path: Path, name: str) -> GGUFWriter:
    """A GGUFWriter with the tiny Llama's hyperparameters."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_block_count(N_LAYER)
    writer.add_context_length(256)
    writer.add_embedding_length(N_EMBD)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    return writer


def write_model(path: Path, reader: GGUFReader, tensors: dict, ftype: int) -> None:
    writer = tiny_writer(path, "tiny-jlcm-test")
    writer.add_file_type(ftype)
    copy_tokenizer(reader, writer)
    for name, spec in tensors.items():
        if isinstance(spec, np.ndarray):
            writer.add_tensor(name, spec)
        else:
            add_jlcm_tensor(writer, name, **spec)
    if ftype in FTYPE_IDS.values():
        writer.add_uint32(KEY_FORMAT_VERSION, FORMAT_VERSION)
        writer.add_uint32(KEY_BITS, 2)
        writer.add_uint32(KEY_GROUPS, 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_pair(out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Writes tiny-jlcm.gguf and tiny-f32.gguf (the same weights, dequantized) into out_dir."""
    reader = GGUFReader(str(vocab_gguf()))
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    weights = random_weights(n_vocab, seed)
    jlcm, f32 = {}, {}
    permuted = {"token_embd.weight", "output.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight"}
    for n, (name, w) in enumerate(weights.items()):
        if w.ndim == 1:
            jlcm[name] = f32[name] = w
            continue
        bits = (2, 3, 4)[n % 3]
        rows = w.shape[0]
        groups = 4
        # group rows by their scale (row norm), the way the converter groups neurons
        order = np.argsort(np.abs(w).max(axis=1), kind="stable") if name in permuted else np.arange(rows)
        w_stored = w[order]
        bounds = np.linspace(0, rows, groups + 1).astype(np.int32)[1:]
        cb = quantile_codebooks(w_stored, bits, bounds)
        packed = quantize_to_codebooks(w_stored, bits, cb, bounds)
        perm = order.astype(np.int32) if name in permuted else None
        jlcm[name] = dict(packed=packed, bits=bits, codebooks=cb, bounds=bounds, perm=perm)
        f32[name] = dequantize(packed, bits, w.shape[1], cb, bounds, None if perm is None else np.stack([perm, perm]))
    paths = out_dir / "tiny-jlcm.gguf", out_dir / "tiny-f32.gguf"
    write_model(paths[0], reader, jlcm, FTYPE_IDS[2])
    write_model(paths[1], reader, f32, int(LlamaFileType.ALL_F32))
    return paths


def write_dequantized(src: Path, dst: Path) -> None:
    """Writes src with every JLCM weight dequantized to F32 by the Python reference (original row order, no
    companions) and everything else copied: the exact-arithmetic twin of a converted file."""
    from jlcm_gguf.format import SUFFIX_PERM
    from jlcm_gguf.read import read_jlcm
    reader = GGUFReader(str(src))
    jlcm = read_jlcm(src)
    writer = GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    copy_metadata(reader, writer)
    for t in reader.tensors:
        if t.name.rsplit(".", 1)[-1] in (SUFFIX_CB, SUFFIX_BOUNDS, SUFFIX_PERM):
            continue
        if t.name in jlcm:
            w = jlcm[t.name]
            experts = [w.dequantize(e) for e in range(w.packed.shape[0])]
            writer.add_tensor(t.name, experts[0] if len(experts) == 1 else np.stack(experts))
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


N_EXPERT, N_EXPERT_USED = 4, 2


def make_moe(out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Writes tiny-moe-jlcm.gguf and tiny-moe-f32.gguf (the same weights, dequantized): the tiny Llama with a
    mixture of N_EXPERT experts in place of each block's feed-forward (the Mixtral layout llama.cpp reads as
    `llama`). The experts' weights are 3-D JLCM2 tensors with group codebooks and bounds per expert, so MUL_MAT_ID
    multiplies them; everything else is F32."""
    reader = GGUFReader(str(vocab_gguf()))
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    rng = np.random.default_rng(seed + 1)
    tensors = {}
    for name, w in random_weights(n_vocab, seed).items():
        if ".ffn_" not in name or name.endswith("ffn_norm.weight"):
            tensors[name] = w
    for i in range(N_LAYER):
        p = f"blk.{i}."
        tensors[p + "ffn_gate_inp.weight"] = (rng.standard_normal((N_EXPERT, N_EMBD)) * 0.1).astype(np.float32)
        for kind, (rows, cols, std) in {"gate": (N_FF, N_EMBD, 0.1), "up": (N_FF, N_EMBD, 0.1),
                                        "down": (N_EMBD, N_FF, 0.07)}.items():
            packed, cbs, bounds_all = [], [], []
            bounds = np.linspace(0, rows, 5).astype(np.int32)[1:]
            for _ in range(N_EXPERT):
                w = (rng.standard_normal((rows, cols)) * std * rng.uniform(0.5, 1.5, size=(rows, 1))).astype(np.float32)
                cb = quantile_codebooks(w, 2, bounds)
                packed.append(quantize_to_codebooks(w, 2, cb, bounds))
                cbs.append(cb)
                bounds_all.append(bounds)
            tensors[p + f"ffn_{kind}_exps.weight"] = (np.stack(packed), np.stack(cbs), np.stack(bounds_all))
    paths = out_dir / "tiny-moe-jlcm.gguf", out_dir / "tiny-moe-f32.gguf"
    for path in paths:
        _write_moe(path, reader, tensors, dequantized=path == paths[1])
    return paths


def _write_moe(path: Path, reader: GGUFReader, tensors: dict, dequantized: bool) -> None:
    writer = tiny_writer(path, "tiny-moe-jlcm-test")
    writer.add_expert_count(N_EXPERT)
    writer.add_expert_used_count(N_EXPERT_USED)
    writer.add_file_type(int(LlamaFileType.ALL_F32) if dequantized else FTYPE_IDS[2])
    copy_tokenizer(reader, writer)
    for name, t in tensors.items():
        if isinstance(t, np.ndarray):
            writer.add_tensor(name, t)
            continue
        packed, cb, bounds = t
        if dequantized:
            cols = packed.shape[2] // BLOCK_BYTES[2] * 64
            writer.add_tensor(name, np.stack([dequantize(p, 2, cols, c, b, None) for p, c, b in zip(packed, cb, bounds)]))
            continue
        writer.add_tensor(name, packed, raw_dtype=GGMLQuantizationType.JLCM2)
        writer.add_tensor(f"{name}.{SUFFIX_CB}", cb)
        writer.add_tensor(f"{name}.{SUFFIX_BOUNDS}", bounds)
    if not dequantized:
        writer.add_uint32(KEY_FORMAT_VERSION, FORMAT_VERSION)
        writer.add_uint32(KEY_BITS, 2)
        writer.add_uint32(KEY_GROUPS, 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    print(*make_pair(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")))
