"""Conversion spread over several processes (torch.distributed, launched with torchrun):

    torchrun --nproc-per-node 2 -m jlcm_gguf.cli MODEL --outfile OUT.gguf [options]

torchrun starts the converter once per process and sets WORLD_SIZE and RANK; with more than one process they join
a process group (gloo, which also sums CUDA tensors: the collectives here are all-reduces of sums and pickled
objects). Every process runs the whole conversion on the same inputs, and shares the work that splits:
- calibration windows: each process runs its share of the windows' batches through a block; the input moments and
  Hessians they sum are all-reduced, and every process receives every window's output (blocks_forward);
- rounding: each of a block's matrices is rounded (k-means, GPTQ, layer-wise learning) by one process and sent to
  the others (owners, share_results);
- end-to-end tuning: each step's windows are split and the gradients all-reduced (sums in another order: the
  tuned file equals one process's up to float rounding; tests/test_distributed.py).
- plan scoring (a size budget): each matrix's options are scored by one process; the calibration moments and the
  --fast Fisher windows are summed over the processes' shares (--plan-error rounding's block Hessians are not:
  every process computes them).
Block-wise learning (--learn-steps) runs whole in every process, and process 0's result goes to all (as its plan).
Process 0 writes the file, the checkpoint, the report and --save-plan. A single process (no torchrun) runs exactly the code it always ran.

The compute device (--device, select_device) is here too: each process computes on one, process N on a machine
of several GPUs on cuda:LOCAL_RANK. Tensors the steps hand to numpy (packing, k-means, the file) come back to the
CPU; float64 sums and small float64 systems stay on the CPU where the device has no float64 (MPS).
"""
from __future__ import annotations

import datetime
import logging
import os

TIMEOUT = datetime.timedelta(hours=12)  # a collective waits this long (process 0 writes a 7B file meanwhile)
DEVICES = ("auto", "cpu", "cuda", "mps")
_device = None  # the compute device select_device chose (None: the CPU)


def select_device(name: str):
    """The torch device --device names ("auto": CUDA if torch sees a GPU, else the CPU; MPS only when named); with
    several processes on CUDA, this process's GPU (LOCAL_RANK). Raises ValueError with one sentence when torch has
    no such device."""
    import torch
    global _device
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, not {name!r}")
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "cpu"
    if name == "cuda" and not cuda:
        raise ValueError(f"--device cuda: this torch ({torch.__version__}) sees no CUDA GPU"
                         + ("" if torch.version.cuda else " (it is built without CUDA)"))
    if name == "mps" and not mps:
        raise ValueError(f"--device mps: this torch ({torch.__version__}) sees no Apple GPU (MPS)")
    if name == "mps" and size() > 1:
        raise ValueError("--device mps works in one process only (gloo sums CPU and CUDA tensors, not MPS ones)")
    if name == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        _device = torch.device("cuda", index)
    else:
        _device = torch.device(name)
    return _device


def device():
    """The compute device (the CPU unless select_device chose another)."""
    import torch
    return _device if _device is not None else torch.device("cpu")


def float64_device():
    """Where float64 sums and systems are computed: the compute device, or the CPU if it has no float64 (MPS)."""
    import torch
    return torch.device("cpu") if device().type == "mps" else device()


def to_device(x):
    """A torch tensor on the compute device (numpy arrays as float32, or float64 where they are; a tensor moved)."""
    import numpy as np
    import torch
    if not isinstance(x, torch.Tensor):
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64 if x.dtype == np.float64 else np.float32))
    dev = float64_device() if x.dtype == torch.float64 else device()
    return x if x.device == dev else x.to(dev)


def setup() -> None:
    """Joins torchrun's process group when WORLD_SIZE > 1 (no-op otherwise or when joined already)."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    dist.init_process_group("gloo", timeout=TIMEOUT)
    logging.getLogger("jlcm-convert").info("torch.distributed: %d processes (gloo), this is process %d",
                                           dist.get_world_size(), dist.get_rank())
    if dist.get_rank() != 0:  # one voice: process 0's (its progress bars, its log; warnings from all)
        logging.getLogger().setLevel(logging.WARNING)


def size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if size() > 1:
        import torch.distributed as dist
        dist.barrier()


def share(n: int, batch: int = 1) -> list[int]:
    """This process's items of n, in whole batches: batch b goes to process b % size."""
    return [i for i in range(n) if (i // batch) % size() == rank()]


def all_reduce_(tensors) -> None:
    """Sums each tensor over the processes, in place (in the same order in every process)."""
    if size() > 1:
        import torch.distributed as dist
        for t in tensors:
            dist.all_reduce(t)


def reduce_moments(moments) -> None:
    """model.InputMoments / InputHessians summed over the processes' windows (a matrix that several linears share
    is reduced once)."""
    if size() == 1:
        return
    seen = set()
    sums = [v for v in moments.sums.values()]
    for v in getattr(moments, "full", {}).values():
        if id(v) not in seen:
            seen.add(id(v))
            sums.append(v)
    all_reduce_(sums)


def blocks_forward(xs: list, tensors: dict, bid: int, hp, observe=None, batch: int = 8) -> list:
    """model.blocks_forward with the batches shared among the processes: an observer sees this process's windows
    (reduce it with reduce_moments), and every process returns every window's output."""
    import torch

    from . import model as M
    if size() == 1:
        return M.blocks_forward(xs, tensors, bid, hp, observe, batch)
    mine = share(len(xs), batch)
    out = torch.zeros((len(xs),) + tuple(xs[0].shape), dtype=xs[0].dtype, device=xs[0].device)
    for start in range(0, len(mine), batch):
        i = mine[start:start + batch]
        out[i[0]:i[-1] + 1] = M.block_forward(torch.stack(xs[i[0]:i[-1] + 1]), tensors, bid, hp, observe)
    all_reduce_([out])  # each window is non-zero in one process only: the sum is that process's output
    return list(out.unbind(0))


def owners(sizes: dict) -> dict:
    """Which process computes each item (sizes: item -> its cost): the largest first, each to the least loaded
    process (the same in every process). The items keep the order of `sizes`."""
    load = [0] * size()
    out = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        p = min(range(len(load)), key=lambda r: (load[r], r))
        out[name] = p
        load[p] += sizes[name]
    return {n: out[n] for n in sizes}


def share_results(results: dict, owner: dict) -> dict:
    """Every process's results for the items it owns, sent to all: {item: result} complete in every process."""
    if size() == 1:
        return results
    import torch.distributed as dist
    gathered = [None] * size()
    dist.all_gather_object(gathered, {k: v for k, v in results.items() if owner[k] == rank()})
    out = {}
    for part in gathered:
        out.update(part)
    return {k: out[k] for k in owner}


def broadcast(obj):
    """Process 0's obj, in every process."""
    if size() == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_windows(n_windows: int, batch: int = 8) -> str | None:
    """Why this many calibration windows cannot be shared among the processes, or None."""
    if size() > 1 and -(-n_windows // batch) < size():
        return (f"{size()} processes need at least {batch * (size() - 1) + 1} calibration windows (--nsamples; "
                f"each process takes whole batches of {batch}), not {n_windows}")
    return None
