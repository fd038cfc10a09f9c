"""jlcm-convert: Hugging Face Llama checkpoint -> JLCM GGUF (same code as convert_hf_to_jlcm_gguf.py)."""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from .calib import DEFAULT_CALIBRATION
from .distributed import DEVICES
from .source import DEFAULT_CACHE_BYTES
from .convert import AUTO_TUNE_STEPS, LAYER_ROUNDS, TENSOR_TYPES, Options, convert

OUTTYPES = ("jlcm2", "jlcm3", "jlcm4", "auto")


def tensor_type(text: str) -> tuple[str, str]:
    """--tensor-type PATTERN=TYPE (llama-quantize's form): the pattern, a regular expression, and the type."""
    pattern, sep, kind = text.rpartition("=")
    kind = kind.strip().lower()
    if not sep or not pattern or not kind:
        raise argparse.ArgumentTypeError(f"{text!r} is not PATTERN=TYPE (e.g. 'blk\\.0\\..*=jlcm4', ffn_down=q8_0)")
    if kind not in TENSOR_TYPES:
        raise argparse.ArgumentTypeError(f"unknown type {kind!r} in {text!r} (types: {', '.join(TENSOR_TYPES)})")
    try:
        re.compile(pattern)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"{pattern!r} in {text!r} is not a regular expression: {e}") from None
    return pattern, kind


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="jlcm-convert",
        description="Convert a Hugging Face model to a JLCM-quantized GGUF file for llama.cpp",
        epilog="Types: jlcm2, jlcm3, jlcm4 (JLCM with 2-, 3-, 4-bit codebook indices), llama.cpp's q8_0, q5_0, q4_0, "
               "f16 and the K-quants q2_k ... q6_k (width a multiple of 256). Which type a weight matrix gets, first "
               "rule that applies: --token-embedding-type / --output-tensor-type / --embd-type for the embeddings, "
               "then the first --tensor-type pattern matching its name, then the plan (--outtype auto with a "
               "budget, or --plan) or --outtype. Options: docs/CONVERTER.md.")
    ap.add_argument("model", type=Path, help="directory of the Hugging Face model (config.json, *.safetensors, tokenizer)")
    ap.add_argument("--outfile", type=Path,
                    help="path to write to; default: <model>/<name>-jlcm<bits>.gguf (<name>-jlcm-auto.gguf for "
                         "--outtype auto)")
    ap.add_argument("--outtype", type=str.lower, choices=OUTTYPES,
                    help="jlcm2, jlcm3, jlcm4: every layer matrix in JLCM with 2-, 3- or 4-bit indices (default: "
                         "jlcm2, or the plan when --target-size, --target-bpw or --plan is given); auto: the plan "
                         "chooses each weight matrix's type under --target-size or --target-bpw (required)")
    ap.add_argument("--bits", type=int, choices=[2, 3, 4], help=argparse.SUPPRESS)  # deprecated: --outtype jlcmN
    ap.add_argument("--dry-run", action="store_true",
                    help="resolve every tensor's type (the plan included, which runs the calibration passes it "
                         "needs), print them and the exact size of the file in bytes, and exit without quantizing or "
                         "writing it (--save-plan is still written)")
    ap.add_argument("--groups", type=int, default=16, help="row groups (codebooks) per tensor")

    budget = ap.add_argument_group("size budget (per-tensor mixed precision, docs/ALGORITHM.md)")
    budget.add_argument("--target-size", help="largest file size, e.g. 2.0GB (10^9 bytes), 80MB, 1.5GiB or bytes; "
                        "each JLCM tensor gets 2, 3 or 4 bits by a greedy search on measured sensitivity")
    budget.add_argument("--target-bpw", type=float, help="the same as bits per weight of the whole file")
    budget.add_argument("--plan", type=Path, help="types from a plan: a JSON file (--save-plan) or a JLCM GGUF file; a JSON "
                        "file with a --target-size or --target-bpw is searched again from its saved scores")
    budget.add_argument("--save-plan", type=Path, help="write the plan used as JSON")
    budget.add_argument("--fast", action="store_true",
                        help="plan with each tensor's KL estimated from the Fisher information of a few calibration windows "
                             "instead of measured by running the model once per tensor")
    budget.add_argument("--kquants", action="store_true",
                        help="let the plan also store matrices whose width is a multiple of 256 in llama.cpp's K-quants "
                             "(Q2_K ... Q6_K, quantized by llama.cpp with the calibration importance)")

    types = ap.add_argument_group(
        "tensor types (llama-quantize's options)",
        "These override --outtype and the plan. Under a budget the matrices they set count in the file's size and "
        "the plan chooses the rest so that the whole file fits.")
    types.add_argument("--token-embedding-type", type=str.lower, choices=TENSOR_TYPES, metavar="TYPE",
                       help="type of token_embd (default: --embd-type's)")
    types.add_argument("--output-tensor-type", type=str.lower, choices=TENSOR_TYPES, metavar="TYPE",
                       help="type of the output (head) matrix (default: --embd-type's); refused for a model whose "
                            "head is token_embd itself (tied embeddings): give --token-embedding-type")
    types.add_argument("--embd-type", choices=["jlcm2", "jlcm3", "jlcm4", "q8_0", "q5_0", "q4_0", "f16"],
                       help="type of both token_embd and output (default jlcm4; with --target-size, --target-bpw or "
                            "--plan the plan chooses it unless this is given, and then it must be a type the plan can "
                            "choose); --token-embedding-type and --output-tensor-type take precedence")
    types.add_argument("--tensor-type", type=tensor_type, action="append", metavar="PATTERN=TYPE",
                       help="repeatable: weight matrices whose GGUF name the regular expression PATTERN matches "
                            "(re.search, e.g. 'blk\\.0\\..*=jlcm4', ffn_down=q8_0, attn_v=jlcm3) take TYPE; the "
                            "first matching pattern decides. A pattern that matches no weight matrix is an error")

    calib = ap.add_argument_group("calibration and tuning")
    calib.add_argument("--imatrix", type=Path, metavar="FILE",
                       help="a llama-imatrix file (GGUF) whose per-column importance weights every quantization error "
                            "in place of the calibration windows' (codebooks, GPTQ rounding, the plan, llama.cpp types)")
    calib.add_argument("--calib", default=DEFAULT_CALIBRATION, metavar="{mix,kjv,brown}|FILE",
                       help="calibration text: kjv (the King James Bible), brown (the Brown corpus of 1961 American "
                            "English), mix (both, document by document) or a UTF-8 file; default: "
                            f"{DEFAULT_CALIBRATION}")
    calib.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    calib.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    calib.add_argument("--tune-steps", default="auto",
                       help="after the block-wise pass, steps of end-to-end tuning of all codebooks, block scales, norms and "
                            "biases to the float model's next-token distribution (KL) on the calibration windows; 0: none; "
                            f"auto (default): {AUTO_TUNE_STEPS} for models of 0.1-1B parameters, none otherwise (on 2 CPU "
                            "cores a step of a 135M model takes ~8 s; docs/ALGORITHM.md)")
    calib.add_argument("--tune-chat", type=float, default=0.0, metavar="FRACTION",
                       help="fraction of end-to-end tuning's calibration windows formatted as conversations in the "
                            "model's chat template (continuations of the calibration text)")
    calib.add_argument("--seed", type=int, default=0)

    run = ap.add_argument_group("running")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted conversion from its last finished block (OUTFILE.jlcm-resume/)")
    run.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    run.add_argument("--device", choices=DEVICES, default="cpu",
                     help="where calibration passes, Hessians, GPTQ, learning, tuning and plan scoring compute: cpu "
                          "(default), cuda, mps, or auto (CUDA if torch sees a GPU, else the CPU); k-means, packing "
                          "and writing stay on the CPU. Not yet checked on a GPU (docs/CONVERTER.md)")
    run.add_argument("--cache-mb", type=int, default=DEFAULT_CACHE_BYTES >> 20,
                     help="megabytes of decoded float weights kept in memory (default 1024); the converter reads the "
                          "checkpoint one block at a time and re-reads what does not fit: less memory, more reading")
    run.add_argument("--report", type=Path, help="write per-block learning figures (loss before/after, fraction of "
                     "indices changed) and totals to this JSON file")
    run.add_argument("--verbose", action="store_true")

    research = ap.add_argument_group("research and ablations (docs/ALGORITHM.md)")
    research.add_argument("--variant", choices=["codebooks", "scales"], default="codebooks",
                          help="a codebook per group, or one shared codebook")
    research.add_argument("--rounding", choices=["auto", "gptq", "nearest"], default="auto",
                          help="how layer weights and an untied head take their codewords: gptq (column by column, each error compensated on the "
                               "columns not yet rounded through the full input Hessian), nearest (each weight alone), or auto "
                               "(default: gptq for 2- and 3-bit matrices, nearest for 4-bit ones)")
    research.add_argument("--learn-steps", type=int, default=0,
                          help="Adam steps of joint codebook/mapping learning per transformer block (0: none; see docs/ALGORITHM.md)")
    research.add_argument("--no-learn", action="store_true", help="no learning at all: k-means codebooks and GPTQ rounding only (--learn-steps 0 --layer-rounds 0 --tune-steps 0)")
    research.add_argument("--layer-rounds", type=int, default=LAYER_ROUNDS,
                          help="rounds of layer-wise learning after GPTQ rounding: codebooks and block scales refit by "
                               "least squares under the input Hessian, then one coordinate-descent sweep of the indices "
                               f"(--learn-mappings); default {LAYER_ROUNDS} (docs/ALGORITHM.md)")
    research.add_argument("--learn-mappings", choices=["proximal", "plain", "off"], default="proximal",
                          help="how learning updates the codeword indices: proximal (default; moves to adjacent codewords "
                               "chosen by the loss's local model, kept only if the loss falls), plain (straight-through "
                               "estimator, ablation) or off (codebooks and scales only, ablation); docs/ALGORITHM.md")
    research.add_argument("--learn-loss", choices=["residual", "normed"], default="residual",
                          help="what learning reconstructs: each block's output (residual stream, default), or, as an "
                               "ablation, that output after the next attention RMSNorm (docs/ALGORITHM.md)")
    research.add_argument("--tune-mappings", choices=["off", "proximal", "plain"], default="off",
                          help="how end-to-end tuning updates the indices: off (default: the block-wise pass's indices stay; "
                               "on SmolLM2 at 2 bits no proposed move passed the test, docs/ALGORITHM.md), proximal or plain "
                               "as --learn-mappings; a mapping update makes a tuning step about 2.5 times as long")
    research.add_argument("--tune-mapping-confidence", type=float, default=2.0, metavar="Z",
                          help="--tune-mappings proximal proposes a move only if the gradient's mean, shrunk "
                               "towards zero by Z standard errors, predicts a lower loss (default 2; 0: the raw mean)")
    research.add_argument("--plan-error", choices=["nearest", "rounding"], default="nearest",
                          help="how the plan compares a layer matrix's kinds: by the diagonal-weighted error of nearest "
                               "rounding (default), or by its held-out output error under the full input Hessian with "
                               "each kind rounded as --rounding rounds it (ablation: worse on Qwen, docs/CONVERTER.md)")
    research.add_argument("--rotate", action="store_true",
                          help="fold a randomized Hadamard rotation of the residual stream into the weights (same function, "
                               "fewer outliers; measured worse on SmolLM2 at equal size, docs/CONVERTER.md)")
    return ap


def parse_args(argv=None) -> Options:
    ap = build_parser()
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(name)s: %(message)s")
    target_bytes = 0
    if a.target_size:
        from .plan import PlanError, parse_size
        try:
            target_bytes = parse_size(a.target_size)
        except PlanError as e:
            ap.error(str(e))
    if a.target_bpw is not None and not 0 < a.target_bpw < 32:
        ap.error("--target-bpw must be between 0 and 32")
    if a.tune_steps != "auto" and not (a.tune_steps.isdigit()):
        ap.error("--tune-steps must be a number of steps or auto")
    # --outtype (llama.cpp's name) and --bits, its deprecated alias; without either: 2 bits, or the plan when a
    # budget or --plan is given (as before --outtype existed)
    budget = bool(a.target_size) or a.target_bpw is not None
    outtype_bits = int(a.outtype[4:]) if a.outtype and a.outtype != "auto" else None
    if a.bits is not None and a.outtype is not None and a.bits != outtype_bits:
        ap.error(f"--bits {a.bits} (the old name of --outtype jlcm{a.bits}) disagrees with --outtype {a.outtype}")
    if a.outtype == "auto" and not budget:
        ap.error("--outtype auto lets the plan choose each weight matrix's type under a size budget: give "
                 "--target-size or --target-bpw (or leave --outtype out: 2-bit JLCM, or --plan's types)")
    if outtype_bits and (budget or a.plan):
        ap.error(f"--outtype {a.outtype} stores every layer matrix as {a.outtype.upper()}, but "
                 + ("--target-size/--target-bpw" if budget else "--plan")
                 + " lets the plan choose the types: " + ("use --outtype auto" if budget else "leave --outtype out")
                 + " (and --tensor-type to fix some)")
    if a.cache_mb < 0:
        ap.error(f"--cache-mb {a.cache_mb}: give 0 or more megabytes")
    bits = outtype_bits or a.bits or 2
    outfile = a.outfile or a.model / f"{a.model.name}-jlcm{'-auto' if a.outtype == 'auto' else bits}.gguf"
    return Options(model=a.model, outfile=outfile, bits=bits, groups=a.groups, variant=a.variant,
                   embd_type=a.embd_type or "jlcm4", embd_pinned=a.embd_type is not None, calib=a.calib, imatrix_file=a.imatrix, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed,
                   threads=a.threads, device=a.device, learn_steps=0 if a.no_learn else a.learn_steps, learn_mappings=a.learn_mappings, layer_rounds=0 if a.no_learn else a.layer_rounds, tune_mappings=a.tune_mappings, tune_confidence=a.tune_mapping_confidence, tune_chat=a.tune_chat, tune_steps=0 if a.no_learn else -1 if a.tune_steps == "auto" else int(a.tune_steps), report=a.report, learn_loss=a.learn_loss, rounding=a.rounding,
                   resume=a.resume, target_bytes=target_bytes, target_bpw=a.target_bpw or 0.0, plan=a.plan,
                   save_plan=a.save_plan, plan_error=a.plan_error, fast=a.fast, kquants=a.kquants, rotate=a.rotate,
                   token_embd_type=a.token_embedding_type, output_type=a.output_tensor_type,
                   tensor_types=tuple(a.tensor_type or ()), dry_run=a.dry_run,
                   cache_bytes=a.cache_mb << 20)


def print_dry_run(s: dict) -> None:
    """--dry-run's report on stdout: each weight matrix's type and bytes, then the file's exact size."""
    width = max(len(t["name"]) for t in s["tensors"]) if s["tensors"] else 10
    for t in s["tensors"]:
        print(f"{t['name']:<{width}}  {'x'.join(map(str, t['shape'])):>12}  {t['type']:<6} {t['bytes']:>14,} bytes")
    print(f"{'other tensors, header, metadata':<{width}}  {'':>12}  {'':<6} "
          f"{s['bytes'] - sum(t['bytes'] for t in s['tensors']):>14,} bytes")
    target = f" (target {s['target_bytes']:,})" if s.get("target_bytes") else ""
    print(f"dry run: {s['file']} would take {s['bytes']:,} bytes{target}, {s['bpw']:.3f} bits per weight; "
          f"nothing was quantized or written")


def main(argv=None) -> int:
    opt = parse_args(argv)
    try:
        s = convert(opt)  # ConvertError (a SystemExit) prints its one line and exits 1
    except KeyboardInterrupt:
        if opt.dry_run:
            print("interrupted", file=sys.stderr)
            return 130
        from .checkpoint import SUFFIX
        print(f"interrupted: no output written; finished blocks (and end-to-end tuning, saved every 2 minutes) are "
              f"kept in {opt.outfile}{SUFFIX}/ for --resume", file=sys.stderr)
        return 130
    from . import distributed as D
    if not D.is_main():  # another process of a torchrun conversion: process 0 reports
        return 0
    if s.get("dry_run"):
        print_dry_run(s)
        return 0
    print(f"wrote {s['file']}: {s['bytes']:,} bytes, {s['bpw']:.3f} bits per weight overall, "
          f"{s['jlcm_bpw']:.3f} in JLCM tensors ({s['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
