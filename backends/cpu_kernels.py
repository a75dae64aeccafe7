"""CPU numerical kernels: dequantize, packed quantized matmul, embedding lookup, float32 ops.

Public interface (used by the CPU executor):
    set_threads(n)
    dequantize(qtype, raw, n_cols) -> float32 (n_rows, n_cols), bit-exact vs gguf.quants.dequantize
    pack(qtype, raw, n_rows, n_cols) -> PackedWeight
    matmul(w, x, out=None) -> x @ W.T  (x: (n_tok, n_cols) float32)
    get_rows(w, ids) -> float32 (len(ids), n_cols)
    rms_norm, swiglu, gelu_tanh (from cpu_ops_kernels)
"""
from __future__ import annotations

import numba
import numpy as np

from lstream.core.qtypes import QTYPE_INFO, QType
from lstream.backends import cpu_quant_deq as _dq
from lstream.backends.cpu_ops_kernels import gelu_tanh, rms_norm, swiglu  # noqa: F401

__all__ = ["set_threads", "dequantize", "PackedWeight", "pack", "matmul", "get_rows",
           "rms_norm", "swiglu", "gelu_tanh", "SUPPORTED"]

# qtype -> (dequant kernel, byte offset of fp16 d, byte offset of fp16 m/dmin or -1)
_DQ = {
    QType.Q4_0: (_dq.dq_q4_0, 0, -1),
    QType.Q4_1: (_dq.dq_q4_1, 0, 2),
    QType.Q5_0: (_dq.dq_q5_0, 0, -1),
    QType.Q5_1: (_dq.dq_q5_1, 0, 2),
    QType.Q8_0: (_dq.dq_q8_0, 0, -1),
    QType.Q4_K: (_dq.dq_q4_k, 0, 2),
    QType.Q5_K: (_dq.dq_q5_k, 0, 2),
    QType.Q6_K: (_dq.dq_q6_k, 208, -1),
}
_FLOAT = (QType.F32, QType.F16, QType.BF16)
SUPPORTED = frozenset(_FLOAT) | frozenset(_DQ)


def set_threads(n: int) -> None:
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def _fp16_field(blocks: np.ndarray, off: int) -> np.ndarray:
    """fp16 field at byte offset `off` of each block -> float32 (n_blocks,)."""
    return np.ascontiguousarray(blocks[:, off:off + 2]).view(np.float16).reshape(-1).astype(np.float32)


def _float_rows(qtype: QType, raw: np.ndarray, n_cols: int) -> np.ndarray:
    if qtype == QType.F32:
        a = raw if raw.dtype == np.float32 else np.ascontiguousarray(raw).view(np.float32)
        return a.reshape(-1, n_cols)
    if qtype == QType.F16:
        a = raw if raw.dtype == np.float16 else np.ascontiguousarray(raw).view(np.float16)
        return a.reshape(-1, n_cols).astype(np.float32)
    # BF16: bits << 16
    a = raw if raw.dtype in (np.uint16, np.int16) else np.ascontiguousarray(raw).view(np.uint16)
    a = a.reshape(-1, n_cols)
    return (a.astype(np.uint32) << 16).view(np.float32)


def dequantize(qtype: QType, raw: np.ndarray, n_cols: int) -> np.ndarray:
    qtype = QType(qtype)
    if qtype in _FLOAT:
        return _float_rows(qtype, raw, n_cols)
    if qtype not in _DQ:
        raise NotImplementedError(f"dequantize: {qtype.name} not supported")
    info = QTYPE_INFO[qtype]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, info.type_size)
    n_blocks = blocks.shape[0]
    out = np.empty((n_blocks, info.block_size), dtype=np.float32)
    if n_blocks:
        kern, doff, moff = _DQ[qtype]
        d = _fp16_field(blocks, doff)
        m = _fp16_field(blocks, moff) if moff >= 0 else d
        kern(blocks, d, m, out)
    return out.reshape(-1, n_cols)


class PackedWeight:
    """A weight tensor ready for matmul. Holds the raw (memmapped) blocks plus per-type repacked data."""

    def __init__(self, qtype: QType, raw: np.ndarray, n_rows: int, n_cols: int):
        self.qtype = QType(qtype)
        self.n_rows = int(n_rows)
        self.n_cols = int(n_cols)
        self.raw = raw
        self.nbytes = int(raw.nbytes)
        self._buf = None  # reused float32 tile

    def __repr__(self):
        return f"PackedWeight({self.qtype.name}, {self.n_rows}x{self.n_cols}, {self.nbytes} B)"


def pack(qtype: QType, raw: np.ndarray, n_rows: int, n_cols: int) -> PackedWeight:
    qtype = QType(qtype)
    if qtype not in SUPPORTED:
        raise NotImplementedError(f"pack: {qtype.name} not supported")
    info = QTYPE_INFO[qtype]
    if qtype in _FLOAT:
        if qtype == QType.F32:
            raw = raw if raw.dtype == np.float32 else raw.view(np.float32)
        elif qtype == QType.F16:
            raw = raw if raw.dtype == np.float16 else raw.view(np.float16)
        else:
            raw = raw if raw.dtype == np.uint16 else raw.view(np.uint16)
        raw = raw.reshape(n_rows, n_cols)
    else:
        raw = raw.view(np.uint8).reshape(n_rows, n_cols // info.block_size * info.type_size)
    return PackedWeight(qtype, raw, n_rows, n_cols)


_TILE_ELEMS = 1 << 18  # float32 elements per dequantized tile (1 MiB)


def matmul(w: PackedWeight, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    squeeze = x.ndim == 1
    x2 = x.reshape(-1, w.n_cols)
    n_tok = x2.shape[0]
    if out is None:
        out = np.empty((n_tok, w.n_rows), dtype=np.float32)
    o2 = out.reshape(n_tok, w.n_rows)
    if w.qtype == QType.F32:
        np.matmul(x2, w.raw.T, out=o2)
        return out.reshape(-1) if squeeze and out.ndim == 1 else out
    rows = max(1, _TILE_ELEMS // w.n_cols)
    for r0 in range(0, w.n_rows, rows):
        r1 = min(w.n_rows, r0 + rows)
        tile = dequantize(w.qtype, w.raw[r0:r1], w.n_cols)
        o2[:, r0:r1] = x2 @ tile.T
    return out


def get_rows(w: PackedWeight, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return dequantize(w.qtype, w.raw[ids], w.n_cols)
