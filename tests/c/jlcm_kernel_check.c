// Runs a JLCM weight through the CPU backend's GET_ROWS and MUL_MAT, for comparison with the
// Python reference (tests/test_kernels.py).
//
//   jlcm-kernel-check IN.gguf OUT.f32 [THREADS]
//
// IN holds "w" (a JLCM type), optionally its companions "w.jlcm_cb", "w.jlcm_bounds", "w.jlcm_perm",
// and "x" (f32 [w.ne0, n]). OUT receives GET_ROWS(w, 0..rows-1) then MUL_MAT(w, x), as raw f32.
// Exit status 2 with one line on stderr when the companions are refused.
#include "ggml.h"
#include "ggml-cpu.h"
#include "gguf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s IN.gguf OUT.f32 [THREADS]\n", argv[0]);
        return 1;
    }
    const int n_threads = argc > 3 ? atoi(argv[3]) : 1;

    struct ggml_context * data_ctx = NULL;
    struct gguf_init_params gp = { /*.no_alloc =*/ false, /*.ctx =*/ &data_ctx };
    struct gguf_context * gguf = gguf_init_from_file(argv[1], gp);
    if (!gguf) {
        fprintf(stderr, "error: cannot read %s\n", argv[1]);
        return 1;
    }
    struct ggml_tensor * w = ggml_get_tensor(data_ctx, "w");
    struct ggml_tensor * x = ggml_get_tensor(data_ctx, "x");
    if (!w || !x) {
        fprintf(stderr, "error: %s needs tensors w and x\n", argv[1]);
        return 1;
    }
    struct ggml_tensor * cb     = ggml_get_tensor(data_ctx, "w.jlcm_cb");
    struct ggml_tensor * bounds = ggml_get_tensor(data_ctx, "w.jlcm_bounds");
    struct ggml_tensor * perm   = ggml_get_tensor(data_ctx, "w.jlcm_perm");
    char err[512];
    if (cb || bounds || perm) {
        if (!ggml_jlcm_link(w, cb, bounds, perm, err, sizeof(err)) || !ggml_jlcm_validate(w, err, sizeof(err))) {
            fprintf(stderr, "invalid JLCM tensor: %s\n", err);
            return 2;
        }
    }

    const int64_t n_rows = w->ne[1];
    struct ggml_init_params ip = { /*.mem_size =*/ 64*1024*1024 + 4*(size_t) ggml_nbytes(x) + 16*(size_t) (w->ne[0]*n_rows), NULL, false };
    struct ggml_context * ctx = ggml_init(ip);
    struct ggml_tensor * ids = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_rows);
    for (int64_t i = 0; i < n_rows; ++i) {
        ((int32_t *) ids->data)[i] = (int32_t) i;
    }
    struct ggml_tensor * rows = ggml_get_rows(ctx, w, ids);
    struct ggml_tensor * mm   = ggml_mul_mat(ctx, w, x);
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, rows);
    ggml_build_forward_expand(gf, mm);
    if (ggml_graph_compute_with_ctx(ctx, gf, n_threads) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "error: graph compute failed\n");
        return 1;
    }

    FILE * f = fopen(argv[2], "wb");
    if (!f || fwrite(rows->data, 1, ggml_nbytes(rows), f) != ggml_nbytes(rows) ||
        fwrite(mm->data, 1, ggml_nbytes(mm), f) != ggml_nbytes(mm) || fclose(f) != 0) {
        fprintf(stderr, "error: cannot write %s\n", argv[2]);
        return 1;
    }
    ggml_free(ctx);
    ggml_free(data_ctx);
    gguf_free(gguf);
    return 0;
}
