"""Resumable conversions: after each transformer block, what the later blocks and the writer need.

A folder next to the output (`OUT.gguf.jlcm-resume/`) holds the plan's scores as they are measured (ScoreLog),
per finished block, its packed JLCM
weights, its matrices stored in llama.cpp types and the neighbours folding changed (`block-NNN.npz`), and the quantized model's activations
after the last finished block (`state.npz`, whose `done` counts the finished blocks). Every file is
written to a temporary name and renamed, so a kill at any moment leaves a consistent folder. A
fingerprint of the options, the calibration tokens, the input files and the converter's source guards against resuming with
anything else. Everything downstream is deterministic, so a resumed conversion writes the same bytes as
an uninterrupted one (tests/test_robustness.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from .source import LazyArray

SUFFIX = ".jlcm-resume"
FINGERPRINT_OPTIONS = ("bits", "groups", "variant", "embd_type", "nsamples", "seqlen", "seed", "learn_steps",
                       "learn_mappings", "layer_rounds", "kinds", "rotate", "fast", "rounding", "learn_loss",
                       "token_embd_type", "output_type")


def folder(outfile: Path) -> Path:
    """The checkpoint folder of a conversion writing `outfile`."""
    return Path(str(outfile) + SUFFIX)


def converter_source_hash() -> str:
    """The converter's own code: a checkpoint written by other code (an upgrade, a local edit) is not resumed,
    since its blocks may differ from what this code would write."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def fingerprint(opt, tokens: np.ndarray, source: str | None = None) -> str:
    h = hashlib.sha256()
    h.update((source or converter_source_hash()).encode())
    h.update(json.dumps({k: getattr(opt, k) for k in FINGERPRINT_OPTIONS}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(tokens).tobytes())
    if getattr(opt, "imatrix_file", None):
        h.update(Path(opt.imatrix_file).read_bytes())
    for f in sorted(Path(opt.model).iterdir()):
        if f.suffix in (".json", ".safetensors", ".model"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _save_npz(path: Path, arrays: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def stored_array(path: Path, key: str, shape: tuple, dtype) -> LazyArray:
    """An array of a block file, read when used: the writer writes a finished block's packed weights from the
    checkpoint, so they are not held in memory meanwhile (a 7B model's are 1.7 GB)."""
    def load() -> np.ndarray:
        with np.load(path) as z:
            return z[key]
    return LazyArray(load, shape, dtype, cache=None)


class Checkpoint:
    def __init__(self, outfile: Path, key: str):
        self.dir = folder(outfile)
        self.key = key

    def found(self) -> tuple[int, bool] | None:
        """(finished blocks, same fingerprint) of an earlier run's checkpoint, or None."""
        state = self.dir / "state.npz"
        if not state.exists():
            return None
        with np.load(state) as z:
            return int(z["done"]), str(z["key"]) == self.key

    def save(self, bid: int, specs: dict, folded: dict, x_q: list, x_f: list | None,
             standard: dict | None = None, learned: dict | None = None) -> None:
        """Block bid is finished: its JLCM specs, the raw bytes of its matrices in llama.cpp types, the
        tensors folding changed, its learning report, the activations after it. Each spec's packed array is
        replaced by a stored_array of the file."""
        self.dir.mkdir(exist_ok=True)
        arrays = {}
        for name, s in specs.items():
            for k in ("packed", "codebooks", "bounds", "perm"):
                if s[k] is not None:
                    arrays[f"jlcm|{name}|{k}"] = s[k]
            arrays[f"jlcm|{name}|bits"] = np.int64(s["bits"])
        for name, t in folded.items():
            arrays[f"tensor|{name}"] = t
        for name, data in (standard or {}).items():
            arrays[f"standard|{name}"] = data
        if learned is not None:
            arrays["learn|report"] = np.str_(json.dumps(learned))
        path = self.dir / f"block-{bid:03d}.npz"
        _save_npz(path, arrays)
        for name, s in specs.items():  # the packed weights, from now on read from the file
            s["packed"] = stored_array(path, f"jlcm|{name}|packed", s["packed"].shape, s["packed"].dtype)
        state = {"key": np.str_(self.key), "done": np.int64(bid + 1), "x_q": np.stack([x.cpu().numpy() for x in x_q])}
        if x_f is not None:
            state["x_f"] = np.stack([x.cpu().numpy() for x in x_f])
        _save_npz(self.dir / "state.npz", state)

    def restore(self, jlcm: dict, tensors: dict, standard: dict, report: list | None = None) -> tuple[int, list, list | None]:
        """Loads the finished blocks into jlcm, tensors, standard and (their learning reports) report; returns
        (blocks done, x_q, x_f or None)."""
        from . import distributed as D
        with np.load(self.dir / "state.npz") as z:
            done = int(z["done"])
            x_q = [D.to_device(x) for x in z["x_q"]]
            x_f = [D.to_device(x) for x in z["x_f"]] if "x_f" in z else None
        for bid in range(done):
            with np.load(self.dir / f"block-{bid:03d}.npz") as z:
                for key in z.files:
                    kind, name, *field = key.split("|")
                    if kind == "tensor":
                        tensors[name] = z[key]
                    elif kind == "standard":
                        standard[name] = z[key]
                    elif kind == "learn" and report is not None:
                        report.append(json.loads(str(z[key])))
                    elif kind == "jlcm":
                        spec = jlcm.setdefault(name, {"perm": None})
                        if field[0] == "packed":  # read from the file when it is written
                            a = z[key]
                            spec["packed"] = stored_array(self.dir / f"block-{bid:03d}.npz", key, a.shape, a.dtype)
                            del a
                        else:
                            spec[field[0]] = int(z[key]) if field[0] == "bits" else z[key]
        return done, x_q, x_f

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def interrupted(outfile: Path, n_layer: int) -> str | None:
    """What an earlier run left in OUT's checkpoint folder ("3 of 28 blocks done", "plan scoring, 40 weight
    matrices scored"), or None."""
    where = folder(outfile)
    if not where.is_dir() or not any(where.iterdir()):
        return None
    try:
        with np.load(where / "state.npz") as z:
            return f"{int(z['done'])} of {n_layer} blocks done"
    except (OSError, ValueError, KeyError, EOFError):
        scored = sum(max(len(ScoreLog._lines(f)) - 1, 0) for f in where.glob(ScoreLog.PATTERN))
        return f"plan scoring, {scored} weight matrices scored"


class ScoreLog:
    """The plan's scores as they are measured (plan_scores.score_options, hours for a 1.5B model on 2 cores):
    one JSON line per weight matrix, after a first line with the key of everything the scores depend on, in
    OUT.jlcm-resume/plan-scores-RANK.jsonl (one file per process). Each line is flushed to disk when written; a
    line cut by a kill is dropped. A resumed conversion reuses the scores of every file whose key matches."""
    PATTERN = "plan-scores-*.jsonl"

    def __init__(self, outfile: Path, key: str, rank: int = 0):
        self.dir = folder(outfile)
        self.key = key
        self.path = self.dir / f"plan-scores-{rank}.jsonl"

    @staticmethod
    def _lines(path: Path) -> list:
        """The file's complete JSON lines (the first is the key)."""
        out = []
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return out
        for line in text.split("\n")[:-1]:  # (the part after the last newline is a line cut short)
            try:
                out.append(json.loads(line))
            except ValueError:
                break
        return out

    def load(self) -> tuple[dict[str, list[tuple[str, int, float]]], bool]:
        """(matrix -> its options as (kind, bytes, score), whether any file had another key)."""
        scored, other = {}, False
        for f in sorted(self.dir.glob(self.PATTERN)):
            lines = self._lines(f)
            if not lines or lines[0].get("key") != self.key:
                other = other or bool(lines)
                continue
            for entry in lines[1:]:
                scored[entry["name"]] = [tuple(o) for o in entry["options"]]
        return scored, other

    def start(self) -> None:
        """This process's file, keeping the complete lines an earlier run with the same key wrote."""
        self.dir.mkdir(exist_ok=True)
        lines = self._lines(self.path)
        if not lines or lines[0].get("key") != self.key:
            lines = [{"key": self.key}]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(v) + "\n" for v in lines), encoding="utf-8")
        os.replace(tmp, self.path)

    def add(self, name: str, options: list[tuple[str, int, float]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, "options": [list(o) for o in options]}) + "\n")
            f.flush()
            os.fsync(f.fileno())
