#!/usr/bin/env python
"""Peak resident memory and time of each step of a conversion (Linux): runs jlcm-convert with the given arguments,
and reports, for each converter function below, the process's peak RSS during the call.

    .venv/bin/python scripts/trace_memory.py MODEL --outfile OUT.gguf [jlcm-convert options]

Each wrapped call resets the kernel's high-water mark (VmHWM, /proc/self/clear_refs "5") at entry and reads it at
exit; an enclosing call keeps the largest peak of the calls inside it. Lines go to stderr, indented by nesting:

    [memory]   blocks.round_matrices: start 3.10 peak 4.57 end 3.12 GB, 512.3 s (overall 4.57)

docs/CONVERTER.md's 7B-wide block table was measured this way.
"""
from __future__ import annotations

import functools
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STEPS = [("jlcm_gguf.convert", "float_tensors"), ("jlcm_gguf.convert", "plan_kinds"),
         ("jlcm_gguf.calib", "calibration_tokens"),
         ("jlcm_gguf.blocks", "block_statistics"), ("jlcm_gguf.fold", "fold_layer"),
         ("jlcm_gguf.blocks", "round_matrices"), ("jlcm_gguf.init", "init_codebooks"),
         ("jlcm_gguf.gptq", "assign_gptq"), ("jlcm_gguf.gptq", "inverse_cholesky"),
         ("jlcm_gguf.learn", "learn_layer"), ("jlcm_gguf.pack", "assign"),
         ("jlcm_gguf.blocks", "pack_matrices"), ("jlcm_gguf.blocks", "learn_matrices"),
         ("jlcm_gguf.blocks", "head_statistics"), ("jlcm_gguf.blocks", "quantize_embeddings"),
         ("jlcm_gguf.blocks", "quantize_blocks"), ("jlcm_gguf.write", "write_gguf"),
         ("jlcm_gguf.tune", "tune_end_to_end"), ("jlcm_gguf.plan_scores", "score_options")]


def status(key: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


stack: list[list[int]] = []  # the peak so far of each call in progress, outermost first
overall = [0]


def wrap(module: str, name: str) -> None:
    """Replaces module.name by a traced call (the converter's modules import each other's modules, not names,
    where these are called from elsewhere; a name imported with `from` before this runs would keep the original)."""
    mod = importlib.import_module(module)
    f = getattr(mod, name)
    label = f"{module.rsplit('.', 1)[-1]}.{name}"

    @functools.wraps(f)
    def traced(*args, **kwargs):
        peak = status("VmHWM:")
        for frame in stack:
            frame[0] = max(frame[0], peak)
        overall[0] = max(overall[0], peak)
        start = status("VmRSS:")
        reset_peak()
        stack.append([start])
        t = time.time()
        try:
            return f(*args, **kwargs)
        finally:
            frame = stack.pop()
            frame[0] = max(frame[0], status("VmHWM:"))
            for outer in stack:
                outer[0] = max(outer[0], frame[0])
            overall[0] = max(overall[0], frame[0])
            print(f"[memory] {'  ' * len(stack)}{label}: start {start / 1e9:.2f} peak {frame[0] / 1e9:.2f} "
                  f"end {status('VmRSS:') / 1e9:.2f} GB, {time.time() - t:.1f} s (overall {overall[0] / 1e9:.2f})",
                  file=sys.stderr, flush=True)

    setattr(mod, name, traced)


def main(argv: list[str]) -> int:
    for module, name in STEPS:
        wrap(module, name)
    from jlcm_gguf.cli import main as convert_main
    t = time.time()
    try:
        return convert_main(argv)
    finally:
        peak = max(overall[0], status("VmHWM:"))
        print(f"[memory] whole conversion: peak {peak / 1e9:.2f} GB ({peak} bytes), {time.time() - t:.0f} s",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
