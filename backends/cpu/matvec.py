"""The decode matmul (a few tokens): one parallel function for every packed layout.

One function rather than the five per-layout drivers of cpu_quant_mm / cpu_quant_blk, so that
the op-by-op path and the compiled programs (cpu_program_kernels) share one compilation (numba
compiles each driver and each argument type separately: seconds on a cold start).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import blocks as _blk
from .matmul_int import _ROWS, _quant_row
from .simd import dot_i8_row, dot_i8s16_row, dot_nib5_row, dot_nib_row

L_NIB, L_NIB5, L_I8, L_I8S16, L_BLK = range(5)
LAYOUT_ID = {"nib": L_NIB, "nib5": L_NIB5, "i8": L_I8, "i8s16": L_I8S16, "blk": L_BLK}


@njit(cache=True, nogil=True, fastmath=True, parallel=True, boundscheck=False)
def mm_dec(wk, qs, qh, d, m, x, xq, xd, xs, out):
    """out (n_tok, n_rows) = x @ W^T, x quantized here (decode: one launch per matmul), for every
    layout; wk = PackedWeight.dec_args' [layout, blk format, blocks per row, has m].  The layout is
    tested once per group of rows; each branch is the loop of its cpu_quant_mm / cpu_quant_blk
    driver (same intrinsics, same m term), so results are identical."""
    layout, fmt, nb, has_m = wk[0], wk[1], wk[2], wk[3] != 0
    n_tok = xq.shape[0]
    for t in range(n_tok):
        _quant_row(x, xq, xd, xs, t)
    qi = qs.view(np.int8)
    n_rows = out.shape[1]
    n_groups = (n_rows + _ROWS - 1) // _ROWS
    for g in prange(n_groups):
        r0, r1 = g * _ROWS, min(n_rows, (g + 1) * _ROWS)
        if layout == L_NIB:
            for r in range(r0, r1):
                for t in range(n_tok):
                    out[t, r] = dot_nib_row(qs, d, m, xq[t], xd[t], xs[t], (r * nb, nb))
        elif layout == L_NIB5:
            for r in range(r0, r1):
                for t in range(n_tok):
                    out[t, r] = dot_nib5_row(qs, qh, d, m, xq[t], xd[t], xs[t], (r * nb, nb))
        elif layout == L_BLK:
            for r in range(r0, r1):
                for t in range(n_tok):
                    out[t, r] = _blk.dot_blk(fmt, qs, xq[t], xd[t], xs[t], (r * nb, nb))
        elif layout == L_I8:
            for r in range(r0, r1):
                for t in range(n_tok):
                    out[t, r] = _m_term(dot_i8_row(qi, d, xq[t], xd[t], (r * nb, nb)), has_m, m, xs[t], r, nb)
        else:
            for r in range(r0, r1):
                for t in range(n_tok):
                    out[t, r] = _m_term(dot_i8s16_row(qi, d, xq[t], xd[t], (r * nb, nb)), has_m, m, xs[t], r, nb)


@njit(cache=True, nogil=True, fastmath=True, boundscheck=False, inline="always")
def _m_term(v, has_m, m, xst, r, nb):
    if has_m:
        for b in range(nb):
            v += m[r * nb + b] * xst[b]
    return v
