#!/usr/bin/env python3
"""The main job on the default model: SmolLM2-135M-Instruct -> JLCM GGUF at IQ2_XXS's file size (84 MB: per-tensor
mixed JLCM precision chosen by the plan, then end-to-end tuning with half of its windows in the chat template),
then size, bits per weight and WikiText-2 perplexity next to the float reference, then an answer from llama-cli.

    .venv/bin/python scripts/demo.py [--target-size 84MB | --target-size none --bits 2] [--tune-chat 0.5]
        [--learn-steps 0] [--chunks 20] [--out out/]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jlcm_gguf.cli import main as convert_main  # noqa: E402
from jlcm_gguf.evaluate import answer, perplexity, reference_gguf, wikitext_test  # noqa: E402
from jlcm_gguf.models import cache_dir, smollm2_hf_dir  # noqa: E402

PROMPT = "What is the capital of France?"
TARGET_SIZE = "84MB"   # IQ2_XXS's file size for this model (docs/measurements/results.md)
TUNE_CHAT = 0.5


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

    hf = smollm2_hf_dir()
    a.out.mkdir(parents=True, exist_ok=True)
    budget = a.target_size.lower() != "none"
    suffix = (f"-learn{a.learn_steps}" if a.learn_steps else "") + (f"-chat{a.tune_chat:g}" if a.tune_chat else "")
    kind = f"{a.target_size}" if budget else f"jlcm{a.bits}"
    jlcm = a.out / f"SmolLM2-135M-Instruct-{kind}{suffix}.gguf"
    if not jlcm.exists():
        args = ["--target-size", a.target_size] if budget else ["--bits", str(a.bits)]
        rc = convert_main([str(hf), "--outfile", str(jlcm), "--learn-steps", str(a.learn_steps),
                           "--tune-chat", str(a.tune_chat)] + args)
        if rc:
            return rc
    ref = reference_gguf(hf, cache_dir() / "models" / "SmolLM2-135M-Instruct-f32.gguf")
    text = wikitext_test(a.out)
    ref_bytes = os.path.getsize(ref)
    n_params = ref_bytes / 4  # F32 reference: 4 bytes per parameter (metadata is negligible)
    rows = []
    for name, path in (("reference (F32)", ref), (f"JLCM {kind}", jlcm)):
        ppl, err = perplexity(path, text, a.chunks)
        size = os.path.getsize(path)
        rows.append((name, size, 8 * size / n_params, ppl, err))
    print(f"\nWikiText-2 test, ctx 512, {a.chunks} chunks (llama-perplexity)")
    print(f"{'model':<18}{'bytes':>14}{'bits/weight':>13}{'perplexity':>22}")
    for name, size, bpw, ppl, err in rows:
        print(f"{name:<18}{size:>14,}{bpw:>13.3f}{ppl:>14.3f} ± {err:.3f}")
    print(f"\nllama-cli -m {jlcm} -p {a.prompt!r}")
    print(answer(jlcm, a.prompt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
