#!/usr/bin/env python3
"""Quality of JLCM files next to llama.cpp's own low-bit types, in one run: file size, bits per weight and
llama-perplexity on an evaluation text, written as Markdown, JSON and an SVG size-perplexity plot.

    .venv/bin/python scripts/eval_quality.py [--eval-text FILE|wikitext-2|llama.cpp-docs] [--chunks 40] [--json OUT] [--doc docs/measurements/results.md]

Rows: the float reference (F16), llama.cpp's Q2_K, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and Q4_K_M made by
llama-quantize with an imatrix from llama-imatrix on the default calibration text (jlcm_gguf/calib.py, never the
evaluation text), and JLCM files from jlcm-convert (--jlcm, default 2, 3 and 4 bits, k-means codebooks).
Models: SmolLM2-135M-Instruct (default) or Qwen2.5-Coder-1.5B-Instruct (--model); files are kept in --out
(shared with scripts/bench.py for SmolLM2) and reused.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402
from jlcm_gguf.calib import DEFAULT_CALIBRATION, default_calibration_text  # noqa: E402
from jlcm_gguf.convert import llama_cpp_dir  # noqa: E402
from jlcm_gguf.cli import main as convert_main  # noqa: E402
from jlcm_gguf.evaluate import EVAL_TEXTS, calibration_overlap, perplexity, tool  # noqa: E402

TEXT_NAMES = {"wikitext-2": "`WikiText-2 test (../shared, LF line endings)`",
              "llama.cpp-docs": "`llama.cpp-docs` (llama.cpp's docs/*.md at the pinned commit, 494,785 bytes, "
                                "`--eval-text llama.cpp-docs`)"}
from jlcm_gguf.reference_models import MODELS  # noqa: E402

LLAMA_TYPES = ["Q2_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "Q4_K_M"]
FRONT_TYPES = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "Q2_K", "Q4_K_M"]  # each needs a smaller, better JLCM file
HALF_GAP_TYPES = ["IQ2_XXS", "IQ2_XS", "Q2_K"]                            # ... closing half the gap at its size
MAPPINGS = ["proximal", "off", "plain"]                                    # --learn-mappings, the ablation's order


def row_specs(a, learned, ablations) -> list[tuple[str, str, list]]:
    """(row name, file name in --out, jlcm-convert arguments) of the JLCM rows, in evaluation order; a
    --target-size argument "=ROW" is resolved to that row's file size when the row is reached."""
    rows = [(f"jlcm-{b}bit", f"jlcm{b}.gguf", ["--bits", b]) for b in a.jlcm]
    rows += [(f"jlcm-{b}bit-learn{s}", f"jlcm{b}-learn{s}.gguf", ["--bits", b, "--learn-steps", s]) for b, s in learned]
    for b, s in ablations:  # issue #4's ablations of the learned row
        rows += [(f"jlcm-{b}bit-learn{s}", f"jlcm{b}-learn{s}.gguf", ["--bits", b, "--learn-steps", s]),
                 (f"jlcm-{b}bit-learn{s}-plain-ste", f"jlcm{b}-learn{s}-plainste.gguf",
                  ["--bits", b, "--learn-steps", s, "--learn-mappings", "plain"]),
                 (f"jlcm-{b}bit-groups1", f"jlcm{b}-groups1.gguf", ["--bits", b, "--groups", 1]),
                 (f"jlcm-{b}bit-scales", f"jlcm{b}-scales.gguf", ["--bits", b, "--variant", "scales"]),
                 (f"jlcm-{b}bit-nearest", f"jlcm{b}-nearest.gguf", ["--bits", b, "--rounding", "nearest"])]
    for ref in a.mixed:  # issue #6: a per-tensor plan at another row's size
        rows.append((f"jlcm-mixed@{ref}", f"jlcm-mixed-{ref}.gguf", ["--target-size", f"={ref}"]))
    for ref, qt in a.mixed_embd:  # the same budget with the embeddings pinned to a type
        rows.append((f"jlcm-mixed@{ref}-embd-{qt}", f"jlcm-mixed-{ref}-embd-{qt}.gguf",
                     ["--target-size", f"={ref}", "--embd-type", qt]))
    for ref in a.mixed_kquants:  # the same budget with llama.cpp's K-quants among the choices
        rows.append((f"jlcm-mixed@{ref}-kquants", f"jlcm-mixed-{ref}-kquants.gguf",
                     ["--target-size", f"={ref}", "--kquants"]))
    for ref, s in a.mixed_learned:  # the same plan with joint learning on its JLCM matrices
        rows.append((f"jlcm-mixed@{ref}-learn{s}", f"jlcm-mixed-{ref}-learn{s}.gguf",
                     ["--target-size", f"={ref}", "--learn-steps", s]))
    for b, r in a.mapping_ablation:  # issue #28: the index update of layer-wise learning toggled, all else default
        rows += [(f"jlcm-{b}bit-layer{r}-{m}", f"jlcm{b}-layer{r}-{m}.gguf",
                  ["--bits", b, "--layer-rounds", r, "--learn-mappings", m, "--report", a.out / f"jlcm{b}-layer{r}-{m}.report.json"])
                 for m in MAPPINGS]
    rows += [(f"jlcm-{b}bit-rotated", f"jlcm{b}-rot.gguf", ["--bits", b, "--rotate"]) for b in a.rotated]
    rows += [(f"jlcm-{b}bit-nearest", f"jlcm{b}-nearest.gguf", ["--bits", b, "--rounding", "nearest"])
             for b in a.nearest]
    seen, out = set(), []
    for r in rows:
        if r[0] not in seen:
            seen.add(r[0])
            out.append(r)
    return out


def reused_rows(report: Path) -> dict[str, dict]:
    """Rows of an earlier report's table (--reuse): name -> {bytes, bpw, bpw_matrices, ppl, ppl_err, types}."""
    rows = {}
    for line in report.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not cells[1].replace(",", "").isdigit():
            continue
        ppl, err = (float(v) for v in cells[4].split("±"))
        rows[cells[0].rstrip(" †")] = {"bytes": int(cells[1].replace(",", "")), "bpw": float(cells[2]),
                                       "bpw_matrices": float(cells[3]), "ppl": ppl, "ppl_err": err,
                                       "matrix_types_text": cells[5], "reused": True}
    return rows


def sizes(path: Path) -> dict:
    """Whole-file bits per weight, bits per weight of the quantized matrices (2-D tensors other than the
    embeddings, companions included), and the types those matrices ended up in (fallbacks show here)."""
    from gguf import GGUFReader
    r = GGUFReader(str(path))
    n_weights = sum(int(t.n_elements) for t in r.tensors if ".jlcm_" not in t.name)
    q_bytes = q_elems = 0
    types: collections.Counter = collections.Counter()
    for t in r.tensors:
        base = t.name.split(".jlcm_")[0]
        if base.startswith(("token_embd", "output.")) or len(t.shape) < 2 and ".jlcm_" not in t.name:
            continue
        q_bytes += int(t.n_bytes)
        if ".jlcm_" not in t.name:
            q_elems += int(t.n_elements)
            types[t.tensor_type.name] += 1
    size = os.path.getsize(path)
    return {"bytes": size, "bpw": 8 * size / n_weights, "bpw_matrices": 8 * q_bytes / max(q_elems, 1),
            "matrix_types": dict(types.most_common())}


def svg_plot(rows: list[dict], path: Path) -> None:
    """File size against perplexity (log scale), one labelled point per row; written without a plotting
    library (none is among the pinned dependencies)."""
    import math
    w, h, m = 760, 480, 70
    xs = [r["bytes"] / 1e6 for r in rows]
    ys = [math.log10(r["ppl"]) for r in rows]
    x0, x1 = 0.0, max(xs) * 1.08
    y0, y1 = min(ys) - 0.05, max(ys) + 0.05

    def px(x, y):
        return m + (x - x0) / (x1 - x0) * (w - 2 * m), h - m - (y - y0) / (y1 - y0) * (h - 2 * m)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
             f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
             f'<text x="{w / 2}" y="{h - 25}" text-anchor="middle">file size (MB)</text>',
             f'<text x="18" y="{h / 2}" text-anchor="middle" transform="rotate(-90 18 {h / 2})">perplexity (log scale)</text>']
    for k in range(6):
        xv = x0 + k * (x1 - x0) / 5
        x, _ = px(xv, y0)
        parts.append(f'<text x="{x:.0f}" y="{h - m + 16}" text-anchor="middle">{xv:.0f}</text>')
    for e in range(math.floor(y0), math.ceil(y1) + 1):
        for mant in (1, 2, 5):
            yv = math.log10(mant) + e
            if y0 <= yv <= y1:
                _, y = px(x0, yv)
                parts.append(f'<text x="{m - 6}" y="{y + 4:.0f}" text-anchor="end">{mant * 10 ** e:g}</text>')
    for r, xv, yv in zip(rows, xs, ys):
        x, y = px(xv, yv)
        color = "#c0392b" if r["name"].startswith("jlcm") else "#2c3e50"
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"/>')
        parts.append(f'<text x="{x + 6:.1f}" y="{y - 6:.1f}" fill="{color}">{r["name"]}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def target_lines(jl: list[dict], by: dict[str, dict], ref: dict) -> list[str]:
    """Issue #4's targets judged against the JLCM rows `jl`: each llama.cpp type from FRONT_TYPES needs a
    JLCM file no larger with lower perplexity, and at HALF_GAP_TYPES' sizes one closing half the gap."""
    def best_no_larger(t: str) -> dict | None:
        return min((r for r in jl if r["bytes"] <= by[t]["bytes"]), key=lambda r: r["ppl"], default=None)

    lines = []
    for t in FRONT_TYPES:
        if t not in by:
            continue
        best = best_no_larger(t)
        if best and best["ppl"] < by[t]["ppl"]:
            lines.append(f"- {t} ({by[t]['bytes']:,} B, ppl {by[t]['ppl']:.2f}): dominated by {best['name']} "
                         f"({best['bytes']:,} B, ppl {best['ppl']:.2f})")
        else:
            lines.append(f"- {t} ({by[t]['bytes']:,} B, ppl {by[t]['ppl']:.2f}): **not dominated**"
                         + (f"; the best JLCM file no larger is {best['name']} with ppl {best['ppl']:.2f}" if best else
                            "; no JLCM file is that small"))
    for t in HALF_GAP_TYPES:
        if t not in by:
            continue
        goal = (by[t]["ppl"] + ref["ppl"]) / 2
        best = best_no_larger(t)
        if best is None:
            verdict = "no JLCM file is that small"
        else:
            verdict = f"{best['name']} has {best['ppl']:.2f} — " + (
                "met" if best["ppl"] <= goal else f"missed by {best['ppl'] - goal:.2f}")
        lines.append(f"- half the gap at {t}'s size: ppl ≤ {goal:.2f} needed; {verdict}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(MODELS), default="smollm2", help="the reference model")
    ap.add_argument("--eval-text", default="wikitext-2", help="UTF-8 evaluation text: a file, or wikitext-2 (the "
                    "WikiText-2 test text in ../shared, the default) or llama.cpp-docs (llama.cpp's docs/*.md from "
                    "the pinned sdist, jlcm_gguf/evaluate.py)")
    ap.add_argument("--chunks", type=int, default=40, help="llama-perplexity chunks")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--imatrix-chunks", type=int, default=64, help="llama-imatrix chunks of 512 calibration tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jlcm", default="2,3,4", help="JLCM bit widths to convert and evaluate (k-means codebooks)")
    ap.add_argument("--learned", default="", help="JLCM rows with learning, BITS:STEPS[,...] (e.g. 4:40)")
    ap.add_argument("--ablations", default="", help="BITS:STEPS[,...]: the learned row and its ablations (plain "
                    "STE mapping gradient, one group, the scales variant) next to the k-means row of those bits")
    ap.add_argument("--mapping-ablation", default="", help="BITS:ROUNDS[,...]: rows with --layer-rounds ROUNDS and each "
                    "--learn-mappings (proximal, off, plain), the default schedule otherwise, beside the default row of "
                    "those bits, with the fraction of indices each changed (its --report)")
    ap.add_argument("--rotated", default="", help="JLCM bit widths to convert with --rotate as well")
    ap.add_argument("--nearest", default="", help="JLCM bit widths to convert with --rounding nearest as well "
                    "(each weight to its nearest codeword instead of GPTQ rounding)")
    ap.add_argument("--mixed", default="", help="ROW[,...]: a mixed-precision file (--target-size) at the size of "
                    "that row, e.g. jlcm-2bit,IQ2_XXS,Q2_K")
    ap.add_argument("--mixed-learned", default="", help="ROW:STEPS[,...]: a mixed-precision file at that row's "
                    "size with STEPS of joint learning, e.g. Q2_K:40")
    ap.add_argument("--mixed-embd", default="", help="ROW:TYPE[,...]: a mixed-precision file at that row's size with "
                    "the embeddings pinned to TYPE (--embd-type; the plan chooses the rest), e.g. Q4_K_M:q8_0")
    ap.add_argument("--mixed-kquants", default="", help="ROW[,...]: a mixed-precision file at that row's size whose "
                    "plan may also use llama.cpp's K-quants (--kquants)")
    ap.add_argument("--reuse", type=Path, help="an earlier report of this script: its rows are taken from there "
                    "(marked †) instead of measured again; rows it lacks are measured")
    ap.add_argument("--fresh", default="", help="ROW[,...]: measure these even if --reuse has them")
    ap.add_argument("--convert-args", default="", help="extra jlcm-convert arguments for every JLCM row, e.g. "
                    "'--nsamples 16' for a shorter schedule on a larger model (stated in the report)")
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument("--json", type=Path, help='write {"rows": [{"name", "bytes", "bpw", "ppl", "ppl_err"}, ...]} here')
    ap.add_argument("--doc", type=Path, help="write the Markdown report here (docs/measurements/results.md), the plot beside it")
    a = ap.parse_args()

    if a.eval_text in EVAL_TEXTS:
        text = EVAL_TEXTS[a.eval_text](a.out)
        text_name = TEXT_NAMES[a.eval_text]
    else:
        text = Path(a.eval_text)
        if not text.is_file():
            raise SystemExit(f"error: --eval-text {text}: no such file (or name one of {', '.join(EVAL_TEXTS)})")
        text_name = f"`{text.name}`"
    overlap = calibration_overlap(text)
    text_name += (f" (it shares {overlap} 12-word passage{'s' * (overlap != 1)} with the calibration text)"
                  if overlap else " (no 12-word passage in common with the calibration text)")
    a.jlcm = [int(b) for b in a.jlcm.split(",") if b]
    a.rotated = [int(b) for b in a.rotated.split(",") if b]
    a.nearest = [int(b) for b in a.nearest.split(",") if b]
    a.mixed = [r for r in a.mixed.split(",") if r]
    a.fresh = [r for r in a.fresh.split(",") if r]
    a.mixed_learned = [(r.split(":")[0], int(r.split(":")[1])) for r in a.mixed_learned.split(",") if r]
    a.mixed_embd = [tuple(r.split(":")) for r in a.mixed_embd.split(",") if r]
    a.mixed_kquants = [r for r in a.mixed_kquants.split(",") if r]
    def pairs(arg: str) -> list[tuple[int, int]]:
        return [tuple(int(v) for v in item.split(":")) for item in arg.split(",") if item]

    a.mapping_ablation = pairs(a.mapping_ablation)
    reuse = reused_rows(a.reuse) if a.reuse else {}
    hf = MODELS[a.model]()
    model_name = hf.name.removesuffix("-f32")
    a.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    by: dict[str, dict] = {}
    convert_s: dict[str, tuple[float, list]] = {}  # conversions done by this run: wall seconds, arguments

    def measure(name: str, make) -> None:
        if name in reuse and name not in a.fresh:
            row = {"name": name, **reuse[name]}
        else:
            path = make()
            ppl, err = perplexity(path, text, a.chunks, a.ctx, a.threads)
            row = {"name": name, **sizes(path), "ppl": ppl, "ppl_err": err}
        rows.append(row)
        by[name] = row
        print(f"{name:<24} {row['bytes']:>12,} B  {row['bpw']:5.2f} bpw  ppl {row['ppl']:9.3f} ± {row['ppl_err']:.3f}"
              + ("  (reused)" if row.get("reused") else ""), flush=True)

    def f16() -> Path:
        return bench._once(a.out / "f16.gguf", lambda t: bench._run(
            [sys.executable, llama_cpp_dir() / "convert_hf_to_gguf.py", hf, "--outtype", "f16", "--outfile", t]))

    def imatrix() -> Path:
        return bench._once(a.out / f"imatrix-{DEFAULT_CALIBRATION}.gguf", lambda t: bench._run(
            [tool("llama-imatrix"), "-m", f16(), "-f", default_calibration_text(), "--chunks", a.imatrix_chunks, "-c", "512",
             "-t", a.threads, "-o", t]))

    measure("reference", f16)
    for qt in LLAMA_TYPES:
        measure(qt, lambda qt=qt: bench._once(a.out / f"{qt}-imatrix-{DEFAULT_CALIBRATION}.gguf", lambda t: bench._run(
            [tool("llama-quantize"), "--imatrix", imatrix(), f16(), t, qt, a.threads])))
    for name, file, args in row_specs(a, pairs(a.learned), pairs(a.ablations)):
        args = [str(by[v[1:]]["bytes"]) if str(v).startswith("=") else str(v) for v in args]
        if "--target-size" in args:  # the sensitivity scores are measured once and searched for each budget
            scores = a.out / ("plan-scores-kquants.json" if "--kquants" in args else "plan-scores.json")
            args += ["--plan", str(scores)] if scores.exists() else ["--save-plan", str(scores)]

        def convert(t, args=args, name=name):
            # --resume: a conversion of this script that was killed continues from its last finished block
            cmd = [str(hf), "--outfile", str(t), *args, *a.convert_args.split(), "--threads", str(a.threads), "--resume"]
            t0 = time.perf_counter()
            if convert_main(cmd):
                raise SystemExit(f"error: jlcm-convert {' '.join(cmd)} failed")
            convert_s[name] = (time.perf_counter() - t0, args)
        measure(name, lambda file=file, convert=convert: bench._once(a.out / file, convert))

    by = {r["name"]: r for r in rows}
    ref = by["reference"]
    jl = [r for r in rows if r["name"].startswith("jlcm")]
    lines = [
        "# Quality: JLCM next to llama.cpp's types",
        "",
        f"Generated by `.venv/bin/python scripts/eval_quality.py {' '.join(sys.argv[1:])}` on {datetime.date.today()}: "
        f"{model_name}, `llama-perplexity -c {a.ctx} --chunks {a.chunks}` on "
        f"{text_name}. llama.cpp's types are made "
        f"with `llama-quantize --imatrix`, the imatrix from `llama-imatrix` on {a.imatrix_chunks} × 512 tokens of the "
        f"calibration text (`{DEFAULT_CALIBRATION}`, jlcm_gguf/calib.py); "
        "JLCM files with `jlcm-convert --bits N` (k-means codebooks, 16 groups, `--rounding auto`: GPTQ "
        "rounding of the 2- and 3-bit layer matrices, nearest of the 4-bit ones; rows named `-learnS` add "
        "`--learn-steps S`, the joint codebook and proximal mapping learning of docs/ALGORITHM.md) on the same "
        "text" + (f", every conversion with `{a.convert_args}`" if a.convert_args else "") + ". "
        + ("At SmolLM2's width of 576 llama.cpp's 256-wide types fall back to 32-wide ones for most tensors "
           "(column *matrix types*), so the comparison is on the size-perplexity front, not by type name."
           if a.model == "smollm2" else "The comparison is on the size-perplexity front (column *matrix types*: "
           "how each file stores its weight matrices).") + (
            "" if a.model == "smollm2" else " The reference is the dequantized Q4_K_M release (the only >1B model "
            "on the registries, ../shared/README.md), so a type on Q4_K's grid can come close to it."),
        "",
        "| model | bytes | bpw (file) | bpw (matrices) | perplexity | matrix types |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        types = r.get("matrix_types_text") or ", ".join(f"{k} ×{v}" for k, v in r["matrix_types"].items())
        lines.append(f"| {r['name']}{' †' if r.get('reused') else ''} | {r['bytes']:,} | {r['bpw']:.2f} | {r['bpw_matrices']:.2f} | "
                     f"{r['ppl']:.3f} ± {r['ppl_err']:.3f} | {types} |")
    lines += ["", "## Targets (issue #4), from the figures above", ""] + target_lines(jl, by, ref)
    own = [r for r in jl if not r["name"].endswith("-kquants")]
    if len(own) < len(jl):  # the -kquants rows may store llama.cpp's K-quants: judge JLCM's own types apart
        lines += ["", "## Targets with JLCM's own types only (rows without `--kquants`)", ""]
        lines += target_lines(own, by, ref)
    for b, st in pairs(a.ablations):
        names = [f"jlcm-{b}bit", f"jlcm-{b}bit-learn{st}", f"jlcm-{b}bit-learn{st}-plain-ste", f"jlcm-{b}bit-groups1",
                 f"jlcm-{b}bit-scales", f"jlcm-{b}bit-nearest"]
        present = [n for n in names if n in by]
        lines += ["", f"## Ablation at {b} bits (same file size; perplexity)", "",
                  "| row | what changes | perplexity |", "|---|---|---:|"]
        what = {names[0]: "k-means codebooks, 16 groups, default rounding, no learning", names[1]: f"+ {st} steps of "
                "joint learning, proximal mapping update", names[2]: f"+ {st} steps, plain straight-through mapping "
                "gradient", names[3]: "k-means, one codebook per tensor", names[4]: "k-means, one codebook with a "
                "scale per group", names[5]: "k-means, each weight rounded to its nearest codeword (no GPTQ)"}
        for n in present:
            lines.append(f"| {n} | {what[n]} | {by[n]['ppl']:.3f} ± {by[n]['ppl_err']:.3f} |")
        if names[1] in by and names[0] in by and names[2] in by:
            best = min(present, key=lambda n: by[n]["ppl"])
            lines.append("")
            lines.append(f"Learned + proximal beats k-means only and plain STE: "
                         f"{'yes' if best == names[1] else f'no, the best row is {best}'}. (Both learned rows keep "
                         "a block's learned result only where it lowered that block's reconstruction loss on the "
                         "calibration windows.)")
    for b, r in a.mapping_ablation:
        lines += ["", f"## Mapping ablation at {b} bits: {r} rounds of layer-wise learning, default tuning", "",
                  f"`jlcm-convert --bits {b} --layer-rounds {r} --learn-mappings M` (docs/ALGORITHM.md#layer-wise-learning), "
                  "every other setting the default; indices changed from the conversion's `--report` (all passes).", "",
                  "| row | --learn-mappings | indices changed | perplexity |", "|---|---|---:|---:|"]
        if f"jlcm-{b}bit" in by:
            base = by[f"jlcm-{b}bit"]
            lines.append(f"| jlcm-{b}bit | (no layer-wise learning) | 0 % | {base['ppl']:.3f} ± {base['ppl_err']:.3f} |")
        for m in MAPPINGS:
            n = f"jlcm-{b}bit-layer{r}-{m}"
            rep = a.out / f"jlcm{b}-layer{r}-{m}.report.json"
            frac = json.loads(rep.read_text())["indices_changed"]["frac"] if rep.exists() else float("nan")
            lines.append(f"| {n} | {m} | {100 * frac:.2f} % | {by[n]['ppl']:.3f} ± {by[n]['ppl_err']:.3f} |")
        ppl = {m: by[f"jlcm-{b}bit-layer{r}-{m}"]["ppl"] for m in MAPPINGS}
        lines += ["", f"proximal < off: {'yes' if ppl['proximal'] < ppl['off'] else '**no**'}; "
                  f"proximal < plain: {'yes' if ppl['proximal'] < ppl['plain'] else '**no**'}."]
    mixed_ref = {f"jlcm-mixed@{ref}": ref for ref in a.mixed}
    mixed_ref.update({f"jlcm-mixed@{ref}-learn{s}": ref for ref, s in a.mixed_learned})
    mixed_ref.update({f"jlcm-mixed@{ref}-embd-{qt}": ref for ref, qt in a.mixed_embd})
    mixed_ref.update({f"jlcm-mixed@{ref}-kquants": ref for ref in a.mixed_kquants})
    mixed = [r for r in rows if r["name"] in mixed_ref]
    if mixed:
        lines += ["", "## Mixed precision (issue #6): a per-tensor plan at another row's size", "",
                  "`jlcm-convert --target-size BYTES` with BYTES the other row's file size: every weight matrix "
                  "gets JLCM 2/3/4-bit, Q5_0 or Q8_0 by the greedy search of docs/CONVERTER.md (k-means "
                  "codebooks; rows ending in `-learnS` add `--learn-steps S`; rows ending in `-embd-T` add "
                  "`--embd-type T`, which pins the embeddings to T and plans the rest; rows ending in `-kquants` add "
                  "`--kquants`, which also lets the plan store matrices whose width is a multiple of 256 in llama.cpp's "
                  "Q2_K–Q6_K, quantized by llama.cpp's own code with the calibration importance"
                  + ("; every llama.cpp file above stores SmolLM2's tied embedding as Q8_0" if a.model == "smollm2"
                     else "") + "). Matrices in Q5_0/Q8_0 are quantized with the importance-"
                  "weighted scale search of jlcm_gguf/standard.py (as `llama-quantize --imatrix` does).", "",
                  "| row | budget (bytes) | bytes | perplexity | row at that size | its perplexity | lower? |",
                  "|---|---:|---:|---:|---|---:|---|"]
        for r in mixed:
            ref = by[mixed_ref[r["name"]]]
            lines.append(f"| {r['name']} | {ref['bytes']:,} | {r['bytes']:,} | {r['ppl']:.3f} ± {r['ppl_err']:.3f} | "
                         f"{ref['name']} | {ref['ppl']:.3f} | {'yes' if r['ppl'] < ref['ppl'] else '**no**'} |")
    rotated = [r for r in rows if r["name"].endswith("bit-rotated")]
    if rotated:
        lines += ["", "## Rotation (--rotate)", "",
                  "The same conversion with a randomized Hadamard rotation of the residual stream folded into the "
                  "weights (docs/CONVERTER.md; a tied head is untied, which the bytes include).", "",
                  "| bits | without: bytes | perplexity | with --rotate: bytes | perplexity |", "|---:|---:|---:|---:|---:|"]
        for r in rotated:
            b = r["name"].split("-")[1]
            plain = by.get(f"jlcm-{b}")
            lines.append(f"| {b[:-3]} | {plain['bytes']:,} | {plain['ppl']:.3f} | {r['bytes']:,} | {r['ppl']:.3f} |"
                         if plain else f"| {b[:-3]} | | | {r['bytes']:,} | {r['ppl']:.3f} |")
    nearest = [r for r in rows if r["name"].endswith("bit-nearest") and r["name"].removesuffix("-nearest") in by]
    if nearest:
        lines += ["", "## GPTQ rounding against nearest rounding", "",
                  "The same k-means codebooks; block scales and indices either by GPTQ rounding through each "
                  "linear's full input Hessian (the default up to 3 bits, docs/CONVERTER.md) or with each weight at its "
                  "nearest codeword (`--rounding nearest`).", "",
                  "| bits | bytes | nearest | GPTQ | ratio |", "|---:|---:|---:|---:|---:|"]
        for r in nearest:
            g = by[r["name"].removesuffix("-nearest")]
            lines.append(f"| {r['name'].split('-')[1][:-3]} | {g['bytes']:,} | {r['ppl']:.3f} ± {r['ppl_err']:.3f} | "
                         f"{g['ppl']:.3f} ± {g['ppl_err']:.3f} | {g['ppl'] / r['ppl']:.2f} |")
    if convert_s:
        lines += ["", f"## Conversion time ({a.threads} threads, this run)", "",
                  "Wall time of each `jlcm-convert` this run did (files already in `--out` are not converted again; "
                  "a `--target-size` row's sensitivity scores are measured by the first such conversion and reused).",
                  "", "| row | arguments | seconds |", "|---|---|---:|"]
        for n, (sec, args) in convert_s.items():
            lines.append(f"| {n} | `{' '.join(args)}` | {sec:.0f} |")
        learned2 = [(n, sec) for n, (sec, args) in convert_s.items() if args[:2] == ["--bits", "2"] and "--learn-steps" in args
                    and "plain" not in args]
        for n, sec in learned2:
            lines.append("")
            lines.append(f"2-bit conversion with learning ({n}): {sec / 60:.1f} min on {a.threads} threads — "
                         + ("within" if sec <= 600 else "**over**") + " issue #4's 10 minutes.")
    if any(r.get("reused") for r in rows):
        lines += ["", f"† taken from the earlier report `{a.reuse}` (`--reuse`): measured by this script with the "
                  "same text, context and chunk count, but by an earlier version of the converter for JLCM rows."]
    lines += [""]
    report = "\n".join(lines)
    print("\n" + report)
    if a.doc:
        a.doc.write_text(report)
        svg_plot(rows, a.doc.with_suffix(".svg"))
        report_plot = f"![file size against perplexity]({a.doc.with_suffix('.svg').name})\n"
        a.doc.write_text(report + "\n" + report_plot)
    if a.json:
        a.json.write_text(json.dumps({"rows": [{k: r[k] for k in ("name", "bytes", "bpw", "ppl", "ppl_err")}
                                                for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
