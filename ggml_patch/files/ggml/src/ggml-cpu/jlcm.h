// JLCM (jlcm-gguf) in the CPU backend: the MUL_MAT / MUL_MAT_ID / GET_ROWS paths, where the
// whole weight tensor is known and its companions (group codebooks, bounds, permutation) can be reached.
#pragma once

#include "ggml.h"
#include "ggml-cpu-impl.h"

#ifdef __cplusplus
extern "C" {
#endif

// rows [ir0_start, ir0_end) of matrix i02 of src0 against n_cols q8_0 columns; column c's results are
// written to dst_cols[c] at the rows' original positions (the inverse of the stored row order)
void ggml_cpu_jlcm_mul_tile(const struct ggml_tensor * src0, int64_t i02, int64_t ir0_start, int64_t ir0_end,
                            int n_cols, const void * const * src1_cols, float * const * dst_cols);

// MUL_MAT with many columns (prompt processing): false if this path does not apply, true once it has
// computed this thread's share (called after src1 is converted to Q8_0 in wdata and the barrier)
bool ggml_cpu_jlcm_mul_mat_batched(const struct ggml_compute_params * params, struct ggml_tensor * dst);
// work buffer bytes beyond the converted src1 that the batched path needs
size_t ggml_cpu_jlcm_wdata_size(int n_tasks, const struct ggml_tensor * dst);

void ggml_compute_forward_get_rows_jlcm(const struct ggml_compute_params * params, struct ggml_tensor * dst);

#ifdef __cplusplus
}
#endif
