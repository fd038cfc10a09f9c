"""Plan step: a storage type per weight matrix that fits a byte budget (--target-size / --target-bpw / --plan).

The choices are JLCM at 2, 3 or 4 bits and, for the few tensors worth more than 4 bits, llama.cpp's Q5_0 and
Q8_0; with --kquants also llama.cpp's Q2_K ... Q6_K (quantized by llama.cpp itself, standard.py) for the
matrices whose width is a multiple of 256. Inference only. For every tensor and choice the weights are quantized by a fast version of the
converter's own quantizer (grouping + one k-means pass; gguf-py's for Q5_0/Q8_0), which gives the error e(b) = sum_j h_j sum_i (w_ij - q_ij)^2
(h_j = E[x_j^2], the input's second moment from a float forward pass on calibration text): the expected
squared error the tensor adds to its output. The error only ranks the widths of one tensor; how much the
tensor matters for the model is measured: the KL divergence of the output distribution from the float
model's when that tensor alone is at its lowest width (JLCM 2-bit). The score of a choice is that KL scaled
by e(choice) / e(lowest), an estimate of the KL the tensor adds stored that way. (`fast=True`, for models
too large to run once per tensor: errors of a sample of rows, and the KL estimated to second order,
KL ~ 1/2 sum_ij F_ij (w_ij - q_ij)^2 per token, from the Fisher information F of a few calibration windows
(fisher_marginals: one forward and backward pass per window for all tensors together).) With
`gptq_kinds` (--plan-error rounding, an ablation), a layer matrix's widths are compared by their output
error under the full input Hessian instead, those widths rounded by GPTQ fitted to half the calibration
windows and measured on the other half (BlockHessians); the KL is still that of nearest rounding at the
lowest width, scaled by its output error.

Search: each tensor's (bytes, score) options are reduced to their lower convex hull (fewer bytes always
cost score, and each further step down costs more score per byte than the one before), so all moves of all
tensors sort into one sequence by score per byte saved. The greedy search starts every tensor at its
best option and takes moves in that order until the file fits, then gives the slack the last move left
back to the tensors it took from last (walk). A larger budget never has a worse score.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .format import BLOCK_BYTES, QK

log = logging.getLogger("jlcm-convert")

# what a tensor can be stored as, ordered by size: JLCM at 2/3/4 bits, llama.cpp's Q5_0 / Q8_0 (32-weight
# blocks) where a tensor is worth more than 4 bits, and with --kquants llama.cpp's K-quants (256-weight blocks)
CHOICES = ("jlcm2", "q2_k", "jlcm3", "q3_k", "jlcm4", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0")
KQUANT_CHOICES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
DEFAULT_CHOICES = tuple(k for k in CHOICES if k not in KQUANT_CHOICES)
WIDTHS = (2, 3, 4)
# types a matrix can be given by hand (--tensor-type, --token-embedding-type, --output-tensor-type, or a plan file
# written with them) that the search never chooses
PINNED_ONLY = ("q4_0", "f16")
KINDS = CHOICES + PINNED_ONLY  # every type a plan (the metadata, a JSON plan) may name
STANDARD = {k: k.upper() for k in KINDS if not k.startswith("jlcm")}  # the llama.cpp types' gguf type names
GRID = 2048      # evenly spaced budgets the search also fills for (see walk)
FAST_ROWS = 1024  # --fast scores a sample of this many rows per matrix
FISHER_WINDOWS = 8  # --fast estimates each tensor's KL from the Fisher information of this many windows
ALIGNMENT = 32  # gguf-py pads every tensor's data to this
PLAN_FORMAT = "jlcm-plan"
SCORER = 7  # saved scores of another scorer are refused (2: Q5_0/Q8_0 errors of the h-weighted quantizer;
            # 3: --fast estimates the KL from the Fisher information instead of using the raw error;
            # 4: --fast draws its row sample by Fisher information and no longer weights it as if it
            # held the whole matrix's; 5: JLCM errors with pack.assign's search over six starting scales;
            # 6: over +amax and -amax, pack.SCALE_STARTS; 7: with gptq_kinds (--plan-error rounding), layer
            # matrices by their output error under the full input Hessian, those widths rounded by GPTQ,
            # saved as "gptq_kinds"; without, the same scores as 6, whose files are still read)


class PlanError(ValueError):
    pass


def pad(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def tensor_bytes(rows: int, cols: int, bits: int, groups: int, stored_perm: bool) -> int:
    """Bytes a JLCM weight takes in the file with its companions, padding included (docs/FORMAT.md)."""
    return (pad(rows * (cols // QK) * BLOCK_BYTES[bits]) + pad(groups << bits) + pad(4 * groups)
            + (pad(8 * rows) if stored_perm else 0))


def choice_bytes(kind: str, rows: int, cols: int, groups: int, stored_perm: bool) -> int:
    if kind in STANDARD:
        block, size = block_size(kind)
        return pad(rows * cols // block * size)
    return tensor_bytes(rows, cols, int(kind[4:]), groups, stored_perm)


def palette(kquants: bool = False) -> tuple[str, ...]:
    """The choices a plan may use, ordered by size (the smallest first)."""
    return CHOICES if kquants else DEFAULT_CHOICES


def applicable(kind: str, cols: int) -> bool:
    """Whether a matrix of this width can be stored as `kind` (JLCM: every matrix the plan covers)."""
    return kind not in STANDARD or cols % block_size(kind)[0] == 0


def ggml_type(kind: str):
    """gguf-py's GGMLQuantizationType of a llama.cpp choice (q5_0, q8_0, the K-quants)."""
    from gguf import GGMLQuantizationType
    return GGMLQuantizationType[STANDARD[kind]]


def block_size(kind: str) -> tuple[int, int]:
    """(weights, bytes) of one block of a llama.cpp choice, from gguf-py's table."""
    from gguf.constants import GGML_QUANT_SIZES
    return GGML_QUANT_SIZES[ggml_type(kind)]


def type_id(kind: str) -> int:
    """ggml type id of a choice (what the plan metadata stores)."""
    from .format import TYPE_IDS
    return TYPE_IDS[int(kind[4:])] if kind.startswith("jlcm") else int(ggml_type(kind))


def kind_of_type(tid: int) -> str | None:
    return next((k for k in KINDS if type_id(k) == tid), None)


@dataclass(frozen=True)
class Option:
    kind: str      # a CHOICES entry
    bytes: int
    score: float


def hull(options: list[Option]) -> list[Option]:
    """Largest option first, then the lower convex hull of (bytes, score) towards fewer bytes: options that
    are dominated (no fewer bytes for no more score) or that a mix of neighbours beats are dropped."""
    pts = sorted(options, key=lambda o: (-o.bytes, o.score))
    front: list[Option] = []
    for o in pts:
        if front and o.bytes == front[-1].bytes:
            continue  # same size, higher or equal score
        while front and o.score <= front[-1].score:
            front.pop()  # o is smaller and no worse
        while len(front) >= 2:
            a, b = front[-2], front[-1]
            # slope (score gained per byte saved) must increase along the front
            if (b.score - a.score) * (b.bytes - o.bytes) >= (o.score - b.score) * (a.bytes - b.bytes):
                front.pop()
            else:
                break
        front.append(o)
    return front


def moves(options: dict[str, list[Option]]) -> tuple[dict[str, list[Option]], list[tuple[float, str, int]]]:
    """Per-tensor fronts and every move (score per byte saved, tensor, index on its front) in the order the
    search takes them."""
    fronts = {n: hull(o) for n, o in options.items()}
    seq = [((f[i].score - f[i - 1].score) / (f[i - 1].bytes - f[i].bytes), n, i)
           for n, f in fronts.items() for i in range(1, len(f))]
    seq.sort()
    return fronts, seq


def _fill(fronts: dict, seq: list, k: int, budget: int) -> tuple[dict[str, int], int]:
    """The first k moves, then taken moves undone from the last backwards (a tensor's latest move first)
    wherever they still fit: the bytes a large last move freed go back to the most sensitive tensors."""
    choice = {n: 0 for n in fronts}
    total = sum(f[0].bytes for f in fronts.values())
    for _, n, i in seq[:k]:
        total -= fronts[n][i - 1].bytes - fronts[n][i].bytes
        choice[n] = i
    for _, n, i in reversed(seq[:k]):
        cost = fronts[n][i - 1].bytes - fronts[n][i].bytes
        if choice[n] == i and total + cost <= budget:
            choice[n] = i - 1
            total += cost
    return choice, total


def walk(options: dict[str, list[Option]], budget: int) -> tuple[dict[str, str], int]:
    """The search: (choice per tensor, their bytes).

    The greedy takes moves in sequence until the tensors fit (a prefix of the sequence), then fills the
    slack the last move left (_fill). Fill results depend on the budget in ways that need not be monotone,
    so the plan is the best-scoring fill among a fixed set of budgets: every prefix's size and GRID evenly
    spaced sizes, those no larger than the budget. The set only grows with the budget, so a larger budget
    never scores worse, and the plain prefix is among the candidates, so the fill never makes it worse."""
    fronts, seq = moves(options)
    cum = [sum(f[0].bytes for f in fronts.values())]
    for _, n, i in seq:
        cum.append(cum[-1] - (fronts[n][i - 1].bytes - fronts[n][i].bytes))
    if budget < cum[-1]:
        raise PlanError(f"the budget leaves {budget:,} bytes for the planned tensors; at their smallest they "
                        f"take {cum[-1]:,}")
    points = sorted({int(v) for v in np.linspace(cum[-1], cum[0], GRID)} | set(cum))
    best = None
    for g in points:
        if g > budget:
            break
        k = next(j for j, c in enumerate(cum) if c <= g)
        choice, total = _fill(fronts, seq, k, g)
        score = sum(fronts[n][i].score for n, i in choice.items())
        if best is None or score < best[0]:
            best = (score, choice, total)
    _, choice, total = best
    return {n: fronts[n][i].kind for n, i in choice.items()}, total


def search(options: dict[str, list[Option]], budget: int) -> dict[str, str]:
    """Entry point of the search: a choice per tensor with sum of bytes <= budget (see walk)."""
    return walk(options, budget)[0]


def plan_score(options: dict[str, list[Option]], bits: dict[str, str]) -> float:
    return float(sum(next(o.score for o in options[n] if o.kind == b) for n, b in bits.items()))


def plan_bytes(options: dict[str, list[Option]], bits: dict[str, str]) -> int:
    return sum(next(o.bytes for o in options[n] if o.kind == b) for n, b in bits.items())


# --- scoring ---------------------------------------------------------------------------------------------

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
        self.x = [M.embed(seq, tensors) for seq in tokens]
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

    wanted = set(names)
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}

    def add(name: str, g: torch.Tensor) -> None:
        g2 = g.double().pow(2)
        r, c = g2.sum(1), g2.sum(0)
        rows[name], cols[name] = (rows[name] + r, cols[name] + c) if name in rows else (r, c)

    def with_leaves(keys):
        leaves = {k: M.t(tensors[k]).float().clone().requires_grad_() for k in keys if k in tensors}
        return {**tensors, **leaves}, leaves

    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    out_name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    for seq in tqdm(tokens[:windows], desc="Fisher information", unit="window"):
        seq = torch.as_tensor(np.asarray(seq), dtype=torch.long)
        with torch.no_grad():
            xs = [M.embed(seq, tensors)]
            for bid in range(hp.n_layer):
                xs.append(M.block_forward(xs[-1], tensors, bid, hp))
        x = xs[-1].clone().requires_grad_()
        t_head, leaves = with_leaves([out_name])
        logits = M.head(x, t_head, hp)
        labels = torch.multinomial(torch.softmax(logits.detach().double(), -1), 1, generator=gen)[:, 0]
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
        g_embd = torch.zeros(tensors["token_embd.weight"].shape, dtype=torch.float32)
        g_embd.index_add_(0, seq, gy)
        if out_name == "token_embd.weight":  # tied: one tensor, both uses
            g_embd += g_out
        elif out_name in wanted:
            add(out_name, g_out)
        if "token_embd.weight" in wanted:
            add("token_embd.weight", g_embd)
        del g_embd, g_out, xs
    return {k: (rows[k].numpy(), cols[k].numpy()) for k in rows}


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
                  gptq_kinds: frozenset[str] = frozenset(), imatrix: dict | None = None) -> dict[str, list[Option]]:
    """(bytes, score) of each tensor in `layout` at each width (see the module text). The layer matrices'
    JLCM widths in `gptq_kinds` are rounded by GPTQ as the converter rounds them; then every width of a
    layer matrix is compared by its output error under the full input Hessian, and the KL is still
    measured with nearest rounding at the lowest width, whose output error it is scaled by."""
    import torch
    from tqdm import tqdm

    from . import model as M

    moments = M.InputMoments()
    count = 0
    inputs: list[list[torch.Tensor]] = []  # float input of each block, for the KL windows
    kl_tokens = tokens[:kl_windows]
    with torch.inference_mode():
        for s, seq in enumerate(tokens):
            x = M.embed(seq, tensors)
            keep = not fast and s < len(kl_tokens)
            xs = [x] if keep else None
            for bid in range(hp.n_layer):
                x = M.block_forward(x, tensors, bid, hp, moments)
                if keep:
                    xs.append(x)
            moments("output", M.rms_norm(x, M.t(tensors["output_norm.weight"]), hp.rms_eps))
            count += len(seq)
            if keep:
                inputs.append(xs)
        ref = [torch.log_softmax(M.head(xs[-1], tensors, hp).double(), -1) for xs in inputs]
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
                    bid, x = 0, M.embed(seq, t)
                else:
                    bid, x = hp.n_layer, xs[-1]
                for b in range(bid, hp.n_layer):
                    x = M.block_forward(x, t, b, hp)
                lq = torch.log_softmax(M.head(x, t, hp).double(), -1)
                total += float((lp.exp() * (lp - lq)).sum(-1).mean())
        return total / len(kl_tokens)

    from .group import group_rows, row_profiles

    if fast:
        marginals = fisher_marginals(tensors, hp, tokens, layout, seed)
        fisher_tokens = sum(len(s) for s in tokens[:FISHER_WINDOWS])
    hessians = BlockHessians(tensors, hp, tokens, imatrix) if gptq_kinds else None
    options: dict[str, list[Option]] = {}
    rng = np.random.default_rng(seed)
    for name in tqdm(sorted(layout, key=_natural), desc="scoring widths", unit="tensor"):
        w = np.asarray(tensors[name], dtype=np.float32)
        rows_all = w.shape[0]
        sample = None
        if fast:  # errors of a row sample drawn by Fisher information (fisher_sample)
            sample = fisher_sample(marginals[name][0], rng)
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
    return options


def _natural(name: str):
    parts = name.split(".")
    return (0, int(parts[1]), name) if parts[0] == "blk" else (1, 0, name)


# --- plans as files and metadata -------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """'2.0GB' -> 2_000_000_000 (decimal units as in the issue; KiB/MiB/GiB binary); a bare number is bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise PlanError(f"cannot read the size {text!r} (examples: 2.0GB, 80MB, 1.5GiB, 123456789)") from None
    if unit not in units or value <= 0:
        raise PlanError(f"cannot read the size {text!r} (examples: 2.0GB, 80MB, 1.5GiB, 123456789)")
    return int(value * units[unit])


def load_plan(path: Path) -> dict[str, str]:
    """A plan from a JSON file written by save_plan, or from the metadata of a JLCM GGUF file."""
    path = Path(path)
    try:
        if path.suffix == ".gguf":
            from gguf import GGUFReader

            from .format import KEY_PLAN_TENSORS, KEY_PLAN_TYPES
            r = GGUFReader(str(path))
            if KEY_PLAN_TENSORS not in r.fields or KEY_PLAN_TYPES not in r.fields:
                raise PlanError(f"{path} has no JLCM plan in its metadata")
            names = r.fields[KEY_PLAN_TENSORS].contents()
            ids = r.fields[KEY_PLAN_TYPES].contents()
            plan = dict(zip(names, (kind_of_type(int(i)) for i in ids)))
        else:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT or not isinstance(doc.get("tensors"), dict):
                raise PlanError(f"{path} is not a JLCM plan (a JSON object with \"format\": \"{PLAN_FORMAT}\")")
            plan = doc["tensors"]
    except (OSError, ValueError) as e:
        if isinstance(e, PlanError):
            raise
        raise PlanError(f"cannot read the plan {path}: {e}") from None
    bad = [n for n, b in plan.items() if not isinstance(n, str) or b not in KINDS]
    if bad:
        raise PlanError(f"{path}: {bad[0]!r} has no valid type (one of {', '.join(KINDS)})")
    return dict(plan)


def save_plan(path: Path, bits: dict[str, str], info: dict | None = None,
              options: dict[str, list[Option]] | None = None, gptq_kinds: frozenset[str] = frozenset()) -> None:
    """JSON: the plan, what it was searched for, and (if given) every tensor's scored options, so a plan for
    another budget can be searched again from the same scores."""
    doc = {"format": PLAN_FORMAT, "version": 1, **(info or {}),
           "tensors": {n: bits[n] for n in sorted(bits, key=_natural)}}
    if options:
        doc["scorer"] = SCORER
        doc["gptq_kinds"] = sorted(gptq_kinds)
        doc["options"] = {n: [[o.kind, o.bytes, o.score] for o in options[n]] for n in sorted(options, key=_natural)}
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def load_options(path: Path, gptq_kinds: frozenset[str] = frozenset()) -> dict[str, list[Option]]:
    """The scored options saved with a plan ({} if it has none), if scored with GPTQ at `gptq_kinds`."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        opts = doc.get("options", {}) if isinstance(doc, dict) else {}
        out = {n: [Option(str(k), int(b), float(sc)) for k, b, sc in v] for n, v in opts.items()}
        scorer = doc.get("scorer", 1) if out else SCORER
        scored_gptq = set(doc.get("gptq_kinds", [])) if out else set(gptq_kinds)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise PlanError(f"cannot read the scores in {path}: {e}") from None
    if scorer != SCORER and not (scorer == 6 and not gptq_kinds):  # 7 without GPTQ widths is 6
        raise PlanError(f"the scores in {path} were measured by another version of the planner (scorer {scorer}, "
                        f"this one is {SCORER}): plan again with --save-plan")
    if scored_gptq != set(gptq_kinds):
        raise PlanError(f"the scores in {path} rounded {sorted(scored_gptq) or 'no width'} by GPTQ, this plan rounds "
                        f"{sorted(gptq_kinds) or 'none'} so (--rounding, --plan-error): plan again with --save-plan")
    if any(o.kind not in CHOICES or o.bytes <= 0 for v in out.values() for o in v):
        raise PlanError(f"{path} has scores for an unknown type or size")
    return out


def describe(bits: dict[str, str]) -> list[str]:
    """One line per layer, e.g. 'blk.3   q:4 k:3 v:q8_0 o:3 gate:2 up:2 down:3' (JLCM bits or a llama.cpp
    type), for the log."""
    short = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate",
             "ffn_up": "up", "ffn_down": "down"}
    rows: dict[str, list[str]] = {}
    for n in sorted(bits, key=_natural):
        parts = n.split(".")
        key = ".".join(parts[:2]) if parts[0] == "blk" else parts[0]
        kind = bits[n][4:] if bits[n].startswith("jlcm") else bits[n]
        rows.setdefault(key, []).append(f"{short.get(parts[-2], parts[-2])}:{kind}")
    return [f"{k:<12} {' '.join(v)}" for k, v in rows.items()]
