"""The learning step: the proximal straight-through surrogate behaves as docs/ALGORITHM.md says, and
learning lowers a block's reconstruction loss."""
from __future__ import annotations

import numpy as np
import torch

from jlcm_gguf import model as M
from jlcm_gguf.init import init_codebooks
from jlcm_gguf.learn import CodebookWeight, clip_moves, finalize, learn_block, make_param, proximal_moves
from jlcm_gguf.pack import assign, dequantize, pack_blocks


def _one_row(cb_vals, idx, g, mappings):
    cb = torch.tensor([cb_vals], dtype=torch.float32, requires_grad=True)
    u = torch.full((1, 64), float(idx), requires_grad=True)
    d = torch.ones(1, 1, requires_grad=True)
    w = CodebookWeight.apply(u, cb, d, torch.zeros(1, dtype=torch.long), mappings)
    (w * g).sum().backward()
    return u.grad[0, 0].item() if u.grad is not None else None, cb.grad, d.grad


def test_mapping_gradients_by_mode():
    cb = [-100.0, -10.0, 10.0, 100.0]  # gaps 90, 20, 90
    # L = g * w with g = -1: the proximal step gets G = dL/dc itself, the plain STE G times the gap it would cross
    assert _one_row(cb, 1, -1.0, "proximal")[0] == -1.0
    assert _one_row(cb, 1, -1.0, "plain")[0] == -20.0
    assert _one_row(cb, 2, -1.0, "plain")[0] == -90.0
    assert _one_row(cb, 1, -1.0, "off")[0] is None


def test_exact_gradients_of_codebook_and_scale():
    _, gcb, gd = _one_row([-3.0, -1.0, 1.0, 3.0], 2, 0.5, "proximal")
    assert torch.allclose(gcb, torch.tensor([[0.0, 0.0, 0.5 * 64, 0.0]]))  # dL/dc = sum g * d
    assert torch.allclose(gd, torch.tensor([[0.5 * 1.0 * 64]]))              # dL/dd = sum g * c


def test_moves_at_most_one_codeword_per_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 128)).astype(np.float32)
    b = np.array([8], dtype=np.int32)
    cb = init_codebooks(w, None, b, 3)
    idx, d = assign(w, 3, cb, b)
    p = make_param("w", idx, d, cb, b)
    before = p.u.detach().round()
    with torch.no_grad():
        p.u.add_(torch.tensor(rng.uniform(-5, 5, size=p.u.shape), dtype=torch.float32))  # a huge step
    clip_moves([p], [before])
    moved = (p.u.detach().round() - before).abs()
    assert moved.max() <= 1 and moved.sum() > 0


def _tiny_block(rng, n_embd=64, n_ff=128):
    hp = M.Hparams(n_layer=1, n_embd=n_embd, n_head=4, n_head_kv=2, n_ff=n_ff, rms_eps=1e-5, rope_base=10000.0)
    kv = n_embd // 4 * 2
    shapes = {"attn_q": (n_embd, n_embd), "attn_k": (kv, n_embd), "attn_v": (kv, n_embd),
              "attn_output": (n_embd, n_embd), "ffn_gate": (n_ff, n_embd), "ffn_up": (n_ff, n_embd),
              "ffn_down": (n_embd, n_ff)}
    t = {f"blk.0.{n}.weight": (rng.standard_normal(s) * 0.2).astype(np.float32) for n, s in shapes.items()}
    t["blk.0.attn_norm.weight"] = np.ones(n_embd, np.float32)
    t["blk.0.ffn_norm.weight"] = np.ones(n_embd, np.float32)
    return hp, t


def _learn_tiny(seed: int, steps: int, mappings: str = "proximal"):
    rng = np.random.default_rng(seed)
    hp, t = _tiny_block(rng)
    torch.manual_seed(seed)
    x = torch.randn(6, 32, hp.n_embd)
    with torch.no_grad():
        y = torch.stack([M.block_forward(xi, t, 0, hp) for xi in x])
    params = []
    for n, w in t.items():
        if w.ndim == 2:
            b = np.array([w.shape[0] // 2, w.shape[0]], dtype=np.int32)
            cb = init_codebooks(w, None, b, 2)
            idx, d = assign(w, 2, cb, b)
            params.append(make_param(n, idx, d, cb, b))

    def block_fn(weights, xx):
        tt = dict(t)
        tt.update(weights)
        return M.block_forward(xx, tt, 0, hp)

    def full_loss():
        with torch.no_grad():
            ws = {p.name: p.weight() for p in params}
            return float(sum((block_fn(ws, x[j]) - y[j]).pow(2).mean() for j in range(len(x))) / y.pow(2).mean() / len(x))

    before = full_loss()
    stats = learn_block(block_fn, params, x, y, steps, batch=3, seed=seed, mappings=mappings)
    return before, full_loss(), params, stats


def test_learning_lowers_block_loss():
    before, after, params, stats = _learn_tiny(seed=1, steps=60)
    assert stats.changed > 0 and stats.accepted > 0
    assert after < 0.85 * before, (before, after)
    # finalize gives int8 codebooks and fp16 scales that pack and dequantize to the learned weights
    p = params[0]
    idx, d, cb8 = finalize(p)
    cols = p.u.shape[1]
    bounds = np.array([p.u.shape[0] // 2, p.u.shape[0]], dtype=np.int32)
    wq = dequantize(pack_blocks(idx, d, 2), 2, cols, cb8, bounds)
    w_learned = p.weight().detach().numpy()
    assert np.sqrt(np.mean((wq - w_learned) ** 2)) < 0.02 * np.sqrt(np.mean(w_learned ** 2))


def test_learning_is_deterministic():
    a = _learn_tiny(seed=2, steps=10)[1]
    b = _learn_tiny(seed=2, steps=10)[1]
    assert a == b


def test_normed_learn_loss_compares_what_the_next_norm_passes_on():
    """--learn-loss normed: a block's output is compared after the next block's attention RMSNorm (the head's
    after the last block), so a channel many times larger than the rest no longer owns the loss."""
    from jlcm_gguf.blocks import learn_loss_norm
    from jlcm_gguf.convert import Options
    from jlcm_gguf.model import Hparams

    hp = Hparams(n_embd=4, n_head=1, n_head_kv=1, n_layer=2, n_ff=8, rms_eps=1e-6, rope_base=1e4)
    tensors = {"blk.1.attn_norm.weight": np.array([1.0, 2.0, 0.5, 0.01], np.float32),
               "output_norm.weight": np.array([3.0, 1.0, 1.0, 1.0], np.float32)}
    y = torch.tensor([[1.0, -2.0, 0.5, 400.0]])
    assert learn_loss_norm(Options(model=None, outfile=None), tensors, 0, hp)(y) is y
    normed = Options(model=None, outfile=None, learn_loss="normed")
    rms = float(y.pow(2).mean().sqrt())
    assert torch.allclose(learn_loss_norm(normed, tensors, 0, hp)(y), y / rms * torch.tensor([1.0, 2.0, 0.5, 0.01]), rtol=1e-5)
    assert torch.allclose(learn_loss_norm(normed, tensors, 1, hp)(y), y / rms * torch.tensor([3.0, 1.0, 1.0, 1.0]), rtol=1e-5)
    # an error of 1 in the large channel and one of 1 in a small channel: the residual loss weighs them alike,
    # after the norm the small channel's counts far more (gain 0.5 against 0.01)
    f = learn_loss_norm(normed, tensors, 0, hp)
    big = (f(y + torch.tensor([0.0, 0.0, 0.0, 1.0])) - f(y)).pow(2).sum()
    small = (f(y + torch.tensor([0.0, 0.0, 1.0, 0.0])) - f(y)).pow(2).sum()
    assert small > 100 * big


def _least_squares(seed=0, rows=32, cols=128, k=4):
    """W* on a known codebook grid; the start moves a quarter of its indices one codeword off (some at the
    codebook's ends stay). Loss ||(W - W*) X||^2: the known optimum is W* itself."""
    rng = np.random.default_rng(seed)
    cb = np.sort(rng.choice(np.arange(-127, 128), k, replace=False)).astype(np.int8)[None, :]
    bounds = np.array([rows], dtype=np.int32)
    best = rng.integers(0, k, (rows, cols))
    d = np.full((rows, cols // 64), 0.01, np.float32)
    start = best.copy()
    off = rng.random((rows, cols)) < 0.25
    start[off] = np.clip(best[off] + rng.choice([-1, 1], off.sum()), 0, k - 1)
    x = torch.tensor(rng.standard_normal((8, 48, cols)), dtype=torch.float32)
    w_star = torch.tensor(0.01 * cb[0][best], dtype=torch.float32)
    y = x @ w_star.T
    p = make_param("w", start.astype(np.uint8), d, cb, bounds, h=np.ones(cols, np.float32))
    return p, x, y, best, start

def _linear(weights, xx):
    return xx @ weights["w"].T


def test_proximal_update_moves_to_the_known_optimum_one_codeword_at_a_time():
    p, x, y, best, start = _least_squares()
    seen = [p.u.detach().round().clone()]
    stats = learn_block(_linear, [p], x, y, steps=80, lr_cb=0.0, lr_d=0.0, batch=4, mappings="proximal",
                        progress=lambda step, loss: seen.append(p.u.detach().round().clone()))
    steps = torch.stack(seen)
    assert (steps[1:] - steps[:-1]).abs().max() <= 1, "an index jumped more than one codeword in a step"
    wrong_before = int((start != best).sum())
    wrong_after = int((p.indices() != best).sum())
    assert wrong_before > 500
    assert wrong_after < 0.1 * wrong_before, (wrong_before, wrong_after)
    assert stats.losses[-1] < 0.05 * stats.losses[0]
    assert stats.changed == int((p.indices() != start).sum()) > 0


def test_proximal_update_leaves_the_optimum_alone():
    """At the optimum no move lowers the loss: nothing moves (every trial is rejected)."""
    p, x, y, best, _ = _least_squares(seed=1)
    with torch.no_grad():
        p.u.copy_(torch.tensor(best, dtype=torch.float32))
        p.start.copy_(p.u)
    stats = learn_block(_linear, [p], x, y, steps=20, lr_cb=0.0, lr_d=0.0, mappings="proximal")
    assert stats.changed == 0 and stats.accepted == 0


def test_proximal_scores_prefer_small_moves():
    """Same gradient, a near and a far neighbour: only the move across the small gap is proposed."""
    cb = np.array([[-100, -10, 10, 100]], np.int8)
    p = make_param("w", np.array([[1] * 64, [2] * 64], np.uint8), np.ones((2, 1), np.float32), cb,
                   np.array([2], np.int32))
    p.u.grad = torch.full((2, 64), -1.0)   # dL/dc < 0: both rows want larger values
    p.row_curv = torch.full((2,), 0.05)     # loss change of a move: -gap + 0.025 gap^2: -10 for 20, +112 for 90
    pos, move = proximal_moves(p, frac=1.0)
    # row 0 (gap 20) moves, row 1 (gap 90) does not; at most one move per row and per column in a step
    assert len(pos) == 1 and torch.all(pos < 64) and torch.all(move == 1)
    p.row_curv = None                       # first order only, the far move looks better (-90 against -20)
    pos, _ = proximal_moves(p, frac=1.0)
    assert len(pos) == 1 and pos[0] >= 64


def test_mapping_modes_move_or_not():
    off = _learn_tiny(seed=3, steps=15, mappings="off")[3]
    plain = _learn_tiny(seed=3, steps=30, mappings="plain")[3]
    prox = _learn_tiny(seed=3, steps=15, mappings="proximal")[3]
    assert off.changed == 0
    assert plain.changed > 0 and prox.changed > 0


def test_auto_tune_steps_by_model_size_and_windows():
    from jlcm_gguf.convert import AUTO_TUNE_STEPS, auto_tune_steps
    t135m = {"a": np.zeros((135_000, 1000), np.float16)}
    assert auto_tune_steps(t135m, 32) == AUTO_TUNE_STEPS
    assert auto_tune_steps(t135m, 8) == 0                                  # too few windows to hold some out
    assert auto_tune_steps({"a": np.zeros((50_000, 1000), np.float16)}, 32) == 0     # test-sized
    assert auto_tune_steps({"a": np.zeros((1_600_000, 1000), np.float16)}, 32) == 0  # 1.6B: hours on a CPU


def _tiny_model(seed: int = 0, n_layer: int = 2, vocab: int = 96, moved: float = 0.05, windows: int = 64):
    """A two-block model whose layer matrices are exactly 2-bit JLCM weights (the float model the tuning matches),
    quantized to specs whose indices are `moved` of the way off by one codeword (a known optimum to return to),
    and random calibration windows. Returns (tensors, specs, hp, tokens, optimal indices)."""
    rng = np.random.default_rng(seed)
    hp, t = _tiny_block(rng)
    hp.n_layer = n_layer
    for bid in range(1, n_layer):
        t.update({k.replace("blk.0.", f"blk.{bid}."): (v if v.ndim == 1 else rng.standard_normal(v.shape) * 0.2)
                  .astype(np.float32) for k, v in list(t.items()) if k.startswith("blk.0.")})
    t["token_embd.weight"] = (0.3 * rng.standard_normal((vocab, hp.n_embd))).astype(np.float32)
    t["output_norm.weight"] = np.ones(hp.n_embd, np.float32)
    jlcm, best = {}, {}
    for n, w in list(t.items()):
        if n.startswith("blk.") and w.ndim == 2:
            b = np.array([w.shape[0] // 2, w.shape[0]], dtype=np.int32)
            cb = init_codebooks(w, None, b, 2)
            idx, d = assign(w, 2, cb, b)
            t[n] = dequantize(pack_blocks(idx, d, 2), 2, w.shape[1], cb, b)
            best[n] = idx
            rank = np.argsort(np.argsort(cb, axis=1), axis=1)[np.searchsorted(b, np.arange(w.shape[0]), side="right")]
            order = np.argsort(cb, axis=1)[np.searchsorted(b, np.arange(w.shape[0]), side="right")]
            r = np.take_along_axis(rank, idx.astype(np.int64), axis=1)           # sorted position of each index
            step = np.where(rng.random(r.shape) < moved, rng.choice([-1, 1], r.shape), 0)
            r = np.clip(r + step, 0, 3)
            start = np.take_along_axis(order, r, axis=1).astype(np.uint8)
            jlcm[n] = dict(packed=pack_blocks(start, d, 2), bits=2, codebooks=cb, bounds=b, perm=None)
    tokens = rng.integers(0, vocab, size=(windows, 24))
    return t, jlcm, hp, tokens, best


def _tune(mappings: str, steps: int = 8, **kw):
    from jlcm_gguf.tune import tune_end_to_end
    t, jlcm, hp, tokens, best = _tiny_model()
    res = tune_end_to_end(t, jlcm, {}, {}, hp, tokens, steps, batch=2, held_out=3, mappings=mappings, **kw)
    return res, jlcm, best, t


def _wrong(jlcm: dict, best: dict) -> int:
    from jlcm_gguf.pack import unpack_blocks
    return sum(int((unpack_blocks(s["packed"], 2, best[n].shape[1])[0] != best[n]).sum()) for n, s in jlcm.items())


def test_tuning_mapping_update_moves_one_codeword_and_keeps_only_what_lowers_the_loss(monkeypatch):
    """End-to-end tuning's proximal mapping update (without the confidence shrinkage, so that moves are proposed
    on this noisy toy): indices move at most one codeword per step, a step's moves are kept exactly when they
    lowered its batch's KL, and the report counts the moved indices. With 'off' no index moves."""
    from jlcm_gguf import tune
    seen = []
    clip = tune.clip_moves

    def watch(params, before):
        clip(params, before)
        seen.append(max(float((p.u.detach().round() - b).abs().max()) for p, b in zip(params, before)))
    monkeypatch.setattr(tune, "clip_moves", watch)
    frozen = dict(lr_cb=0.0, lr_d=0.0, lr_float=0.0)          # only the mappings change the model
    t, jlcm, hp, tokens, best = _tiny_model()
    wrong_before = _wrong(jlcm, best)
    res, jlcm, best, _ = _tune("proximal", steps=20, move_frac=1e-3, confidence=0.0, **frozen)
    assert max(seen) == 1
    trials = res["mapping_trials"]
    assert len(trials) == res["mapping_steps_accepted"] + res["mapping_steps_rejected"] > 0
    assert sum(tr["actual"] < 0 for tr in trials) == res["mapping_steps_accepted"] > 0
    # kept moves lowered the held-out KL too here (2.25 -> 2.16 with 84 indices moved): the written indices moved
    assert res["kept"] and res["indices_changed"] > 0 and _wrong(jlcm, best) != wrong_before
    off, jlcm_off, _, _ = _tune("off", steps=20, **frozen)
    assert off["indices_changed"] == 0 and off["mapping_steps_accepted"] == 0 and not off["mapping_trials"]
    assert _wrong(jlcm_off, best) == wrong_before


def test_tuning_mapping_proposals_need_a_significant_gradient():
    """With the default confidence (the gradient's mean shrunk by two standard errors) pure noise proposes nothing:
    the toy's gradients carry no significant signal, and no trial is made."""
    res = _tune("proximal", steps=12, move_frac=1e-3, lr_cb=0.0, lr_d=0.0, lr_float=0.0)[0]
    assert res["mapping_trials"] == [] and res["indices_changed"] == 0


def test_tuning_resumes_exactly(tmp_path, monkeypatch):
    """A tuning run interrupted after its state was saved, then resumed, ends with the same bytes as an
    uninterrupted run."""
    from jlcm_gguf import tune
    ref, jlcm_ref, _, t_ref = _tune("proximal", steps=6, move_frac=1e-3, confidence=0.0)
    ckpt = tmp_path / "tune.pt"
    calls = {"n": 0}
    clip = tune.clip_moves

    def interrupt_in_step_5(*a):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return clip(*a)
    monkeypatch.setattr(tune, "clip_moves", interrupt_in_step_5)
    try:
        _tune("proximal", steps=6, move_frac=1e-3, confidence=0.0, checkpoint=ckpt, key="k", save_every=0)
        raise AssertionError("not interrupted")
    except KeyboardInterrupt:
        pass
    assert ckpt.exists() and torch.load(ckpt, weights_only=False)["done"] == 4
    monkeypatch.setattr(tune, "clip_moves", clip)
    res, jlcm, _, t = _tune("proximal", steps=6, move_frac=1e-3, confidence=0.0, checkpoint=ckpt, key="k")
    for n, s in jlcm_ref.items():
        assert np.array_equal(s["packed"], jlcm[n]["packed"]) and np.array_equal(s["codebooks"], jlcm[n]["codebooks"])
    for n in t_ref:
        assert np.array_equal(t_ref[n], t[n]), n
    assert res["kl_after"] == ref["kl_after"] and res["indices_changed"] == ref["indices_changed"]
    # a state saved under another key (other settings) is not resumed
    other, _, _, _ = _tune("proximal", steps=6, move_frac=1e-3, confidence=0.0, checkpoint=ckpt, key="other")
    assert other["kl_after"] == ref["kl_after"]


def test_chat_calibration_windows_follow_the_chat_template(smollm2, tmp_path):
    """--tune-chat windows: conversations in the model's own template (a user turn with a passage of the
    calibration text, the assistant turn continuing it), packed into windows of the requested length, seeded;
    a tokenizer without a chat template gives none."""
    from transformers import AutoTokenizer

    from jlcm_gguf.calib import chat_calibration_tokens
    tok = AutoTokenizer.from_pretrained(str(smollm2))
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(" ".join(f"w{p}x{i}" for i in range(60)) for p in range(20)))
    w = chat_calibration_tokens(text, tok, 3, 200, seed=0)
    assert w.shape == (3, 200) and w.dtype == np.int64
    assert np.array_equal(w, chat_calibration_tokens(text, tok, 3, 200, seed=0))
    first = tok.decode(w[0])
    assert first.startswith("<|im_start|>system") and "<|im_start|>user\n" in first
    assert "<|im_start|>assistant\n" in first and "<|im_end|>" in first
    # the assistant continues the passage the user quoted: its first word follows the user's last one
    user = first.split("<|im_start|>user\n")[1].split("<|im_end|>")[0].split()[-1]
    reply = first.split("<|im_start|>assistant\n")[1].split()[0]
    p, i = user.split("x")
    assert reply == f"{p}x{int(i) + 1}"
    tok.chat_template = None
    assert chat_calibration_tokens(text, tok, 3, 200, seed=0) is None


# --- layer-wise learning (learn.learn_layer): alternating exact steps on tr((W - Wq) H (W - Wq)^T) ---

def _layer_problem(rows=128, cols=256, bits=2, seed=0):
    from jlcm_gguf.gptq import assign_gptq
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((1024, cols)).astype(np.float32) * np.exp(rng.standard_normal(cols)).astype(np.float32)
    X += 0.5 * X[:, [0]]                                   # correlated inputs: GPTQ's and the sweep's cross terms matter
    H = X.T @ X / len(X)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    bounds = np.array([rows // 2, rows])
    cb = init_codebooks(w, np.diag(H), bounds, bits)
    idx, d = assign_gptq(w, bits, cb, bounds, H)
    return w, H, bounds, cb, idx, d


def _stored_loss(w, H, idx, d, cb, bounds, bits):
    wq = dequantize(pack_blocks(idx, d, bits), bits, w.shape[1], cb, bounds)
    e = w - wq
    return float(np.sum((e @ H) * e) / np.sum((w @ H) * w))


def test_mapping_sweep_finds_the_nearest_codewords_when_inputs_are_independent():
    """With H diagonal the error separates by weight: the optimum is each weight's nearest codeword. Started one
    codeword off everywhere, one proximal sweep reaches it, moving each index by exactly one."""
    from jlcm_gguf.learn import mapping_sweep
    g = torch.Generator().manual_seed(0)
    rows, cols = 8, 128
    c = torch.tensor([[-3.0, -1.0, 1.0, 3.0]])
    grp = torch.zeros(rows, dtype=torch.long)
    best = torch.randint(0, 4, (rows, cols), generator=g)
    w = c[0][best] + 0.2 * (torch.rand(rows, cols, generator=g) - 0.5)
    start = torch.where(best == 0, best + 1, best - 1)
    H = torch.diag(torch.rand(cols, generator=g) + 0.5)
    pos = mapping_sweep(w, start, torch.ones(rows, cols), c, grp, H)
    assert torch.equal(pos, best)
    assert int((pos - start).abs().max()) == 1


def test_mapping_sweep_never_raises_the_error_and_moves_one_codeword():
    from jlcm_gguf.learn import layer_loss, mapping_sweep
    from jlcm_gguf.pack import group_of_rows
    w, H, bounds, cb, idx, d = _layer_problem()
    grp = torch.as_tensor(group_of_rows(bounds, w.shape[0]))
    c = torch.as_tensor(np.sort(cb, axis=1).astype(np.float32))
    rank = np.argsort(np.argsort(cb, axis=1, kind="stable"), axis=1)
    pos = torch.as_tensor(np.take_along_axis(rank[grp.numpy()], idx.astype(np.int64), axis=1))
    # start from a worse mapping: a quarter of the indices pushed one codeword up
    g = torch.Generator().manual_seed(1)
    pos = torch.where(torch.rand(pos.shape, generator=g) < 0.25, (pos + 1).clamp(max=3), pos)
    dx = torch.as_tensor(d.astype(np.float32)).repeat_interleave(64, dim=1)
    W, Ht = torch.as_tensor(w), torch.as_tensor(H)
    before = layer_loss(W, dx * c[grp].gather(1, pos), Ht)
    new = mapping_sweep(W, pos, dx, c, grp, Ht)
    after = layer_loss(W, dx * c[grp].gather(1, new), Ht)
    assert after < 0.9 * before
    assert int((new - pos).abs().max()) == 1
    plain = mapping_sweep(W, pos, dx, c, grp, Ht, plain=True)
    assert layer_loss(W, dx * c[grp].gather(1, plain), Ht) < before   # greedy jumps: lower, not necessarily lowest


def test_layer_learning_lowers_the_error_and_reports_what_it_moved():
    from jlcm_gguf.learn import learn_layer
    for bits in (2, 3):
        w, H, bounds, cb, idx, d = _layer_problem(bits=bits)
        start = _stored_loss(w, H, idx, d, cb, bounds, bits)
        res = {}
        for mode in ("off", "proximal", "plain"):
            i2, d2, c2, st = learn_layer(w, idx, d, cb, bounds, H, rounds=2, mappings=mode, shrink=0.0)
            assert c2.dtype == np.int8 and d2.dtype == np.float16 and np.all(np.diff(c2.astype(int), axis=1) >= 0)
            assert abs(st.loss_before - start) < 1e-6 * max(1, start)
            # the stored form (int8 codebooks, float16 scales) has the error it reports
            assert abs(_stored_loss(w, H, i2, d2, c2, bounds, bits) - st.loss_after) < 1e-4 * st.loss_before
            # 'changed' counts the weights whose codeword changed (by identity: the refit keeps labels, sorting
            # may re-label), bounded by the indices that differ by value position
            assert 0 <= st.changed <= w.size
            res[mode] = st
        assert res["off"].changed == 0 and res["off"].loss_after < res["off"].loss_before
        assert res["proximal"].changed > 0.01 * w.size
        assert res["proximal"].loss_after < 0.98 * res["off"].loss_after
        assert res["plain"].loss_after < res["off"].loss_after


def test_scale_systems_of_a_7b_ffn_down_are_solved():
    """A 7B's ffn_down row has 172 block scales: torch's batched CPU solve fails or hangs at that size (torch 2.13,
    MKL); learn.solve_systems returns every system's solution (checked against numpy), and below the threshold
    it is torch's batched solve itself."""
    from jlcm_gguf.learn import BATCHED_SOLVE_MAX, solve_systems
    g = torch.Generator().manual_seed(0)
    for k in (24, 172):
        A = torch.randn(6, k, k, generator=g, dtype=torch.float64)
        A = A @ A.mT + torch.eye(k, dtype=torch.float64)
        B = torch.randn(6, k, generator=g, dtype=torch.float64)
        X = solve_systems(A, B)
        np.testing.assert_allclose(X.numpy(), np.linalg.solve(A.numpy(), B.numpy()[..., None])[..., 0], rtol=1e-9)
        if k <= BATCHED_SOLVE_MAX:
            assert torch.equal(X, torch.linalg.solve(A, B))
