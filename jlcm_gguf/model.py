"""A float forward pass of llama-family blocks on GGUF-named tensors, mirroring llama.cpp's graph.

It is what calibration runs (input second moments for the Hessian diagonal, block inputs and outputs
for learning) and what checks that folding row permutations leaves the network's function unchanged.
Tensors are numpy or torch arrays in GGUF naming and layout (q/k rows as the vendored converter writes
them: interleaved RoPE pairs for `llama`, rotate-half for `qwen2`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

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
    rope_neox: bool = False  # qwen2 rotates halves, llama interleaved pairs

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def t(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64 if x.dtype == np.float64 else np.float32))


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, hp: Hparams) -> torch.Tensor:
    """x: [seq, heads, head_dim]."""
    seq, _, hd = x.shape
    inv = hp.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype)[:, None, :], ang.sin().to(x.dtype)[:, None, :]
    if hp.rope_neox:
        x0, x1 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


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
        s = x.double().pow(2).sum(0)
        self.sums[name] = self.sums[name] + s if name in self.sums else s

    def means(self, count: int) -> dict[str, np.ndarray]:
        return {k: (v / count).numpy() for k, v in self.sums.items()}


def block_forward(x: torch.Tensor, tensors: dict, bid: int, hp: Hparams, observe=None) -> torch.Tensor:
    """One transformer block on x [seq, n_embd]. observe(name, input) sees each linear's input."""
    p = f"blk.{bid}."
    obs = observe or (lambda name, inp: None)
    h = rms_norm(x, t(tensors[p + "attn_norm.weight"]), hp.rms_eps)
    for n in ("attn_q", "attn_k", "attn_v"):
        obs(p + n, h)
    seq, hd = x.shape[0], hp.head_dim
    q = rope(linear(h, tensors, p + "attn_q").view(seq, hp.n_head, hd), hp)
    k = rope(linear(h, tensors, p + "attn_k").view(seq, hp.n_head_kv, hd), hp)
    v = linear(h, tensors, p + "attn_v").view(seq, hp.n_head_kv, hd)
    rep = hp.n_head // hp.n_head_kv
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    att = torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5
    att = att.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    o = torch.einsum("hqk,khd->qhd", att, v).reshape(seq, hp.n_head * hd)
    obs(p + "attn_output", o)
    x = x + linear(o, tensors, p + "attn_output")
    h = rms_norm(x, t(tensors[p + "ffn_norm.weight"]), hp.rms_eps)
    obs(p + "ffn_gate", h)
    obs(p + "ffn_up", h)
    a = torch.nn.functional.silu(linear(h, tensors, p + "ffn_gate")) * linear(h, tensors, p + "ffn_up")
    obs(p + "ffn_down", a)
    return x + linear(a, tensors, p + "ffn_down")


def embed(tokens, tensors: dict) -> torch.Tensor:
    return t(tensors["token_embd.weight"])[torch.as_tensor(tokens, dtype=torch.long)]


def head(x: torch.Tensor, tensors: dict, hp: Hparams) -> torch.Tensor:
    out = tensors.get("output.weight", tensors["token_embd.weight"])
    return rms_norm(x, t(tensors["output_norm.weight"]), hp.rms_eps) @ t(out).T


@torch.inference_mode()
def logits(tokens, tensors: dict, hp: Hparams) -> torch.Tensor:
    x = embed(tokens, tensors)
    for bid in range(hp.n_layer):
        x = block_forward(x, tensors, bid, hp)
    return head(x, tensors, hp)
