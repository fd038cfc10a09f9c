#!/usr/bin/env python3
"""Conversion time of the default model (SmolLM2-135M-Instruct) at a bit width, as whole-run wall time, next
to the vendored llama.cpp converter writing the same model as F16 in the same run.

    .venv/bin/python scripts/bench_convert.py [--bits 2] [--threads 2] [--learn-steps 40] [--tune-steps auto]
        [--rounding nearest,gptq] [--out DIR]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jlcm_gguf.convert import llama_cpp_dir  # noqa: E402
from jlcm_gguf.reference_models import smollm2_hf_dir  # noqa: E402


def timed(cmd) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--learn-steps", type=int, default=0)
    ap.add_argument("--tune-steps", default="auto", help="passed to jlcm-convert (default: its own default, auto)")
    ap.add_argument("--out", type=Path, help="keep the JLCM files here (default: a temporary folder)")
    ap.add_argument("--rounding", default="gptq", help="comma-separated: one conversion per rounding (gptq, nearest)")
    a = ap.parse_args()
    hf = smollm2_hf_dir()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = a.out or tmp_dir
        Path(tmp).mkdir(parents=True, exist_ok=True)
        t_f16 = timed([sys.executable, str(llama_cpp_dir() / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f16",
                       "--outfile", f"{tmp}/f16.gguf"])
        t_jlcm = {r: timed([sys.executable, str(ROOT / "convert_hf_to_jlcm_gguf.py"), str(hf), "--bits", str(a.bits),
                            "--learn-steps", str(a.learn_steps), "--tune-steps", a.tune_steps, "--rounding", r,
                            "--threads", str(a.threads),
                            "--outfile", f"{tmp}/jlcm-{r}.gguf"]) for r in a.rounding.split(",")}
    print(f"SmolLM2-135M-Instruct, {a.threads} threads:")
    print(f"  llama.cpp convert_hf_to_gguf.py --outtype f16 : {t_f16:7.1f} s")
    for r, t in t_jlcm.items():
        args = f"--bits {a.bits} --learn-steps {a.learn_steps} --tune-steps {a.tune_steps} --rounding {r}"
        print(f"  jlcm-convert {args:<40}: {t:7.1f} s  ({t / t_f16:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
