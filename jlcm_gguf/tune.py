"""Tune step (after the block-wise pass): every JLCM codebook and block scale, and the float norms and biases,
trained together so that the quantized model's next-token distribution matches the float model's.

Block-wise learning fits each block to the float block's output on the quantized model's inputs; errors that
only show downstream (in later blocks, at the head) are invisible to it. Here the whole quantized model runs,
and the loss is KL(float || quantized) of the next-token distributions over the calibration windows (the float
model's logits are computed on the fly, with no gradient). Each step takes windows no earlier step took (the
calibration draw has enough of them, windows_needed): repeating a few windows overfits.

The indices are updated by one of three rules (`mappings`, `--tune-mappings`; learn.py for the block-wise ones):
- ``off`` (default): indices stay where the block-wise pass put them.
- ``proximal``: moves of one codeword, scored by the second-order change G*delta + C/2 * delta^2 and tested on the
  step's batch, which the proposal has not seen: kept only if its KL falls (the trust region on the fraction of
  each matrix that may move grows after a kept step and halves after a rejected one). G is the mean of the
  weight's KL gradient over the recent batches, shrunk towards zero by `confidence` standard errors; C = T * the
  mean squared gradient of the log-likelihood of tokens drawn from the model itself (T tokens per batch: the
  Fisher information, the KL's Gauss-Newton curvature). A moved weight's gradient averages restart at zero.
  Measured on SmolLM2 at 2 bits (docs/ALGORITHM.md): no move passes, so the default is off.
- ``plain``: the straight-through estimator on a continuous latent (Adam), at most one codeword per step.

A few windows are held out: the tuned parameters are kept only if they lower the held-out KL.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import distributed as D
from . import model as M
from .learn import (MAPPINGS, TrustRegion, clip_moves, finalize, make_param, predicted_change, proximal_moves,
                    try_moves)
from .pack import pack_blocks, unpack_blocks

log = logging.getLogger("jlcm-tune")


def _float_params(tensors: dict) -> dict:
    """The float tensors that stay float and take part: norms and biases."""
    return {n: torch.tensor(np.asarray(v, np.float32), device=D.device(), requires_grad=True) for n, v in tensors.items()
            if n.endswith("norm.weight") or n.endswith(".bias")}


def _fits_on_device(*tensor_dicts) -> bool:
    """Whether float32 copies of these tensors take at most half of the GPU's free memory (never on the CPU, where
    they stay streamed from the checkpoint; nor on MPS, which does not say)."""
    if D.device().type != "cuda":
        return False
    need = 4 * sum(int(np.prod(np.shape(v))) for d in tensor_dicts for v in d.values())
    return need <= torch.cuda.mem_get_info(D.device())[0] // 2


def _save(path: Path, key: str, done: int, state: dict) -> None:
    """Writes the tuning state after `done` steps (to a temporary name, then renamed)."""
    blob = dict(key=key, done=done,
                params={n: (_compact(p.u.detach()), p.cb.detach(), p.r.detach(), _compact(p.start))
                        for n, p in state["params"].items()},
                floats={n: v.detach() for n, v in state["floats"].items()}, opt=state["opt"].state_dict(),
                opt_u=state["opt_u"].state_dict() if state["opt_u"] else None, moments=state["moments"],
                region=dataclasses.asdict(state["region"]), gen=state["gen"].get_state(), losses=state["losses"],
                trials=state["trials"])
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def _compact(positions: torch.Tensor) -> torch.Tensor:
    """Index positions as uint8 when they are whole (all but the plain STE's latent): a quarter of the bytes."""
    return positions.to(torch.uint8) if torch.equal(positions, positions.round()) else positions


def _restore(path: Path, key: str, state: dict) -> int:
    """Loads a state saved by _save under the same key into `state`; returns the steps done (0: none found)."""
    if not path.exists():
        return 0
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if blob["key"] != key:
        log.warning("ignoring %s: saved by a tuning run with other settings", path)
        return 0
    with torch.no_grad():
        for n, p in state["params"].items():
            for dst, src in zip((p.u, p.cb, p.r, p.start), blob["params"][n]):
                dst.copy_(src)
        for n, v in state["floats"].items():
            v.copy_(blob["floats"][n])
        for n, mom in state["moments"].items():
            for dst, src in zip(mom, blob["moments"][n]):
                dst.copy_(src)
    state["opt"].load_state_dict(blob["opt"])
    if state["opt_u"] is not None:
        state["opt_u"].load_state_dict(blob["opt_u"])
    for k, v in blob["region"].items():
        setattr(state["region"], k, v)
    state["gen"].set_state(blob["gen"])
    state["losses"][:] = blob["losses"]
    state["trials"][:] = blob["trials"]
    return int(blob["done"])


def _grads(params: dict, floats: dict, mappings: str) -> list:
    """The gradients a step applies, in the same order in every process (with several processes, zeros where this
    one computed none: all take part in the sum)."""
    if D.size() == 1:
        return []
    tensors = [p.cb for p in params.values()] + [p.r for p in params.values()] + list(floats.values())
    if mappings != "off":
        tensors += [p.u for p in params.values()]
    for t in tensors:
        if t.grad is None:
            t.grad = torch.zeros_like(t)
    return [t.grad for t in tensors]


def shrunk_mean(mean: torch.Tensor, second: torch.Tensor, batches: float, z: float) -> torch.Tensor:
    """The gradient's mean over recent batches shrunk towards zero by z standard errors (from its second moment
    over `batches` batches): the moves ranked best by a noisy mean are mostly noise (the winner's curse)."""
    se = (second - mean.pow(2)).clamp_min(0).div(batches).sqrt()
    return mean.sign() * (mean.abs() - z * se).clamp_min(0)


def sampled_fisher_grads(logits: torch.Tensor, inputs: list[torch.Tensor], gen: torch.Generator) -> tuple:
    """Gradients of the token-mean log-likelihood of next tokens drawn from the model's own distribution. Their
    squares estimate the Fisher information, which for a softmax output equals the Gauss-Newton curvature of the KL
    (the KL's own gradient vanishes as the student nears the teacher: its square would not)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    # drawn on the CPU: the generator is the CPU's (the same draws on every device)
    drawn = torch.multinomial(logp.detach().exp().reshape(-1, logp.shape[-1]).cpu(), 1, generator=gen).to(logp.device)
    nll = -logp.reshape(-1, logp.shape[-1]).gather(1, drawn).mean()
    return torch.autograd.grad(nll, inputs)


def kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student)."""
    s = torch.log_softmax(student_logits.float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - s)).sum(-1).mean()


def forward(tokens: torch.Tensor, t: dict, hp) -> torch.Tensor:
    x = M.embed(tokens, t, hp)
    for bid in range(hp.n_layer):
        x = M.block_forward(x, t, bid, hp)
    return M.head(x, t, hp)


TUNE_BATCH, TUNE_HELD_OUT = 2, 4


def windows_needed(steps: int, batch: int = TUNE_BATCH, held_out: int = TUNE_HELD_OUT) -> int:
    """Calibration windows for `steps` steps that never repeat a window, and the held-out ones (0 without tuning)."""
    return steps * batch + held_out if steps > 0 else 0


def tune_end_to_end(tensors: dict, jlcm: dict, standard: dict, kinds: dict, hp, tokens: np.ndarray, steps: int,
                    batch: int = TUNE_BATCH, held_out: int = TUNE_HELD_OUT, lr_cb: float = 3e-3, lr_d: float = 3e-3,
                    lr_float: float = 3e-4, seed: int = 0, mappings: str = "off", move_frac: float = 1e-4,
                    lr_u: float = 0.02, confidence: float = 2.0, checkpoint: Path | None = None, key: str = "",
                    save_every: float = 120.0) -> dict:
    """Tunes `jlcm` (packed blocks, codebooks and indices) and the norms/biases of `tensors` in place; returns its
    figures (KL on the held-out windows before and after, kept or not, indices changed, steps, seconds).

    With `checkpoint`, the whole state (parameters, optimiser, mapping averages, random generator) is saved there
    every `save_every` seconds, and a state saved under the same `key` is continued from: a resumed run ends
    exactly where an uninterrupted one does."""
    from tqdm import tqdm

    if mappings not in MAPPINGS:
        raise ValueError(f"mappings must be one of {MAPPINGS}, not {mappings!r}")

    t0 = time.time()
    windows = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    held_out = min(held_out, max(1, len(windows) // 4))
    train, test = windows[:-held_out], windows[-held_out:]
    params = {}
    for n, s in jlcm.items():
        cols = tensors[n].shape[1]
        idx, d = unpack_blocks(s["packed"], s["bits"], cols)
        p = make_param(n, idx, d, np.asarray(s["codebooks"]).reshape(-1, 1 << s["bits"]), s["bounds"],
                       device=D.device())
        p.u.requires_grad_(mappings != "off")
        params[n] = p
    inverse = {n: torch.as_tensor(np.argsort(s["perm"])).to(D.device()) for n, s in jlcm.items()
               if s.get("perm") is not None}
    n_indices = sum(p.u.numel() for p in params.values())
    floats = _float_params(tensors)
    fixed = {n: v for n, v in tensors.items() if n not in jlcm and n not in floats}
    if standard:  # layer matrices the plan stores in llama.cpp types: as they will be stored
        from gguf.quants import dequantize as dequantize_standard

        from .plan import ggml_type
        for n, data in standard.items():
            fixed[n] = dequantize_standard(data, ggml_type(kinds[n])).reshape(np.shape(tensors[n]))

    def student(tok):
        t = dict(fixed)
        t.update(floats)
        for n, p in params.items():
            w = p.weight(mappings)
            t[n] = w[inverse[n]] if n in inverse else w
        return forward(tok, t, hp)

    # the float model: block-wise folding left each layer matrix with a stored permutation in stored row order
    # (tensors holds what is quantized); the embeddings were permuted only when quantized
    teacher = dict(tensors)
    for n, inv in inverse.items():
        if n not in ("token_embd.weight", "output.weight"):
            teacher[n] = np.asarray(tensors[n])[inv.cpu().numpy()]
    if _fits_on_device(fixed, teacher):  # uploaded once, not at every forward pass (on the CPU they stay streamed)
        fixed = {n: M.t(v) for n, v in fixed.items()}
        teacher = {n: M.t(v) for n, v in teacher.items()}

    def teacher_logp(tok):
        with torch.no_grad():
            return torch.log_softmax(forward(tok, teacher, hp).float(), dim=-1)

    def held_out_kl() -> float:  # (with several processes, each takes its share of the windows)
        with torch.no_grad():
            total = sum((kl(student(test[i:i + 1]), teacher_logp(test[i:i + 1])) for i in D.share(len(test))),
                        torch.zeros((), device=D.device()))
            D.all_reduce_([total])
            return float(total / len(test))

    before = held_out_kl()
    opt = torch.optim.Adam([{"params": [p.cb for p in params.values()], "lr": lr_cb * 127},
                            {"params": [p.r for p in params.values()], "lr": lr_d},
                            {"params": list(floats.values()), "lr": lr_float}], eps=1e-30)
    opt_u = torch.optim.Adam([p.u for p in params.values()], lr=lr_u, eps=1e-30) if mappings == "plain" else None
    moments = {n: tuple(torch.zeros_like(p.u) for _ in range(3)) for n, p in params.items()} \
        if mappings == "proximal" else {}
    beta1, beta2 = 0.9, 0.99
    region = TrustRegion(move_frac, 1e-6, 1e-2)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=gen)
    losses, trials = [], []
    state = dict(params=params, floats=floats, opt=opt, opt_u=opt_u, moments=moments, region=region, gen=gen,
                 losses=losses, trials=trials)
    first = _restore(checkpoint, key, state) if checkpoint else 0
    if first:
        log.info("end-to-end tuning: resuming after step %d of %d from %s", first, steps, checkpoint)
    saved = time.time()
    bar = tqdm(range(first, steps), desc="end-to-end tuning", unit="step", initial=first, total=steps,
               disable=not D.is_main())
    for step in bar:
        pick = order[(torch.arange(batch) + step * batch) % len(train)]   # each window once before any repeats
        tok = train[pick][D.share(batch)]  # with several processes, this one's windows of the step
        opt.zero_grad()
        for p in params.values():
            p.u.grad = None
        loss = torch.zeros((), device=D.device())
        if len(tok):
            target = teacher_logp(tok)
            logits = student(tok)
            loss = kl(logits, target) * (len(tok) / batch)  # this process's part of the step's mean
            loss.backward(retain_graph=bool(moments))
        D.all_reduce_([loss.detach()] + _grads(params, floats, mappings))
        before_step = [p.u.detach().round() for p in params.values()]
        if moments:
            fisher_grads = sampled_fisher_grads(logits, [p.u for p in params.values()], gen)
            del logits
        if moments and step > 0:                 # propose from the previous steps' averages, test on this batch
            c1, c2 = 1 - beta1 ** step, 1 - beta2 ** step
            curvs = {n: tok.numel() * f / c2 for n, (_, _, f) in moments.items()}
            grads = {n: shrunk_mean(m / c1, v / c2, min(step, 1 / (1 - beta1)), confidence)
                     for n, (m, v, _) in moments.items()}
            moves = [proximal_moves(p, region.frac, grad=grads[n], curv=curvs[n]) for n, p in params.items()]
            predicted = sum(predicted_change(p, pos, mv, grads[n], curvs[n])
                            for (n, p), (pos, mv) in zip(params.items(), moves))
            loss_value = float(loss.detach())
            trial = {}

            def trial_loss():
                trial["loss"] = float(kl(student(tok), target))
                return trial["loss"]
            kept = try_moves(list(params.values()), moves, loss_value, trial_loss)
            region.update(kept)
            if kept is not None:
                trials.append((predicted, trial["loss"] - loss_value, sum(len(pos) for pos, _ in moves)))
                log.debug("step %d: %d moves, predicted %.3g, actual %.3g: %s", step, trials[-1][2], predicted,
                          trials[-1][1], "kept" if kept else "reverted")
            if kept:
                for (m, v, _), (pos, _) in zip(moments.values(), moves):
                    m.view(-1)[pos] = 0          # a moved weight's gradient starts afresh; its curvature stays
                    v.view(-1)[pos] = 0
        if moments:
            with torch.no_grad():
                for (n, p), gs in zip(params.items(), fisher_grads):
                    m, v, f = moments[n]
                    m.mul_(beta1).add_(p.u.grad, alpha=1 - beta1)
                    v.mul_(beta1).addcmul_(p.u.grad, p.u.grad, value=1 - beta1)
                    f.mul_(beta2).addcmul_(gs, gs, value=1 - beta2)
        opt.step()
        if opt_u is not None:
            opt_u.step()
        clip_moves(list(params.values()), before_step)
        losses.append(float(loss.detach()))
        if mappings == "off":
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
        else:
            bar.set_postfix(kl=f"{losses[-1]:.4f}", moved=f"{sum(p.changed() for p in params.values()) / n_indices:.3%}")
        if checkpoint and D.is_main() and step + 1 < steps and time.time() - saved >= save_every:
            _save(checkpoint, key, step + 1, state)
            saved = time.time()
    after = held_out_kl()
    kept = after < before
    changed = sum(p.changed() for p in params.values())
    if kept:
        for n, p in params.items():
            idx, d, cb8 = finalize(p)
            jlcm[n]["packed"] = pack_blocks(idx, d, jlcm[n]["bits"])
            jlcm[n]["codebooks"] = cb8
        for n, v in floats.items():
            tensors[n] = v.detach().cpu().numpy().astype(np.float32)
    log.info("end-to-end tuning: held-out KL %.4f -> %.4f (%s), %d steps, indices changed %d of %d (%.3f%%, "
             "mappings %s), %.0f s", before, after, "kept" if kept else "not kept", steps, changed, n_indices,
             100 * changed / max(1, n_indices), mappings, time.time() - t0)
    return dict(steps=steps, kl_before=before, kl_after=after, kept=bool(kept), train_kl_first=losses[:1],
                train_kl_last=losses[-1:], mappings=mappings, indices=n_indices,
                indices_changed=changed if kept else 0, indices_changed_frac=(changed if kept else 0) / max(1, n_indices),
                mapping_steps_accepted=region.accepted, mapping_steps_rejected=region.rejected,
                mapping_trials=[dict(moves=n, predicted=pr, actual=ac) for pr, ac, n in trials],
                seconds=time.time() - t0)
