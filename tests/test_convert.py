"""Converter: folding keeps the float network's function, codebooks and packing round-trip, bad input gets
one clear error, and SmolLM2's first 4 blocks converted at 2 bits run in llama-cli, llama-perplexity (plain and
OpenBLAS builds), llama-server and llama-cpp-python (the whole model: tests/test_demo.py)."""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import BUILD_DIR, CONVERTER, ROOT, error_line, run, tool
from jlcm_gguf import model as M
from jlcm_gguf.convert import Options, convert
from jlcm_gguf.fold import fold_layer, logical
from jlcm_gguf.init import init_codebooks
from jlcm_gguf.pack import assign, dequantize, pack_blocks, quantize_to_codebooks, unpack_blocks

@pytest.fixture(scope="module")
def smollm2_tensors(smollm2_float):
    tensors, _, hp = smollm2_float
    return tensors, hp


def test_folding_keeps_logits(smollm2_tensors):
    tensors, hp = smollm2_tensors
    t64 = {k: v.astype(np.float64) for k, v in tensors.items()}
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, len(t64["token_embd.weight"]), 24)
    ref = M.logits(tokens, t64, hp).numpy()

    quantized = {f"blk.{b}.{n}.weight" for b in range(hp.n_layer) for n in M.LINEARS}
    folded, hess = dict(t64), {}
    permutations = 0
    for bid in range(hp.n_layer):
        before = dict(folded)
        res = fold_layer(folded, hess, bid, hp, 8, bid, quantized)
        assert len(res.columns) == 2  # the column orders GPTQ rounding applies to the input Hessian
        for name, col in res.columns.items():
            assert np.array_equal(logical(res.tensors[name], res.orders[name].order), before[name][:, col])
        folded.update(res.tensors)
        for name, ro in res.orders.items():
            assert np.array_equal(np.sort(ro.order), np.arange(len(ro.order)))
            assert ro.bounds[-1] == len(ro.order) and np.all(np.diff(ro.bounds) > 0)
            if ro.stored:  # the runtime scatters these back; the torch model takes the logical matrix
                folded[name] = logical(res.tensors[name], ro.order)
                permutations += 1
            elif not np.array_equal(ro.order, np.arange(len(ro.order))):
                permutations += 1
    assert permutations >= hp.n_layer * 7 // 2  # the folds really moved rows
    got = M.logits(tokens, folded, hp).numpy()
    assert np.max(np.abs(got - ref)) <= 1e-5 * max(1.0, np.abs(ref).max())
    # and the check is sensitive: forgetting the down-projection fold breaks it
    broken = dict(folded)
    broken["blk.0.ffn_down.weight"] = t64["blk.0.ffn_down.weight"]
    assert np.max(np.abs(M.logits(tokens, broken, hp).numpy() - ref)) > 1e-2


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebooks_and_packing_roundtrip(bits):
    rng = np.random.default_rng(bits)
    rows, cols = 48, 256
    # three row groups with differently shaped weight distributions: heavy-tailed, skewed, bimodal
    w = np.concatenate([rng.standard_t(5, size=(16, cols)),
                        rng.exponential(1.0, size=(24, cols)) - 0.7,
                        rng.choice([-1.0, 1.0], size=(8, cols)) + 0.3 * rng.standard_normal((8, cols))])
    w = (w * rng.uniform(0.5, 2, (rows, 1))).astype(np.float32)
    h = rng.uniform(0.1, 2.0, cols).astype(np.float32)
    bounds = np.array([16, 40, 48], dtype=np.int32)
    cb = init_codebooks(w, h, bounds, bits)
    assert cb.shape == (3, 1 << bits) and cb.dtype == np.int8 and np.abs(cb).max() == 127
    idx, d = assign(w, bits, cb, bounds, h)
    packed = pack_blocks(idx, d, bits)
    assert np.array_equal(quantize_to_codebooks(w, bits, cb, bounds, h), packed)
    got_idx, got_d = unpack_blocks(packed, bits, cols)
    assert np.array_equal(got_idx, idx) and np.array_equal(got_d.view(np.uint16), d.view(np.uint16))
    wq = dequantize(packed, bits, cols, cb, bounds)
    err = np.sum(h * (wq - w) ** 2) / np.sum(h * w ** 2)
    # codebooks fitted per group beat the type's default one on the same blocks
    from jlcm_gguf.format import DEFAULT_CODEBOOKS
    cb0 = np.repeat(DEFAULT_CODEBOOKS[bits][None], 3, axis=0)
    w0 = dequantize(quantize_to_codebooks(w, bits, cb0, bounds, h), bits, cols, cb0, bounds)
    err0 = np.sum(h * (w0 - w) ** 2) / np.sum(h * w ** 2)
    assert err < 0.95 * err0, (err, err0)


def test_row_groups_on_threads_give_the_same_bits(monkeypatch):
    """init_codebooks and assign compute large matrices' row groups on torch's threads (pack.map_groups): the same
    codebooks, indices and scales as one thread, and the groups really ran on worker threads."""
    import threading

    import torch

    from jlcm_gguf import pack
    rng = np.random.default_rng(7)
    rows, cols = 2048, 640  # 1.3 M weights: above pack.PARALLEL_MIN
    w = (rng.standard_t(4, size=(rows, cols)) * rng.uniform(0.5, 2, (rows, 1))).astype(np.float32)
    h = rng.uniform(0.1, 2.0, cols).astype(np.float32)
    bounds = np.array([300, 700, 1200, 1300, 2048], dtype=np.int32)
    threads_used = set()
    plain_map = pack.map_groups

    def watched(fn, items, size):
        def record(x):
            threads_used.add(threading.current_thread() is threading.main_thread())
            return fn(x)
        return plain_map(record, items, size)
    monkeypatch.setattr(pack, "map_groups", watched)
    results = {}
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            threads_used.clear()
            cb = init_codebooks(w, h, bounds, 3)
            idx, d = assign(w, 3, cb, bounds, h)
            results[n] = (cb, idx, d.view(np.uint16))
            assert threads_used == ({True} if n == 1 else {False}), (n, threads_used)
    finally:
        torch.set_num_threads(before)
    assert all(np.array_equal(a, b) for a, b in zip(results[1], results[2]))


def test_nearest_codeword_is_a_sorted_search_with_ties_to_the_lower():
    from jlcm_gguf.pack import nearest_codeword
    rng = np.random.default_rng(1)
    mid = np.array([-40.5, -3.0, 0.0, 7.5, 60.0], dtype=np.float32)
    x = rng.normal(0, 30, (5, 4, 64)).astype(np.float32)
    x[0, 0, :5] = mid * 2  # exactly on a midpoint after dividing by the scale 2
    scale = np.where(rng.random((5, 4)) < 0.2, 0, rng.uniform(-3, 3, (5, 4))).astype(np.float32)
    scale[0, 0] = 2
    want = np.searchsorted(mid, x / np.where(scale != 0, scale, 1)[..., None])
    assert np.array_equal(nearest_codeword(x, scale, mid), want)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("starts", ["SCALE_STARTS", "GPTQ_SCALE_STARTS"])
def test_scale_search_lowers_the_packing_error(bits, starts):
    """Starting scales of both signs: never a higher h-weighted error than the single start at amax, and
    clearly lower over a matrix whose codebooks are asymmetric."""
    from jlcm_gguf import pack
    rng = np.random.default_rng(10 + bits)
    rows, cols = 64, 512
    w = (rng.exponential(1.0, (rows, cols)) - 0.6) * rng.choice([-1, 1], (rows, 1))
    w = w.astype(np.float32)
    h = rng.uniform(0.1, 2.0, cols).astype(np.float32)
    bounds = np.array([32, 64], dtype=np.int32)
    cb = init_codebooks(w, h, bounds, bits)

    def block_errors(starts):
        idx, d = assign(w, bits, cb, bounds, h, starts=starts)
        e = h * (pack.lookup(idx, d, cb, bounds) - w).astype(np.float64) ** 2
        return e.reshape(rows, -1, 64).sum(2)
    one, many = block_errors((1.0,)), block_errors(getattr(pack, starts))
    assert np.all(many <= one * (1 + 1e-5) + 1e-9)
    assert many.sum() < 0.95 * one.sum(), (many.sum(), one.sum())


def _hf_copy(src: Path, dst: Path, drop=(), config_patch=None) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name in drop:
            continue
        (dst / f.name).symlink_to(f)
    if config_patch:
        (dst / "config.json").unlink()
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(config_patch)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("case,message", [
    ("no_tokenizer", "has no tokenizer"),
    ("unsupported_arch", "unsupported architecture GPT2LMHeadModel"),
    ("no_weights", "has no *.safetensors weights"),
    ("not_a_dir", "is not a directory"),
])
def test_bad_input_one_clear_error(smollm2, tmp_path, case, message):
    if case == "no_tokenizer":
        model = _hf_copy(smollm2, tmp_path / "m", drop=("tokenizer.json", "tokenizer_config.json"))
    elif case == "unsupported_arch":
        model = _hf_copy(smollm2, tmp_path / "m", config_patch={"architectures": ["GPT2LMHeadModel"]})
    elif case == "no_weights":
        model = _hf_copy(smollm2, tmp_path / "m", drop=("model.safetensors",))
    else:
        model = tmp_path / "missing"
    out = tmp_path / "out.gguf"
    res = run(CONVERTER + [model, "--outfile", out])
    assert res.returncode == 1
    last = error_line(res)
    assert last.startswith("error: ") and message in last, res.stderr[-2000:]
    assert not out.exists() and not list(tmp_path.glob("out.gguf*"))


def test_short_calibration_text_one_clear_error(smollm2, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("In the beginning God created the heaven and the earth.\n")
    out = tmp_path / "out.gguf"
    res = run(CONVERTER + [smollm2, "--outfile", out, "--calib", calib])
    assert res.returncode == 1
    last = error_line(res)
    assert last.startswith("error: calibration text") and "need at least" in last, res.stderr[-2000:]
    assert not list(tmp_path.glob("out.gguf*"))


def test_conversion_is_deterministic(small, converted, tmp_path):
    path, _ = converted
    again = tmp_path / "again.gguf"
    convert(Options(model=small, outfile=again, bits=2, groups=8, nsamples=4, seqlen=128))
    assert again.read_bytes() == path.read_bytes()


def test_converted_file_layout(converted):
    from gguf import GGUFReader
    path, summary = converted
    assert path.exists() and not list(path.parent.glob("*.tmp*"))
    r = GGUFReader(str(path))
    f = r.fields
    assert f["jlcm.format_version"].contents() == 1 and f["general.file_type"].contents() == 200
    assert f["tokenizer.ggml.pre"].contents() == "smollm"
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.ffn_up.weight"] == "JLCM2" and types["token_embd.weight"] == "JLCM4"
    assert "blk.0.attn_q.weight.jlcm_perm" in types and "blk.0.ffn_up.weight.jlcm_perm" not in types
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert summary["bytes"] == path.stat().st_size
    # JLCM2 layers (18 bytes per 64 weights) and the JLCM4 embedding (34), with their companions, are what the
    # summary's bits per JLCM weight count
    jlcm = {t.name: t for t in r.tensors if t.tensor_type.name.startswith("JLCM")}
    weights = sum(int(t.n_elements) for t in jlcm.values())
    stored = sum(int(t.n_bytes) for t in r.tensors if t.name in jlcm or t.name.rsplit(".", 1)[0] in jlcm)
    assert all(t.n_bytes * 64 == t.n_elements * (18 if t.name.startswith("blk.") else 34) for t in jlcm.values())
    assert summary["jlcm_weights"] == weights and abs(summary["jlcm_bpw"] - 8 * stored / weights) < 1e-9


def test_converted_runs_in_llama_cli(converted):
    path, _ = converted
    res = run([tool("llama-cli"), "-m", path, "-p", "Hello", "-st", "-n", "8", "-t", "2", "--temp", "0"],
              stdin=subprocess.DEVNULL, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "> Hello" in res.stdout and "Generation:" in res.stdout


def test_converted_perplexity_finite(converted, tmp_path):
    from jlcm_gguf.evaluate import llama_cpp_docs, perplexity, wikitext_test
    path, summary = converted
    try:
        text, name = wikitext_test(tmp_path), "WikiText-2"
    except FileNotFoundError:  # a clone without ../shared: the pinned second text, so the test still runs
        text, name = llama_cpp_docs(tmp_path), "llama.cpp-docs"
    ppl, err = perplexity(path, text, chunks=2)
    print(f"\nJLCM 2-bit SmolLM2, 4 blocks ({summary['bytes']:,} bytes): {name} ppl {ppl:.2f} ± {err:.2f} (2 chunks)")
    assert math.isfinite(ppl) and ppl > 1


def test_converted_perplexity_blas_build_equals_cpu_build(converted, tmp_path):
    """Issue #27: the converted SmolLM2 blocks in the OpenBLAS build (build-blas, batch 512 >= BLAS's 32) against the
    plain build, same file and text: within 1% (the BLAS build computed 6.7e16 before BLAS refused JLCM)."""
    import re

    from jlcm_gguf.evaluate import llama_cpp_docs, wikitext_test
    path, _ = converted
    try:
        text = wikitext_test(tmp_path)
    except FileNotFoundError:
        text = llama_cpp_docs(tmp_path)
    ppl = {}
    for name, build in (("cpu", BUILD_DIR), ("blas", ROOT / "build-blas")):
        binary = build / "bin" / "llama-perplexity"
        assert binary.exists(), f"{binary} is missing: scripts/setup.sh --tests builds it"
        for _ in range(3):  # llama.cpp's asynchronous logger may drop the final line on a loaded machine
            res = run([binary, "-m", path, "-f", text, "-c", "512", "--chunks", "2", "-t", "2"], timeout=600)
            m = re.search(r"Final estimate: PPL = ([0-9.]+)", res.stdout + res.stderr)
            if res.returncode != 0 or m:
                break
        assert res.returncode == 0 and m, (res.stdout + res.stderr)[-3000:]
        ppl[name] = float(m.group(1))
    print(f"\nJLCM 2-bit SmolLM2 (4 blocks), 2 chunks of 512: plain build {ppl['cpu']:.3f}, OpenBLAS build {ppl['blas']:.3f}")
    assert abs(ppl["blas"] - ppl["cpu"]) <= 0.01 * ppl["cpu"], ppl


def test_second_evaluation_text_is_pinned(tmp_path, monkeypatch):
    """--eval-text llama.cpp-docs: the same bytes on every machine, and a changed tree is refused rather than
    silently evaluated on other text."""
    import shutil

    from jlcm_gguf.convert import llama_cpp_dir
    from jlcm_gguf.evaluate import calibration_overlap, llama_cpp_docs
    text = llama_cpp_docs(tmp_path / "a")
    assert text.stat().st_size == 494_785
    assert calibration_overlap(text) == 0
    tree = tmp_path / "llama.cpp"
    shutil.copytree(llama_cpp_dir() / "docs", tree / "docs")
    edited = sorted((tree / "docs").rglob("*.md"))[3]
    edited.write_text(edited.read_text() + "one more line\n")
    monkeypatch.setenv("JLCM_LLAMA_DIR", str(tree))
    with pytest.raises(RuntimeError, match="sha256"):
        llama_cpp_docs(tmp_path / "b")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(path: Path, *args: str):
    """A llama-server on a free loopback port, healthy; yields its base URL and process."""
    port = _free_port()
    proc = subprocess.Popen([str(tool("llama-server")), "-m", str(path), "--host", "127.0.0.1", "--port", str(port),
                             "-t", "2", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "llama-server did not become healthy"
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _complete(url: str, prompt: str, n_predict: int, timeout: float = 120, **extra) -> dict:
    req = urllib.request.Request(f"{url}/completion", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": prompt, "n_predict": n_predict, "temperature": 0,
                                                  **extra}).encode())
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_converted_serves_completion(converted):
    path, _ = converted
    with llama_server(path, "-c", "512") as (url, _):
        body = _complete(url, "Hello", 8)
        assert body["tokens_predicted"] == 8 and isinstance(body["content"], str)


def test_server_under_concurrent_load(converted):
    """4 clients x 4 requests (streamed and not) at once against 4 slots, bounded in count and time: every
    response is complete and the server stays up and healthy."""
    path, _ = converted
    n_clients, n_requests, n_predict = 4, 4, 24
    prompts = ["In the beginning", "The capital of France is", "Once upon a time", "def fibonacci(n):"]

    def client(i: int) -> list[str]:
        problems = []
        for k in range(n_requests):
            prompt = f"{prompts[(i + k) % len(prompts)]} ({i}.{k})"
            if k % 2:
                body = _complete(url, prompt, n_predict, ignore_eos=True)
                if body.get("tokens_predicted") != n_predict or not body.get("stop"):
                    problems.append(f"client {i} request {k}: {body.get('tokens_predicted')} tokens, stop={body.get('stop')}")
            else:  # server-sent events, as chat front ends read them
                req = urllib.request.Request(f"{url}/completion", headers={"Content-Type": "application/json"},
                                             data=json.dumps({"prompt": prompt, "n_predict": n_predict, "stream": True,
                                                              "temperature": 0, "ignore_eos": True}).encode())
                events = []
                with urllib.request.urlopen(req, timeout=120) as r:
                    for line in r:
                        if line.startswith(b"data: "):
                            events.append(json.loads(line[6:]))
                if not events or not events[-1].get("stop") or events[-1].get("tokens_predicted") != n_predict:
                    problems.append(f"client {i} stream {k}: last event {events[-1] if events else None}")
        return problems

    with llama_server(path, "-c", "2048", "-np", str(n_clients)) as (url, proc):
        with concurrent.futures.ThreadPoolExecutor(n_clients) as pool:
            problems = [p for f in [pool.submit(client, i) for i in range(n_clients)] for p in f.result(timeout=600)]
        assert not problems, problems
        assert proc.poll() is None, "llama-server exited under load"
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            assert r.status == 200
        assert _complete(url, "Hello", 4)["tokens_predicted"] == 4


def test_converted_runs_in_llama_cpp_python(converted):
    import llama_cpp
    path, _ = converted
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    out = llm.create_completion("The capital of France is", max_tokens=8, temperature=0)
    assert out["usage"]["completion_tokens"] == 8
