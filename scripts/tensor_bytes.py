#!/usr/bin/env python3
"""Where a GGUF file's bytes go: the token embedding, the head and the layer matrices (companions included),
with their types, for files side by side (e.g. a plan next to llama.cpp's file of the same size).

    .venv/bin/python scripts/tensor_bytes.py out/bench-qwen/Q2_K.gguf out/bench-qwen/jlcm-mixed-Q2_K-kquants.gguf
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path



def roles(path: Path) -> dict[str, tuple[int, collections.Counter]]:
    """role -> (bytes, Counter of the types of its weight tensors); roles: token_embd, output, layers
    (every 2-D blk.* weight and its JLCM companions), other (norms, biases)."""
    from gguf import GGUFReader
    out: dict[str, list] = {}
    for t in GGUFReader(str(path)).tensors:
        base = t.name.split(".jlcm_")[0]
        role = (base.removesuffix(".weight") if base in ("token_embd.weight", "output.weight")
                else "layers" if base.startswith("blk.") and base.endswith(".weight") and
                (len(t.shape) == 2 or ".jlcm_" in t.name) else "other")
        b, types = out.setdefault(role, [0, collections.Counter()])
        out[role][0] = b + int(t.n_bytes)
        if ".jlcm_" not in t.name and role != "other":
            types[t.tensor_type.name] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", type=Path, nargs="+")
    a = ap.parse_args()
    print("| file | role | bytes | types |")
    print("|---|---|---:|---|")
    for f in a.files:
        for role, (b, types) in sorted(roles(f).items()):
            kinds = ", ".join(f"{k} ×{n}" for k, n in types.most_common())
            print(f"| {f.name} | {role} | {b:,} | {kinds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
