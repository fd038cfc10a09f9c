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

    def __init__(self, msg: str, limit: int = 400):
        one_line = " ".join(str(msg).split())
        super().__init__("error: " + (one_line if len(one_line) <= limit else one_line[:limit - 3] + "..."))


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
    seqlen: int = 256
    seed: int = 0
    threads: int = 0
    learn_steps: int = 0       # 0: k-means codebooks only (--no-learn)
    plain_ste: bool = False
    resume: bool = False       # continue an interrupted conversion from its last finished block


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
    # its per-tensor lines would say "--> F32" for what JLCM quantizes next; ours say what is written
    upstream_log = logging.getLogger("hf-to-gguf")
    level = upstream_log.level
    if not log.isEnabledFor(logging.DEBUG):
        upstream_log.setLevel(logging.WARNING)
    try:
        model_instance.prepare_tensors()
    finally:
        writer.add_tensor = original
        upstream_log.setLevel(level)
    for name, w in captured.items():
        if not np.all(np.isfinite(w)):
            raise ConvertError(f"tensor {name} has NaN or Inf values")
    return captured, names


def check_shapes(tensors: dict, hp: Hparams) -> None:
    """Every weight the graph uses has the shape config.json implies (GGUF order: [rows, columns])."""
    kv = hp.n_head_kv * hp.head_dim
    expected = {"token_embd.weight": (None, hp.n_embd), "output.weight": (None, hp.n_embd),
                "output_norm.weight": (hp.n_embd,)}
    for bid in range(hp.n_layer):
        p = f"blk.{bid}."
        expected.update({p + "attn_norm.weight": (hp.n_embd,), p + "ffn_norm.weight": (hp.n_embd,),
                         p + "attn_q.weight": (hp.n_head * hp.head_dim, hp.n_embd), p + "attn_k.weight": (kv, hp.n_embd),
                         p + "attn_v.weight": (kv, hp.n_embd), p + "attn_output.weight": (hp.n_embd, hp.n_head * hp.head_dim),
                         p + "ffn_gate.weight": (hp.n_ff, hp.n_embd), p + "ffn_up.weight": (hp.n_ff, hp.n_embd),
                         p + "ffn_down.weight": (hp.n_embd, hp.n_ff)})
    for name, shape in expected.items():
        if name not in tensors:
            if name != "output.weight":  # tied embeddings have no output
                raise ConvertError(f"the checkpoint has no tensor for {name} (config.json has {hp.n_layer} layers)")
            continue
        got = tensors[name].shape
        if len(got) != len(shape) or any(e is not None and e != g for e, g in zip(shape, got)):
            want = "x".join("*" if e is None else str(e) for e in shape)
            raise ConvertError(f"shape mismatch: {name} is {'x'.join(map(str, got))}, config.json implies {want}")


def quantized_names(tensors: dict, hp: Hparams, embd_type: str) -> set[str]:
    """The matrices JLCM stores; a width its 64-weight block does not divide falls back, with a notice."""
    candidates = [f"blk.{bid}.{n}.weight" for bid in range(hp.n_layer) for n in LINEARS]
    if embd_type.startswith("jlcm"):
        candidates += ["token_embd.weight", "output.weight"]
    out = set()
    for name in candidates:
        if name not in tensors or tensors[name].ndim != 2:
            continue
        if tensors[name].shape[1] % F.QK:
            log.warning("notice: %s has width %d, not a multiple of %d: stored in a standard type instead of JLCM",
                        name, tensors[name].shape[1], F.QK)
            continue
        out.add(name)
    return out


def convert(opt: Options) -> dict:
    """Entry point of the converter. Returns a summary (sizes, bits per weight, timing)."""
    from .calib import calibration_tokens, default_calibration_text
    from .checkpoint import Checkpoint, fingerprint
    from .fold import fold_global
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
    check_shapes(tensors, hp)

    from transformers import AutoTokenizer
    tok_json = opt.model / "tokenizer.json"
    if tok_json.is_file():
        try:
            json.loads(tok_json.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConvertError(f"cannot load the tokenizer of {opt.model}: {tok_json.name} is not readable JSON ({e})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(opt.model))
    except Exception as e:  # noqa: BLE001 - any failure here is a bad tokenizer
        raise ConvertError(f"cannot load the tokenizer of {opt.model}: {e}")
    calib = opt.calib or default_calibration_text()
    tokens = calibration_tokens(calib, tokenizer, opt.nsamples, opt.seqlen, opt.seed)

    ckpt = Checkpoint(opt.outfile, fingerprint(opt, tokens))
    found = ckpt.found()
    if found and not opt.resume:
        raise ConvertError(f"{ckpt.dir} holds an interrupted conversion ({found[0]} of {hp.n_layer} blocks done): "
                           "pass --resume to continue it, or delete that folder")
    if found and not found[1]:
        raise ConvertError(f"{ckpt.dir} is the checkpoint of a conversion with other options or input: "
                           "resume with the same ones, or delete that folder")

    quantized = quantized_names(tensors, hp, opt.embd_type)
    jlcm, hessians = quantize_blocks(tensors, hp, tokens, quantized, opt, ckpt)
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
    ckpt.remove()
    summary["seconds"] = time.time() - t0
    return summary


def quantize_blocks(tensors: dict, hp: Hparams, tokens: np.ndarray, quantized: set[str],
                    opt: Options, ckpt=None) -> tuple[dict, dict]:
    """Block by block: input statistics from the quantized model's own activations (errors of earlier
    blocks included), group/fold, init, optional learning against the float block's output, pack.
    Updates `tensors` with folded neighbours; returns the JLCM specs and the input Hessian diagonals
    ('output': the head's input). With a checkpoint, each finished block is saved and a resumed run
    starts after the last one saved."""
    import torch
    from tqdm import tqdm

    from . import model as M
    from .fold import fold_layer
    from .init import init_codebooks
    from .learn import finalize, learn_block, make_param
    from .pack import assign, dequantize, pack_blocks

    jlcm: dict = {}
    hessians: dict = {}
    start = 0
    if ckpt is not None and ckpt.found():
        start, x_q, x_f = ckpt.restore(jlcm, tensors)
        x_f = x_f if x_f is not None else x_q
        log.info("resuming after block %d of %d from %s", start, hp.n_layer, ckpt.dir)
    else:
        with torch.inference_mode():
            x_q = [M.embed(s, tensors) for s in tokens]
        x_f = list(x_q)
    bar = tqdm(range(start, hp.n_layer), total=hp.n_layer, initial=start, desc="JLCM layers", unit="layer")
    for bid in bar:
        sums: dict[str, torch.Tensor] = {}

        def observe(name, x):
            s = x.double().pow(2).sum(0)
            sums[name] = sums[name] + s if name in sums else s

        with torch.inference_mode():
            for x in x_q:
                M.block_forward(x, tensors, bid, hp, observe)
            y_f = [M.block_forward(x, tensors, bid, hp) for x in x_f] if opt.learn_steps else None
        count = sum(len(x) for x in x_q)
        hessians.update({k: (v / count).numpy() for k, v in sums.items()})

        res = fold_layer(tensors, hessians, bid, hp, opt.groups, opt.seed + bid, quantized)
        # what a resumed run needs besides the packed weights: unquantized tensors the folds changed
        folded = {k: v for k, v in res.tensors.items() if v is not tensors.get(k) and k not in res.orders}
        tensors.update(res.tensors)
        hessians.update(res.hessians)
        specs = {}
        for name, ro in res.orders.items():
            h = hessians.get(name.removesuffix(".weight"))
            w = tensors[name]
            cb = init_codebooks(w, h, ro.bounds, opt.bits, opt.variant, opt.seed)
            idx, d = assign(w, opt.bits, cb, ro.bounds, h)
            specs[name] = dict(idx=idx, d=d, cb=cb, ro=ro)

        if opt.learn_steps:
            params = {n: make_param(n, s["idx"], s["d"], s["cb"], s["ro"].bounds) for n, s in specs.items()}
            inverse = {n: torch.as_tensor(np.argsort(s["ro"].order)) for n, s in specs.items() if s["ro"].stored}
            base = {k: v for k, v in tensors.items() if k.startswith(f"blk.{bid}.")}

            def block_fn(weights, x, base=base, inverse=inverse, bid=bid):
                t = dict(base)
                for n, w in weights.items():
                    t[n] = w[inverse[n]] if n in inverse else w  # stored rows back to the logical order
                return M.block_forward(x, t, bid, hp)

            x_in = torch.stack(x_q)
            y_t = torch.stack(y_f)
            norm = y_t.pow(2).mean()

            def block_loss(params=params, block_fn=block_fn, x_in=x_in, y_t=y_t, norm=norm) -> float:
                with torch.no_grad():
                    ws = {n: p.weight() for n, p in params.items()}
                    return float(sum((block_fn(ws, x) - y).pow(2).mean() for x, y in zip(x_in, y_t)) / len(x_in) / norm)

            before = block_loss()
            learn_block(block_fn, list(params.values()), x_in, y_t, opt.learn_steps, seed=opt.seed + bid,
                        plain_ste=opt.plain_ste)
            after = block_loss()
            bar.set_postfix(loss=f"{before:.4f}->{after:.4f}")
            if after < before:  # learning is kept only where it lowered the loss on all calibration windows
                for n, p in params.items():
                    specs[n]["idx"], specs[n]["d"], specs[n]["cb"] = finalize(p)

        logical = {}
        for name, s in specs.items():
            ro = s["ro"]
            packed = pack_blocks(s["idx"], s["d"], opt.bits)
            jlcm[name] = dict(packed=packed, bits=opt.bits, codebooks=s["cb"], bounds=ro.bounds,
                              perm=ro.order if ro.stored else None)
            wq = dequantize(packed, opt.bits, tensors[name].shape[1], s["cb"], ro.bounds)
            if ro.stored:
                wq = wq[np.argsort(ro.order)]
            logical[name] = wq
        qt = dict(tensors)
        qt.update(logical)
        with torch.inference_mode():
            x_q = [M.block_forward(x, qt, bid, hp) for x in x_q]
        x_f = y_f if y_f is not None else x_q
        if ckpt is not None:
            ckpt.save(bid, {n: jlcm[n] for n in specs}, folded, x_q, y_f)
    with torch.inference_mode():
        for x in x_q:
            s = M.rms_norm(x, M.t(tensors["output_norm.weight"]), hp.rms_eps).double().pow(2).sum(0)
            hessians["output"] = hessians["output"] + s if "output" in hessians else s
    hessians["output"] = (hessians["output"] / sum(len(x) for x in x_q)).numpy()
    return jlcm, hessians
