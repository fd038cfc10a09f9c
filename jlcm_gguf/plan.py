"""Plan step: a storage type (a "kind": jlcm2/3/4 or one of llama.cpp's types) per weight matrix that fits a
byte budget (--target-size / --target-bpw / --plan): what each kind costs in bytes, the search over the scores
plan_scores.py measures, and plans as files and metadata.

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
JLCM_BITS = (2, 3, 4)
# types a matrix can be given by hand (--tensor-type, --token-embedding-type, --output-tensor-type, or a plan file
# written with them) that the search never chooses
PINNED_ONLY = ("q4_0", "f16")
KINDS = CHOICES + PINNED_ONLY  # every type a plan (the metadata, a JSON plan) may name
STANDARD = {k: k.upper() for k in KINDS if not k.startswith("jlcm")}  # the llama.cpp types' gguf type names
GRID = 2048      # evenly spaced budgets the search also fills for (see walk)
ALIGNMENT = 32  # gguf-py pads every tensor's data to this
PLAN_FORMAT = "jlcm-plan"
SCORER = 7  # saved scores of another scorer are refused (2: Q5_0/Q8_0 errors of the h-weighted quantizer;
            # 3: --fast estimates the KL from the Fisher information instead of using the raw error;
            # 4: --fast draws its row sample by Fisher information and no longer weights it as if it
            # held the whole matrix's; 5: JLCM errors with pack.assign's search over six starting scales;
            # 6: over +amax and -amax, pack.SCALE_STARTS; 7: with gptq_kinds (--plan-error rounding), layer
            # matrices by their output error under the full input Hessian, those kinds rounded by GPTQ,
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


def natural_order(name: str):
    """Sort key: blocks in numeric order, then the other tensors."""
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
              options: dict[str, list[Option]] | None = None, gptq_kinds: frozenset[str] = frozenset(),
              scored_on: str = "") -> None:
    """JSON: the plan, what it was searched for, and (if given) every tensor's scored options with the digest of
    what they were measured on (scored_on), so a plan for another budget can be searched again from the same
    scores."""
    doc = {"format": PLAN_FORMAT, "version": 1, **(info or {}),
           "tensors": {n: bits[n] for n in sorted(bits, key=natural_order)}}
    if options:
        doc["scorer"] = SCORER
        doc["gptq_kinds"] = sorted(gptq_kinds)
        doc["scored_on"] = scored_on
        doc["options"] = {n: [[o.kind, o.bytes, o.score] for o in options[n]] for n in sorted(options, key=natural_order)}
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def load_options(path: Path, gptq_kinds: frozenset[str] = frozenset(), scored_on: str | None = None
                 ) -> dict[str, list[Option]]:
    """The scored options saved with a plan ({} if it has none), if scored with GPTQ at `gptq_kinds` and (where
    `scored_on` is given, as the converter does) on the same calibration data and importance (that digest)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        opts = doc.get("options", {}) if isinstance(doc, dict) else {}
        out = {n: [Option(str(k), int(b), float(sc)) for k, b, sc in v] for n, v in opts.items()}
        scorer = doc.get("scorer", 1) if out else SCORER
        scored_gptq = set(doc.get("gptq_kinds", [])) if out else set(gptq_kinds)
        scored_on_file = doc.get("scored_on") if out else scored_on
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise PlanError(f"cannot read the scores in {path}: {e}") from None
    if scorer != SCORER and not (scorer == 6 and not gptq_kinds):  # 7 without GPTQ kinds is 6
        raise PlanError(f"the scores in {path} were measured by another version of the planner (scorer {scorer}, "
                        f"this one is {SCORER}): plan again with --save-plan")
    if scored_gptq != set(gptq_kinds):
        raise PlanError(f"the scores in {path} rounded {sorted(scored_gptq) or 'no kind'} by GPTQ, this plan rounds "
                        f"{sorted(gptq_kinds) or 'none'} so (--rounding, --plan-error): plan again with --save-plan")
    if scored_on is not None and scored_on_file != scored_on:
        raise PlanError(f"the scores in {path} were measured on other calibration data or importance (the calibration "
                        "text, --nsamples, --seqlen, --seed, --imatrix, --groups, --variant, --fast or --rotate "
                        "differ): plan again with --save-plan")
    if any(o.kind not in CHOICES or o.bytes <= 0 for v in out.values() for o in v):
        raise PlanError(f"{path} has scores for an unknown type or size")
    return out


def describe(bits: dict[str, str]) -> list[str]:
    """One line per layer, e.g. 'blk.3   q:4 k:3 v:q8_0 o:3 gate:2 up:2 down:3' (JLCM bits or a llama.cpp
    type), for the log."""
    short = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate",
             "ffn_up": "up", "ffn_down": "down"}
    rows: dict[str, list[str]] = {}
    for n in sorted(bits, key=natural_order):
        parts = n.split(".")
        key = ".".join(parts[:2]) if parts[0] == "blk" else parts[0]
        kind = bits[n][4:] if bits[n].startswith("jlcm") else bits[n]
        rows.setdefault(key, []).append(f"{short.get(parts[-2], parts[-2])}:{kind}")
    return [f"{k:<12} {' '.join(v)}" for k, v in rows.items()]
