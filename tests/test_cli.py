"""jlcm-convert's command line in llama.cpp's conventions (issue #31 item 4): --outtype (with --bits as its
deprecated alias), llama-quantize's --token-embedding-type, --output-tensor-type and --tensor-type, --dry-run,
and the research switches grouped after the user options. Conversions run on a tiny random Llama (2 blocks,
128 wide) with SmolLM2's tokenizer, in this process."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from jlcm_gguf.cli import build_parser, main, parse_args
from jlcm_gguf.convert import embedding_type

SMALL = ["--groups", "4", "--nsamples", "2", "--seqlen", "32", "--tune-steps", "0", "--threads", "2"]
RESEARCH = ["--variant", "--rounding", "--learn-steps", "--no-learn", "--learn-mappings", "--learn-loss",
            "--tune-mappings", "--tune-mapping-confidence", "--plan-error", "--rotate"]
USER = ["--outfile", "--outtype", "--dry-run", "--device", "--target-size", "--target-bpw", "--plan", "--token-embedding-type",
        "--output-tensor-type", "--embd-type", "--tensor-type", "--imatrix", "--calib", "--nsamples", "--resume", "--threads",
        "--report"]


def tiny_hf(dst: Path, tokenizer_dir: Path, tied: bool) -> Path:
    """tiny_llama's random weights (2 blocks, 128 wide, FFN 256) as a Hugging Face Llama folder with the
    tokenizer of tokenizer_dir (its vocabulary sets the embeddings' rows); tied: no lm_head."""
    from safetensors.numpy import save_file
    from tiny_llama import N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_LAYER, random_weights

    dst.mkdir(parents=True)
    cfg = json.loads((tokenizer_dir / "config.json").read_text())
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    hf = {}
    for name, w in random_weights(cfg["vocab_size"], seed=5).items():
        if name.startswith("blk."):
            _, bid, kind, suffix = name.split(".")
            hf[f"model.layers.{bid}.{per_layer[kind]}.{suffix}"] = w
        elif not (tied and name == "output.weight"):
            hf[top[name]] = w
    save_file(hf, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg.update(hidden_size=N_EMBD, intermediate_size=N_FF, num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD,
               num_key_value_heads=N_HEAD_KV, head_dim=N_EMBD // N_HEAD, max_position_embeddings=256,
               tie_word_embeddings=tied)
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in tokenizer_dir.iterdir():
        if f.name.startswith("tokenizer"):
            (dst / f.name).symlink_to(f)
    return dst


@pytest.fixture(scope="module")
def tiny(smollm2, tmp_path_factory) -> Path:
    return tiny_hf(tmp_path_factory.mktemp("cli") / "untied", smollm2, tied=False)


@pytest.fixture(scope="module")
def tiny_tied(smollm2, tmp_path_factory) -> Path:
    return tiny_hf(tmp_path_factory.mktemp("cli") / "tied", smollm2, tied=True)


def cli(args, capsys) -> tuple[object, str, str]:
    """main() in this process: (exit status, or the message of a ConvertError; stdout; stderr)."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def dry_run(args, capsys) -> tuple[int, dict[str, str]]:
    """--dry-run: (the file's bytes it printed, each weight matrix's type it printed)."""
    rc, out, err = cli(list(args) + ["--dry-run"], capsys)
    assert rc == 0, (rc, err[-3000:])
    size = re.search(r"^dry run: .* would take ([\d,]+) bytes", out, re.M)
    assert size, out
    types = dict(re.findall(r"^(\S+\.weight)\s+\S+\s+(\S+)\s+[\d,]+ bytes$", out, re.M))
    return int(size.group(1).replace(",", "")), types


def file_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader
    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors
            if t.name.endswith(".weight") and len(t.shape) == 2}


# --- parsing -------------------------------------------------------------------------------------------------

def test_outtype_sets_the_layer_bits_and_bits_is_its_deprecated_alias(tmp_path):
    m = tmp_path / "model"
    assert parse_args([str(m)]).bits == 2 and parse_args([str(m)]).outfile == m / "model-jlcm2.gguf"
    three = parse_args([str(m), "--outtype", "jlcm3"])
    assert three.bits == 3 and three.outfile == m / "model-jlcm3.gguf"
    assert parse_args([str(m), "--bits", "3"]) == three  # the same Options in every field
    assert parse_args([str(m), "--bits", "4", "--outtype", "JLCM4"]).bits == 4  # agreeing: fine
    auto = parse_args([str(m), "--outtype", "auto", "--target-size", "8MB"])
    assert auto.target_bytes == 8_000_000 and auto.outfile == m / "model-jlcm-auto.gguf"
    assert auto == parse_args([str(m), "--target-size", "8MB", "--outfile", str(m / "model-jlcm-auto.gguf")])
    # as before --outtype: --bits with a budget leaves the types to the plan
    assert parse_args([str(m), "--bits", "3", "--target-bpw", "3"]).target_bpw == 3
    text = build_parser().format_help()
    assert "--outtype {jlcm2,jlcm3,jlcm4,auto}" in text and "--bits" not in text


@pytest.mark.parametrize("args, message", [
    (["--bits", "3", "--outtype", "jlcm4"], "--bits 3 (the old name of --outtype jlcm3) disagrees with --outtype jlcm4"),
    (["--bits", "2", "--outtype", "auto", "--target-size", "8MB"], "disagrees with --outtype auto"),
    (["--outtype", "auto"], "give --target-size or --target-bpw"),
    (["--outtype", "jlcm3", "--target-size", "8MB"], "lets the plan choose the types: use --outtype auto"),
    (["--outtype", "jlcm3", "--plan", "p.json"], "--plan lets the plan choose the types: leave --outtype out"),
    (["--outtype", "jlcm5"], "argument --outtype: invalid choice: 'jlcm5'"),
    (["--token-embedding-type", "q9_0"], "argument --token-embedding-type: invalid choice: 'q9_0'"),
    (["--output-tensor-type", "iq2_xs"], "argument --output-tensor-type: invalid choice: 'iq2_xs'"),
    (["--tensor-type", "ffn_down"], "'ffn_down' is not PATTERN=TYPE"),
    (["--tensor-type", "=q8_0"], "'=q8_0' is not PATTERN=TYPE"),
    (["--tensor-type", "ffn_down=q9_0"], "unknown type 'q9_0' in 'ffn_down=q9_0'"),
    (["--tensor-type", r"blk\.(0=q8_0"], r"'blk\\.(0' in 'blk\\.(0=q8_0' is not a regular expression"),
])
def test_bad_arguments_one_clear_error(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        parse_args([str(tmp_path)] + args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("jlcm-convert: error: ") and message in err, err


def test_type_options_parse(tmp_path):
    m = str(tmp_path)
    both = parse_args([m, "--embd-type", "q8_0"])
    assert both.embd_pinned and (both.token_embd_type, both.output_type) == (None, None)
    assert [embedding_type(both, n) for n in ("token_embd.weight", "output.weight")] == ["q8_0", "q8_0"]
    split = parse_args([m, "--embd-type", "q8_0", "--output-tensor-type", "JLCM2"])
    assert [embedding_type(split, n) for n in ("token_embd.weight", "output.weight")] == ["q8_0", "jlcm2"]
    own = parse_args([m, "--token-embedding-type", "q6_k"])
    assert own.token_embd_type == "q6_k" and not own.embd_pinned and embedding_type(own, "output.weight") == "jlcm4"
    opt = parse_args([m, "--tensor-type", r"blk\.0\..*=jlcm4", "--tensor-type", "ffn_down=Q8_0",
                      "--tensor-type", "a=b=f16"])
    assert opt.tensor_types == ((r"blk\.0\..*", "jlcm4"), ("ffn_down", "q8_0"), ("a=b", "f16"))
    assert parse_args([m, "--dry-run"]).dry_run and not parse_args([m]).dry_run


def test_help_lists_user_options_before_the_research_switches():
    text = build_parser().format_help()
    title = text.index("research and ablations (docs/ALGORITHM.md):")
    research = text[title:]
    for flag in RESEARCH:
        assert re.search(rf"^  {re.escape(flag)}(?![\w-])", research, re.M), flag
    for flag in USER:
        assert re.search(rf"^  {re.escape(flag)}(?![\w-])", text[:title], re.M), flag
        assert not re.search(rf"^  {re.escape(flag)}(?![\w-])", research, re.M), flag


# --- conversions of the tiny model ---------------------------------------------------------------------------

BY_HAND = ["--outtype", "jlcm3", "--token-embedding-type", "q8_0", "--output-tensor-type", "jlcm2",
           "--tensor-type", r"blk\.0\.ffn_down=f16", "--tensor-type", "ffn_down=q6_k",  # the first match decides
           "--tensor-type", "attn_k=q4_0", "--tensor-type", r"blk\.1\.attn_v=q5_0",
           "--tensor-type", r"blk\.1\.ffn_up=jlcm4"]


def test_types_by_hand_and_dry_run_size(tiny, tmp_path, capsys):
    """Each option gives the tensors it names their type in the written file, and a dry run prints those types and
    the file's size to the byte without writing anything."""
    from jlcm_gguf import plan as P
    out = tmp_path / "sub" / "by-hand.gguf"
    args = [tiny, "--outfile", out] + BY_HAND + SMALL
    size, printed = dry_run(args, capsys)
    assert not out.parent.exists()  # nothing written, not even the folder
    rc, _, err = cli(args, capsys)
    assert rc == 0, err[-3000:]
    types = file_types(out)
    want = {n: "JLCM3" for n in types}
    want.update({"token_embd.weight": "Q8_0", "output.weight": "JLCM2", "blk.0.ffn_down.weight": "F16",
                 "blk.1.ffn_down.weight": "Q6_K", "blk.0.attn_k.weight": "Q4_0", "blk.1.attn_k.weight": "Q4_0",
                 "blk.1.attn_v.weight": "Q5_0", "blk.1.ffn_up.weight": "JLCM4"})
    assert types == want and len(types) == 16
    assert printed == types
    assert out.stat().st_size == size
    # the metadata's plan names the hand-given types too (--plan FILE reads them back)
    plan = P.load_plan(out)
    assert plan["blk.0.ffn_down.weight"] == "f16" and plan["blk.0.attn_k.weight"] == "q4_0"
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    try:
        llm.eval(llm.tokenize(b"In the beginning", add_bos=False))
        # llm.scores holds every token's logits only with logits_all (otherwise zeros)
        logits = np.asarray(llm.scores[:llm.n_tokens])
        assert np.all(np.isfinite(logits)) and logits.std(axis=1).min() > 1e-3
    finally:
        llm.close()


def test_budget_with_types_by_hand(tiny, tmp_path, capsys):
    """--outtype auto under a budget: the hand-given types stay, count in the size, and the plan fits the rest
    into the budget; the dry run's size is the written file's."""
    out = tmp_path / "auto.gguf"
    target = 11_000_000  # every planned matrix at JLCM 2-bit, with these types by hand: ~10.8 MB
    args = [tiny, "--outfile", out, "--outtype", "auto", "--target-size", target, "--token-embedding-type", "q8_0",
            "--tensor-type", r"blk\.0\.ffn_down=f16", "--tensor-type", "attn_k=q4_0",
            "--save-plan", tmp_path / "plan.json"] + SMALL
    size, printed = dry_run(args, capsys)
    rc, _, err = cli(args, capsys)
    assert rc == 0, err[-3000:]
    assert out.stat().st_size == size <= target
    types = file_types(out)
    assert printed == types
    fixed = {"token_embd.weight": "Q8_0", "blk.0.ffn_down.weight": "F16", "blk.0.attn_k.weight": "Q4_0",
             "blk.1.attn_k.weight": "Q4_0"}
    assert {n: types[n] for n in fixed} == fixed
    planned = {n: k for n, k in types.items() if n not in fixed}
    assert set(planned.values()) <= {"JLCM2", "JLCM3", "JLCM4", "Q5_0", "Q8_0"}
    assert json.loads((tmp_path / "plan.json").read_text())["predicted_bytes"] == size


def test_embedding_types_dry_run(tiny, capsys, tmp_path):
    """--embd-type sets both embeddings, the per-tensor options override it for their tensor, and --tensor-type
    does not change a type they give (llama-quantize's precedence)."""
    base = [tiny, "--outfile", tmp_path / "x.gguf"] + SMALL
    _, t = dry_run(base + ["--embd-type", "q5_0"], capsys)
    assert (t["token_embd.weight"], t["output.weight"]) == ("Q5_0", "Q5_0")
    _, t = dry_run(base + ["--embd-type", "q5_0", "--output-tensor-type", "f16", "--tensor-type", "output=jlcm4"], capsys)
    assert (t["token_embd.weight"], t["output.weight"]) == ("Q5_0", "F16")
    assert t["blk.0.attn_output.weight"] == t["blk.1.attn_output.weight"] == "JLCM4"
    assert t["blk.0.attn_q.weight"] == "JLCM2"  # --outtype's default
    assert not list(tmp_path.iterdir())


def test_tensor_type_errors(tiny, capsys, tmp_path):
    base = [tiny, "--outfile", tmp_path / "x.gguf", "--dry-run"] + SMALL
    rc, _, _ = cli(base + ["--tensor-type", r"blk\.7\.=jlcm4"], capsys)
    assert rc.startswith(r"error: --tensor-type blk\.7\.=jlcm4: the pattern matches no weight matrix of this model")
    rc, _, _ = cli(base + ["--tensor-type", "attn_q=q6_k"], capsys)  # 128 wide; a K-quant block is 256
    assert rc == ("error: --tensor-type attn_q=q6_k: blk.0.attn_q.weight is 128 wide, and q6_k needs a width "
                  "that is a multiple of 256")
    rc, _, _ = cli(base + ["--token-embedding-type", "q4_k"], capsys)
    assert rc.startswith("error: --token-embedding-type q4_k: token_embd.weight is 128 wide")
    assert not list(tmp_path.iterdir())


def test_tied_model_refuses_output_tensor_type(tiny_tied, capsys, tmp_path):
    """A tied model's head is token_embd: --output-tensor-type is refused with one message, a pattern that could
    only name the output matches nothing, and the token embedding's type applies to the head."""
    base = [tiny_tied, "--outfile", tmp_path / "x.gguf"] + SMALL
    rc, _, _ = cli(base + ["--output-tensor-type", "q8_0", "--dry-run"], capsys)
    assert rc.startswith("error: --output-tensor-type q8_0: this model ties its output to token_embd")
    rc, _, _ = cli(base + ["--tensor-type", r"^output\.weight=q8_0", "--dry-run"], capsys)
    assert "matches no weight matrix of this model" in rc and "no output.weight" in rc
    _, t = dry_run(base + ["--token-embedding-type", "q8_0", "--tensor-type", "output=q5_0"], capsys)
    assert "output.weight" not in t and t["token_embd.weight"] == "Q8_0"
    assert t["blk.0.attn_output.weight"] == "Q5_0"  # re.search: "output" matches attn_output too


# --- --imatrix -------------------------------------------------------------------------------------------------

def test_no_learn_turns_every_learning_step_off(tiny, tmp_path, capsys):
    """--no-learn: k-means codebooks and GPTQ rounding only; by default layer-wise learning and tuning run."""
    base = [tiny, "--outtype", "jlcm2"] + [a for a in SMALL if a not in ("--tune-steps", "0")] + ["--tune-steps", "2"]
    reports = {}
    for label, extra in (("default", []), ("no-learn", ["--no-learn"])):
        rc, _, err = cli(base + ["--outfile", tmp_path / f"{label}.gguf", "--report", tmp_path / f"{label}.json", *extra],
                         capsys)
        assert rc == 0, err[-3000:]
        reports[label] = json.loads((tmp_path / f"{label}.json").read_text())
    assert reports["default"]["layer_rounds"] == 2 and reports["default"]["layer_learning"]["indices_changed"] > 0
    assert reports["default"]["tuning"]["steps"] == 2
    off = reports["no-learn"]
    assert off["layer_rounds"] == 0 and off["layer_learning"] is None and off["tuning"] is None and off["learning"] is None


def test_saved_scores_only_for_the_same_calibration(tiny, tmp_path, capsys, caplog):
    """--plan FILE.json with a new budget searches the saved scores again, but only if they were measured on the
    same calibration windows, importance and quantizer settings; otherwise one clear error."""
    caplog.set_level("INFO", logger="jlcm-convert")
    plan = tmp_path / "plan.json"
    base = [tiny, "--outfile", tmp_path / "a.gguf", "--outtype", "auto"] + SMALL
    dry_run(base + ["--target-size", 11_000_000, "--save-plan", plan], capsys)
    rc, _, err = cli(base + ["--target-size", 12_000_000, "--plan", plan, "--dry-run"], capsys)
    assert rc == 0 and "searching the scores saved" in caplog.text, err[-3000:]
    ref = tiny_float(tiny)
    imatrix = write_imatrix(tmp_path / "importance.gguf", {n: np.ones(np.shape(ref[n])[1]) for n in ref
                                                           if n.startswith("blk.") and np.ndim(ref[n]) == 2})
    for extra in (["--seed", "1"], ["--imatrix", imatrix], ["--calib", "kjv"], ["--groups", "2"]):
        rc, _, err = cli(base + ["--target-size", 12_000_000, "--plan", plan, "--dry-run", *extra], capsys)
        assert rc != 0 and "measured on other calibration data or importance" in str(rc) + err, (extra, rc, err[-2000:])


def tiny_float(model: Path) -> dict:
    """The tiny model's float tensors as the vendored converter writes them (GGUF names and layout)."""
    import gguf

    from jlcm_gguf.convert import float_tensors, import_conversion
    conversion = import_conversion()
    config = json.loads((model / "config.json").read_text())
    cls = conversion.get_model_class(conversion.get_model_architecture(config, conversion.ModelType.TEXT))
    return float_tensors(cls(model, gguf.LlamaFileType.ALL_F32, Path("/dev/null"), eager=True))[0]


def write_imatrix(path: Path, sums: dict[str, np.ndarray], count: float = 64.0) -> Path:
    """A file in llama-imatrix's GGUF layout: NAME.in_sum2, NAME.counts and the imatrix.* metadata."""
    import gguf
    w = gguf.GGUFWriter(str(path), arch="imatrix")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["test"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 64)
    for name, s in sums.items():
        w.add_tensor(name + ".in_sum2", np.asarray(s, dtype=np.float32) * count)
        w.add_tensor(name + ".counts", np.array([count], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_imatrix_weights_the_errors(tiny, tmp_path, capsys):
    """--imatrix: a column that the file says is 10^4 times as important as the others is stored far more
    accurately (GPTQ rounding, codebooks and scales all weigh it so), and the error weighted by the file's
    importance is lower than without it."""
    from jlcm_gguf.read import read_jlcm
    ref = tiny_float(tiny)
    layer = [n for n in ref if n.startswith("blk.") and n.endswith(".weight") and np.ndim(ref[n]) == 2]
    sums = {}
    for n in layer + ["output.weight"]:
        s = np.ones(np.shape(ref[n])[1])
        s[0] = 1e4
        sums[n] = s
    imatrix = write_imatrix(tmp_path / "importance.gguf", sums)
    errors = {}
    for label, extra in (("plain", []), ("imatrix", ["--imatrix", imatrix])):
        out = tmp_path / f"{label}.gguf"
        rc, _, err = cli([tiny, "--outfile", out, "--outtype", "jlcm2", *SMALL, *extra], capsys)
        assert rc == 0, err[-3000:]
        weights = read_jlcm(out)
        errors[label] = {n: ((weights[n].dequantize() - ref[n]) ** 2).sum(0)
                         for n in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "output.weight")}
        # (matrices whose rows or columns the fold re-orders in the file, e.g. ffn_gate, would need that order)
    for n, e in errors["imatrix"].items():
        plain = errors["plain"][n]
        # column 0: a much smaller error, paid for by the others (its 64-weight blocks' scales now fit column 0);
        # the error weighted as the file says is lower
        assert e[0] < 0.25 * plain[0], (n, e[0], plain[0])
        assert e[1:].mean() > plain[1:].mean(), (n, e[1:].mean(), plain[1:].mean())
        assert (e * sums[n]).sum() < (plain * sums[n]).sum(), n


def test_imatrix_from_llama_imatrix_and_bad_files(tiny, tmp_path, capsys):
    """A file written by llama-imatrix itself (--process-output: the head too) is read and converts; a non-GGUF
    file, one of another model's widths and one without imatrix metadata each get one clear error."""
    import subprocess

    from conftest import tool
    from jlcm_gguf.convert import llama_cpp_dir
    from jlcm_gguf.imatrix import read_imatrix
    import sys
    f32 = tmp_path / "tiny-f32.gguf"
    subprocess.run([sys.executable, str(llama_cpp_dir() / "convert_hf_to_gguf.py"), str(tiny), "--outtype",
                    "f32", "--outfile", str(f32)], check=True, capture_output=True)
    text = tmp_path / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 60)
    made = tmp_path / "made.gguf"
    res = subprocess.run([str(tool("llama-imatrix")), "-m", str(f32), "-f", str(text), "-c", "64", "--chunks", "4",
                          "-t", "2", "--process-output", "-o", str(made)], capture_output=True, text=True)
    assert res.returncode == 0 and made.is_file(), res.stderr[-3000:]
    ref = tiny_float(tiny)
    h = read_imatrix(made, ref)
    layer = {n.removesuffix(".weight") for n in ref if n.startswith("blk.") and np.ndim(ref[n]) == 2}
    assert layer <= h.keys() and "output" in h
    assert all(v.shape == (np.shape(ref["blk.0.attn_q.weight"])[1],) and np.all(v >= 0) and v.max() > 0
               for k, v in h.items() if k.endswith("attn_q"))
    out = tmp_path / "with-imatrix.gguf"
    rc, _, err = cli([tiny, "--outfile", out, *SMALL, "--imatrix", made], capsys)
    assert rc == 0 and out.is_file(), err[-3000:]

    not_gguf = tmp_path / "old.dat"
    not_gguf.write_bytes(b"\x07\x00\x00\x00" + b"x" * 100)
    wrong = write_imatrix(tmp_path / "wrong.gguf", {"blk.0.attn_q.weight": np.ones(64)})
    plain = tmp_path / "plain.gguf"
    import gguf
    g = gguf.GGUFWriter(str(plain), arch="llama")  # a GGUF file without imatrix metadata
    g.write_header_to_file(); g.write_kv_data_to_file(); g.write_tensors_to_file(); g.close()
    for bad, message in ((not_gguf, "legacy .dat imatrix"), (wrong, "an imatrix of another model"),
                         (plain, "not a llama-imatrix file"), (tmp_path / "missing.gguf", "no such file")):
        rc, _, err = cli([tiny, "--outfile", tmp_path / "x.gguf", *SMALL, "--imatrix", bad], capsys)
        assert isinstance(rc, str) and message in rc and str(bad) in rc, (bad, rc)
        assert not (tmp_path / "x.gguf").exists()
