#!/usr/bin/env python3
"""Fuzz the patched ggml with hostile JLCM GGUF files (libFuzzer, AddressSanitizer, UBSan).

Builds tests/c/fuzz/ with clang into build-fuzz/ (ccache), writes a seed corpus of small JLCM GGUF
files (tensors carved from a real converted file, plus every companion layout), and runs the fuzzer.

    .venv/bin/python scripts/fuzz.py --seconds 120                 # the short run (tests/test_fuzz.py)
    .venv/bin/python scripts/fuzz.py --runs 100000 --report docs/robustness.md

Exit status 0 when no input crashed; otherwise 1, with the crashing inputs kept in the work folder.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
BUILD = ROOT / "build-fuzz"
HARNESS = "fuzz-jlcm-gguf"
MAX_SEED_BYTES = 64 * 1024


def build() -> Path:
    import fetch_llama
    ggml = fetch_llama.patched_tree() / "vendor" / "llama.cpp" / "ggml"
    if not shutil.which("clang"):
        raise SystemExit("error: clang is missing (Debian: apt-get install clang libclang-rt-14-dev)")
    env = dict(os.environ, CC="clang", CXX="clang++")
    BUILD.mkdir(exist_ok=True)
    log = BUILD / "build.log"
    with open(log, "w") as f:
        for cmd in (["cmake", "-S", ROOT / "tests" / "c" / "fuzz", "-B", BUILD, f"-DGGML_DIR={ggml}"],
                    ["cmake", "--build", BUILD, "-j", str(os.cpu_count() or 2), "--target", HARNESS]):
            if subprocess.run([str(c) for c in cmd], env=env, stdout=f, stderr=subprocess.STDOUT).returncode:
                sys.stderr.write(log.read_text()[-4000:])
                raise SystemExit(f"error: building the fuzz harness failed (log: {log})")
    return BUILD / HARNESS


def _write(path: Path, tensors: dict) -> None:
    """One GGUF file with these tensors (packed JLCM ones given as (uint8 rows, bits))."""
    from gguf import GGMLQuantizationType
    from jlcm_gguf.format import TYPE_IDS
    from jlcm_gguf.write import write_raw_gguf
    write_raw_gguf(path, {name: (a[0], GGMLQuantizationType(TYPE_IDS[a[1]])) if isinstance(a, tuple) else a
                          for name, a in tensors.items()})


def synthetic_seeds(out: Path) -> int:
    """Every companion layout: default codebook, groups, permutation, experts (3-D), for 2/3/4 bits."""
    from jlcm_gguf.format import QK
    from jlcm_gguf.pack import pack_blocks
    rng = np.random.default_rng(0)
    n = 0
    for bits in (2, 3, 4):
        for groups, permuted, experts in ((0, False, 1), (1, False, 1), (3, True, 1), (2, True, 2)):
            rows, cols = 12, 2 * QK
            idx = rng.integers(0, 1 << bits, size=(experts * rows, cols), dtype=np.uint8)
            d = (rng.standard_normal((experts * rows, cols // QK)) * 0.01).astype(np.float16)
            packed = pack_blocks(idx, d, bits).reshape(experts, rows, -1)
            t = {"w": (packed if experts > 1 else packed[0], bits)}
            if groups:
                t["w.jlcm_cb"] = rng.integers(-127, 128, size=(experts, groups, 1 << bits)).astype(np.int8)
                t["w.jlcm_bounds"] = np.tile(np.linspace(0, rows, groups + 1)[1:].astype(np.int32), (experts, 1))
            if permuted:
                p = np.stack([rng.permutation(rows) for _ in range(experts)]).astype(np.int32)
                t["w.jlcm_perm"] = np.stack([p, np.argsort(p, axis=1).astype(np.int32)], axis=1)
            for k in ("w.jlcm_cb", "w.jlcm_bounds", "w.jlcm_perm"):
                if k in t and experts == 1:
                    t[k] = t[k][0]
            _write(out / f"synthetic-b{bits}-g{groups}-p{int(permuted)}-e{experts}.gguf", t)
            n += 1
    return n


# shapes upstream's GGUF parser let through and ggml_new_tensor then aborted on (fixed by patch 0007): seeds
# of every run, so each one (CI's too) checks the fix
OVERFLOW_SHAPES = {"zero_before_huge": ([32, 0, 1 << 62], 0),                  # F32
                   "product_at_int64_limit": ([32, (2**63 - 1) // 32], 8)}    # Q8_0: 32 * ne1 <= INT64_MAX


def one_tensor_info_gguf(path: Path, ne: list[int], ggml_type: int) -> Path:
    """A GGUF v3 file holding one tensor info "w" with dimensions ne and no data (built byte by byte: no
    writer accepts such a shape)."""
    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    kv = string("general.architecture") + struct.pack("<I", 8) + string("llama")  # 8 = GGUF string
    info = string("w") + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}q", *ne) + struct.pack("<iQ", ggml_type, 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + kv + info
    path.write_bytes(head + b"\0" * (-len(head) % 32))
    return path


def regression_seeds(out: Path) -> int:
    for name, (ne, ggml_type) in OVERFLOW_SHAPES.items():
        one_tensor_info_gguf(out / f"regression-{name}.gguf", ne, ggml_type)
    return len(OVERFLOW_SHAPES)


def carved_seeds(model: Path, out: Path) -> int:
    """Each small JLCM weight of a converted file with its companions, as a file of its own."""
    from gguf import GGUFReader
    reader = GGUFReader(str(model))
    by_name = {t.name: t for t in reader.tensors}
    n = 0
    for t in reader.tensors:
        if not t.tensor_type.name.startswith("JLCM"):
            continue
        parts = {t.name: t} | {k: by_name[k] for k in by_name if k.startswith(t.name + ".jlcm_")}
        if sum(int(p.n_bytes) for p in parts.values()) > MAX_SEED_BYTES:
            continue
        bits = int(t.tensor_type.name[4:])
        tensors = {}
        for name, p in parts.items():
            shape = tuple(int(x) for x in reversed(p.shape))
            if p is t:
                tensors[name] = (np.array(p.data).reshape(shape[:-1] + (-1,)), bits)
            else:
                tensors[name] = np.array(p.data).reshape(shape)
        _write(out / f"carved-{t.name}.gguf", tensors)
        n += 1
    return n


def make_corpus(corpus: Path, model: Path | None) -> int:
    corpus.mkdir(parents=True, exist_ok=True)
    n = synthetic_seeds(corpus) + regression_seeds(corpus)
    if model:
        n += carved_seeds(model, corpus)
    return n


def tiny_model(dest: Path) -> Path:
    """The tests' tiny Llama with JLCM tensors (grouped, permuted, JLCM token_embd/output)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_llama import make_pair
    dest.mkdir(parents=True, exist_ok=True)
    return make_pair(dest)[0]


def run_fuzzer(binary: Path, corpus: Path, work: Path, seconds: int | None, runs: int | None, seed: int = 0) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    args = [str(binary), str(corpus), f"-artifact_prefix={work}/", "-rss_limit_mb=4096", "-timeout=30",
            f"-max_len={MAX_SEED_BYTES * 2}", "-print_final_stats=1"]
    if seconds:
        args.append(f"-max_total_time={seconds}")
    if runs:
        args.append(f"-runs={runs}")
    if seed:
        args.append(f"-seed={seed}")  # with -runs: the same inputs every time
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    res = subprocess.run(args, env=env, capture_output=True, text=True, errors="replace")
    log = work / "fuzz.log"
    log.write_text(res.stderr)
    stats = dict(re.findall(r"^stat::(\w+):\s+(\d+)", res.stderr, re.M))
    done = re.findall(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)", res.stderr)
    crashes = sorted(p.name for p in work.iterdir() if p.name.split("-")[0] in ("crash", "leak", "timeout", "oom"))
    return {"returncode": res.returncode, "executions": int(stats.get("number_of_executed_units", 0)),
            "exec_per_sec": int(stats.get("average_exec_per_sec", 0)), "peak_rss_mb": int(stats.get("peak_rss_mb", 0)),
            "coverage": int(done[-1][1]) if done else None, "corpus": f"{done[-1][3]} files, {done[-1][4]}" if done else None,
            "crashes": crashes, "log": str(log), "tail": res.stderr[-3000:]}


REPORT = """# Robustness: fuzzing the JLCM runtime

Generated by `{command}` on {date}. The harness (`tests/c/fuzz/fuzz_jlcm_gguf.c`, libFuzzer,
AddressSanitizer + UndefinedBehaviorSanitizer with `-fno-sanitize-recover=undefined`) feeds each input
through ggml's GGUF parser (`gguf_init_from_buffer`, metadata only, the tensor data left in a page-aligned
copy of the file and range-checked as llama.cpp's loader maps it), the companion checks the model loader runs
(`ggml_jlcm_link`, `ggml_jlcm_validate`, `ggml_validate_row_data`) and the CPU `GET_ROWS` and `MUL_MAT`
kernels of every JLCM weight. The kernels also run when the companion *values* failed validation, because
docs/FORMAT.md promises no out-of-bounds access even when validation is skipped.

| figure | value |
|---|---|
| executions | {executions:,} |
| executions per second | {exec_per_sec:,} |
| seed corpus | {seeds} files: every companion layout of JLCM2/3/4 (default codebook, groups, permutation, 2 experts) and each weight of the tests' tiny JLCM Llama with its companions |
| final corpus | {corpus} |
| coverage (libFuzzer `cov`) | {coverage} |
| peak RSS | {peak_rss_mb} MB |
| crashes, leaks, timeouts | {n_crashes} |

## Findings
{findings}

The short run (30,000 executions with a fixed `--seed`, so a red CI is a regression, not bad luck) is part
of `.ci/run` (`tests/test_fuzz.py`). The Python side (the JLCM reader in
`jlcm_gguf/read.py` over gguf-py) is fuzzed with hypothesis in `tests/test_read_fuzz.py`.
"""

FINDINGS = """- Fixed (upstream bug, patch `0007-gguf-shape-check-as-ggml.patch`): `gguf.cpp` checked a tensor's
  element count differently from `ggml_new_tensor` (it multiplied through a zero dimension and accepted a
  product equal to `INT64_MAX`), so a shape such as (32, 0, 2^62) passed the parser and then aborted the
  process in `ggml_new_tensor`'s `GGML_ASSERT` — any app opening a hostile GGUF through llama.cpp or
  llama-cpp-python, JLCM or not. The parser now applies the same test and refuses the file with its
  "incorrect shape" error; `tests/test_robustness.py` loads both shapes through `llama-completion` and
  llama-cpp-python. A random-seed run found it; both shapes are now seeds of every run (CI's included), so
  each run checks the fix.
- Fixed: `GET_ROWS` aborted the process (`GGML_ASSERT`) on an inverse permutation entry out of range when
  validation was skipped; it now writes a zero row, like `MUL_MAT` drops such a row.
- Upstream, not changed here: `gguf.cpp` reads a tensor's type id straight into an `enum ggml_type` before
  its range check, which UBSan's `enum` check reports for every out-of-range id in the first seconds. It is
  benign with GCC and clang (neither narrows enum loads without `-fstrict-enums`), so the fuzz build turns
  that one check off (`tests/c/fuzz/CMakeLists.txt`); every other UBSan check stays fatal.
- Upstream, not changed here: `gguf_init_from_*` with `no_alloc = false` allocates the data size the
  file's tensor table claims before comparing it with the file, and aborts (`GGML_ASSERT` in `ggml_init`)
  when that allocation fails. llama.cpp's model loader parses with `no_alloc = true` and range-checks each
  tensor against the file, so models are not affected; the harness follows the loader."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, help="fuzz for this long")
    ap.add_argument("--runs", type=int, help="fuzz for this many executions")
    ap.add_argument("--seed", type=int, default=0, help="libFuzzer's seed (0: a new one each run)")
    ap.add_argument("--model", type=Path, help="converted JLCM GGUF to carve seeds from (default: the tests' tiny Llama)")
    ap.add_argument("--work", type=Path, help="folder for the corpus, crashes and log (default: a temporary one)")
    ap.add_argument("--report", type=Path, help="write the summary as Markdown here (docs/robustness.md)")
    a = ap.parse_args()
    if not a.seconds and not a.runs:
        ap.error("give --seconds or --runs")
    binary = build()
    work = a.work or Path(tempfile.mkdtemp(prefix="jlcm-fuzz-"))
    model = a.model or tiny_model(work / "model")
    seeds = make_corpus(work / "corpus", model)
    r = run_fuzzer(binary, work / "corpus", work / "out", a.seconds, a.runs, a.seed)
    print(f"fuzz: {r['executions']:,} executions ({r['exec_per_sec']:,}/s), {seeds} seeds, corpus {r['corpus']}, "
          f"cov {r['coverage']}, crashes {len(r['crashes'])}; log {r['log']}")
    if r["crashes"] or r["returncode"]:
        print(r["tail"], file=sys.stderr)
        print(f"error: the fuzzer found {len(r['crashes'])} crashing inputs in {work / 'out'}", file=sys.stderr)
        return 1
    if a.report:
        cmd = "scripts/fuzz.py " + " ".join(sys.argv[1:])
        a.report.write_text(REPORT.format(command=".venv/bin/python " + cmd, date=datetime.date.today().isoformat(),
                                          seeds=seeds, n_crashes=len(r["crashes"]), findings=FINDINGS,
                                          **{k: r[k] for k in ("executions", "exec_per_sec", "corpus", "coverage",
                                                               "peak_rss_mb")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
