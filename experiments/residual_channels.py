#!/usr/bin/env python3
"""How unevenly a model's residual stream spreads its energy over channels, block by block: the largest
channel's mean square over the median channel's, and the share of the total mean square in the top 4
channels, on a few calibration windows through the float model. Why learning's plain block loss is mostly
the error of a few channels (docs/ALGORITHM.md, --learn-loss).

    .venv/bin/python experiments/residual_channels.py --model qwen2.5-coder-1.5b --blocks 6
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jlcm_gguf.reference_models import MODELS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=list(MODELS), default="smollm2")
    ap.add_argument("--blocks", type=int, default=6, help="the first N blocks")
    ap.add_argument("--windows", type=int, default=4, help="calibration windows of 256 tokens")
    a = ap.parse_args()
    import gguf
    import torch
    from transformers import AutoTokenizer

    from jlcm_gguf import model as M
    from jlcm_gguf.calib import calibration_tokens, default_calibration_text
    from jlcm_gguf.convert import float_tensors, hparams_of, import_conversion

    hf = MODELS[a.model]()
    conv = import_conversion()
    config = json.loads((hf / "config.json").read_text())
    cls = conv.get_model_class(conv.get_model_architecture(config, conv.ModelType.TEXT))
    hp = hparams_of(config)
    tokens = calibration_tokens(default_calibration_text(), AutoTokenizer.from_pretrained(str(hf)), a.windows, 256, 0)
    with torch.inference_mode():
        tensors, _ = float_tensors(cls(hf, gguf.LlamaFileType.ALL_F32, Path("/dev/null"), eager=True), half=True)
        xs = [M.embed(t, tensors, hp) for t in tokens]
        for bid in range(min(a.blocks, hp.n_layer)):
            xs = M.blocks_forward(xs, tensors, bid, hp)
            ms = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double().pow(2).mean(0)
            top = ms.sort(descending=True).values
            print(f"block {bid}: largest channel {float(top[0] / ms.median()):.0f}x the median, "
                  f"top 4 of {len(ms)} channels {100 * float(top[:4].sum() / ms.sum()):.0f} % of the mean square",
                  flush=True)


if __name__ == "__main__":
    main()
