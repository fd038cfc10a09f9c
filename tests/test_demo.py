"""The README's main command's path (scripts/demo.py's conversion): SmolLM2 at IQ2_XXS's size (the plan searched
in the scores demo.py ships, scripts/demo_plan.json) with the default tuning and chat-template windows, asked a
question through llama-cpp-python's chat completion (the model's own chat template), answers it. About 15 minutes
on 2 cores. The saved scores are those the converter measures for this command: test_plan checks on SmolLM2's
first blocks that a plan searched in saved scores is the plan and the file the scoring gives."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def test_demo_conversion_answers_the_question(smollm2, tmp_path):
    import demo
    from llama_cpp import Llama

    from jlcm_gguf.cli import main as convert_main
    out = tmp_path / "demo.gguf"
    assert convert_main([str(smollm2), "--outfile", str(out), "--target-size", demo.TARGET_SIZE,
                         "--plan", str(demo.SCORES), "--tune-chat", str(demo.TUNE_CHAT), "--threads", "2"]) == 0
    assert out.stat().st_size <= 84_000_000
    llm = Llama(str(out), n_ctx=512, n_threads=2, seed=0, verbose=False)
    reply = llm.create_chat_completion([{"role": "user", "content": demo.PROMPT}], max_tokens=32,
                                       temperature=0)["choices"][0]["message"]["content"]
    print(f"\n{demo.PROMPT} -> {reply!r}")
    assert "Paris" in reply, reply
