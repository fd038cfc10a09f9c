"""Write step: JLCM weights and their companion tensors into a gguf-py GGUFWriter (docs/FORMAT.md)."""
from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from .format import BLOCK_BYTES, SUFFIX_BOUNDS, SUFFIX_CB, SUFFIX_PERM, TYPE_IDS
from .source import LazyArray


def add_jlcm_tensor(writer: GGUFWriter, name: str, packed: np.ndarray, bits: int,
                    codebooks: np.ndarray | None, bounds: np.ndarray | None,
                    perm: np.ndarray | None = None) -> None:
    """Add one dense JLCM weight.

    packed: uint8 [rows, row_bytes] (stored row order); codebooks: int8 [n_groups, 2^bits];
    bounds: exclusive end row of each group; perm: stored row -> original row, or None.
    Without codebooks and bounds the type's default codebook applies.
    """
    rows, nbytes = packed.shape
    if nbytes % BLOCK_BYTES[bits]:
        raise ValueError(f"{name}: {nbytes} bytes per row is not a whole number of JLCM{bits} blocks")
    qtype = GGMLQuantizationType(TYPE_IDS[bits])
    # gguf-py takes the byte shape of quantized data and derives the element shape
    if not isinstance(packed, LazyArray):  # (read from a checkpoint when the writer writes it)
        packed = np.ascontiguousarray(packed, dtype=np.uint8)
    writer.add_tensor(name, packed, raw_dtype=qtype)
    if (codebooks is None) != (bounds is None):
        raise ValueError(f"{name}: codebooks and bounds come together")
    if codebooks is not None:
        cb = np.ascontiguousarray(codebooks, dtype=np.int8).reshape(-1, 1 << bits)
        b = np.ascontiguousarray(bounds, dtype=np.int32).reshape(-1)
        if len(b) != cb.shape[0] or b[-1] != rows or np.any(np.diff(b) <= 0) or b[0] <= 0:
            raise ValueError(f"{name}: bad group bounds for {rows} rows and {cb.shape[0]} groups")
        writer.add_tensor(f"{name}.{SUFFIX_CB}", cb)
        writer.add_tensor(f"{name}.{SUFFIX_BOUNDS}", b)
    if perm is not None:
        fwd = np.asarray(perm, dtype=np.int32).reshape(-1)
        if len(fwd) != rows or not np.array_equal(np.sort(fwd), np.arange(rows)):
            raise ValueError(f"{name}: the permutation is not one of {rows} rows")
        inv = np.empty_like(fwd)
        inv[fwd] = np.arange(rows, dtype=np.int32)
        writer.add_tensor(f"{name}.{SUFFIX_PERM}", np.stack([fwd, inv]))


def write_raw_gguf(path, tensors: dict, arch: str = "llama", metadata=None) -> None:
    """A GGUF file with exactly these tensors and no checks (test input, hostile files included): each value
    is an array, or (uint8 bytes, GGMLQuantizationType) for quantized data; metadata(writer) adds keys."""
    w = GGUFWriter(str(path), arch)
    if metadata:
        metadata(w)
    for name, arr in tensors.items():
        if isinstance(arr, tuple):
            w.add_tensor(name, arr[0], raw_dtype=arr[1])
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


STANDARD_TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q5_0": "Q5_0", "q4_0": "Q4_0"}


def standard_type(name: str, arr: np.ndarray, embd_type: str, planned: str | None = None) -> GGMLQuantizationType:
    """A type the plan or --tensor-type gave the tensor (q5_0, q8_0, a K-quant; by hand also q4_0, f16), else the
    documented rule for tensors JLCM does not cover (docs/CONVERTER.md):
    1-D tensors and norms: F32; token_embd/output: embd_type, the type asked for that tensor
    (--token-embedding-type, --output-tensor-type, --embd-type), when it is a standard type its width allows, else Q8_0;
    other matrices whose width is not a multiple of 64: Q8_0 (width a multiple of 32) or F16."""
    from .plan import STANDARD, ggml_type
    if planned in STANDARD:
        return ggml_type(planned)
    if arr.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return GGMLQuantizationType.F32
    if name in ("token_embd.weight", "output.weight") and embd_type in STANDARD_TYPES:
        qt = GGMLQuantizationType[STANDARD_TYPES[embd_type]]
        if qt in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or arr.shape[-1] % 32 == 0:
            return qt
    if name in ("token_embd.weight", "output.weight") and embd_type in STANDARD:  # a K-quant
        from .plan import applicable
        if applicable(embd_type, arr.shape[-1]):
            return ggml_type(embd_type)
    return GGMLQuantizationType.Q8_0 if arr.shape[-1] % 32 == 0 else GGMLQuantizationType.F16


def verify_written(path, order: list[str], jlcm: dict) -> None:
    """Re-reads the file before the rename, so a truncated or inconsistent one never takes the output's
    name: every tensor there, the data section ending at the file's end, the JLCM payloads as packed."""
    from .convert import ConvertError  # (convert imports this module)

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ConvertError(f"the file written to {path} does not read back: {e}")
    by_name = {t.name: t for t in reader.tensors}
    n_expected = len(order) + sum(2 + (s["perm"] is not None) for s in jlcm.values())
    if len(by_name) != n_expected or any(n not in by_name for n in order):
        raise ConvertError(f"{path}: wrote {len(by_name)} tensors, expected {n_expected}")
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    if end > os.path.getsize(path):
        raise ConvertError(f"{path} is truncated: its tensors end at byte {end:,}, the file at {os.path.getsize(path):,}")
    # read, not through the reader's memory map: a map's pages would count as the converter's memory (a 7B
    # model's whole file, on top of the packed weights still held)
    with open(path, "rb") as f:
        for name, spec in jlcm.items():
            packed = np.ascontiguousarray(spec["packed"]).view(np.uint8).reshape(-1)
            f.seek(int(by_name[name].data_offset))
            if not np.array_equal(np.fromfile(f, dtype=np.uint8, count=packed.size), packed):
                raise ConvertError(f"{path}: {name} did not read back as written")


def check_free_space(directory: Path, jlcm: dict, tensors: dict, order: list[str]) -> None:
    """One clear error if `directory` has less room than the file takes, about: the JLCM specs' packed weights
    (real or shape_spec's), every other tensor at most F32 (before the conversion starts, and again before writing)."""
    from .convert import ConvertError
    need = sum(s["packed"].nbytes for s in jlcm.values()) + sum(tensors[n].nbytes for n in order if n not in jlcm)
    free = shutil.disk_usage(directory).free
    if free < need:
        raise ConvertError(f"{directory} has {free:,} bytes free, the output needs about {need:,}")


def write_gguf(instance, order: list[str], tensors: dict, jlcm: dict, opt, tmp_out, standard: dict | None = None,
               hessians: dict | None = None) -> dict:
    """Entry point of the write step: every tensor in the converter's order, JLCM ones with companions,
    the others in llama.cpp types (`standard`: raw bytes already quantized; others Q4_0/Q5_0/Q8_0 weighted
    by `hessians`, standard.py), the metadata of the vendored converter plus jlcm.*; written to tmp_out,
    re-read, renamed. On any
    failure (a full disk included) the temporary file is removed and the output name stays untouched."""
    from .convert import ConvertError

    check_free_space(Path(tmp_out).parent, jlcm, tensors, order)
    try:
        summary = _write_and_verify(instance, order, tensors, jlcm, opt, tmp_out, standard or {}, hessians or {})
    except OSError as e:
        Path(tmp_out).unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ConvertError(f"no space left on the device writing {opt.outfile}; nothing was written "
                               f"(the checkpoint of the finished blocks is kept for --resume)")
        raise ConvertError(f"cannot write {opt.outfile}: {e}")
    except BaseException:
        Path(tmp_out).unlink(missing_ok=True)
        raise
    return summary


def _add_tensors(writer, order: list[str], tensors: dict, jlcm: dict, opt, kinds: dict | None,
                 dry: bool = False, standard: dict | None = None, hessians: dict | None = None) -> tuple[int, int, int]:
    """Every tensor in the converter's order into the writer; (weights, JLCM weights, JLCM bytes). dry: only
    names, shapes and types matter (np.empty data is never touched), for predict_bytes."""
    from gguf.quants import quant_shape_to_byte_shape

    from .standard import importance, quantize_standard

    log = logging.getLogger("jlcm-convert")
    n_weights_jlcm = bytes_jlcm = n_weights = 0
    for name in order:
        arr = tensors[name]
        n_weights += arr.size
        if name in jlcm:
            spec = jlcm[name]
            add_jlcm_tensor(writer, name, **spec)
            n_weights_jlcm += arr.size
            bytes_jlcm += spec["packed"].nbytes + spec["codebooks"].nbytes + spec["bounds"].size * 4 + (
                0 if spec["perm"] is None else spec["perm"].size * 8)
            if not dry:
                log.info("%-32s %-9s JLCM%d, %d groups%s", name, "x".join(map(str, arr.shape[::-1])), spec["bits"],
                         len(spec["bounds"]), ", stored permutation" if spec["perm"] is not None else "")
        else:
            from .convert import embedding_type  # (convert imports this module)
            qt = standard_type(name, arr, embedding_type(opt, name), (kinds or {}).get(name))
            if qt == GGMLQuantizationType.F32:
                data = np.asarray(arr, dtype=np.float32)
            elif dry:
                data = np.empty(quant_shape_to_byte_shape(arr.shape, qt), dtype=np.uint8)
            else:
                data = (standard or {}).get(name)
                if data is None:
                    data = quantize_standard(arr, qt, importance(name, hessians or {}, tensors))
            writer.add_tensor(name, data, raw_dtype=qt)
            if arr.ndim > 1 and not dry:
                log.info("%-32s %-9s %s (not covered by JLCM)", name, "x".join(map(str, arr.shape[::-1])), qt.name)
    return n_weights, n_weights_jlcm, bytes_jlcm


def replay_vocab(instance) -> None:
    """The vendored set_vocab reads and parses the tokenizer (1.5 s for SmolLM2's 49k tokens) and only adds
    key-values; predict_layout fills a scratch writer with the metadata once per size it computes. So the first
    call's key-values are recorded (in the order set) and later calls set the same ones again."""
    if "set_vocab" in vars(instance):
        return
    original = instance.set_vocab
    recorded: list | None = None

    def set_vocab():
        nonlocal recorded
        kv = instance.gguf_writer.kv_data[0]
        if recorded is None:
            before = dict(kv)
            original()
            recorded = [(k, v) for k, v in kv.items() if before.get(k) is not v]
        else:
            for k, v in recorded:
                kv[k] = v
    instance.set_vocab = set_vocab


def _add_metadata(instance, kinds: dict, opt) -> None:
    """The vendored converter's metadata, then jlcm.*: the plan (every planned matrix and its ggml type) is
    written for every file, so the header's size does not depend on which types a plan picks."""
    from gguf import GGUFValueType

    from .format import (FORMAT_VERSION, FTYPE_IDS, KEY_BITS, KEY_FORMAT_VERSION, KEY_GROUPS, KEY_PLAN_TARGET,
                         KEY_PLAN_TENSORS, KEY_PLAN_TYPES, KEY_ROTATION, KEY_VARIANT)

    writer = instance.gguf_writer
    replay_vocab(instance)
    instance.prepare_metadata(vocab_only=False)
    writer.add_uint32(KEY_FORMAT_VERSION, FORMAT_VERSION)
    # the converter sets the file type to the JLCM width most layer matrices have (convert.layer_bits)
    bits_of_ftype = {v: k for k, v in FTYPE_IDS.items()}
    writer.add_uint32(KEY_BITS, bits_of_ftype.get(int(instance.ftype), opt.bits))
    writer.add_uint32(KEY_GROUPS, opt.groups)
    writer.add_string(KEY_VARIANT, opt.variant)
    if getattr(opt, "rotate", False):
        writer.add_string(KEY_ROTATION, f"randomized-hadamard seed={opt.seed}")
    if kinds:
        from .plan import type_id
        names = sorted(kinds)
        writer.add_key_value(KEY_PLAN_TENSORS, names, GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
        writer.add_key_value(KEY_PLAN_TYPES, [type_id(kinds[n]) for n in names], GGUFValueType.ARRAY,
                             sub_type=GGUFValueType.UINT8)
        writer.add_uint64(KEY_PLAN_TARGET, int(getattr(opt, "target_bytes", 0) or 0))


def file_bytes(writer) -> int:
    """The size gguf-py's writer will give the file: header, key-values and tensor infos padded to the
    alignment, then each tensor's data padded."""
    from gguf import GGUFValueType

    a = writer.data_alignment
    n = 4 + 4 + 8 + 8
    for key, val in writer.kv_data[0].items():
        n += len(writer._pack_val(key, GGUFValueType.STRING, add_vtype=False))
        n += len(writer._pack_val(val.value, val.type, add_vtype=True, sub_type=val.sub_type))
    for name, ti in writer.tensors[0].items():
        n += len(writer._pack_val(name, GGUFValueType.STRING, add_vtype=False)) + 4 + 8 * len(ti.shape) + 4 + 8
    return -(-n // a) * a + sum(-(-ti.nbytes // a) * a for ti in writer.tensors[0].values())


def shape_spec(rows: int, cols: int, bits: int, groups: int, stored_perm: bool) -> dict:
    """A JLCM spec with the right shapes and untouched data, for predict_bytes."""
    from .format import QK

    return dict(packed=np.empty((rows, cols // QK * BLOCK_BYTES[bits]), dtype=np.uint8), bits=bits,
                codebooks=np.zeros((groups, 1 << bits), dtype=np.int8),
                bounds=(np.arange(1, groups + 1) * rows // groups).astype(np.int32),
                perm=np.arange(rows, dtype=np.int32) if stored_perm else None)


def predict_bytes(instance, order: list[str], tensors: dict, jlcm_shapes: dict, opt, kinds: dict) -> int:
    """Exact size of the file write_gguf would write with JLCM weights of these shapes (shape_spec), found
    by filling a scratch copy of the converter's writer the same way, without data."""
    return predict_layout(instance, order, tensors, jlcm_shapes, opt, kinds)[0]


def predict_layout(instance, order: list[str], tensors: dict, jlcm_shapes: dict, opt,
                   kinds: dict) -> tuple[int, dict[str, tuple[str, int]]]:
    """predict_bytes, and each tensor's (type name, bytes in the file: data padded to the alignment, a JLCM
    weight's companions included)."""
    import copy

    real = instance.gguf_writer
    scratch = copy.copy(real)
    vars(scratch).pop("add_tensor", None)  # a method patched onto the instance would still write to `real`
    scratch.kv_data = [dict(kv) for kv in real.kv_data]
    scratch.tensors = [{}]
    instance.gguf_writer = scratch
    metadata = getattr(instance, "metadata", None)
    quiet = logging.getLogger("hf-to-gguf"), logging.getLogger("gguf.gguf_writer")
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        _add_tensors(scratch, order, tensors, jlcm_shapes, opt, kinds, dry=True)
        _add_metadata(instance, kinds, opt)
        a = scratch.data_alignment
        layout: dict[str, tuple[str, int]] = {}
        for name, ti in scratch.tensors[0].items():
            base = name if name in tensors else name.rsplit(".", 1)[0]  # a companion counts with its weight
            kind, n = layout.get(base, (ti.dtype.name, 0))
            layout[base] = (kind, n + -(-ti.nbytes // a) * a)
        return file_bytes(scratch), layout
    finally:
        instance.gguf_writer = real
        instance.metadata = metadata
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)


def _write_and_verify(instance, order: list[str], tensors: dict, jlcm: dict, opt, tmp_out, standard: dict,
                      hessians: dict) -> dict:
    writer = instance.gguf_writer
    n_weights, n_weights_jlcm, bytes_jlcm = _add_tensors(writer, order, tensors, jlcm, opt, opt.kinds,
                                                         standard=standard, hessians=hessians)
    _add_metadata(instance, opt.kinds, opt)
    expected = file_bytes(writer)
    writer.write_header_to_file(path=tmp_out)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    verify_written(tmp_out, order, jlcm)
    if os.path.getsize(tmp_out) != expected:
        raise RuntimeError(f"{tmp_out} has {os.path.getsize(tmp_out):,} bytes, the size computed for it is {expected:,}")
    os.replace(tmp_out, opt.outfile)
    size = os.path.getsize(opt.outfile)
    return {"file": str(opt.outfile), "bytes": size, "weights": n_weights, "bpw": 8 * size / n_weights,
            "jlcm_weights": n_weights_jlcm, "jlcm_bpw": 8 * bytes_jlcm / max(n_weights_jlcm, 1)}
