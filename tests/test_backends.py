"""Every llama.cpp build a user makes computes a JLCM file correctly or refuses it (issue #27).

A JLCM weight decodes through companion tensors linked in its src[]; a generic path that dequantizes rows with
the type's to_float (BLAS), or copies the weight to another backend (op offload, RPC), would silently use the
default codebook. These tests run the tiny JLCM Llama (grouped codebooks, permuted rows) through:
- the OpenBLAS build (build-blas, made by scripts/setup.sh --tests), with a batch large enough for BLAS to claim matmuls;
- an RPC build: rpc-server on 127.0.0.1, `--rpc ... -ngl 99`;
- test-backend-ops on BLAS, with JLCM weights that carry group codebooks and a permutation;
- llama-export-lora (refuses) and a LoRA adapter applied at run time (computes).
Each compares numbers with the plain CPU build or with the F32 twin of the same weights.
"""
from __future__ import annotations

import os
import re
import socket
from collections import Counter
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import BUILD_DIR, ROOT, error_line, run, tool

BLAS_DIR = ROOT / "build-blas"


def blas_tool(name: str) -> Path:
    path = BLAS_DIR / "bin" / name
    if not path.exists():
        pytest.fail(f"{path} is missing: scripts/setup.sh --tests builds build-blas")
    return path


def perplexity(binary: Path, model: Path, text: Path, *extra) -> tuple[float, str]:
    """(PPL, log of a second one-chunk run with the scheduler's node assignments, GGML_SCHED_DEBUG=2 with -v).
    Two runs: under that flood of debug lines llama.cpp's asynchronous logger may drop its last lines."""
    # -b/-ub 128: one 128-token batch per chunk, so BLAS's threshold (32) is passed by every matmul
    cmd = [binary, "-m", model, "-f", text, "-c", "128", "-b", "128", "-ub", "128", "-t", "2", *extra]
    for _ in range(3):  # on a loaded machine the asynchronous logger has also dropped the final line of a plain run
        res = run(cmd + ["--chunks", "3"], timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        m = re.search(r"Final estimate: PPL = ([0-9.]+)", res.stdout + res.stderr)
        if m:
            break
    assert m, (res.stdout + res.stderr)[-3000:]
    dbg = run(cmd + ["--chunks", "1", "-v"], timeout=600, env={**os.environ, "GGML_SCHED_DEBUG": "2"})
    assert dbg.returncode == 0, dbg.stderr[-3000:]
    return float(m.group(1)), res.stdout + res.stderr + dbg.stdout + dbg.stderr


def matmul_backends(log: str) -> Counter:
    """How many MUL_MAT nodes the scheduler gave each backend (from GGML_SCHED_DEBUG=2's node lines)."""
    return Counter(re.findall(r"\(\s*MUL_MAT\):\s+\S+ \(\s*\d+K\) \[\s*(\S+?)\s*\]", log))


def test_blas_build_has_blas():
    """Guards the comparisons below: the BLAS build must really contain the BLAS backend."""
    res = run([blas_tool("test-backend-ops"), "-b", "BLAS", "-o", "MUL_MAT", "-p", "type_a=f32,type_b=f32,m=16,n=1,"],
              timeout=300)
    assert "Backend 1/2: BLAS" in res.stdout or "BLAS" in res.stdout, res.stdout[-2000:]
    assert (BLAS_DIR / "bin" / "libggml-blas.so").exists()


def test_blas_perplexity_equals_cpu(tiny, text):
    """The bug of issue #27: BLAS claimed JLCM matmuls at batch >= 32 and dequantized with the default codebook."""
    jlcm, f32 = tiny
    cpu, _ = perplexity(tool("llama-perplexity"), jlcm, text)
    blas, log = perplexity(blas_tool("llama-perplexity"), jlcm, text)
    on = matmul_backends(log)
    print(f"tiny JLCM perplexity: CPU build {cpu:.6g}, BLAS build {blas:.6g}; matmuls by backend {dict(on)}")
    assert abs(blas - cpu) <= 0.01 * cpu, (cpu, blas)
    assert on["CPU"] > 0 and on["BLAS"] == 0, on
    # control: BLAS is live in that build: it takes the F32 twin's large matmuls, with the same result
    cpu32, _ = perplexity(tool("llama-perplexity"), f32, text)
    blas32, log32 = perplexity(blas_tool("llama-perplexity"), f32, text)
    on32 = matmul_backends(log32)
    print(f"tiny F32 twin: CPU build {cpu32:.6g}, BLAS build {blas32:.6g}; matmuls by backend {dict(on32)}")
    assert on32["BLAS"] > 0, on32
    assert abs(blas32 - cpu32) <= 0.01 * cpu32, (cpu32, blas32)


def backend_ops(binary: Path, backend: str, op: str) -> list[str]:
    res = run([binary, "-b", backend, "-o", op], timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return res.stdout.splitlines()


def test_backend_ops_blas_never_fails_jlcm_with_companions():
    """test-backend-ops' JLCM cases carry group codebooks and a permutation; on BLAS they must be refused
    (left to the CPU) or pass, never FAIL, including the 64-column batches BLAS claims for other types."""
    lines = backend_ops(blas_tool("test-backend-ops"), "BLAS", "MUL_MAT")
    jlcm = [ln for ln in lines if "type=jlcm" in ln and "n_groups=" in ln]
    assert len(jlcm) >= 6, "\n".join(lines[-40:])
    assert not [ln for ln in jlcm if "FAIL" in ln], "\n".join(jlcm)
    assert all("not supported" in ln or "OK" in ln for ln in jlcm), "\n".join(jlcm)
    # BLAS does compute the large f32 matmuls (otherwise this test would prove nothing)
    assert [ln for ln in lines if "type_a=f32" in ln and "OK" in ln], "\n".join(lines[-40:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rpc_server():
    port = free_port()
    proc = subprocess.Popen([str(tool("ggml-rpc-server")), "-H", "127.0.0.1", "-p", str(port), "-t", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"rpc-server did not start: {proc.stdout.read() if proc.poll() is not None else ''}")
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_rpc_offload_perplexity_equals_cpu(tiny, text, rpc_server):
    """`--rpc HOST:PORT -ngl 99`: the RPC client cannot know whether the server has JLCM kernels, so layers with
    JLCM weights stay on the local CPU (one line says so) and the numbers are the CPU build's."""
    jlcm, _ = tiny
    cpu, _ = perplexity(tool("llama-perplexity"), jlcm, text)
    rpc, log = perplexity(tool("llama-perplexity"), jlcm, text, "--rpc", rpc_server, "-ngl", "99")
    on = matmul_backends(log)
    print(f"tiny JLCM perplexity: CPU {cpu:.6g}, --rpc -ngl 99 {rpc:.6g}; matmuls by backend {dict(on)}")
    line = [ln for ln in log.splitlines() if "JLCM:" in ln and "stay on the CPU" in ln]
    print("\n".join(line))
    assert line and "RPC" in line[0] and "output" in line[0], log[-3000:]
    assert abs(rpc - cpu) <= 0.01 * cpu, (cpu, rpc)
    assert set(on) == {"CPU"}, on  # every matmul on the local CPU: no activation bounces to the device


def test_rpc_offload_of_a_plain_model_still_offloads(tiny, text, rpc_server):
    """Control for the test above: without JLCM weights the layers do go to the RPC device."""
    _, f32 = tiny
    _, log = perplexity(tool("llama-perplexity"), f32, text, "--rpc", rpc_server, "-ngl", "99")
    on = matmul_backends(log)
    print(f"tiny F32 twin with --rpc -ngl 99: matmuls by backend {dict(on)}")
    assert "stay on the CPU" not in log
    assert any(b.startswith("RPC") for b in on), on


def write_lora(path: Path, base: Path, rank: int = 4, scale: float = 0.05) -> None:
    """A LoRA adapter in llama.cpp's GGUF layout on blk.0's attn_q and ffn_up of the tiny model."""
    import gguf
    reader = gguf.GGUFReader(str(base))
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}  # ggml order: [in, out]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank))
    rng = np.random.default_rng(7)
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_up.weight"):
        n_in, n_out = shapes[name][:2]
        w.add_tensor(name + ".lora_a", (rng.standard_normal((rank, n_in)) * scale).astype(np.float32))
        w.add_tensor(name + ".lora_b", (rng.standard_normal((n_out, rank)) * scale * 4).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_export_lora_refuses_jlcm(tiny, tmp_path):
    jlcm, _ = tiny
    lora = tmp_path / "lora.gguf"
    write_lora(lora, jlcm)
    out = tmp_path / "merged.gguf"
    res = run([tool("llama-export-lora"), "-m", jlcm, "--lora", lora, "-o", out, "-t", "2"], timeout=300)
    assert res.returncode != 0
    assert "cannot merge a LoRA adapter into JLCM tensor blk.0." in res.stdout + res.stderr, \
        (res.stdout + res.stderr)[-2000:]


def lora_logits(model: Path, lora: Path | None, text: Path) -> np.ndarray:
    import llama_cpp
    kw = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=128, logits_all=True, verbose=False, n_threads=2, seed=0, **kw)
    tokens = llm.tokenize(text.read_bytes())[:48]
    llm.eval(tokens)
    out = np.array(llm.scores[:48])
    del llm
    return out


def test_runtime_lora_over_jlcm_matches_f32(tiny, text, tmp_path):
    """A LoRA adapter applied at run time adds its own matmuls beside the JLCM one: JLCM + adapter must match the
    F32 twin + the same adapter, and the adapter must change the output."""
    jlcm, f32 = tiny
    lora = tmp_path / "lora.gguf"
    write_lora(lora, jlcm)
    a, b = lora_logits(jlcm, lora, text), lora_logits(f32, lora, text)
    rel = np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2))
    assert rel <= 2e-2, f"relative RMS logit error {rel:.4f}"
    plain = lora_logits(jlcm, None, text)
    change = np.sqrt(np.mean((a - plain) ** 2)) / np.sqrt(np.mean(plain ** 2))
    assert change > 5 * rel, f"the adapter hardly changed the output ({change:.4f})"


def test_scheduler_never_offloads_jlcm_weights():
    """Partial offload (Metal, CUDA, Vulkan ask for a host weight's large-batch matmuls through offload_op): a fake
    accelerator that claims and offloads every op gets the Q8_0 control's matmul, never a JLCM weight's, and the
    JLCM result equals the CPU-only one bit for bit (tests/c/jlcm_offload_check.cpp; without the scheduler rule
    the JLCM weight was copied without its companions and the result was off by ~27)."""
    res = run([tool("jlcm-offload-check")], timeout=120)
    print(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert any(ln.startswith("q8_0") and "computed on FakeGPU" in ln and ln.endswith("OK") for ln in lines), lines
    assert sum(ln.startswith("jlcm") and "computed on CPU" in ln and ln.endswith("OK") for ln in lines) == 3, lines
