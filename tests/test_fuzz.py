"""The short fuzz run of .ci/run: a fixed-seed run (reproducible; under a minute) of libFuzzer with AddressSanitizer and UBSan over hostile
JLCM GGUF files (scripts/fuzz.py; the long run's summary is docs/robustness.md)."""
from __future__ import annotations

import re
import sys

from conftest import ROOT, run

FUZZ_RUNS, FUZZ_SEED = 30000, 1


def test_short_fuzz_run_finds_no_crash(tmp_path):
    res = run([sys.executable, ROOT / "scripts" / "fuzz.py", "--runs", FUZZ_RUNS, "--seed", FUZZ_SEED,
               "--work", tmp_path], timeout=1800)  # the first build of the sanitized ggml takes minutes
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    m = re.search(r"fuzz: ([\d,]+) executions .* (\d+) seeds", res.stdout)
    assert m, res.stdout
    executions, seeds = int(m.group(1).replace(",", "")), int(m.group(2))
    # it really fuzzed: the seeds (every companion layout plus the tiny model's weights) and many mutants
    assert seeds >= 12 + 2 + 10 and executions > 10 * seeds, res.stdout
