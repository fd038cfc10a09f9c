// libFuzzer harness: hostile GGUF bytes through ggml's GGUF parser, the JLCM companion checks the
// model loader runs (ggml_jlcm_link, ggml_jlcm_validate, ggml_validate_row_data), and the CPU
// GET_ROWS / MUL_MAT kernels. The kernels also run on weights whose companion *values* failed
// validation: docs/FORMAT.md promises no out-of-bounds access even when validation is skipped.
// Built with AddressSanitizer and UndefinedBehaviorSanitizer by scripts/fuzz.py.
#include "ggml.h"
#include "ggml-cpu.h"
#include "gguf.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// keeps one execution in the millisecond range; larger weights add no new code paths
#define MAX_WEIGHTS (1 << 18)

static void quiet_log(enum ggml_log_level level, const char * text, void * user_data) {
    (void) level; (void) text; (void) user_data;
}

static struct ggml_tensor * companion(struct ggml_context * ctx, const struct ggml_tensor * w, const char * suffix) {
    char name[GGML_MAX_NAME + 16];
    snprintf(name, sizeof(name), "%s.%s", ggml_get_name(w), suffix);
    return ggml_get_tensor(ctx, name);
}

static void run_kernels(struct ggml_tensor * w);

// what the loader does with each JLCM weight (link, validate), then the kernels on it
static void check_jlcm_weights(struct ggml_context * ctx) {
    for (struct ggml_tensor * w = ggml_get_first_tensor(ctx); w; w = ggml_get_next_tensor(ctx, w)) {
        // (an empty weight would let the other dimensions, and the harness's buffers, grow unbounded)
        if (!ggml_is_jlcm(w->type) || w->ne[3] != 1 || ggml_nelements(w) == 0 || ggml_nelements(w) > MAX_WEIGHTS) {
            continue;
        }
        ggml_validate_row_data(w->type, w->data, ggml_nbytes(w));
        struct ggml_tensor * cb     = companion(ctx, w, "jlcm_cb");
        struct ggml_tensor * bounds = companion(ctx, w, "jlcm_bounds");
        struct ggml_tensor * perm   = companion(ctx, w, "jlcm_perm");
        char err[512];
        if (cb || bounds || perm) {
            if (!ggml_jlcm_link(w, cb, bounds, perm, err, sizeof(err))) {
                continue; // the loader refuses the file here
            }
            ggml_jlcm_validate(w, err, sizeof(err)); // its verdict is ignored on purpose, see above
        }
        run_kernels(w);
    }
}

static void run_kernels(struct ggml_tensor * w) {
    const int64_t ne0 = w->ne[0], ne1 = w->ne[1], ne2 = w->ne[2];
    const size_t mem = 16*1024*1024 + (size_t) (ne0*ne1*ne2 + 9*ne0*ne2 + 9*ne1*ne2) * sizeof(float) * 2;
    struct ggml_init_params ip = { mem, NULL, false };
    struct ggml_context * ctx = ggml_init(ip);
    if (!ctx) {
        return;
    }
    // every row of every matrix, and a product with nine columns per matrix (from 8, x86 takes the batched path)
    struct ggml_tensor * ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, ne1, ne2);
    for (int64_t e = 0; e < ne2; ++e) {
        for (int64_t r = 0; r < ne1; ++r) {
            ((int32_t *) ids->data)[e*ne1 + r] = (int32_t) r;
        }
    }
    struct ggml_tensor * x = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, ne0, 9, ne2);
    for (int64_t i = 0; i < ggml_nelements(x); ++i) {
        ((float *) x->data)[i] = (float) ((i * 7919) % 13) - 6.0f;
    }
    struct ggml_tensor * rows = ggml_get_rows(ctx, w, ids);
    struct ggml_tensor * mm   = ggml_mul_mat(ctx, w, x);
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, rows);
    ggml_build_forward_expand(gf, mm);
    ggml_graph_compute_with_ctx(ctx, gf, 1);
    ggml_free(ctx);
}

// the tensors' data inside the file image, as llama.cpp's loader maps it; false if any lies outside
static bool map_tensor_data(struct gguf_context * gguf, struct ggml_context * ctx, uint8_t * image, size_t size) {
    const size_t data_offset = gguf_get_data_offset(gguf);
    for (int64_t i = 0; i < gguf_get_n_tensors(gguf); ++i) {
        struct ggml_tensor * t = ggml_get_tensor(ctx, gguf_get_tensor_name(gguf, i));
        const size_t offs = data_offset + gguf_get_tensor_offset(gguf, i);
        const size_t nbytes = ggml_nbytes(t);
        if (offs < data_offset || offs > size || nbytes > size - offs) {
            return false; // the loader's "data is not within the file bounds"
        }
        t->data = image + offs;
    }
    return true;
}

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    static int initialized = 0;
    if (!initialized) {
        ggml_log_set(quiet_log, NULL);
        initialized = 1;
    }
    // metadata only, as llama.cpp's loader reads it; the data stays in the (page-aligned) file image
    struct ggml_context * ctx = NULL;
    struct gguf_init_params params = { /*.no_alloc =*/ true, /*.ctx =*/ &ctx };
    struct gguf_context * gguf = gguf_init_from_buffer(data, size, params);
    if (!gguf) {
        return 0;
    }
    uint8_t * image = NULL;
    if (size > 0 && posix_memalign((void **) &image, 4096, size) == 0) {
        memcpy(image, data, size);
        if (map_tensor_data(gguf, ctx, image, size)) {
            check_jlcm_weights(ctx);
        }
    }
    free(image);
    ggml_free(ctx);
    gguf_free(gguf);
    return 0;
}
