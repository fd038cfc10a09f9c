#!/usr/bin/env python3
"""Speed of the JLCM types next to llama.cpp's own, on one model, in one run: llama-bench prompt processing
(pp) and token generation (tg) at a fixed thread count, back to back, with ratios to IQ2_XXS and the
fraction of the memory-bandwidth limit that tg reaches.

    .venv/bin/python scripts/bench.py [--threads 2] [--out out/bench] [--json speed.json] [--doc docs/speed.md]

Models (SmolLM2-135M-Instruct by default, all from the same float reference): F16; Q4_K_M, Q2_K, IQ2_XXS,
IQ2_XS made by llama-quantize with an imatrix from llama-imatrix on the default calibration text
(jlcm_gguf/calib.py, never the evaluation text); JLCM 2- and 3-bit from jlcm-convert. Files are kept in --out and reused.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jlcm_gguf.calib import DEFAULT_CALIBRATION, default_calibration_text  # noqa: E402
from jlcm_gguf.cli import main as convert_main  # noqa: E402
from jlcm_gguf.convert import llama_cpp_dir  # noqa: E402
from jlcm_gguf.evaluate import tool  # noqa: E402
from jlcm_gguf.reference_models import smollm2_hf_dir  # noqa: E402

LLAMA_TYPES = ["Q4_K_M", "Q2_K", "IQ2_XXS", "IQ2_XS"]
JLCM_BITS = [2, 3]
BASELINE = "IQ2_XXS"


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if res.returncode:
        raise SystemExit(f"error: {Path(str(cmd[0])).name} failed:\n{(res.stdout + res.stderr)[-3000:]}")
    return res


def _once(path: Path, make) -> Path:
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        make(tmp)
        os.replace(tmp, path)
    return path


def build_models(hf: Path, out: Path, threads: int) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    f16 = _once(out / "f16.gguf", lambda t: _run([sys.executable, llama_cpp_dir() / "convert_hf_to_gguf.py", hf,
                                                     "--outtype", "f16", "--outfile", t]))
    imatrix = _once(out / f"imatrix-{DEFAULT_CALIBRATION}.gguf", lambda t: _run([tool("llama-imatrix"), "-m", f16, "-f",
                                                          default_calibration_text(), "--chunks", "64", "-c", "512",
                                                          "-t", threads, "-o", t]))
    models = {"F16 (reference)": f16}
    for qt in LLAMA_TYPES:
        models[qt] = _once(out / f"{qt}-imatrix-{DEFAULT_CALIBRATION}.gguf", lambda t, qt=qt: _run([tool("llama-quantize"), "--imatrix", imatrix,
                                                                      f16, t, qt, threads]))
    for bits in JLCM_BITS:
        def convert(t, bits=bits):
            if convert_main([str(hf), "--outfile", str(t), "--bits", str(bits), "--threads", str(threads)]):
                raise SystemExit(f"error: jlcm-convert --bits {bits} failed")
        models[f"JLCM {bits}-bit"] = _once(out / f"jlcm{bits}.gguf", convert)
    return models


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of tensor data one generated token reads: every tensor, except an untied token_embd (one row)."""
    from gguf import GGUFReader
    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    untied = any(n.startswith("output.weight") for n in tensors)
    return sum(b for n, b in tensors.items() if not (untied and n.startswith("token_embd.weight")))


def copy_bandwidth(n_bytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes per second of a large memory copy (read + write counted once each), best of `repeats`."""
    src = np.ones(n_bytes // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def bench(path: Path, threads: int, pp: int, tg: int, reps: int) -> tuple[float, float]:
    res = _run([tool("llama-bench"), "-m", path, "-p", pp, "-n", tg, "-t", threads, "-r", reps, "-o", "json"],
               timeout=1800)
    rows = json.loads(res.stdout)
    return (next(r["avg_ts"] for r in rows if r["n_prompt"] == pp and r["n_gen"] == 0),
            next(r["avg_ts"] for r in rows if r["n_gen"] == tg and r["n_prompt"] == 0))


def cpu_description() -> str:
    """The CPU model and which JLCM x86 kernel its flags select (the native build uses -march=native)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown CPU")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    if {"avx512bw", "avx512vbmi", "avx512_vnni"} <= flags:
        path = "AVX-512 VBMI/VNNI kernels"
    elif "avx2" in flags:
        path = "AVX2 kernels"
    else:
        return f"{model}, {os.cpu_count()} logical CPUs, no JLCM x86 SIMD kernels"
    # prompts of 8 tokens or more take the batched path (ggml_patch jlcm.c)
    batched = ("the batched AVX-512 VNNI kernel" if {"avx512bw", "avx512vl", "avx512_vnni"} <= flags
               else "rows expanded to Q8_0 for llamafile's GEMM")
    return f"{model}, {os.cpu_count()} logical CPUs, JLCM's {path}; prompts: {batched}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=int, default=128, help="prompt tokens for the pp figure")
    ap.add_argument("--tg", type=int, default=32, help="generated tokens for the tg figure")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds; each runs every model once, so slow drift of the machine hits all models alike")
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument("--json", type=Path, help='also write {"rows": [{"name", "bytes", "pp", "tg"}, ...]} here')
    ap.add_argument("--doc", type=Path, help="write the Markdown report here (docs/speed.md)")
    a = ap.parse_args()

    models = build_models(smollm2_hf_dir(), a.out, a.threads)
    bandwidth = copy_bandwidth()
    runs = {name: [] for name in models}
    for k in range(a.rounds):
        for name, path in models.items():
            runs[name].append(bench(path, a.threads, a.pp, a.tg, 1))
        print(f"round {k + 1}/{a.rounds} done", flush=True)
    med = statistics.median
    rows = []
    for name, path in models.items():
        pp, tg = med(r[0] for r in runs[name]), med(r[1] for r in runs[name])
        # per-round ratios to the baseline measured seconds apart, then their median and range
        pp_ratio = [r[0] / b[0] for r, b in zip(runs[name], runs[BASELINE])]
        tg_ratio = [r[1] / b[1] for r, b in zip(runs[name], runs[BASELINE])]
        rows.append({"name": name, "bytes": os.path.getsize(path), "pp": pp, "tg": tg,
                     "pp_ratio": med(pp_ratio), "tg_ratio": med(tg_ratio),
                     "tg_ratio_range": (min(tg_ratio), max(tg_ratio)),
                     "bandwidth_fraction": tg * weight_bytes_per_token(path) / bandwidth})
        print(f"{name:<16} {rows[-1]['bytes']:>12,} B  pp{a.pp} {pp:8.1f} t/s  tg{a.tg} {tg:7.1f} t/s  "
              f"tg/{BASELINE} {rows[-1]['tg_ratio']:.2f}  {100 * rows[-1]['bandwidth_fraction']:5.1f}% of copy bandwidth",
              flush=True)
    by_name = {r["name"]: r for r in rows}
    jlcm2 = by_name["JLCM 2-bit"]
    targets = [
        ("JLCM 2-bit tg ≥ 1.2 × IQ2_XXS", jlcm2["tg_ratio"], 1.2),
        ("JLCM 2-bit tg ≥ Q2_K", jlcm2["tg"] / by_name["Q2_K"]["tg"], 1.0),
        ("JLCM 2-bit pp ≥ IQ2_XXS", jlcm2["pp_ratio"], 1.0),
    ]
    lines = [
        "# Speed: JLCM next to llama.cpp's types",
        "",
        f"Generated by `.venv/bin/python scripts/bench.py {' '.join(sys.argv[1:])}` on {datetime.date.today()}: "
        f"SmolLM2-135M-Instruct, `llama-bench -p {a.pp} -n {a.tg} -t {a.threads} -r 1` per model and round, "
        f"{a.rounds} rounds, each running every model once in turn (CPU backend; {cpu_description()}). Figures "
        "are medians over the rounds; ratios are medians of the per-round ratios to IQ2_XXS measured in the same "
        f"round, which cancels the machine's drift ({BASELINE}'s own tg ranged {min(r[1] for r in runs[BASELINE]):.0f}–"
        f"{max(r[1] for r in runs[BASELINE]):.0f} t/s over the rounds). Copy bandwidth measured in the same run: "
        f"{bandwidth / 1e9:.1f} GB/s. "
        "The llama.cpp types are made with `llama-quantize --imatrix` (imatrix "
        f"from `llama-imatrix` on the calibration text `{DEFAULT_CALIBRATION}`); "
        "at SmolLM2's width of 576 most of their tensors fall "
        "back to 32-wide types (IQ4_NL, Q4_0, Q5_0), which is why their files are larger than their names suggest.",
        "",
        f"| model | bytes | pp{a.pp} t/s | tg{a.tg} t/s | pp / {BASELINE} | tg / {BASELINE} (range over rounds) | "
        "tg × bytes read per token / copy bandwidth |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lo, hi = r["tg_ratio_range"]
        lines.append(f"| {r['name']} | {r['bytes']:,} | {r['pp']:.1f} | {r['tg']:.1f} | {r['pp_ratio']:.2f} | "
                     f"{r['tg_ratio']:.2f} ({lo:.2f}–{hi:.2f}) | {100 * r['bandwidth_fraction']:.0f}% |")
    lines += ["", "Targets (issue #5), from the figures above:", ""]
    for what, value, goal in targets:
        lines.append(f"- {what}: {value:.2f} × — {'met' if value >= goal else f'missed by {goal - value:.2f}'}")
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    if a.doc:
        a.doc.write_text(report)
    if a.json:
        a.json.write_text(json.dumps({"rows": [{k: r[k] for k in ("name", "bytes", "pp", "tg")} for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
