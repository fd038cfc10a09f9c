#!/usr/bin/env bash
# Regenerates the ggml_patch/ series from a development tree (a git checkout of the pinned
# llama.cpp with the changes applied). New files live in ggml_patch/files/ and are copied, not diffed.
#   scripts/export_patch.sh DEV_LLAMA_CPP_DIR
set -euo pipefail
dev=${1:?usage: $0 DEV_LLAMA_CPP_DIR}
out=$(cd "$(dirname "$0")/.." && pwd)/ggml_patch
rm -f "$out"/*.patch
series() { # name paths...
    local name=$1; shift
    git -C "$dev" diff --no-color -- "$@" > "$out/$name"
    [ -s "$out/$name" ] || rm -f "$out/$name"
}
series 0001-ggml-jlcm-types-and-reference.patch ggml/include ggml/src/ggml-common.h ggml/src/ggml-quants.c ggml/src/ggml-quants.h ggml/src/ggml.c
series 0002-ggml-cpu-jlcm-matmul-getrows.patch ggml/src/ggml-cpu
series 0003-ggml-metal-jlcm-kernels.patch ggml/src/ggml-metal
series 0004-llama-jlcm-companions-ftypes.patch include src tools
series 0005-tests-jlcm-types.patch tests
series 0006-gguf-py-jlcm-types.patch gguf-py
series 0007-gguf-shape-check-as-ggml.patch ggml/src/gguf.cpp
series 0008-ggml-backends-jlcm-stays-with-companions.patch ggml/src/ggml-backend.cpp ggml/src/ggml-blas ggml/src/ggml-rpc
series 0009-ggml-vulkan-jlcm-kernels.patch ggml/src/ggml-vulkan
ls -1 "$out"/*.patch
