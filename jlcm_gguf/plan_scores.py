"""Plan step, scoring: the (bytes, score) of each weight matrix at each kind the plan may choose (plan.py searches
them).

The choices are JLCM at 2, 3 or 4 bits and, for the few tensors worth more than 4 bits, llama.cpp's Q5_0 and
Q8_0; with --kquants also llama.cpp's Q2_K ... Q6_K (quantized by llama.cpp itself, standard.py) for the
matrices whose width is a multiple of 256. Inference only. For every tensor and choice the weights are quantized by a fast version of the
converter's own quantizer (grouping + one k-means pass; gguf-py's for Q5_0/Q8_0), which gives the error e(b) = sum_j h_j sum_i (w_ij - q_ij)^2
(h_j = E[x_j^2], the input's second moment from a float forward pass on calibration text): the expected
squared error the tensor adds to its output. The error only ranks the kinds of one tensor; how much the
tensor matters for the model is measured: the KL divergence of the output distribution from the float
model's when that tensor alone is at its lowest width (JLCM 2-bit). The score of a choice is that KL scaled
by e(choice) / e(lowest), an estimate of the KL the tensor adds stored that way. (`fast=True`, for models
too large to run once per tensor: errors of a sample of rows, and the KL estimated to second order,
KL ~ 1/2 sum_ij F_ij (w_ij - q_ij)^2 per token, from the Fisher information F of a few calibration windows
(fisher_marginals: one forward and backward pass per window for all tensors together).) With
`gptq_kinds` (--plan-error rounding, an ablation), a layer matrix's kinds are compared by their output
error under the full input Hessian instead, those kinds rounded by GPTQ fitted to half the calibration
windows and measured on the other half (BlockHessians); the KL is still that of nearest rounding at the
lowest width, scaled by its output error.
"""
from __future__ import annotations

import logging

import numpy as np

from . import distributed as D
from .plan import DEFAULT_CHOICES, STANDARD, Option, applicable, choice_bytes, ggml_type, natural_order

log = logging.getLogger("jlcm-convert")

FAST_ROWS = 1024  # --fast scores a sample of this many rows per matrix
FISHER_WINDOWS = 8  # --fast estimates each tensor's KL from the Fisher information of this many windows


def standard_roundtrip(w: np.ndarray, kind: str, h: np.ndarray | None = None) -> np.ndarray:
    """w stored as Q5_0 / Q8_0 the way the writer stores it (h-weighted scales, standard.py) and read back."""
    from .standard import roundtrip
    return roundtrip(w, ggml_type(kind), h)


def output_error(w: np.ndarray, q: np.ndarray, H: np.ndarray) -> float:
    """sum over rows of (w - q) H (w - q)ᵀ: the squared error the rounding adds to the layer's output."""
    import torch
    d = torch.as_tensor(np.asarray(w, dtype=np.float32) - np.asarray(q, dtype=np.float32))
    return float(((d @ torch.as_tensor(H, dtype=torch.float32)) * d).double().sum())


def quick_error(w: np.ndarray, h: np.ndarray | None, kind: str, groups: int, variant: str, seed: int,
                grouping=None, starts: tuple[float, ...] | None = None, H: np.ndarray | None = None,
                H_fit: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """(error, dequantized weights in original row order) of w stored as `kind`: for JLCM by grouping and
    one k-means pass, then nearest rounding or, given H_fit, GPTQ's under that full input Hessian; for
    Q5_0/Q8_0 as the writer does it. The error is h-weighted squared, or given H the output error under H."""
    hw = np.ones(w.shape[1]) if h is None else np.asarray(h, dtype=np.float64)
    if kind in STANDARD:
        q = standard_roundtrip(w, kind, h)
    else:
        from .group import group_rows, row_profiles
        from .init import init_codebooks
        from .pack import assign, lookup

        bits = int(kind[4:])
        order, bounds = grouping if grouping is not None else group_rows(row_profiles(w, h), groups, seed)
        ws = w[order]
        cb = init_codebooks(ws, h, bounds, bits, variant, seed, rounds=0, max_samples=1 << 14)
        if H_fit is not None:
            from .gptq import assign_gptq
            idx, d = assign_gptq(ws, bits, cb, bounds, H_fit)
        else:
            idx, d = assign(ws, bits, cb, bounds, h, starts=starts)
        q = np.empty_like(ws)
        q[order] = lookup(idx, d, cb, bounds)
    if H is not None:
        return output_error(w, q, H), q
    return float((((w - q).astype(np.float64) ** 2).sum(0) * hw).sum()), q


class BlockHessians:
    """The full input Hessians of each block's linears, (fit, held out): from the even and from the odd
    calibration windows. GPTQ is fitted to the first and its error measured under the second, since under
    the Hessian it was fitted to (rank-deficient where a matrix is wider than the windows have tokens) it
    looks better than it is. A float forward pass advances one block at a time as the tensors are scored
    in block order: one block's matrices in memory."""

    def __init__(self, tensors: dict, hp, tokens: np.ndarray, imatrix: dict | None = None):
        from . import model as M
        self.imatrix = imatrix or {}
        if len(tokens) < 2:
            raise ValueError("GPTQ scoring needs at least two calibration windows")
        self.tensors, self.hp = tensors, hp
        self.x = [M.embed(seq, tensors, hp) for seq in tokens]
        self.counts = [sum(len(seq) for seq in tokens[half::2]) for half in (0, 1)]
        self.bid, self.full = -1, ({}, {})

    def __call__(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from . import model as M
        bid = int(name.split(".")[1])
        if bid < self.bid:
            raise ValueError(f"{name} asked for after block {self.bid}")
        while self.bid < bid:
            self.full = ({}, {})  # the previous block's matrices go before the next are summed
            moments = (M.InputHessians(), M.InputHessians())
            with torch.inference_mode():
                self.x = [M.block_forward(x, self.tensors, self.bid + 1, self.hp, moments[i % 2])
                          for i, x in enumerate(self.x)]
            self.full = tuple(m.matrices(c) for m, c in zip(moments, self.counts))
            self.bid += 1
        key = name.removesuffix(".weight")
        if key in self.imatrix:  # its diagonal from --imatrix, the correlations from the windows
            from .imatrix import rescale_hessian
            return tuple(rescale_hessian(f[key], np.diag(f[key]), self.imatrix[key]) for f in self.full)
        return self.full[0][key], self.full[1][key]



def fisher_marginals(tensors: dict, hp, tokens: np.ndarray, names, seed: int,
                     windows: int = FISHER_WINDOWS) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Row and column sums (float64) of the diagonal Fisher information of each tensor in `names`, from
    the squared gradient of each calibration window's log-likelihood. The labels are sampled from the
    model's own output, so the gradients of different positions are uncorrelated in expectation and the
    window's squared gradient estimates the Fisher summed over its tokens, the Hessian of the KL divergence
    from the float model. One forward and one backward pass per window, one block at a time (the backward
    pass recomputes each block from its saved input), so memory stays at one block's."""
    import torch

    from . import model as M

    wanted = sorted(set(names))
    acc = D.float64_device()
    rows = {k: torch.zeros(np.shape(tensors[k])[0], dtype=torch.float64, device=acc) for k in wanted}
    cols = {k: torch.zeros(np.shape(tensors[k])[1], dtype=torch.float64, device=acc) for k in wanted}

    def add(name: str, g: torch.Tensor) -> None:
        g2 = g.to(acc).double().pow(2)
        rows[name] += g2.sum(1)
        cols[name] += g2.sum(0)

    def with_leaves(keys):
        leaves = {k: M.t(tensors[k]).float().clone().requires_grad_() for k in keys if k in tensors}
        return {**tensors, **leaves}, leaves

    from tqdm import tqdm

    out_name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    mine = D.share(min(windows, len(tokens)))  # with several processes, this one's windows; the sums all-reduced
    for i in tqdm(mine, desc="Fisher information", unit="window", disable=not D.is_main()):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)  # each window's labels, wherever it is computed
        seq = torch.as_tensor(np.asarray(tokens[i]), dtype=torch.long)
        with torch.no_grad():
            xs = [M.embed(seq, tensors, hp)]
            for bid in range(hp.n_layer):
                xs.append(M.block_forward(xs[-1], tensors, bid, hp))
        x = xs[-1].clone().requires_grad_()
        t_head, leaves = with_leaves([out_name])
        logits = M.head(x, t_head, hp)
        labels = torch.multinomial(torch.softmax(logits.detach().cpu().double(), -1), 1,  # the CPU's generator
                                   generator=gen)[:, 0].to(logits.device)
        torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
        g_out, gy = leaves[out_name].grad, x.grad
        del logits, t_head, leaves
        for bid in reversed(range(hp.n_layer)):
            x = xs[bid].clone().requires_grad_()
            t_blk, leaves = with_leaves(f"blk.{bid}.{n}.weight" for n in M.LINEARS)
            M.block_forward(x, t_blk, bid, hp).backward(gy)
            for k, leaf in leaves.items():
                if k in wanted:
                    add(k, leaf.grad)
            gy = x.grad
            del t_blk, leaves
        g_embd = torch.zeros(tensors["token_embd.weight"].shape, dtype=torch.float32, device=gy.device)
        g_embd.index_add_(0, seq.to(gy.device), gy)
        if out_name == "token_embd.weight":  # tied: one tensor, both uses
            g_embd += g_out
        elif out_name in wanted:
            add(out_name, g_out)
        if "token_embd.weight" in wanted:
            add("token_embd.weight", g_embd)
        del g_embd, g_out, xs
    D.all_reduce_([rows[k] for k in wanted] + [cols[k] for k in wanted])
    return {k: (rows[k].cpu().numpy(), cols[k].cpu().numpy()) for k in wanted}


def fisher_error(w: np.ndarray, q: np.ndarray, marginals: tuple[np.ndarray, np.ndarray]) -> float:
    """sum_ij F_ij (w_ij - q_ij)^2 with the Fisher diagonal approximated by the outer product of its row and
    column sums (over their total)."""
    r, c = marginals
    d2 = (w - q).astype(np.float64) ** 2
    return float(r @ (d2 @ c)) / max(float(r.sum()), 1e-300)


def fisher_sample(r: np.ndarray, rng: np.random.Generator, rows: int = FAST_ROWS) -> np.ndarray | None:
    """Rows --fast scores a matrix on (None: all): `rows` drawn with replacement in proportion to the row's
    Fisher information r_i, so that sum_i r_i x_i = R E[x_i] is estimated by R times the sample mean. Uniform
    draws would do for a layer matrix, whose rows weigh alike, but not for the head or an embedding, where a
    few hundred tokens hold most of the information (an untied embedding's unseen rows hold none)."""
    total = float(r.sum())
    if len(r) <= rows or total <= 0:
        return None
    return np.sort(rng.choice(len(r), rows, replace=True, p=r / total))


def fisher_kl(w: np.ndarray, q: np.ndarray, marginals: tuple[np.ndarray, np.ndarray],
              sample: np.ndarray | None, tokens: int) -> float:
    """The second-order estimate of the KL per token that storing w as q adds: 1/2 sum_ij F_ij (w_ij - q_ij)^2
    over `tokens` (fisher_error), from all rows or from rows drawn by fisher_sample (w, q: those rows)."""
    r, c = marginals
    if sample is None:
        return 0.5 * fisher_error(w, q, (r, c)) / tokens
    d2 = (w - q).astype(np.float64) ** 2
    return 0.5 * float((d2 @ c).mean()) / tokens


def score_options(tensors: dict, hp, tokens: np.ndarray, layout: dict[str, tuple[int, bool]], groups: int,
                  variant: str, seed: int, fast: bool = False, kl_windows: int = 2,
                  choices: tuple[str, ...] = DEFAULT_CHOICES,
                  gptq_kinds: frozenset[str] = frozenset(), imatrix: dict | None = None,
                  score_log=None) -> dict[str, list[Option]]:
    """(bytes, score) of each tensor in `layout` at each kind (see the module text). The layer matrices'
    JLCM kinds in `gptq_kinds` are rounded by GPTQ as the converter rounds them; then every kind of a
    layer matrix is compared by its output error under the full input Hessian, and the KL is still
    measured with nearest rounding at the lowest width, whose output error it is scaled by. score_log: a
    checkpoint.ScoreLog that each tensor's options are written to when scored, and read from (not scored
    again) where an interrupted run of the same key scored them."""
    import torch
    from tqdm import tqdm

    from . import model as M

    moments = M.InputMoments()
    count = sum(len(seq) for seq in tokens)
    inputs: list[list[torch.Tensor]] = []  # float input of each block, for the KL windows
    kl_tokens = tokens[:kl_windows]
    mine = set(D.share(len(tokens)))  # with several processes, the windows whose moments this one sums
    with torch.inference_mode():
        for s, seq in enumerate(tokens):
            keep = not fast and s < len(kl_tokens)  # (every process runs the KL windows)
            if s not in mine and not keep:
                continue
            observe = moments if s in mine else None
            x = M.embed(seq, tensors, hp)
            xs = [x] if keep else None
            for bid in range(hp.n_layer):
                x = M.block_forward(x, tensors, bid, hp, observe)
                if keep:
                    xs.append(x)
            if observe is not None:
                moments("output", M.rms_norm(x, M.t(tensors["output_norm.weight"]), hp.rms_eps))
            if keep:
                inputs.append(xs)
        D.reduce_moments(moments)
        ref = [torch.log_softmax(M.head(xs[-1], tensors, hp).to(D.float64_device()).double(), -1) for xs in inputs]
    from .imatrix import apply_imatrix
    h = apply_imatrix(moments.means(count), imatrix)

    def h_of(name):
        return h["output"] if not name.startswith("blk.") else h[name.removesuffix(".weight")]

    def kl_with(name: str, q: np.ndarray) -> float:
        t = dict(tensors)
        t[name] = q
        total = 0.0
        with torch.inference_mode():
            for seq, xs, lp in zip(kl_tokens, inputs, ref):
                if name.startswith("blk."):
                    bid = int(name.split(".")[1])
                    x = xs[bid]
                elif name == "token_embd.weight":
                    bid, x = 0, M.embed(seq, t, hp)
                else:
                    bid, x = hp.n_layer, xs[-1]
                for b in range(bid, hp.n_layer):
                    x = M.block_forward(x, t, b, hp)
                lq = torch.log_softmax(M.head(x, t, hp).to(D.float64_device()).double(), -1)
                total += float((lp.exp() * (lp - lq)).sum(-1).mean())
        return total / len(kl_tokens)

    from .group import group_rows, row_profiles

    if fast:
        marginals = fisher_marginals(tensors, hp, tokens, layout, seed)
        fisher_tokens = sum(len(s) for s in tokens[:FISHER_WINDOWS])
    hessians = BlockHessians(tensors, hp, tokens, imatrix) if gptq_kinds else None
    options: dict[str, list[Option]] = {}
    scored = {}
    if score_log is not None:
        scored = {n: v for n, v in score_log.load()[0].items() if n in layout}
        score_log.start()
        if scored and D.is_main():
            log.info("plan scoring: resuming with %d of %d matrices scored (%s)", len(scored), len(layout),
                     score_log.dir)
    rng = np.random.default_rng(seed)
    # with several processes each tensor is scored by one, the largest first to the least loaded (the row samples
    # are drawn for all in every process: the same draws as one process makes)
    owner = D.owners({n: int(np.prod(np.shape(tensors[n]))) for n in sorted(layout, key=natural_order)})
    for name in tqdm(sorted(layout, key=natural_order), desc="scoring kinds", unit="tensor",
                     disable=not D.is_main()):
        sample = None
        if fast:  # errors of a row sample drawn by Fisher information (fisher_sample)
            sample = fisher_sample(marginals[name][0], rng)
        if owner[name] != D.rank():
            continue
        if name in scored:
            options[name] = [Option(*o) for o in scored[name]]
            continue
        w = np.asarray(tensors[name], dtype=np.float32)
        rows_all = w.shape[0]
        if sample is not None:
            w = w[sample]
        n_groups, stored = layout[name]
        kinds = [k for k in choices if applicable(k, w.shape[1])]
        grouping = group_rows(row_profiles(w, h_of(name)), n_groups, seed)
        H_fit, H = hessians(name) if hessians is not None and name.startswith("blk.") else (None, None)
        errs = {}
        for kind in kinds:
            errs[kind], q = quick_error(w, h_of(name), kind, n_groups, variant, seed, grouping, H=H,
                                        H_fit=H_fit if kind in gptq_kinds else None)
            if kind == kinds[0]:
                lowest, anchor = q, errs[kind]
        if H is not None and kinds[0] in gptq_kinds:  # the KL's nearest-rounded counterpart
            anchor, lowest = quick_error(w, h_of(name), kinds[0], n_groups, variant, seed, grouping, H=H)
        if fast:  # the second-order estimate of that KL: half the Fisher-weighted squared error per token
            kl = fisher_kl(w, lowest, marginals[name], sample, fisher_tokens)
        else:
            kl = kl_with(name, lowest)
        scale = max(kl, 0.0) / max(anchor, 1e-30)
        options[name] = [Option(k, choice_bytes(k, rows_all, w.shape[1], n_groups, stored), errs[k] * scale)
                         for k in kinds]
        if score_log is not None:
            score_log.add(name, [(o.kind, o.bytes, o.score) for o in options[name]])
    return D.share_results(options, owner)
