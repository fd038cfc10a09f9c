"""Format v1 constants, mirrored from ggml_patch/ (see docs/FORMAT.md)."""
from __future__ import annotations

import numpy as np

FORMAT_VERSION = 1

QK = 64  # weights per block
TYPE_IDS = {2: 200, 3: 201, 4: 202}          # ggml type ids of JLCM2/3/4
FTYPE_IDS = {2: 200, 3: 201, 4: 202}         # llama_ftype values (general.file_type)
BLOCK_BYTES = {2: 2 + 16, 3: 2 + 16 + 8, 4: 2 + 32}

SUFFIX_CB = "jlcm_cb"          # i8  [2^b, n_groups, n_expert]
SUFFIX_BOUNDS = "jlcm_bounds"  # i32 [n_groups, n_expert], exclusive end row of each group
SUFFIX_PERM = "jlcm_perm"      # i32 [n_rows, 2, n_expert]: stored->original, original->stored

KEY_FORMAT_VERSION = "jlcm.format_version"
KEY_BITS = "jlcm.bits"
KEY_GROUPS = "jlcm.groups"
KEY_VARIANT = "jlcm.variant"
KEY_ROTATION = "jlcm.rotation"  # string, present when the residual stream is rotated (--rotate)
KEY_PLAN_TENSORS = "jlcm.plan.tensors"  # string array: every planned weight matrix
KEY_PLAN_TYPES = "jlcm.plan.types"      # uint8 array: its ggml type id (fixed size: the header does not depend on the plan)
KEY_PLAN_TARGET = "jlcm.plan.target_bytes"  # uint64, 0 without a budget

DEFAULT_CODEBOOKS = {
    2: np.array([-127, -38, 38, 127], dtype=np.int8),
    3: np.array([-127, -79, -45, -14, 14, 45, 79, 127], dtype=np.int8),
    4: np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8),
}
