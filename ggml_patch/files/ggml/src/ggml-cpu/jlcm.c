// JLCM (jlcm-gguf) in the CPU backend. See jlcm.h and jlcm-gguf docs/FORMAT.md.
#include "jlcm.h"
#include "quants.h"
#include "ggml-quants.h"
#include "ggml-cpu.h"
#if GGML_USE_LLAMAFILE
#include "llamafile/sgemm.h"
#endif

#include <assert.h>
#include <string.h>

typedef void (*jlcm_vec_dot_cb_t)(int n, int nr, int nc, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx,
                                  size_t bx, const int8_t * const * cbs, const void * GGML_RESTRICT const * vy);

static jlcm_vec_dot_cb_t jlcm_vec_dot_cb(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_JLCM2: return ggml_vec_dot_jlcm2_q8_0_cb;
        case GGML_TYPE_JLCM3: return ggml_vec_dot_jlcm3_q8_0_cb;
        default:              return ggml_vec_dot_jlcm4_q8_0_cb;
    }
}

// the companions of matrix i02; a weight without companions has one group and the default codebook
struct jlcm_groups {
    const int8_t  * cb;       // [n_groups][n_cb]
    const int32_t * bounds;   // exclusive end row of each group, NULL for one group
    const int32_t * fwd;      // stored row -> original row, NULL if rows are in original order
    const int32_t * inv;      // original row -> stored row
    int64_t         n_groups;
    int             n_cb;
};

static struct jlcm_groups jlcm_groups_of(const struct ggml_tensor * w, int64_t i02) {
    const struct ggml_tensor * cb     = w->src[GGML_JLCM_SRC_CB];
    const struct ggml_tensor * bounds = w->src[GGML_JLCM_SRC_BOUNDS];
    const struct ggml_tensor * perm   = w->src[GGML_JLCM_SRC_PERM];
    struct jlcm_groups g = {
        /*.cb       =*/ ggml_jlcm_default_codebook(w->type),
        /*.bounds   =*/ NULL,
        /*.fwd      =*/ NULL,
        /*.inv      =*/ NULL,
        /*.n_groups =*/ 1,
        /*.n_cb     =*/ 1 << ggml_jlcm_bits(w->type),
    };
    if (cb && bounds) {
        g.cb       = (const int8_t  *) ((const char *) cb->data     + i02*cb->nb[2]);
        g.bounds   = (const int32_t *) ((const char *) bounds->data + i02*bounds->nb[1]);
        g.n_groups = bounds->ne[0];
    }
    if (perm) {
        g.fwd = (const int32_t *) ((const char *) perm->data + i02*perm->nb[2]);
        g.inv = (const int32_t *) ((const char *) perm->data + i02*perm->nb[2] + perm->nb[1]);
    }
    return g;
}

// first group whose bound exceeds row r; never past the last group, even for unvalidated bounds
static int64_t jlcm_group_of_row(const struct jlcm_groups * g, int64_t r) {
    if (!g->bounds) {
        return 0;
    }
    int64_t lo = 0, hi = g->n_groups - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (g->bounds[mid] > r) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    return lo;
}

void ggml_cpu_jlcm_mul_tile(const struct ggml_tensor * src0, int64_t i02, int64_t ir0_start, int64_t ir0_end,
                            int n_cols, const void * const * src1_cols, float * const * dst_cols) {
    const int64_t ne00 = src0->ne[0];
    const int64_t ne01 = src0->ne[1];
    const size_t  nb01 = src0->nb[1];
    const char * w = (const char *) src0->data + i02*src0->nb[2];
    const jlcm_vec_dot_cb_t vec_dot = jlcm_vec_dot_cb(src0->type);
    const struct jlcm_groups g = jlcm_groups_of(src0, i02);

    // tiles of up to GGML_JLCM_MAX_TILE rows by as many columns: a looked-up weight block serves the
    // tile's columns, a prepared activation block its rows
    int64_t grp = jlcm_group_of_row(&g, ir0_start);
    for (int64_t r = ir0_start; r < ir0_end; r += GGML_JLCM_MAX_TILE) {
        const int nr = (int) MIN(GGML_JLCM_MAX_TILE, ir0_end - r);
        const int8_t * cbs[GGML_JLCM_MAX_TILE];
        for (int i = 0; i < nr; ++i) {
            while (g.bounds && grp < g.n_groups - 1 && r + i >= g.bounds[grp]) {
                ++grp;
            }
            cbs[i] = g.cb + grp*g.n_cb;
        }
        for (int c0 = 0; c0 < n_cols; c0 += GGML_JLCM_MAX_TILE) {
            const int nc = MIN(GGML_JLCM_MAX_TILE, n_cols - c0);
            float v[GGML_JLCM_MAX_TILE*GGML_JLCM_MAX_TILE];
            vec_dot((int) ne00, nr, nc, v, w + r*nb01, nb01, cbs, src1_cols + c0);
            for (int i = 0; i < nr; ++i) {
                // a bad permutation drops the row instead of writing out of bounds
                const int64_t o = g.fwd ? g.fwd[r + i] : r + i;
                if (o < 0 || o >= ne01) {
                    continue;
                }
                for (int c = 0; c < nc; ++c) {
                    dst_cols[c0 + c][o] = v[i*nc + c];
                }
            }
        }
    }
}

// Batched path (prompt processing): each thread expands chunks of rows once, in their original order and
// with their group's codebook, and multiplies them with all columns at once; the tile kernel above pays a
// codebook lookup per row and column tile and prepares activations per row tile. x86 only, where it was
// measured (docs/speed.md): with AVX-512 VNNI a kernel of its own (arch/x86/quants.c), with AVX2 an exact
// expansion to Q8_0 for llamafile's GEMM. Elsewhere the tile kernel does every product.
// (-DGGML_JLCM_NO_BATCH keeps the tile kernel, to compare the two)
#if !defined(GGML_JLCM_NO_BATCH) && (defined(GGML_JLCM_BATCH_GEMM) || (defined(__AVX2__) && GGML_USE_LLAMAFILE))
#define GGML_JLCM_BATCHED 1
#endif
#define GGML_JLCM_BATCH_MIN_COLS  8           // below this the tile kernel is faster
#define GGML_JLCM_BATCH_CHUNK_MAX (128*1024)  // bytes of expanded rows per thread (stays in L2)

static bool jlcm_batched(const struct ggml_tensor * dst) {
#ifdef GGML_JLCM_BATCHED
    const struct ggml_tensor * src0 = dst->src[0];
    const struct ggml_tensor * src1 = dst->src[1];
    return ggml_is_jlcm(src0->type) && src1->ne[1] >= GGML_JLCM_BATCH_MIN_COLS &&
           src0->ne[2] == 1 && src0->ne[3] == 1 && src1->ne[2] == 1 && src1->ne[3] == 1;
#else
    GGML_UNUSED(dst);
    return false;
#endif
}

// bytes of one expanded row
static size_t jlcm_batch_row(int64_t n) {
#if defined(GGML_JLCM_BATCH_GEMM)
    return ggml_jlcm_batch_row_size(n);
#else
    return ggml_row_size(GGML_TYPE_Q8_0, n);
#endif
}

// shared bytes before the per-thread slots: the column panels
static size_t jlcm_batch_shared(const struct ggml_tensor * dst) {
#if defined(GGML_JLCM_BATCH_GEMM)
    return GGML_PAD(((dst->src[1]->ne[1] + 15) / 16) * ggml_jlcm_batch_panel_size(dst->src[0]->ne[0]), 64);
#else
    GGML_UNUSED(dst);
    return 0;
#endif
}

// rows per expanded chunk: a multiple of 16, within the byte budget, at least 4 chunks per thread
static int64_t jlcm_batch_rows(const struct ggml_tensor * src0, int n_threads) {
    int64_t       rows = (int64_t) (GGML_JLCM_BATCH_CHUNK_MAX / jlcm_batch_row(src0->ne[0]));
    const int64_t even = (src0->ne[1] + 4*n_threads - 1) / (4*n_threads);
    rows = MIN(rows, even);
    return MAX(16, (rows + 15) / 16 * 16);
}

size_t ggml_cpu_jlcm_wdata_size(int n_tasks, const struct ggml_tensor * dst) {
    if (!jlcm_batched(dst)) {
        return 0;
    }
    const size_t slot = GGML_PAD(jlcm_batch_rows(dst->src[0], n_tasks) * jlcm_batch_row(dst->src[0]->ne[0]), 64);
    return 64 + jlcm_batch_shared(dst) + n_tasks*slot; // 64: the alignment of the region
}

bool ggml_cpu_jlcm_mul_mat_batched(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
#ifndef GGML_JLCM_BATCHED
    GGML_UNUSED(params);
    GGML_UNUSED(dst);
    return false;
#else
    if (!jlcm_batched(dst)) {
        return false;
    }
    const struct ggml_tensor * src0 = dst->src[0];
    const struct ggml_tensor * src1 = dst->src[1];
    const int64_t ne00 = src0->ne[0];
    const int64_t ne01 = src0->ne[1];
    const int64_t ne11 = src1->ne[1];
    const size_t  row  = jlcm_batch_row(ne00);
    const int64_t rows = jlcm_batch_rows(src0, params->nth);
    const size_t  slot = GGML_PAD(rows*row, 64);
    // the region follows src1 converted to Q8_0, as planned in ggml_graph_plan
    const size_t  y_bytes = src1->type == GGML_TYPE_Q8_0 ? 0 : GGML_PAD(ggml_row_size(GGML_TYPE_Q8_0, ggml_nelements(src1)), 64);
    char * shared = (char *) GGML_PAD((uintptr_t) params->wdata + y_bytes, 64);
    char * slots  = shared + jlcm_batch_shared(dst);
    if (slots + params->nth*slot > (char *) params->wdata + params->wsize) {
        return false; // a plan made without the region
    }
    const char * y     = src1->type == GGML_TYPE_Q8_0 ? (const char *) src1->data : (const char *) params->wdata;
    const size_t y_row = src1->type == GGML_TYPE_Q8_0 ? src1->nb[1] : ggml_row_size(GGML_TYPE_Q8_0, ne00);
    char * buf = slots + params->ith*slot;
    const struct jlcm_groups g = jlcm_groups_of(src0, 0);
    float * const d   = (float *) dst->data;
    const int64_t ldc = dst->nb[1] / sizeof(float);

#if defined(GGML_JLCM_BATCH_GEMM)
    // the columns, 16 to a panel, prepared once and shared by the threads
    const size_t  panel    = ggml_jlcm_batch_panel_size(ne00);
    const int64_t n_panels = (ne11 + 15) / 16;
    for (int64_t p = params->ith; p < n_panels; p += params->nth) {
        ggml_jlcm_batch_prepare(ne00, (int) MIN(16, ne11 - 16*p), y + 16*p*y_row, y_row, shared + p*panel);
    }
    ggml_barrier(params->threadpool);
#else // AVX2: llamafile's Q8_0 GEMM, and Q8_0's vec_dot should it ever decline
    ggml_vec_dot_t const q8_dot = ggml_get_type_traits_cpu(GGML_TYPE_Q8_0)->vec_dot;
#endif

    // chunks of original rows; the counter was set to nth before the barrier that precedes this call
    const int64_t n_chunks = (ne01 + rows - 1) / rows;
    for (int64_t chunk = params->ith; chunk < n_chunks; chunk = ggml_threadpool_chunk_add(params->threadpool, 1)) {
        const int64_t o0 = chunk*rows;
        const int64_t nr = MIN(rows, ne01 - o0);
        for (int64_t i = 0; i < nr; ++i) {
            const int64_t r = g.inv ? g.inv[o0 + i] : o0 + i;
            if (r < 0 || r >= ne01) { // a bad permutation gives a zero row instead of reading out of bounds
                memset(buf + i*row, 0, row);
                continue;
            }
            const int8_t * cb = g.cb + jlcm_group_of_row(&g, r)*g.n_cb;
#if defined(GGML_JLCM_BATCH_GEMM)
            ggml_jlcm_batch_expand(src0->type, (const char *) src0->data + r*src0->nb[1], cb, ne00, buf + i*row);
#else
            ggml_jlcm_to_q8_0(src0->type, (const char *) src0->data + r*src0->nb[1], cb, buf + i*row, ne00);
#endif
        }
#if defined(GGML_JLCM_BATCH_GEMM)
        for (int64_t p = 0; p < n_panels; ++p) {
            ggml_jlcm_batch_gemm(ne00, (int) nr, buf, row, shared + p*panel, (int) MIN(16, ne11 - 16*p), d + 16*p*ldc + o0, ldc);
        }
#else
        struct ggml_compute_params one = *params; // this chunk is this thread's alone
        one.ith = 0;
        one.nth = 1;
        const bool done = llamafile_sgemm(&one, nr, ne11, ne00/QK8_0, buf, ne00/QK8_0, y, (int64_t) (y_row/sizeof(block_q8_0)),
                                          d + o0, ldc, GGML_TYPE_Q8_0, GGML_TYPE_Q8_0, GGML_TYPE_F32);
        for (int64_t c = 0; !done && c < ne11; ++c) {
            for (int64_t i = 0; i < nr; ++i) {
                q8_dot((int) ne00, d + c*ldc + o0 + i, 0, buf + i*row, 0, y + c*y_row, 0, 1);
            }
        }
#endif
    }
    return true;
#endif // GGML_JLCM_BATCHED
}

void ggml_compute_forward_get_rows_jlcm(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    const struct ggml_tensor * src0 = dst->src[0];
    const struct ggml_tensor * src1 = dst->src[1];

    GGML_TENSOR_BINARY_OP_LOCALS

    const int64_t nc = ne00;
    const int64_t nr = ggml_nelements(src1);

    assert(ne0 == nc);
    assert(ne02 == ne11);
    assert(ggml_nrows(dst) == nr);
    GGML_ASSERT(dst->type == GGML_TYPE_F32);

    const int ith = params->ith;
    const int nth = params->nth;
    const int64_t dr  = (nr + nth - 1)/nth;
    const int64_t ir0 = dr*ith;
    const int64_t ir1 = MIN(ir0 + dr, nr);

    for (int64_t i = ir0; i < ir1; ++i) {
        const int64_t i12 = i/(ne11*ne10);
        const int64_t i11 = (i - i12*ne11*ne10)/ne10;
        const int64_t i10 = (i - i12*ne11*ne10 - i11*ne10);
        const int64_t i01 = *(int32_t *) ((char *) src1->data + i10*nb10 + i11*nb11 + i12*nb12);

        GGML_ASSERT(i01 >= 0 && i01 < ne01);

        const struct jlcm_groups g = jlcm_groups_of(src0, i11);
        const int64_t r = g.inv ? g.inv[i01] : i01; // stored position of the original row
        float * out = (float *) ((char *) dst->data + i10*nb1 + i11*nb2 + i12*nb3);
        if (r < 0 || r >= ne01) { // a bad permutation gives a zero row instead of reading out of bounds
            memset(out, 0, nc*sizeof(float));
            continue;
        }
        const int64_t grp = jlcm_group_of_row(&g, r);

        ggml_jlcm_dequantize_row(src0->type,
                (const char *) src0->data + r*nb01 + i11*nb02 + i12*nb03, out, nc, g.cb + grp*g.n_cb);
    }
}
