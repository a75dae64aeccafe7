"""Grouped quantized matrix-vector products for the experts of a decode step: every (token, expert)
pair of a MoE layer in one parallel call (gate and up with the SwiGLU, then down), on the 3-D expert
tensor packed as one weight whose expert e is rows [e*rows, (e+1)*rows)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .blocks import dot_blk
from .matmul_int import L_BLK, L_I8, L_NIB, L_NIB5, L_NIB5H, L_NIBW, L_NIBW8, ROWS, _m_term, act_fmt_of, quant_row_as
from .nib_half import dot_nib5h_row, dot_nibw8_row, dot_nibw_row
from .simd import dot_i8_row, dot_i8s16_row, dot_nib5_row, dot_nib_row

from .jit import INLINE, SER
from .jit import PAR as _JIT


@njit(**SER)
def route(logits, top_k, norm, ids, w):
    """core/moe.route for a few tokens, without numpy's per-call overhead (~0.2 ms a decode layer):
    softmax in float64, the top_k experts by decreasing probability (ties: the lower id first),
    renormalized when `norm`. ids (T, top_k) int32 and w (T, top_k) float32 are written."""
    T, E = logits.shape
    p = np.empty(E, np.float64)
    taken = np.zeros(E, np.bool_)
    for t in range(T):
        mx = -np.inf
        for e in range(E):
            mx = max(mx, np.float64(logits[t, e]))
        s = 0.0
        for e in range(E):
            p[e] = np.exp(np.float64(logits[t, e]) - mx)
            s += p[e]
        taken[:] = False
        tot = 0.0
        for j in range(top_k):
            best, bv = -1, -1.0
            for e in range(E):
                if not taken[e] and p[e] > bv:
                    best, bv = e, p[e]
            if best < 0:  # NaN probabilities (checked before): any untaken expert keeps ids valid
                best = 0
                while taken[best]:
                    best += 1
                bv = p[best]
            taken[best] = True
            ids[t, j] = best
            w[t, j] = bv / s
            tot += bv / s
        if norm:
            for j in range(top_k):
                w[t, j] = np.float32(np.float64(w[t, j]) / tot)


@njit(**INLINE)
def _dot(wk, qs, qi, qh, d, m, xq, xd, xs, r, t):
    """Row r of a packed weight . row t of the int16 activations (matmul_int._tile's products)."""
    layout, fmt, nb, has_m = wk[0], wk[1], wk[2], wk[3] != 0
    off = (r * nb, nb)
    if layout == L_NIBW8:  # int8 activations (matmul_int.quant_row8, in xq's row as bytes)
        return dot_nibw8_row(qs, d, m, xq[t], xd[t], xs[t], off, np.float32(fmt))
    if layout == L_NIBW:
        return dot_nibw_row(qs, d, m, xq[t], xd[t], xs[t], off, np.float32(fmt))
    if layout == L_NIB5H:
        return dot_nib5h_row(qs, qh, d, m, xq[t], xd[t], xs[t], off, np.float32(fmt))
    if layout == L_NIB:
        return dot_nib_row(qs, d, m, xq[t], xd[t], xs[t], off)
    if layout == L_NIB5:
        return dot_nib5_row(qs, qh, d, m, xq[t], xd[t], xs[t], off)
    if layout == L_BLK:
        return dot_blk(fmt, qs, xq[t], xd[t], xs[t], off)
    if layout == L_I8:
        return _m_term(dot_i8_row(qi, d, xq[t], xd[t], off), has_m, m, xs[t], r, nb)
    return _m_term(dot_i8s16_row(qi, d, xq[t], xd[t], off), has_m, m, xs[t], r, nb)


@njit(**_JIT)
def gate_up_pairs(wg, qsg, qhg, dg, mg, wu, qsu, qhu, du, mu, xq, xqu, xd, xs, tok, exp, rows, out):
    """out[p, r] = silu(G[exp[p]] row r . x[tok[p]]) * (U[exp[p]] row r . x[tok[p]]): prange over
    (pair, group of ROWS rows), so a step's 8 experts share one launch. xq, xqu: x's int16 values in
    G's and U's activation formats (the same array when they agree), xd, xs their shared scales."""
    qig, qiu = qsg.view(np.int8), qsu.view(np.int8)
    n_groups = (rows + ROWS - 1) // ROWS
    for g in prange(len(tok) * n_groups):
        p = g // n_groups
        r0 = (g - p * n_groups) * ROWS
        t, base = tok[p], exp[p] * rows
        for r in range(r0, min(rows, r0 + ROWS)):
            a = _dot(wg, qsg, qig, qhg, dg, mg, xq, xd, xs, base + r, t)
            b = _dot(wu, qsu, qiu, qhu, du, mu, xqu, xd, xs, base + r, t)
            out[p, r] = a / (np.float32(1.0) + np.exp(-a)) * b


@njit(**_JIT)
def down_pairs(wk, qs, qh, d, m, hq, hd, hs, exp, rows, out):
    """out[p, r] = D[exp[p]] row r . h[p] (h: the pairs' SwiGLU outputs, quantized)."""
    qi = qs.view(np.int8)
    n_groups = (rows + ROWS - 1) // ROWS
    for g in prange(len(exp) * n_groups):
        p = g // n_groups
        r0 = (g - p * n_groups) * ROWS
        base = exp[p] * rows
        for r in range(r0, min(rows, r0 + ROWS)):
            out[p, r] = _dot(wk, qs, qi, qh, d, m, hq, hd, hs, base + r, p)


@njit(**SER)
def pairs_ffn(wg, qsg, qhg, dg, mg, wu, qsu, qhu, du, mu, wd, qsd, qhd, dd, md, x, tok, exp, wt, rows, out):
    """A decode step's (token, expert) pairs in one call: x's rows and the SwiGLU outputs quantized
    here, serially (a few rows: a parallel launch each would cost more), then gate_up_pairs and
    down_pairs (the two parallel launches), then out[tok[p]] += wt[p] * y[p]. Gate and up read one
    activation format (the caller checks), the down weights theirs."""
    T, n = x.shape
    fg, fu, fd = act_fmt_of(wg[0]), act_fmt_of(wu[0]), act_fmt_of(wd[0])
    nb = n // 32
    xq, xqu = np.empty((T, n), np.int16), np.empty((T, n), np.int16)
    xd, xs = np.empty((T, nb), np.float32), np.empty((T, nb), np.float32)
    for t in range(T):
        quant_row_as(x, xq, xd, xs, t, fg)
        if fu != fg:  # (an int16 order of its own: the same scales)
            quant_row_as(x, xqu, xd, xs, t, fu)
    P = len(tok)
    h = np.empty((P, rows), np.float32)
    gate_up_pairs(wg, qsg, qhg, dg, mg, wu, qsu, qhu, du, mu, xq, xqu if fu != fg else xq, xd, xs, tok, exp, rows, h)
    hb = rows // 32
    hq, hd, hs = np.empty((P, rows), np.int16), np.empty((P, hb), np.float32), np.empty((P, hb), np.float32)
    for p in range(P):
        quant_row_as(h, hq, hd, hs, p, fd)
    y = np.empty((P, out.shape[1]), np.float32)
    down_pairs(wd, qsd, qhd, dd, md, hq, hd, hs, exp, out.shape[1], y)
    for p in range(P):
        o, wp = out[tok[p]], wt[p]
        for r in range(out.shape[1]):
            o[r] += wp * y[p, r]
