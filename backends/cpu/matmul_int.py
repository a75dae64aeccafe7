"""Quantized matmul drivers (numba, parallel over output rows) built on the AVX2 row dots.

Activations are quantized per 32 to int16 once per call (quant_x); every kernel then loops
  prange over row groups -> token tiles -> rows -> tokens
so one weight row stays in L1 while it is dotted with a tile of tokens, and the token tile
(int16) stays in L2.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .simd import dot_i8_row, dot_i8s16_row, dot_nib5_row, dot_nib_row

_JIT = dict(cache=True, nogil=True, fastmath=True, parallel=True, boundscheck=False)
_ROWS = 16  # rows per parallel work item
_TT = 64  # tokens per tile


_SER = dict(cache=True, nogil=True, fastmath=True, boundscheck=False)


@njit(**_SER)
def _quant_row(x, xq, xd, xs, t):
    nb = x.shape[1] // 32
    for b in range(nb):
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(x[t, b * 32 + j]))
        dd = amax / np.float32(32767.0)
        idd = np.float32(1.0) / dd if dd > 0 else np.float32(0.0)
        s = np.int32(0)
        for j in range(32):
            v = np.int32(np.rint(x[t, b * 32 + j] * idd))
            xq[t, b * 32 + j] = v
            s += v
        xd[t, b] = dd
        xs[t, b] = dd * np.float32(s)


@njit(**_JIT)
def quant_x(x, xq, xd, xs):
    """x (n_tok, n) float32 -> xq int16 (n_tok, n), xd scale and xs = xd*sum(xq) (n_tok, n/32)."""
    for t in prange(x.shape[0]):
        _quant_row(x, xq, xd, xs, t)


# Every driver takes the float activations x too: with quant=True it quantizes them itself, serially,
# before its parallel loop (decode: one dispatch and one thread-pool launch per matmul, not two).

@njit(**_JIT)
def mm_nib(q, d, m, x, quant, xq, xd, xs, nb, out):
    n_tok = xq.shape[0]
    if quant:
        for t in range(n_tok):
            _quant_row(x, xq, xd, xs, t)
    n_rows = out.shape[1]
    n_groups = (n_rows + _ROWS - 1) // _ROWS
    for g in prange(n_groups):
        r1 = min(n_rows, (g + 1) * _ROWS)
        for t0 in range(0, n_tok, _TT):
            t1 = min(n_tok, t0 + _TT)
            for r in range(g * _ROWS, r1):
                off = (r * nb, nb)
                for t in range(t0, t1):
                    out[t, r] = dot_nib_row(q, d, m, xq[t], xd[t], xs[t], off)


@njit(**_JIT)
def mm_i8(q, d, m, has_m, x, quant, xq, xd, xs, nb, out):
    n_tok = xq.shape[0]
    if quant:
        for t in range(n_tok):
            _quant_row(x, xq, xd, xs, t)
    n_rows = out.shape[1]
    n_groups = (n_rows + _ROWS - 1) // _ROWS
    for g in prange(n_groups):
        r1 = min(n_rows, (g + 1) * _ROWS)
        for t0 in range(0, n_tok, _TT):
            t1 = min(n_tok, t0 + _TT)
            for r in range(g * _ROWS, r1):
                off = (r * nb, nb)
                for t in range(t0, t1):
                    v = dot_i8_row(q, d, xq[t], xd[t], off)
                    if has_m:
                        xst = xs[t]
                        for b in range(nb):
                            v += m[r * nb + b] * xst[b]
                    out[t, r] = v


@njit(**_JIT)
def mm_i8s16(q, d16, m, has_m, x, quant, xq, xd, xs, nb, out):
    """int8 weights with one scale per 16 (d16 has 2*nb per row), optional min per 32 (m)."""
    n_tok = xq.shape[0]
    if quant:
        for t in range(n_tok):
            _quant_row(x, xq, xd, xs, t)
    n_rows = out.shape[1]
    n_groups = (n_rows + _ROWS - 1) // _ROWS
    for g in prange(n_groups):
        r1 = min(n_rows, (g + 1) * _ROWS)
        for t0 in range(0, n_tok, _TT):
            t1 = min(n_tok, t0 + _TT)
            for r in range(g * _ROWS, r1):
                off = (r * nb, nb)
                for t in range(t0, t1):
                    v = dot_i8s16_row(q, d16, xq[t], xd[t], off)
                    if has_m:
                        xst = xs[t]
                        for b in range(nb):
                            v += m[r * nb + b] * xst[b]
                    out[t, r] = v


@njit(**_JIT)
def mm_nib5(q, qh, d, m, x, quant, xq, xd, xs, nb, out):
    n_tok = xq.shape[0]
    if quant:
        for t in range(n_tok):
            _quant_row(x, xq, xd, xs, t)
    n_rows = out.shape[1]
    n_groups = (n_rows + _ROWS - 1) // _ROWS
    for g in prange(n_groups):
        r1 = min(n_rows, (g + 1) * _ROWS)
        for t0 in range(0, n_tok, _TT):
            t1 = min(n_tok, t0 + _TT)
            for r in range(g * _ROWS, r1):
                off = (r * nb, nb)
                for t in range(t0, t1):
                    out[t, r] = dot_nib5_row(q, qh, d, m, xq[t], xd[t], xs[t], off)


# ---- dequantize a tile of rows [r0, r1) from the packed layouts (prefill: tile + BLAS sgemm) ----

@njit(**_JIT)
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


@njit(**_JIT)
def deq_i8(q, d, per16, m, has_m, r0, r1, nb, out):
    for r in prange(r0, r1):
        rr = r - r0
        for b in range(nb):
            k = r * nb + b
            mb = m[k] if has_m else np.float32(0.0)
            for j in range(32):
                db = d[2 * k + j // 16] if per16 else d[k]
                out[rr, b * 32 + j] = db * np.float32(q[k * 32 + j]) + mb
