"""--rotate: the rotation is orthogonal, folds the norm gains, and leaves SmolLM2's float outputs unchanged."""
from __future__ import annotations

import numpy as np
import pytest

from jlcm_gguf import model as M
from jlcm_gguf.rotate import rotate, rotation


@pytest.mark.parametrize("n", [576, 64, 4096, 9, 1])
def test_rotation_is_orthogonal_and_seeded(n):
    q = rotation(n, seed=3)
    assert np.abs(q @ q.T - np.eye(n)).max() < 1e-10
    assert np.array_equal(q, rotation(n, seed=3))
    if n > 1:
        assert not np.allclose(q, rotation(n, seed=4))
        assert np.abs(q).max() < 0.9  # it mixes coordinates (not a signed permutation)


def test_rotation_leaves_smollm2_outputs_unchanged(smollm2_float):
    tensors, order, hp = smollm2_float
    rt, rorder = rotate(tensors, order, hp, seed=0)
    assert "output.weight" not in tensors and "output.weight" in rorder  # tied head untied
    assert np.all(rt["blk.0.attn_norm.weight"] == 1) and np.all(rt["output_norm.weight"] == 1)
    assert rt["blk.5.ffn_down.weight"].dtype == np.float32
    assert not np.allclose(rt["blk.5.attn_q.weight"], tensors["blk.5.attn_q.weight"])
    tokens = np.random.default_rng(0).integers(0, 49152, size=48)
    ref = M.logits(tokens, tensors, hp).double()
    got = M.logits(tokens, rt, hp).double()
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < 1e-4, float(err)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_rotation_lowers_outliers(smollm2_float):
    """What it is for: per-64-weight-block peak-to-rms ratios drop (less range for a scalar codebook)."""
    tensors, order, hp = smollm2_float
    rt, _ = rotate(tensors, order, hp, seed=0)

    def crest(w):
        b = np.asarray(w, dtype=np.float64).reshape(-1, 64)
        return float(np.mean(np.abs(b).max(1) / np.sqrt((b ** 2).mean(1) + 1e-30)))

    names = [f"blk.{i}.{n}.weight" for i in (0, 10, 20) for n in ("attn_q", "ffn_up", "ffn_down")]
    assert np.mean([crest(rt[n]) for n in names]) < np.mean([crest(tensors[n]) for n in names])
