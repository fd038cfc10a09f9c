// JLCM grouped-codebook types: index unpacking shared by the reference and CPU code.
// Layouts are described in jlcm-gguf docs/FORMAT.md and mirrored by jlcm_gguf/pack.py.
#pragma once

#include "ggml-common.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// idx[j + 16*k] = (qs[j] >> 2k) & 3, j < 16, k < 4
static inline void ggml_jlcm_unpack2(const uint8_t * qs, uint8_t * idx) {
    for (int k = 0; k < 4; ++k) {
        for (int j = 0; j < 16; ++j) {
            idx[j + 16*k] = (qs[j] >> (2*k)) & 3;
        }
    }
}

static inline void ggml_jlcm_unpack3(const uint8_t * qs, const uint8_t * qh, uint8_t * idx) {
    ggml_jlcm_unpack2(qs, idx);
    for (int k = 0; k < 8; ++k) {
        for (int j = 0; j < 8; ++j) {
            idx[j + 8*k] |= ((qh[j] >> k) & 1) << 2;
        }
    }
}

static inline void ggml_jlcm_unpack4(const uint8_t * qs, uint8_t * idx) {
    for (int j = 0; j < 32; ++j) {
        idx[j]      = qs[j] & 15;
        idx[j + 32] = qs[j] >> 4;
    }
}

// unpacks block ib of a row of the given JLCM type; returns the block's fp16 scale
static inline ggml_half ggml_jlcm_unpack_block(enum ggml_type type, const void * row, int64_t ib, uint8_t * idx) {
    switch (type) {
        case GGML_TYPE_JLCM2: {
            const block_jlcm2 * b = (const block_jlcm2 *) row + ib;
            ggml_jlcm_unpack2(b->qs, idx);
            return b->d;
        }
        case GGML_TYPE_JLCM3: {
            const block_jlcm3 * b = (const block_jlcm3 *) row + ib;
            ggml_jlcm_unpack3(b->qs, b->qh, idx);
            return b->d;
        }
        default: {
            const block_jlcm4 * b = (const block_jlcm4 *) row + ib;
            ggml_jlcm_unpack4(b->qs, idx);
            return b->d;
        }
    }
}

#ifdef __cplusplus
}
#endif
