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

from . import distributed as D
from . import format as F
from .blocks import plan_gptq_kinds
from .model import LINEARS, Hparams
from .source import DEFAULT_CACHE_BYTES

log = logging.getLogger("jlcm-convert")

# config.json's architecture -> whether RoPE rotates halves (NeoX) rather than interleaved pairs. The vendored
# llama.cpp converter writes them as its llama, qwen2 and qwen3 architectures; model.py computes all of them.
SUPPORTED_ARCHS = {"LlamaForCausalLM": False, "MistralForCausalLM": False, "Qwen2ForCausalLM": True,
                   "Qwen3ForCausalLM": True, "Gemma3ForCausalLM": True}
GEMMA3_SWA_PATTERN = 6  # llama.cpp's gemma3: every 6th layer global, the others a sliding window (load_swa_pattern)
ROPE_SCALINGS = ("linear", "yarn", "llama3")  # what llama.cpp applies for these architectures (model.rope_angles)


class ConvertError(SystemExit):
    """One clear message, exit status 1."""

    def __init__(self, msg: str, limit: int = 400):
        one_line = " ".join(str(msg).split())
        super().__init__("error: " + (one_line if len(one_line) <= limit else one_line[:limit - 3] + "..."))


AUTO_TUNE_STEPS = 64
LAYER_ROUNDS = 2  # layer-wise learning rounds by default (learn.learn_layer; measured with the mix calibration text and tuning in docs/ALGORITHM.md)
AUTO_TUNE_PARAMS = (100e6, 1e9)  # --tune-steps auto tunes models of this many parameters (2-core CPU time)


def auto_tune_steps(tensors: dict, windows: int) -> int:
    """--tune-steps auto: AUTO_TUNE_STEPS for models of 0.1-1B parameters with at least 16 calibration windows
    (some are held out), else 0: a larger model's steps take proportionally longer on a CPU, and a test-sized
    model or calibration set does not need them."""
    n = sum(int(np.prod(np.shape(v))) for v in tensors.values())
    steps = AUTO_TUNE_STEPS if AUTO_TUNE_PARAMS[0] <= n <= AUTO_TUNE_PARAMS[1] and windows >= 16 else 0
    log.info("end-to-end tuning: %s (--tune-steps auto: %.2fB parameters, %d calibration windows%s)",
             f"{steps} steps" if steps else "off", n / 1e9, windows, "" if steps else "; pass --tune-steps N to tune")
    return steps


@dataclass
class Options:
    model: Path
    outfile: Path
    bits: int = 2
    groups: int = 16
    variant: str = "codebooks"
    embd_type: str = "jlcm4"
    imatrix_file: Path | None = None  # --imatrix: a llama-imatrix file as the calibration importance (imatrix.py)
    imatrix: dict | None = None       # ... as read by convert(): h per input-statistics key
    calib: str | Path | None = None  # a named text (calib.CALIBRATION_TEXTS), a file, or None: the default
    nsamples: int = 32
    seqlen: int = 256
    seed: int = 0
    threads: int = 0
    device: str = "cpu"        # --device: where the torch steps compute (distributed.select_device)
    learn_steps: int = 0       # 0: k-means codebooks only (--no-learn)
    rounding: str = "auto"     # layer weights onto codebooks: "gptq" (full input Hessian, gptq.py), "nearest", or
                               # "auto": gptq up to 3 bits, nearest at 4 (docs/measurements/results-gptq.md)
    tune_steps: int = 0        # end-to-end tuning steps after the block-wise pass (tune.py), 0: none, -1: auto_tune_steps
    layer_rounds: int = LAYER_ROUNDS  # rounds of layer-wise learning after GPTQ rounding (learn.learn_layer), 0: none
    learn_mappings: str = "proximal"  # how learning updates the indices: "proximal", "plain", "off" (learn.py)
    tune_mappings: str = "off"        # the same for end-to-end tuning (tune.py)
    tune_chat: float = 0.0            # fraction of tuning's windows formatted as conversations (chat template)
    tune_confidence: float = 2.0      # tuning's proximal moves need a gradient this many standard errors from 0
    report: Path | None = None  # --report: per-block learning figures as JSON
    learn_loss: str = "residual"  # the block output's error as is, or "normed": as the next RMSNorm passes it on
    resume: bool = False       # continue an interrupted conversion from its last finished block
    target_bytes: int = 0      # --target-size: the file fits in this many bytes (a per-tensor plan, plan.py)
    target_bpw: float = 0.0    # --target-bpw: the same, as bits per weight of the whole file
    plan: Path | None = None   # --plan: kinds from a JSON plan or a JLCM GGUF's metadata
    save_plan: Path | None = None
    rotate: bool = False       # --rotate: randomized Hadamard rotation of the residual stream (rotate.py)
    plan_error: str = "nearest"  # or "rounding": the plan compares kinds as --rounding rounds them (plan.py)
    fast: bool = False         # --fast: float16 weights in memory, one k-means pass, plan with the Fisher estimate of the KL
    kquants: bool = False      # --kquants: a plan may also use llama.cpp's Q2_K ... Q6_K (plan.KQUANT_CHOICES)
    embd_pinned: bool = False  # --embd-type given with a size budget or plan: the embeddings keep that type
    kinds: dict | None = None  # set by convert: each weight matrix's kind, how it is stored (plan.KINDS)
    token_embd_type: str | None = None  # --token-embedding-type: token_embd's type (None: embd_type), kept by a plan
    output_type: str | None = None      # --output-tensor-type: output's type (None: embd_type), kept by a plan;
                                        # refused for a model whose head is token_embd (tied)
    tensor_types: tuple = ()   # --tensor-type: (regex, type) pairs; a weight matrix whose GGUF name a regex
                               # matches (re.search, the first such pair) takes that type (tensor_overrides)
    dry_run: bool = False      # --dry-run: resolve every type (plan included), predict the file's bytes, write nothing
    cache_bytes: int = DEFAULT_CACHE_BYTES  # --cache-mb: decoded float weights kept in memory (source.py); the rest is re-read


EMBEDDINGS = ("token_embd.weight", "output.weight")
# the types a weight matrix can be given by hand: --tensor-type, --token-embedding-type, --output-tensor-type
TENSOR_TYPES = ("jlcm2", "jlcm3", "jlcm4", "q8_0", "q5_0", "q4_0", "f16", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


def embedding_type(opt: Options, name: str) -> str:
    """The type asked for token_embd or output: its own option, else --embd-type (default jlcm4)."""
    own = opt.token_embd_type if name == "token_embd.weight" else opt.output_type
    return own or opt.embd_type


def embedding_pinned(opt: Options, name: str) -> bool:
    """Whether a plan keeps token_embd's or output's type as asked (--embd-type or the tensor's own option)."""
    own = opt.token_embd_type if name == "token_embd.weight" else opt.output_type
    return own is not None or opt.embd_pinned


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
    check_function(config)
    return config


def rope_parameters(config: dict) -> tuple[dict, str]:
    """config.json's RoPE scaling as the vendored converter reads it (rope_parameters, else rope_scaling; `type` is
    the older name of `rope_type`), and its kind in lower case ("default" when there is none)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params = params.get("full_attention", params)
    return params, str(params.get("rope_type", params.get("type", "default"))).lower()


def check_function(config: dict) -> None:
    """Every detail of config.json that changes what the network computes is either one model.py computes as
    llama.cpp does, or refused here with one message: the activation, RoPE scaling, a partial rotary dimension.
    Biases, q/k norms, tied heads and Llama 3's frequency factors arrive as tensors (model.py uses them). Gemma 3's
    sliding window is computed (gemma3_hparams); llama.cpp applies none to the other architectures (its converter
    does not write one), so their files compute full attention like llama.cpp's own conversion: noted, not refused."""
    arch = config["architectures"][0]
    if arch == "Gemma3ForCausalLM":
        act = config.get("hidden_activation", config.get("hidden_act", "gelu_pytorch_tanh"))
        if act != "gelu_pytorch_tanh":
            raise ConvertError(f"{arch} with hidden_activation {act!r}: llama.cpp computes gelu_pytorch_tanh")
        if config.get("attn_logit_softcapping"):
            raise ConvertError(f"{arch} with attn_logit_softcapping: llama.cpp's gemma3 does not apply it")
        types = config.get("layer_types")
        if types and any((t == "sliding_attention") != (i % GEMMA3_SWA_PATTERN < GEMMA3_SWA_PATTERN - 1)
                         for i, t in enumerate(types)):
            raise ConvertError(f"{arch} whose layer_types are not every {GEMMA3_SWA_PATTERN}th layer global: "
                               "llama.cpp's gemma3 assumes that pattern")
    else:
        act = config.get("hidden_act", config.get("hidden_activation", "silu"))
        if act != "silu":
            raise ConvertError(f"{arch} with hidden_act {act!r}: the converter computes SwiGLU with silu only")
    rope, kind = rope_parameters(config)
    if kind not in ("default", *ROPE_SCALINGS):
        raise ConvertError(f"{arch} with RoPE scaling {kind!r}: supported are {', '.join(ROPE_SCALINGS)} "
                           f"(and none)")
    if kind in ("linear", "yarn") and not rope.get("factor"):
        raise ConvertError(f"RoPE scaling {kind!r} without a factor in config.json")
    if kind == "yarn" and not rope.get("original_max_position_embeddings"):
        raise ConvertError("RoPE scaling 'yarn' without original_max_position_embeddings in config.json")
    if float(config.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise ConvertError(f"{arch} with partial_rotary_factor {config.get('partial_rotary_factor')}: "
                           "RoPE over part of each head is not supported")
    window = config.get("sliding_window")
    if window and arch != "Gemma3ForCausalLM" and config.get("use_sliding_window", arch == "MistralForCausalLM"):
        log.warning("notice: config.json has a sliding window of %d tokens; llama.cpp runs %s with full attention "
                    "(as its own converter's files), and so does calibration", window, arch)


def hparams_of(config: dict) -> Hparams:
    n_head = config["num_attention_heads"]
    rope, kind = rope_parameters(config)
    return Hparams(
        n_layer=config["num_hidden_layers"], n_embd=config["hidden_size"], n_head=n_head,
        n_head_kv=config.get("num_key_value_heads") or n_head, n_ff=config["intermediate_size"],
        rms_eps=config.get("rms_norm_eps", 1e-6), rope_base=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        rope_neox=SUPPORTED_ARCHS[config["architectures"][0]], head_dim=config.get("head_dim") or 0,
        rope_scaling=kind if kind in ("linear", "yarn") else "none", rope_factor=float(rope.get("factor") or 1.0),
        rope_ctx_orig=int(rope.get("original_max_position_embeddings") or 0), **gemma3_hparams(config))


def gemma3_hparams(config: dict) -> dict:
    """Gemma 3 as llama.cpp's gemma3 graph computes it: GELU gate, embeddings times sqrt(n_embd), attention
    scale 1/sqrt(head_dim) (the 27B's 62 layers: 1/sqrt(n_embd/n_head)), 5 of 6 layers with a sliding window
    and their own RoPE base, optional final logit soft-capping. (Post-norms and q/k norms are tensors.)"""
    if config["architectures"][0] != "Gemma3ForCausalLM":
        return {}
    n_embd, n_head, n_layer = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    window = config.get("sliding_window") or 0
    return dict(ffn_act="gelu", embd_scale=float(np.sqrt(np.float32(n_embd))),
                attn_scale=float(1 / np.sqrt(n_embd / n_head)) if n_layer == 62 else 0.0,
                swa_window=window if config.get("sliding_window_pattern") != 1 else 0,
                swa_pattern=GEMMA3_SWA_PATTERN, rope_base_swa=float(config.get("rope_local_base_freq", 10000.0)),
                final_softcap=float(config.get("final_logit_softcapping") or 0.0))


def float_tensors(model_instance, half: bool = False, cache_bytes: int = DEFAULT_CACHE_BYTES) -> tuple[dict, list]:
    """Runs the vendored converter's tensor pass with F32 output and captures what it would write.
    half: matrices are kept as float16 where their values fit (--fast; every step computes in float32 from them).
    An instance made with eager=False (its lazy mode) gives each tensor as a source.LazyArray, decoded from the
    checkpoint when used and cached up to cache_bytes: the model is streamed."""
    from gguf import LazyNumpyTensor

    from .source import DecodedCache, LazyArray, as_float, lazy_tensor
    cache = DecodedCache(cache_bytes)
    captured: dict = {}
    names: list[str] = []

    def capture(name, tensor, raw_shape=None, raw_dtype=None, tensor_endianess=None):
        if isinstance(tensor, LazyNumpyTensor) and getattr(model_instance, "lazy", False):
            captured[name] = lazy_tensor(tensor, half, cache)
        else:
            arr = LazyNumpyTensor.to_eager(tensor) if isinstance(tensor, LazyNumpyTensor) else tensor
            captured[name] = as_float(np.asarray(arr, dtype=np.float32), half)
        names.append(name)

    writer = model_instance.gguf_writer
    writer.add_tensor = capture  # an instance attribute shadowing the method until the finally below
    # its per-tensor lines would say "--> F32" for what JLCM quantizes next; ours say what is written
    upstream_log = logging.getLogger("hf-to-gguf")
    level = upstream_log.level
    if not log.isEnabledFor(logging.DEBUG):
        upstream_log.setLevel(logging.WARNING)
    try:
        model_instance.prepare_tensors()
    finally:
        del writer.add_tensor
        upstream_log.setLevel(level)
    for name, w in captured.items():  # a streamed tensor is read once here, and not kept
        if not np.all(np.isfinite(w._load() if isinstance(w, LazyArray) else w)):
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


def weight_matrices(tensors: dict, hp: Hparams) -> list[str]:
    """The matrices whose type the converter chooses (layer linears, token_embd, an untied output), in order."""
    names = [f"blk.{bid}.{n}.weight" for bid in range(hp.n_layer) for n in LINEARS] + list(EMBEDDINGS)
    return [n for n in names if n in tensors and np.ndim(tensors[n]) == 2]


def quantized_names(tensors: dict, hp: Hparams, embd_type: str, output_type: str | None = None) -> set[str]:
    """The matrices JLCM stores (token_embd if embd_type is JLCM, output if output_type, default embd_type, is);
    a width its 64-weight block does not divide falls back, with a notice."""
    candidates = [f"blk.{bid}.{n}.weight" for bid in range(hp.n_layer) for n in LINEARS]
    if embd_type.startswith("jlcm"):
        candidates += ["token_embd.weight"]
    if (output_type or embd_type).startswith("jlcm"):
        candidates += ["output.weight"]
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
    from .calib import calibration_tokens, chat_calibration_tokens, resolve_calibration
    from .blocks import quantize_blocks, quantize_embeddings
    from .checkpoint import Checkpoint, fingerprint
    from .report import layer_learning_totals, learning_totals, write_report
    from .write import write_gguf

    from .source import return_freed_memory
    t0 = time.time()
    D.setup()  # several processes under torchrun (distributed.py)
    config = check_input(opt.model)
    if return_freed_memory(sum(f.stat().st_size for f in opt.model.glob("*.safetensors"))):
        log.info("large checkpoint: arrays over 1 MiB are mapped apart, so that freed memory returns to the system")
    if opt.bits not in F.TYPE_IDS:
        raise ConvertError(f"--bits must be one of {sorted(F.TYPE_IDS)}")
    if opt.threads:
        import torch
        torch.set_num_threads(opt.threads)
    try:
        dev = D.select_device(opt.device)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    if dev.type != "cpu":
        log.info("computing on %s", dev)
    hp = hparams_of(config)
    conversion = import_conversion()
    import gguf
    import torch

    arch = conversion.get_model_architecture(config, conversion.ModelType.TEXT)
    model_class = conversion.get_model_class(arch)
    if not opt.dry_run:
        opt.outfile.parent.mkdir(parents=True, exist_ok=True)
        from .checkpoint import folder, interrupted
        left = D.broadcast(interrupted(opt.outfile, hp.n_layer))  # (process 0's look: the others start apart)
        if left and not opt.resume:  # now, not after hours of planning
            raise ConvertError(f"{folder(opt.outfile)} holds an interrupted conversion ({left}): "
                               "pass --resume to continue it, or delete that folder")
    tmp_out = opt.outfile.with_name(opt.outfile.name + f".tmp{os.getpid()}")
    with torch.inference_mode():
        # lazy: each tensor is read from the checkpoint when a step uses it (source.py)
        instance = model_class(opt.model, gguf.LlamaFileType.ALL_F32, tmp_out, eager=False)
        log.info("reading %s", opt.model)
        tensors, order = float_tensors(instance, half=opt.fast, cache_bytes=opt.cache_bytes)
    check_shapes(tensors, hp)
    if opt.rotate and any(n.endswith("post_attention_norm.weight") for n in tensors):
        raise ConvertError("--rotate cannot be used with this architecture: its normalised block outputs "
                           "(post-norms) do not commute with a rotation of the residual stream")
    if opt.rotate:
        from .rotate import rotate
        tensors, order = rotate(tensors, order, hp, opt.seed)
    overrides = tensor_overrides(tensors, hp, opt)  # before calibration: a bad pattern or type fails at once
    if opt.imatrix_file:
        if opt.rotate:
            raise ConvertError("--imatrix cannot be combined with --rotate: the imatrix measures the unrotated inputs")
        from .imatrix import read_imatrix
        opt.imatrix = read_imatrix(opt.imatrix_file, tensors)
        log.info("importance of %d matrices' inputs from %s", len(opt.imatrix), opt.imatrix_file)

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
    calib = resolve_calibration(opt.calib)
    if not calib.is_file():
        raise ConvertError(f"calibration text {calib}: no such file (or name one of mix, kjv, brown)")
    if opt.tune_steps < 0:
        opt.tune_steps = auto_tune_steps(tensors, opt.nsamples)
    # tuning sees fresh windows at every step (repeating a few windows overfits the mappings); the block-wise pass
    # takes the first nsamples of the same draw
    from .tune import windows_needed
    n_tune = windows_needed(opt.tune_steps)
    chat = chat_calibration_tokens(calib, tokenizer, round(opt.tune_chat * n_tune), opt.seqlen, opt.seed) \
        if n_tune and opt.tune_chat > 0 else None
    n_chat = 0 if chat is None else len(chat)
    all_tokens = calibration_tokens(calib, tokenizer, max(opt.nsamples, n_tune - n_chat), opt.seqlen, opt.seed)
    tokens = all_tokens[:opt.nsamples]
    problem = D.check_windows(len(tokens))
    if problem is None and D.size() > 1 and opt.tune_steps and opt.tune_mappings == "proximal":
        problem = "--tune-mappings proximal runs in one process only (its trial steps are not shared yet)"
    if problem:
        raise ConvertError(problem)
    tune_tokens = all_tokens
    if chat is not None:   # plain and chat-formatted windows in a seeded order (the last few are held out)
        tune_tokens = np.concatenate([all_tokens[:n_tune - n_chat], chat])
        tune_tokens = tune_tokens[np.random.default_rng(opt.seed).permutation(len(tune_tokens))]

    # process 0's plan in every process: scores computed apart may differ in their last bits on a GPU
    opt.kinds = D.broadcast(plan_kinds(instance, order, tensors, hp, tokens, opt, overrides))
    if opt.dry_run:
        return dry_run_summary(instance, order, tensors, hp, opt, t0)
    from .write import check_free_space  # now rather than after hours
    check_free_space(opt.outfile.parent, jlcm_shapes(tensors, hp, opt, opt.kinds), tensors, order)
    quantized = {n for n, k in opt.kinds.items() if k.startswith("jlcm")}
    ckpt = Checkpoint(opt.outfile, fingerprint(opt, tokens))
    found = ckpt.found()
    if found and not found[1]:
        raise ConvertError(f"{ckpt.dir} is the checkpoint of a conversion with other options or input: "
                           "resume with the same ones, or delete that folder")

    learned: list = []
    jlcm, standard, hessians, head_H = quantize_blocks(tensors, hp, tokens, quantized, opt, ckpt, learned)
    quantize_embeddings(tensors, hessians, head_H, quantized, opt, jlcm)

    tuning = None
    if opt.tune_steps and jlcm:
        from .tune import tune_end_to_end
        ckpt.dir.mkdir(exist_ok=True)
        tuning = tune_end_to_end(tensors, jlcm, standard, opt.kinds, hp, tune_tokens, opt.tune_steps, seed=opt.seed,
                                 mappings=opt.tune_mappings, confidence=opt.tune_confidence,
                                 checkpoint=ckpt.dir / "tune.pt",
                                 key=f"{ckpt.key}:{opt.tune_steps}:{opt.tune_mappings}:{opt.tune_confidence}:{opt.tune_chat}")

    instance.ftype = gguf.LlamaFileType(F.FTYPE_IDS[layer_bits(opt.kinds, tensors, opt.bits)])
    summary = None
    if D.is_main():  # every process holds the same model: one writes it
        summary = write_gguf(instance, order, tensors, jlcm, opt, tmp_out, standard, hessians)
        ckpt.remove()
    summary = D.broadcast(summary)
    summary["seconds"] = time.time() - t0
    summary["kinds"] = dict(opt.kinds)
    if any("layer" in b for b in learned):
        summary["layer_learning"] = layer_learning_totals(learned)
    if any("loss_before" in b for b in learned):
        summary["learning"] = learning_totals(learned)
    if tuning:
        summary["tuning"] = tuning
    if opt.report and D.is_main():
        write_report(opt, summary, learned)
    return summary



def dry_run_summary(instance, order: list[str], tensors: dict, hp: Hparams, opt: Options, t0: float) -> dict:
    """--dry-run: what the conversion would write, from the resolved types alone (nothing is quantized): every
    weight matrix's type and bytes (JLCM companions included) and the file's exact size (write.predict_layout,
    the computation a budget is held to)."""
    from .write import predict_layout
    instance.ftype = gguf_file_type(opt.kinds, tensors, opt.bits)
    size, layout = predict_layout(instance, order, tensors, jlcm_shapes(tensors, hp, opt, opt.kinds), opt,
                                  opt.kinds)
    n_weights = sum(tensors[n].size for n in order)
    rows = [dict(name=n, shape=list(tensors[n].shape[::-1]), type=layout[n][0], bytes=layout[n][1])
            for n in order if n in layout and np.ndim(tensors[n]) == 2]
    return {"dry_run": True, "file": str(opt.outfile), "bytes": size, "weights": n_weights,
            "bpw": 8 * size / n_weights, "tensors": rows,
            "other_bytes": sum(b for n, (_, b) in layout.items() if np.ndim(tensors[n]) != 2),
            "target_bytes": opt.target_bytes, "kinds": dict(opt.kinds), "seconds": time.time() - t0}


def gguf_file_type(kinds: dict, tensors: dict, bits: int):
    """general.file_type: the JLCM width most layer weights have (layer_bits)."""
    import gguf
    return gguf.LlamaFileType(F.FTYPE_IDS[layer_bits(kinds, tensors, bits)])


def layer_bits(kinds: dict, tensors: dict, default: int) -> int:
    """The JLCM width most layer weights have (general.file_type of a mixed file)."""
    count: dict[int, int] = {}
    for n, k in kinds.items():
        if n.startswith("blk.") and k.startswith("jlcm"):
            count[int(k[4:])] = count.get(int(k[4:]), 0) + tensors[n].size
    return max(count, key=lambda b: (count[b], b)) if count else default


def storable(kind: str, cols: int) -> bool:
    """Whether a matrix `cols` wide can be stored as `kind` (JLCM: 64-weight blocks; llama.cpp types: theirs)."""
    from . import plan as P
    return cols % F.QK == 0 if kind.startswith("jlcm") else P.applicable(kind, cols)


def block_of(kind: str) -> int:
    """Weights per block of a type (a matrix's width must be a multiple of it)."""
    from . import plan as P
    return F.QK if kind.startswith("jlcm") else P.block_size(kind)[0]


def tensor_overrides(tensors: dict, hp: Hparams, opt: Options) -> dict[str, str]:
    """The types --tensor-type gives, by llama-quantize's rules: each pattern is a regular expression searched
    (re.search) in the weight matrices' GGUF names, the patterns are tried in the order given and the first
    that matches a matrix decides its type; token_embd and output keep a type --token-embedding-type,
    --output-tensor-type or --embd-type gives them. One clear error for an unknown type, a pattern that is not
    a regular expression or matches no weight matrix, a type the matrix's width does not allow, and for
    --output-tensor-type on a model whose head is token_embd itself (tied embeddings)."""
    import re

    if opt.output_type is not None and "output.weight" not in tensors:
        raise ConvertError(f"--output-tensor-type {opt.output_type}: this model ties its output to token_embd (there is "
                           f"no separate output tensor; the head reads token_embd), so the output's type is "
                           f"token_embd's: give --token-embedding-type instead")
    for name, own, flag in (("token_embd.weight", opt.token_embd_type, "--token-embedding-type"),
                            ("output.weight", opt.output_type, "--output-tensor-type")):
        kind = embedding_type(opt, name)
        if kind not in TENSOR_TYPES:
            raise ConvertError(f"the type {kind!r} of {name.removesuffix('.weight')} is not one of {', '.join(TENSOR_TYPES)}")
        # --embd-type falls back to Q8_0 where the width does not allow its type (docs/CONVERTER.md); the
        # per-tensor options are held to the type asked
        if own is not None and name in tensors and not storable(own, tensors[name].shape[1]):
            raise ConvertError(f"{flag} {own}: {name} is {tensors[name].shape[1]} wide, and {own} needs a width "
                               f"that is a multiple of {block_of(own)}")
    matrices = weight_matrices(tensors, hp)
    out: dict[str, str] = {}
    for pattern, kind in opt.tensor_types:
        what = f"--tensor-type {pattern}={kind}"
        if kind not in TENSOR_TYPES:
            raise ConvertError(f"{what}: unknown type {kind!r} (types: {', '.join(TENSOR_TYPES)})")
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ConvertError(f"{what}: {pattern!r} is not a regular expression: {e}")
        hits = [n for n in matrices if rx.search(n)]
        if not hits:
            raise ConvertError(f"{what}: the pattern matches no weight matrix of this model (they are "
                               f"blk.N.{{{','.join(LINEARS)}}}.weight for N = 0..{hp.n_layer - 1}, token_embd.weight"
                               + (", output.weight)" if "output.weight" in tensors else
                                  "; no output.weight: the model ties its output to token_embd)"))
        fresh = [n for n in hits if n not in out and not (n in EMBEDDINGS and embedding_pinned(opt, n))]
        if not fresh:
            log.warning("notice: %s decides no tensor: an earlier --tensor-type or an embedding type option "
                        "decides every tensor it matches", what)
        for n in fresh:
            cols = tensors[n].shape[1]
            if not storable(kind, cols):
                raise ConvertError(f"{what}: {n} is {cols} wide, and {kind} needs a width that is a multiple of "
                                   f"{block_of(kind)}")
            out[n] = kind
    if out:
        named = [f"{n} {k}" for n, k in out.items()]
        log.info("--tensor-type: %d weight matrices take a type by hand: %s%s", len(out), ", ".join(named[:8]),
                 f", ... ({len(named) - 8} more)" if len(named) > 8 else "")
    return out


def jlcm_shapes(tensors: dict, hp: Hparams, opt: Options, kinds: dict) -> dict:
    """shape_spec of every JLCM matrix in `kinds` with the groups and stored permutation the folds will give it."""
    from .fold import companion_layout
    from .write import shape_spec
    jl = {n for n, k in kinds.items() if k.startswith("jlcm")}
    return {n: shape_spec(*tensors[n].shape, int(kinds[n][4:]),
                          *companion_layout(n, tensors[n].shape[0], hp, opt.groups, jl)) for n in sorted(jl)}


def file_size(instance, order: list[str], tensors: dict, hp: Hparams, opt: Options, kinds: dict) -> int:
    """The exact size of the file the conversion writes with these types (write.predict_bytes)."""
    from .write import predict_bytes
    return predict_bytes(instance, order, tensors, jlcm_shapes(tensors, hp, opt, kinds), opt, kinds)


def scores_digest(opt: Options, tokens: np.ndarray) -> str:
    """What the plan's scores depend on besides the model: the calibration windows, the imatrix file and the
    quantizer's settings (a saved plan's scores are reused only where this matches)."""
    import hashlib
    h = hashlib.sha256(np.ascontiguousarray(tokens).tobytes())
    if opt.imatrix_file:
        h.update(Path(opt.imatrix_file).read_bytes())
    h.update(repr((opt.groups, opt.variant, opt.seed, opt.fast, opt.rotate, opt.plan_error)).encode())
    return h.hexdigest()[:16]


def plan_kinds(instance, order: list[str], tensors: dict, hp: Hparams, tokens: np.ndarray, opt: Options,
                overrides: dict | None = None) -> dict[str, str]:
    """How each weight matrix is stored (a plan.KINDS entry; matrices not named keep the standard rule of
    write.standard_type): JLCM at --bits for the layers and the embedding types for the embeddings, or a plan
    (--plan, or a search under --target-size / --target-bpw; plan.py) whose file size is computed exactly before
    any weight is quantized. `overrides` (tensor_overrides, --tensor-type) replace what either would give; under a
    budget they, like pinned embedding types, count in the size and the search fills the rest."""
    from . import plan as P
    from . import plan_scores as S

    if opt.target_bytes and opt.target_bpw:
        raise ConvertError("--target-size and --target-bpw are alternatives: give one")
    if overrides is None:
        overrides = tensor_overrides(tensors, hp, opt)
    if not (opt.target_bytes or opt.target_bpw or opt.plan):
        quantized = quantized_names(tensors, hp, embedding_type(opt, "token_embd.weight"),
                                    embedding_type(opt, "output.weight"))
        kinds = {n: f"jlcm{opt.bits}" if n.startswith("blk.") else embedding_type(opt, n) for n in quantized}
        return {**kinds, **overrides}
    candidates = quantized_names(tensors, hp, "jlcm4")
    pinned = {n: embedding_type(opt, n) for n in EMBEDDINGS if n in candidates and embedding_pinned(opt, n)}
    # --embd-type keeps its rule from before the per-tensor options: with a plan, only a type the plan can choose
    by_embd_type = [n for n in pinned if (opt.token_embd_type if n == "token_embd.weight" else opt.output_type) is None]
    if any(pinned[n] not in P.CHOICES for n in by_embd_type):
        raise ConvertError(f"with a size budget or plan, --embd-type must be one of {', '.join(P.CHOICES)}")
    embd_pins = dict(pinned)
    pinned.update(overrides)  # what the search does not choose: it counts in the size as fixed bytes

    def size_of(kinds: dict) -> int:
        return file_size(instance, order, tensors, hp, opt, kinds)

    n_weights = sum(tensors[n].size for n in order)
    target = opt.target_bytes or int(opt.target_bpw * n_weights / 8)
    opt.target_bytes = target
    options, fixed = None, 0
    try:
        choices = P.palette(opt.kquants)
        saved = P.load_options(opt.plan, plan_gptq_kinds(opt), scores_digest(opt, tokens)) if opt.plan and opt.plan.suffix == ".json" and target else {}
        if saved and set(saved) != candidates:
            raise P.PlanError(f"the scores saved in {opt.plan} are for another model")
        lacking = sorted({k for n in saved for k in choices if P.applicable(k, tensors[n].shape[1])}
                         - {o.kind for v in saved.values() for o in v})
        if lacking:
            raise P.PlanError(f"the scores saved in {opt.plan} have no {lacking[0]}: plan again with --save-plan")
        saved = {n: [o for o in v if o.kind in choices] for n, v in saved.items()}
        if opt.plan and not saved:
            kinds = {**P.load_plan(opt.plan), **embd_pins}
            if set(kinds) != candidates:
                extra, missing = sorted(set(kinds) - candidates), sorted(candidates - set(kinds))
                raise P.PlanError(f"the plan {opt.plan} does not fit this model: "
                                  + (f"it names {extra[0]}, which is not a weight matrix here" if extra
                                     else f"it has no type for {missing[0]}"))
            kinds.update(overrides)
        else:
            smallest = size_of({**{n: P.CHOICES[0] for n in candidates}, **pinned})
            if smallest > target:
                raise P.PlanError(f"the target of {target:,} bytes is too small: with every weight matrix at "
                                  f"JLCM {P.JLCM_BITS[0]}-bit" + (" (and the types given by hand)" if overrides else "")
                                  + f" the file takes {smallest:,}")
            if saved:  # a plan file with scores and a new budget: search again, no scoring
                options = saved
                log.info("plan: searching the scores saved in %s for the new budget", opt.plan)
            else:
                from .fold import companion_layout
                layout = {n: companion_layout(n, tensors[n].shape[0], hp, opt.groups, candidates)
                          for n in candidates}
                score_log = None
                if not opt.dry_run:  # scores measured so far, for --resume
                    from .checkpoint import ScoreLog, fingerprint
                    key = f"{fingerprint(opt, tokens)}:{scores_digest(opt, tokens)}:{choices}:{sorted(plan_gptq_kinds(opt))}"
                    score_log = ScoreLog(opt.outfile, key, D.rank())
                    if score_log.load()[1]:
                        raise P.PlanError(f"{score_log.dir} holds the plan scores of a conversion with other options "
                                          "or input: resume with the same ones, or delete that folder")
                options = S.score_options(tensors, hp, tokens, layout, opt.groups, opt.variant, opt.seed,
                                          fast=opt.fast, choices=choices, gptq_kinds=plan_gptq_kinds(opt),
                                          imatrix=opt.imatrix, score_log=score_log)
            # a pinned matrix keeps its one scored option; a type the search does not score (q4_0, f16, a K-quant
            # without --kquants) and the matrices outside the plan count as fixed bytes
            searched = {}
            for n, v in options.items():
                if n in pinned:
                    v = [o for o in v if o.kind == pinned[n]]
                    if not v:
                        continue
                searched[n] = v
            rest = {n: k for n, k in pinned.items() if n not in searched}
            first = {n: searched[n][-1].kind for n in searched}
            fixed = base_fixed = size_of({**rest, **first}) - P.plan_bytes(searched, first)
            kinds = {**rest, **P.search(searched, target - fixed)}
            # the options assume gate and up are both JLCM (then they fold their row order into down, else
            # each stores a permutation), and gguf-py's size label can change with the plan: where the file
            # comes out larger, search again with a margin that at least doubles until it fits
            while (over := size_of(kinds) - target) > 0:
                fixed += max(over, fixed - base_fixed)
                kinds = {**rest, **P.search(searched, target - fixed)}
    except P.PlanError as e:
        raise ConvertError(str(e))
    size = size_of(kinds)
    if target and size > target:
        raise ConvertError(f"the file would take {size:,} bytes, more than the target of {target:,}")
    for line in P.describe(kinds):
        log.info("plan  %s", line)
    count = {k: sum(tensors[n].size for n in kinds if kinds[n] == k) for k in P.KINDS}
    total = max(sum(count.values()), 1)
    log.info("plan: %s; the file will take %s bytes%s",
             ", ".join(f"{100 * c / total:.0f}% of the matrices' weights as {k}" for k, c in count.items() if c),
             f"{size:,}", f" (target {target:,})" if target else "")
    if opt.save_plan and D.is_main():  # (with several processes, process 0's)
        P.save_plan(opt.save_plan, kinds, {"target_bytes": target, "predicted_bytes": size,
                                           "planned_budget": target - fixed if options else None}, options,
                    plan_gptq_kinds(opt), scores_digest(opt, tokens))
    return kinds


