// JLCM (jlcm-gguf) in the CPU backend. See jlcm.h and jlcm-gguf docs/FORMAT.md.
#include "jlcm.h"
#include "quants.h"
#include "ggml-quants.h"

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
