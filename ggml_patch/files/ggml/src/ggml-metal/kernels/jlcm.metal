// JLCM grouped-codebook types (jlcm-gguf): get_rows (dequantize), mul_mv and mul_mm.
// Block layouts are in ggml-common.h (block_jlcm2/3/4, 64 weights, fp16 scale), the C reference in
// ggml-quants.c. A weight's group codebooks (int8 [2^b, n_groups, n_mat]), group bounds (int32
// [n_groups, n_mat], exclusive end rows) and optional row permutation (int32 [rows, 2, n_mat]: stored
// -> original, then original -> stored) are companion tensors, bound after dst (buffers 4..6). With
// n_groups == 0 the type's default codebook is used (a weight made by llama-quantize).
// Out-of-range permutation entries or row ids give zero rows / dropped rows, never out-of-bounds access.
#include "common.h"
#include "dequantize.h"

#define JLCM_QK      64
#define JLCM_MM_ROWS 32 // mul_mm tile: weight rows x activation columns, 64 threads
#define JLCM_MM_COLS 16

static inline int jlcm_index(device const block_jlcm2 * b, int j) {
    return (b->qs[j%16] >> (2*(j/16))) & 3;
}

static inline int jlcm_index(device const block_jlcm3 * b, int j) {
    return ((b->qs[j%16] >> (2*(j/16))) & 3) | (((b->qh[j%8] >> (j/8)) & 1) << 2);
}

static inline int jlcm_index(device const block_jlcm4 * b, int j) {
    return j < 32 ? (b->qs[j] & 15) : (b->qs[j - 32] >> 4);
}

// entry i of the default codebook of the type with ncb entries
template <int ncb>
static inline float jlcm_default_codeword(int i) {
    return ncb == 4 ? kvalues_jlcm2[i] : ncb == 8 ? kvalues_jlcm3[i] : kvalues_iq4nl[i];
}

// first group whose bound exceeds row r, never past the last group (as ggml-cpu/jlcm.c)
static inline int jlcm_group_of_row(device const int32_t * bounds, int n_groups, int r) {
    int lo = 0, hi = n_groups - 1;
    while (lo < hi) {
        const int mid = (lo + hi)/2;
        if (bounds[mid] > r) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    return lo;
}

// the codebook of stored row r of matrix i02, as floats
template <typename block_t, int ncb>
static inline void jlcm_load_codebook(constant ggml_metal_kargs_jlcm & args, device const char * cb,
                                      device const char * bounds, int i02, int r, thread float * cbf) {
    if (args.n_groups == 0) {
        for (int i = 0; i < ncb; ++i) {
            cbf[i] = jlcm_default_codeword<ncb>(i);
        }
        return;
    }
    device const int32_t * b = (device const int32_t *) (bounds + i02*args.nb_bounds1);
    const int g = jlcm_group_of_row(b, args.n_groups, r);
    device const int8_t * c = (device const int8_t *) (cb + i02*args.nb_cb2) + g*ncb;
    for (int i = 0; i < ncb; ++i) {
        cbf[i] = c[i];
    }
}

// entry `which` (0: stored -> original, 1: original -> stored) of row i of matrix i02; i without permutation
static inline int jlcm_perm(constant ggml_metal_kargs_jlcm & args, device const char * perm, int i02, int which, int i) {
    if (!args.has_perm) {
        return i;
    }
    return ((device const int32_t *) (perm + i02*args.nb_perm2 + which*args.nb_perm1))[i];
}

// one threadgroup per output row; threads stride over the row's weights
template <typename block_t, int ncb>
static void jlcm_get_rows(constant ggml_metal_kargs_jlcm & args, device const char * src0, device const char * src1,
                          device char * dst, device const char * cb, device const char * bounds, device const char * perm,
                          uint3 tgpig, ushort tiitg, ushort ntg) {
    const int i10 = tgpig.x;
    const int i11 = tgpig.y;
    const int i12 = tgpig.z;
    const int id  = *((device const int32_t *) (src1 + i12*args.nb12 + i11*args.nb11 + i10*args.nb10));
    device float * out = (device float *) (dst + i12*args.nb3 + i11*args.nb2 + i10*args.nb1);

    const int r = (id >= 0 && id < args.ne01) ? jlcm_perm(args, perm, i11, 1, id) : -1;
    if (r < 0 || r >= args.ne01) {
        for (int j = tiitg; j < args.ne00; j += ntg) {
            out[j] = 0.0f;
        }
        return;
    }
    float cbf[ncb];
    jlcm_load_codebook<block_t, ncb>(args, cb, bounds, i11, r, cbf);
    device const block_t * x = (device const block_t *) (src0 + i11*args.nb02 + r*args.nb01);
    for (int j = tiitg; j < args.ne00; j += ntg) {
        device const block_t * b = x + j/JLCM_QK;
        out[j] = (float) b->d * cbf[jlcm_index(b, j%JLCM_QK)];
    }
}

// one simdgroup per weight row and activation column: each lane takes weights j and j + 32 of every block
template <typename block_t, int ncb>
static void jlcm_mul_mv(constant ggml_metal_kargs_jlcm & args, device const char * src0, device const char * src1,
                        device char * dst, device const char * cb, device const char * bounds, device const char * perm,
                        uint3 tgpig, ushort tiisg, ushort sgitg, ushort nsg) {
    const int r   = tgpig.x*nsg + sgitg;
    const int i11 = tgpig.y;
    const int i12 = tgpig.z;
    if (r >= args.ne01) {
        return;
    }
    const int i02 = i12/args.r2;
    float cbf[ncb];
    jlcm_load_codebook<block_t, ncb>(args, cb, bounds, i02, r, cbf);

    device const block_t * x = (device const block_t *) (src0 + i02*args.nb02 + r*args.nb01);
    device const float   * y = (device const float   *) (src1 + i12*args.nb12 + i11*args.nb11);
    float sumf = 0.0f;
    for (int ib = 0; ib < args.ne00/JLCM_QK; ++ib) {
        device const block_t * b = x + ib;
        const float d = b->d;
        sumf += d * (cbf[jlcm_index(b, tiisg)]      * y[ib*JLCM_QK + tiisg] +
                     cbf[jlcm_index(b, tiisg + 32)] * y[ib*JLCM_QK + tiisg + 32]);
    }
    const float sum_all = simd_sum(sumf);
    const int o = jlcm_perm(args, perm, i02, 0, r);
    if (tiisg == 0 && o >= 0 && o < args.ne01) {
        ((device float *) (dst + i12*args.nb2 + i11*args.nb1))[o] = sum_all;
    }
}

// a JLCM_MM_ROWS x JLCM_MM_COLS output tile per threadgroup of 64 threads; each 64-weight step is
// dequantized once into threadgroup memory and reused by all the tile's columns
template <typename block_t, int ncb>
static void jlcm_mul_mm(constant ggml_metal_kargs_jlcm & args, device const char * src0, device const char * src1,
                        device char * dst, device const char * cb, device const char * bounds, device const char * perm,
                        threadgroup float * shmem, uint3 tgpig, ushort tiitg) {
    threadgroup float * sw = shmem;                        // [JLCM_MM_ROWS][JLCM_QK]
    threadgroup float * sy = shmem + JLCM_MM_ROWS*JLCM_QK; // [JLCM_MM_COLS][JLCM_QK]

    const int row0 = tgpig.x*JLCM_MM_ROWS;
    const int col0 = tgpig.y*JLCM_MM_COLS;
    const int i12  = tgpig.z;
    const int i02  = i12/args.r2;

    // loading: thread t dequantizes half (t % 2) of row t / 2, and copies a quarter (t % 4) of column t / 4
    const int lr  = row0 + tiitg/2;
    const int lj0 = (tiitg%2)*32;
    const int lc  = col0 + tiitg/4;
    const int lk0 = (tiitg%4)*16;
    float cbf[ncb];
    if (lr < args.ne01) {
        jlcm_load_codebook<block_t, ncb>(args, cb, bounds, i02, lr, cbf);
    }
    device const block_t * x = (device const block_t *) (src0 + i02*args.nb02 + (lr < args.ne01 ? lr : 0)*args.nb01);
    device const float   * y = (device const float   *) (src1 + i12*args.nb12 + (lc < args.ne11 ? lc : 0)*args.nb11);

    // computing: thread t owns row t % 32 and 8 consecutive columns
    const int tr  = tiitg%JLCM_MM_ROWS;
    const int tc0 = (tiitg/JLCM_MM_ROWS)*8;
    float acc[8] = { 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f };

    for (int ib = 0; ib < args.ne00/JLCM_QK; ++ib) {
        device const block_t * b = x + ib;
        const float d = b->d;
        for (int j = lj0; j < lj0 + 32; ++j) {
            sw[(tiitg/2)*JLCM_QK + j] = lr < args.ne01 ? d*cbf[jlcm_index(b, j)] : 0.0f;
        }
        for (int k = lk0; k < lk0 + 16; ++k) {
            sy[(tiitg/4)*JLCM_QK + k] = lc < args.ne11 ? y[ib*JLCM_QK + k] : 0.0f;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int j = 0; j < JLCM_QK; ++j) {
            const float w = sw[tr*JLCM_QK + j];
            for (int c = 0; c < 8; ++c) {
                acc[c] += w*sy[(tc0 + c)*JLCM_QK + j];
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    const int r = row0 + tr;
    if (r >= args.ne01) {
        return;
    }
    const int o = jlcm_perm(args, perm, i02, 0, r);
    if (o < 0 || o >= args.ne01) {
        return;
    }
    for (int c = 0; c < 8 && col0 + tc0 + c < args.ne11; ++c) {
        ((device float *) (dst + i12*args.nb2 + (col0 + tc0 + c)*args.nb1))[o] = acc[c];
    }
}

#define JLCM_KERNELS(name, block_t, ncb)                                                                          \
kernel void kernel_get_rows_##name(                                                                               \
        constant ggml_metal_kargs_jlcm & args,                                                                    \
        device const char * src0,                                                                 \
        device const char * src1,                                                                 \
        device       char * dst,                                                                 \
        device const char * cb,                                                                 \
        device const char * bounds,                                                                 \
        device const char * perm,                                                                 \
        uint3  tgpig [[threadgroup_position_in_grid]],                                                            \
        ushort tiitg [[thread_index_in_threadgroup]],                                                             \
        ushort3 ntg  [[threads_per_threadgroup]]) {                                                               \
    jlcm_get_rows<block_t, ncb>(args, src0, src1, dst, cb, bounds, perm, tgpig, tiitg, ntg.x);                     \
}                                                                                                                 \
kernel void kernel_mul_mv_##name##_f32(                                                                           \
        constant ggml_metal_kargs_jlcm & args,                                                                    \
        device const char * src0,                                                                 \
        device const char * src1,                                                                 \
        device       char * dst,                                                                 \
        device const char * cb,                                                                 \
        device const char * bounds,                                                                 \
        device const char * perm,                                                                 \
        uint3  tgpig [[threadgroup_position_in_grid]],                                                            \
        ushort tiisg [[thread_index_in_simdgroup]],                                                               \
        ushort sgitg [[simdgroup_index_in_threadgroup]],                                                          \
        ushort nsg   [[simdgroups_per_threadgroup]]) {                                                            \
    jlcm_mul_mv<block_t, ncb>(args, src0, src1, dst, cb, bounds, perm, tgpig, tiisg, sgitg, nsg);                  \
}                                                                                                                 \
kernel void kernel_mul_mm_##name##_f32(                                                                           \
        constant ggml_metal_kargs_jlcm & args,                                                                    \
        device const char * src0,                                                                 \
        device const char * src1,                                                                 \
        device       char * dst,                                                                 \
        device const char * cb,                                                                 \
        device const char * bounds,                                                                 \
        device const char * perm,                                                                 \
        threadgroup float * shmem  [[threadgroup(0)]],                                                            \
        uint3  tgpig [[threadgroup_position_in_grid]],                                                            \
        ushort tiitg [[thread_index_in_threadgroup]]) {                                                           \
    jlcm_mul_mm<block_t, ncb>(args, src0, src1, dst, cb, bounds, perm, shmem, tgpig, tiitg);                       \
}

JLCM_KERNELS(jlcm2, block_jlcm2, 4)
JLCM_KERNELS(jlcm3, block_jlcm3, 8)
JLCM_KERNELS(jlcm4, block_jlcm4, 16)
