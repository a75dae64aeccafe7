"""Weights ready for the CPU kernels: pack() repacks a GGUF tensor once at load (PackedWeight, in one of
the layouts the int16 kernels read), concat_rows() stacks projections that share an input, row_view()
and get_rows() read parts of one."""
from __future__ import annotations

import numpy as np

from ...core.qtypes import QTYPE_INFO, QType
from . import blocks, matmul_int
from .dequant import FLOAT_TYPES, SUPPORTED, dequantize, fp16_field, k_block_scales
from .llvm_ir import HAVE_AVX2
from .threads import spin_by_default

_EMPTY_U32 = np.zeros(1, dtype=np.uint32)
_EMPTY_F32 = np.zeros(1, dtype=np.float32)
M_MUL = {QType.Q4_0: -8, QType.Q5_0: -16}  # their m (the offset of unsigned values) is M_MUL * d: not stored
HALF_LAYOUTS = ("nibw", "nib5h")  # fp16 scales


class PackedWeight:
    """A weight tensor ready for matmul.

    layout "nib":    qs uint8 (n_rows*nb*16) nibbles, d/m float32 (n_rows*nb)  (Q4_K)
    layout "nib5":   "nib" plus qh uint32 (n_rows*nb): bit j = 5th bit of value j (Q5_K)
    layout "nibw":   nibbles in 16-bit word order (nib_half.py), d/m float16: the file's own scales,
                     m None for Q4_0 (-8d)                                      (Q4_0, Q4_1)
    layout "nib5h":  "nib5" with d/m float16, m None for Q5_0 (-16d)             (Q5_0, Q5_1)
    layout "i8":     qs int8 (n_rows*nb*32), d float32, optional m               (Q8_0)
    layout "i8s16":  qs int8, d per 16 values                                    (Q6_K)
    layout "blk":    qs = the GGUF blocks themselves, uint8 (n_rows*row_bytes) (Q4_0, Q4_1, Q5_0, Q5_1,
                     Q8_0: blocks.py; fewer bytes per weight than the repacked layouts, one stream)
    layout "float":  F32/F16/BF16 rows (and any quant type without AVX2): tile-dequantize + BLAS
    `raw` keeps the zero-copy GGUF view for get_rows (bit-exact) -- it is only read for looked-up rows.
    """

    def __init__(self, qtype, raw, n_rows, n_cols, layout="float", qs=None, d=None, m=None, qh=None):
        self.qtype = QType(qtype)
        self.n_rows = int(n_rows)
        self.n_cols = int(n_cols)
        self.raw = raw
        self.layout = layout
        self.qs, self.d, self.m, self.qh = qs, d, m, qh
        self.act8 = False  # "nibw" with int8 activations (matmul_int.L_NIBW8): set before kernel_args()
        self._matvec = None  # matvec1's prebuilt call
        self._args = None  # kernel_args()
        if layout == "float":
            self.nbytes = int(raw.nbytes)
        else:
            self.nbytes = sum(int(a.nbytes) for a in (qs, d, m, qh) if a is not None)

    def kernel_args(self) -> tuple:
        """(wk, qs, qh, d, m) for matmul_int's mm_int / mm_dec: read-only arrays (never written after
        packing), the same types for every layout, so one compilation serves all of them."""
        a = self._args
        if a is None:
            fmt = 0
            if self.layout == "blk":
                fmt = blocks.FMT_ID[blocks.QTYPES[self.qtype]]
            elif self.layout in HALF_LAYOUTS:  # fp16 scales: fmt = m's multiplier
                fmt = 1 if self.m is not None else M_MUL[self.qtype]
            lid = matmul_int.L_NIBW8 if self.int8_act else matmul_int.LAYOUT_ID[self.layout]
            wk = np.array([lid, fmt, self.n_cols // 32, int(self.m is not None)], np.int64)
            d = self.d if self.d is not None else _EMPTY_F32
            m = self.m if self.m is not None else (d if fmt < 0 else _EMPTY_F32)  # m = fmt*d: read d twice
            # the scales as bytes: float32 or float16 by layout, one compiled driver for both
            a = self._args = (wk, _ro(self.qs.view(np.uint8)), _ro(self.qh if self.qh is not None else _EMPTY_U32),
                              _ro(d.view(np.uint8)), _ro(m.view(np.uint8)))
        return a

    @property
    def act_fmt(self) -> int:
        """The activation format its int kernels read (matmul_int.ACT_*)."""
        return int(matmul_int.act_fmt_of(int(self.kernel_args()[0][0]))) if self.layout in matmul_int.LAYOUT_ID else 0

    @property
    def int8_act(self) -> bool:
        """The int kernels quantize x to int8 for this weight (matmul_int.quant_row8), else int16."""
        return self.act8 and self.layout == "nibw"

    def scales_f32(self) -> tuple:
        """(d, m) as float32 arrays (m computed for Q4_0/Q5_0; None for types without one): the
        kernels that take float32 scales (matmul._matmul_tiles' dequantization)."""
        d = None if self.d is None else self.d.astype(np.float32)
        if self.m is not None:
            return d, self.m.astype(np.float32)
        return d, (d * np.float32(M_MUL[self.qtype]) if self.qtype in M_MUL else None)

    def matvec1(self, x: np.ndarray) -> np.ndarray:
        """x (1, n_cols) float32 C-contiguous @ W^T, decode's fast path: the activation buffers live
        on the weight and the kernel call is prebuilt (saves ~4 us of Python per call, ~0.5 ms/token).
        Not reentrant for one weight: the executor calls a backend from one thread."""
        f = self._matvec
        if f is None:
            nb = self.n_cols // 32
            xq = np.empty((1, self.n_cols), dtype=np.int16)
            xd = np.empty((1, nb), dtype=np.float32)
            xs = np.empty((1, nb), dtype=np.float32)
            pre, n_rows = self.kernel_args(), self.n_rows

            def f(x):
                out = np.empty((1, n_rows), dtype=np.float32)
                matmul_int.mm_dec(*pre, x, xq, xd, xs, out)
                return out

            self._matvec = f
        return f(x)

    def __repr__(self):
        return f"PackedWeight({self.qtype.name}, {self.n_rows}x{self.n_cols}, {self.layout}, {self.nbytes} B)"


def _ro(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.setflags(write=False)
    return v


def word_order(qs: np.ndarray) -> np.ndarray:
    """GGUF nibbles (..., 16) (byte j: value j low, j+16 high) -> word order (..., 16): byte 2k holds
    values k (low) and k+8, byte 2k+1 values k+16 and k+24 (nib_half.word_nibbles)."""
    v = np.concatenate([qs & 15, qs >> 4], axis=-1)  # (..., 32) values in order
    out = np.empty_like(qs)
    out[..., 0::2] = v[..., 0:8] | (v[..., 8:16] << 4)
    out[..., 1::2] = v[..., 16:24] | (v[..., 24:32] << 4)
    return out


def _nib_pack(lo4: np.ndarray) -> np.ndarray:
    """(..., 32) uint8 values 0..15 -> (..., 16) bytes: byte j = v[j] | v[j+16] << 4."""
    return (lo4[..., :16] | (lo4[..., 16:] << 4)).astype(np.uint8)


def _f16(blocks: np.ndarray, off: int) -> np.ndarray:
    """The fp16 field at byte offset `off` of each block, as float16 (n_blocks,)."""
    return np.ascontiguousarray(blocks[:, off:off + 2]).view(np.float16).reshape(-1)


def _repack(qtype: QType, blocks: np.ndarray, n_rows: int, n_cols: int):
    """GGUF blocks (n_blocks, type_size) -> (layout, qs, d, m) in 32-value sub-blocks."""
    f32 = np.float32
    if qtype in (QType.Q4_0, QType.Q4_1):
        o = 0 if qtype == QType.Q4_0 else 2
        qs = word_order(blocks[:, 2 + o:18 + o]).reshape(-1)
        return "nibw", qs, _f16(blocks, 0), None if qtype == QType.Q4_0 else _f16(blocks, 2)
    if qtype == QType.Q8_0:
        return "i8", np.ascontiguousarray(blocks[:, 2:34]).view(np.int8).reshape(-1), fp16_field(blocks, 0), None
    if qtype in (QType.Q5_0, QType.Q5_1):
        o = 0 if qtype == QType.Q5_0 else 2
        qh = np.ascontiguousarray(blocks[:, 2 + o:6 + o]).view(np.uint32).reshape(-1)
        qs = np.ascontiguousarray(blocks[:, 6 + o:22 + o]).reshape(-1)
        return "nib5h", (qs, qh), _f16(blocks, 0), None if qtype == QType.Q5_0 else _f16(blocks, 2)
    if qtype in (QType.Q4_K, QType.Q5_K):
        n = blocks.shape[0]
        ds, ms = k_block_scales(blocks)  # (n, 8)
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
        d16 = (fp16_field(blocks, 208)[:, None] * sc).astype(f32)
        return "i8s16", q.reshape(-1), d16.reshape(-1), None
    raise NotImplementedError(qtype.name)


_PACK_CHUNK = 1 << 16  # blocks per repacking chunk (bounds temporary memory)


def blk_types(choice: str = "default") -> frozenset:
    """Quant types computed on their GGUF blocks in place (layout "blk") for Options.cpu_blk.
    "default": Q8_0, as fast as its repacked layout and no second copy (Gemma 3's tied 262144x640
    head: -365 MiB RSS). The 4/5-bit types measured faster repacked (f32 scales in their own arrays:
    fewer instructions per block, ~7% on a hot matvec; decode back to back, SmolLM2 tg128 median
    ms/token repack 7.95/7.10/9.27 vs blk 8.15/7.70/11.00), so they stay repacked; "all": all five
    in place, "none": none (for comparisons)."""
    if not HAVE_AVX2 or choice == "none":
        return frozenset()
    return frozenset(blocks.QTYPES) if choice == "all" else frozenset({QType.Q8_0})


DEFAULT_BLK_TYPES = blk_types()


def pack(qtype: QType, raw: np.ndarray, n_rows: int, n_cols: int,
         blk_types: frozenset = DEFAULT_BLK_TYPES) -> PackedWeight:
    """GGUF data (n_rows x n_cols of qtype) -> PackedWeight: quant types in blk_types stay GGUF blocks
    (layout "blk"), the others are repacked (in chunks); float types and hosts without AVX2: "float"."""
    spin_by_default()  # packing comes before the first matmul, also without a CPUBackend (calibration)
    qtype = QType(qtype)
    if qtype not in SUPPORTED:
        raise NotImplementedError(f"pack: {qtype.name} not supported")
    info = QTYPE_INFO[qtype]
    if qtype in FLOAT_TYPES:
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
    if qtype in blk_types:
        return PackedWeight(qtype, raw, n_rows, n_cols, "blk", np.ascontiguousarray(raw).reshape(-1))
    blocks = raw.reshape(-1, info.type_size)
    parts = [_repack(qtype, blocks[i:i + _PACK_CHUNK], n_rows, n_cols)
             for i in range(0, blocks.shape[0], _PACK_CHUNK)]
    layout = parts[0][0]
    qh = None
    if layout in ("nib5", "nib5h"):
        qh = np.ascontiguousarray(np.concatenate([p[1][1] for p in parts]))
        parts = [(p[0], p[1][0], p[2], p[3]) for p in parts]
    qs = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    d = np.concatenate([p[2] for p in parts]) if len(parts) > 1 else parts[0][2]
    m = None
    if parts[0][3] is not None:
        m = np.concatenate([p[3] for p in parts]) if len(parts) > 1 else parts[0][3]
    qs = np.ascontiguousarray(qs)
    d = np.ascontiguousarray(d)
    m = None if m is None else np.ascontiguousarray(m)
    return PackedWeight(qtype, raw, n_rows, n_cols, layout, qs, d, m, qh)


def concat_rows(ws: list[PackedWeight]) -> tuple[PackedWeight, list[PackedWeight]]:
    """Stack packed weights of one qtype and n_cols along rows (q|k|v, gate|up: one matmul call
    for all).  Returns the stacked weight and a row-slice view of it for each input (no copy)."""
    w0 = ws[0]
    assert all(w.qtype == w0.qtype and w.n_cols == w0.n_cols and w.layout == w0.layout != "float" for w in ws)
    n_rows = sum(w.n_rows for w in ws)
    raw = None  # the stacked weight has no GGUF view (get_rows is asked of the single tensors)
    cat = lambda attr: None if getattr(ws[0], attr, None) is None else np.ascontiguousarray(
        np.concatenate([getattr(w, attr) for w in ws]))
    big = PackedWeight(w0.qtype, raw, n_rows, w0.n_cols, w0.layout, cat("qs"), cat("d"), cat("m"), cat("qh"))
    big.act8 = w0.act8
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
    v = PackedWeight(w.qtype, raw, r1 - r0, w.n_cols, w.layout, f(w.qs), f(w.d), f(w.m), f(w.qh))
    v.act8 = w.act8
    return v


def get_rows(w: PackedWeight, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of the weight, float32, bit-exact (the embedding lookup): from the GGUF view."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return dequantize(w.qtype, w.raw[ids], w.n_cols)
