#!/usr/bin/env python3
"""The main job on the default model: SmolLM2-135M-Instruct -> JLCM 2-bit GGUF, then size, bits per weight
and WikiText-2 perplexity next to the float reference, then an answer from llama-cli.

    .venv/bin/python scripts/demo.py [--bits 2] [--learn-steps 0] [--chunks 20] [--out out/]
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=2, choices=[2, 3, 4])
    ap.add_argument("--chunks", type=int, default=20, help="perplexity chunks of 512 tokens")
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--learn-steps", type=int, default=0, help="passed to jlcm-convert (0: k-means codebooks only)")
    a = ap.parse_args()

    hf = smollm2_hf_dir()
    a.out.mkdir(parents=True, exist_ok=True)
    suffix = f"-learn{a.learn_steps}" if a.learn_steps else ""
    jlcm = a.out / f"SmolLM2-135M-Instruct-jlcm{a.bits}{suffix}.gguf"
    if not jlcm.exists():
        rc = convert_main([str(hf), "--outfile", str(jlcm), "--bits", str(a.bits), "--learn-steps", str(a.learn_steps)])
        if rc:
            return rc
    ref = reference_gguf(hf, cache_dir() / "models" / "SmolLM2-135M-Instruct-f32.gguf")
    text = wikitext_test(a.out)
    ref_bytes = os.path.getsize(ref)
    n_params = ref_bytes / 4  # F32 reference: 4 bytes per parameter (metadata is negligible)
    rows = []
    for name, path in (("reference (F32)", ref), (f"JLCM {a.bits}-bit", jlcm)):
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
