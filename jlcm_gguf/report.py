"""What a conversion did, for --report FILE.json: per transformer block (learning's loss before and after, indices
changed) and in total."""
from __future__ import annotations

import json
import os

import numpy as np


def layer_learning_totals(blocks: list) -> dict:
    """Layer-wise learning's figures for the whole conversion (learn.learn_layer)."""
    mats = [m for b in blocks for m in b.get("layer", {}).values()]
    n = sum(m["indices"] for m in mats)
    changed = sum(m["indices_changed"] for m in mats)
    return dict(matrices=len(mats), indices=n, indices_changed=changed, indices_changed_frac=changed / max(1, n),
                loss_before_mean=float(np.mean([m["loss_before"] for m in mats])),
                loss_after_mean=float(np.mean([m["loss_after"] for m in mats])))


def learning_totals(blocks: list) -> dict:
    """The whole conversion's block-wise learning figures from the per-block ones."""
    blocks = [b for b in blocks if "loss_before" in b]
    n = sum(b["indices"] for b in blocks)
    changed = sum(b["indices_changed"] for b in blocks)
    return dict(blocks=len(blocks), blocks_kept=sum(b["kept"] for b in blocks), indices=n,
                indices_changed=changed, indices_changed_frac=changed / max(1, n),
                loss_before_mean=float(np.mean([b["loss_before"] for b in blocks])),
                loss_after_mean=float(np.mean([min(b["loss_after"], b["loss_before"]) for b in blocks])))


def indices_changed(summary: dict) -> dict:
    """Indices moved by block-wise learning and by tuning together (each pass's count against where it started, so
    an index moved by both counts twice)."""
    passes = [summary.get("layer_learning"), summary.get("learning"), summary.get("tuning")]
    n = max((p["indices"] for p in passes if p), default=0)
    changed = sum(p["indices_changed"] for p in passes if p)
    return dict(indices=n, changed=changed, frac=changed / max(1, n))


def write_report(opt, summary: dict, blocks: list) -> None:
    """--report FILE.json: what the conversion did, per transformer block and in total (written whole or not at all)."""
    report = dict(model=str(opt.model), outfile=str(opt.outfile), bits=opt.bits, learn_steps=opt.learn_steps,
                  learn_mappings=opt.learn_mappings, seconds=summary["seconds"], bytes=summary["bytes"],
                  bpw=summary["bpw"], layer_rounds=opt.layer_rounds, layer_learning=summary.get("layer_learning"),
                  learning=summary.get("learning"), tuning=summary.get("tuning"),
                  tune_mappings=opt.tune_mappings, indices_changed=indices_changed(summary), blocks=blocks)
    tmp = opt.report.with_name(opt.report.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, opt.report)
