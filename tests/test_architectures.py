"""The architectures jlcm-convert accepts (issue #30), each as a tiny random Hugging Face checkpoint (2 blocks,
128 wide, SmolLM2's real tokenizer) with the float details that change its function: Llama 3's rope frequency
factors, linear and YaRN RoPE scaling, attention and MLP biases, Mistral, Qwen2 with q/k/v biases, Qwen3's q/k
norms and a head size that is not n_embd / n_head, a sentencepiece tokenizer (tokenizer.model only), Gemma 3 (GELU, sliding-window layers with their own RoPE base,
post-norms, scaled embeddings, soft-capped logits).

For each: llama.cpp's own converter writes the checkpoint as F32, and the patched build computes its logits;
- the converter's float forward (model.py, what calibration and learning run) reproduces them, and the same
  forward without the case's detail does not (so the check sees it);
- the JLCM conversion of the same checkpoint, run by the same build, stays close to them."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import llama_cpp_logits, llama_cpp_tokens

pytest.importorskip("llama_cpp")
TEXT = "In the beginning God created the heaven and the earth. 12 + 30 = 42, said the code. The capital of France is"
N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_LAYER = 128, 256, 4, 2, 2
SPM_VOCAB = 2000

# name -> config.json fields beyond the common ones, and what the float forward must honour
CASES = {
    "llama3-rope": dict(architectures=["LlamaForCausalLM"], model_type="llama", rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "llama-biases-linear-rope": dict(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=True,
                                     mlp_bias=True, rope_scaling=dict(rope_type="linear", factor=4.0)),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096),
    # a sentencepiece tokenizer.model and no tokenizer.json, as Llama 2 and Mistral checkpoints may ship
    "llama-sentencepiece": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=SPM_VOCAB,
                                bos_token_id=1, eos_token_id=2),
    "qwen2-yarn": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1e6, rope_scaling=dict(
        type="yarn", factor=4.0, original_max_position_embeddings=32)),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=64, tie_word_embeddings=True),
    # 6 layers: 5 with a 16-token sliding window (shorter than the text and the calibration windows), 1 global
    # with linear RoPE scaling; soft-capped logits
    "gemma3": dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", num_hidden_layers=6, head_dim=64,
                   hidden_activation="gelu_pytorch_tanh", hidden_act=None, sliding_window=16, rope_theta=1e6,
                   rope_local_base_freq=10000.0, rope_scaling=dict(rope_type="linear", factor=8.0),
                   query_pre_attn_scalar=64, final_logit_softcapping=30.0, tie_word_embeddings=True),
}


def without_details(case: str, tensors: dict, hp) -> dict:
    """Forwards that ignore one of the case's details: name -> (tensors, Hparams)."""
    drop = lambda cond: {k: v for k, v in tensors.items() if not cond(k)}  # noqa: E731
    none = dataclasses.replace(hp, rope_scaling="none")
    return {
        "llama3-rope": {"rope_freqs": (drop(lambda k: k == "rope_freqs.weight"), hp)},
        "llama-biases-linear-rope": {"biases": (drop(lambda k: k.endswith(".bias")), hp),
                                     "mlp biases": (drop(lambda k: k.endswith(("ffn_gate.bias", "ffn_up.bias"))), hp),
                                     "linear rope": (tensors, none)},
        "mistral": {},
        "llama-sentencepiece": {},
        "qwen2-yarn": {"yarn": (tensors, none), "yarn as linear": (tensors, dataclasses.replace(hp, rope_scaling="linear"))},
        "qwen3": {"q/k norms": (drop(lambda k: "_q_norm" in k or "_k_norm" in k), hp)},
        "gemma3": {"sliding window": (tensors, dataclasses.replace(hp, swa_window=0)),
                   "post-norms": (drop(lambda k: "post_" in k), hp),
                   "embedding scale": (tensors, dataclasses.replace(hp, embd_scale=1.0)),
                   "soft-capping": (tensors, dataclasses.replace(hp, final_softcap=0.0)),
                   "global layer's linear rope": (tensors, none)},
    }[case]


def make_checkpoint(dst: Path, tokenizer_dir: Path, case: str, seed: int) -> Path:
    """Random weights in Hugging Face naming, shaped by transformers' own model class for the config: per-row
    scales as trained weights have, norms and biases far from 1 and 0 (so dropping one shows), and a head that
    partly reads the input token back (confident predictions: top-1 is a stable check)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    dst.mkdir(parents=True)
    base = json.loads((tokenizer_dir / "config.json").read_text())
    fields = dict(CASES[case])
    config = dict(vocab_size=base["vocab_size"], bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"],
                  hidden_size=N_EMBD, intermediate_size=N_FF, num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD,
                  num_key_value_heads=N_HEAD_KV, max_position_embeddings=256, rms_norm_eps=1e-6,
                  hidden_act="silu", tie_word_embeddings=False, torch_dtype="float32")
    config.update(fields)
    config = {k: v for k, v in config.items() if v is not None and k != "architectures"}
    cfg = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.endswith("norm.weight"):
            w = 0.8 + 0.4 * torch.rand(shape, generator=gen)
        elif name.endswith(".bias"):
            w = torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            w = 4.0 * torch.randn(shape, generator=gen)
        else:
            w = 0.1 * torch.randn(shape, generator=gen) * (0.5 + torch.rand(shape[0], 1, generator=gen))
        weights[name] = w.contiguous()
    if "lm_head.weight" in weights:
        emb = weights["model.embed_tokens.weight"]
        weights["lm_head.weight"] = 0.1 * emb[torch.randperm(emb.shape[0], generator=gen)] + weights["lm_head.weight"]
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg_json = cfg.to_dict()
    cfg_json["architectures"] = fields["architectures"]
    (dst / "config.json").write_text(json.dumps(cfg_json))
    if cfg.vocab_size == SPM_VOCAB:
        sentencepiece_tokenizer(dst)
    else:
        for f in tokenizer_dir.iterdir():
            if f.name.startswith("tokenizer"):
                (dst / f.name).symlink_to(f)
    return dst


def sentencepiece_tokenizer(dst: Path) -> None:
    """A SentencePiece BPE model of SPM_VOCAB pieces (Llama's special ids: unk 0, bos 1, eos 2; byte fallback)
    trained on 2 MB of the calibration text, written as tokenizer.model with a Llama tokenizer_config.json."""
    import sentencepiece as spm

    from jlcm_gguf.calib import resolve_calibration
    text = dst / "train.txt"
    with open(resolve_calibration(None), "rb") as f:
        text.write_bytes(f.read(2_000_000))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(dst / "tokenizer"), vocab_size=SPM_VOCAB,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, num_threads=1, minloglevel=2)
    text.unlink()
    (dst / "tokenizer.vocab").unlink()
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "legacy": False}))


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, smollm2, tmp_path_factory):
    """(case, Hugging Face folder, llama.cpp's F32 conversion of it, the text's tokens, llama.cpp's F32 logits)."""
    from jlcm_gguf.convert import llama_cpp_dir
    case = request.param
    tmp = tmp_path_factory.mktemp(case)
    hf = make_checkpoint(tmp / "hf", smollm2, case, seed=sorted(CASES).index(case))
    f32 = tmp / "f32.gguf"
    res = subprocess.run([sys.executable, str(llama_cpp_dir() / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f32",
                          "--outfile", str(f32)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    tokens = llama_cpp_tokens(f32, TEXT)
    assert len(tokens) >= 24  # past the YaRN and llama3 cases' original context, where their scaling shows
    return case, hf, f32, tokens, llama_cpp_logits(f32, tokens)


def test_float_forward_matches_llama_cpp(checkpoint):
    """model.py's forward on the tensors the converter reads equals llama.cpp's F32 graph (float32 rounding in a
    different order, and ggml's GELU from a float16 table: 2e-3 of the largest logit, as in test_qwen2); without any one
    of the case's details it is over 10 times further off."""
    import gguf
    import torch

    from jlcm_gguf import model as M
    from jlcm_gguf.convert import check_input, float_tensors, hparams_of, import_conversion
    case, hf, _, tokens, ref = checkpoint
    config = check_input(hf)
    conversion = import_conversion()
    cls = conversion.get_model_class(conversion.get_model_architecture(config, conversion.ModelType.TEXT))
    tensors, _ = float_tensors(cls(hf, gguf.LlamaFileType.ALL_F32, Path("/dev/null"), eager=True))
    hp = hparams_of(config)
    with torch.no_grad():
        ours = M.logits(tokens, tensors, hp).double().numpy()
    err = np.abs(ours - ref).max()
    print(f"\n{case}: max |ours - llama.cpp| {err:.2e}, largest logit {np.abs(ref).max():.1f}")
    assert err < 2e-3 * np.abs(ref).max(), (case, err, np.abs(ref).max())
    for detail, (t_off, hp_off) in without_details(case, tensors, hp).items():
        with torch.no_grad():
            off = np.abs(M.logits(tokens, t_off, hp_off).double().numpy() - ref).max()
        print(f"{case} without {detail}: {off:.2e}")
        assert off > 10 * err, (case, detail, off, err)


def test_jlcm_conversion_runs_close_to_f32(checkpoint, tmp_path):
    """A 4-bit JLCM conversion (grouping, folding with biases, layer-wise learning, the embeddings as JLCM) run by
    the same build: its logits follow the F32 file's (correlation > 0.98 and the same top token at 80% of positions,
    the margin 4-bit codebooks leave on this model: the wrong bias order, RoPE or norm gives correlations < 0.9)."""
    from gguf import GGUFReader
    case, hf, f32, tokens, ref = checkpoint
    from jlcm_gguf.cli import main
    out = tmp_path / "jlcm4.gguf"
    assert main([str(hf), "--outfile", str(out), "--outtype", "jlcm4", "--groups", "4", "--nsamples", "4",
                 "--seqlen", "64", "--tune-steps", "0", "--threads", "2"]) == 0
    names = {t.name for t in GGUFReader(str(out)).tensors}
    assert names >= {t.name for t in GGUFReader(str(f32)).tensors}  # nothing dropped (biases, norms, rope_freqs)
    got = llama_cpp_logits(out, tokens)
    corr = np.corrcoef(ref.ravel(), got.ravel())[0, 1]
    top1 = (ref.argmax(1) == got.argmax(1)).mean()
    print(f"\n{case}: JLCM4 vs F32 logits: correlation {corr:.4f}, same top token {top1:.0%}")
    assert corr > 0.98 and top1 >= 0.8, (case, corr, top1)


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["GPT2LMHeadModel"]), "unsupported architecture GPT2LMHeadModel; supported: LlamaForCausalLM, "
                                              "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM"),
    (dict(hidden_act="gelu"), "with hidden_act 'gelu'"),
    (dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)), "RoPE scaling 'dynamic': supported are linear, yarn"),
    (dict(rope_scaling=dict(rope_type="longrope", factor=2.0)), "RoPE scaling 'longrope'"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=2.0)), "without original_max_position_embeddings"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
])
def test_function_details_refused_with_one_message(change, message, smollm2, tmp_path):
    """A config.json detail the converter would compute differently from llama.cpp: one error line, no output."""
    hf = tmp_path / "hf"
    hf.mkdir()
    config = json.loads((smollm2 / "config.json").read_text())
    config.update(change)
    (hf / "config.json").write_text(json.dumps(config))
    for f in smollm2.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".safetensors":
            (hf / f.name).symlink_to(f)
    from jlcm_gguf.cli import main
    with pytest.raises(SystemExit) as e:  # in this process: ConvertError is one "error: ..." line, exit status 1
        main([str(hf), "--outfile", str(tmp_path / "x.gguf")])
    assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code) and message in str(e.value.code)
    assert not list(tmp_path.glob("x.gguf*"))
