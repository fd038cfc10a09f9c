#!/usr/bin/env python3
"""Cross-compile the patched ggml CPU kernels for aarch64 and run them under qemu-user.

Two variants, so both NEON code paths are exercised: `aarch64-dotprod` (armv8.2-a+dotprod, run on qemu's
`max` CPU) and `aarch64-nodotprod` (armv8-a, run on a Cortex-A53, which has no dotprod). Each build
(tests/c/cross/, Debian's gcc-aarch64-linux-gnu, static) holds jlcm-kernel-check and test-quantize-fns;
tests/test_kernels.py runs the former against the Python reference through `runner()`.

    .venv/bin/python scripts/cross_kernels.py        # build both, run test-quantize-fns under qemu
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

SRC = ROOT / "tests" / "c" / "cross"
AARCH64 = [f"-DCMAKE_TOOLCHAIN_FILE={SRC / 'aarch64-linux-gnu.cmake'}"]
# variant -> (cmake options, command prefix that runs its binaries here)
VARIANTS = {
    "aarch64-dotprod": (AARCH64 + ["-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod"], ["qemu-aarch64", "-cpu", "max"]),
    "aarch64-nodotprod": (AARCH64 + ["-DGGML_CPU_ARM_ARCH=armv8-a"], ["qemu-aarch64", "-cpu", "cortex-a53"]),
}
TARGETS = ("jlcm-kernel-check", "test-quantize-fns")
NEEDED = {"aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu", "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
          "qemu-aarch64": "qemu-user"}


def build_dir(variant: str) -> Path:
    return ROOT / f"build-{variant}"


def build(variant: str, llama_dir: Path | None = None) -> Path:
    missing = [pkg for exe, pkg in NEEDED.items() if not shutil.which(exe)]
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
                raise SystemExit(f"error: cross-compiling for {variant} failed (log: {log})")
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
        out = build(variant, a.llama)
        res = subprocess.run(runner(variant) + [str(out / "test-quantize-fns")], capture_output=True, text=True)
        print(f"{variant}: test-quantize-fns exit {res.returncode}")
        if res.returncode:
            print(res.stdout[-3000:], res.stderr[-2000:])
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
