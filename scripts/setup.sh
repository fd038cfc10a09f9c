#!/usr/bin/env bash
# Sets up everything on a fresh Debian machine, idempotently (a second run takes seconds):
# system packages, .venv with pinned Python dependencies, the patched llama.cpp (tools, tests and shared
# libraries in build/bin), the patched gguf-py, llama-cpp-python 0.3.36+jlcm on top of those same
# libraries, and this project.
# With --tests (scripts/test.sh), also what only the tests use: the OpenBLAS and Vulkan builds of the same tree
# (build-blas, build-vulkan), the unpatched GGUF reader (build-stock), the cross compilers, qemu-user and libFuzzer.
set -euo pipefail
TESTS=0
case "${1:-}" in
    --tests) TESTS=1 ;;
    "") ;;
    *) echo "usage: $0 [--tests]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
ROOT=$PWD
export CCACHE_BASEDIR=$ROOT  # paths inside the checkout hash as relative ones: another clone's builds hit the cache
PY=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}

log() { printf '\n== %s\n' "$*" >&2; }

need_pkgs=()
for p in ccache patch cmake; do command -v "$p" >/dev/null || need_pkgs+=("$p"); done
command -v g++ >/dev/null || need_pkgs+=(build-essential)
if [ $TESTS = 1 ]; then
    command -v clang >/dev/null || need_pkgs+=(clang)
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
fi
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

if [ $TESTS = 1 ]; then
    # the same tree with OpenBLAS (what macOS's Accelerate and many Linux builds do): BLAS claims large matmuls, and
    # the tests check it leaves JLCM weights to the CPU backend (ccache makes this cheap after the build above)
    log "building llama.cpp with -DGGML_BLAS=ON (OpenBLAS) into build-blas"
    cmake -S . -B build-blas -DJLCM_LLAMA_SOURCE_DIR="$LLAMA" -DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS \
        >build/blas-configure.log 2>&1 || { tail -30 build/blas-configure.log; exit 1; }
    cmake --build build-blas -j"$JOBS" --target llama-perplexity test-backend-ops >build/blas-build.log 2>&1 || {
        tail -50 build/blas-build.log; exit 1; }

    # the same tree with the Vulkan backend (its JLCM kernels run on lavapipe here). Cold, it takes ~14 min on 2
    # cores (~1100 shaders, which ccache does not cache, and objects the main build does not share), so it lives
    # beside the patched tree, one per patch series, and build-vulkan links to it: another clone on this machine
    # (CI's) finds it built.
    VK_BUILD=$(dirname "$SDIST")/build-vulkan-$(cat "$SDIST/.jlcm-patched")
    for old in "$(dirname "$SDIST")"/build-vulkan-*; do [ "$old" = "$VK_BUILD" ] || rm -rf "$old"; done
    [ -L build-vulkan ] || rm -rf build-vulkan
    ln -sfn "$VK_BUILD" build-vulkan
    log "building llama.cpp with -DGGML_VULKAN=ON into $VK_BUILD (build-vulkan)"
    NO_AMX=; [ "$(uname -m)" = x86_64 ] && NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # as CMakeLists.txt
    cmake -S "$LLAMA" -B "$VK_BUILD" -DGGML_VULKAN=ON -DGGML_CCACHE=ON -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" >build/vulkan-configure.log 2>&1 || {
        tail -30 build/vulkan-configure.log; exit 1; }
    cmake --build "$VK_BUILD" -j"$JOBS" --target llama-perplexity test-backend-ops >build/vulkan-build.log 2>&1 || {
        tail -50 build/vulkan-build.log; exit 1; }

    log "building the unpatched GGUF reader (tests check that stock ggml refuses JLCM files)"
    STOCK=$("$VPY" scripts/fetch_llama.py --stock)
    cmake -S tests/c/stock -B build-stock -DSTOCK_GGML_DIR="$STOCK/vendor/llama.cpp/ggml" -DCMAKE_BUILD_TYPE=Release \
        >build/stock-configure.log 2>&1 || { tail -30 build/stock-configure.log; exit 1; }
    cmake --build build-stock -j"$JOBS" --target gguf-stock-check >build/stock-build.log 2>&1 || {
        tail -30 build/stock-build.log; exit 1; }
fi

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
