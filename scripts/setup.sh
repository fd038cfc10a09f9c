#!/usr/bin/env bash
# Sets up everything on a fresh Debian machine, idempotently (a second run takes seconds):
# system packages, .venv with pinned Python dependencies, the patched llama.cpp (tools, tests and shared
# libraries in build/bin), the patched gguf-py, llama-cpp-python 0.3.36+jlcm on top of those same
# libraries, and this project.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}

log() { printf '\n== %s\n' "$*" >&2; }

need_pkgs=()
for p in ccache patch cmake clang; do command -v "$p" >/dev/null || need_pkgs+=("$p"); done
command -v g++ >/dev/null || need_pkgs+=(build-essential)
# libFuzzer's runtime, for the fuzz harness (scripts/fuzz.py)
compgen -G "/usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-*.a" >/dev/null || need_pkgs+=(libclang-rt-14-dev)
# the aarch64 cross compilers and qemu-user, for the NEON kernel tests (scripts/cross_kernels.py)
command -v aarch64-linux-gnu-g++ >/dev/null || need_pkgs+=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need_pkgs+=(qemu-user)
# OpenBLAS, for the BLAS build the tests compare against (build-blas)
[ -f /usr/include/x86_64-linux-gnu/openblas-pthread/cblas.h ] || [ -f /usr/include/openblas/cblas.h ] || \
    compgen -G "/usr/include/*/openblas*/cblas.h" >/dev/null || need_pkgs+=(libopenblas-dev pkg-config)
# Vulkan headers, the shader compiler and Mesa's lavapipe (a software Vulkan device), for build-vulkan
command -v glslc >/dev/null || need_pkgs+=(glslc)
[ -f /usr/include/vulkan/vulkan.h ] || need_pkgs+=(libvulkan-dev)
compgen -G "/usr/share/vulkan/icd.d/lvp_icd*.json" >/dev/null || need_pkgs+=(mesa-vulkan-drivers)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    $PY -m venv .venv
fi
VPY=$ROOT/.venv/bin/python
pipi() { "$VPY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v '^WARNING: Location' >&2); }

req_hash=$(sha256sum requirements.txt | cut -c1-16)
if [ ! -f .venv/.jlcm-requirements ] || [ "$(cat .venv/.jlcm-requirements)" != "$req_hash" ]; then
    log "installing Python dependencies (requirements.txt; torch 2.13.0 CPU)"
    pipi -r requirements.txt
    "$VPY" -c "import torch, numpy, safetensors, sentencepiece, tqdm, pytest, transformers"
    echo "$req_hash" > .venv/.jlcm-requirements
fi

log "fetching and patching llama.cpp"
SDIST=$("$VPY" scripts/fetch_llama.py)
LLAMA=$SDIST/vendor/llama.cpp

mkdir -p build
log "building llama.cpp (ccache; a clean build takes ~6 min on 2 cores)"
cmake -S . -B build -DJLCM_LLAMA_SOURCE_DIR="$LLAMA" >build/cmake-configure.log 2>&1 || {
    tail -30 build/cmake-configure.log; exit 1; }
cmake --build build -j"$JOBS" --target llama-cli llama-completion llama-perplexity llama-bench llama-quantize \
    llama-imatrix llama-server llama-export-lora ggml-rpc-server test-quantize-fns test-backend-ops jlcm-kernel-check jlcm-offload-check \
    >build/cmake-build.log 2>&1 || { tail -50 build/cmake-build.log; exit 1; }

# the same tree with OpenBLAS (what macOS's Accelerate and many Linux builds do): BLAS claims large matmuls, and
# the tests check it leaves JLCM weights to the CPU backend (ccache makes this cheap after the build above)
log "building llama.cpp with -DGGML_BLAS=ON (OpenBLAS) into build-blas"
cmake -S . -B build-blas -DJLCM_LLAMA_SOURCE_DIR="$LLAMA" -DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS \
    >build/blas-configure.log 2>&1 || { tail -30 build/blas-configure.log; exit 1; }
cmake --build build-blas -j"$JOBS" --target llama-perplexity test-backend-ops >build/blas-build.log 2>&1 || {
    tail -50 build/blas-build.log; exit 1; }

# the same tree with the Vulkan backend (its JLCM kernels run on lavapipe here; ~10 min the first time, most of it
# compiling the shaders)
log "building llama.cpp with -DGGML_VULKAN=ON into build-vulkan"
cmake -S . -B build-vulkan -DJLCM_LLAMA_SOURCE_DIR="$LLAMA" -DGGML_VULKAN=ON \
    >build/vulkan-configure.log 2>&1 || { tail -30 build/vulkan-configure.log; exit 1; }
cmake --build build-vulkan -j"$JOBS" --target llama-perplexity test-backend-ops >build/vulkan-build.log 2>&1 || {
    tail -50 build/vulkan-build.log; exit 1; }

log "building the unpatched GGUF reader (tests check that stock ggml refuses JLCM files)"
STOCK=$("$VPY" scripts/fetch_llama.py --stock)
cmake -S tests/c/stock -B build-stock -DSTOCK_GGML_DIR="$STOCK/vendor/llama.cpp/ggml" -DCMAKE_BUILD_TYPE=Release \
    >build/stock-configure.log 2>&1 || { tail -30 build/stock-configure.log; exit 1; }
cmake --build build-stock -j"$JOBS" --target gguf-stock-check >build/stock-build.log 2>&1 || {
    tail -30 build/stock-build.log; exit 1; }

stamp=$(cat "$SDIST/.jlcm-patched")
if [ "$("$VPY" -c 'import gguf.constants as c; print(hasattr(c.GGMLQuantizationType, "JLCM2"))' 2>/dev/null)" != True ] \
   || [ ! -f .venv/.jlcm-gguf-py ] || [ "$(cat .venv/.jlcm-gguf-py)" != "$stamp" ]; then
    log "installing the patched gguf-py"
    pipi --force-reinstall --no-deps "$LLAMA/gguf-py"
    echo "$stamp" > .venv/.jlcm-gguf-py
fi

libs_hash=$(cat build/bin/lib*.so | sha256sum | cut -c1-16)
if [ ! -f .venv/.jlcm-llama-cpp-python ] || [ "$(cat .venv/.jlcm-llama-cpp-python)" != "$libs_hash" ]; then
    log "installing llama-cpp-python 0.3.36+jlcm on the patched libraries"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF -DJLCM_PREBUILT_LIB_DIR=$ROOT/build/bin" \
        pipi --no-cache-dir --force-reinstall --no-deps "$SDIST"
    echo "$libs_hash" > .venv/.jlcm-llama-cpp-python
fi

if [ ! -x .venv/bin/jlcm-convert ]; then  # (import jlcm_gguf would succeed from the checkout alone)
    log "installing jlcm-gguf"
    pipi --no-deps -e .
fi
"$VPY" -c "import llama_cpp, gguf, jlcm_gguf; assert llama_cpp.__version__.endswith('+jlcm'), llama_cpp.__version__"
log "setup done: tools in build/bin, Python in .venv"
