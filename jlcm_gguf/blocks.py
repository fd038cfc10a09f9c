"""The converter's block-by-block pass over the transformer (convert.convert calls quantize_blocks).

For each block, in order:
1. statistics: the block runs on the *quantized* model's activations (earlier blocks' errors included) and records
   each linear's input second moments h (and, for GPTQ rounding, the full input Hessian H); --imatrix replaces h;
2. group and fold (fold.py): rows grouped by their weights' distribution, orders folded into neighbours;
3. init and round: k-means codebooks (init.py), then each weight to a codeword, by GPTQ (gptq.py) or nearest
   (pack.assign), optionally refined by layer-wise learning (learn.learn_layer);
4. learn (optional, --learn-steps): codebooks, scales and indices against the float block's output (learn.py);
5. pack: the packed JLCM rows; matrices the plan stores in llama.cpp types are quantized here too, so that the
   next block sees every error.
A checkpoint saves each finished block (checkpoint.py). Then the embeddings and the head (quantize_embeddings).
"""
from __future__ import annotations

import logging

import numpy as np

from . import distributed as D
from .model import Hparams

log = logging.getLogger("jlcm-convert")


def gptq_rounding(opt, name: str) -> bool:
    """Whether a layer matrix or the head planned as JLCM takes GPTQ rounding. "auto" leaves 4-bit matrices to nearest
    rounding: with the default 32 calibration windows GPTQ made SmolLM2's 4-bit file worse (its Hessian
    estimate is too noisy for errors that small) and the 2- and 3-bit files better."""
    return opt.rounding == "gptq" or opt.rounding == "auto" and int(opt.kinds[name][4:]) <= 3


def plan_gptq_kinds(opt) -> frozenset[str]:
    """The JLCM kinds the plan scores with GPTQ rounding, as gptq_rounding will round them."""
    from .plan import JLCM_BITS
    if opt.plan_error == "nearest":
        return frozenset()
    return frozenset(f"jlcm{b}" for b in JLCM_BITS if opt.rounding == "gptq" or opt.rounding == "auto" and b <= 3)


def fast_init(opt) -> dict:
    """--fast: one k-means pass on fewer samples (the refits against the packed scales are skipped)."""
    return dict(rounds=0, max_samples=1 << 14) if opt.fast else {}


def learn_loss_norm(opt, tensors: dict, bid: int, hp: Hparams):
    """What learning compares of a block's output: itself (residual), or the next block's attention RMSNorm of it
    (the head's norm after the last block) for --learn-loss normed."""
    if opt.learn_loss == "residual":
        return lambda y: y
    from . import model as M
    g = M.t(tensors[f"blk.{bid + 1}.attn_norm.weight" if bid + 1 < hp.n_layer else "output_norm.weight"]).float()
    return lambda y: M.rms_norm(y, g, hp.rms_eps)


def moved_fraction(blocks: list) -> float:
    """Fraction of the indices that layer-wise and block-wise learning changed so far (the progress bar's figure)."""
    changed = sum(b.get("layer_indices_changed", 0) + b.get("indices_changed", 0) for b in blocks)
    n = sum(b.get("layer_indices", b.get("indices", 0)) for b in blocks)
    return changed / max(1, n)


def block_statistics(x_q: list, x_f: list, tensors: dict, bid: int, hp: Hparams, gptq: bool, learn: bool,
                     imatrix: dict | None) -> tuple[dict, dict, list | None]:
    """Step 1: (h of each linear's input, with --imatrix's entries in place of the measured ones; the full input
    Hessians if gptq, their diagonals rescaled to the imatrix's; the float block's output on the float inputs
    if learn, else None)."""
    import torch

    from . import model as M
    from .imatrix import apply_imatrix, rescale_hessian
    moments = M.InputHessians() if gptq else M.InputMoments()
    with torch.inference_mode():
        D.blocks_forward(x_q, tensors, bid, hp, moments)
        y_f = D.blocks_forward(x_f, tensors, bid, hp) if learn else None
        D.reduce_moments(moments)
    count = sum(len(x) for x in x_q)
    measured = moments.means(count)
    full = moments.matrices(count) if gptq else {}  # this block's only: one block's memory
    if imatrix:  # GPTQ's Hessian takes the --imatrix diagonal, keeping the windows' correlations
        full = {k: rescale_hessian(H, measured[k], imatrix[k]) if k in imatrix else H for k, H in full.items()}
    return apply_imatrix(measured, imatrix), full, y_f


def round_matrices(orders: dict, columns: dict, tensors: dict, hessians: dict, full: dict, opt) -> tuple[dict, dict]:
    """Step 3 for each matrix the fold grouped: codebooks, then indices and block scales (GPTQ under the full
    input Hessian, in the fold's column order, or nearest), then layer-wise learning if --layer-rounds.
    Returns the specs {name: idx, d, cb, ro} and layer-wise learning's figures per matrix. With several processes
    (distributed.py) each matrix is rounded by one and sent to the others."""
    from .gptq import assign_gptq
    from .init import init_codebooks
    from .learn import learn_layer
    from .pack import assign
    owner = D.owners({n: tensors[n].size for n in orders})
    specs, layer_learned = {}, {}
    for name, ro in orders.items():
        # each matrix takes its Hessian out of `full`: one that q/k/v or gate/up share is freed after the last
        H = full.pop(name.removesuffix(".weight"), None)
        if owner[name] != D.rank():
            continue
        h = hessians.get(name.removesuffix(".weight"))
        w = tensors[name]
        bits = int(opt.kinds[name][4:])
        cb = init_codebooks(w, h, ro.bounds, bits, opt.variant, opt.seed, **fast_init(opt))
        if H is None or not gptq_rounding(opt, name):
            idx, d = assign(w, bits, cb, ro.bounds, h)
        else:
            col = columns.get(name)  # the fold's column order, which h already follows
            Hc = H if col is None else H[np.ix_(col, col)]
            del H
            idx, d = assign_gptq(w, bits, cb, ro.bounds, Hc)
            if opt.layer_rounds:
                Hc = Hc.astype(np.float32)  # what learn_layer computes in (a 7B's ffn_down: 0.5 GB, not 1)
                idx, d, cb, ls = learn_layer(w, idx, d, cb, ro.bounds, Hc, opt.layer_rounds, opt.learn_mappings)
                layer_learned[name] = dict(loss_before=ls.loss_before, loss_after=ls.loss_after,
                                           indices=ls.weights, indices_changed=ls.changed)
        specs[name] = dict(idx=idx, d=d, cb=cb, ro=ro)
    shared = D.share_results({n: (specs[n], layer_learned.get(n)) for n in specs}, owner)
    return ({n: spec for n, (spec, _) in shared.items()},
            {n: learned for n, (_, learned) in shared.items() if learned is not None})


def learn_matrices(specs: dict, tensors: dict, hessians: dict, x_q: list, y_f: list, bid: int, hp: Hparams,
                   opt) -> dict:
    """Step 4: block-wise learning of the block's JLCM matrices against the float block's output y_f, kept only if it
    lowered the loss on all calibration windows (specs are updated then). Returns the block's figures."""
    import torch

    from . import model as M
    from .learn import finalize, learn_block, make_param
    params = {n: make_param(n, s["idx"], s["d"], s["cb"], s["ro"].bounds,
                            hessians.get(n.removesuffix(".weight")), D.device()) for n, s in specs.items()}
    inverse = {n: torch.as_tensor(np.argsort(s["ro"].order)).to(D.device()) for n, s in specs.items() if s["ro"].stored}
    base = M.block_tensors(tensors, bid)

    # "normed" (ablation): the error after the next attention RMSNorm, where a few very large residual
    # channels weigh less; worse on SmolLM2 (docs/ALGORITHM.md)
    after_norm = learn_loss_norm(opt, tensors, bid, hp)

    def block_fn(weights, x):
        t = dict(base)
        for n, w in weights.items():
            t[n] = w[inverse[n]] if n in inverse else w  # stored rows back to the logical order
        return after_norm(M.block_forward(x, t, bid, hp))

    x_in = torch.stack(x_q)
    y_t = after_norm(torch.stack(y_f))
    norm = y_t.pow(2).mean()

    def block_loss(batch: int = 8) -> float:
        with torch.no_grad():
            ws = {n: p.weight() for n, p in params.items()}
            return float(sum((block_fn(ws, x_in[i:i + batch]) - y_t[i:i + batch]).pow(2).sum()
                             for i in range(0, len(x_in), batch)) / y_t.numel() / norm)

    before = block_loss()
    stats = learn_block(block_fn, list(params.values()), x_in, y_t, opt.learn_steps, seed=opt.seed + bid,
                        mappings=opt.learn_mappings)
    after = block_loss()
    kept = after < before
    if kept:
        for n, p in params.items():
            specs[n]["idx"], specs[n]["d"], specs[n]["cb"] = finalize(p)
    return dict(block=bid, loss_before=before, loss_after=after, kept=bool(kept), indices=stats.weights,
                indices_changed=stats.changed if kept else 0, steps=opt.learn_steps,
                mapping_steps_kept=stats.accepted, mapping_steps_rejected=stats.rejected)


def pack_matrices(specs: dict, tensors: dict, hessians: dict, bid: int, opt) -> tuple[dict, dict, dict]:
    """Step 5: (the packed JLCM matrices, the raw bytes of the block's matrices the plan stores in llama.cpp types,
    every quantized matrix of the block as the runtime will compute it, in logical row order)."""
    from .pack import dequantize, pack_blocks
    jlcm, standard, logical = {}, {}, {}
    for name, s in specs.items():
        ro = s["ro"]
        bits = int(opt.kinds[name][4:])
        packed = pack_blocks(s["idx"], s["d"], bits)
        jlcm[name] = dict(packed=packed, bits=bits, codebooks=s["cb"], bounds=ro.bounds,
                          perm=ro.order if ro.stored else None)
        wq = dequantize(packed, bits, tensors[name].shape[1], s["cb"], ro.bounds)
        if ro.stored:
            wq = wq[np.argsort(ro.order)]
        logical[name] = wq
    from . import model as M
    for name in (f"blk.{bid}.{n}.weight" for n in M.LINEARS):
        kind = opt.kinds.get(name) if opt.kinds else None
        if kind and not kind.startswith("jlcm"):  # a llama.cpp type from the plan: its error propagates too
            from gguf.quants import dequantize as dequantize_standard

            from .plan import ggml_type
            from .standard import importance, quantize_standard
            qt = ggml_type(kind)
            standard[name] = quantize_standard(tensors[name], qt, importance(name, hessians, tensors))
            logical[name] = dequantize_standard(standard[name], qt).reshape(tensors[name].shape)
    return jlcm, standard, logical


def quantize_blocks(tensors: dict, hp: Hparams, tokens: np.ndarray, quantized: set[str],
                    opt, ckpt=None, report: list | None = None) -> tuple[dict, dict, dict, np.ndarray | None]:
    """Steps 1-5 for every block (the module's doc). Updates `tensors` with folded neighbours; returns the JLCM
    specs, the raw bytes of the layer matrices the plan stores in llama.cpp types, the input second moments h
    ('output': the head's input) and, if the head takes GPTQ rounding, its full input Hessian (else None). With a
    checkpoint, each finished block is saved and a resumed run starts after the last one saved. With learning, each
    block's figures (loss before and after, fraction of indices changed) are appended to `report`."""
    import torch
    from tqdm import tqdm

    from . import model as M
    from .fold import fold_layer
    from .source import release_all

    jlcm: dict = {}
    standard: dict = {}  # raw bytes of the layer matrices the plan stores in llama.cpp types
    hessians: dict = {}
    start = 0
    if ckpt is not None and ckpt.found():
        start, x_q, x_f = ckpt.restore(jlcm, tensors, standard, report)
        x_f = x_f if x_f is not None else x_q
        log.info("resuming after block %d of %d from %s", start, hp.n_layer, ckpt.dir)
    else:
        with torch.inference_mode():
            x_q = [M.embed(s, tensors, hp) for s in tokens]
        x_f = list(x_q)
    bar = tqdm(range(start, hp.n_layer), total=hp.n_layer, initial=start, desc="JLCM layers", unit="layer",
               disable=not D.is_main())
    for bid in bar:
        gptq = any(n.startswith(f"blk.{bid}.") and gptq_rounding(opt, n) for n in quantized)
        h, full, y_f = block_statistics(x_q, x_f, tensors, bid, hp, gptq, bool(opt.learn_steps), opt.imatrix)
        hessians.update(h)

        res = fold_layer(tensors, hessians, bid, hp, opt.groups, opt.seed + bid, quantized)
        # what a resumed run needs besides the packed weights: unquantized tensors the folds changed
        folded = {k: v for k, v in res.tensors.items() if v is not tensors.get(k) and k not in res.orders}
        unfolded = {n: tensors[n] for n in res.orders}
        release_all(tensors, res.orders)  # the folded copies replace them
        tensors.update(res.tensors)
        hessians.update(res.hessians)
        specs, layer_learned = round_matrices(res.orders, res.columns, tensors, hessians, full, opt)
        del full

        learned = None
        if layer_learned:
            learned = dict(block=bid, layer=layer_learned,
                           layer_indices=sum(v["indices"] for v in layer_learned.values()),
                           layer_indices_changed=sum(v["indices_changed"] for v in layer_learned.values()))
            if report is not None and not opt.learn_steps:
                report.append(learned)
            bar.set_postfix(moved=f"{100 * moved_fraction(report or [learned]):.2f}%")
        if opt.learn_steps:
            figures = learn_matrices(specs, tensors, hessians, x_q, y_f, bid, hp, opt)
            # every process learns the block whole: process 0's result in all (a GPU's sums may differ in their last bits)
            specs, figures = D.broadcast((specs, figures))
            learned = dict(learned or {}, **figures)
            if report is not None:
                report.append(learned)
            bar.set_postfix(loss=f"{learned['loss_before']:.4f}->{learned['loss_after']:.4f}",
                            moved=f"{100 * moved_fraction(report or [learned]):.2f}%")

        packed, block_standard, logical = pack_matrices(specs, tensors, hessians, bid, opt)
        jlcm.update(packed)
        standard.update(block_standard)
        qt = dict(tensors)
        qt.update(logical)
        with torch.inference_mode():
            x_q = D.blocks_forward(x_q, qt, bid, hp)
        x_f = y_f if y_f is not None else x_q
        del qt, logical, specs
        stream_folded(tensors, unfolded, res)
        del res, unfolded  # the block's float copies: memory holds one block's
        if ckpt is not None and D.is_main():
            ckpt.save(bid, packed, folded, x_q, y_f, block_standard, learned)
    return (jlcm, standard, hessians) + head_statistics(x_q, tensors, hessians, hp, quantized, opt)


def stream_folded(tensors: dict, unfolded: dict, res) -> None:
    """A finished block's folded matrices are packed: where they were streamed from the checkpoint, the float
    copies in memory are replaced by source.LazyArray.take (the same values, re-read if a later step, end-to-end
    tuning, asks for them), so that memory holds one block's float weights, not the model's."""
    from .source import LazyArray
    for n, ro in res.orders.items():
        if isinstance(unfolded[n], LazyArray):
            tensors[n] = unfolded[n].take(ro.order, res.columns.get(n))


def head_statistics(x_q: list, tensors: dict, hessians: dict, hp: Hparams, quantized: set[str], opt) -> tuple:
    """The head's input statistics after the last block: h['output'] (in `hessians`) and, if the head takes GPTQ
    rounding, its full input Hessian (else None)."""
    import torch

    from . import model as M
    from .imatrix import apply_imatrix, rescale_hessian
    head_gptq = "output.weight" in quantized and gptq_rounding(opt, "output.weight")
    moments = M.InputHessians() if head_gptq else M.InputMoments()
    with torch.inference_mode():
        for i in D.share(len(x_q)):
            moments("output", M.rms_norm(x_q[i], M.t(tensors["output_norm.weight"]), hp.rms_eps))
        D.reduce_moments(moments)
    count = sum(len(x) for x in x_q)
    measured = moments.means(count)
    hessians.update(apply_imatrix(measured, opt.imatrix))
    head_H = moments.matrices(count)["output"] if head_gptq else None
    if head_H is not None and "output" in (opt.imatrix or {}):
        head_H = rescale_hessian(head_H, measured["output"], opt.imatrix["output"])
    return (head_H,)


def quantize_embeddings(tensors: dict, hessians: dict, head_H, quantized: set[str], opt, jlcm: dict) -> None:
    """token_embd and output planned as JLCM, after the blocks (their statistics are the head's input): one
    global row grouping each, k-means codebooks, GPTQ rounding of an untied head, nearest rounding of the
    embedding (a lookup: no input to weigh). Adds them to `jlcm`."""
    from .fold import fold_global
    from .gptq import assign_gptq
    from .init import init_codebooks
    from .pack import pack_blocks, quantize_to_codebooks
    names = [n for n in ("token_embd.weight", "output.weight") if n in quantized]
    owner = D.owners({n: tensors[n].size for n in names})  # with several processes, one each (distributed.py)
    done = {}
    for name in names:
        if owner[name] == D.rank():
            embd_bits = int(opt.kinds[name][4:])
            w = np.asarray(tensors[name])  # decoded once (a streamed embedding may not fit the cache)
            ro = fold_global({name: w}, hessians, name, opt.groups, opt.seed)
            w = w[ro.order]
            h = hessians.get("output")
            cb = init_codebooks(w, h, ro.bounds, embd_bits, opt.variant, opt.seed, **fast_init(opt))
            if name == "output.weight" and head_H is not None:
                log.info("GPTQ rounding of the head (%d rows)", w.shape[0])
                packed = pack_blocks(*assign_gptq(w, embd_bits, cb, ro.bounds, head_H), embd_bits)
            else:
                packed = quantize_to_codebooks(w, embd_bits, cb, ro.bounds, h)
            done[name] = dict(packed=packed, bits=embd_bits, codebooks=cb, bounds=ro.bounds, perm=ro.order)
    jlcm.update(D.share_results(done, owner))
