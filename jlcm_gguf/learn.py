"""Learn step: joint optimisation of codebooks, block scales and index mappings on a block's
reconstruction loss (docs/ALGORITHM.md).

Each quantized weight is w = d_block * c_g[i] with i an index into its group's sorted codebook c_g. Codebook
entries and block scales get exact gradients and Adam steps. The mapping i is updated by one of
(`--learn-mappings`):

- ``proximal`` (default): a discrete proximal step. From the gradient G = dL/dc at each weight, every weight's
  move to an adjacent codeword (never further) is scored by the local quadratic model of the loss,
  gain = -G*delta - H/2 * (d*delta)^2 with H's diagonal taken as the layer input's second moment h_j (up to a
  per-matrix factor), so a move across a small gap needs a small gradient and one across a large gap a large
  one. The best-scoring fraction of each matrix moves (a trust region on the fraction of indices); the step is
  kept only if the loss of the step's batch falls, and the fraction grows after a kept step and halves after a
  rejected one.
- ``plain``: the plain straight-through estimator on a continuous latent u (dL/du = G * gap), Adam on u,
  indices round(u) clipped to move at most one codeword per step (the ablation).
- ``off``: codebooks and block scales only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .distributed import device, float64_device, to_device
from .format import QK

MAPPINGS = ("proximal", "plain", "off")


class CodebookWeight(torch.autograd.Function):
    """w = d[row, block] * cb[group(row), round(u)]; u's gradient is G = dL/d(codeword value) for the proximal
    step, the plain STE G * gap for 'plain', none for 'off'."""

    @staticmethod
    def forward(ctx, u, cb, d, grp, mappings: str):
        k = cb.shape[1]
        i = u.round().clamp(0, k - 1).long()
        key = grp[:, None] * k + i                                   # flat codebook entry of each weight
        flat = cb.reshape(-1)
        cv = flat[key]
        dx = d.repeat_interleave(QK, dim=1)
        ctx.save_for_backward(key, cb, dx, cv)
        ctx.mappings = mappings
        return dx * cv

    @staticmethod
    def backward(ctx, g):
        key, cb, dx, cv = ctx.saved_tensors
        rows, cols = g.shape
        gd = g * dx                                                  # dL/d(codeword value)
        grad_cb = torch.zeros(cb.numel(), dtype=gd.dtype, device=gd.device).index_add_(
            0, key.reshape(-1), gd.reshape(-1)).view_as(cb)
        grad_d = (g * cv).view(rows, cols // QK, QK).sum(-1)
        if ctx.mappings == "plain":
            gaps, zero = cb[:, 1:] - cb[:, :-1], cb.new_zeros(cb.shape[0], 1)
            up, down = torch.cat([gaps, zero], 1).reshape(-1), torch.cat([zero, gaps], 1).reshape(-1)
            grad_u = gd * torch.where(gd < 0, up[key], down[key])    # descent on u raises the index where gd < 0
        elif ctx.mappings == "proximal":
            grad_u = gd
        else:
            grad_u = None
        return grad_u, grad_cb.to(cb.dtype), grad_d, None, None


@dataclass
class QuantParam:
    """One quantized matrix under learning (stored row order)."""
    name: str
    u: torch.Tensor          # [rows, cols] index positions (integers except under 'plain')
    cb: torch.Tensor         # [groups, K] float codebook (int8 units), sorted
    d0: torch.Tensor         # [rows, cols/64] initial block scales (fixed)
    r: torch.Tensor          # [rows, cols/64] learned relative scale, d = d0 * r
    grp: torch.Tensor        # [rows] group of each stored row
    h: torch.Tensor | None = None   # [cols] input second moment (the proximal step's curvature), None: ones
    row_curv: torch.Tensor | None = None  # [rows] a_i of the loss's curvature H_ij ~ a_i * h_j (estimate_curvature)
    start: torch.Tensor = field(default=None)  # indices at the start, for the report

    def __post_init__(self):
        if self.start is None:
            self.start = self.u.detach().round().clone()

    def weight(self, mappings: str = "proximal") -> torch.Tensor:
        return CodebookWeight.apply(self.u, self.cb, self.d0 * self.r, self.grp, mappings)

    def indices(self) -> np.ndarray:
        return self.u.detach().round().clamp(0, self.cb.shape[1] - 1).to(torch.uint8).cpu().numpy()

    def changed(self) -> int:
        """How many indices differ from where learning started."""
        return int((self.u.detach().round() != self.start).sum())


def make_param(name: str, idx: np.ndarray, d: np.ndarray, cb: np.ndarray, bounds: np.ndarray,
               h: np.ndarray | None = None, device: str = "cpu") -> QuantParam:
    grp = np.searchsorted(bounds, np.arange(idx.shape[0]), side="right")
    order = np.argsort(cb, axis=1, kind="stable")             # learning works on sorted codebooks
    rank = np.argsort(order, axis=1)
    sidx = rank[grp[:, None], idx]
    return QuantParam(name,
                      torch.tensor(sidx, dtype=torch.float32, device=device),
                      torch.tensor(np.take_along_axis(cb, order, axis=1), dtype=torch.float32, device=device,
                                   requires_grad=True),
                      torch.tensor(d.astype(np.float32), device=device),
                      torch.ones(d.shape, dtype=torch.float32, device=device, requires_grad=True),
                      torch.tensor(grp, dtype=torch.long, device=device),
                      None if h is None else torch.tensor(np.asarray(h, np.float32), device=device))


def finalize(p: QuantParam) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(idx, d float16, int8 codebooks) of a learned parameter; the codebook is re-quantized to int8 and the
    block scales absorb its normalisation."""
    cb = p.cb.detach().cpu().numpy().astype(np.float64)
    m = np.abs(cb).max(axis=1, keepdims=True)
    m = np.where(m > 0, m, 1)
    cb8 = np.round(cb / m * 127).clip(-127, 127).astype(np.int8)
    scale = (m[:, 0] / 127)[p.grp.cpu().numpy()]              # per stored row
    d = ((p.d0 * p.r).detach().cpu().numpy() * scale[:, None]).astype(np.float16)
    return p.indices(), d, cb8


def proximal_moves(p: QuantParam, frac: float, grad: torch.Tensor | None = None,
                   curv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The proximal mapping step's proposal for one matrix: (flat positions, +1/-1 moves) of at most `frac` of
    its weights, each to an adjacent codeword, from G = dL/d codeword value (`grad`, default p.u.grad).

    A move by delta codeword units changes the loss by G*delta + C/2 * delta^2 to second order, C the loss's
    curvature in codeword units (`curv`; default the block model's Gauss-Newton diagonal a_i * h_j * d^2 from
    p.row_curv and p.h, estimate_curvature). Moves predicted to lower the loss are candidates, the most negative
    first: a weight moves only when its gradient outweighs the cost of the move, so a large gap needs a large
    gradient."""
    with torch.no_grad():
        g = p.u.grad if grad is None else grad
        k = p.cb.shape[1]
        i = p.u.round().clamp(0, k - 1).long()
        base = p.grp[:, None] * k
        flat = p.cb.detach().reshape(-1)
        c = flat[base + i]
        if curv is None:
            d = (p.d0 * p.r).detach().repeat_interleave(QK, dim=1)
            h = p.h[None, :] if p.h is not None else torch.ones_like(g[:1])
            a = p.row_curv[:, None] if p.row_curv is not None else torch.zeros_like(g[:, :1])
            curv = a * h * d.pow(2)
        change = []
        for step in (1, -1):
            j = (i + step).clamp(0, k - 1)
            delta = flat[base + j] - c                               # 0 at the end of the codebook
            dl = g * delta + 0.5 * curv * delta.pow(2)
            change.append(torch.where(delta != 0, dl, torch.full_like(dl, float("inf"))))
        up, down = change
        best = torch.minimum(up, down)
        # one move per row: moves in one row interact through the input's correlations (off the diagonal of x x^T),
        # which the diagonal model does not see
        row_best, col = best.min(dim=1)
        # and one per column: moves sharing an input column add up coherently downstream
        col_best = torch.full((best.shape[1],), float("inf"), device=best.device)
        col_best.scatter_reduce_(0, col, row_best, reduce="amin")
        row_best = torch.where(row_best <= col_best[col], row_best, torch.full_like(row_best, float("inf")))
        n = int(min((row_best < 0).sum().item(), max(1, round(frac * best.numel()))))
        if n == 0:
            return best.new_zeros(0, dtype=torch.long), best.new_zeros(0)
        rows = torch.topk(row_best, n, largest=False).indices
        pos = rows * best.shape[1] + col[rows]
        move = torch.where(up.reshape(-1)[pos] <= down.reshape(-1)[pos], 1.0, -1.0)
        return pos, move


def predicted_change(p: QuantParam, pos: torch.Tensor, move: torch.Tensor, grad: torch.Tensor,
                     curv: torch.Tensor) -> float:
    """The second-order model's loss change, G*delta + C/2 * delta^2 summed, of the moves (pos, move)."""
    with torch.no_grad():
        k = p.cb.shape[1]
        i = p.u.view(-1)[pos].round().long()
        base = p.grp[pos // p.u.shape[1]] * k
        flat = p.cb.detach().reshape(-1)
        delta = flat[base + (i + move.long()).clamp(0, k - 1)] - flat[base + i]
        return float((grad.reshape(-1)[pos] * delta + 0.5 * curv.reshape(-1)[pos] * delta.pow(2)).sum())


def try_moves(params: list[QuantParam], moves: list[tuple[torch.Tensor, torch.Tensor]], loss: float,
              trial_loss) -> bool | None:
    """Applies the proposed `moves` (proximal_moves of each matrix) and keeps them only if `trial_loss()` is below
    `loss`, the same batch's loss before them; None when nothing was proposed."""
    if not any(len(pos) for pos, _ in moves):
        return None
    with torch.no_grad():
        for p, (pos, mv) in zip(params, moves):
            p.u.view(-1)[pos] += mv
        if trial_loss() < loss:
            return True
        for p, (pos, mv) in zip(params, moves):
            p.u.view(-1)[pos] -= mv
    return False


@dataclass
class TrustRegion:
    """The fraction of each matrix's indices a proximal step may move: x1.5 after a kept step, /2 after a rejected
    one, within [lo, hi]."""
    frac: float
    lo: float
    hi: float
    accepted: int = 0
    rejected: int = 0

    def update(self, kept: bool | None) -> None:
        if kept is None:
            return
        if kept:
            self.accepted += 1
            self.frac = min(self.frac * 1.5, self.hi)
        else:
            self.rejected += 1
            self.frac = max(self.frac * 0.5, self.lo)


def estimate_curvature(block_fn, params: list[QuantParam], x_in: torch.Tensor, norm: torch.Tensor, batch: int,
                       gen: torch.Generator, probes: int = 4) -> None:
    """Sets each matrix's p.row_curv = a_i of the loss's Gauss-Newton diagonal H_ij ~ a_i * h_j.

    For L = ||y - y*||^2 / (N * norm), GN = 2 J^T J / (N * norm). With a random +-1 cotangent v on the block output,
    G_v = d<y, v>/dW has E[G_v,ij^2] ~ sum_t (J^T v)_ti^2 x_tj^2, so the row sums R_i = sum_j G_v,ij^2 give
    a_i = 2 R_i / (N * norm * sum_j h_j), averaged over `probes` batches: low noise, since a row's sum spans all
    its columns."""
    sums = [torch.zeros(p.u.shape[0], device=p.u.device) for p in params]
    for _ in range(probes):
        pick = torch.randperm(x_in.shape[0], generator=gen)[:batch].to(x_in.device)
        for p in params:
            p.u.grad = None
        y = block_fn({p.name: p.weight("proximal") for p in params}, x_in[pick])
        v = torch.randint(0, 2, y.shape, generator=gen).to(y) * 2 - 1
        (y * v).sum().backward()
        with torch.no_grad():
            for s, p in zip(sums, params):
                gw = p.u.grad / (p.d0 * p.r).detach().repeat_interleave(QK, dim=1)   # d<y,v>/dw
                s += gw.pow(2).sum(1)
        n = y.numel()
    for s, p in zip(sums, params):
        hsum = float(p.h.sum()) if p.h is not None else p.u.shape[1]
        p.row_curv = 2 * s / probes / (n * float(norm) * max(hsum, 1e-30))
        p.u.grad = None
    for p in params:
        p.cb.grad = None
        p.r.grad = None


def clip_moves(params: list[QuantParam], before: list[torch.Tensor]) -> None:
    """After a step: an index moves at most one codeword, and u stays in the codebook's range; codebooks stay
    sorted (a swap re-labels the indices)."""
    with torch.no_grad():
        for p, i0 in zip(params, before):
            k = p.cb.shape[1]
            p.u.copy_(torch.minimum(torch.maximum(p.u, i0 - 1.0), i0 + 1.0).clamp(0, k - 1))
            keep_sorted(p)


def keep_sorted(p: QuantParam) -> None:
    """Re-sorts each codebook after a step; indices (and the start indices) follow their codewords."""
    with torch.no_grad():
        k = p.cb.shape[1]
        srt, perm = p.cb.sort(dim=1)
        if not torch.equal(perm, torch.arange(k, device=perm.device).expand_as(perm)):
            inv = perm.argsort(dim=1)
            p.cb.copy_(srt)
            i = p.u.round().long().clamp(0, k - 1)
            frac = p.u - i
            p.u.copy_(inv[p.grp[:, None], i].float() + frac)
            p.start.copy_(inv[p.grp[:, None], p.start.long().clamp(0, k - 1)].float())


@dataclass
class LearnStats:
    """What one block's learning did (the report's per-block figures)."""
    losses: list[float]       # batch loss at each step
    changed: int              # indices that differ from the start
    weights: int
    accepted: int = 0         # proximal steps whose moves were kept
    rejected: int = 0

    @property
    def changed_frac(self) -> float:
        return self.changed / max(1, self.weights)


def learn_block(block_fn, params: list[QuantParam], x_in: torch.Tensor, y_target: torch.Tensor, steps: int,
                lr_u: float = 0.02, lr_cb: float = 1e-3, lr_d: float = 1e-3, batch: int = 4, seed: int = 0,
                mappings: str = "proximal", move_frac: float = 2e-3, progress=None) -> LearnStats:
    """Adam on the codebooks and block scales, and the mapping update `mappings`, on
    || block_fn(weights, x) - y ||^2 / ||y||^2 over random batches of windows.

    block_fn(weights: dict[name, Tensor], x: [..., seq, n_embd]) -> [..., seq, n_embd] (x_in: [windows, seq,
    n_embd], windows of equal length). Adam's eps is far below the gradients' scale (they are ~1e-10 here: one
    weight moves a normalised block loss very little), so its steps have the learning rates' size."""
    if mappings not in MAPPINGS:
        raise ValueError(f"mappings must be one of {MAPPINGS}, not {mappings!r}")
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.u.requires_grad_(mappings != "off")
        p.u.grad = None
    groups = [{"params": [p.cb for p in params], "lr": lr_cb * 127},
              {"params": [p.r for p in params], "lr": lr_d}]
    if mappings == "plain":
        groups.append({"params": [p.u for p in params], "lr": lr_u})
    # Adam's default eps (1e-8) is far above these gradients (~1e-10): the codebook and scale steps are ~lr * g / eps,
    # small, which measured better than full-size steps (SmolLM2 2-bit, 40 steps: 469 with eps 1e-30, 326 with 1e-8).
    # The plain STE's latent u needs full-size steps to move at all.
    opt = torch.optim.Adam(groups[:2], eps=1e-8)
    opt_u = torch.optim.Adam(groups[2:], eps=1e-30) if mappings == "plain" else None
    stats = LearnStats([], 0, sum(p.u.numel() for p in params))
    n = x_in.shape[0]
    norm = y_target.pow(2).mean()
    region = TrustRegion(move_frac, 1e-5, 0.05)
    if mappings == "proximal":
        estimate_curvature(block_fn, params, x_in, norm, batch, gen)

    def batch_loss(pick, mode):
        weights = {p.name: p.weight(mode) for p in params}
        return (block_fn(weights, x_in[pick]) - y_target[pick]).pow(2).mean() / norm  # the windows as one batch

    for step in range(steps):
        pick = torch.randperm(n, generator=gen)[:batch].to(x_in.device)
        loss = batch_loss(pick, mappings)
        opt.zero_grad()
        for p in params:
            p.u.grad = None
        loss.backward()
        before = [p.u.detach().round() for p in params]
        if mappings == "proximal":
            kept = try_moves(params, [proximal_moves(p, region.frac) for p in params], float(loss.detach()),
                             lambda: float(batch_loss(pick, mappings)))
            region.update(kept)
        opt.step()
        if opt_u is not None:
            opt_u.step()
        clip_moves(params, before)
        stats.losses.append(float(loss.detach()))
        if progress:
            progress(step, float(loss.detach()))
    for p in params:
        p.u.requires_grad_(False)
        p.u.grad = None
    stats.changed = sum(p.changed() for p in params)
    stats.accepted, stats.rejected = region.accepted, region.rejected
    return stats


# Layer-wise learning: the same joint problem on one matrix's reconstruction error under its full input Hessian,
# || (W - Wq) X ||^2 = tr((W - Wq) H (W - Wq)^T), by alternating exact steps (docs/ALGORITHM.md): codebooks and
# block scales by least squares with the indices fixed, then the indices by one sweep of exact coordinate descent
# with codebooks and scales fixed: each weight in turn moves to the adjacent codeword that lowers the error most
# ('proximal'), or to any codeword ('plain'), the error's gradient updated after each column.

SHRINK = 0.5  # layer-wise learning's H is shrunk this far towards its diagonal (learn_layer)


@dataclass
class LayerStats:
    """What layer-wise learning did to one matrix (losses relative to tr(W H W^T))."""
    loss_before: float
    loss_after: float
    changed: int             # indices that name another codeword than the rounding it started from
    weights: int


def layer_loss(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """tr((W - Wq) H (W - Wq)^T) / tr(W H W^T) (scale: tr(W H W^T), if known)."""
    e = w - wq
    if scale is None:
        scale = ((w @ H) * w).sum()
    return float(((e @ H) * e).sum() / scale.clamp_min(1e-30))


def refit_codebooks(w, pos, dx, c, grp, H, ridge: float = 1e-6, chunk: int = 256, wH=None) -> torch.Tensor:
    """Codebooks c [groups, K] minimising tr((W - Wq) H (W - Wq)^T) for Wq[r, j] = dx[r, j] * c[grp[r], pos[r, j]]
    (linear in c: one K x K system per group); a ridge towards the old c keeps unused codewords where they were.
    wH: W @ H, if known."""
    g_n, k = c.shape
    cols = w.shape[1]
    dev = float64_device()  # the systems' sums (float64)
    A = torch.zeros(g_n, k, k, dtype=torch.float64, device=dev)
    b = torch.zeros(g_n, k, dtype=torch.float64, device=dev)
    grp_a = grp.to(dev)
    for r0 in range(0, w.shape[0], chunk):
        D = torch.nn.functional.one_hot(pos[r0:r0 + chunk], k).float() * dx[r0:r0 + chunk, :, None]  # [r, cols, K]
        HD = (H @ D.permute(1, 0, 2).reshape(cols, -1)).view(cols, -1, k).permute(1, 0, 2)
        A.index_add_(0, grp_a[r0:r0 + chunk], torch.bmm(D.transpose(1, 2), HD).to(dev).double())
        wh = w[r0:r0 + chunk] @ H if wH is None else wH[r0:r0 + chunk]
        b.index_add_(0, grp_a[r0:r0 + chunk], torch.einsum("rjk,rj->rk", D, wh).to(dev).double())
    lam = ridge * A.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)[:, None]
    eye = torch.eye(k, dtype=torch.float64, device=dev)
    return torch.linalg.solve(A + lam[:, :, None] * eye, b + lam * c.to(dev).double()).float().to(w.device)


BATCHED_SOLVE_MAX = 128


def solve_systems(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """torch.linalg.solve of a batch of systems A [n, k, k], B [n, k]. torch 2.13's batched CPU solve (MKL) fails
    ("Pivots given to lu_solve must all be greater or equal to 1") or never returns for k of about 150 and more
    (a 7B's ffn_down has 172 scales per row): those systems are solved one at a time, the same LAPACK calls."""
    if A.shape[-1] <= BATCHED_SOLVE_MAX or A.device.type != "cpu":
        return torch.linalg.solve(A, B)
    return torch.stack([torch.linalg.solve(a, b) for a, b in zip(A, B)])


def refit_scales(w, cv, d, H, ridge: float = 1e-6, chunk: int = 512, wH=None) -> torch.Tensor:
    """Block scales d [rows, cols/64] minimising the same error for Wq[r, j] = d[r, j // 64] * cv[r, j] (one
    (cols/64)-sized system per row: the blocks of a row interact through H). Rows are solved `chunk` at a time:
    a 7B's ffn_down has 4096 systems of 172 x 172 (1 GB in float64 at once). wH: W @ H, if known."""
    rows, cols = w.shape
    nb = cols // QK
    wH = w @ H if wH is None else wH
    dev = float64_device()  # the systems (float64)
    out = []
    for r0 in range(0, rows, chunk):
        r = slice(r0, min(r0 + chunk, rows))
        S = torch.empty(r.stop - r0, nb, nb, dtype=torch.float64, device=dev)
        for blk in range(nb):
            sl = slice(blk * QK, (blk + 1) * QK)
            hv = (cv[r, sl] @ H[sl, :]) * cv[r]                   # [rows, cols]: (H V_r)[:, blk], weighted by v
            S[:, :, blk] = hv.view(-1, nb, QK).sum(2).to(dev).double()
        t = (cv[r] * wH[r]).view(-1, nb, QK).sum(2).to(dev).double()
        lam = ridge * S.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)[:, None]
        S += lam[:, :, None] * torch.eye(nb, dtype=torch.float64, device=dev)
        out.append(solve_systems(S, t + lam * d[r].to(dev).double()).float().to(w.device))
    return torch.cat(out)


def mapping_sweep(w, pos, dx, c, grp, H, plain: bool = False, step: int = 128) -> torch.Tensor:
    """One sweep of exact coordinate descent on the indices (sorted positions pos [rows, cols], codebooks c sorted):
    column by column, each weight takes the codeword that lowers tr(E H E^T) most given all other weights, among its
    two neighbours (or all codewords if plain); the error gradient G = E H follows every move in the columns still to
    come (within a batch of `step` columns at once, beyond it by one product per batch, as GPTQ's lazy updates; the
    columns passed are never read again). Never raises the error."""
    rows, cols = w.shape
    k = c.shape[1]
    cg = c[grp]                                                  # [rows, K]
    pos = pos.clone()
    E = w - dx * cg.gather(1, pos)
    G = E @ H                                                    # d/dE of tr(E H E^T) / 2
    del E
    hd = torch.diagonal(H)
    offsets = (torch.arange(k) if plain else torch.tensor([-1, 1])).to(w.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of small ops: threads only add overhead (as in gptq.assign_gptq)
    try:
        _sweep_columns(pos, G, H, hd, dx, cg, offsets, plain, step, threads)
    finally:
        torch.set_num_threads(threads)
    return pos


def _sweep_columns(pos, G, H, hd, dx, cg, offsets, plain, step, threads: int) -> None:
    """Columns in batches of `step`, on one thread; a move updates G only where the sweep has still to look (the
    batch's later columns, then the later batches in one matrix product on all threads, as gptq._round_columns)."""
    rows, cols = pos.shape
    k = cg.shape[1]
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        dE = torch.zeros(rows, i2 - i1, device=G.device)
        G1 = G[:, i1:i2].clone()  # the batch's columns, contiguous
        for j in range(i1, i2):
            p = pos[:, j]
            cand = (offsets.expand(rows, -1) if plain else p[:, None] + offsets[None, :]).clamp(0, k - 1)
            delta = dx[:, j, None] * (cg.gather(1, cand) - cg.gather(1, p[:, None]))   # weight change of each move
            gain = -2 * delta * G1[:, j - i1, None] + delta.pow(2) * hd[j]    # loss change: E_j -> E_j - delta
            best, arg = gain.min(1)
            move = best < 0
            dj = torch.where(move, delta.gather(1, arg[:, None])[:, 0], torch.zeros_like(best))
            pos[:, j] = torch.where(move, cand.gather(1, arg[:, None])[:, 0], p)
            G1[:, j + 1 - i1:] -= dj[:, None] * H[j, j + 1:i2][None, :]
            dE[:, j - i1] = dj
        torch.set_num_threads(threads)
        G[:, i2:] -= dE @ H[i1:i2, i2:]
        torch.set_num_threads(1)


def learn_layer(w: np.ndarray, idx: np.ndarray, d: np.ndarray, cb: np.ndarray, bounds: np.ndarray, H: np.ndarray,
                rounds: int = 2, mappings: str = "proximal", shrink: float = SHRINK
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, LayerStats]:
    """Entry point of layer-wise learning. (idx, d float16, int8 codebooks sorted, stats) for one matrix's stored
    rows w after its rounding (idx, d, cb: pack's format), H its input Hessian in w's column order. Each round
    refits the codebooks, then the block scales (least squares; rounded to int8 and float16 as stored, kept only if
    the error falls), then, unless mappings is 'off', sweeps the indices once (mapping_sweep). The error is taken
    under (1 - shrink) H + shrink diag(H): with the calibration's full H the index sweep fitted its input
    correlations and raised perplexity on other text (docs/ALGORITHM.md); the losses reported are of that matrix."""
    from .pack import group_of_rows

    if mappings not in MAPPINGS:
        raise ValueError(f"mappings must be one of {MAPPINGS}, not {mappings!r}")
    rows, cols = w.shape
    dev = device()
    grp_np = group_of_rows(bounds, rows)
    grp = torch.as_tensor(grp_np).to(dev)
    H = np.asarray(H, dtype=np.float32)
    Ht = (1 - shrink) * H   # + shrink diag(H), added in place (a 7B's ffn_down H is 0.5 GB in float32)
    diagonal = np.arange(cols)
    Ht[diagonal, diagonal] += shrink * np.diag(H)
    del H
    Ht = torch.as_tensor(Ht).to(dev)
    W = torch.as_tensor(np.asarray(w, dtype=np.float32)).to(dev, copy=True)
    W[:, torch.diagonal(Ht) <= 0] = 0          # as GPTQ: columns no input reaches
    order = np.argsort(cb, axis=1, kind="stable")                # work on sorted codebooks and sorted positions
    cb8 = np.take_along_axis(np.asarray(cb, np.int8), order, axis=1)
    pos = torch.as_tensor(np.take_along_axis(np.argsort(order, axis=1)[grp_np], idx.astype(np.int64), axis=1)).to(dev)
    d16 = np.asarray(d, np.float16)

    def value(pos_, d16_, cb8_):
        cv = to_device(cb8_)[grp].gather(1, pos_)
        return to_device(d16_).repeat_interleave(QK, dim=1) * cv

    WH = W @ Ht  # kept: every refit and loss below reads it (4 products of W's size a round fewer)
    scale = (WH * W).sum()
    loss = before = layer_loss(W, value(pos, d16, cb8), Ht, scale)
    start = pos.to(torch.uint8)  # (positions < 16; int64 would be 0.36 GB for a 7B's ffn matrix)
    label = np.broadcast_to(np.arange(cb8.shape[1]), cb8.shape)    # the starting position of each codeword
    for _ in range(rounds):
        dx = to_device(d16).repeat_interleave(QK, dim=1)
        c = refit_codebooks(W, pos, dx, to_device(cb8), grp, Ht, wH=WH).cpu().numpy()
        del dx  # (each [rows, cols] working array of a 7B's ffn matrix is 0.2-0.4 GB: none kept past its use)
        m = np.abs(c).max(axis=1)
        m = np.where(m > 0, m, 1)
        c8 = np.round(c / m[:, None] * 127).clip(-127, 127).astype(np.int8)
        srt = np.argsort(c8, axis=1, kind="stable")                 # a refit may reorder codewords: re-sort
        c8 = np.take_along_axis(c8, srt, axis=1)
        pos_t = torch.as_tensor(np.argsort(srt, axis=1)).to(dev)[grp].gather(1, pos)
        cv = to_device(c8)[grp].gather(1, pos_t)
        d_new = refit_scales(W, cv, to_device(d16.astype(np.float32) * (m / 127)[grp_np, None]), Ht, wH=WH)
        d_new = d_new.cpu().numpy().astype(np.float16)
        del cv
        trial = layer_loss(W, value(pos_t, d_new, c8), Ht, scale)
        if trial < loss:
            pos, d16, cb8, loss = pos_t, d_new, c8, trial
            label = np.take_along_axis(label, srt, axis=1)
        del pos_t
        if mappings == "off":
            continue
        dx = to_device(d16).repeat_interleave(QK, dim=1)
        new = mapping_sweep(W, pos, dx, to_device(cb8), grp, Ht, plain=mappings == "plain")
        del dx
        trial = layer_loss(W, value(new, d16, cb8), Ht, scale)
        if trial < loss:
            pos, loss = new, trial
        del new
    changed = int((torch.as_tensor(label).to(dev)[grp].gather(1, pos) != start).sum())
    # sorted positions are the stored indices of the sorted codebooks
    return pos.cpu().numpy().astype(np.uint8), d16, cb8, LayerStats(before, loss, changed, idx.size)
