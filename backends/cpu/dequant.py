"""Numba dequantization kernels, one per GGUF block type.

Every kernel takes the blocks as a uint8 array (n_blocks, type_size), the fp16 block scales already
converted to float32 (numpy does the fp16->fp32 conversion exactly), and writes float32
(n_blocks, block_size).  They are compiled WITHOUT fastmath so that no multiply-add is contracted
into an FMA: results are bit-exact against gguf.quants.dequantize, which rounds after every
numpy operation.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

_JIT = dict(cache=True, nogil=True, parallel=True, fastmath=False, boundscheck=False)


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


@njit(inline="always")
def scale_min_k4(s, j):
    """6-bit scale and min of sub-block j from the 12 packed bytes s (ggml get_scale_min_k4)."""
    if j < 4:
        return np.int32(s[j] & 63), np.int32(s[j + 4] & 63)
    sc = np.int32(s[j + 4] & 15) | (np.int32(s[j - 4] >> 6) << 4)
    mn = np.int32(s[j + 4] >> 4) | (np.int32(s[j] >> 6) << 4)
    return sc, mn


@njit(**_JIT)
def dq_q4_k(blk, d, m, out):
    for b in prange(blk.shape[0]):
        s = blk[b, 4:16]
        for c in range(4):
            sc0, mn0 = scale_min_k4(s, 2 * c)
            sc1, mn1 = scale_min_k4(s, 2 * c + 1)
            d0 = d[b] * np.float32(sc0)
            m0 = m[b] * np.float32(mn0)
            d1 = d[b] * np.float32(sc1)
            m1 = m[b] * np.float32(mn1)
            for i in range(32):
                v = blk[b, 16 + 32 * c + i]
                out[b, 64 * c + i] = d0 * np.float32(np.int32(v & 15)) - m0
                out[b, 64 * c + 32 + i] = d1 * np.float32(np.int32(v >> 4)) - m1


@njit(**_JIT)
def dq_q5_k(blk, d, m, out):
    for b in prange(blk.shape[0]):
        s = blk[b, 4:16]
        for c in range(4):
            sc0, mn0 = scale_min_k4(s, 2 * c)
            sc1, mn1 = scale_min_k4(s, 2 * c + 1)
            d0 = d[b] * np.float32(sc0)
            m0 = m[b] * np.float32(mn0)
            d1 = d[b] * np.float32(sc1)
            m1 = m[b] * np.float32(mn1)
            for i in range(32):
                v = blk[b, 48 + 32 * c + i]
                h = blk[b, 16 + i]
                q0 = np.int32(v & 15) | (np.int32((h >> (2 * c)) & 1) << 4)
                q1 = np.int32(v >> 4) | (np.int32((h >> (2 * c + 1)) & 1) << 4)
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


_TILE = dict(cache=True, nogil=True, fastmath=True, parallel=True, boundscheck=False)


# ---- a tile of rows [r0, r1) of a packed layout, float32 (prefill through numpy's matmul, when
# numpy carries no OpenBLAS that numba's threads can call: matmul_blas does it otherwise) ----

@njit(**_TILE)
def deq_nib(q, qh, has_h, d, m, r0, r1, nb, out):
    for r in prange(r0, r1):
        rr = r - r0
        for b in range(nb):
            k = r * nb + b
            db = d[k]
            mb = m[k]
            h = np.uint32(qh[k]) if has_h else np.uint32(0)
            for j in range(16):
                v = np.int32(q[k * 16 + j])
                lo = (v & 15) | (np.int32((h >> j) & 1) << 4)
                hi = (v >> 4) | (np.int32((h >> (j + 16)) & 1) << 4)
                out[rr, b * 32 + j] = db * np.float32(lo) + mb
                out[rr, b * 32 + 16 + j] = db * np.float32(hi) + mb


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
