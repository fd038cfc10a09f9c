#!/usr/bin/env python3
"""Build the patched ggml CPU kernels for each SIMD path and run them: aarch64 under qemu-user, x86 natively.

The aarch64 variants exercise both NEON code paths: `aarch64-dotprod` (armv8.2-a+dotprod, run on qemu's
`max` CPU) and `aarch64-nodotprod` (armv8-a, run on a Cortex-A53, which has no dotprod). The x86 variants
pin the instruction set instead of -march=native, so the AVX2 kernels are tested on a machine with
AVX-512 too: `x86-avx2` (AVX2, FMA, F16C) and `x86-avx512` (plus AVX-512 F/BW/VBMI/VNNI; it runs only
where the CPU has those, see `runnable()`). Each build (tests/c/cross/, static) holds jlcm-kernel-check
and test-quantize-fns; tests/test_kernels.py runs the former against the Python reference through
`runner()`.

    .venv/bin/python scripts/cross_kernels.py        # build all, run test-quantize-fns in each
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

SRC = ROOT / "tests" / "c" / "cross"
AARCH64 = [f"-DCMAKE_TOOLCHAIN_FILE={SRC / 'aarch64-linux-gnu.cmake'}"]
X86_AVX2 = ["-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DGGML_LLAMAFILE=ON"]
X86_AVX512 = X86_AVX2 + ["-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON"]
# variant -> (cmake options, command prefix that runs its binaries here, /proc/cpuinfo flags it needs)
VARIANTS = {
    "aarch64-dotprod": (AARCH64 + ["-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod"], ["qemu-aarch64", "-cpu", "max"], ()),
    "aarch64-nodotprod": (AARCH64 + ["-DGGML_CPU_ARM_ARCH=armv8-a"], ["qemu-aarch64", "-cpu", "cortex-a53"], ()),
    "x86-avx2": (X86_AVX2, [], ("avx2", "fma", "f16c")),
    "x86-avx512": (X86_AVX512, [], ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vbmi", "avx512_vnni")),
}
TARGETS = ("jlcm-kernel-check", "test-quantize-fns")
NEEDED = {"aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu", "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
          "qemu-aarch64": "qemu-user"}


def runnable(variant: str) -> str | None:
    """None if this machine can run the variant's binaries, else why not."""
    flags = VARIANTS[variant][2]
    if not flags:
        return None
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"{variant} needs an x86-64 CPU"
    try:
        have = set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return "cannot read /proc/cpuinfo"
    missing = [f for f in flags if f not in have]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def build_dir(variant: str) -> Path:
    return ROOT / f"build-{variant}"


def build(variant: str, llama_dir: Path | None = None) -> Path:
    missing = [pkg for exe, pkg in NEEDED.items() if not shutil.which(exe)] if variant.startswith("aarch64") else []
    if missing:
        raise SystemExit(f"error: missing {', '.join(missing)} (Debian: apt-get install {' '.join(missing)})")
    if llama_dir is None and os.environ.get("JLCM_LLAMA_DIR"):  # a development tree, as for the converter
        llama_dir = Path(os.environ["JLCM_LLAMA_DIR"])
    if llama_dir is None:
        import fetch_llama
        llama_dir = fetch_llama.patched_tree() / "vendor" / "llama.cpp"
    out = build_dir(variant)
    out.mkdir(exist_ok=True)
    log = out / "build.log"
    with open(log, "w") as f:
        for cmd in (["cmake", "-S", SRC, "-B", out, f"-DLLAMA_DIR={llama_dir}", *VARIANTS[variant][0]],
                    ["cmake", "--build", out, "-j", str(os.cpu_count() or 2), "--target", *TARGETS]):
            if subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT).returncode:
                sys.stderr.write(log.read_text()[-4000:])
                raise SystemExit(f"error: building the {variant} kernels failed (log: {log})")
    return out


def runner(variant: str) -> list[str]:
    """The command prefix that runs this variant's binaries on this machine."""
    return list(VARIANTS[variant][1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama", type=Path, help="patched llama.cpp tree (default: scripts/fetch_llama.py's)")
    a = ap.parse_args()
    rc = 0
    for variant in VARIANTS:
        why = runnable(variant)
        if why:
            print(f"{variant}: not run ({why})")
            continue
        out = build(variant, a.llama)
        res = subprocess.run(runner(variant) + [str(out / "test-quantize-fns")], capture_output=True, text=True)
        print(f"{variant}: test-quantize-fns exit {res.returncode}")
        if res.returncode:
            print(res.stdout[-3000:], res.stderr[-2000:])
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
