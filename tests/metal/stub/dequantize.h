// stands in for ggml-metal/kernels/dequantize.h: only the block types and tables of ggml-common.h
#pragma once
#include "common.h"
#define GGML_COMMON_DECL_METAL
#define GGML_COMMON_IMPL_METAL
#include "ggml-common.h"
