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
    """x: [..., seq, heads, head_dim]."""
    seq, hd = x.shape[-3], x.shape[-1]
    inv = hp.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype)[:, None, :], ang.sin().to(x.dtype)[:, None, :]
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
        s = x.double().pow(2).reshape(-1, x.shape[-1]).sum(0)
        self.sums[name] = self.sums[name] + s if name in self.sums else s

    def means(self, count: int) -> dict[str, np.ndarray]:
        return {k: (v / count).numpy() for k, v in self.sums.items()}


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
        s = (x2.T @ x2).double()  # float32 products of one batch, summed over batches in float64
        self.full[name] = self.full[name] + s if name in self.full else s
        self._last = (x, name)

    def matrices(self, count: int) -> dict[str, np.ndarray]:
        done: dict[int, np.ndarray] = {}
        for v in self.full.values():
            if id(v) not in done:
                done[id(v)] = (v / count).numpy()
        return {k: done[id(v)] for k, v in self.full.items()}


def block_forward(x: torch.Tensor, tensors: dict, bid: int, hp: Hparams, observe=None) -> torch.Tensor:
    """One transformer block on x [..., seq, n_embd] (leading dimensions: independent windows).
    observe(name, input) sees each linear's input."""
    p = f"blk.{bid}."
    obs = observe or (lambda name, inp: None)
    h = rms_norm(x, t(tensors[p + "attn_norm.weight"]), hp.rms_eps)
    for n in ("attn_q", "attn_k", "attn_v"):
        obs(p + n, h)
    lead, hd = x.shape[:-1], hp.head_dim
    q = rope(linear(h, tensors, p + "attn_q").view(*lead, hp.n_head, hd), hp)
    k = rope(linear(h, tensors, p + "attn_k").view(*lead, hp.n_head_kv, hd), hp)
    v = linear(h, tensors, p + "attn_v").view(*lead, hp.n_head_kv, hd)
    rep = hp.n_head // hp.n_head_kv
    k, v = k.repeat_interleave(rep, dim=-2), v.repeat_interleave(rep, dim=-2)
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2),
                                                         is_causal=True)
    o = o.transpose(-3, -2).reshape(*lead, hp.n_head * hd)
    obs(p + "attn_output", o)
    x = x + linear(o, tensors, p + "attn_output")
    h = rms_norm(x, t(tensors[p + "ffn_norm.weight"]), hp.rms_eps)
    obs(p + "ffn_gate", h)
    obs(p + "ffn_up", h)
    a = torch.nn.functional.silu(linear(h, tensors, p + "ffn_gate")) * linear(h, tensors, p + "ffn_up")
    obs(p + "ffn_down", a)
    return x + linear(a, tensors, p + "ffn_down")


def blocks_forward(xs: list, tensors: dict, bid: int, hp: Hparams, observe=None, batch: int = 8) -> list:
    """block_forward over a list of windows of equal length (the calibration windows), `batch` in one call."""
    out = []
    for i in range(0, len(xs), batch):
        out += list(block_forward(torch.stack(xs[i:i + batch]), tensors, bid, hp, observe).unbind(0))
    return out


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
