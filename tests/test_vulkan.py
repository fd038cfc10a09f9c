"""JLCM on Vulkan (issue #32): the patched tree built with -DGGML_VULKAN=ON (build-vulkan, made by
scripts/setup.sh --tests) computes JLCM weights with their companions on a Vulkan device. Without a GPU the device is
Mesa's lavapipe (llvmpipe, a software Vulkan driver on the CPU), which ggml skips unless GGML_VK_VISIBLE_DEVICES
names it. Checked here:
- test-backend-ops on Vulkan0: JLCM MUL_MAT (mat-vec and tiled batches) and GET_ROWS with group codebooks and a
  row permutation, and the generic cases with the default codebook, against the CPU backend;
- the tiny JLCM Llama with every layer offloaded (-ngl 99): the scheduler gives its JLCM matmuls to Vulkan0, and
  the perplexity equals the CPU build's;
- a converted SmolLM2 the same way;
- mixture-of-experts JLCM weights (MUL_MAT_ID, no Vulkan kernel): their layers stay on the CPU, with one line.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, run, tool
from tiny_llama import make_moe

VK_DIR = ROOT / "build-vulkan"
VK_ENV = {**os.environ, "GGML_VK_VISIBLE_DEVICES": "0"}  # ggml leaves CPU-type Vulkan devices out unless named


def vk_tool(name: str) -> Path:
    path = VK_DIR / "bin" / name
    if not path.exists():
        pytest.fail(f"{path} is missing: scripts/setup.sh --tests builds build-vulkan")
    return path


def test_vulkan_device_is_there():
    """Guards the tests below: the build has the Vulkan backend and sees a device."""
    res = run([vk_tool("test-backend-ops"), "-b", "Vulkan0", "-o", "ADD", "-p", "type=f32,ne=[10,5,4,3]"],
              timeout=600, env=VK_ENV)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert re.search(r"Backend \d+/\d+: Vulkan0", res.stdout), res.stdout[-2000:]
    assert "OK" in res.stdout, res.stdout[-2000:]


@pytest.mark.parametrize("op", ["MUL_MAT", "GET_ROWS"])
def test_backend_ops_vulkan_computes_jlcm(op):
    """Every JLCM case with companions (n_groups=, perm=) runs on Vulkan and matches the CPU backend: none is
    refused, none fails; n = 1 and 7 take the mat-vec kernel, n = 64 the tiled one."""
    res = run([vk_tool("test-backend-ops"), "-b", "Vulkan0", "-o", op, "-p", "jlcm"], timeout=1200, env=VK_ENV)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if "jlcm" in ln and op in ln]
    grouped = [ln for ln in lines if "n_groups=" in ln]
    assert len(grouped) >= (18 if op == "MUL_MAT" else 9), "\n".join(res.stdout.splitlines()[-40:])
    assert all("OK" in ln for ln in grouped), "\n".join(ln for ln in grouped if "OK" not in ln)
    # the generic cases (default codebook): computed or refused, never wrong
    assert not [ln for ln in lines if "FAIL" in ln], "\n".join(ln for ln in lines if "FAIL" in ln)
    print(f"{op}: {len(grouped)} JLCM cases with companions OK on Vulkan0, "
          f"{sum('OK' in ln for ln in lines) - len(grouped)} generic JLCM cases OK")


def perplexity(binary: Path, model: Path, text: Path, *extra, env=None) -> tuple[float, str]:
    cmd = [binary, "-m", model, "-f", text, "-c", "128", "-b", "128", "-ub", "128", "-t", "2", "--chunks", "3", *extra]
    res = run(cmd, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", res.stdout + res.stderr)
    assert m, (res.stdout + res.stderr)[-3000:]
    return float(m.group(1)), res.stdout + res.stderr


def test_offloaded_perplexity_equals_cpu(tiny, text):
    """The tiny JLCM Llama (grouped codebooks, permuted rows in the embedding, the head and two layer matrices)
    with -ngl 99 on Vulkan0 gives the CPU build's perplexity, and its matmuls really ran on Vulkan0."""
    jlcm, _ = tiny
    cpu, _ = perplexity(tool("llama-perplexity"), jlcm, text)
    vk, _ = perplexity(vk_tool("llama-perplexity"), jlcm, text, "-ngl", "99", env=VK_ENV)
    dbg = run([vk_tool("llama-perplexity"), "-m", jlcm, "-f", text, "-c", "128", "-b", "128", "-ub", "128", "-t", "2",
               "--chunks", "1", "-ngl", "99", "-v"], timeout=900, env={**VK_ENV, "GGML_SCHED_DEBUG": "2"})
    assert dbg.returncode == 0, dbg.stderr[-3000:]
    log = dbg.stdout + dbg.stderr
    on = Counter(re.findall(r"\(\s*MUL_MAT\):\s+\S+ \(\s*\d+K\) \[\s*(\S+?)\s*\]", log))
    print(f"tiny JLCM perplexity: CPU build {cpu:.6g}, Vulkan -ngl 99 {vk:.6g}; matmuls by backend {dict(on)}")
    assert "JLCM: " not in log or "stay on the CPU" not in log, "layers were kept on the CPU"
    assert on["Vulka"] > 0 and on["CPU"] == 0, on  # (the debug lines cut backend names to 5 characters)
    assert abs(vk - cpu) <= 0.01 * cpu, (cpu, vk)


def test_converted_perplexity_vulkan_equals_cpu(converted, tmp_path):
    """A converted model (SmolLM2's first 4 blocks at JLCM 2 bits, grouped and permuted by the converter) with -ngl 99
    on Vulkan0, 2 chunks of 128 tokens (the tiled kernel for the prompt batches, the mat-vec for the head's 49,152
    rows of the last tokens): every matmul on Vulkan0, and the perplexity within 0.5% of the exact reference, the same
    file with its JLCM weights dequantized by Python to F32 (CPU build), and within 2% of the CPU build on the JLCM
    file. (The CPU multiplies JLCM weights by int8-quantized activations, Vulkan in float, as the F32 twin: this
    4-block slice of a 30-block model predicts badly, perplexity ~4e8, which magnifies that difference to 1.7%.)"""
    from jlcm_gguf.evaluate import llama_cpp_docs, wikitext_test
    from tiny_llama import write_dequantized
    path, _ = converted
    try:
        text = wikitext_test(tmp_path)
    except FileNotFoundError:
        text = llama_cpp_docs(tmp_path)
    twin = tmp_path / "f32-twin.gguf"
    write_dequantized(path, twin)
    args = ["-f", text, "-c", "128", "-b", "128", "--chunks", "2", "-t", "2"]
    ppl, logs = {}, {}
    for name, binary, model, extra, env in (
            ("cpu", tool("llama-perplexity"), path, [], None),
            ("f32 twin", tool("llama-perplexity"), twin, [], None),
            ("vulkan", vk_tool("llama-perplexity"), path, ["-ngl", "99", "-v"], {**VK_ENV, "GGML_SCHED_DEBUG": "2"})):
        res = run([binary, "-m", model, *args, *extra], timeout=900, env=env)
        logs[name] = res.stdout + res.stderr
        m = re.search(r"Final estimate: PPL = ([0-9.]+)", logs[name])
        assert res.returncode == 0 and m, logs[name][-3000:]
        ppl[name] = float(m.group(1))
    on = Counter(re.findall(r"\(\s*MUL_MAT\):\s+\S+ \(\s*\d+K\) \[\s*(\S+?)\s*\]", logs["vulkan"]))
    print(f"\nJLCM 2-bit SmolLM2 (4 blocks), 2 chunks of 128: CPU build {ppl['cpu']:.6g}, F32 twin {ppl['f32 twin']:.6g}, "
          f"Vulkan -ngl 99 {ppl['vulkan']:.6g}; matmuls by backend {dict(on)}")
    assert "stay on the CPU" not in logs["vulkan"]
    assert on["Vulka"] > 0 and on["CPU"] == 0, on
    assert abs(ppl["vulkan"] - ppl["f32 twin"]) <= 0.005 * ppl["f32 twin"], ppl
    assert abs(ppl["vulkan"] - ppl["cpu"]) <= 0.02 * ppl["cpu"], ppl


def test_moe_layers_stay_on_cpu(tmp_path, text):
    """Vulkan has no JLCM MUL_MAT_ID: with -ngl 99 the loader keeps the layers with JLCM expert weights on the CPU
    (one line says so) instead of placing the weights on Vulkan0, where the scheduler would have to copy them, and
    their companions, to the CPU for every expert matmul; the perplexity equals the CPU build's."""
    jlcm, _ = make_moe(tmp_path)
    cpu, _ = perplexity(tool("llama-perplexity"), jlcm, text)
    vk, log = perplexity(vk_tool("llama-perplexity"), jlcm, text, "-ngl", "99", env=VK_ENV)
    line = [ln for ln in log.splitlines() if "JLCM:" in ln and "stay on the CPU" in ln]
    print(f"tiny MoE perplexity: CPU build {cpu:.6g}, Vulkan -ngl 99 {vk:.6g}; {line}")
    assert line and "2 layer(s) stay on the CPU (0,1)" in line[0] and "Vulkan0" in line[0], log[-3000:]
    assert abs(vk - cpu) <= 0.01 * cpu, (cpu, vk)
