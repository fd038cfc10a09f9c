"""Hugging Face checkpoint -> JLCM GGUF.

The vendored llama.cpp converter (`convert_hf_to_gguf.py`'s model classes) reads the checkpoint and
produces every tensor in GGUF naming and layout, the hyper-parameters, the vocabulary and the chat
template; this module only replaces how weight matrices are stored: group -> init -> (learn) -> pack ->
write. The output is written to a temporary file, re-read, and renamed when complete.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import format as F
from .model import LINEARS, Hparams

log = logging.getLogger("jlcm-convert")

SUPPORTED_ARCHS = {"LlamaForCausalLM": False, "Qwen2ForCausalLM": True}  # -> rope_neox


class ConvertError(SystemExit):
    """One clear message, exit status 1."""

    def __init__(self, msg: str):
        super().__init__(f"error: {msg}")


@dataclass
class Options:
    model: Path
    outfile: Path
    bits: int = 2
    groups: int = 16
    variant: str = "codebooks"
    embd_type: str = "jlcm4"
    calib: Path | None = None
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    threads: int = 0


def llama_cpp_dir() -> Path:
    env = os.environ.get("JLCM_LLAMA_DIR")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "scripts"))
    try:
        import fetch_llama  # type: ignore
    finally:
        sys.path.pop(0)
    return fetch_llama.patched_tree() / "vendor" / "llama.cpp"


def import_conversion():
    d = str(llama_cpp_dir())
    if d not in sys.path:
        sys.path.insert(0, d)
    import conversion  # noqa: F401  (the vendored converter's model classes)
    return conversion


def check_input(model: Path) -> dict:
    if not model.is_dir():
        raise ConvertError(f"{model} is not a directory (expected a Hugging Face model folder)")
    cfg = model / "config.json"
    if not cfg.is_file():
        raise ConvertError(f"{model} has no config.json")
    try:
        config = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise ConvertError(f"cannot read {cfg}: {e}")
    if not list(model.glob("*.safetensors")):
        raise ConvertError(f"{model} has no *.safetensors weights")
    if not (model / "tokenizer.json").is_file() and not (model / "tokenizer.model").is_file():
        raise ConvertError(f"{model} has no tokenizer (tokenizer.json or tokenizer.model)")
    archs = config.get("architectures") or []
    if not archs or archs[0] not in SUPPORTED_ARCHS:
        raise ConvertError(f"unsupported architecture {archs[0] if archs else '(none)'}; "
                           f"supported: {', '.join(SUPPORTED_ARCHS)}")
    return config


def hparams_of(config: dict) -> Hparams:
    n_head = config["num_attention_heads"]
    return Hparams(
        n_layer=config["num_hidden_layers"], n_embd=config["hidden_size"], n_head=n_head,
        n_head_kv=config.get("num_key_value_heads", n_head), n_ff=config["intermediate_size"],
        rms_eps=config.get("rms_norm_eps", 1e-6), rope_base=config.get("rope_theta", 10000.0),
        rope_neox=SUPPORTED_ARCHS[config["architectures"][0]])


def float_tensors(model_instance) -> tuple[dict, list]:
    """Runs the vendored converter's tensor pass with F32 output and captures what it would write."""
    captured: dict[str, np.ndarray] = {}
    names: list[str] = []

    def capture(name, tensor, raw_shape=None, raw_dtype=None, tensor_endianess=None):
        from gguf import LazyNumpyTensor
        arr = LazyNumpyTensor.to_eager(tensor) if isinstance(tensor, LazyNumpyTensor) else tensor
        captured[name] = np.asarray(arr, dtype=np.float32)
        names.append(name)

    writer = model_instance.gguf_writer
    original = writer.add_tensor
    writer.add_tensor = capture
    try:
        model_instance.prepare_tensors()
    finally:
        writer.add_tensor = original
    for name, w in captured.items():
        if not np.all(np.isfinite(w)):
            raise ConvertError(f"tensor {name} has NaN or Inf values")
    return captured, names


def quantized_names(tensors: dict, hp: Hparams, embd_type: str) -> set[str]:
    out = set()
    for bid in range(hp.n_layer):
        for n in LINEARS:
            name = f"blk.{bid}.{n}.weight"
            if name in tensors and tensors[name].ndim == 2 and tensors[name].shape[1] % F.QK == 0:
                out.add(name)
    if embd_type.startswith("jlcm"):
        for name in ("token_embd.weight", "output.weight"):
            if name in tensors and tensors[name].shape[1] % F.QK == 0:
                out.add(name)
    return out


def convert(opt: Options) -> dict:
    """Entry point of the converter. Returns a summary (sizes, bits per weight, timing)."""
    from .calib import calibration_tokens, default_calibration_text, hessian_diagonals
    from .fold import fold_global, fold_layer
    from .init import init_codebooks
    from .pack import quantize_to_codebooks
    from .write import write_gguf

    t0 = time.time()
    config = check_input(opt.model)
    if opt.bits not in F.TYPE_IDS:
        raise ConvertError(f"--bits must be one of {sorted(F.TYPE_IDS)}")
    if opt.threads:
        import torch
        torch.set_num_threads(opt.threads)
    hp = hparams_of(config)
    conversion = import_conversion()
    import gguf
    import torch

    arch = conversion.get_model_architecture(config, conversion.ModelType.TEXT)
    model_class = conversion.get_model_class(arch)
    opt.outfile.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = opt.outfile.with_name(opt.outfile.name + f".tmp{os.getpid()}")
    with torch.inference_mode():
        instance = model_class(opt.model, gguf.LlamaFileType.ALL_F32, tmp_out, eager=True)
        log.info("reading %s", opt.model)
        tensors, order = float_tensors(instance)

    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(opt.model))
    except Exception as e:  # noqa: BLE001 - any failure here is a bad tokenizer
        raise ConvertError(f"cannot load the tokenizer of {opt.model}: {e}")
    calib = opt.calib or default_calibration_text()
    tokens = calibration_tokens(calib, tokenizer, opt.nsamples, opt.seqlen, opt.seed)
    hessians = hessian_diagonals(tensors, hp, tokens)

    quantized = quantized_names(tensors, hp, opt.embd_type)
    jlcm: dict[str, dict] = {}
    from tqdm import tqdm
    for bid in tqdm(range(hp.n_layer), desc="JLCM layers", unit="layer"):
        res = fold_layer(tensors, hessians, bid, hp, opt.groups, opt.seed + bid, quantized)
        tensors.update(res.tensors)
        hessians.update(res.hessians)
        for name, ro in res.orders.items():
            h = res.hessians.get(name.removesuffix(".weight"))
            w = res.tensors[name]
            cb = init_codebooks(w, h, ro.bounds, opt.bits, opt.variant, opt.seed)
            packed = quantize_to_codebooks(w, opt.bits, cb, ro.bounds, h)
            jlcm[name] = dict(packed=packed, bits=opt.bits, codebooks=cb, bounds=ro.bounds,
                              perm=ro.order if ro.stored else None)
    embd_bits = int(opt.embd_type[4:]) if opt.embd_type.startswith("jlcm") else None
    for name in ("token_embd.weight", "output.weight"):
        if name in quantized:
            ro = fold_global(tensors, hessians, name, opt.groups, opt.seed)
            w = tensors[name][ro.order]
            h = hessians.get("output")
            cb = init_codebooks(w, h, ro.bounds, embd_bits, opt.variant, opt.seed)
            jlcm[name] = dict(packed=quantize_to_codebooks(w, embd_bits, cb, ro.bounds, h), bits=embd_bits,
                              codebooks=cb, bounds=ro.bounds, perm=ro.order)

    instance.ftype = gguf.LlamaFileType(F.FTYPE_IDS[opt.bits])
    summary = write_gguf(instance, order, tensors, jlcm, opt, tmp_out)
    summary["seconds"] = time.time() - t0
    return summary
