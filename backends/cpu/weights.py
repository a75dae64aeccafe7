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

import os

# numba's OpenMP workers must spin between the many small parallel calls of decode: with libgomp's
# default wait policy an idle worker sleeps and every prange launch costs 4-8 ms on this VM (measured),
# vs ~2 us when spinning.  Only a default: the user's environment wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000000")

import numba  # noqa: E402
import numpy as np  # noqa: E402

from ...core.qtypes import QTYPE_INFO, QType
from . import dequant as _dq
from .ops import attention, geglu, gelu_tanh, rms_norm, rope, rope_inplace, swiglu  # noqa: F401

try:
    import llvmlite.binding as _llb

    HAVE_AVX2 = bool(_llb.get_host_cpu_features().get("avx2", False))
except Exception:  # pragma: no cover
    HAVE_AVX2 = False
if HAVE_AVX2:
    from . import matmul_int as _mm
    from . import matmul_blas as _blas
    from . import blocks as _blk
else:  # pragma: no cover
    _blas = None

__all__ = ["set_threads", "dequantize", "PackedWeight", "pack", "matmul", "get_rows", "concat_rows", "row_view",
           "rms_norm", "swiglu", "geglu", "gelu_tanh", "rope", "rope_inplace", "attention", "SUPPORTED"]

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


_EMPTY_U8 = np.zeros(0, dtype=np.uint8)


def set_threads(n: int) -> None:
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def _torch():
    """torch, imported on first use (F16 rows): importing it costs ~1.2 s of every start."""
    try:
        import torch
        return torch
    except Exception:  # pragma: no cover
        return None


def _fp16_field(blocks: np.ndarray, off: int) -> np.ndarray:
    """fp16 field at byte offset `off` of each block -> float32 (n_blocks,)."""
    return np.ascontiguousarray(blocks[:, off:off + 2]).view(np.float16).reshape(-1).astype(np.float32)


def _float_rows(qtype: QType, raw: np.ndarray, n_cols: int) -> np.ndarray:
    if qtype == QType.F32:
        a = raw if raw.dtype == np.float32 else np.ascontiguousarray(raw).view(np.float32)
        return a.reshape(-1, n_cols)
    if qtype == QType.F16:
        a = raw if raw.dtype == np.float16 else np.ascontiguousarray(raw).view(np.float16)
        a = np.ascontiguousarray(a.reshape(-1, n_cols))
        if a.size >= 4096 and (torch := _torch()) is not None:  # exact conversion, vectorized (F16C), ~20x numpy
            return torch.from_numpy(a).float().numpy()
        return a.astype(np.float32)
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
    """A weight tensor ready for matmul.

    layout "nib":    qs uint8 (n_rows*nb*16) nibbles, d/m float32 (n_rows*nb)  (Q4_0, Q4_1, Q4_K)
    layout "nib5":   "nib" plus qh uint32 (n_rows*nb): bit j = 5th bit of value j (Q5_0, Q5_1, Q5_K)
    layout "i8":     qs int8 (n_rows*nb*32), d float32, optional m               (Q8_0)
    layout "i8s16":  qs int8, d per 16 values                                    (Q6_K)
    layout "blk":    qs = the GGUF blocks themselves, uint8 (n_rows*row_bytes) (Q4_0, Q4_1, Q5_0, Q5_1,
                     Q8_0: cpu_quant_blk; fewer bytes per weight than the repacked layouts, one stream)
    layout "float":  F32/F16/BF16 rows (and any quant type without AVX2): tile-dequantize + BLAS
    `raw` keeps the zero-copy GGUF view for get_rows (bit-exact) -- it is only read for looked-up rows.
    """

    def __init__(self, qtype, raw, n_rows, n_cols, layout="float", qs=None, d=None, m=None):
        self.qtype = QType(qtype)
        self.n_rows = int(n_rows)
        self.n_cols = int(n_cols)
        self.raw = raw
        self.layout = layout
        self.qs, self.d, self.m = qs, d, m
        self._mv = None  # decode fast path (built on first use)
        self._dec = None  # kernel_args()
        if layout == "float":
            self.nbytes = int(raw.nbytes)
        else:
            self.nbytes = int(qs.nbytes + (d.nbytes if d is not None else 0) + (m.nbytes if m is not None else 0))

    def kernel_args(self) -> tuple:
        """(wk, qs, qh, d, m) for matmul_int's mm_int / mm_dec: read-only arrays (never written after
        packing), the same types for every layout, so one compilation serves all of them."""
        a = self._dec
        if a is None:
            fmt = _blk.FMT_ID[_blk.QTYPES[self.qtype]] if self.layout == "blk" else 0
            wk = np.array([_mm.LAYOUT_ID[self.layout], fmt, self.n_cols // 32, int(self.m is not None)], np.int64)
            qh = getattr(self, "qh", None)
            a = self._dec = (wk, _ro(self.qs.view(np.uint8)), _ro(qh if qh is not None else _EMPTY_U32),
                             _ro(self.d if self.d is not None else _EMPTY_F32), _ro(self.m if self.m is not None else _EMPTY_F32))
        return a

    def __repr__(self):
        return f"PackedWeight({self.qtype.name}, {self.n_rows}x{self.n_cols}, {self.layout}, {self.nbytes} B)"


def _ro(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.setflags(write=False)
    return v


def _nib_pack(lo4: np.ndarray) -> np.ndarray:
    """(..., 32) uint8 values 0..15 -> (..., 16) bytes: byte j = v[j] | v[j+16] << 4."""
    return (lo4[..., :16] | (lo4[..., 16:] << 4)).astype(np.uint8)


def _k_scale_min(s: np.ndarray):
    """(N, 12) packed 6-bit scales/mins of Q4_K/Q5_K -> sc, mn (N, 8) float32."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _unpack_5bit(blocks: np.ndarray, qh_off: int, qs_off: int) -> np.ndarray:
    """Q5_0/Q5_1 blocks -> (N, 32) uint8 values 0..31."""
    qs = blocks[:, qs_off:qs_off + 16]
    lo = np.concatenate([qs & 15, qs >> 4], axis=1)
    qh = np.ascontiguousarray(blocks[:, qh_off:qh_off + 4]).view(np.uint32).reshape(-1, 1)
    hb = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    return lo | (hb << 4)


def _repack(qtype: QType, blocks: np.ndarray, n_rows: int, n_cols: int):
    """GGUF blocks (n_blocks, type_size) -> (layout, qs, d, m) in 32-value sub-blocks."""
    f32 = np.float32
    if qtype in (QType.Q4_0, QType.Q4_1):
        d = _fp16_field(blocks, 0)
        if qtype == QType.Q4_0:
            return "nib", np.ascontiguousarray(blocks[:, 2:18]).reshape(-1), d, (d * f32(-8)).astype(f32)
        return "nib", np.ascontiguousarray(blocks[:, 4:20]).reshape(-1), d, _fp16_field(blocks, 2)
    if qtype == QType.Q8_0:
        return "i8", np.ascontiguousarray(blocks[:, 2:34]).view(np.int8).reshape(-1), _fp16_field(blocks, 0), None
    if qtype in (QType.Q5_0, QType.Q5_1):
        d = _fp16_field(blocks, 0)
        o = 0 if qtype == QType.Q5_0 else 2
        qh = np.ascontiguousarray(blocks[:, 2 + o:6 + o]).view(np.uint32).reshape(-1)
        qs = np.ascontiguousarray(blocks[:, 6 + o:22 + o]).reshape(-1)
        m = (d * f32(-16)).astype(f32) if qtype == QType.Q5_0 else _fp16_field(blocks, 2)
        return "nib5", (qs, qh), d, m
    if qtype in (QType.Q4_K, QType.Q5_K):
        n = blocks.shape[0]
        d = _fp16_field(blocks, 0)[:, None]
        dmin = _fp16_field(blocks, 2)[:, None]
        sc, mn = _k_scale_min(blocks[:, 4:16])
        ds = (d * sc).astype(f32)  # (n, 8)
        ms = (dmin * mn).astype(f32)
        qoff = 16 if qtype == QType.Q4_K else 48
        qs = blocks[:, qoff:qoff + 128].reshape(n, 4, 1, 32)
        v = (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 15  # (n, 4, 2, 32) = sub 2c+h
        v = v.reshape(n, 8, 32)
        if qtype == QType.Q4_K:
            return "nib", _nib_pack(v).reshape(-1), ds.reshape(-1), (-ms).reshape(-1)
        qh = blocks[:, 16:48].reshape(n, 1, 32)
        hb = ((qh >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).astype(np.uint32)  # (n, 8, 32)
        bits = (hb << np.arange(32, dtype=np.uint32)).sum(axis=2, dtype=np.uint32)  # (n, 8)
        return "nib5", (_nib_pack(v).reshape(-1), bits.reshape(-1)), ds.reshape(-1), (-ms).reshape(-1)
    if qtype == QType.Q6_K:
        n = blocks.shape[0]
        ql = blocks[:, 0:128].reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        ql = (ql & 15).reshape(n, 8, 32)
        qh = blocks[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        qh = (qh & 3).reshape(n, 8, 32)
        q = (ql | (qh << 4)).astype(np.int8) - np.int8(32)
        sc = blocks[:, 192:208].view(np.int8).astype(f32)
        d16 = (_fp16_field(blocks, 208)[:, None] * sc).astype(f32)
        return "i8s16", q.reshape(-1), d16.reshape(-1), None
    raise NotImplementedError(qtype.name)


_PACK_CHUNK = 1 << 16  # blocks per repacking chunk (bounds temporary memory)
# Types computed on their GGUF blocks in place (layout "blk").  Q8_0 by default: as fast as its repacked
# layout and no second copy (Gemma 3's tied 262144x640 head: -365 MiB RSS).  The 4/5-bit types measured
# faster repacked (f32 scales in their own arrays: fewer instructions per block, ~7% on a hot matvec;
# decode back to back, SmolLM2 tg128 median ms/token repack 7.95/7.10/9.27 vs blk 8.15/7.70/11.00), so
# they stay repacked.  LSTREAM_CPU_BLK=all: all five in place; =none: none (for comparisons).
_BLK_ENV = os.environ.get("LSTREAM_CPU_BLK", "")
_BLK_TYPES = frozenset() if not HAVE_AVX2 or _BLK_ENV == "none" else (
    frozenset(_blk.QTYPES) if _BLK_ENV == "all" else frozenset({QType.Q8_0}))


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
        return PackedWeight(qtype, raw.reshape(n_rows, n_cols), n_rows, n_cols)
    raw = raw.view(np.uint8).reshape(n_rows, n_cols // info.block_size * info.type_size)
    if not HAVE_AVX2:
        return PackedWeight(qtype, raw, n_rows, n_cols)
    if qtype in _BLK_TYPES:
        return PackedWeight(qtype, raw, n_rows, n_cols, "blk", np.ascontiguousarray(raw).reshape(-1))
    blocks = raw.reshape(-1, info.type_size)
    parts = [_repack(qtype, blocks[i:i + _PACK_CHUNK], n_rows, n_cols)
             for i in range(0, blocks.shape[0], _PACK_CHUNK)]
    layout = parts[0][0]
    qh = None
    if layout == "nib5":
        qh = np.ascontiguousarray(np.concatenate([p[1][1] for p in parts]))
        parts = [(p[0], p[1][0], p[2], p[3]) for p in parts]
    qs = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    d = np.concatenate([p[2] for p in parts]) if len(parts) > 1 else parts[0][2]
    m = None
    if parts[0][3] is not None:
        m = np.concatenate([p[3] for p in parts]) if len(parts) > 1 else parts[0][3]
    qs = np.ascontiguousarray(qs)
    d = np.ascontiguousarray(d, dtype=np.float32)
    m = None if m is None else np.ascontiguousarray(m, dtype=np.float32)
    pw = PackedWeight(qtype, raw, n_rows, n_cols, layout, qs, d, m)
    if qh is not None:
        pw.qh = qh
        pw.nbytes += int(qh.nbytes)
    return pw


def concat_rows(ws: list[PackedWeight]) -> tuple[PackedWeight, list[PackedWeight]]:
    """Stack packed weights of one qtype and n_cols along rows (q|k|v, gate|up: one matmul call
    for all).  Returns the stacked weight and a row-slice view of it for each input (no copy)."""
    w0 = ws[0]
    assert all(w.qtype == w0.qtype and w.n_cols == w0.n_cols and w.layout == w0.layout != "float" for w in ws)
    n_rows = sum(w.n_rows for w in ws)
    raw = None  # the stacked weight has no GGUF view (get_rows is asked of the single tensors)
    cat = lambda attr: None if getattr(ws[0], attr, None) is None else np.ascontiguousarray(
        np.concatenate([getattr(w, attr) for w in ws]))
    big = PackedWeight(w0.qtype, raw, n_rows, w0.n_cols, w0.layout, cat("qs"), cat("d"), cat("m"))
    if w0.layout == "nib5":
        big.qh = cat("qh")
        big.nbytes += int(big.qh.nbytes)
    views, r0 = [], 0
    for w in ws:
        v = row_view(big, r0, r0 + w.n_rows)
        v.raw = w.raw
        views.append(v)
        r0 += w.n_rows
    return big, views


def row_view(w: PackedWeight, r0: int, r1: int) -> PackedWeight:
    """Rows [r0, r1) of a packed weight, sharing its memory."""
    f = lambda a: None if a is None else a[r0 * a.size // w.n_rows: r1 * a.size // w.n_rows]
    raw = None if w.raw is None else w.raw[r0:r1]
    v = PackedWeight(w.qtype, raw, r1 - r0, w.n_cols, w.layout, f(w.qs), f(w.d), f(w.m))
    if w.layout == "nib5":
        v.qh = f(w.qh)
        v.nbytes += int(v.qh.nbytes)
    return v


_SERIAL_QUANT_TOK = 8  # up to this many tokens: cpu_quant_dec.mm_dec (activations quantized inside)
_TILE_ELEMS = 1 << 18  # float32 elements per dequantized tile (1 MiB)
_EMPTY_F32 = np.zeros(1, dtype=np.float32)


def _matvec1(w: PackedWeight, x: np.ndarray) -> np.ndarray:
    """Decode fast path (one token, x (1, n_cols) float32 C-contiguous): the activation buffers live
    on the weight and the kernel call is prebuilt (saves ~4 us of Python per call, ~0.5 ms/token).
    Not reentrant for one weight: the executor calls a backend from one thread."""
    f = w._mv
    if f is None:
        nb = w.n_cols // 32
        xq = np.empty((1, w.n_cols), dtype=np.int16)
        xd = np.empty((1, nb), dtype=np.float32)
        xs = np.empty((1, nb), dtype=np.float32)
        pre, n_rows = w.kernel_args(), w.n_rows

        def f(x):
            out = np.empty((1, n_rows), dtype=np.float32)
            _mm.mm_dec(*pre, x, xq, xd, xs, out)
            return out

        w._mv = f
    return f(x)


def matmul(w: PackedWeight, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    if out is None and x.ndim == 2 and x.shape[0] == 1 and x.dtype == np.float32 and x.flags.c_contiguous \
            and w.layout != "float" and _BLAS_MIN_TOK > 1 and x.shape[1] == w.n_cols:
        return _matvec1(w, x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    x2 = x.reshape(-1, w.n_cols)
    n_tok = x2.shape[0]
    if out is None:
        out = np.empty((n_tok, w.n_rows), dtype=np.float32)
    o2 = out.reshape(n_tok, w.n_rows)
    if n_tok == 0:
        return out
    if w.layout == "float":
        if w.qtype == QType.F32:
            if _blas is not None and _blas.AVAILABLE and o2.flags.c_contiguous and w.raw.flags.c_contiguous \
                    and w.raw.dtype == np.float32:
                with _blas.one_blas_thread():
                    _blas.mm_deq_sgemm(_blas.F32, _EMPTY_U8, _EMPTY_U32, _EMPTY_F32, _EMPTY_F32, w.raw, x2, o2, 0,
                                       numba.get_num_threads())
            else:
                np.matmul(x2, w.raw.T, out=o2)
            return out
        rows = max(1, _TILE_ELEMS // w.n_cols)
        for r0 in range(0, w.n_rows, rows):
            r1 = min(w.n_rows, r0 + rows)
            tile = dequantize(w.qtype, w.raw[r0:r1], w.n_cols)
            o2[:, r0:r1] = x2 @ tile.T
        return out
    nb = w.n_cols // 32
    if n_tok >= _BLAS_MIN_TOK:
        if _BLAS_LAYOUT.get(w.layout) is not None and (w.m is None or w.layout in ("nib", "nib5", "blk")):
            _matmul_blas(w, x2, o2)
        else:
            _matmul_tiles(w, x2, o2, nb)
        return out
    xq = np.empty((n_tok, w.n_cols), dtype=np.int16)
    xd = np.empty((n_tok, nb), dtype=np.float32)
    xs = np.empty((n_tok, nb), dtype=np.float32)
    dst = o2 if o2.flags.c_contiguous else np.empty((n_tok, w.n_rows), dtype=np.float32)
    if n_tok <= _SERIAL_QUANT_TOK:  # decode: x quantized inside the call
        _mm.mm_dec(*w.kernel_args(), x2, xq, xd, xs, dst)
    else:
        _mm.quant_x(x2, xq, xd, xs)
        _mm.mm_int(*w.kernel_args(), xq, xd, xs, dst)
    if dst is not o2:
        o2[...] = dst
    return out


# From this many tokens, quantized matmuls dequantize tiles of rows and call float32 sgemm
# (cpu_blas: numba's threads each call numpy's OpenBLAS single-threaded on their rows; ~80 G
# weight*tokens/s on 2 threads vs 25-45 for the int16 kernels at 512 tokens; measured crossover
# 16-32 tokens).  Calling numpy's multi-threaded matmul between numba kernels instead collapses
# both pools (spinning, tools/kernel_notes.md), hence _matmul_tiles is only the fallback.
# tools/accuracy_check sets this to 1 for its reference path (dequantize + float32 sgemm everywhere).
_BLAS_MIN_TOK = 32 if (_blas is not None and _blas.AVAILABLE) else 1 << 62
_EMPTY_U32 = np.zeros(1, dtype=np.uint32)
_EMPTY_F32_2D = np.zeros((1, 1), dtype=np.float32)
_BLAS_LAYOUT = {} if _blas is None or not _blas.AVAILABLE else \
    {"nib": _blas.NIB, "nib5": _blas.NIB5, "i8": _blas.I8, "i8s16": _blas.I8S16, "blk": _blas.BLK}
_BLAS_TILE_ELEMS = 1 << 17  # float32 weights per thread's dequantized tile (512 KiB, in L2)


def _matmul_blas(w: PackedWeight, x2: np.ndarray, o2: np.ndarray) -> None:
    dst = o2 if o2.flags.c_contiguous else np.empty(o2.shape, dtype=np.float32)
    tile = max(16, min(256, _BLAS_TILE_ELEMS // w.n_cols))
    qh = w.qh if w.layout == "nib5" else _EMPTY_U32
    layout = _BLAS_LAYOUT[w.layout]
    if w.layout == "blk":
        layout += _blk.FMT_ID[_blk.QTYPES[w.qtype]]
    with _blas.one_blas_thread():
        _blas.mm_deq_sgemm(layout, w.qs, qh, w.d if w.d is not None else _EMPTY_F32,
                           w.m if w.m is not None else _EMPTY_F32, _EMPTY_F32_2D, x2, dst, tile,
                           numba.get_num_threads())
    if dst is not o2:
        o2[...] = dst


def _matmul_tiles(w: PackedWeight, x2: np.ndarray, o2: np.ndarray, nb: int) -> None:
    rows = max(16, _TILE_ELEMS // w.n_cols)
    buf = np.empty((min(rows, w.n_rows), w.n_cols), dtype=np.float32)
    for r0 in range(0, w.n_rows, rows):
        r1 = min(w.n_rows, r0 + rows)
        tile = buf[:r1 - r0]
        if w.layout == "blk":
            tile[...] = dequantize(w.qtype, w.qs.reshape(w.n_rows, -1)[r0:r1], w.n_cols)
        elif w.layout in ("nib", "nib5"):
            has_h = w.layout == "nib5"
            _dq.deq_nib(w.qs, w.qh if has_h else _EMPTY_U32, has_h, w.d, w.m, r0, r1, nb, tile)
        else:
            has_m = w.m is not None
            _dq.deq_i8(w.qs, w.d, w.layout == "i8s16", w.m if has_m else _EMPTY_F32, has_m, r0, r1, nb, tile)
        np.matmul(x2, tile.T, out=o2[:, r0:r1])


def get_rows(w: PackedWeight, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return dequantize(w.qtype, w.raw[ids], w.n_cols)
