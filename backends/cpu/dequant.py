"""Dequantization to float32: GGUF blocks bit-exact against gguf-py (embedding rows, norm vectors,
float-layout weights, references), and tiles of packed rows (prefill when numba's threads cannot
call OpenBLAS)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...core.qtypes import QTYPE_INFO, QType
from .jit import EXACT, EXACT_PAR, PAR

# The block kernels take the blocks as uint8 (n_blocks, type_size) and the fp16 scales already converted
# to float32 (numpy converts exactly), and write (n_blocks, block_size). They are compiled WITHOUT
# fastmath so that no multiply-add is contracted into an FMA: gguf-py rounds after every operation.

_JIT = EXACT_PAR


@njit(**_JIT)
def dq_q4_0(blk, d, m, out):
    for b in prange(blk.shape[0]):
        db = d[b]
        for j in range(16):
            v = blk[b, 2 + j]
            out[b, j] = db * np.float32(np.int32(v & 15) - 8)
            out[b, j + 16] = db * np.float32(np.int32(v >> 4) - 8)


@njit(**_JIT)
def dq_q4_1(blk, d, m, out):
    for b in prange(blk.shape[0]):
        db = d[b]
        mb = m[b]
        for j in range(16):
            v = blk[b, 4 + j]
            out[b, j] = db * np.float32(np.int32(v & 15)) + mb
            out[b, j + 16] = db * np.float32(np.int32(v >> 4)) + mb


@njit(**_JIT)
def dq_q5_0(blk, d, m, out):
    for b in prange(blk.shape[0]):
        db = d[b]
        qh = (np.uint32(blk[b, 2]) | (np.uint32(blk[b, 3]) << 8)
              | (np.uint32(blk[b, 4]) << 16) | (np.uint32(blk[b, 5]) << 24))
        for j in range(16):
            v = blk[b, 6 + j]
            lo = np.int32(v & 15) | (np.int32((qh >> j) & 1) << 4)
            hi = np.int32(v >> 4) | (np.int32((qh >> (j + 16)) & 1) << 4)
            out[b, j] = db * np.float32(lo - 16)
            out[b, j + 16] = db * np.float32(hi - 16)


@njit(**_JIT)
def dq_q5_1(blk, d, m, out):
    for b in prange(blk.shape[0]):
        db = d[b]
        mb = m[b]
        qh = (np.uint32(blk[b, 4]) | (np.uint32(blk[b, 5]) << 8)
              | (np.uint32(blk[b, 6]) << 16) | (np.uint32(blk[b, 7]) << 24))
        for j in range(16):
            v = blk[b, 8 + j]
            lo = np.int32(v & 15) | (np.int32((qh >> j) & 1) << 4)
            hi = np.int32(v >> 4) | (np.int32((qh >> (j + 16)) & 1) << 4)
            out[b, j] = db * np.float32(lo) + mb
            out[b, j + 16] = db * np.float32(hi) + mb


@njit(**_JIT)
def dq_q8_0(blk, d, m, out):
    for b in prange(blk.shape[0]):
        db = d[b]
        for j in range(32):
            v = np.int32(blk[b, 2 + j])
            if v >= 128:
                v -= 256
            out[b, j] = db * np.float32(v)


@njit(**dict(EXACT, inline="always"))
def scale_min_k4(s, j):
    """6-bit scale and min of sub-block j from the 12 packed bytes s (ggml get_scale_min_k4)."""
    if j < 4:
        return np.int32(s[j] & 63), np.int32(s[j + 4] & 63)
    sc = np.int32(s[j + 4] & 15) | (np.int32(s[j - 4] >> 6) << 4)
    mn = np.int32(s[j + 4] >> 4) | (np.int32(s[j] >> 6) << 4)
    return sc, mn


@njit(**_JIT)
def k_scales(blk, d, dmin, ds, ms):
    """Q4_K/Q5_K blocks -> scale and min of each 32-value sub-block, float32 (n_blocks, 8):
    value = ds * q - ms. Dequantization and repacking (weights.pack) both start here."""
    for b in prange(blk.shape[0]):
        s = blk[b, 4:16]
        for j in range(8):
            sc, mn = scale_min_k4(s, j)
            ds[b, j] = d[b] * np.float32(sc)
            ms[b, j] = dmin[b] * np.float32(mn)


@njit(**_JIT)
def dq_k(blk, ds, ms, qoff, has_h, out):
    """Q4_K (nibbles at byte 16) and Q5_K (nibbles at 48, high bits at 16..47) from k_scales."""
    for b in prange(blk.shape[0]):
        for c in range(4):
            d0, m0 = ds[b, 2 * c], ms[b, 2 * c]
            d1, m1 = ds[b, 2 * c + 1], ms[b, 2 * c + 1]
            for i in range(32):
                v = blk[b, qoff + 32 * c + i]
                q0 = np.int32(v & 15)
                q1 = np.int32(v >> 4)
                if has_h:
                    h = blk[b, 16 + i]
                    q0 |= np.int32((h >> (2 * c)) & 1) << 4
                    q1 |= np.int32((h >> (2 * c + 1)) & 1) << 4
                out[b, 64 * c + i] = d0 * np.float32(q0) - m0
                out[b, 64 * c + 32 + i] = d1 * np.float32(q1) - m1


@njit(**_JIT)
def dq_q6_k(blk, d, m, out):
    # layout: ql[128] qh[64] scales[16] (int8) d (fp16)
    for b in prange(blk.shape[0]):
        for c in range(8):
            h = c // 4
            r = c % 4
            sh = 4 * (r // 2)
            k = r % 2
            for i in range(32):
                lo = np.int32(blk[b, h * 64 + k * 32 + i] >> sh) & 15
                hi = np.int32(blk[b, 128 + h * 32 + i] >> (2 * r)) & 3
                q = (lo | (hi << 4)) - 32
                sv = np.int32(blk[b, 192 + (c * 32 + i) // 16])
                if sv >= 128:
                    sv -= 256
                out[b, c * 32 + i] = (d[b] * np.float32(sv)) * np.float32(q)


_TILE = PAR


# ---- a tile of rows [r0, r1) of a packed layout, float32 (prefill through numpy's matmul, when
# numpy carries no OpenBLAS that numba's threads can call: matmul_blas does it otherwise) ----

@njit(**_TILE)
def deq_nib(q, qh, has_h, word, d, m, r0, r1, nb, out):
    for r in prange(r0, r1):
        rr = r - r0
        for b in range(nb):
            k = r * nb + b
            db = d[k]
            mb = m[k]
            h = np.uint32(qh[k]) if has_h else np.uint32(0)
            for j in range(16):
                v = np.int32(q[k * 16 + j])
                # byte j holds values (a, a + 16), or in word order (layout "nibw") (a, a + 8)
                a = j // 2 + 16 * (j % 2) if word else j
                c = a + 8 if word else a + 16
                lo = (v & 15) | (np.int32((h >> a) & 1) << 4)
                hi = (v >> 4) | (np.int32((h >> c) & 1) << 4)
                out[rr, b * 32 + a] = db * np.float32(lo) + mb
                out[rr, b * 32 + c] = db * np.float32(hi) + mb


@njit(**_TILE)
def deq_i8(q, d, per16, m, has_m, r0, r1, nb, out):
    for r in prange(r0, r1):
        rr = r - r0
        for b in range(nb):
            k = r * nb + b
            mb = m[k] if has_m else np.float32(0.0)
            for j in range(32):
                db = d[2 * k + j // 16] if per16 else d[k]
                out[rr, b * 32 + j] = db * np.float32(q[k * 32 + j]) + mb


# qtype -> (kernel, byte offset of fp16 d, byte offset of fp16 m/dmin or -1)
_DQ = {
    QType.Q4_0: (dq_q4_0, 0, -1),
    QType.Q4_1: (dq_q4_1, 0, 2),
    QType.Q5_0: (dq_q5_0, 0, -1),
    QType.Q5_1: (dq_q5_1, 0, 2),
    QType.Q8_0: (dq_q8_0, 0, -1),
    QType.Q6_K: (dq_q6_k, 208, -1),
}
_DQ_K = {QType.Q4_K: (16, False), QType.Q5_K: (48, True)}  # byte offset of the nibbles, high bits
FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
SUPPORTED = frozenset(FLOAT_TYPES) | frozenset(_DQ) | frozenset(_DQ_K)


def _torch():
    """torch, imported on first use (F16 rows): importing it costs ~1.2 s of every start."""
    try:
        import torch
        return torch
    except Exception:  # pragma: no cover
        return None


def fp16_field(blocks: np.ndarray, off: int) -> np.ndarray:
    """fp16 field at byte offset `off` of each block -> float32 (n_blocks,)."""
    return np.ascontiguousarray(blocks[:, off:off + 2]).view(np.float16).reshape(-1).astype(np.float32)


def k_block_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K blocks (n, type_size) -> (ds, ms) float32 (n, 8): value = ds * q - ms."""
    n = blocks.shape[0]
    ds = np.empty((n, 8), np.float32)
    ms = np.empty((n, 8), np.float32)
    if n:
        k_scales(blocks, fp16_field(blocks, 0), fp16_field(blocks, 2), ds, ms)
    return ds, ms


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
    """GGUF data of `qtype` -> float32 (n_rows, n_cols), bit-exact vs gguf.quants.dequantize."""
    qtype = QType(qtype)
    if qtype in FLOAT_TYPES:
        return _float_rows(qtype, raw, n_cols)
    if qtype not in SUPPORTED:
        raise NotImplementedError(f"dequantize: {qtype.name} not supported")
    info = QTYPE_INFO[qtype]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, info.type_size)
    n_blocks = blocks.shape[0]
    out = np.empty((n_blocks, info.block_size), dtype=np.float32)
    if n_blocks and qtype in _DQ_K:
        ds, ms = k_block_scales(blocks)
        dq_k(blocks, ds, ms, *_DQ_K[qtype], out)
    elif n_blocks:
        kern, doff, moff = _DQ[qtype]
        d = fp16_field(blocks, doff)
        m = fp16_field(blocks, moff) if moff >= 0 else d
        kern(blocks, d, m, out)
    return out.reshape(-1, n_cols)
