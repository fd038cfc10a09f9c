#!/usr/bin/env python3
"""The 7B promise, measured (issue #6): a Llama-2-7B-shaped checkpoint converted under a 2.0 GB budget.

    .venv/bin/python scripts/prove_7b.py [--out out/7b] [--doc docs/7b.md] [--target-size 2.0GB]

One run: writes the synthetic checkpoint (scripts/make_synthetic_llama.py, random weights: quality is
proven on real models in docs/measurements/results.md, not here), converts it with `jlcm-convert --target-size --fast`,
and reports file bytes against the budget, whether `llama-completion` loads it and generates at ctx 2048,
its peak resident memory, and `llama-bench` prompt/generation speed at 2 threads next to IQ2_XXS of the same
weights (llama-quantize from an F16 GGUF of the checkpoint, with an imatrix from llama-imatrix on the
calibration text). Needs ~30 GB of disk and tens of minutes: a benchmark, not part of the test suite.
`--config tiny` runs the same steps on a small model (what the test suite does).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import make_synthetic_llama  # noqa: E402
from bench import _once as once, _run as run  # noqa: E402
from jlcm_gguf.calib import DEFAULT_CALIBRATION, default_calibration_text  # noqa: E402
from jlcm_gguf.convert import llama_cpp_dir  # noqa: E402
from jlcm_gguf.evaluate import tool  # noqa: E402
from jlcm_gguf.plan import parse_size  # noqa: E402


def step(msg: str) -> None:
    print(f"== {msg}", flush=True)


# Linux carries a process's peak RSS across fork and exec, so a tool forked from this (possibly large)
# Python process would report at least this process's size: a small helper forks the tool instead and
# reports the tool's own peak (ru_maxrss of wait4, KiB) on its last stderr line.
_MEASURE = ("import os, sys\npid = os.fork()\nif pid == 0:\n    os.execv(sys.argv[1], sys.argv[1:])\n"
            "_, status, usage = os.wait4(pid, 0)\nsys.stderr.write(f'\\njlcm-peak-rss-kib {usage.ru_maxrss}\\n')\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def peak_rss_run(cmd: list, log: Path | None = None) -> tuple[subprocess.CompletedProcess, int]:
    """Runs cmd and returns its peak resident set size in bytes. With `log`, stdout and stderr go there as
    they come (progress can be followed) and come back as stdout."""
    import re
    import tempfile
    with (open(log, "w+") if log else tempfile.TemporaryFile("w+")) as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.run([sys.executable, "-S", "-c", _MEASURE, *[str(c) for c in cmd]], stdout=out,
                           stderr=out if log else err, stdin=subprocess.DEVNULL, text=True)
        out.seek(0)
        err.seek(0)
        res = subprocess.CompletedProcess(cmd, p.returncode, out.read(), err.read())
    found = re.findall(r"^jlcm-peak-rss-kib (\d+)$", res.stderr or res.stdout, re.M)
    return res, int(found[-1]) * 1024 if found else 0


def llama_bench(model: Path, threads: int, pp: int, tg: int, reps: int) -> dict:
    res = run([tool("llama-bench"), "-m", model, "-t", threads, "-p", pp, "-n", tg, "-r", reps, "-o", "json"])
    rows = json.loads(res.stdout)
    return {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama2-7b", choices=sorted(make_synthetic_llama.CONFIGS))
    ap.add_argument("--out", type=Path, default=Path("out/7b"))
    ap.add_argument("--doc", type=Path, help="write the Markdown report here (docs/7b.md)")
    ap.add_argument("--target-size", default="2.0GB")
    ap.add_argument("--rss-target", default="2.5GB", help="peak resident memory target at ctx 2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--cache-types", default="f16,q8_0,q4_0",
                    help="KV cache types to measure peak memory with (llama.cpp -ctk/-ctv; the first is the default)")
    ap.add_argument("--pp", type=int, default=64)
    ap.add_argument("--tg", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--imatrix-chunks", type=int, default=4)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    target, rss_target = parse_size(a.target_size), parse_size(a.rss_target)
    a.cache_types = [c for c in a.cache_types.split(",") if c]
    t0 = time.time()

    hf = a.out / "hf"
    step(f"synthetic checkpoint ({a.config}) in {hf}")
    if not (hf / "config.json").exists():
        make_synthetic_llama.main([str(hf), "--config", a.config])

    step(f"jlcm-convert --target-size {a.target_size} --fast")
    timing = a.out / "convert.json"  # time and memory, kept with the file for a rerun that reuses it

    def convert(t):
        tc = time.time()
        res, peak = peak_rss_run([sys.executable, ROOT / "convert_hf_to_jlcm_gguf.py", hf, "--outfile", t,
                                  "--target-size", target, "--fast", "--nsamples", 8, "--seqlen", 128,
                                  "--threads", a.threads, "--save-plan", a.out / "plan.json"], log=a.out / "convert.log")
        if res.returncode:
            raise SystemExit(f"error: jlcm-convert failed ({a.out / 'convert.log'}):\n{res.stdout[-3000:]}")
        timing.write_text(json.dumps({"seconds": round(time.time() - tc, 1), "peak_rss": peak}) + "\n")
    reused = [f for f in ("jlcm.gguf", f"iq2_xxs-imatrix-{DEFAULT_CALIBRATION}.gguf") if (a.out / f).exists()]
    jlcm = once(a.out / "jlcm.gguf", convert)
    conv = json.loads(timing.read_text()) if timing.exists() else {}
    convert_s, convert_rss = conv.get("seconds", float("nan")), conv.get("peak_rss", 0)

    step("F16 GGUF, imatrix, IQ2_XXS with llama.cpp's own tools")
    f16 = once(a.out / "f16.gguf", lambda t: run([sys.executable, llama_cpp_dir() / "convert_hf_to_gguf.py", hf,
                                                  "--outtype", "f16", "--outfile", t]))
    imatrix = once(a.out / f"imatrix-{DEFAULT_CALIBRATION}.gguf", lambda t: run(
        [tool("llama-imatrix"), "-m", f16, "-f", default_calibration_text(), "--chunks", a.imatrix_chunks,
         "-c", 512, "-t", a.threads, "-o", t]))
    iq2 = once(a.out / f"iq2_xxs-imatrix-{DEFAULT_CALIBRATION}.gguf", lambda t: run([tool("llama-quantize"), "--imatrix", imatrix, f16, t,
                                                       "IQ2_XXS", a.threads]))

    step(f"llama-completion at ctx {a.ctx}: load, generate, peak resident memory (KV cache {', '.join(a.cache_types)})")
    prompt = "The capital of France is"

    def completion(model: Path, cache: str) -> tuple[bool, int]:
        # a quantized V cache needs flash attention in llama.cpp
        kv = [] if cache == "f16" else ["-ctk", cache, "-ctv", cache, "-fa", "on"]
        res, peak = peak_rss_run([tool("llama-completion"), "-m", model, "-c", a.ctx, "-p", prompt, "-n", 16,
                                  "-t", a.threads, "--temp", 0, "-no-cnv", *kv])
        return res.returncode == 0 and prompt in res.stdout, peak
    runs = {c: (completion(jlcm, c), completion(iq2, c)) for c in a.cache_types}
    generated = all(j[0] for j, _ in runs.values())
    rss = {c: j[1] for c, (j, _) in runs.items()}
    rss_iq2 = {c: q[1] for c, (_, q) in runs.items()}
    fitting = [c for c in a.cache_types if rss[c] <= rss_target]

    step(f"llama-bench -t {a.threads} -p {a.pp} -n {a.tg} -r {a.reps}, interleaved")
    speeds = {"jlcm": [], "iq2": []}
    for _ in range(a.reps):
        speeds["jlcm"].append(llama_bench(jlcm, a.threads, a.pp, a.tg, 1))
        speeds["iq2"].append(llama_bench(iq2, a.threads, a.pp, a.tg, 1))
    med = {k: {m: sorted(r[m] for r in v)[len(v) // 2] for m in ("pp", "tg")} for k, v in speeds.items()}

    size, size_iq2 = jlcm.stat().st_size, iq2.stat().st_size
    plan = json.loads((a.out / "plan.json").read_text()) if (a.out / "plan.json").exists() else {}
    kinds = plan.get("tensors", {})
    mix = {k: sum(1 for v in kinds.values() if v == k) for k in sorted(set(kinds.values()))}
    result = {"config": a.config, "bytes": size, "target": target, "fits": size <= target, "loads_and_generates": generated,
              "peak_rss": rss, "rss_target": rss_target, "rss_target_met_with": fitting, "peak_rss_iq2_xxs": rss_iq2, "iq2_xxs_bytes": size_iq2,
              "speed": med, "convert_seconds": convert_s, "convert_peak_rss": convert_rss, "plan_mix": mix}
    (a.out / "result.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# {'Llama-2-7B' if a.config == 'llama2-7b' else a.config}-shaped model under {a.target_size}",
        "",
        f"Generated by `.venv/bin/python scripts/prove_7b.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
        f"on {datetime.date.today()} ({platform.machine()}, {os.cpu_count()} CPUs; total run {time.time() - t0:.0f} s). "
        "The checkpoint has Llama-2-7B's names and shapes and random weights (scripts/make_synthetic_llama.py), so "
        "this measures size, loading, memory and speed, not quality (docs/measurements/results.md does that on real models)."
        + (f" This run reused {' and '.join(reused)} from an earlier run in {a.out} (the conversion figures are "
           "that run's, kept in convert.json)." if reused else ""),
        "",
        "| what | measured | target |",
        "|---|---:|---|",
        f"| file bytes | {size:,} | ≤ {target:,}: {'met' if size <= target else '**missed**'} |",
        f"| llama-completion loads it and generates (ctx {a.ctx}, KV cache {', '.join(a.cache_types)}) | "
        f"{'yes' if generated else '**no**'} | yes |",
        *(f"| peak resident memory, ctx {a.ctx}, KV cache {c} | {rss[c] / 1e9:.2f} GB | ≤ {rss_target / 1e9:.1f} GB: "
          f"{'met' if rss[c] <= rss_target else '**missed**'} |" for c in a.cache_types),
        f"| conversion time (`--fast`, {a.threads} threads) | {convert_s:.0f} s | |",
        f"| conversion peak resident memory | {convert_rss / 1e9:.1f} GB | within the machine's "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB |",
        "",
        f"Speed, `llama-bench -t {a.threads} -p {a.pp} -n {a.tg}`, median of {a.reps} interleaved rounds (tokens/s):",
        "",
        f"| model | bytes | pp | tg | peak RSS (KV cache {' / '.join(a.cache_types)}) |",
        "|---|---:|---:|---:|---:|",
        f"| JLCM plan | {size:,} | {med['jlcm']['pp']:.2f} | {med['jlcm']['tg']:.2f} | "
        + " / ".join(f"{rss[c] / 1e9:.2f}" for c in a.cache_types) + " GB |",
        f"| IQ2_XXS (imatrix) | {size_iq2:,} | {med['iq2']['pp']:.2f} | {med['iq2']['tg']:.2f} | "
        + " / ".join(f"{rss_iq2[c] / 1e9:.2f}" for c in a.cache_types) + " GB |",
        f"| ratio JLCM / IQ2_XXS | {size / size_iq2:.2f} | {med['jlcm']['pp'] / med['iq2']['pp']:.2f} | "
        f"{med['jlcm']['tg'] / med['iq2']['tg']:.2f} | "
        + " / ".join(f"{rss[c] / rss_iq2[c]:.2f}" for c in a.cache_types) + " |",
        "",
        f"Peak resident memory counts the weights (memory-mapped, all touched while generating), the KV cache of "
        f"ctx {a.ctx} (llama.cpp clears it at start) and the compute buffers. The {rss_target / 1e9:.1f} GB target "
        + (f"is met with the KV cache in {', '.join(fitting)}" if fitting else "is not met with any KV cache type measured")
        + (f" (not with {', '.join(c for c in a.cache_types if c not in fitting)})." if len(fitting) < len(a.cache_types) else "."),
        "",
        "Plan (weight matrices per type): " + ", ".join(f"{k} ×{v}" for k, v in mix.items()) + ".",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if a.doc:
        a.doc.write_text(report)
    return 0 if size <= target and generated else 1


if __name__ == "__main__":
    sys.exit(main())
