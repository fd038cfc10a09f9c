"""Row orders without overhead where the network allows it.

Grouping re-orders a matrix's rows. Where the following layer can absorb the order, it is folded:
- `ffn_gate` and `ffn_up` rows share one order (from both matrices' row profiles) and `ffn_down`'s
  columns take the same order, since SwiGLU acts element-wise on the intermediate neurons;
- `attn_v` rows are re-ordered within each KV head, and the columns of `attn_output` that read each
  query head take the order of the KV head it attends with (grouped-query attention);
- a bias of a folded matrix (`attn_v`, `ffn_gate`, `ffn_up`: Llama's `attention_bias`, `mlp_bias`) follows its rows.
Everything else (`attn_q`/`attn_k`, whose rows RoPE pairs by position; `attn_output`/`ffn_down`, which
write the residual stream; `token_embd`/`output`, indexed by token) keeps its order in a stored
permutation, `W.jlcm_perm`, that the runtime applies as a scatter.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .group import group_rows, row_profiles
from .model import Hparams


@dataclass
class RowOrder:
    order: np.ndarray          # stored row i is original row order[i]
    bounds: np.ndarray         # exclusive end of each group, in stored rows
    stored: bool               # True: written as W.jlcm_perm; False: folded into neighbours


@dataclass
class FoldResult:
    tensors: dict                              # matrices in stored row order, neighbours folded
    hessians: dict                             # input Hessian diagonals, columns in the new order
    orders: dict = field(default_factory=dict)  # weight name -> RowOrder
    columns: dict = field(default_factory=dict)  # weight name -> the column order folded into it


def _own(w: np.ndarray, h, n_groups: int, seed: int, stored: bool = True) -> RowOrder:
    order, bounds = group_rows(row_profiles(w, h), n_groups, seed)
    return RowOrder(order, bounds, stored)


def fold_layer(tensors: dict, hessians: dict, bid: int, hp: Hparams, n_groups: int, seed: int,
               quantized: set[str]) -> FoldResult:
    """Groups and orders the rows of layer bid's quantized matrices (names in `quantized`). Returns new
    dicts; the inputs are not modified."""
    p = f"blk.{bid}."
    t = dict(tensors)
    hs = dict(hessians)
    res = FoldResult(t, hs)
    W = lambda n: p + n + ".weight"  # noqa: E731

    # ffn: one order for gate and up rows, folded into down's columns
    if W("ffn_gate") in quantized and W("ffn_up") in quantized:
        h_in = hs.get(p + "ffn_gate")
        prof = np.concatenate([row_profiles(t[W("ffn_gate")], h_in), row_profiles(t[W("ffn_up")], h_in)], axis=1)
        order, bounds = group_rows(prof, n_groups, seed)
        ro = RowOrder(order, bounds, stored=False)
        t[W("ffn_gate")], t[W("ffn_up")] = t[W("ffn_gate")][order], t[W("ffn_up")][order]
        for n in ("ffn_gate", "ffn_up"):
            if p + n + ".bias" in t:
                t[p + n + ".bias"] = t[p + n + ".bias"][order]
        t[W("ffn_down")] = t[W("ffn_down")][:, order]
        res.columns[W("ffn_down")] = order
        if p + "ffn_down" in hs:
            hs[p + "ffn_down"] = hs[p + "ffn_down"][order]
        res.orders[W("ffn_gate")] = res.orders[W("ffn_up")] = ro

    # attn_v: per KV head, folded into the attn_output columns of the query heads that use it
    if W("attn_v") in quantized:
        hd = hp.head_dim
        g_head = max(1, n_groups // hp.n_head_kv)
        v = t[W("attn_v")]
        h_in = hs.get(p + "attn_v")
        orders, bounds, start = [], [], 0
        for kv in range(hp.n_head_kv):
            o, b = group_rows(row_profiles(v[kv * hd:(kv + 1) * hd], h_in), g_head, seed + kv)
            orders.append(kv * hd + o)
            bounds.extend(start + b)
            start += hd
        order = np.concatenate(orders)
        t[W("attn_v")] = v[order]
        if p + "attn_v.bias" in t:
            t[p + "attn_v.bias"] = t[p + "attn_v.bias"][order]
        rep = hp.n_head // hp.n_head_kv
        col = np.concatenate([qh * hd + (orders[qh // rep] - (qh // rep) * hd) for qh in range(hp.n_head)])
        t[W("attn_output")] = t[W("attn_output")][:, col]
        res.columns[W("attn_output")] = col
        if p + "attn_output" in hs:
            hs[p + "attn_output"] = hs[p + "attn_output"][col]
        res.orders[W("attn_v")] = RowOrder(order, np.asarray(bounds, dtype=np.int32), stored=False)

    # the rest keep their own order in a stored permutation (after the folds above changed their columns)
    for n in ("attn_q", "attn_k", "attn_output", "ffn_down"):
        if W(n) in quantized:
            ro = _own(t[W(n)], hs.get(p + n), n_groups, seed)
            t[W(n)] = t[W(n)][ro.order]
            res.orders[W(n)] = ro
    # remaining quantized matrices of the layer (e.g. gate without up) get a stored order too
    for name in sorted(quantized):
        if name.startswith(p) and name not in res.orders:
            ro = _own(t[name], hs.get(name.removesuffix(".weight")), n_groups, seed)
            t[name] = t[name][ro.order]
            res.orders[name] = ro
    return res


def fold_global(tensors: dict, hessians: dict, name: str, n_groups: int, seed: int) -> RowOrder:
    """token_embd / output: rows grouped with a stored permutation; columns read the final-norm output."""
    h = hessians.get("output")
    ro = _own(tensors[name], h, n_groups, seed)
    return ro


def logical(stored: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The original-order matrix of a stored one (what the runtime's scatter computes with)."""
    out = np.empty_like(stored)
    out[order] = stored
    return out


def companion_layout(name: str, rows: int, hp: Hparams, n_groups: int, quantized: set[str]) -> tuple[int, bool]:
    """(number of groups, stored permutation?) that fold_layer / fold_global give `name`, known before any
    grouping runs, so a size budget can be planned exactly. Mirrors the rules above."""
    own = (max(1, min(n_groups, rows)), True)
    if not name.startswith("blk."):
        return own
    p, kind = name.rsplit(".", 2)[0] + ".", name.rsplit(".", 2)[1]
    if kind in ("ffn_gate", "ffn_up") and p + "ffn_gate.weight" in quantized and p + "ffn_up.weight" in quantized:
        return own[0], False
    if kind == "attn_v":
        g_head = max(1, n_groups // hp.n_head_kv)
        return hp.n_head_kv * max(1, min(g_head, hp.head_dim)), False
    return own
