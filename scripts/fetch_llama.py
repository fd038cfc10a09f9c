#!/usr/bin/env python3
"""Fetch the pinned llama.cpp (vendored in the llama-cpp-python sdist), apply ggml_patch/, print the tree.

The patched sdist lands in $JLCM_CACHE (default ~/.cache/jlcm-gguf); its stamp file holds a hash of the
patch series, so a changed patch gives a fresh tree and an unchanged one is reused.
Prints the patched sdist directory; llama.cpp is its vendor/llama.cpp.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LOCAL_VERSION = f"{SDIST_VERSION}+jlcm"

ROOT = Path(__file__).resolve().parent.parent
PATCH_DIR = ROOT / "ggml_patch"
sys.path.insert(0, str(ROOT))
from jlcm_gguf.cache import cache_dir, pip_download  # noqa: E402  (standard library only)


def patch_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(PATCH_DIR.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(PATCH_DIR)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def fetch_sdist() -> Path:
    return pip_download(f"{SDIST_NAME}=={SDIST_VERSION}", SDIST_FILE, SDIST_SHA256, binary=False)


def apply_patches(sdist_dir: Path) -> None:
    """ggml_patch/*.patch apply to llama.cpp, ggml_patch/sdist/*.patch to the llama-cpp-python sdist."""
    llama = sdist_dir / "vendor" / "llama.cpp"
    for where, patches in ((llama, PATCH_DIR.glob("*.patch")), (sdist_dir, (PATCH_DIR / "sdist").glob("*.patch"))):
        for patch in sorted(patches):
            subprocess.run(["patch", "-p1", "--forward", "--quiet", "-i", str(patch)], cwd=where, check=True)
    files = PATCH_DIR / "files"
    for src in sorted(files.rglob("*")):
        if src.is_file():
            dst = llama / src.relative_to(files)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    # a local version keeps pip's wheel cache from answering with the stock build
    init = sdist_dir / "llama_cpp" / "__init__.py"
    text = init.read_text()
    init.write_text(text.replace(f'__version__ = "{SDIST_VERSION}"', f'__version__ = "{LOCAL_VERSION}"'))


def _unpack(target: Path, stamp: str, text: str, prepare=None) -> Path:
    """Extracts the sdist next to target, lets prepare() change it, writes the stamp, renames it into place."""
    sdist = fetch_sdist()
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        sdist_dir = Path(tmp) / f"llama_cpp_python-{SDIST_VERSION}"
        if prepare:
            prepare(sdist_dir)
        (sdist_dir / stamp).write_text(text + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(sdist_dir, target)
    return target


def patched_tree() -> Path:
    # one stable path (re-made when the patch series changes), so ccache hits across rebuilds
    target = cache_dir() / f"llama-cpp-python-{SDIST_VERSION}-jlcm"
    stamp = target / ".jlcm-patched"
    if stamp.exists() and stamp.read_text().strip() == patch_hash():
        return target
    return _unpack(target, ".jlcm-patched", patch_hash(), apply_patches)


def stock_tree() -> Path:
    """The same sdist without the patch series, for checking that stock readers refuse JLCM files."""
    target = cache_dir() / f"llama-cpp-python-{SDIST_VERSION}-stock"
    if (target / ".jlcm-stock").exists():
        return target
    return _unpack(target, ".jlcm-stock", "unpatched")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama", action="store_true", help="print the llama.cpp directory instead of the sdist's")
    ap.add_argument("--stock", action="store_true", help="the unpatched sdist instead of the patched one")
    args = ap.parse_args()
    tree = stock_tree() if args.stock else patched_tree()
    print(tree / "vendor" / "llama.cpp" if args.llama else tree)


if __name__ == "__main__":
    main()
