"""The numba side of a compiled CPU program (backends/cpu_program.py): one call runs a whole run of
a decode plan's nodes, so a token costs one Python -> numba transition instead of ~15 per layer.

A program is an int64 table, one row per instruction:
    [op, out buf, out c0, out c1, a buf, a c0, a c1, b buf, b c0, b c1, c buf, c c0, c c1, p0 .. p6]
and one float32 row of parameters.  Operands are column ranges of 2-D float32 buffers (the siblings
of a stacked q|k|v or gate|up matmul are column ranges of its output).  The kernels are the ones
the op-by-op path calls, so both paths compute the same numbers.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from lstream.backends import cpu_ops_kernels as _O
from lstream.backends import cpu_quant_blk as _blk
from lstream.backends.cpu_quant_mm import _ROWS, _quant_row
from lstream.backends.cpu_quant_simd import dot_i8_row, dot_i8s16_row, dot_nib5_row, dot_nib_row

OP_NORM, OP_NORM_HEADS, OP_MM, OP_BIAS, OP_ADD, OP_ACT, OP_SCALE, OP_ROPE, OP_ATTN, OP_COPY = range(10)
# Weight table columns: layout, blk format id, blocks per row, has m (i8 layouts)
L_NIB, L_NIB5, L_I8, L_I8S16, L_BLK = range(5)
N_COLS = 20
P0 = 13

_SER = dict(cache=True, nogil=True, fastmath=True, boundscheck=False)


@njit(**_SER)
def _norm_heads(x, w, hd, eps, out):
    """rms_norm of every head_dim-wide group of x's columns (x may be a column range)."""
    n_tok, n = x.shape
    for t in range(n_tok):
        for h0 in range(0, n, hd):
            ss = np.float32(0.0)
            for i in range(hd):
                v = x[t, h0 + i]
                ss += v * v
            inv = np.float32(1.0) / np.sqrt(ss / np.float32(hd) + eps)
            for i in range(hd):
                out[t, h0 + i] = x[t, h0 + i] * inv * w[i]


@njit(cache=True, nogil=True, inline="always")
def _dot(layout, fmt, has_m, qs, qi, qh, d, m, xq, xd, xs, r, nb):
    """One row's dot product for any layout: the same intrinsics (and the same m term) as the
    per-layout drivers of cpu_quant_mm / cpu_quant_blk, so results are identical."""
    off = (r * nb, nb)
    if layout == L_NIB:
        return dot_nib_row(qs, d, m, xq, xd, xs, off)
    if layout == L_NIB5:
        return dot_nib5_row(qs, qh, d, m, xq, xd, xs, off)
    if layout == L_BLK:
        return _blk.dot_blk(fmt, qs, xq, xd, xs, off)
    v = dot_i8_row(qi, d, xq, xd, off) if layout == L_I8 else dot_i8s16_row(qi, d, xq, xd, off)
    if has_m:
        for b in range(nb):
            v += m[r * nb + b] * xs[b]
    return v


@njit(cache=True, nogil=True, fastmath=True, parallel=True, boundscheck=False)
def _matmul(wk, qs, qh, d, m, x, xq, xd, xs, out):
    """out = x @ W^T for every layout in one parallel function (one compilation, not five drivers)."""
    layout, fmt, nb, has_m = wk[0], wk[1], wk[2], wk[3] != 0
    n_tok = xq.shape[0]
    for t in range(n_tok):
        _quant_row(x, xq, xd, xs, t)
    qi = qs.view(np.int8)
    n_rows = out.shape[1]
    n_groups = (n_rows + _ROWS - 1) // _ROWS
    for g in prange(n_groups):
        for r in range(g * _ROWS, min(n_rows, (g + 1) * _ROWS)):
            for t in range(n_tok):
                out[t, r] = _dot(layout, fmt, has_m, qs, qi, qh, d, m, xq[t], xd[t], xs[t], r, nb)


@njit(**_SER)
def run(code, fpar, bufs, wk, wq, wh, wd, wm, vec, kc, vc, cos, sin, n_past, xq, xd, xs):
    for i in range(code.shape[0]):
        c = code[i]
        op = c[0]
        out = bufs[c[1]][:, c[2]:c[3]]
        a = bufs[c[4]][:, c[5]:c[6]]
        p = c[P0:]
        if op == OP_MM:
            j = p[1]  # activation quantization buffers for this (rows, n_cols)
            w = p[0]
            _matmul(wk[w], wq[w], wh[w], wd[w], wm[w], a, xq[j], xd[j], xs[j], bufs[c[1]])
        elif op == OP_NORM:  # its input is a whole buffer (C layout: the sum vectorizes as op by op)
            x = bufs[c[4]]
            if p[1] != 0:  # only the last row (the logits of the last token)
                x = x[x.shape[0] - 1:]
            _O._rms_norm_1(x, vec[p[0]], fpar[i, 0], out)
        elif op == OP_NORM_HEADS:
            _norm_heads(a, vec[p[0]], p[1], fpar[i, 0], out)
        elif op == OP_BIAS:
            v = vec[p[0]]
            for t in range(out.shape[0]):
                for k in range(out.shape[1]):
                    out[t, k] += v[k]
        elif op == OP_ADD:
            b = bufs[c[7]][:, c[8]:c[9]]
            for t in range(out.shape[0]):
                for k in range(out.shape[1]):
                    out[t, k] = a[t, k] + b[t, k]
        elif op == OP_ACT:
            b = bufs[c[7]][:, c[8]:c[9]]
            _O._act_1(p[0], a, b, True, out)
        elif op == OP_SCALE:
            s = fpar[i, 0]
            for t in range(out.shape[0]):
                for k in range(out.shape[1]):
                    out[t, k] = a[t, k] * s
        elif op == OP_ROPE:
            o = bufs[c[1]]
            o3 = o.reshape(o.shape[0], p[1], p[2])
            _O._rope_out_1(a, o3, cos[p[0]], sin[p[0]], p[3], p[4] != 0)
        elif op == OP_ATTN:
            b = bufs[c[7]][:, c[8]:c[9]]
            v = bufs[c[10]][:, c[11]:c[12]]
            _O._kv_write(b, v, kc[p[0]], vc[p[0]], n_past, p[2], p[3])
            # q: a whole buffer (C layout, as op by op); heads over the threads (op by op: one thread)
            _O._attention(bufs[c[4]], kc[p[0]], vc[p[0]], n_past, p[1], p[2], p[3], fpar[i, 0], p[4], bufs[c[1]])
        elif op == OP_COPY:
            for t in range(out.shape[0]):
                for k in range(out.shape[1]):
                    out[t, k] = a[t, k]
