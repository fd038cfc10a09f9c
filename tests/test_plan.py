"""Per-tensor mixed precision under a size budget (#6): the greedy search on its own, then through the
converter on SmolLM2's first 4 blocks (its embeddings, tokenizer and widths): the file meets the budget exactly and never exceeds it, a larger budget never scores
worse, the plan round-trips through GGUF metadata and --plan, and the mixed file runs in llama.cpp."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import CONVERTER, error_line, run, tool
from jlcm_gguf import plan as P
from jlcm_gguf import plan_scores as S


def random_options(rng, n=40) -> dict[str, list[P.Option]]:
    out = {}
    for i in range(n):
        rows, cols = int(rng.integers(1, 40)) * 8, int(rng.integers(1, 12)) * 64
        groups, stored = int(rng.integers(1, 9)), bool(rng.integers(2))
        err = np.sort(rng.gamma(1.0, 1.0, size=3))[::-1] * rng.uniform(0.1, 10)  # fewer bits, more error
        if rng.random() < 0.2:
            err = rng.gamma(1.0, 1.0, size=3)  # noisy measurements: a lower width may score better
        out[f"blk.{i // 7}.t{i % 7}.weight"] = [P.Option(f"jlcm{b}", P.tensor_bytes(rows, cols, b, groups, stored),
                                                         float(e)) for b, e in zip(P.JLCM_BITS, err)]
    return out


def test_tensor_bytes_counts_padding():
    # 576 x 576 at 2 bits: 9 blocks of 18 bytes per row; 16 groups; a stored permutation
    assert P.tensor_bytes(576, 576, 2, 16, True) == 576 * 9 * 18 + 64 + 64 + 576 * 8
    assert P.tensor_bytes(3, 64, 3, 3, False) == 96 + 32 + 32


def test_hull_keeps_a_convex_decreasing_front():
    rng = np.random.default_rng(0)
    for opts in random_options(rng, 200).values():
        f = P.hull(opts)
        best = min(o.score for o in opts)
        assert f[0].score == best and f[0].bytes == max(o.bytes for o in opts if o.score == best)
        assert all(a.bytes > b.bytes and a.score < b.score for a, b in zip(f, f[1:]))
        slopes = [(b.score - a.score) / (a.bytes - b.bytes) for a, b in zip(f, f[1:])]
        assert slopes == sorted(slopes)
        # no dropped option lies below the front (linear between its points, flat beyond its largest)
        xs, ys = [p.bytes for p in f][::-1], [p.score for p in f][::-1]
        for o in opts:
            assert o.score >= np.interp(o.bytes, xs, ys) - 1e-9


def test_search_meets_budget_and_larger_budget_never_scores_worse():
    rng = np.random.default_rng(1)
    for trial in range(20):
        opts = random_options(rng)
        fronts, seq = P.moves(opts)
        top = sum(f[0].bytes for f in fronts.values())
        low = sum(f[-1].bytes for f in fronts.values())
        biggest_move = max(fronts[n][i - 1].bytes - fronts[n][i].bytes for _, n, i in seq)
        budgets = np.sort(rng.integers(low, top + 1000, size=60))
        prev_score = None
        cum = [top]
        for _, n, i in seq:
            cum.append(cum[-1] - (fronts[n][i - 1].bytes - fronts[n][i].bytes))
        for budget in budgets:
            kinds, size = P.walk(opts, int(budget))
            assert size == P.plan_bytes(opts, kinds) <= budget
            score = P.plan_score(opts, kinds)
            # never worse than the plain greedy (the first prefix of the move sequence that fits)
            k = next(j for j, c in enumerate(cum) if c <= budget)
            prefix = {n: 0 for n in fronts}
            for _, n, i in seq[:k]:
                prefix[n] = i
            assert score <= sum(fronts[n][i].score for n, i in prefix.items()) + 1e-9
            if budget < top:  # and close to the budget: within the grid step and the largest move
                assert budget - size <= (top - low) / (P.GRID - 1) + biggest_move
            if prev_score is not None:
                assert score <= prev_score + 1e-9 * max(1.0, abs(prev_score))
            prev_score = score
        with pytest.raises(P.PlanError):
            P.search(opts, low - 1)


def test_search_takes_the_cheapest_moves_first():
    # two tensors of the same size: the one whose error grows less gives up bits first
    b = {w: P.tensor_bytes(64, 64, w, 1, False) for w in P.JLCM_BITS}
    opts = {"robust": [P.Option(f"jlcm{w}", b[w], s) for w, s in zip(P.JLCM_BITS, (3.0, 1.5, 1.0))],
            "fragile": [P.Option(f"jlcm{w}", b[w], s) for w, s in zip(P.JLCM_BITS, (300.0, 20.0, 1.0))]}
    assert P.search(opts, b[4] + b[3]) == {"robust": "jlcm3", "fragile": "jlcm4"}
    assert P.search(opts, b[2] + b[4]) == {"robust": "jlcm2", "fragile": "jlcm4"}
    assert P.search(opts, 2 * b[2]) == {"robust": "jlcm2", "fragile": "jlcm2"}


def test_parse_size():
    assert P.parse_size("2.0GB") == 2 * 10**9
    assert P.parse_size("80MB") == 80 * 10**6
    assert P.parse_size("1GiB") == 2**30
    assert P.parse_size("123456") == 123456
    for bad in ("", "GB", "-1GB", "2XB", "abc"):
        with pytest.raises(P.PlanError):
            P.parse_size(bad)


def test_plan_json_roundtrip_and_bad_plans(tmp_path):
    kinds = {"blk.0.attn_q.weight": "jlcm2", "blk.10.ffn_up.weight": "q8_0", "token_embd.weight": "jlcm3"}
    P.save_plan(tmp_path / "p.json", kinds, {"target_bytes": 5})
    assert P.load_plan(tmp_path / "p.json") == kinds
    (tmp_path / "bad.json").write_text(json.dumps({"format": P.PLAN_FORMAT, "tensors": {"x": "jlcm5"}}))
    with pytest.raises(P.PlanError, match="valid type"):
        P.load_plan(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(P.PlanError, match="not a JLCM plan"):
        P.load_plan(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(P.PlanError, match="cannot read"):
        P.load_plan(tmp_path / "broken.json")


# --- through the converter, on SmolLM2's first blocks --------------------------------------------------------

# plans and budgets, not learning (tested in test_learn, test_robustness, test_convert): no layer-wise rounds
OPTIONS = ["--groups", "8", "--nsamples", "4", "--seqlen", "128", "--layer-rounds", "0"]


# between the 4-block model at JLCM 2-bit everywhere (14.20 MB) and JLCM 4-bit (24.82 MB); the whole model's 30
# blocks would plan the same way at 7 times the time (12 minutes on 2 cores for the scores and the file)
TARGET = 16_000_000


@pytest.fixture(scope="module")
def mixed(small, tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    out = d / "mixed.gguf"
    res = run(CONVERTER + [small, "--outfile", out, "--target-size", str(TARGET), "--save-plan", d / "plan.json"]
              + OPTIONS, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, d / "plan.json", res.stderr


def test_mixed_file_meets_the_budget_exactly(mixed):
    from gguf import GGUFReader

    from jlcm_gguf.format import KEY_PLAN_TARGET
    path, plan_json, log = mixed
    size = path.stat().st_size
    doc = json.loads(plan_json.read_text())
    assert size <= TARGET and doc["predicted_bytes"] == size and doc["target_bytes"] == TARGET
    assert int(GGUFReader(str(path)).fields[KEY_PLAN_TARGET].contents()) == TARGET
    # the saved scores reproduce the plan, which uses the budget: within 0.5% of it
    options = P.load_options(plan_json)
    kinds, planned = P.walk(options, doc["planned_budget"])
    assert kinds == doc["tensors"] == P.load_plan(path)
    assert planned <= doc["planned_budget"] and TARGET - size < 0.005 * TARGET
    assert len(set(kinds.values())) >= 2  # really mixed (jlcm2 and jlcm3 with the mix calibration text)
    assert "plan  blk.0" in log and "the file will take" in log


def test_larger_budget_never_scores_worse(mixed):
    options = P.load_options(mixed[1])
    low = sum(min(o.bytes for o in v) for v in options.values())
    high = sum(max(o.bytes for o in v) for v in options.values())
    scores = [P.plan_score(options, P.search(options, int(b))) for b in np.linspace(low, high, 200)]
    assert all(b <= a + 1e-12 * abs(a) for a, b in zip(scores, scores[1:]))
    assert scores[-1] < scores[0]


def test_plan_in_metadata_matches_tensor_types(mixed):
    from gguf import GGUFReader

    path, plan_json, _ = mixed
    kinds = P.load_plan(path)
    assert kinds == P.load_plan(plan_json)
    types = {t.name: int(t.tensor_type) for t in GGUFReader(str(path)).tensors}
    assert {n: types[n] for n in kinds} == {n: P.type_id(k) for n, k in kinds.items()}


@pytest.mark.parametrize("source", ["gguf", "scores"])
def test_plan_reproduces_the_file(small, mixed, tmp_path, source):
    """The plan in the file's metadata, or the saved scores searched again for the same budget (as scripts/demo.py
    does with the scores it ships): the same file as the conversion that measured them."""
    path = mixed[0]
    again = tmp_path / "again.gguf"
    plan = path if source == "gguf" else mixed[1]
    res = run(CONVERTER + [small, "--outfile", again, "--plan", plan, "--target-size", str(TARGET)] + OPTIONS,
              timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ("searching the scores saved" in res.stderr) == (source == "scores")
    assert again.read_bytes() == path.read_bytes()


def test_pinned_embedding_type_with_saved_scores(small, mixed, tmp_path):
    """--embd-type with a budget keeps the embeddings at that type and plans the rest within the budget,
    from the saved scores; a type the plan cannot store is one clear error."""
    from gguf import GGUFReader
    out, target = tmp_path / "pinned.gguf", 37_500_000  # JLCM 2-bit matrices with a Q8_0 embedding: 35.93 MB
    res = run(CONVERTER + [small, "--outfile", out, "--plan", mixed[1], "--target-size", str(target),
                           "--embd-type", "q8_0"] + OPTIONS, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "searching the scores saved" in res.stderr and out.stat().st_size <= target
    plan = P.load_plan(out)
    assert plan["token_embd.weight"] == "q8_0" and len(set(plan.values())) >= 3
    assert {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}["token_embd.weight"] == "Q8_0"
    res = run(CONVERTER + [small, "--outfile", tmp_path / "bad.gguf", "--target-size", str(target),
                           "--embd-type", "q4_0"] + OPTIONS)
    assert res.returncode != 0 and "--embd-type must be one of" in error_line(res)


def test_mixed_file_runs_in_llama_cpp(mixed, tmp_path):
    path = mixed[0]
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    res = run([tool("llama-perplexity"), "-m", path, "-f", text, "-c", "128", "--chunks", "2", "-t", "2"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Final estimate: PPL" in res.stdout + res.stderr


@pytest.mark.parametrize("args, message", [
    (["--target-size", "1MB"], "is too small: with every weight matrix at JLCM 2-bit"),
    (["--target-size", "2XB"], "cannot read the size"),
    (["--target-size", "20MB", "--target-bpw", "3"], "alternatives"),
])
def test_bad_budget_one_clear_error(small, tmp_path, args, message):
    out = tmp_path / "out.gguf"
    res = run(CONVERTER + [small, "--outfile", out] + args + OPTIONS)
    assert res.returncode != 0
    assert message in error_line(res)
    assert not list(tmp_path.glob("out.gguf*"))


def test_plan_for_another_model_one_clear_error(small, tmp_path):
    bad = tmp_path / "plan.json"
    P.save_plan(bad, {"blk.0.attn_q.weight": "jlcm2", "blk.99.attn_q.weight": "jlcm2"})
    res = run(CONVERTER + [small, "--outfile", tmp_path / "out.gguf", "--plan", bad] + OPTIONS)
    assert res.returncode != 0
    assert "does not fit this model" in error_line(res)


def test_scores_of_another_scorer_are_refused(tmp_path):
    """Saved scores are searched again only by the scorer that measured them (Q5_0's error changed with the
    weighted quantizer, so older scores would rank it wrongly)."""
    path = tmp_path / "plan.json"
    options = {"blk.0.attn_q.weight": [P.Option("jlcm2", 100, 2.0), P.Option("q5_0", 300, 0.5)]}
    P.save_plan(path, {"blk.0.attn_q.weight": "jlcm2"}, {"target_bytes": 100}, options)
    assert P.load_options(path) == options
    doc = json.loads(path.read_text())
    doc["scorer"] = 5
    path.write_text(json.dumps(doc))
    with pytest.raises(P.PlanError, match="another version of the planner"):
        P.load_options(path)
    doc["scorer"] = 6  # scorer 7 without GPTQ-scored kinds measures what 6 did
    path.write_text(json.dumps(doc))
    assert P.load_options(path) == options
    with pytest.raises(P.PlanError, match="another version of the planner"):
        P.load_options(path, frozenset({"jlcm2"}))
    del doc["scorer"]  # files from before the field: scorer 1
    path.write_text(json.dumps(doc))
    with pytest.raises(P.PlanError, match="scorer 1"):
        P.load_options(path)


def test_kquant_plan_writes_llama_cpp_types(small, mixed, tmp_path):
    """A plan may store matrices whose width is a multiple of 256 (SmolLM2's ffn_down: 1536) as K-quants: the
    file has those types at ggml's sizes, llama.cpp runs it, and saved scores without K-quants are refused
    for a --kquants search."""
    from gguf import GGUFReader
    plan = P.load_plan(mixed[1])
    plan.update({"blk.0.ffn_down.weight": "q2_k", "blk.1.ffn_down.weight": "q4_k", "blk.2.ffn_down.weight": "q6_k"})
    path = tmp_path / "plan.json"
    P.save_plan(path, plan)
    out = tmp_path / "k.gguf"
    res = run(CONVERTER + [small, "--outfile", out, "--plan", path] + OPTIONS, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    tensors = {t.name: t for t in GGUFReader(str(out)).tensors}
    for name, qt, size in [("blk.0.ffn_down.weight", "Q2_K", 84), ("blk.1.ffn_down.weight", "Q4_K", 144),
                           ("blk.2.ffn_down.weight", "Q6_K", 210)]:
        assert tensors[name].tensor_type.name == qt and tensors[name].n_bytes == 576 * 1536 // 256 * size
    assert P.load_plan(out) == plan
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    res = run([tool("llama-perplexity"), "-m", out, "-f", text, "-c", "128", "--chunks", "2", "-t", "2"])
    assert res.returncode == 0 and "Final estimate: PPL" in res.stdout + res.stderr, res.stderr[-2000:]
    res = run(CONVERTER + [small, "--outfile", tmp_path / "bad.gguf", "--plan", mixed[1], "--target-size",
                           str(TARGET), "--kquants"] + OPTIONS)
    assert res.returncode != 0 and "have no q2_k: plan again" in error_line(res)


def test_tensor_bytes_script_accounts_for_every_byte(mixed):
    """scripts/tensor_bytes.py (the byte split docs/measurements/results-qwen.md cites): roles cover every tensor once, and
    the layer types are the plan's."""
    import importlib.util
    from collections import Counter

    from gguf import GGUFReader
    spec = importlib.util.spec_from_file_location("tensor_bytes", Path(__file__).parents[1] / "scripts" / "tensor_bytes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = mixed[0]
    split = mod.roles(path)
    assert sum(b for b, _ in split.values()) == sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)
    plan = P.load_plan(path)
    want = Counter(P.ggml_type(k).name if k in P.STANDARD else f"JLCM{k[4:]}"
                   for n, k in plan.items() if n.startswith("blk."))
    assert split["layers"][1] == want


def test_kquant_choices_only_where_the_width_allows(smollm2_float):
    tensors, _, hp = smollm2_float
    names = ["blk.3.attn_q.weight", "blk.3.ffn_down.weight"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 49152, size=(S.FISHER_WINDOWS, 64))
    options = S.score_options(tensors, hp, tokens, {n: (4, True) for n in names}, 4, "codebooks", 0, fast=True,
                              choices=P.palette(kquants=True))
    assert [o.kind for o in options[names[0]]] == list(P.DEFAULT_CHOICES)
    down = {o.kind: o for o in options[names[1]]}
    assert set(down) == set(P.CHOICES) and down["q4_k"].bytes == 576 * 1536 // 256 * 144
    # (SmolLM2's weights lie on a Q4_1 grid, which Q4_K–Q6_K come close to alike, so only the far ends rank)
    assert down["q2_k"].score > down["q6_k"].score > down["q8_0"].score >= 0


def test_gptq_scoring_credits_what_gptq_rounding_saves(smollm2_float, tmp_path):
    """Scorer 7: with the converter's GPTQ rounding at 2 and 3 bits, a layer matrix's kinds are compared by
    their output error under the full input Hessian of held-out windows, GPTQ-rounded (fitted to the other
    windows) where the converter will round so. GPTQ lowers that error, so the 2-bit option scores below
    the nearest-rounded KL it is scaled from (by little for ffn_down, 1536 columns fitted on 256 tokens;
    in sample it even made 3 bits beat 4 there); saved scores remember which kinds were GPTQ-scored."""
    tensors, _, hp = smollm2_float
    names = ["blk.0.attn_q.weight", "blk.1.attn_output.weight", "blk.1.ffn_down.weight"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 49152, size=(S.FISHER_WINDOWS, 64))
    layout = {n: (4, True) for n in names}
    nearest = S.score_options(tensors, hp, tokens, layout, 4, "codebooks", 0, fast=True)
    kinds = frozenset({"jlcm2", "jlcm3"})
    gptq = S.score_options(tensors, hp, tokens, layout, 4, "codebooks", 0, fast=True, gptq_kinds=kinds)
    for n in names:
        before, after = ({o.kind: o.score for o in v[n]} for v in (nearest, gptq))
        assert after["jlcm2"] < (1.0 if "ffn_down" in n else 0.6) * before["jlcm2"], (n, before, after)
        assert after["jlcm2"] > after["jlcm3"] and after["jlcm4"] > after["q5_0"] > after["q8_0"] > 0, (n, after)
    hessians = S.BlockHessians(tensors, hp, tokens)
    fit, held_out = hessians("blk.1.ffn_down.weight")
    assert fit.shape == held_out.shape == (1536, 1536) and np.allclose(fit, fit.T) and not np.allclose(fit, held_out)
    with pytest.raises(ValueError, match="after block 1"):
        hessians("blk.0.attn_q.weight")
    path = tmp_path / "plan.json"
    P.save_plan(path, {n: "jlcm2" for n in names}, None, gptq, kinds)
    assert P.load_options(path, kinds) == gptq
    with pytest.raises(P.PlanError, match="GPTQ"):
        P.load_options(path, frozenset())


def test_plan_error_rounding_scores_the_kinds_the_converter_rounds_by_gptq(tmp_path):
    from jlcm_gguf.blocks import plan_gptq_kinds
    from jlcm_gguf.convert import Options
    opt = lambda **k: Options(model=tmp_path, outfile=tmp_path / "x.gguf", **k)  # noqa: E731
    assert plan_gptq_kinds(opt()) == set()  # the default: scorer 6's comparison, measured better on Qwen
    assert plan_gptq_kinds(opt(plan_error="rounding")) == {"jlcm2", "jlcm3"}
    assert plan_gptq_kinds(opt(plan_error="rounding", rounding="gptq")) == {"jlcm2", "jlcm3", "jlcm4"}
    assert plan_gptq_kinds(opt(plan_error="rounding", rounding="nearest")) == set()


@pytest.mark.parametrize("drop", [(), ("ffn_gate",), ("attn_v", "ffn_up")])
def test_companion_layout_matches_fold(smollm2_float, drop):
    """The planner's byte count relies on knowing each matrix's groups and permutation before grouping."""
    from jlcm_gguf.fold import companion_layout, fold_layer
    from jlcm_gguf.model import LINEARS
    tensors, _, hp = smollm2_float
    quantized = {f"blk.0.{n}.weight" for n in LINEARS if n not in drop}
    for groups in (16, 5, 1):
        res = fold_layer(tensors, {}, 0, hp, groups, 0, quantized)
        for name, ro in res.orders.items():
            assert companion_layout(name, tensors[name].shape[0], hp, groups, quantized) == (len(ro.bounds), ro.stored)


def test_fisher_estimate_tracks_the_measured_kl(smollm2, smollm2_float):
    """--fast scores a tensor by the second-order (Fisher) estimate of the KL it adds at its lowest width; the
    default measures that KL. Across tensors of different kinds, depths and row counts (a row sample stands
    for the whole matrix) the two must agree in order and, roughly, in size."""
    from transformers import AutoTokenizer

    from jlcm_gguf.calib import calibration_tokens, default_calibration_text
    tensors, _, hp = smollm2_float
    names = [f"blk.{b}.{n}.weight" for b in (0, 14, 29) for n in ("attn_q", "attn_v", "ffn_up", "ffn_down")]
    names.append("token_embd.weight")  # 49152 rows, scored on a sample of 1024 (also ffn_up: 1536 rows)
    layout = {n: (4, True) for n in names}
    tokens = calibration_tokens(default_calibration_text(), AutoTokenizer.from_pretrained(str(smollm2)),
                                S.FISHER_WINDOWS, 128, 0)
    measured = S.score_options(tensors, hp, tokens, layout, 4, "codebooks", 0, kl_windows=S.FISHER_WINDOWS)
    estimated = S.score_options(tensors, hp, tokens, layout, 4, "codebooks", 0, fast=True)
    kl = np.array([measured[n][0].score for n in names])
    est = np.array([estimated[n][0].score for n in names])
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(rank(kl), rank(est))[0, 1] > 0.8, (kl, est)
    ratio = est / kl   # a second-order estimate: within a factor of 3 either way (0.37-1.21 measured on mix text)
    assert np.all((ratio > 1 / 3) & (ratio < 3)), ratio


def test_block_layouts_script_fits_its_own_grids():
    """experiments/block_layouts.py (docs/measurements/block-layouts-qwen.md): blocks that lie on a layout's grid are fitted
    without error, and only the affine layout fits blocks shifted by an offset."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("block_layouts", Path(__file__).parents[1] / "experiments" / "block_layouts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(0)
    c = np.array([-1.0, -0.25, 0.5, 1.0])
    cv = c[rng.integers(0, 4, size=(200, 16))]
    cv[:, 0], cv[:, 1] = -1.0, 1.0                          # each block spans the codebook
    d = mod.f16(rng.uniform(0.01, 0.1, size=(200, 1)))
    m = mod.f16(rng.uniform(-0.2, 0.2, size=(200, 1)))
    assert mod.fit_blocks(d * cv, c, affine=False) < 1e-20
    assert mod.fit_blocks(d * cv + m, c, affine=True) < 1e-9 * float(((d * cv + m) ** 2).sum())
    assert mod.fit_blocks(d * cv + m, c, affine=False) > 1e-2 * float(((d * cv + m) ** 2).sum())


def test_each_process_scores_only_its_own_matrices(smollm2_float, monkeypatch):
    """With several torchrun processes, score_options scores each matrix in one process (distributed.owners) and
    gathers the rest (share_results): seen here as process 1 of 2, whose share is scored alike by one process."""
    from jlcm_gguf import distributed as D
    tensors, _, hp = smollm2_float
    names = [f"blk.0.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "ffn_up")]
    tokens = np.random.default_rng(0).integers(0, 49152, size=(4, 32))
    layout = {n: (4, True) for n in names}
    alone = S.score_options(tensors, hp, tokens, layout, 4, "codebooks", 0)
    gathered = {}
    monkeypatch.setattr(D, "size", lambda: 2)
    monkeypatch.setattr(D, "rank", lambda: 1)
    # every window observed here and nothing to add (the moments' split is test_distributed's): only the matrices split
    monkeypatch.setattr(D, "share", lambda n, batch=1: list(range(n)))
    monkeypatch.setattr(D, "all_reduce_", lambda tensors: None)
    monkeypatch.setattr(D, "share_results", lambda results, owner: gathered.update(results) or results)
    mine = S.score_options(tensors, hp, tokens, layout, 4, "codebooks", 0)
    owner = D.owners({n: tensors[n].size for n in sorted(layout, key=S.natural_order)})
    assert set(mine) == set(gathered) == {n for n in names if owner[n] == 1} and 0 < len(mine) < len(names)
    assert all(mine[n] == alone[n] for n in mine)


def test_scores_resume_from_their_log(smollm2_float, tmp_path, monkeypatch):
    """Scoring is not lost to a kill (it takes hours for a 1.5B model on 2 cores): each matrix's options go to the
    ScoreLog when scored; a run of the same key reads them back and scores only the rest (a line the kill cut is
    dropped and scored again), giving the options of an uninterrupted run; a log of another key is not used. With
    --fast, whose row samples are drawn for every matrix in turn: a matrix read back still draws its sample."""
    from jlcm_gguf import group
    from jlcm_gguf.checkpoint import ScoreLog
    tensors, _, hp = smollm2_float
    names = [f"blk.0.{n}.weight" for n in ("attn_k", "attn_v", "ffn_gate", "ffn_up")]  # (scored in this order)
    tokens = np.random.default_rng(0).integers(0, 49152, size=(S.FISHER_WINDOWS, 32))
    layout = {n: (4, True) for n in names}
    out = tmp_path / "m.gguf"
    alone = S.score_options(tensors, hp, tokens, layout, 4, "codebooks", 0, fast=True, score_log=ScoreLog(out, "key"))
    log = ScoreLog(out, "key")
    lines = log.path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 1 + len(names)
    # killed while writing the last line: ffn_gate is read back, ffn_up (whose row sample is drawn after
    # ffn_gate's: the layers' first two have fewer rows than a sample, and none) is scored again
    log.path.write_text("".join(lines[:4]) + lines[4][:20], encoding="utf-8")
    assert ScoreLog(out, "other").load() == ({}, True)
    grouped = []
    real = group.group_rows
    monkeypatch.setattr(group, "group_rows", lambda *a, **k: grouped.append(1) or real(*a, **k))
    resumed = S.score_options(tensors, hp, tokens, layout, 4, "codebooks", 0, fast=True, score_log=ScoreLog(out, "key"))
    assert len(grouped) == 1  # (group_rows: once per matrix scored)
    assert resumed == alone
    assert len(log.path.read_text(encoding="utf-8").splitlines()) == 1 + len(names) and log.load()[0].keys() == set(names)
