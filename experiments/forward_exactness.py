#!/usr/bin/env python3
"""Which float forward should calibration run: the converter's own (jlcm_gguf/model.py) or the transformers model
class of the checkpoint? On each tiny random checkpoint of tests/test_architectures.py, both against llama.cpp's
F32 logits (llama.cpp's own converter, the patched build), as the largest difference over the largest logit.

    .venv/bin/python experiments/forward_exactness.py

Result: docs/CONVERTER.md#architectures."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> int:
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    import test_architectures as TA
    from conftest import llama_cpp_logits, llama_cpp_tokens
    from jlcm_gguf import model as M
    from jlcm_gguf.convert import check_input, float_tensors, hparams_of, import_conversion, llama_cpp_dir
    from jlcm_gguf.reference_models import smollm2_hf_dir

    tmp = Path(tempfile.mkdtemp())
    print("| checkpoint | largest logit | model.py vs llama.cpp | transformers vs llama.cpp |\n|---|---:|---:|---:|")
    for case in TA.CASES:
        hf = TA.make_checkpoint(tmp / case / "hf", smollm2_hf_dir(), case, seed=sorted(TA.CASES).index(case))
        f32 = tmp / case / "f32.gguf"
        subprocess.run([sys.executable, str(llama_cpp_dir() / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f32",
                        "--outfile", str(f32)], capture_output=True, check=True)
        tokens = llama_cpp_tokens(f32, TA.TEXT)
        ref = llama_cpp_logits(f32, tokens)
        hf_model = AutoModelForCausalLM.from_pretrained(str(hf), torch_dtype=torch.float32,
                                                        attn_implementation="eager").eval()
        config = check_input(hf)
        conv = import_conversion()
        cls = conv.get_model_class(conv.get_model_architecture(config, conv.ModelType.TEXT))
        tensors, _ = float_tensors(cls(hf, gguf.LlamaFileType.ALL_F32, Path("/dev/null"), eager=True))
        with torch.no_grad():
            theirs = hf_model(torch.tensor([tokens])).logits[0].double().numpy()
            ours = M.logits(tokens, tensors, hparams_of(config)).double().numpy()
        scale = np.abs(ref).max()
        print(f"| {case} | {scale:.1f} | {np.abs(ours - ref).max() / scale:.1e} | "
              f"{np.abs(theirs - ref).max() / scale:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
