// stands in for ggml-metal/kernels/common.h when jlcm.metal is compiled as C++ (tests/metal/metal_emu.h)
#pragma once
#include "metal_emu.h"
#include "ggml-metal-impl.h"
