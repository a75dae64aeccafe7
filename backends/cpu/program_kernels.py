"""The numba side of a compiled decode program (program.py): one call interprets a whole run of a
decode step's nodes with the op-by-op kernels, one Python -> numba transition instead of ~15 per layer."""
from __future__ import annotations

import numpy as np
from numba import njit

from . import ops as O
from .attention import attention_decode
from .jit import SER as _SER
from .matmul_int import mm_dec

# A program is an int64 table, one row per instruction:
#     [op, out buf, out c0, out c1, a buf, a c0, a c1, b buf, b c0, b c1, c buf, c c0, c c1, p0 .. p6]
# and one float32 row of parameters.  Operands are column ranges of 2-D float32 buffers (the siblings
# of a stacked q|k|v or gate|up matmul are column ranges of its output).  The kernels are the ones
# the op-by-op path calls, so both paths compute the same numbers.

OP_NORM, OP_NORM_HEADS, OP_MM, OP_BIAS, OP_ADD, OP_ACT, OP_SCALE, OP_ROPE, OP_ATTN, OP_COPY = range(10)
N_COLS = 20
P0 = 13



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
            mm_dec(wk[w], wq[w], wh[w], wd[w], wm[w], bufs[c[4]], xq[j], xd[j], xs[j], bufs[c[1]])
        elif op == OP_NORM:  # its input is a whole buffer (C layout: the sum vectorizes as op by op)
            x = bufs[c[4]]
            if p[1] != 0:  # only the last row (the logits of the last token)
                x = x[x.shape[0] - 1:]
            O.rms_norm_serial(x, vec[p[0]], fpar[i, 0], out)
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
            O.act_serial(p[0], a, b, True, out)
        elif op == OP_SCALE:
            s = fpar[i, 0]
            for t in range(out.shape[0]):
                for k in range(out.shape[1]):
                    out[t, k] = a[t, k] * s
        elif op == OP_ROPE:
            o = bufs[c[1]]
            o3 = o.reshape(o.shape[0], p[1], p[2])
            O.rope_out_serial(a, o3, cos[p[0]], sin[p[0]], p[3], p[4] != 0)
        elif op == OP_ATTN:
            b = bufs[c[7]][:, c[8]:c[9]]
            v = bufs[c[10]][:, c[11]:c[12]]
            # q: a whole buffer (C layout, as op by op).  One thread, as op by op: spreading the heads
            # over 2 threads measured no faster (21.2 vs 22.1 ms/token at 1500 tokens) and compiles
            # another parallel kernel (~1.7 s cold)
            attention_decode(bufs[c[4]], b, v, kc[p[0]], vc[p[0]], n_past, p[1], p[2], p[3], fpar[i, 0], p[4],
                              bufs[c[1]])
        elif op == OP_COPY:
            for t in range(out.shape[0]):
                for k in range(out.shape[1]):
                    out[t, k] = a[t, k]
