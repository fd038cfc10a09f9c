"""--device (issue #29 item 2): where the converter's torch steps compute. Without a GPU the suite checks the
choice and its refusals; on a machine whose torch sees a CUDA GPU it also converts the tiny model there and
compares the file with the CPU's (skipped elsewhere: docs/CONVERTER.md says what was checked where)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from jlcm_gguf import distributed as D
from jlcm_gguf.cli import main

from test_cli import SMALL, tiny  # noqa: F401  (the tiny random Llama fixture)

CUDA = torch.cuda.is_available()
MPS = torch.backends.mps.is_available()


@pytest.fixture(autouse=True)
def cpu_afterwards():
    yield
    D.select_device("cpu")


@pytest.mark.skipif(CUDA, reason="torch sees a CUDA GPU here")
def test_auto_is_the_cpu_without_a_gpu():
    assert D.select_device("auto") == torch.device("cpu")
    assert D.device() == torch.device("cpu")


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="--device must be one of auto, cpu, cuda, mps"):
        D.select_device("tpu")


@pytest.mark.parametrize("name,present", [("cuda", CUDA), ("mps", MPS)])
def test_missing_device_is_one_clear_error_before_anything_is_read(tiny, tmp_path, capsys, name, present):  # noqa: F811
    if present:
        pytest.skip(f"torch sees a {name} device here")
    out = tmp_path / "x.gguf"
    with pytest.raises(SystemExit) as e:
        main([str(tiny), "--outfile", str(out), "--device", name] + SMALL)
    message = str(e.value.code)
    assert message.startswith(f"error: --device {name}: this torch ") and "\n" not in message
    assert not out.exists() and not list(tmp_path.iterdir())
    assert D.device() == torch.device("cpu")  # nothing was moved off the CPU


def test_tensors_come_to_the_compute_device():
    """model.t / distributed.to_device: numpy weights as float32 (float64 kept), on the chosen device."""
    x = D.to_device(np.ones((2, 3), np.float16))
    assert x.dtype == torch.float32 and x.device == D.device()
    assert D.to_device(np.ones(3, np.float64)).dtype == torch.float64
    t = torch.ones(3)
    assert D.to_device(t) is t  # already there: no copy


@pytest.mark.skipif(not CUDA, reason="no CUDA GPU: the GPU path is checked on a GPU machine only")
def test_cuda_conversion_agrees_with_the_cpu(tiny, tmp_path):  # noqa: F811
    """The same tiny conversion (GPTQ, layer-wise learning, block-wise learning and tuning) on the CPU and on CUDA:
    the same tensors and types, and the layer matrices' indices mostly the same (float sums in another order move a
    few roundings, and GPTQ carries each on along its row)."""
    import gguf
    args = ["--groups", "4", "--nsamples", "12", "--seqlen", "32", "--learn-steps", "3", "--tune-steps", "3"]
    files = {}
    for dev in ("cpu", "cuda"):
        files[dev] = tmp_path / f"{dev}.gguf"
        assert main([str(tiny), "--outfile", str(files[dev]), "--device", dev] + args) == 0
    cpu, gpu = (gguf.GGUFReader(files[d]) for d in ("cpu", "cuda"))
    assert [(t.name, t.tensor_type, tuple(t.shape)) for t in cpu.tensors] == \
           [(t.name, t.tensor_type, tuple(t.shape)) for t in gpu.tensors]
    same = [np.mean(np.asarray(a.data) == np.asarray(b.data)) for a, b in zip(cpu.tensors, gpu.tensors)
            if a.name.startswith("blk.") and a.name.endswith(".weight") and int(a.tensor_type) >= 200]
    assert same and np.mean(same) > 0.9, same
