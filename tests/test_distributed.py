"""A conversion spread over processes with torch.distributed (issue #29, jlcm_gguf/distributed.py): two CPU
processes under torchrun (gloo) split the calibration windows, all-reduce the Hessians and gradients and share the
rounding of each block's matrices, and write the file one process writes alone."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, error_line, llama_cpp_logits, run

sys.path.insert(0, str(ROOT / "scripts"))
import make_synthetic_llama as S  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "jlcm_gguf.cli"]
SINGLE = [sys.executable, "-m", "jlcm_gguf.cli"]
# the default rounding (GPTQ and two layer-wise rounds at 2 bits, the full input Hessians summed over windows)
OPTIONS = ["--nsamples", "16", "--seqlen", "64", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "hf"
    assert S.main([str(out), "--config", "tiny", "--seed", "3"]) == 0
    return out


def convert(cmd: list, model: Path, out: Path, *extra) -> str:
    res = run(cmd + [model, "--outfile", out, *OPTIONS, *extra], cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    joined = "torch.distributed: 2 processes (gloo), this is process 0" in res.stderr
    assert joined == (cmd is TORCHRUN), res.stderr[-3000:]
    return res.stdout


def tensors(path: Path) -> dict:
    from gguf import GGUFReader
    return {t.name: (int(t.tensor_type), np.array(t.data).tobytes()) for t in GGUFReader(str(path)).tensors}


@pytest.fixture(scope="module")
def single_file(tiny, tmp_path_factory) -> Path:
    one = tmp_path_factory.mktemp("single") / "one.gguf"
    convert(SINGLE, tiny, one)
    return one


def test_two_processes_write_the_single_process_file(tiny, single_file, tmp_path):
    """Hessians summed in two processes (float64 sums of the same float32 batch products) and matrices rounded where
    they are owned: the same bytes as one process."""
    one, two = single_file, tmp_path / "two.gguf"
    stdout = convert(TORCHRUN, tiny, two)
    assert stdout.count("wrote ") == 1, stdout  # process 0 reports; the other is silent
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob("*.jlcm-resume"))
    a, b = tensors(one), tensors(two)
    assert a.keys() == b.keys()
    differ = [n for n in a if a[n] != b[n]]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"
    assert one.read_bytes() == two.read_bytes()


def test_a_single_process_checkpoint_resumes_in_two_processes(tiny, single_file, tmp_path):
    """The checkpoint holds every window's activations: a conversion killed after its first block resumes under
    torchrun and writes the uninterrupted single process's file."""
    import subprocess
    import time
    out = tmp_path / "out.gguf"
    state = Path(str(out) + ".jlcm-resume") / "state.npz"
    proc = subprocess.Popen([str(a) for a in SINGLE + [tiny, "--outfile", out, *OPTIONS]], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not state.exists():
        assert proc.poll() is None, "the conversion ended before it could be killed"
        assert time.time() < deadline, "no block finished in 600 s"
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=30)
    with np.load(state) as z:
        assert int(z["done"]) == 1
    assert not out.exists()
    convert(TORCHRUN, tiny, out, "--resume")
    assert out.read_bytes() == single_file.read_bytes()


def test_two_processes_tune_with_all_reduced_gradients(tiny, tmp_path):
    """End-to-end tuning with each step's two windows split between the processes and the gradients summed: the
    tuned file computes what the single process's computes, up to the order of float sums (logits through
    llama-cpp-python, relative to their spread)."""
    one, two = tmp_path / "one.gguf", tmp_path / "two.gguf"
    extra = ["--tune-steps", "3", "--report", tmp_path / "report.json"]
    convert(SINGLE, tiny, one, *extra)
    import json
    single_report = json.loads((tmp_path / "report.json").read_text())
    convert(TORCHRUN, tiny, two, *extra)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tuning"]["steps"] == single_report["tuning"]["steps"] == 3
    assert report["tuning"]["kl_before"] == pytest.approx(single_report["tuning"]["kl_before"], rel=1e-4)
    assert report["tuning"]["kl_after"] == pytest.approx(single_report["tuning"]["kl_after"], rel=1e-3)
    tokens = [1, 450, 7483, 310, 3444, 338, 3681, 29889, 13, 1576]
    la, lb = llama_cpp_logits(one, tokens), llama_cpp_logits(two, tokens)
    assert np.abs(la - lb).max() < 1e-3 * (la.max() - la.min()), np.abs(la - lb).max()


@pytest.mark.parametrize("scorer", ["measured", "fast"])
def test_two_processes_score_the_plan_as_one(tiny, tmp_path, scorer):
    """A size budget's scoring split between the processes (each matrix scored by one; the calibration moments and,
    with --fast, the Fisher windows summed over both): the scores of one process within float rounding, the same
    plan and file types."""
    import json
    extra = ["--target-bpw", "4", "--tune-steps", "0", "--layer-rounds", "0"] + (["--fast"] if scorer == "fast" else [])
    plans, files = {}, {}
    for label, cmd in (("one", SINGLE), ("two", TORCHRUN)):
        plans[label], files[label] = tmp_path / f"{label}.json", tmp_path / f"{label}.gguf"
        convert(cmd, tiny, files[label], "--save-plan", plans[label], *extra)
    one, two = (json.loads(plans[k].read_text()) for k in ("one", "two"))
    assert one["options"].keys() == two["options"].keys() and len(one["options"]) > 10
    for name, opts in one["options"].items():
        assert [o[:2] for o in opts] == [o[:2] for o in two["options"][name]], name
        np.testing.assert_allclose([o[2] for o in opts], [o[2] for o in two["options"][name]], rtol=1e-6, err_msg=name)
    assert one["tensors"] == two["tensors"] and len(set(one["tensors"].values())) > 1
    a, b = tensors(files["one"]), tensors(files["two"])
    assert {n: t for n, (t, _) in a.items()} == {n: t for n, (t, _) in b.items()}


def test_too_few_windows_for_the_processes_is_one_clear_error(tiny, tmp_path):
    res = run(TORCHRUN + [tiny, "--outfile", tmp_path / "x.gguf", "--nsamples", "8", "--seqlen", "64",
                          "--threads", "1"], cwd=ROOT, timeout=600)
    assert res.returncode != 0
    assert "2 processes need at least 9 calibration windows" in res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "x.gguf").exists()


def test_owners_balance_matrices_deterministically(monkeypatch):
    from jlcm_gguf import distributed as D
    monkeypatch.setattr(D, "size", lambda: 2)
    sizes = {"gate": 45, "up": 45, "v": 16, "q": 16, "k": 16, "output": 16, "down": 45}
    owner = D.owners(sizes)
    assert list(owner) == list(sizes)  # the caller's order
    load = [sum(s for n, s in sizes.items() if owner[n] == r) for r in (0, 1)]
    assert sorted(load) == [93, 106], owner
    monkeypatch.setattr(D, "rank", lambda: 1)
    assert D.share(20, 8) == [8, 9, 10, 11, 12, 13, 14, 15]
