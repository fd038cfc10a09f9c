#version 450

// JLCM grouped-codebook types (jlcm-gguf): get_rows (dequantize), mul_mv and mul_mm, as kernels/jlcm.metal.
// Block layouts are in ggml-common.h (block_jlcm2/3/4: fp16 scale, then the packed indices of 64 weights),
// the C reference in ggml-quants.c. A weight's companions are bound after dst: group codebooks (int8
// [2^b, n_groups, n_mat]), group bounds (int32 [n_groups, n_mat], exclusive end rows) and an optional row
// permutation (int32 [rows, 2, n_mat]: stored -> original, then original -> stored). n_groups == 0: the type's
// default codebook (a weight made by llama-quantize). Out-of-range permutation entries or row ids give zero
// rows / dropped rows, never an out-of-bounds access; the group lookup is clamped to the last group.
// One shader, compiled three times (JLCM_GET_ROWS, JLCM_MUL_MV, JLCM_MUL_MM); the bit width is a
// specialization constant. The weight is read as 16-bit words (ggml-vulkan requires 16-bit storage; blocks and
// rows have even sizes, so no read straddles the end of the tensor), the int8 codebooks as 32-bit words.

#extension GL_EXT_control_flow_attributes : enable
#extension GL_EXT_shader_16bit_storage : require

#define JLCM_QK      64
#define JLCM_MM_ROWS 32 // mul_mm tile: weight rows x activation columns, 64 threads
#define JLCM_MM_COLS 16
#define JLCM_MV_ROWS 4  // mul_mv: rows per workgroup, 16 threads each

layout (constant_id = 0) const uint BITS = 2;

#if defined(JLCM_MUL_MV)
layout (local_size_x = 16, local_size_y = JLCM_MV_ROWS, local_size_z = 1) in;
#elif defined(JLCM_MUL_MM)
layout (local_size_x = 64, local_size_y = 1, local_size_z = 1) in;
#else
layout (local_size_x = 256, local_size_y = 1, local_size_z = 1) in;
#endif

layout (binding = 0) readonly buffer W  { uint16_t data_w[]; };  // JLCM blocks (byte addressed)
layout (binding = 1) readonly buffer B  { uint  data_b[]; };      // f32 activations or i32 row ids
layout (binding = 2) writeonly buffer D { float data_d[]; };
layout (binding = 3) readonly buffer CB { uint  data_cb[]; };     // int8 codebooks (byte addressed; 2^b per group)
layout (binding = 4) readonly buffer BD { int   data_bounds[]; };
layout (binding = 5) readonly buffer PM { int   data_perm[]; };

// strides: the weight's and the codebooks' in bytes, all others in elements
layout (push_constant) uniform parameter {
    uint ne00; uint ne01; uint nb01; uint nb02;
    uint n_groups; uint has_perm; uint nb_cb2; uint nb_bounds1; uint nb_perm1; uint nb_perm2;
    uint ne10; uint ne11; uint ne12; uint nb10; uint nb11; uint nb12;
    uint nb1; uint nb2; uint nb3;
    uint r2;
    uint w_off; uint b_off; uint d_off; uint cb_off; uint bounds_off; uint perm_off; // misalignment offsets
} p;

// the default codebooks, int8 entries packed four to a word (little-endian, as a codebook companion in memory)
const uvec4 kvalues_jlcm2 = uvec4(0x7F26DA81u, 0u, 0u, 0u);                                // -127 -38 38 127
const uvec4 kvalues_jlcm3 = uvec4(0xF2D3B181u, 0x7F4F2D0Eu, 0u, 0u);                       // -127 -79 -45 -14 14 45 79 127
const uvec4 kvalues_iq4nl = uvec4(0xBFAD9881u, 0xF6EADDCFu, 0x26190D01u, 0x71594535u);     // IQ4_NL's levels

const uint NCB         = 1u << BITS;
const uint BLOCK_BYTES = 2u + 8u*BITS;

uint w_byte(uint off) {
    return (uint(data_w[off >> 1]) >> ((off & 1u)*8u)) & 0xFFu;
}

// the fp16 scale of the block at byte offset bo (even: block sizes and row strides are)
float block_scale(uint bo) {
    return unpackHalf2x16(uint(data_w[bo >> 1])).x;
}

// index j (< 64) of the block at byte offset bo
uint block_index(uint bo, uint j) {
    if (BITS == 4u) {
        return j < 32u ? (w_byte(bo + 2u + j) & 15u) : (w_byte(bo + 2u + j - 32u) >> 4);
    }
    uint q = (w_byte(bo + 2u + (j & 15u)) >> (2u*(j >> 4))) & 3u;
    if (BITS == 3u) {
        q |= ((w_byte(bo + 18u + (j & 7u)) >> (j >> 3)) & 1u) << 2;
    }
    return q;
}

// entry q of a codebook held as packed int8 words: a shift and a sign extension, no indexed array
float codeword(uvec4 cbw, uint q) {
    return float(bitfieldExtract(int(cbw[q >> 2]), int((q & 3u)*8u), 8));
}

// first group whose bound exceeds row r, never past the last group (as ggml-cpu/jlcm.c)
uint group_of_row(uint i02, uint r) {
    const uint base = p.bounds_off + i02*p.nb_bounds1;
    int lo = 0;
    int hi = int(p.n_groups) - 1;
    while (lo < hi) {
        const int mid = (lo + hi)/2;
        if (data_bounds[base + uint(mid)] > int(r)) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    return uint(lo);
}

// the codebook of stored row r of matrix i02, its int8 entries packed four to a word
uvec4 load_codebook(uint i02, uint r) {
    if (p.n_groups == 0u) {
        // (branches, not a nested ?: of constant vectors, which came out wrong for JLCM3 on lavapipe)
        if (BITS == 2u) {
            return kvalues_jlcm2;
        }
        if (BITS == 3u) {
            return kvalues_jlcm3;
        }
        return kvalues_iq4nl;
    }
    const uint off = p.cb_off + i02*p.nb_cb2 + group_of_row(i02, r)*NCB;
    uvec4 cbw = uvec4(0u);
    [[unroll]] for (uint i = 0u; i < 16u; ++i) {
        if (i < NCB) {
            const uint o = off + i;
            cbw[i >> 2] |= ((data_cb[o >> 2] >> ((o & 3u)*8u)) & 0xFFu) << ((i & 3u)*8u);
        }
    }
    return cbw;
}

// entry `which` (0: stored -> original, 1: original -> stored) of row i of matrix i02; i without permutation
int perm_entry(uint i02, uint which, uint i) {
    if (p.has_perm == 0u) {
        return int(i);
    }
    return data_perm[p.perm_off + i02*p.nb_perm2 + which*p.nb_perm1 + i];
}

#if defined(JLCM_GET_ROWS)

// one workgroup per output row; threads stride over the row's weights. src0 matrix i02 = i11 (ggml_get_rows)
void main() {
    const uint i10 = gl_WorkGroupID.x;
    const uint i11 = gl_WorkGroupID.y;
    const uint i12 = gl_WorkGroupID.z;
    const int  id  = int(data_b[p.b_off + i12*p.nb12 + i11*p.nb11 + i10*p.nb10]);
    const uint out_base = p.d_off + i12*p.nb3 + i11*p.nb2 + i10*p.nb1;

    const int r = (id >= 0 && id < int(p.ne01)) ? perm_entry(i11, 1u, uint(id)) : -1;
    if (r < 0 || r >= int(p.ne01)) {
        for (uint j = gl_LocalInvocationID.x; j < p.ne00; j += gl_WorkGroupSize.x) {
            data_d[out_base + j] = 0.0;
        }
        return;
    }
    const uvec4 cbw = load_codebook(i11, uint(r));
    const uint row = p.w_off + i11*p.nb02 + uint(r)*p.nb01;
    for (uint j = gl_LocalInvocationID.x; j < p.ne00; j += gl_WorkGroupSize.x) {
        const uint bo = row + (j/JLCM_QK)*BLOCK_BYTES;
        data_d[out_base + j] = block_scale(bo)*codeword(cbw, block_index(bo, j%JLCM_QK));
    }
}

#elif defined(JLCM_MUL_MV)

shared float partial[JLCM_MV_ROWS][16];

// JLCM_MV_ROWS rows per workgroup (grid-stride over the rows), 16 threads per row: thread t takes the four
// weights t, t + 16, t + 32, t + 48 of every block (JLCM2/3 keep them behind one byte; JLCM4 takes 2t, 2t + 1,
// 2t + 32, 2t + 33, behind two). The workgroup's y and z are the activation column and batch.
void main() {
    const uint tx  = gl_LocalInvocationID.x;
    const uint ty  = gl_LocalInvocationID.y;
    const uint i11 = gl_WorkGroupID.y;
    const uint i12 = gl_WorkGroupID.z;
    const uint i02 = i12/p.r2;
    const uint y_base = p.b_off + i12*p.nb12 + i11*p.nb11;
    const uint nblocks = p.ne00/JLCM_QK;
    uint pos[4];
    if (BITS == 4u) {
        pos = uint[4](2u*tx, 2u*tx + 1u, 2u*tx + 32u, 2u*tx + 33u);
    } else {
        pos = uint[4](tx, tx + 16u, tx + 32u, tx + 48u);
    }

    for (uint row0 = gl_WorkGroupID.x*JLCM_MV_ROWS; row0 < p.ne01; row0 += gl_NumWorkGroups.x*JLCM_MV_ROWS) {
        const uint r = row0 + ty;
        float sumf = 0.0;
        if (r < p.ne01) {
            const uvec4 cbw = load_codebook(i02, r);
            const uint row = p.w_off + i02*p.nb02 + r*p.nb01;
            for (uint ib = 0u; ib < nblocks; ++ib) {
                const uint bo = row + ib*BLOCK_BYTES;
                const uint yb = y_base + ib*JLCM_QK;
                uint q[4];
                if (BITS == 4u) {
                    const uint qs = uint(data_w[(bo + 2u) / 2u + tx]); // bytes 2t, 2t + 1 of qs
                    q = uint[4](qs & 15u, (qs >> 8) & 15u, (qs >> 4) & 15u, qs >> 12);
                } else {
                    const uint qs = w_byte(bo + 2u + tx);
                    q = uint[4](qs & 3u, (qs >> 2) & 3u, (qs >> 4) & 3u, qs >> 6);
                    if (BITS == 3u) {
                        const uint qh0 = w_byte(bo + 18u + (tx & 7u)); // bit (p >> 3) of qh[p & 7] for p = pos[k]
                        [[unroll]] for (uint k = 0u; k < 4u; ++k) {
                            q[k] |= ((qh0 >> (pos[k] >> 3)) & 1u) << 2;
                        }
                    }
                }
                float acc = 0.0;
                [[unroll]] for (uint k = 0u; k < 4u; ++k) {
                    acc += codeword(cbw, q[k])*uintBitsToFloat(data_b[yb + pos[k]]);
                }
                sumf += block_scale(bo)*acc;
            }
        }
        partial[ty][tx] = sumf;
        barrier();
        [[unroll]] for (uint s = 8u; s > 0u; s >>= 1) {
            if (tx < s) {
                partial[ty][tx] += partial[ty][tx + s];
            }
            barrier();
        }
        if (tx == 0u && r < p.ne01) {
            const int o = perm_entry(i02, 0u, r);
            if (o >= 0 && o < int(p.ne01)) {
                data_d[p.d_off + i12*p.nb2 + i11*p.nb1 + uint(o)] = partial[ty][0];
            }
        }
        barrier();
    }
}

#elif defined(JLCM_MUL_MM)

shared float sw[JLCM_QK*JLCM_MM_ROWS]; // [k][row]: neighbouring threads read neighbouring rows
shared float sy[JLCM_MM_COLS*JLCM_QK]; // [col][k]

// a JLCM_MM_ROWS x JLCM_MM_COLS output tile per workgroup of 64 threads; each 64-weight step is dequantized
// once into shared memory and reused by all the tile's columns
void main() {
    const uint t    = gl_LocalInvocationID.x;
    const uint row0 = gl_WorkGroupID.x*JLCM_MM_ROWS;
    const uint col0 = gl_WorkGroupID.y*JLCM_MM_COLS;
    const uint i12  = gl_WorkGroupID.z;
    const uint i02  = i12/p.r2;

    // loading: thread t dequantizes half (t % 2) of row t / 2, and copies a quarter (t % 4) of column t / 4
    const uint lr  = row0 + t/2u;
    const uint lj0 = (t%2u)*32u;
    const uint lc  = col0 + t/4u;
    const uint lk0 = (t%4u)*16u;
    const uvec4 cbw = lr < p.ne01 ? load_codebook(i02, lr) : uvec4(0u);
    const uint row    = p.w_off + i02*p.nb02 + (lr < p.ne01 ? lr : 0u)*p.nb01;
    const uint y_base = p.b_off + i12*p.nb12 + (lc < p.ne11 ? lc : 0u)*p.nb11;

    // computing: thread t owns row t % 32 and 8 consecutive columns
    const uint tr  = t%JLCM_MM_ROWS;
    const uint tc0 = (t/JLCM_MM_ROWS)*8u;
    float acc[8] = float[8](0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);

    const uint nblocks = p.ne00/JLCM_QK;
    for (uint ib = 0u; ib < nblocks; ++ib) {
        const uint bo = row + ib*BLOCK_BYTES;
        const float d = block_scale(bo);
        for (uint j = lj0; j < lj0 + 32u; ++j) {
            sw[j*JLCM_MM_ROWS + t/2u] = lr < p.ne01 ? d*codeword(cbw, block_index(bo, j)) : 0.0;
        }
        for (uint k = lk0; k < lk0 + 16u; ++k) {
            sy[(t/4u)*JLCM_QK + k] = lc < p.ne11 ? uintBitsToFloat(data_b[y_base + ib*JLCM_QK + k]) : 0.0;
        }
        barrier();
        for (uint j = 0u; j < JLCM_QK; ++j) {
            const float w = sw[j*JLCM_MM_ROWS + tr];
            [[unroll]] for (uint c = 0u; c < 8u; ++c) {
                acc[c] += w*sy[(tc0 + c)*JLCM_QK + j];
            }
        }
        barrier();
    }

    const uint r = row0 + tr;
    if (r >= p.ne01) {
        return;
    }
    const int o = perm_entry(i02, 0u, r);
    if (o < 0 || o >= int(p.ne01)) {
        return;
    }
    [[unroll]] for (uint c = 0u; c < 8u; ++c) {
        if (col0 + tc0 + c < p.ne11) {
            data_d[p.d_off + i12*p.nb2 + (col0 + tc0 + c)*p.nb1 + uint(o)] = acc[c];
        }
    }
}

#endif
