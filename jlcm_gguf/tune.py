"""Tune step (after the block-wise pass): every JLCM codebook and block scale, and the float norms and biases,
trained together so that the quantized model's next-token distribution matches the float model's.

Block-wise learning fits each block to the float block's output on the quantized model's inputs; errors that
only show downstream (in later blocks, at the head) are invisible to it. Here the whole quantized model runs,
and the loss is KL(float || quantized) of the next-token distributions over the calibration windows (the float
model's logits are computed on the fly, with no gradient). Indices stay where the block-wise pass put them.

A few windows are held out: the tuned parameters are kept only if they lower the held-out KL.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from . import model as M
from .learn import finalize, keep_sorted, make_param
from .pack import pack_blocks, unpack_blocks

log = logging.getLogger("jlcm-tune")


def _float_params(tensors: dict) -> dict:
    """The float tensors that stay float and take part: norms and biases."""
    return {n: torch.tensor(np.asarray(v, np.float32), requires_grad=True) for n, v in tensors.items()
            if n.endswith("norm.weight") or n.endswith(".bias")}


def kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student)."""
    s = torch.log_softmax(student_logits.float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - s)).sum(-1).mean()


def forward(tokens: torch.Tensor, t: dict, hp) -> torch.Tensor:
    x = M.embed(tokens, t)
    for bid in range(hp.n_layer):
        x = M.block_forward(x, t, bid, hp)
    return M.head(x, t, hp)


def tune_end_to_end(tensors: dict, jlcm: dict, standard: dict, widths: dict, hp, tokens: np.ndarray, steps: int,
                    batch: int = 2, held_out: int = 4, lr_cb: float = 3e-3, lr_d: float = 3e-3,
                    lr_float: float = 3e-4, seed: int = 0) -> dict:
    """Tunes `jlcm` (packed blocks and codebooks) and the norms/biases of `tensors` in place; returns its figures
    (KL on the held-out windows before and after, kept or not, steps, seconds)."""
    from tqdm import tqdm

    t0 = time.time()
    windows = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    held_out = min(held_out, max(1, len(windows) // 4))
    train, test = windows[:-held_out], windows[-held_out:]
    params = {}
    for n, s in jlcm.items():
        cols = tensors[n].shape[1]
        idx, d = unpack_blocks(s["packed"], s["bits"], cols)
        p = make_param(n, idx, d, np.asarray(s["codebooks"]).reshape(-1, 1 << s["bits"]), s["bounds"])
        p.u.requires_grad_(False)
        params[n] = p
    inverse = {n: torch.as_tensor(np.argsort(s["perm"])) for n, s in jlcm.items() if s.get("perm") is not None}
    floats = _float_params(tensors)
    fixed = {n: v for n, v in tensors.items() if n not in jlcm and n not in floats}
    if standard:  # layer matrices the plan stores in llama.cpp types: as they will be stored
        from gguf.quants import dequantize as dequantize_standard

        from .plan import ggml_type
        for n, data in standard.items():
            fixed[n] = dequantize_standard(data, ggml_type(widths[n])).reshape(np.shape(tensors[n]))

    def student(tok):
        t = dict(fixed)
        t.update(floats)
        for n, p in params.items():
            w = p.weight("off")
            t[n] = w[inverse[n]] if n in inverse else w
        return forward(tok, t, hp)

    # the float model: block-wise folding left each layer matrix with a stored permutation in stored row order
    # (tensors holds what is quantized); the embeddings were permuted only when quantized
    teacher = dict(tensors)
    for n, inv in inverse.items():
        if n not in ("token_embd.weight", "output.weight"):
            teacher[n] = np.asarray(tensors[n])[inv.numpy()]

    def teacher_logp(tok):
        with torch.no_grad():
            return torch.log_softmax(forward(tok, teacher, hp).float(), dim=-1)

    def held_out_kl() -> float:
        with torch.no_grad():
            return float(sum(kl(student(test[i:i + 1]), teacher_logp(test[i:i + 1])) for i in range(len(test))) / len(test))

    before = held_out_kl()
    opt = torch.optim.Adam([{"params": [p.cb for p in params.values()], "lr": lr_cb * 127},
                            {"params": [p.r for p in params.values()], "lr": lr_d},
                            {"params": list(floats.values()), "lr": lr_float}], eps=1e-30)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc="end-to-end tuning", unit="step")
    for _ in bar:
        pick = torch.randperm(len(train), generator=gen)[:batch]
        tok = train[pick]
        loss = kl(student(tok), teacher_logp(tok))
        opt.zero_grad()
        loss.backward()
        opt.step()
        for p in params.values():
            keep_sorted(p)
        losses.append(float(loss.detach()))
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
    after = held_out_kl()
    kept = after < before
    if kept:
        for n, p in params.items():
            idx, d, cb8 = finalize(p)
            jlcm[n]["packed"] = pack_blocks(idx, d, jlcm[n]["bits"])
            jlcm[n]["codebooks"] = cb8
        for n, v in floats.items():
            tensors[n] = v.detach().numpy().astype(np.float32)
    log.info("end-to-end tuning: held-out KL %.4f -> %.4f (%s), %d steps, %.0f s", before, after,
             "kept" if kept else "not kept", steps, time.time() - t0)
    return dict(steps=steps, kl_before=before, kl_after=after, kept=bool(kept), train_kl_first=losses[:1],
                train_kl_last=losses[-1:], seconds=time.time() - t0)
