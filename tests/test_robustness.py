"""Bad input and interruptions: the converter gives one clear error and loses nothing, a killed conversion
resumes to the same bytes, and the patched loader refuses hostile JLCM files with one message naming the
tensor instead of crashing (llama.cpp's tools and llama-cpp-python alike)."""
from __future__ import annotations

import errno
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import CONVERTER, ROOT, SMALL_LAYERS, error_line, run, small_model, tool

sys.path.insert(0, str(ROOT / "scripts"))
import fuzz  # noqa: E402

FAST = ["--bits", "2", "--groups", "4", "--nsamples", "4", "--seqlen", "64", "--embd-type", "q8_0", "--threads", "2"]
N_LAYER = SMALL_LAYERS  # the `small` model's blocks: enough to interrupt after 2 and resume


@pytest.fixture(scope="module")
def resume_args(tmp_path_factory) -> list:
    """FAST with a plan that stores two of block 0's matrices as Q5_0: a resumed run must write them from
    block 0's checkpoint exactly as the uninterrupted run does."""
    from jlcm_gguf import plan as P
    from jlcm_gguf.model import LINEARS
    kinds = {f"blk.{b}.{n}.weight": "jlcm2" for b in range(N_LAYER) for n in LINEARS}
    kinds.update({"blk.0.attn_v.weight": "q5_0", "blk.0.ffn_down.weight": "q5_0", "token_embd.weight": "q8_0"})
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    P.save_plan(path, kinds)
    return FAST + ["--plan", path]


@pytest.fixture(scope="module")
def small_reference(small, resume_args, tmp_path_factory) -> Path:
    """An uninterrupted conversion of the small model."""
    out = tmp_path_factory.mktemp("ref") / "ref.gguf"
    res = run(CONVERTER + [small, "--outfile", out] + resume_args)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _blocks_done(ckpt: Path) -> int:
    try:
        with np.load(ckpt / "state.npz") as z:
            return int(z["done"])
    except (OSError, ValueError, KeyError, EOFError):
        return 0


def _kill_when(cmd: list, ready, what: str) -> None:
    """Starts the converter and kills it (SIGKILL) as soon as ready() holds."""
    proc = subprocess.Popen([str(a) for a in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not ready():
        assert proc.poll() is None, f"the conversion ended before it could be killed: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"no {what} in 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_kill_and_resume_gives_the_same_file(small, small_reference, resume_args, tmp_path):
    out = tmp_path / "out.gguf"
    ckpt = Path(str(out) + ".jlcm-resume")
    _kill_when(CONVERTER + [small, "--outfile", out] + resume_args, lambda: _blocks_done(ckpt) >= 2, "block finished")
    done = _blocks_done(ckpt)
    assert 2 <= done < N_LAYER, done
    assert not out.exists() and not list(tmp_path.glob("out.gguf.tmp*"))

    # a plain re-run refuses rather than silently discarding (or silently reusing) the finished blocks
    res = run(CONVERTER + [small, "--outfile", out] + resume_args)
    assert res.returncode == 1 and "--resume" in error_line(res) and "interrupted conversion" in error_line(res)
    assert _blocks_done(ckpt) == done and not out.exists()
    # resuming with other options is refused
    res = run(CONVERTER + [small, "--outfile", out, "--resume"] + FAST[:2] + ["--groups", "8"] + resume_args[4:])
    assert res.returncode == 1 and "other options or input" in error_line(res)

    res = run(CONVERTER + [small, "--outfile", out, "--resume"] + resume_args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming after block {done} of {N_LAYER}" in res.stderr
    assert out.read_bytes() == small_reference.read_bytes()
    assert not ckpt.exists() and not list(tmp_path.glob("out.gguf.tmp*"))


def _matrices_scored(ckpt: Path) -> int:
    try:
        return max(len((ckpt / "plan-scores-0.jsonl").read_text(encoding="utf-8").split("\n")) - 2, 0)
    except OSError:
        return 0


def test_kill_while_scoring_and_resume(small, tmp_path):
    """A conversion under a size budget killed while scoring its plan (hours for a 1.5B model on 2 cores): a plain
    re-run is refused at once, saying so; --resume scores only the matrices not yet scored and writes the file an
    uninterrupted run writes."""
    args = FAST + ["--target-size", "40000000", "--fast", "--no-learn", "--rounding", "nearest"]
    ref = tmp_path / "ref.gguf"
    res = run(CONVERTER + [small, "--outfile", ref] + args)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out.gguf"
    ckpt = Path(str(out) + ".jlcm-resume")
    _kill_when(CONVERTER + [small, "--outfile", out] + args, lambda: _matrices_scored(ckpt) >= 3, "matrix scored")
    done = _matrices_scored(ckpt)
    assert not (ckpt / "state.npz").exists() and not out.exists()

    res = run(CONVERTER + [small, "--outfile", out] + args)
    assert res.returncode == 1 and "--resume" in error_line(res), res.stderr[-2000:]
    assert f"interrupted conversion (plan scoring, {done} weight matrices scored)" in error_line(res)
    assert "scoring kinds" not in res.stderr  # refused before planning
    res = run(CONVERTER + [small, "--outfile", out, "--resume"] + args)
    assert res.returncode == 0, res.stderr[-3000:]
    m = re.search(r"plan scoring: resuming with (\d+) of (\d+) matrices scored", res.stderr)
    assert m and int(m.group(1)) == done < int(m.group(2)), res.stderr[-3000:]
    assert out.read_bytes() == ref.read_bytes()
    assert not ckpt.exists()


def test_checkpoint_fingerprint_covers_options_and_converter_source(tmp_path):
    """A checkpoint left by other converter code (an upgrade, a local edit) must not be resumed."""
    from types import SimpleNamespace
    from jlcm_gguf.checkpoint import FINGERPRINT_OPTIONS, converter_source_hash, fingerprint
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    opt = SimpleNamespace(model=model, **{k: None for k in FINGERPRINT_OPTIONS})
    tokens = np.arange(8)
    key = fingerprint(opt, tokens)
    assert key == fingerprint(opt, tokens, converter_source_hash())
    assert key != fingerprint(opt, tokens, "0" * 64)
    opt.bits = 2
    assert key != fingerprint(opt, tokens)


@pytest.mark.parametrize("case,message", [
    ("unreadable_tokenizer", "cannot load the tokenizer"),
    ("shape_mismatch", "shape mismatch: blk.0.ffn_gate.weight is 1536x576, config.json implies 1600x576"),
    ("missing_layer", "the checkpoint has no tensor for blk.5.attn_norm.weight (config.json has 6 layers)"),
    ("nan_weights", "tensor blk.1.ffn_down.weight has NaN or Inf values"),
])
def test_bad_checkpoint_one_clear_error(smollm2, tmp_path, case, message):
    if case == "unreadable_tokenizer":
        model = small_model(smollm2, tmp_path / "m", n_layer=1)
        (model / "tokenizer.json").unlink()
        (model / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    elif case == "shape_mismatch":
        model = small_model(smollm2, tmp_path / "m", n_layer=1, config_patch={"intermediate_size": 1600})
    elif case == "missing_layer":
        model = small_model(smollm2, tmp_path / "m", n_layer=5, config_patch={"num_hidden_layers": 6})
    else:
        def poison(w):
            w["model.layers.1.mlp.down_proj.weight"][3, 7] = np.nan
        model = small_model(smollm2, tmp_path / "m", n_layer=2, edit=poison)
    out = tmp_path / "out.gguf"
    res = run(CONVERTER + [model, "--outfile", out] + FAST)
    assert res.returncode == 1, res.stderr[-3000:]
    last = error_line(res)
    assert last.startswith("error: ") and message in last, res.stderr[-3000:]
    assert not list(tmp_path.glob("out.gguf*"))


def test_width_jlcm_does_not_divide_falls_back_with_notice(smollm2, tmp_path):
    """An FFN of 160 neurons: ffn_down's width 160 is not a multiple of 64, so that tensor alone is stored
    as Q8_0 with a notice; the file is complete and runs in llama.cpp."""
    from gguf import GGUFReader
    model = small_model(smollm2, tmp_path / "m", n_layer=2, n_ff=160)
    out = tmp_path / "out.gguf"
    res = run(CONVERTER + [model, "--outfile", out] + FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    for bid in range(2):
        assert (f"notice: blk.{bid}.ffn_down.weight has width 160, not a multiple of 64: "
                "stored in a standard type instead of JLCM") in res.stderr
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.0.ffn_up.weight"] == "JLCM2"
    res = run([tool("llama-completion"), "-m", out, "-p", "In the beginning", "-n", "4", "-t", "2", "-no-cnv",
               "--no-warmup", "--temp", "0"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def _convert_in_process(model: Path, out: Path, **kw):
    from jlcm_gguf.convert import Options, convert
    return convert(Options(model=model, outfile=out, bits=2, groups=4, nsamples=4, seqlen=64, embd_type="q8_0", **kw))


def test_full_disk_while_writing_loses_nothing(small, tmp_path, monkeypatch):
    """The disk fills up half way through the tensor data: one clear error, no output and no temporary
    file, and the finished blocks stay for --resume."""
    from gguf import GGUFWriter
    from jlcm_gguf.convert import ConvertError

    original = GGUFWriter.write_tensors_to_file

    def fill_up(self, *a, **kw):
        self.fout[0].write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(GGUFWriter, "write_tensors_to_file", fill_up)
    out = tmp_path / "out.gguf"
    with pytest.raises(ConvertError, match="no space left on the device writing .*out.gguf; nothing was written"):
        _convert_in_process(small, out)
    assert not out.exists() and not list(tmp_path.glob("out.gguf.tmp*"))
    assert _blocks_done(Path(str(out) + ".jlcm-resume")) == N_LAYER
    monkeypatch.setattr(GGUFWriter, "write_tensors_to_file", original)
    summary = _convert_in_process(small, out, resume=True)
    assert summary["bytes"] == out.stat().st_size


def test_not_enough_free_space_is_checked_first(small, tmp_path, monkeypatch):
    """Before any block is quantized (the file's predicted size against the free space), not after the conversion."""
    import shutil
    from collections import namedtuple

    import jlcm_gguf.blocks as B
    from jlcm_gguf.convert import ConvertError
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 6, 10 ** 6 - 1000, 1000))
    monkeypatch.setattr(B, "quantize_blocks", lambda *a, **k: pytest.fail("quantizing started"))
    out = tmp_path / "out.gguf"
    with pytest.raises(ConvertError, match="has 1,000 bytes free, the output needs about"):
        _convert_in_process(small, out)
    assert not out.exists() and not list(tmp_path.glob("out.gguf.tmp*"))
    assert not Path(str(out) + ".jlcm-resume").exists()


# ---- hostile JLCM files through the real loader ----

def _rewrite(src: Path, dst: Path, change) -> Path:
    """src with change(tensors) applied: tensors maps name -> (array, type), in file order."""
    from gguf import GGUFReader
    from jlcm_gguf.write import write_raw_gguf
    from tiny_llama import copy_metadata
    r = GGUFReader(str(src))
    tensors = {t.name: (np.array(t.data), t.tensor_type) for t in r.tensors}
    change(tensors)
    write_raw_gguf(dst, tensors, r.fields["general.architecture"].contents(), lambda w: copy_metadata(r, w))
    return dst


def _set(tensors, name, fn):
    arr, qtype = tensors[name]
    tensors[name] = (fn(arr.copy()), qtype)


def _bad_bounds(a):
    a[..., 1] = a[..., 0]
    return a


def _bad_perm(a):
    a[0, 0] = a[0, 1]
    return a


HOSTILE = {
    "bounds_not_increasing": (lambda t: _set(t, "blk.0.attn_q.weight.jlcm_bounds", _bad_bounds),
                              "invalid JLCM tensor blk.0.attn_q.weight: blk.0.attn_q.weight.jlcm_bounds: group bound 1"),
    "perm_not_bijection": (lambda t: _set(t, "blk.1.ffn_down.weight.jlcm_perm", _bad_perm),
                           "invalid JLCM tensor blk.1.ffn_down.weight: blk.1.ffn_down.weight.jlcm_perm: not a permutation"),
    "codebook_wrong_shape": (lambda t: _set(t, "blk.0.ffn_up.weight.jlcm_cb", lambda a: a[..., :2].copy()),
                             "invalid JLCM tensor: blk.0.ffn_up.weight: codebook blk.0.ffn_up.weight.jlcm_cb must be i8"),
    "bounds_missing": (lambda t: t.pop("blk.0.attn_k.weight.jlcm_bounds"),
                       "invalid JLCM tensor: blk.0.attn_k.weight: codebook and group bounds must both be present"),
    "orphan_companion": (lambda t: t.__setitem__("blk.0.attn_norm.weight.jlcm_cb", t["blk.0.attn_q.weight.jlcm_cb"]),
                         "wrong number of tensors"),
}


def _load_in_python(path: Path):
    """llama-cpp-python loading path in a process of its own: it must raise, and the process live on."""
    code = ("import sys, llama_cpp\n"
            "try:\n    llama_cpp.Llama(model_path=sys.argv[1], verbose=True)\n"
            "except ValueError as e:\n    print('refused:', e)\n")
    res = run([sys.executable, "-c", code, path], timeout=120)
    assert res.returncode == 0 and "refused: Failed to load model from file" in res.stdout, res.stderr[-2000:]
    return res


@pytest.mark.parametrize("fault", sorted(HOSTILE))
def test_hostile_file_refused_by_the_loader(tiny, tmp_path, fault):
    tiny = tiny[0]
    change, message = HOSTILE[fault]
    bad = _rewrite(tiny, tmp_path / "bad.gguf", change)
    res = run([tool("llama-completion"), "-m", bad, "-p", "Hi", "-n", "1", "-no-cnv", "--no-warmup", "-t", "2"],
              timeout=120)
    # a clean failure, not a signal (the tool's asynchronous log may lose its last lines at exit: upstream
    # llama.cpp issue 22142, so the message is checked below, where logging is synchronous)
    assert res.returncode > 0, f"exit {res.returncode} (a negative one is a signal): {res.stderr[-2000:]}"
    # an application embedding llama-cpp-python gets an exception, and its process lives on
    res = _load_in_python(bad)
    assert message in res.stderr, res.stderr[-3000:]


def test_truncated_file_refused(tiny, tmp_path):
    data = tiny[0].read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:len(data) - 1000])
    res = run([tool("llama-completion"), "-m", bad, "-p", "Hi", "-n", "1", "-no-cnv", "--no-warmup"], timeout=120)
    assert res.returncode > 0, res.stderr[-2000:]
    res = _load_in_python(bad)
    assert "data is not within the file bounds, model is corrupted or incomplete" in res.stderr, res.stderr[-3000:]


@pytest.mark.parametrize("shape", sorted(fuzz.OVERFLOW_SHAPES))
def test_overflowing_shape_refused_not_aborted(tmp_path, shape):
    """Found by the fuzzer: upstream gguf.cpp's element-count check let these shapes through, and
    ggml_new_tensor's stricter assertion then aborted the process (patch 0007 makes the two checks agree)."""
    bad = fuzz.one_tensor_info_gguf(tmp_path / "shape.gguf", *fuzz.OVERFLOW_SHAPES[shape])
    res = run([tool("llama-completion"), "-m", bad, "-p", "Hi", "-n", "1", "-no-cnv", "--no-warmup"], timeout=120)
    assert res.returncode > 0, f"exit {res.returncode} (a negative one is a signal): {res.stderr[-2000:]}"
    res = _load_in_python(bad)
    assert "incorrect shape for a tensor 'w' may cause overflow errors" in res.stderr, res.stderr[-3000:]


def _kill_after(args: list, out: Path, blocks: int) -> int:
    ckpt = Path(str(out) + ".jlcm-resume")
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while _blocks_done(ckpt) < blocks:
        assert proc.poll() is None, f"the conversion ended before it could be killed: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, "no block finished in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return _blocks_done(ckpt)


def test_learning_report_and_resume_equal_an_uninterrupted_run(small, tmp_path):
    """With joint learning (proximal mappings) and --report: a killed and resumed conversion writes the same bytes
    and the same per-block report as an uninterrupted one; the report's totals add up."""
    learn = FAST + ["--learn-steps", "6", "--layer-rounds", "2"]
    ref, ref_report = tmp_path / "ref.gguf", tmp_path / "ref.json"
    res = run(CONVERTER + [small, "--outfile", ref, "--report", ref_report] + learn)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(ref_report.read_text())
    assert report["learn_mappings"] == "proximal" and len(report["blocks"]) == N_LAYER
    for b in report["blocks"]:
        assert set(b) >= {"block", "loss_before", "loss_after", "kept", "indices", "indices_changed"}
        assert b["kept"] == (b["loss_after"] < b["loss_before"])
    tot = report["learning"]
    assert tot["indices"] == sum(b["indices"] for b in report["blocks"]) > 0
    assert tot["indices_changed"] == sum(b["indices_changed"] for b in report["blocks"])
    assert tot["indices_changed_frac"] == tot["indices_changed"] / tot["indices"]
    # layer-wise learning (--layer-rounds 2) ran first, on every matrix, and moved indices
    lay = report["layer_learning"]
    assert lay["matrices"] == 7 * N_LAYER and lay["indices"] == tot["indices"]
    assert lay["indices_changed"] == sum(b["layer_indices_changed"] for b in report["blocks"]) > 0
    assert lay["loss_after_mean"] < lay["loss_before_mean"]
    assert report["indices_changed"]["changed"] == lay["indices_changed"] + tot["indices_changed"]

    out, out_report = tmp_path / "out.gguf", tmp_path / "out.json"
    args = CONVERTER + [small, "--outfile", out, "--report", out_report] + learn
    done = _kill_after(args, out, 2)
    assert 2 <= done < N_LAYER
    res = run(args + ["--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.read_bytes() == ref.read_bytes()
    resumed = json.loads(out_report.read_text())
    assert resumed["blocks"] == report["blocks"] and resumed["learning"] == report["learning"]
    assert resumed["layer_learning"] == report["layer_learning"]


def test_learn_mappings_off_changes_no_index(small, tmp_path):
    report = tmp_path / "off.json"
    res = run(CONVERTER + [small, "--outfile", tmp_path / "off.gguf", "--report", report, "--learn-mappings", "off"]
              + FAST + ["--learn-steps", "6", "--layer-rounds", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(report.read_text())
    assert r["learn_mappings"] == "off" and r["learning"]["indices_changed"] == 0
    assert r["layer_learning"]["indices_changed"] == 0 and r["indices_changed"]["changed"] == 0
    assert r["layer_learning"]["loss_after_mean"] < r["layer_learning"]["loss_before_mean"]  # codebooks and scales
    assert any(b["kept"] for b in r["blocks"]), "codebook and scale learning lowered no block's loss"


def test_end_to_end_tuning_lowers_held_out_kl_and_changes_the_file(small, tmp_path):
    """--tune-steps: codebooks, block scales and norms trained to the float model's next-token distribution; the
    held-out KL falls, the file differs from the untuned one only in values (same tensors, types and size), and
    llama.cpp's perplexity of the tuned file is lower."""
    from gguf import GGUFReader

    from jlcm_gguf.evaluate import llama_cpp_docs, perplexity
    base, tuned, report = tmp_path / "base.gguf", tmp_path / "tuned.gguf", tmp_path / "tuned.json"
    args = FAST + ["--nsamples", "8"]
    assert run(CONVERTER + [small, "--outfile", base] + args).returncode == 0
    res = run(CONVERTER + [small, "--outfile", tuned, "--report", report, "--tune-steps", "12"] + args)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(report.read_text())
    t = r["tuning"]
    assert t["kept"] and t["kl_after"] < 0.95 * t["kl_before"], t
    # tuning leaves the indices alone by default (--tune-mappings off): the report says so
    assert r["tune_mappings"] == "off" and t["indices_changed"] == 0 and not t["mapping_trials"]
    # layer-wise learning runs by default (2 rounds, proximal sweep) and moves indices; the total counts them
    lay = r["layer_learning"]
    assert r["layer_rounds"] == 2 and lay["indices_changed_frac"] > 0.005 and lay["loss_after_mean"] < lay["loss_before_mean"]
    assert r["indices_changed"]["changed"] == lay["indices_changed"] and r["indices_changed"]["indices"] == t["indices"] > 0
    a, b = GGUFReader(str(base)), GGUFReader(str(tuned))
    assert [(x.name, x.tensor_type) for x in a.tensors] == [(x.name, x.tensor_type) for x in b.tensors]
    assert base.stat().st_size == tuned.stat().st_size and base.read_bytes() != tuned.read_bytes()
    text = llama_cpp_docs(tmp_path)
    p_base, p_tuned = perplexity(base, text, chunks=4, ctx=128)[0], perplexity(tuned, text, chunks=4, ctx=128)[0]
    print(f"\nsmall model: held-out KL {t['kl_before']:.3f} -> {t['kl_after']:.3f}; perplexity {p_base:.1f} -> {p_tuned:.1f}")
    assert p_tuned < p_base
