"""A float forward pass of llama-family blocks on GGUF-named tensors, mirroring llama.cpp's graph.

It is what calibration runs (input second moments for the Hessian diagonal, block inputs and outputs
for learning) and what checks that folding row permutations leaves the network's function unchanged.
Tensors are numpy or torch arrays in GGUF naming and layout (q/k rows as the vendored converter writes
them: interleaved RoPE pairs for `llama`, rotate-half for `qwen2`/`qwen3`). What differs between the supported
architectures is data here: biases (`*.bias`), per-head q/k norms (`attn_q_norm`, `attn_k_norm`: qwen3), RoPE
frequency factors (`rope_freqs`: Llama 3's rope scaling) are used where the tensors exist; RoPE's layout, head
size and scaling (linear, YaRN) are in Hparams."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import distributed as D

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass
class Hparams:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    rms_eps: float
    rope_base: float
    rope_neox: bool = False  # qwen2/qwen3 rotate halves, llama interleaved pairs
    head_dim: int = 0        # 0: n_embd // n_head (config.json's head_dim where it differs: qwen3)
    rope_scaling: str = "none"   # "linear" or "yarn" as llama.cpp applies them (llama3's factors are rope_freqs)
    rope_factor: float = 1.0     # the scaling's factor (positions are divided by it)
    rope_ctx_orig: int = 0       # yarn: the original context length
    ffn_act: str = "silu"        # the gate's activation: "silu", or "gelu" (tanh approximation: gemma3)
    embd_scale: float = 1.0      # the embeddings are multiplied by this (gemma3: sqrt(n_embd))
    attn_scale: float = 0.0      # 0: 1 / sqrt(head_dim)
    swa_window: int = 0          # gemma3: a sliding window of this many tokens in layers where is_swa
    swa_pattern: int = 0         # ... every swa_pattern-th layer attends globally (llama.cpp's set_swa_pattern)
    rope_base_swa: float = 10000.0  # ... with their own RoPE base and no scaling
    final_softcap: float = 0.0   # logits -> c tanh(logits / c)

    def __post_init__(self):
        self.head_dim = self.head_dim or self.n_embd // self.n_head

    def is_swa(self, bid: int) -> bool:
        return bool(self.swa_window and self.swa_pattern) and bid % self.swa_pattern < self.swa_pattern - 1


def t(x) -> torch.Tensor:
    """A weight as a torch tensor on the compute device (--device: distributed.select_device)."""
    return D.to_device(x)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_angles(seq: int, hp: Hparams, freq_factors=None, swa: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq, head_dim / 2] as ggml's rope computes them (ggml_rope_cache_init, rope_yarn) with the
    parameters llama.cpp gives it: freq_scale = 1 / factor for linear and YaRN scaling; YaRN's ramp between
    interpolated and extrapolated angles (ext_factor 1, beta_fast 32, beta_slow 1: llama.cpp's defaults, the
    converter's values are not read) and its magnitude 1 + 0.1 ln(factor); frequency factors divide the angle.
    Sliding-window layers (swa) use their own base and no scaling."""
    hd = hp.head_dim
    i = torch.arange(0, hd // 2, dtype=torch.float64)
    theta = (hp.rope_base_swa if swa else hp.rope_base) ** (-2 * i / hd)
    if freq_factors is not None:
        theta = theta / (freq_factors.cpu() if isinstance(freq_factors, torch.Tensor)
                         else torch.from_numpy(np.asarray(freq_factors, dtype=np.float64))).double()
    extrap = torch.arange(seq, dtype=torch.float64)[:, None] * theta[None, :]
    angle, mscale = extrap, 1.0
    if swa:
        return angle.cos(), angle.sin()
    if hp.rope_scaling in ("linear", "yarn"):
        angle = extrap / hp.rope_factor
    if hp.rope_scaling == "yarn":
        def corr_dim(n_rot):
            return hd * np.log(hp.rope_ctx_orig / (n_rot * 2 * np.pi)) / (2 * np.log(hp.rope_base))
        low, high = max(0.0, np.floor(corr_dim(32.0))), min(hd - 1.0, np.ceil(corr_dim(1.0)))
        ramp = 1 - ((i - low) / max(0.001, high - low)).clamp(0, 1)
        angle = angle * (1 - ramp) + extrap * ramp
        mscale = 1.0 + 0.1 * np.log(hp.rope_factor) if hp.rope_factor > 1 else 1.0
    return angle.cos() * mscale, angle.sin() * mscale


def rope(x: torch.Tensor, hp: Hparams, freq_factors=None, swa: bool = False) -> torch.Tensor:
    """x: [..., seq, heads, head_dim]."""
    seq, hd = x.shape[-3], x.shape[-1]
    cos, sin = rope_angles(seq, hp, freq_factors, swa)
    cos, sin = cos.to(x)[:, None, :], sin.to(x)[:, None, :]  # (computed in float64 on the CPU)
    if hp.rope_neox:
        x0, x1 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def linear(x: torch.Tensor, tensors: dict, name: str) -> torch.Tensor:
    y = x @ t(tensors[name + ".weight"]).T
    bias = tensors.get(name + ".bias")
    return y if bias is None else y + t(bias)


class InputMoments:
    """block_forward's `observe` hook that sums each linear's squared inputs (float64); their means are the
    diagonal of that layer's input Hessian, the h that weights quantization errors."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        s = x.to(D.float64_device()).double().pow(2).reshape(-1, x.shape[-1]).sum(0)
        self.sums[name] = self.sums[name] + s if name in self.sums else s

    def means(self, count: int) -> dict[str, np.ndarray]:
        return {k: (v / count).cpu().numpy() for k, v in self.sums.items()}


class InputHessians(InputMoments):
    """InputMoments that also sums each linear's full input second-moment matrix x xᵀ (float64) for
    GPTQ rounding; linears reading the same input (q/k/v, gate/up) share one matrix."""

    def __init__(self):
        super().__init__()
        self.full: dict[str, torch.Tensor] = {}
        self._last: tuple = (None, None)

    def __call__(self, name: str, x: torch.Tensor) -> None:
        super().__call__(name, x)
        if self._last[0] is x:
            self.full[name] = self.full[self._last[1]]
            return
        x2 = x.reshape(-1, x.shape[-1]).float()
        s = (x2.T @ x2).to(D.float64_device())  # float32 products of one batch, summed over batches in float64
        if name not in self.full:
            self.full[name] = s.double()
        else:  # in place, a slice at a time (casting the whole product would take 1 GB more for a 7B's ffn_down)
            acc = self.full[name]
            for r in range(0, len(s), 1024):
                acc[r:r + 1024].add_(s[r:r + 1024])
        self._last = (x, name)

    def matrices(self, count: int) -> dict[str, np.ndarray]:
        """The mean matrices, divided in place (no second copy of a 7B's 1 GB ffn_down matrix): call once."""
        done: dict[int, np.ndarray] = {}
        with torch.inference_mode():  # (the sums are inference tensors)
            for v in self.full.values():
                if id(v) not in done:
                    done[id(v)] = v.div_(count).cpu().numpy()
        return {k: done[id(v)] for k, v in self.full.items()}


SHARED = ("rope_freqs.weight",)  # tensors outside blk.N that every block reads


def block_tensors(tensors: dict, bid: int) -> dict:
    """The tensors block_forward reads for block bid: its own and the shared ones."""
    return {k: v for k, v in tensors.items() if k.startswith(f"blk.{bid}.") or k in SHARED}


def block_forward(x: torch.Tensor, tensors: dict, bid: int, hp: Hparams, observe=None) -> torch.Tensor:
    """One transformer block on x [..., seq, n_embd] (leading dimensions: independent windows).
    observe(name, input) sees each linear's input."""
    p = f"blk.{bid}."
    obs = observe or (lambda name, inp: None)
    h = rms_norm(x, t(tensors[p + "attn_norm.weight"]), hp.rms_eps)
    for n in ("attn_q", "attn_k", "attn_v"):
        obs(p + n, h)
    lead, hd = x.shape[:-1], hp.head_dim
    q = linear(h, tensors, p + "attn_q").view(*lead, hp.n_head, hd)
    k = linear(h, tensors, p + "attn_k").view(*lead, hp.n_head_kv, hd)
    if p + "attn_q_norm.weight" in tensors:  # qwen3: RMSNorm of each head before RoPE
        q = rms_norm(q, t(tensors[p + "attn_q_norm.weight"]), hp.rms_eps)
        k = rms_norm(k, t(tensors[p + "attn_k_norm.weight"]), hp.rms_eps)
    freqs, swa = tensors.get(SHARED[0]), hp.is_swa(bid)
    q, k = rope(q, hp, freqs, swa), rope(k, hp, freqs, swa)
    v = linear(h, tensors, p + "attn_v").view(*lead, hp.n_head_kv, hd)
    rep = hp.n_head // hp.n_head_kv
    k, v = k.repeat_interleave(rep, dim=-2), v.repeat_interleave(rep, dim=-2)
    seq = x.shape[-2]
    mask = None
    if swa:  # causal, and a key at most swa_window - 1 positions back (llama.cpp's LLAMA_SWA_TYPE_STANDARD)
        pos = torch.arange(seq, device=x.device)
        back = pos[:, None] - pos[None, :]
        mask = (back >= 0) & (back < hp.swa_window)
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2),
                                                         attn_mask=mask, is_causal=mask is None,
                                                         scale=hp.attn_scale or None)
    o = o.transpose(-3, -2).reshape(*lead, hp.n_head * hd)
    obs(p + "attn_output", o)
    y = linear(o, tensors, p + "attn_output")
    if p + "post_attention_norm.weight" in tensors:  # gemma3: the block's outputs are normalised
        y = rms_norm(y, t(tensors[p + "post_attention_norm.weight"]), hp.rms_eps)
    x = x + y
    h = rms_norm(x, t(tensors[p + "ffn_norm.weight"]), hp.rms_eps)
    obs(p + "ffn_gate", h)
    obs(p + "ffn_up", h)
    gate = linear(h, tensors, p + "ffn_gate")
    gate = torch.nn.functional.silu(gate) if hp.ffn_act == "silu" else \
        torch.nn.functional.gelu(gate, approximate="tanh")
    a = gate * linear(h, tensors, p + "ffn_up")
    obs(p + "ffn_down", a)
    y = linear(a, tensors, p + "ffn_down")
    if p + "post_ffw_norm.weight" in tensors:
        y = rms_norm(y, t(tensors[p + "post_ffw_norm.weight"]), hp.rms_eps)
    return x + y


def blocks_forward(xs: list, tensors: dict, bid: int, hp: Hparams, observe=None, batch: int = 8) -> list:
    """block_forward over a list of windows of equal length (the calibration windows), `batch` in one call."""
    out = []
    for i in range(0, len(xs), batch):
        out += list(block_forward(torch.stack(xs[i:i + batch]), tensors, bid, hp, observe).unbind(0))
    return out


def embed(tokens, tensors: dict, hp: Hparams) -> torch.Tensor:
    w = t(tensors["token_embd.weight"])
    x = w[torch.as_tensor(tokens, dtype=torch.long).to(w.device)]
    return x if hp.embd_scale == 1.0 else x * hp.embd_scale


def head(x: torch.Tensor, tensors: dict, hp: Hparams) -> torch.Tensor:
    out = tensors.get("output.weight", tensors["token_embd.weight"])
    y = rms_norm(x, t(tensors["output_norm.weight"]), hp.rms_eps) @ t(out).T
    return y if not hp.final_softcap else hp.final_softcap * torch.tanh(y / hp.final_softcap)


@torch.inference_mode()
def logits(tokens, tensors: dict, hp: Hparams) -> torch.Tensor:
    x = embed(tokens, tensors, hp)
    for bid in range(hp.n_layer):
        x = block_forward(x, tensors, bid, hp)
    return head(x, tensors, hp)
