#!/usr/bin/env python3
"""SmolLM2's perplexity on both evaluation texts after conversions that differ only in the calibration text
(`--calib kjv|brown|mix|FILE`), with any other jlcm-convert arguments the same; optionally the answer to the
demo's question. Files are kept in --out and reused; the results are appended to --log as JSON lines.

    .venv/bin/python experiments/calibration_texts.py --calib kjv,mix [--args '--bits 2'] [--chunks 40]
        [--ask] [--out out/calib] [--log out/calib/results.jsonl]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jlcm_gguf.cli import main as convert_main  # noqa: E402
from jlcm_gguf.evaluate import EVAL_TEXTS, perplexity  # noqa: E402
from jlcm_gguf.reference_models import smollm2_hf_dir  # noqa: E402

QUESTION = "What is the capital of France?"


def chat_answer(path: Path) -> str:
    from llama_cpp import Llama
    llm = Llama(str(path), n_ctx=512, n_threads=2, seed=0, verbose=False)
    try:
        return llm.create_chat_completion([{"role": "user", "content": QUESTION}], max_tokens=32,
                                          temperature=0)["choices"][0]["message"]["content"]
    finally:
        llm.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", default="kjv,mix", help="comma-separated --calib values")
    ap.add_argument("--args", default="--bits 2", help="the other jlcm-convert arguments, the same for every row")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--ask", action="store_true", help="also ask each file the demo's question (chat completion)")
    ap.add_argument("--out", type=Path, default=Path("out/calib"))
    ap.add_argument("--log", type=Path, default=None)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    log = a.log or a.out / "results.jsonl"
    hf = smollm2_hf_dir()
    extra = shlex.split(a.args)
    tag = "_".join(x.lstrip("-").replace("/", "") for x in extra) or "default"
    for calib in a.calib.split(","):
        path = a.out / f"{tag}-calib-{Path(calib).stem}.gguf"
        t0 = time.time()
        seconds = None
        if not path.exists():
            if convert_main([str(hf), "--outfile", str(path), "--calib", calib, "--threads", "2", "--resume", *extra]):
                raise SystemExit(f"error: conversion with --calib {calib} failed")
            seconds = round(time.time() - t0)
        row = {"calib": calib, "args": a.args, "file": str(path), "bytes": path.stat().st_size,
               "convert_s": seconds, "chunks": a.chunks}
        for name, text in EVAL_TEXTS.items():
            row[name] = perplexity(path, text(a.out), a.chunks)
        if a.ask:
            row["answer"] = chat_answer(path)
        print(json.dumps(row), flush=True)
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
