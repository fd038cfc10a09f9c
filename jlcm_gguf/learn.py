"""Learn step: joint optimisation of codebooks, block scales and index mappings on a block's
reconstruction loss (docs/ALGORITHM.md).

Each quantized weight keeps a continuous latent position u over its group's sorted codebook. The forward
pass rounds it, i = clamp(round(u), 0, K-1), and builds w = d_block * c_g[i]. Codebook entries c and block
scales d get their exact gradients. The mapping u gets the *proximal* straight-through surrogate

    dL/du = (dL/dw * d) / gap,    gap = distance to the neighbouring codeword in the descent direction,

whose magnitude decreases with the gap (the plain STE, dL/dw * d * gap, grows with it and drives indices
to the extreme codewords), and after every optimiser step u is clipped to within one codeword of where
the step started, so an index moves at most to an adjacent codeword per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .format import QK


class CodebookWeight(torch.autograd.Function):
    """w = d[row, block] * cb[group(row), round(u)] with the proximal (or plain) straight-through u-gradient."""

    @staticmethod
    def forward(ctx, u, cb, d, grp, plain_ste: bool):
        k = cb.shape[1]
        i = u.round().clamp(0, k - 1).long()
        key = grp[:, None] * k + i                                   # flat codebook entry of each weight
        flat = cb.reshape(-1)
        cv = flat[key]
        dx = d.repeat_interleave(QK, dim=1)
        ctx.save_for_backward(key, cb, dx, cv)
        ctx.plain_ste = plain_ste
        return dx * cv

    @staticmethod
    def backward(ctx, g):
        key, cb, dx, cv = ctx.saved_tensors
        rows, cols = g.shape
        gd = g * dx                                                  # dL/d(codeword value)
        grad_cb = torch.zeros(cb.numel(), dtype=gd.dtype).index_add_(0, key.reshape(-1), gd.reshape(-1)).view_as(cb)
        grad_d = (g * cv).view(rows, cols // QK, QK).sum(-1)
        # each codeword's gap to the next one up and down (0 past the ends), looked up per weight
        gaps, zero = cb[:, 1:] - cb[:, :-1], cb.new_zeros(cb.shape[0], 1)
        up, down = torch.cat([gaps, zero], 1).reshape(-1), torch.cat([zero, gaps], 1).reshape(-1)
        gap = torch.where(gd < 0, up[key], down[key])                # descent on u moves the index up where gd < 0
        grad_u = gd * gap if ctx.plain_ste else proximal_surrogate(gd, gap)
        return grad_u, grad_cb.to(cb.dtype), grad_d, None, None


def proximal_surrogate(gd: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    """The documented mapping gradient for a weight with codeword gradient gd and gap to its neighbour."""
    return torch.where(gap > 0, gd / gap.clamp(min=1e-8), torch.zeros_like(gd))


@dataclass
class QuantParam:
    """One quantized matrix under learning (stored row order)."""
    name: str
    u: torch.Tensor          # [rows, cols] latent index positions
    cb: torch.Tensor         # [groups, K] float codebook (int8 units)
    d0: torch.Tensor         # [rows, cols/64] initial block scales (fixed)
    r: torch.Tensor          # [rows, cols/64] learned relative scale, d = d0 * r
    grp: torch.Tensor        # [rows] group of each stored row

    def weight(self, plain_ste: bool = False) -> torch.Tensor:
        return CodebookWeight.apply(self.u, self.cb, self.d0 * self.r, self.grp, plain_ste)

    def indices(self) -> np.ndarray:
        return self.u.detach().round().clamp(0, self.cb.shape[1] - 1).to(torch.uint8).numpy()


def make_param(name: str, idx: np.ndarray, d: np.ndarray, cb: np.ndarray, bounds: np.ndarray) -> QuantParam:
    grp = np.searchsorted(bounds, np.arange(idx.shape[0]), side="right")
    order = np.argsort(cb, axis=1, kind="stable")             # learning works on sorted codebooks
    rank = np.argsort(order, axis=1)
    sidx = rank[grp[:, None], idx]
    return QuantParam(name,
                      torch.tensor(sidx, dtype=torch.float32, requires_grad=True),
                      torch.tensor(np.take_along_axis(cb, order, axis=1), dtype=torch.float32, requires_grad=True),
                      torch.tensor(d.astype(np.float32)),
                      torch.ones(d.shape, dtype=torch.float32, requires_grad=True),
                      torch.tensor(grp, dtype=torch.long))


def finalize(p: QuantParam) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(idx, d float16, int8 codebooks) of a learned parameter; the codebook is re-quantized to int8 and the
    block scales absorb its normalisation."""
    cb = p.cb.detach().numpy().astype(np.float64)
    m = np.abs(cb).max(axis=1, keepdims=True)
    m = np.where(m > 0, m, 1)
    cb8 = np.round(cb / m * 127).clip(-127, 127).astype(np.int8)
    scale = (m[:, 0] / 127)[p.grp.numpy()]                    # per stored row
    d = ((p.d0 * p.r).detach().numpy() * scale[:, None]).astype(np.float16)
    return p.indices(), d, cb8


def clip_moves(params: list[QuantParam], before: list[torch.Tensor]) -> None:
    """After a step: an index moves at most one codeword, and u stays in the codebook's range."""
    with torch.no_grad():
        for p, i0 in zip(params, before):
            k = p.cb.shape[1]
            p.u.copy_(torch.minimum(torch.maximum(p.u, i0 - 1.0), i0 + 1.0).clamp(0, k - 1))
            # keep each codebook sorted: the latent order is the codebook order
            srt, perm = p.cb.sort(dim=1)
            if not torch.equal(perm, torch.arange(k).expand_as(perm)):
                inv = perm.argsort(dim=1)
                p.cb.copy_(srt)
                i = p.u.round().long().clamp(0, k - 1)
                frac = p.u - i
                p.u.copy_(inv[p.grp[:, None], i].float() + frac)


def learn_block(block_fn, params: list[QuantParam], x_in: torch.Tensor, y_target: torch.Tensor, steps: int,
                lr_u: float = 0.02, lr_cb: float = 1e-3, lr_d: float = 1e-3, batch: int = 4, seed: int = 0,
                plain_ste: bool = False, progress=None) -> list[float]:
    """Adam on || block_fn(weights, x) - y ||^2 over samples; returns the loss after each step.

    block_fn(weights: dict[name, Tensor], x: [..., seq, n_embd]) -> [..., seq, n_embd] (x_in: [windows, seq,
    n_embd], windows of equal length)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([
        {"params": [p.u for p in params], "lr": lr_u},
        {"params": [p.cb for p in params], "lr": lr_cb * 127},
        {"params": [p.r for p in params], "lr": lr_d},
    ])
    losses = []
    n = x_in.shape[0]
    norm = y_target.pow(2).mean()
    for step in range(steps):
        pick = torch.randperm(n, generator=gen)[:batch]
        weights = {p.name: p.weight(plain_ste) for p in params}
        loss = (block_fn(weights, x_in[pick]) - y_target[pick]).pow(2).mean() / norm  # the windows as one batch
        opt.zero_grad()
        loss.backward()
        before = [p.u.detach().round() for p in params]
        opt.step()
        clip_moves(params, before)
        losses.append(float(loss.detach()))
        if progress:
            progress(step, float(loss))
    return losses
