#!/usr/bin/env python3
"""Where --rotate helps or hurts, matrix by matrix (issue #6): SmolLM2's weight matrices with and without the
rotation, each quantized alone, compared by the relative output error on calibration activations.

    .venv/bin/python experiments/rotation_errors.py [--layers 3,15,25] [--windows 4] [--seqlen 256]

For each matrix W with input second moments h (from a float pass on the calibration text, in that basis),
prints sum_j h_j ||W_:j - Q(W)_:j||^2 / sum_j h_j ||W_:j||^2 for JLCM 2 and 3 bits (grouping + one k-means
pass, as the planner scores them) and Q5_0, and h's peak-to-mean ratio (how concentrated the input
energy is: the rotation flattens it for the matrices reading the residual stream).

`--q8-check DIR` also converts the model with every weight matrix in Q8_0 (a `--plan`), once with and once
without `--rotate`, and prints llama-perplexity of both on WikiText-2 (ctx 512, `--chunks`): the check that
the folded rotation is exact in llama.cpp, not only in the Python model (tests/test_rotate.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KINDS = ("jlcm2", "jlcm3", "q5_0")
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def input_moments(tensors: dict, hp, tokens) -> dict:
    import torch

    from jlcm_gguf import model as M
    moments = M.InputMoments()
    with torch.inference_mode():
        for seq in tokens:
            x = M.embed(seq, tensors, hp)
            for bid in range(hp.n_layer):
                x = M.block_forward(x, tensors, bid, hp, moments)
    return moments.means(sum(len(s) for s in tokens))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="3,15,25")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--q8-check", type=Path, metavar="DIR", help="also compare Q8_0 files with and without "
                    "--rotate in llama.cpp (written to DIR)")
    ap.add_argument("--chunks", type=int, default=8, help="llama-perplexity chunks for --q8-check")
    a = ap.parse_args(argv)

    import gguf
    from transformers import AutoTokenizer

    from jlcm_gguf.calib import calibration_tokens, default_calibration_text
    from jlcm_gguf.convert import float_tensors, hparams_of, import_conversion
    from jlcm_gguf.reference_models import smollm2_hf_dir
    from jlcm_gguf.plan_scores import quick_error
    from jlcm_gguf.rotate import rotate

    hf = smollm2_hf_dir()
    conversion = import_conversion()
    config = json.loads((hf / "config.json").read_text())
    cls = conversion.get_model_class(conversion.get_model_architecture(config, conversion.ModelType.TEXT))
    plain, order = float_tensors(cls(hf, gguf.LlamaFileType.ALL_F32, Path("/dev/null"), eager=True))
    hp = hparams_of(config)
    rotated, _ = rotate(plain, order, hp, a.seed)
    tokens = calibration_tokens(default_calibration_text(), AutoTokenizer.from_pretrained(str(hf)), a.windows,
                                a.seqlen, a.seed)
    layers = [int(v) for v in a.layers.split(",")]
    print(f"relative h-weighted output error of each matrix quantized alone (SmolLM2, layers {a.layers}, "
          f"{a.windows}x{a.seqlen} calibration tokens)")
    print(f"{'matrix':<24} {'basis':<8} {'h peak/mean':>11} " + " ".join(f"{k:>8}" for k in KINDS))
    mean = {b: np.zeros(len(KINDS)) for b in ("plain", "rotated")}
    for basis, t in (("plain", plain), ("rotated", rotated)):
        h = input_moments(t, hp, tokens)
        for bid in layers:
            for m in MATRICES:
                name = f"blk.{bid}.{m}.weight"
                hh, w = h[name.removesuffix(".weight")], np.asarray(t[name], dtype=np.float32)
                base = float(((w.astype(np.float64) ** 2).sum(0) * hh).sum())
                rel = [quick_error(w, hh, k, 16, "codebooks", a.seed)[0] / base for k in KINDS]
                mean[basis] += np.log(rel)
                print(f"{name:<24} {basis:<8} {hh.max() / hh.mean():11.1f} " + " ".join(f"{r:8.4f}" for r in rel),
                      flush=True)
    n = len(layers) * len(MATRICES)
    for basis, v in mean.items():
        print(f"{'geometric mean':<24} {basis:<8} {'':>11} " + " ".join(f"{r:8.4f}" for r in np.exp(v / n)))
    if a.q8_check:
        q8_check(a.q8_check, hf, [n for n in order if n.endswith(".weight") and np.ndim(plain[n]) == 2],
                 a.chunks)
    return 0


def q8_check(out: Path, hf: Path, matrices: list[str], chunks: int) -> None:
    from jlcm_gguf.cli import main as convert_main
    from jlcm_gguf.evaluate import perplexity, wikitext_test
    from jlcm_gguf.plan import PLAN_FORMAT

    out.mkdir(parents=True, exist_ok=True)
    for rotated in (False, True):
        names = matrices + (["output.weight"] if rotated and "output.weight" not in matrices else [])
        plan = out / f"q8-rotate{int(rotated)}.json"
        plan.write_text(json.dumps({"format": PLAN_FORMAT, "version": 1, "tensors": {n: "q8_0" for n in names}}))
        gguf_file = out / f"q8-rotate{int(rotated)}.gguf"
        if not gguf_file.exists() and convert_main([str(hf), "--outfile", str(gguf_file), "--plan", str(plan)]
                                                   + (["--rotate"] if rotated else [])):
            raise SystemExit("error: the Q8_0 conversion failed")
        ppl, err = perplexity(gguf_file, wikitext_test(out), chunks)
        print(f"every matrix Q8_0, {'with' if rotated else 'without'} --rotate: WikiText-2 perplexity "
              f"{ppl:.3f} ± {err:.3f} ({chunks} chunks of 512)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
